//! The bucket-store contract against a real redis-server, and what only Redis does.

use std::sync::Arc;
use std::time::Duration;

use domain::Policy;
use kit::redis::Endpoint;
use rate_limiter::back::store::contract::{self, Advance, TakeExt};
use rate_limiter::back::store::{BucketStore, RedisStore};
use testkit::{RedisCluster, RedisServer, unique};

fn store(redis: &RedisServer, prefix: &str, policy: Policy) -> RedisStore {
    RedisStore::new(
        &Endpoint::single(redis.url()),
        prefix,
        policy,
        Duration::from_millis(500),
    )
    .unwrap()
}

async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The contract suite, one test per check, each on a Redis of its own.
mod redis_store_contract {
    use super::*;

    rate_limiter::bucket_store_contract!(RedisServer::start(), |redis, policy| {
        let s = store(redis, &unique("contract"), policy);
        async move { (Arc::new(s) as Arc<dyn BucketStore>, Advance::Real) }
    });
}

#[tokio::test]
async fn redis_cluster_store_passes_the_contract_suite_with_buckets_on_every_node() {
    let cluster = RedisCluster::start();
    let prefix = unique("cluster");
    contract::run_all(|policy| {
        let s = RedisStore::new(
            &Endpoint::cluster(cluster.url()),
            &unique("contract"),
            policy,
            Duration::from_millis(500),
        )
        .unwrap();
        async move { (Arc::new(s) as Arc<dyn BucketStore>, Advance::Real) }
    })
    .await;
    // A batch over many users is spread over the nodes, each take decided where its key
    // lives, one user's takes in order.
    let s = RedisStore::new(
        &Endpoint::cluster(cluster.url()),
        &prefix,
        Policy::new(2, 0.01).unwrap(),
        Duration::from_millis(500),
    )
    .unwrap();
    s.preload().await.unwrap();
    let users: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut takes: Vec<(&str, u64)> = Vec::new();
    for _ in 0..3 {
        takes.extend(users.iter().map(|u| (u.as_str(), 1)));
    }
    let taken = s.take_many(&takes).await.unwrap();
    let allowed: Vec<bool> = taken.into_iter().map(|t| t.unwrap().is_allowed()).collect();
    assert!(allowed[..120].iter().all(|a| *a), "2 tokens each");
    assert!(
        allowed[120..].iter().all(|a| !*a),
        "the third take of each is refused"
    );
    for url in cluster.node_urls() {
        let mut node = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut node)
            .await
            .unwrap();
        assert!(!keys.is_empty(), "node {url} holds some of the 60 buckets");
    }
}

#[tokio::test]
async fn bucket_key_expires_when_the_bucket_would_be_full() {
    let redis = RedisServer::start();
    let prefix = unique("ttl");
    let s = store(&redis, &prefix, Policy::new(4, 10.0).unwrap());
    s.take("u{1}", 2).await.unwrap();
    let key = domain::keys::bucket_key(&prefix, "u{1}");
    let mut conn = raw(&redis).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (150..=200).contains(&ttl),
        "2 tokens at 10/s refill in 200 ms; pttl {ttl}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "a full bucket's key is gone");
}

#[tokio::test]
async fn a_bucket_is_16_bytes_and_the_earlier_text_form_is_still_read() {
    let redis = RedisServer::start();
    let prefix = unique("format");
    let s = store(&redis, &prefix, Policy::new(10, 0.001).unwrap());
    s.take("new", 3).await.unwrap();
    let mut conn = raw(&redis).await;
    let len: usize = redis::cmd("STRLEN")
        .arg(domain::keys::bucket_key(&prefix, "new"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 16);
    // A bucket written by an earlier version: 5 tokens, updated now (Redis's clock).
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(domain::keys::bucket_key(&prefix, "old"))
        .arg(format!("5 {}", secs * 1_000_000 + micros))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let d = s.take("old", 1).await.unwrap();
    assert!(d.is_allowed());
    assert_eq!(d.quota().remaining, 4);
    let d = s.take("old", 4).await.unwrap();
    assert!(d.is_allowed());
    assert!(!s.take("old", 1).await.unwrap().is_allowed());
}

#[tokio::test]
async fn a_refused_take_writes_nothing_and_its_retry_after_is_exact() {
    let redis = RedisServer::start();
    let prefix = unique("refused");
    // 3 tokens per second: waits are fractions of a millisecond that do not divide evenly.
    let s = store(&redis, &prefix, Policy::new(2, 3.0).unwrap());
    let key = domain::keys::bucket_key(&prefix, "u");
    let mut conn = raw(&redis).await;
    for round in 0..5 {
        while s.take("u", 1).await.unwrap().is_allowed() {}
        let before: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let refused = s.take("u", 1).await.unwrap();
        assert!(!refused.is_allowed());
        let after: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            before, after,
            "round {round}: a refusal leaves the bucket as it was"
        );
        tokio::time::sleep(refused.retry_after()).await;
        assert!(
            s.take("u", 1).await.unwrap().is_allowed(),
            "round {round}: a retry after retry_after ({:?}) is admitted",
            refused.retry_after()
        );
    }
}

