//! The distributed form with a real Kafka-protocol broker (tansu), services as separate
//! processes: exact counts end to end, through a worker crash, through a broker outage,
//! with poison messages; partitions shared by a scaled-out group. The takeover of a dead
//! member's partitions by a survivor runs against librdkafka's mock cluster, since tansu
//! 0.6 does not rebalance survivors after a session timeout (see the README).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::KafkaBroker;
use tokio_util::sync::CancellationToken;

fn addr(service: &testkit::Service) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], service.port))
}

fn assert_converged(diffs: &[Diff], services: &[&testkit::Service]) {
    if !diffs.is_empty() {
        for s in services {
            eprintln!("--- {} ({})\n{}", s.name, s.log.display(), s.log_tail(30));
        }
        panic!(
            "{} users' counts differ from what clients saw (user, seen, counted): {:?}",
            diffs.len(),
            &diffs[..diffs.len().min(10)]
        );
    }
}

async fn wait_for_partitions(
    worker: &testkit::Service,
    at_least: usize,
    within: Duration,
) -> Vec<i64> {
    let deadline = Instant::now() + within;
    loop {
        let stats = worker_stats(worker).await;
        let partitions: Vec<i64> = stats["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap())
            .collect();
        if partitions.len() >= at_least || Instant::now() > deadline {
            return partitions;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end_counts_are_exact_with_two_limiters_and_two_workers() {
    let broker = KafkaBroker::start();
    let cluster = Cluster::new(broker.brokers());
    let (l1, l2) = (cluster.limiter("limiter-1"), cluster.limiter("limiter-2"));
    let (w1, w2) = (cluster.worker("worker-1"), cluster.worker("worker-2"));
    let gateway = cluster.gateway("gateway", &[&l1, &l2]);
    let seen = Seen::default();
    drive(
        addr(&gateway),
        users(60),
        3000,
        16,
        0.0,
        seen.clone(),
        Default::default(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(seen.total(), 3000);
    let blocked: u64 = seen.0.lock().unwrap().values().map(|(_, b)| b).sum();
    assert!(blocked > 0, "the load should hit the limit for some users");
    let diffs = converge(addr(&gateway), &seen, Duration::from_secs(60)).await;
    assert_converged(&diffs, &[&l1, &l2, &w1, &w2, &gateway]);
    assert_window_totals(addr(&gateway), &seen).await;
    assert_status_sums_the_instances(addr(&gateway), 3000, 2, 2).await;
}

/// The standalone gateway's `/status` (what its dashboard shows) sums what every limiter
/// and worker reports through Redis: the decisions and events of the whole deployment, and
/// the workers' consumer lag.
async fn assert_status_sums_the_instances(
    gateway: SocketAddr,
    decisions: u64,
    limiters: usize,
    workers: usize,
) {
    let client = common::http();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = common::get_json(&client, &format!("http://{gateway}/status")).await;
        let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let decided = count(&st["decisions"]["allowed"]) + count(&st["decisions"]["limited"]);
        let detail = st["stream"]["detail"].as_str().unwrap_or_default();
        if decided == decisions
            && count(&st["events"]["published"]) == decisions
            && st["consumer_lag"].is_i64()
            && detail.starts_with(&format!("{limiters} limiters:"))
            && detail.ends_with(&format!("; {workers} workers"))
        {
            assert_eq!(st["decisions"]["degraded"], 0, "{st}");
            assert_eq!(st["events"]["dropped"], 0, "{st}");
            for part in ["limiter", "store", "stream"] {
                assert_eq!(st[part]["ok"], true, "{part}: {st}");
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/status never summed {limiters} limiters and {workers} workers: {st}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_is_replaced_and_nothing_is_lost_or_counted_twice() {
    let broker = KafkaBroker::start();
    let mut cluster = Cluster::new(broker.brokers());
    // A short session, so the broker forgets the dead member soon (see below).
    cluster
        .extra
        .push(("RDKAFKA_SESSION_TIMEOUT_MS", "6000".into()));
    cluster
        .extra
        .push(("RDKAFKA_HEARTBEAT_INTERVAL_MS", "500".into()));
    let limiter = cluster.limiter("limiter");
    let (mut w1, w2) = (cluster.worker("worker-1"), cluster.worker("worker-2"));
    let gateway = cluster.gateway("gateway", &[&limiter]);
    let seen = Seen::default();
    let load = tokio::spawn(drive(
        addr(&gateway),
        users(200),
        4000,
        8,
        150.0,
        seen.clone(),
        Default::default(),
        CancellationToken::new(),
    ));
    // Wait until w1 has counted something (so it has applied, and maybe not committed).
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker_stats(&w1).await["events"].as_u64().unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "worker-1 never counted anything:\n{}",
            w1.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w1.kill();
    // tansu keeps a dead member in the group until its session times out (and would hand
    // it partitions in the meantime): the replacement joins after that, as a restarted
    // container typically would.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let w3 = cluster.worker("worker-3");
    load.await.unwrap();
    assert_eq!(seen.total(), 4000);
    let diffs = converge(addr(&gateway), &seen, Duration::from_secs(90)).await;
    assert_converged(&diffs, &[&limiter, &w2, &w3, &gateway]);
    // The replayed events were not counted twice in the per-minute aggregates either.
    assert_window_totals(addr(&gateway), &seen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_broker_does_not_slow_answers_and_counts_converge() {
    let broker = KafkaBroker::start();
    let cluster = Cluster::new(broker.brokers());
    let limiter = cluster.limiter("limiter");
    let worker = cluster.worker("worker");
    let gateway = cluster.gateway("gateway", &[&limiter]);
    let (seen, latencies) = (Seen::default(), Latencies::default());
    let stop = CancellationToken::new();
    let load = tokio::spawn(drive(
        addr(&gateway),
        users(100),
        usize::MAX,
        4,
        50.0,
        seen.clone(),
        latencies.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.freeze(true);
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.freeze(false);
    let thawed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    load.await.unwrap();

    let during: Vec<Duration> = latencies
        .lock()
        .unwrap()
        .iter()
        .filter(|(sent, _)| *sent >= frozen_at && *sent < thawed_at)
        .map(|(_, d)| *d)
        .collect();
    assert!(
        during.len() > 500,
        "requests kept flowing during the freeze: {}",
        during.len()
    );
    let slowest = during.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(250),
        "slowest answer during the broker freeze: {slowest:?}"
    );
    let diffs = converge(addr(&gateway), &seen, Duration::from_secs(90)).await;
    assert_converged(&diffs, &[&limiter, &worker, &gateway]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_share_the_partitions() {
    let broker = KafkaBroker::start();
    let cluster = Cluster::new(broker.brokers());
    let _limiter = cluster.limiter("limiter");
    let workers = [
        cluster.worker("worker-1"),
        cluster.worker("worker-2"),
        cluster.worker("worker-3"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = Vec::new();
        for w in &workers {
            owned.push(wait_for_partitions(w, 0, Duration::ZERO).await);
        }
        let mut all: Vec<i64> = owned.iter().flatten().copied().collect();
        all.sort();
        if owned.iter().all(|p| !p.is_empty()) && all == (0..6).collect::<Vec<_>>() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not shared by the 3 workers: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_skipped_counted_and_do_not_stop_the_partition() {
    let broker = KafkaBroker::start();
    let cluster = Cluster::new(broker.brokers());
    let limiter = cluster.limiter("limiter");
    let worker = cluster.worker("worker");
    let gateway = cluster.gateway("gateway", &[&limiter]);
    let users = users(20);
    // Garbage and a future schema version, on the same partitions as real users' events.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.brokers)
        .create()
        .unwrap();
    let future_version = serde_json::json!({"schema_version": 99, "user_id": users[0], "allowed": true, "cost": 1, "ts_ms": 0, "limiter_id": "x"}).to_string();
    let poison: [(&str, &[u8]); 2] = [
        (users[0].as_str(), b"\xff\x00 not json"),
        (users[1].as_str(), future_version.as_bytes()),
    ];
    for (key, payload) in poison {
        producer
            .send(
                FutureRecord::to(&cluster.topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let seen = Seen::default();
    drive(
        addr(&gateway),
        users.clone(),
        300,
        4,
        0.0,
        seen.clone(),
        Default::default(),
        CancellationToken::new(),
    )
    .await;
    let diffs = converge(addr(&gateway), &seen, Duration::from_secs(60)).await;
    assert_converged(&diffs, &[&limiter, &worker, &gateway]);
    assert_eq!(worker_stats(&worker).await["poison"], 2);
}

/// librdkafka's mock cluster implements session timeouts: when a member dies, the survivor
/// is told to rebalance and takes over every partition; the counts stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn against_the_mock_cluster_a_survivor_takes_over_a_dead_members_partitions() {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let mut cluster = Cluster::new(mock.bootstrap_servers());
    cluster.extra.push(("KAFKA_PARTITIONS", "4".into()));
    // A short session, so the dead member is noticed within seconds.
    cluster
        .extra
        .push(("RDKAFKA_SESSION_TIMEOUT_MS", "6000".into()));
    cluster
        .extra
        .push(("RDKAFKA_HEARTBEAT_INTERVAL_MS", "500".into()));

    mock.create_topic(&cluster.topic, 4, 1).unwrap();
    let limiter = cluster.limiter("limiter");
    let (mut w1, w2) = (cluster.worker("worker-1"), cluster.worker("worker-2"));
    let gateway = cluster.gateway("gateway", &[&limiter]);
    // Both members own part of the topic before the crash.
    let p1 = wait_for_partitions(&w1, 1, Duration::from_secs(60)).await;
    let p2 = wait_for_partitions(&w2, 1, Duration::from_secs(60)).await;
    assert!(
        !p1.is_empty() && !p2.is_empty() && p1.len() + p2.len() == 4,
        "{p1:?} {p2:?}"
    );

    let seen = Seen::default();
    let load = tokio::spawn(drive(
        addr(&gateway),
        users(100),
        2000,
        4,
        100.0,
        seen.clone(),
        Default::default(),
        CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    w1.kill();
    let owned = wait_for_partitions(&w2, 4, Duration::from_secs(60)).await;
    assert_eq!(
        owned,
        vec![0, 1, 2, 3],
        "the survivor owns every partition:\n{}",
        w2.log_tail(30)
    );
    load.await.unwrap();
    let diffs = converge(addr(&gateway), &seen, Duration::from_secs(60)).await;
    assert_converged(&diffs, &[&limiter, &w2, &gateway]);
    drop(mock);
}

/// A topic recreated: its offsets start from 0 again, below what the counters had applied
/// per partition, so events deduplicated on offsets were skipped as already counted.
/// Stamped events count once by their publisher's epoch and sequence, whatever offsets
/// they arrive at. (tansu 0.6 cannot delete and recreate a topic under a live group: its
/// fetches past the new end answer nothing and the consumer waits for ever, and sends to
/// the topic meanwhile fail for good. So the deployment moves to a new topic of the same
/// shape, which is what the counters see of a recreated one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_topic_counts_each_event_once() {
    let broker = KafkaBroker::start();
    let mut cluster = Cluster::new(broker.brokers());
    let users = users(40);
    let seen = Seen::default();
    let load = |gateway: SocketAddr, n| {
        drive(
            gateway,
            users.clone(),
            n,
            4,
            0.0,
            seen.clone(),
            Default::default(),
            CancellationToken::new(),
        )
    };
    {
        let limiter = cluster.limiter("limiter");
        let worker = cluster.worker("worker");
        let gateway = cluster.gateway("gateway", &[&limiter]);
        load(addr(&gateway), 1500).await;
        let diffs = converge(addr(&gateway), &seen, Duration::from_secs(60)).await;
        assert_converged(&diffs, &[&limiter, &worker, &gateway]);
    }
    cluster.topic = testkit::unique("events");
    let limiter = cluster.limiter("limiter-2");
    let worker = cluster.worker("worker-2");
    let gateway = cluster.gateway("gateway-2", &[&limiter]);
    load(addr(&gateway), 1000).await;
    assert_eq!(seen.total(), 2500);
    let diffs = converge(addr(&gateway), &seen, Duration::from_secs(60)).await;
    assert_converged(&diffs, &[&limiter, &worker, &gateway]);
    assert_window_totals(addr(&gateway), &seen).await;
}
