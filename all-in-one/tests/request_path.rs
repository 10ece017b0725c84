//! End to end through the gateway: the embedded default and the distributed form on a
//! real redis-server run the same flow; two limiters sharing Redis enforce one bucket; a
//! gateway whose limiter is gone answers 503 quickly.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use testkit::{RedisCluster, RedisServer, free_port, unique};

/// Capacity 5, refill 2/s: five 200s with the headers, a 429 with Retry-After, a 200 after
/// waiting `retry_after_ms`, and the analytics count exactly that.
async fn flow(gateway: SocketAddr) {
    let client = http();
    let url = format!("http://{gateway}/api");
    let user = unique("flow");
    for remaining in (0..5).rev() {
        let r = post(&client, &url, &user).await;
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["ratelimit-limit"], "5");
        assert_eq!(h["ratelimit-remaining"], remaining.to_string().as_str());
        assert_eq!(h["ratelimit-policy"], "\"default\";q=5;w=3");
        assert!(
            h["ratelimit"]
                .to_str()
                .unwrap()
                .starts_with(&format!("\"default\";r={remaining};t="))
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["allowed"], true);
        assert_eq!(body["remaining"], remaining);
        assert_eq!(body["user_id"], user.as_str());
    }
    let r = post(&client, &url, &user).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert_eq!(r.headers()["ratelimit-limit"], "5");
    assert!(r.headers().contains_key("ratelimit-reset"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    let retry_ms = body["retry_after_ms"].as_u64().unwrap();
    assert!(
        (1..=500).contains(&retry_ms),
        "one token at 2/s: {retry_ms} ms"
    );

    tokio::time::sleep(Duration::from_millis(retry_ms)).await;
    assert_eq!(
        post(&client, &url, &user).await.status(),
        200,
        "a retry after retry_after_ms is admitted"
    );

    let got = analytics_settle(&client, gateway, &user, (7, 6, 1), Duration::from_secs(5)).await;
    assert_eq!(got, (7, 6, 1));
    // A user never seen reads zeros.
    let a = analytics(&client, gateway, &unique("nobody")).await;
    assert_eq!((a.total, a.allowed, a.blocked), (0, 0, 0));

    // The same counts over a time window, per minute, and the user among the most blocked.
    let get = |path: String| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://{gateway}{path}"))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (status, w) = get(format!("/analytics/{user}?window=5m")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            w["total"].as_u64(),
            w["allowed"].as_u64(),
            w["blocked"].as_u64()
        ),
        (Some(7), Some(6), Some(1)),
        "{w}"
    );
    assert_eq!(w["window_secs"], 300);
    let series = w["series"].as_array().unwrap();
    assert_eq!(series.len(), 5);
    let per_minute: u64 = series
        .iter()
        .map(|m| m["allowed"].as_u64().unwrap() + m["blocked"].as_u64().unwrap())
        .sum();
    assert_eq!(per_minute, 7);
    let (status, g) = get("/analytics?window=5m".into()).await;
    assert_eq!(status, 200);
    assert!(g["total"].as_u64().unwrap() >= 7, "{g}");
    let top = g["top_blocked"].as_array().unwrap();
    assert!(
        top.iter()
            .any(|t| t["user_id"] == user.as_str() && t["blocked"] == 1),
        "{g}"
    );
    assert!(
        g["top_blocked_day"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["user_id"] == user.as_str()),
        "{g}"
    );
    for bad in ["abc", "0m", "1w", "9999d"] {
        let (status, e) = get(format!("/analytics?window={bad}")).await;
        assert_eq!(
            (status, e["field"].as_str()),
            (400, Some("window")),
            "window={bad}: {e}"
        );
    }
    // The gateway's metrics saw the 200s and the 429.
    let metrics = client
        .get(format!("http://{gateway}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"http_requests_total{service="gateway",route="/api",status="429"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn embedded_default_limits_and_counts() {
    let system = all_in_one(&POLICY).await;
    flow(system.gateway_addr).await;
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn all_in_one_on_redis_limits_and_counts() {
    let redis = RedisServer::start();
    let (prefix, url) = (unique("aio"), redis.url());
    let mut args = POLICY.to_vec();
    args.extend(["--redis-url", &url, "--redis-key-prefix", &prefix]);
    let system = all_in_one(&args).await;
    flow(system.gateway_addr).await;
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn services_apart_on_a_redis_cluster_limit_and_count() {
    let cluster = RedisCluster::start();
    let prefix = unique("cluster");
    let url = cluster.url();
    let mut args = POLICY.to_vec();
    args.extend([
        "--redis-url",
        &url,
        "--redis-cluster=true",
        "--redis-key-prefix",
        &prefix,
    ]);
    let limiter = LimiterInstance::start(&args).await;
    let gateway =
        GatewayInstance::start(&limiter.url(), &url, &prefix, &["--redis-cluster=true"]).await;
    flow(gateway.addr).await;
    gateway.stop().await;
    limiter.stop().await;
}

#[tokio::test]
async fn services_apart_on_redis_limit_and_count() {
    let redis = RedisServer::start();
    let prefix = unique("apart");
    let url = redis.url();
    let mut args = POLICY.to_vec();
    args.extend(["--redis-url", &url, "--redis-key-prefix", &prefix]);
    let limiter = LimiterInstance::start(&args).await;
    let gateway = GatewayInstance::start(&limiter.url(), &url, &prefix, &[]).await;
    flow(gateway.addr).await;
    gateway.stop().await;
    limiter.stop().await;
}

#[tokio::test]
async fn two_limiters_sharing_redis_enforce_one_bucket() {
    const CAPACITY: f64 = 20.0;
    const RATE: f64 = 10.0;
    let redis = RedisServer::start();
    let prefix = unique("shared");
    let url = redis.url();
    let args = [
        "--rate-limit-capacity",
        "20",
        "--rate-limit-refill-per-sec",
        "10",
        "--redis-url",
        &url,
        "--redis-key-prefix",
        &prefix,
    ];
    let a = LimiterInstance::start(&args).await;
    let b = LimiterInstance::start(&args).await;
    let user = unique("hot");
    let client = http();
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // Client-side bounds on the span of server-side decisions.
    let first_answered = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let last_sent = Arc::new(std::sync::Mutex::new(started));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = format!("{}/check", if i % 2 == 0 { a.url() } else { b.url() });
            let (client, user, admitted) = (client.clone(), user.clone(), admitted.clone());
            let (first_answered, last_sent) = (first_answered.clone(), last_sent.clone());
            tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(2) {
                    let sent = Instant::now();
                    let r = post(&client, &url, &user).await;
                    let answered = Instant::now();
                    assert_eq!(r.status(), 200);
                    let body: serde_json::Value = r.json().await.unwrap();
                    if body["allowed"] == true {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    first_answered.lock().unwrap().get_or_insert(answered);
                    let mut last = last_sent.lock().unwrap();
                    *last = (*last).max(sent);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let t_hi = started.elapsed().as_secs_f64();
    let t_lo = last_sent
        .lock()
        .unwrap()
        .duration_since(first_answered.lock().unwrap().unwrap())
        .as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed) as f64;
    let (lo, hi) = (CAPACITY + RATE * t_lo - 1.0, CAPACITY + RATE * t_hi);
    assert!(
        lo <= admitted && admitted <= hi,
        "admitted {admitted} outside [{lo:.1}, {hi:.1}] (one bucket shared by both limiters)"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn gateway_without_a_limiter_answers_503_quickly() {
    let redis = RedisServer::start();
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let gateway = GatewayInstance::start(
        &nobody,
        &redis.url(),
        &unique("nolimiter"),
        &["--limiter-timeout-ms", "300"],
    )
    .await;
    let client = http();
    let started = Instant::now();
    let r = post(&client, &format!("http://{}/api", gateway.addr), "u1").await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    assert!(body["detail"].as_str().unwrap().contains("rate limiter"));
    gateway.stop().await;
}

/// The identity rule end to end: a decomposed `é` and a precomposed one are one user, with
/// one bucket and one row of analytics, whichever form the client sends or asks about.
#[tokio::test]
async fn look_alike_ids_share_one_bucket_and_one_count() {
    let system = all_in_one(&POLICY).await;
    let client = http();
    let url = format!("http://{}/api", system.gateway_addr);
    let tag = unique("nfc");
    let precomposed = format!("caf\u{e9}-{tag}");
    let decomposed = format!("cafe\u{301}-{tag}");
    let mut statuses = Vec::new();
    for i in 0..6 {
        let user = if i % 2 == 0 {
            &precomposed
        } else {
            &decomposed
        };
        statuses.push(post(&client, &url, user).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429], "one bucket of 5");
    for user in [&precomposed, &decomposed] {
        let got = analytics_settle(
            &client,
            system.gateway_addr,
            user,
            (6, 5, 1),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(got, (6, 5, 1), "{user:?}");
    }
    system.shutdown().await.unwrap();
}