#[tokio::test]
async fn script_is_reloaded_after_a_script_flush() {
    let redis = RedisServer::start();
    let s = store(&redis, &unique("noscript"), Policy::new(3, 0.01).unwrap());
    s.preload().await.unwrap();
    assert!(s.take("u", 1).await.unwrap().is_allowed());
    let mut conn = raw(&redis).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let d = s.take("u", 1).await.unwrap();
    assert!(d.is_allowed());
    assert_eq!(d.quota().remaining, 1);
    // A batch after a flush: every take finds the script missing, none ran; all are sent
    // again once it is loaded, and each is decided exactly once.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let taken = s.take_many(&[("u", 1), ("v", 2), ("u", 1)]).await.unwrap();
    let got: Vec<(bool, u64)> = taken
        .into_iter()
        .map(|t| t.unwrap())
        .map(|d| (d.is_allowed(), d.quota().remaining))
        .collect();
    assert_eq!(got, [(true, 0), (true, 1), (false, 0)]);
}

#[tokio::test]
async fn a_restarted_empty_redis_starts_buckets_full() {
    let mut redis = RedisServer::start();
    let s = store(&redis, &unique("restart"), Policy::new(2, 0.01).unwrap());
    s.take("u", 2).await.unwrap();
    assert!(!s.take("u", 1).await.unwrap().is_allowed());
    redis.restart();
    // The multiplexed connection notices the restart and reconnects by itself.
    let mut decision = None;
    for _ in 0..50 {
        match s.take("u", 1).await {
            Ok(d) => {
                decision = Some(d);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let d = decision.expect("store answers again after the restart");
    assert!(d.is_allowed());
    assert_eq!(d.quota().remaining, 1);
}

#[tokio::test]
async fn calls_fail_fast_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let s = RedisStore::new(
        &Endpoint::single(redis.url()),
        &unique("down"),
        Policy::new(2, 1.0).unwrap(),
        Duration::from_millis(50),
    )
    .unwrap();
    s.take("u", 1).await.unwrap();
    redis.kill();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert!(s.take("u", 1).await.is_err());
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
}

/// The widest policy the bounds allow (10^9 tokens refilled over 365 days): the script
/// answers at once, its `PX` expiry is an integer Redis takes, and the waits are exact.
#[tokio::test]
async fn the_widest_policy_allowed_is_decided_in_one_quick_script() {
    use domain::bucket::{MAX_CAPACITY, MAX_REFILL_SECS};
    let redis = RedisServer::start();
    let policy = Policy::new(MAX_CAPACITY, MAX_CAPACITY as f64 / MAX_REFILL_SECS).unwrap();
    let prefix = unique("widest");
    let s = store(&redis, &prefix, policy);
    let started = std::time::Instant::now();
    let d = s.take("u", MAX_CAPACITY).await.unwrap();
    assert!(d.is_allowed());
    let year = Duration::from_secs_f64(MAX_REFILL_SECS);
    assert!(
        d.quota().reset_after >= year - Duration::from_millis(50),
        "{d:?}"
    );
    let d = s.take("u", 1).await.unwrap();
    assert!(!d.is_allowed());
    assert!(d.retry_after() < Duration::from_millis(100), "{d:?}");
    assert!(started.elapsed() < Duration::from_millis(400));
    let mut conn = raw(&redis).await;
    // The bucket's key (beside it, the batch's remembered answers expire within seconds).
    let ttl: i64 = redis::cmd("PTTL")
        .arg(domain::keys::bucket_key(&prefix, "u"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 364 * 86_400_000, "expires when full again: {ttl} ms");
}

/// Defect: a batch of up to 256 decisions shared the deadline of one (50 ms). A Redis that
/// stalls for 200 ms now fails a single decision (100 ms here) but not a full batch of 256,
/// whose deadline grows with its size (500 ms).
#[tokio::test]
async fn a_batch_gets_a_deadline_that_fits_its_size() {
    let redis = RedisServer::start();
    let s = RedisStore::new(
        &Endpoint::single(redis.url()),
        &unique("batchdeadline"),
        Policy::new(10, 1.0).unwrap(),
        Duration::from_millis(100),
    )
    .unwrap();
    s.preload().await.unwrap();
    let users: Vec<String> = (0..256).map(|i| format!("u{i}")).collect();
    let takes: Vec<(&str, u64)> = users.iter().map(|u| (u.as_str(), 1)).collect();
    let mut conn = raw(&redis).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(200)
        .query_async(&mut conn)
        .await
        .unwrap();
    let taken = s.take_many(&takes).await.expect("the batch is decided");
    assert!(
        taken
            .iter()
            .all(|t| t.as_ref().is_ok_and(|d| d.is_allowed()))
    );
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(200)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        s.take("single", 1).await.is_err(),
        "one decision keeps 100 ms"
    );
}

fn take(
    key: &str,
    algorithm: domain::limits::Algorithm,
    requests: u64,
    secs: u64,
    cost: i64,
) -> domain::store::RequestTake {
    use domain::limits::{Applied, LimitSpec};
    use domain::store::{LimitTake, RequestTake};
    RequestTake {
        limits: vec![LimitTake {
            key: key.into(),
            applied: Applied {
                spec: LimitSpec::new(algorithm, requests, Duration::from_secs(secs), None).unwrap(),
                shadow: false,
            },
        }],
        cost,
    }
}

async fn allowed(store: &RedisStore, t: domain::store::RequestTake) -> bool {
    store
        .decide_many(&[t])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
        .allowed
}

/// Defect: the window scripts took the window of Redis's `TIME` as it came, so a clock that
/// stepped back (a failover to a replica whose clock is behind) reopened the previous
/// window with a zero count. Simulated by a window written in the future: its count stands.
#[tokio::test]
async fn a_clock_that_steps_back_never_reopens_a_window() {
    use domain::limits::Algorithm;
    use redis::AsyncCommands;
    let redis = RedisServer::start();
    let s = store(&redis, &unique("back"), Policy::new(10, 1.0).unwrap());
    let mut c = raw(&redis).await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let w = 10_000_000u64;
    // The window two windows ahead of Redis's clock, already full (2 of 2).
    let ahead = (now_us - now_us % w + 2 * w) as f64;
    let mut fixed = Vec::new();
    fixed.extend_from_slice(&ahead.to_le_bytes());
    fixed.extend_from_slice(&2f64.to_le_bytes());
    let _: () = c.set("f", fixed).await.unwrap();
    let mut sliding = Vec::new();
    sliding.extend_from_slice(&ahead.to_le_bytes());
    sliding.extend_from_slice(&2f64.to_le_bytes());
    sliding.extend_from_slice(&0f64.to_le_bytes());
    let _: () = c.set("s", sliding).await.unwrap();
    assert!(!allowed(&s, take("f", Algorithm::FixedWindow, 2, 10, 1)).await);
    assert!(!allowed(&s, take("s", Algorithm::SlidingWindow, 2, 10, 1)).await);
}

/// Defect: a refused bucket kept the expiry written at the old rate; after a rule change to
/// a slower refill its key expired early and the bucket came back full.
#[tokio::test]
async fn a_slower_refill_keeps_the_count() {
    use domain::limits::Algorithm;
    use redis::AsyncCommands;
    let redis = RedisServer::start();
    let s = store(&redis, &unique("slower"), Policy::new(10, 10.0).unwrap());
    let mut c = raw(&redis).await;
    // 10 a second: spent in full, the key written to expire within a second.
    assert!(allowed(&s, take("b", Algorithm::TokenBucket, 10, 1, 10)).await);
    let before: i64 = c.pttl("b").await.unwrap();
    assert!(before <= 1_000, "{before}");
    // Now 10 every 100 s: refused, and the key kept until the bucket would be full.
    assert!(!allowed(&s, take("b", Algorithm::TokenBucket, 10, 100, 5)).await);
    let after: i64 = c.pttl("b").await.unwrap();
    assert!(after > 90_000, "the key still expires in {after} ms");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        !allowed(&s, take("b", Algorithm::TokenBucket, 10, 100, 5)).await,
        "it came back full"
    );
}

/// Defect: a call that timed out after Redis had in fact run it was decided again by the
/// fallback, though its tokens were spent. The scripts remember a call's answer briefly
/// under its request id and the store sends a timed-out batch once more: the repeat is
/// answered from the first run, which spent the tokens once.
#[tokio::test]
async fn a_batch_that_timed_out_after_running_is_answered_from_that_run() {
    let redis = RedisServer::start();
    let s = RedisStore::new(
        &Endpoint::single(redis.url()),
        &unique("retry"),
        Policy::new(3, 0.001).unwrap(),
        Duration::from_millis(200),
    )
    .unwrap();
    s.preload().await.unwrap();
    // The call reaches a frozen Redis, which runs it only after the deadline has passed.
    redis.freeze(true);
    // Thawed 50 ms past the deadline (200 ms), within the repeat's (100 ms more).
    let (slow, ()) = tokio::join!(s.take("u", 1), async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        redis.freeze(false);
    });
    let slow = slow.expect("answered from the run that happened");
    assert!(slow.is_allowed());
    assert_eq!(slow.quota().remaining, 2, "{slow:?}");
    // One token spent by it, not two.
    let next = s.take("u", 1).await.unwrap();
    assert_eq!((next.is_allowed(), next.quota().remaining), (true, 1));
}

#[tokio::test]
async fn redis_overrides_pass_the_override_store_contract() {
    let redis = RedisServer::start();
    let conn =
        kit::redis::connect(&Endpoint::single(redis.url()), Duration::from_millis(500)).unwrap();
    let store = rate_limiter::back::overrides::RedisOverrides::new(
        conn,
        &unique("overrides"),
        Duration::from_millis(500),
    );
    rate_limiter::back::overrides::store::contract(&store).await;
}
