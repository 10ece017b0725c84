//! Failure handling against the real servers: Redis killed under load (fail-open and
//! fail-closed), overload shedding, a rolling restart of a limiter under load, and a
//! table of hostile inputs against the gateway and the limiter.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post as route_post;
use common::cluster::*;
use common::*;
use testkit::{KafkaBroker, RedisServer, unique};
use tokio_util::sync::CancellationToken;

/// One answer seen by the load: when it was sent, how long it took, its status, whether it
/// was marked degraded, and its `error` code if any.
#[derive(Debug, Clone)]
struct Answer {
    sent: Instant,
    took: Duration,
    status: u16,
    degraded: bool,
    error: Option<String>,
}

/// Sends `/api` requests from 4 tasks until `stop`, recording every answer.
fn load(
    gateway: SocketAddr,
    stop: CancellationToken,
) -> (Arc<Mutex<Vec<Answer>>>, tokio::task::JoinHandle<()>) {
    let answers = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let answers = answers.clone();
        tokio::spawn(async move {
            let client = http();
            let url = format!("http://{gateway}/api");
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let (client, url, answers, stop) =
                        (client.clone(), url.clone(), answers.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut n = 0usize;
                        while !stop.is_cancelled() {
                            n += 1;
                            let sent = Instant::now();
                            let r = post(&client, &url, &format!("load-{t}-{}", n % 20)).await;
                            let took = sent.elapsed();
                            let status = r.status().as_u16();
                            let degraded = r.headers().get("x-ratelimit-degraded").is_some();
                            let body: serde_json::Value = r.json().await.unwrap_or_default();
                            let error = body["error"].as_str().map(str::to_owned);
                            answers.lock().unwrap().push(Answer {
                                sent,
                                took,
                                status,
                                degraded,
                                error,
                            });
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    (answers, handle)
}

/// The timing-sensitive tests of this file run one at a time, so they measure the
/// services rather than each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn redis_loss(mode: &str) {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let (url, prefix) = (redis.url(), unique("loss"));
    let system = all_in_one(&[
        "--redis-url",
        &url,
        "--redis-key-prefix",
        &prefix,
        "--fail-mode",
        mode,
        "--redis-timeout-ms",
        "50",
        "--rate-limit-capacity",
        "5",
        "--rate-limit-refill-per-sec",
        "50",
    ])
    .await;
    let stop = CancellationToken::new();
    let (answers, handle) = load(system.gateway_addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let errors_before_kill = system
        .limiter
        .stats()
        .store_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    // Taken before the kill: requests sent while it happens are not "before" it.
    let killed = Instant::now();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    redis.restart();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.cancel();
    handle.await.unwrap();
    system.shutdown().await.unwrap();

    let answers = answers.lock().unwrap().clone();
    let slowest = answers.iter().map(|a| a.took).max().unwrap();
    assert!(
        slowest < Duration::from_millis(100),
        "{mode}: slowest answer {slowest:?}"
    );
    let normal = |a: &Answer| (a.status == 200 || a.status == 429) && !a.degraded;
    // Answered before the kill (a request in flight at the kill may meet it).
    let before: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent + a.took < killed)
        .collect();
    assert!(
        before.len() > 50 && before.iter().all(|a| normal(a)),
        "{mode}: before the kill: {} answers, {} odd, first {:?}; {errors_before_kill} store errors",
        before.len(),
        before.iter().filter(|a| !normal(a)).count(),
        before.iter().find(|a| !normal(a))
    );

    // While Redis is gone (give the breaker a moment), the promised answer.
    let outage: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent > killed + Duration::from_millis(100) && a.sent < restarted)
        .collect();
    assert!(
        outage.len() > 50,
        "{mode}: requests kept flowing: {}",
        outage.len()
    );
    for a in &outage {
        match mode {
            "open" => assert!(
                (a.status == 200 || a.status == 429) && a.degraded,
                "open: {a:?}"
            ),
            _ => assert!(
                a.status == 503 && a.error.as_deref() == Some("unavailable"),
                "closed: {a:?}"
            ),
        }
    }
    // Back to normal within a second of Redis returning, and staying there.
    let late: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent > restarted + Duration::from_secs(1))
        .collect();
    assert!(
        late.len() > 50 && late.iter().all(|a| normal(a)),
        "{mode}: after the restart: {:?}",
        late.iter().find(|a| !normal(a))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_loss_fail_open_answers_degraded_within_100ms_and_recovers() {
    redis_loss("open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_loss_fail_closed_answers_503_within_100ms_and_recovers() {
    redis_loss("closed").await;
}

/// A limiter that takes 200 ms per decision, so requests pile up at the gateway.
async fn slow_limiter() -> SocketAddr {
    let router = axum::Router::new().route(
        "/check/batch",
        route_post(|Json(batch): Json<serde_json::Value>| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let allowed = serde_json::json!({"ok": {"allowed": true, "limit": 10, "remaining": 9, "retry_after_ms": 0, "reset_after_ms": 100, "window_ms": 10000}});
            let checks = batch["checks"].as_array().map_or(0, Vec::len);
            Json(serde_json::json!({"results": vec![allowed; checks]}))
        }),
    );
    let listener = listener().await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_shed_at_once_and_admitted_latency_stays_bounded() {
    let _serial = SERIAL.lock().await;

    let redis = RedisServer::start();
    let limiter = slow_limiter().await;
    let gateway = GatewayInstance::start(
        &format!("http://{limiter}"),
        &redis.url(),
        &unique("overload"),
        &["--max-in-flight", "20"],
    )
    .await;
    let client = http();
    let url = format!("http://{}/api", gateway.addr);
    // Open the burst's 200 connections first, so the burst measures the gateway, not the
    // kernel's handling of 200 simultaneous TCP handshakes.
    let warm: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), format!("http://{}/healthz", gateway.addr));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
        })
        .collect();
    for w in warm {
        w.await.unwrap();
    }
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = post(&client, &url, &format!("u{i}")).await;
                let status = r.status().as_u16();
                let retry_after = r.headers().contains_key("retry-after");
                let body: serde_json::Value = r.json().await.unwrap();
                (
                    status,
                    retry_after,
                    body["error"].as_str().map(str::to_owned),
                    started.elapsed(),
                )
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut shed = Vec::new();
    for c in calls {
        let (status, retry_after, error, took) = c.await.unwrap();
        match status {
            200 => admitted.push(took),
            429 => {
                assert!(retry_after && error.as_deref() == Some("overloaded"));
                shed.push(took);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    admitted.sort();
    shed.sort();

    assert!(
        shed.len() >= 100,
        "most of a 10x burst is shed: {} shed, {} admitted",
        shed.len(),
        admitted.len()
    );
    assert!(!admitted.is_empty());
    let p99 = |v: &[Duration]| v[(v.len() * 99 / 100).min(v.len() - 1)];
    // Admitted requests are not queued behind the burst: one limiter call (200 ms) plus slack.
    assert!(
        p99(&admitted) < Duration::from_millis(600),
        "admitted p99 {:?}",
        p99(&admitted)
    );
    assert!(
        p99(&shed) < Duration::from_millis(200),
        "shed p99 {:?}",
        p99(&shed)
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_a_limiter_under_load_drops_nothing() {
    let _serial = SERIAL.lock().await;
    let broker = KafkaBroker::start();
    let cluster = Cluster::new(broker.brokers());
    let (mut l1, l2) = (cluster.limiter("limiter-1"), cluster.limiter("limiter-2"));
    let worker = cluster.worker("worker");
    let gateway = cluster.gateway("gateway", &[&l1, &l2]);
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let gw = SocketAddr::from(([127, 0, 0, 1], gateway.port));
    let load = tokio::spawn(drive(
        gw,
        users(50),
        usize::MAX,
        4,
        100.0,
        seen.clone(),
        Default::default(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        l1.terminate(Duration::from_secs(15)),
        "limiter-1 exits 0 on SIGTERM:\n{}",
        l1.log_tail(20)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    l1.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    // drive() panics on any answer other than 200/429, e.g. a request dropped mid-flight.
    load.await.unwrap();
    let log = std::fs::read_to_string(&l1.log).unwrap();
    assert!(
        log.contains("event publisher flushed") && log.contains("flushed=true"),
        "limiter-1 flushed on SIGTERM:\n{log}"
    );
    let diffs = converge(gw, &seen, Duration::from_secs(60)).await;
    assert!(
        diffs.is_empty(),
        "counts differ after the rolling restart: {:?}\n{}",
        &diffs[..diffs.len().min(5)],
        worker.log_tail(20)
    );
}

/// What a client may send, and what it must get back.
struct Case {
    what: &'static str,
    method: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    error: &'static str,
    field: Option<&'static str>,
}

fn case(
    what: &'static str,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
    error: &'static str,
    field: Option<&'static str>,
) -> Case {
    Case {
        what,
        method: "POST",
        content_type,
        body: body.into(),
        status,
        error,
        field,
    }
}

fn hostile_cases() -> Vec<Case> {
    const JSON: Option<&str> = Some("application/json");
    vec![
        case(
            "malformed JSON",
            JSON,
            "{\"user_id\":",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "not JSON at all",
            JSON,
            "user_id=u1",
            400,
            "invalid_request",
            Some("body"),
        ),
        case("empty body", JSON, "", 400, "invalid_request", Some("body")),
        case(
            "array body",
            JSON,
            "[\"u1\"]",
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "invalid UTF-8",
            JSON,
            b"{\"user_id\":\"\xff\xfe\"}".to_vec(),
            400,
            "invalid_request",
            Some("body"),
        ),
        case(
            "missing user_id",
            JSON,
            "{\"cost\":1}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "null user_id",
            JSON,
            "{\"user_id\":null}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "numeric user_id",
            JSON,
            "{\"user_id\":42}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "empty user_id",
            JSON,
            "{\"user_id\":\"\"}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "257-byte user_id",
            JSON,
            format!("{{\"user_id\":\"{}\"}}", "é".repeat(128) + "x"),
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "control character",
            JSON,
            "{\"user_id\":\"a\\u0007b\"}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "NUL",
            JSON,
            "{\"user_id\":\"a\\u0000\"}",
            400,
            "invalid_request",
            Some("user_id"),
        ),
        case(
            "zero cost",
            JSON,
            "{\"user_id\":\"u\",\"cost\":0}",
            400,
            "invalid_request",
            Some("cost"),
        ),
        case(
            // A refund (a negative cost) is accepted at the limiter only, and never past the
            // bound; the gateway refuses every refund (see rules.rs).
            "refund past the bound",
            JSON,
            "{\"user_id\":\"u\",\"cost\":-1000001}",
            400,
            "invalid_request",
            Some("cost"),
        ),
        case(
            "fractional cost",
            JSON,
            "{\"user_id\":\"u\",\"cost\":1.5}",
            400,
            "invalid_request",
            Some("cost"),
        ),
        case(
            "string cost",
            JSON,
            "{\"user_id\":\"u\",\"cost\":\"1\"}",
            400,
            "invalid_request",
            Some("cost"),
        ),
        case(
            "huge cost",
            JSON,
            "{\"user_id\":\"u\",\"cost\":99999999999999999999}",
            400,
            "invalid_request",
            Some("cost"),
        ),
        case(
            "cost above capacity",
            JSON,
            "{\"user_id\":\"u\",\"cost\":11}",
            400,
            "invalid_request",
            Some("cost"),
        ),
        case(
            "text/plain",
            Some("text/plain"),
            "{\"user_id\":\"u\"}",
            415,
            "unsupported_media_type",
            None,
        ),
        case(
            "form",
            Some("application/x-www-form-urlencoded"),
            "user_id=u",
            415,
            "unsupported_media_type",
            None,
        ),
        case(
            "no content type",
            None,
            "{\"user_id\":\"u\"}",
            415,
            "unsupported_media_type",
            None,
        ),
        case(
            "1 MiB body",
            JSON,
            format!("{{\"user_id\":\"{}\"}}", "x".repeat(1 << 20)),
            413,
            "payload_too_large",
            None,
        ),
        case(
            "5 KiB of padding",
            JSON,
            format!("{{\"user_id\":\"u\",\"pad\":\"{}\"}}", " ".repeat(5000)),
            413,
            "payload_too_large",
            None,
        ),
        case(
            "nested user_id",
            JSON,
            format!("{{\"user_id\":{}{}}}", "[".repeat(1000), "]".repeat(1000)),
            400,
            "invalid_request",
            Some("user_id"),
        ),
    ]
}

async fn check_hostile(base: &str, path: &str) {
    let client = http();
    let url = format!("{base}{path}");
    for c in hostile_cases() {
        let mut req = client
            .request(c.method.parse().unwrap(), &url)
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} {}: {e}", c.what));
        let status = r.status().as_u16();
        let body: serde_json::Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path} {}: not JSON: {e}", c.what));
        assert_eq!(status, c.status, "{path} {}: {body}", c.what);
        assert_eq!(body["error"], c.error, "{path} {}: {body}", c.what);
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{path} {}: {body}",
            c.what
        );
        if let Some(field) = c.field {
            assert_eq!(body["field"], field, "{path} {}: {body}", c.what);
        }
    }
    // Odd but valid Unicode is a user like any other.
    for user in ["\u{1F600}", "e\u{301}", "{x}", "a%7D", "日本語", "   "] {
        let r = post(&client, &url, user).await;
        assert_eq!(r.status(), 200, "{path} user {user:?}");
    }
    // The identity rule: ids that would render like another are refused (invisible
    // format characters: bidirectional overrides, zero-width characters, a BOM).
    for user in ["\u{202E}evil", "\u{FEFF}bom", "ad\u{200B}min", "a\u{200D}b"] {
        let r = post(&client, &url, user).await;
        assert_eq!(r.status(), 400, "{path} user {user:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["field"], "user_id", "{path} user {user:?}: {body}");
    }
    // Wrong method and unknown path.
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let r = client.post(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "not_found"
    );
}

/// The limiter's batch endpoint: a bad batch is refused whole, naming the bad check; a check
/// no bucket can admit is refused alone inside a 200.
async fn check_hostile_batches(url: &str) {
    let client = http();
    let many = |n: usize, item: &str| format!(r#"{{"checks":[{}]}}"#, vec![item; n].join(","));
    let user = |len: usize| format!(r#"{{"user_id":"{}"}}"#, "x".repeat(len));
    for (what, body, status, field) in [
        (
            "no checks",
            r#"{"checks":[]}"#.to_owned(),
            400,
            Some("checks"),
        ),
        ("checks missing", "{}".to_owned(), 400, Some("checks")),
        (
            "checks not a list",
            r#"{"checks":7}"#.to_owned(),
            400,
            Some("checks"),
        ),
        (
            "257 checks",
            many(257, r#"{"user_id":"u"}"#),
            400,
            Some("checks"),
        ),
        (
            "a bad check",
            r#"{"checks":[{"user_id":"u"},{"user_id":"u","cost":0}]}"#.to_owned(),
            400,
            Some("checks[1].cost"),
        ),
        (
            "malformed",
            r#"{"checks":[{"user_id":"#.to_owned(),
            400,
            Some("body"),
        ),
        ("over 1 MiB", many(5000, &user(250)), 413, None),
    ] {
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("batch {what}: {e}"));
        assert_eq!(r.status().as_u16(), status, "batch {what}");
        let body: serde_json::Value = r.json().await.unwrap();
        if let Some(field) = field {
            assert_eq!(body["field"], field, "batch {what}: {body}");
        }
    }
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"checks":[{"user_id":"batch-a"},{"user_id":"batch-a","cost":11},{"user_id":"batch-a","cost":9}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["results"][0]["ok"]["remaining"], 9, "{body}");
    assert_eq!(body["results"][1]["error"]["field"], "cost", "{body}");
    assert_eq!(body["results"][2]["ok"]["remaining"], 0, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_a_clear_4xx_from_the_gateway_and_the_limiter() {
    let _serial = SERIAL.lock().await;

    let system = all_in_one(&["--rate-limit-capacity", "10"]).await;
    check_hostile(&format!("http://{}", system.gateway_addr), "/api").await;
    check_hostile(&format!("http://{}", system.limiter_addr), "/check").await;
    check_hostile_batches(&format!("http://{}/check/batch", system.limiter_addr)).await;
    // Analytics: the path segment is a user id and is validated like one.
    let client = http();
    for (path, status) in [
        ("/analytics/%00", 400),
        ("/analytics/%FF", 400),
        (&*format!("/analytics/{}", "x".repeat(300)), 400),
        ("/analytics/%F0%9F%98%80", 200),
        ("/analytics/", 404),
    ] {
        let r = client
            .get(format!("http://{}{path}", system.gateway_addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body.is_object(), "{path}: {body}");
    }
    // After all that, the service still works and nothing was counted for refused requests.
    let r = post(
        &client,
        &format!("http://{}/api", system.gateway_addr),
        "after",
    )
    .await;
    assert_eq!(r.status(), 200);
    let settled = analytics_settle(
        &client,
        system.gateway_addr,
        "u",
        (0, 0, 0),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(settled, (0, 0, 0), "refused requests are not counted");
    system.shutdown().await.unwrap();
}
