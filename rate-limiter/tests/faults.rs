//! The limiter against a real redis-server that fails the ways Redis fails: killed, then
//! frozen (SIGSTOP) while a caller waits on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use domain::api::CheckRequest;
use rate_limiter::config::LimiterConfig;
use rate_limiter::limiter::Limiter;
use testkit::{RedisServer, unique};
use tokio_util::sync::CancellationToken;

async fn limiter(redis: &RedisServer, extra: &[&str]) -> Arc<Limiter> {
    let url = redis.url();
    let prefix = unique("faults");
    let mut argv = vec![
        "rate-limiter",
        "--redis-url",
        &url,
        "--redis-key-prefix",
        &prefix,
    ];
    argv.extend_from_slice(extra);
    let config = LimiterConfig::try_parse_from(argv).unwrap();
    let (limiter, _events) = rate_limiter::build(
        &config.limiter,
        &config.redis.resolve().unwrap(),
        &config.kafka,
        "faults".into(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    limiter
}

fn req(user: &str) -> CheckRequest {
    CheckRequest::user(user, 1)
}

/// Defect: the breaker's half-open probe held its slot until it finished; a probe whose
/// caller gave up (a disconnect, `REQUEST_TIMEOUT_MS`, the gateway's deadline) never
/// finished, so no call probed again and every decision stayed degraded until a restart.
#[tokio::test]
async fn a_probe_dropped_while_redis_is_frozen_does_not_keep_the_breaker_open() {
    let mut redis = RedisServer::start();
    // A Redis deadline longer than the caller's patience: the caller drops the probe.
    let limiter = limiter(
        &redis,
        &[
            "--redis-timeout-ms",
            "5000",
            "--breaker-failures",
            "1",
            "--breaker-open-ms",
            "50",
            "--rate-limit-capacity",
            "1000",
        ],
    )
    .await;
    assert!(!limiter.check(&req("u")).await.unwrap().degraded);

    redis.kill();
    assert!(
        limiter.check(&req("u")).await.unwrap().degraded,
        "a refused connection opens the breaker"
    );
    redis.restart();
    redis.freeze(true);
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The open period is over: this call is the probe, and its caller gives up on it.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), limiter.check(&req("u"))).await;
    assert!(gave_up.is_err(), "the probe waits on the frozen Redis");
    redis.freeze(false);

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let checked = limiter.check(&req("u")).await.unwrap();
        if !checked.degraded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still degraded 3 s after Redis came back: the breaker never probed again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(limiter.ready().await, "/readyz is ready again");
}

/// Defect: the fail-open fallback started every user full, so a Redis blip gave a user the
/// limiter had just seen at 0 tokens `capacity` fresh ones.
#[tokio::test]
async fn an_exhausted_user_stays_exhausted_when_redis_goes_away() {
    let mut redis = RedisServer::start();
    let limiter = limiter(
        &redis,
        &[
            "--rate-limit-capacity",
            "10",
            "--rate-limit-refill-per-sec",
            "0.01",
            "--fail-open-instances",
            "1",
            // The fallback is what is tested: the refusal cache would answer greedy's
            // refusals itself (exactly, and not degraded) while they hold.
            "--refusal-cache-entries",
            "0",
        ],
    )
    .await;
    for _ in 0..10 {
        let c = limiter.check(&req("greedy")).await.unwrap();
        assert!(c.decision.is_allowed() && !c.degraded);
    }
    assert!(
        !limiter
            .check(&req("greedy"))
            .await
            .unwrap()
            .decision
            .is_allowed()
    );
    redis.kill();
    for _ in 0..5 {
        let c = limiter.check(&req("greedy")).await.unwrap();
        assert!(c.degraded, "decided by the fallback");
        assert!(
            !c.decision.is_allowed(),
            "the fallback remembers the user was exhausted"
        );
    }
    // A user this limiter had not seen drained gets the fallback's share.
    let fresh = limiter.check(&req("fresh")).await.unwrap();
    assert!(fresh.degraded && fresh.decision.is_allowed());
}

/// Defect: `FAIL_OPEN_INSTANCES` defaulted to 1, so N limiters admitted N times the limit
/// while Redis was away. Unset, the share now follows the live limiters' reports.
#[tokio::test]
async fn the_fail_open_share_follows_the_live_limiters() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let prefix = unique("share");
    let start = || {
        let argv = [
            "rate-limiter",
            "--redis-url",
            &url,
            "--redis-key-prefix",
            &prefix,
            "--rate-limit-capacity",
            "10",
            "--rate-limit-refill-per-sec",
            "0.01",
        ];
        let config = LimiterConfig::try_parse_from(argv).unwrap();
        async move {
            rate_limiter::Standalone::start(&config, unique("limiter"), &CancellationToken::new())
                .await
                .unwrap()
        }
    };
    let a = start().await;
    let _b = start().await;
    // Reports every second, counted every two.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    redis.kill();
    let mut admitted = 0;
    for _ in 0..10 {
        let c = a.limiter.check(&req("newcomer")).await.unwrap();
        assert!(c.degraded);
        admitted += u32::from(c.decision.is_allowed());
    }
    assert_eq!(admitted, 5, "half of the capacity on each of two limiters");
}

/// Defect: a stopping limiter whose grace ran out dropped requests it had read (and maybe
/// decided) when the process exited; the gateway took the reset for "never read" and asked
/// another replica, so the batch was decided twice. Now every request read is answered
/// before the process closes its connections. The `rate-limiter` binary, SIGTERMed.
#[tokio::test]
async fn a_stopping_limiter_answers_every_request_it_has_read() {
    let redis = RedisServer::start();
    // Counters on a Redis of their own, which stays up: the process has nothing else to
    // wait for once its grace is over.
    let counters = RedisServer::start();
    let limiter = testkit::Service::start(
        "rate-limiter",
        "grace",
        "LIMITER_PORT",
        &[
            ("REDIS_URL", redis.url()),
            ("ANALYTICS_REDIS_URL", counters.url()),
            ("REDIS_KEY_PREFIX", unique("grace")),
            ("REDIS_TIMEOUT_MS", "5000".into()),
            ("REQUEST_TIMEOUT_MS", "1500".into()),
            ("SHUTDOWN_GRACE_MS", "1".into()),
        ],
    );
    let url = format!("{}/check", limiter.url());
    // Warm the connection to Redis, then freeze it: the next check waits on it.
    let client = reqwest::Client::new();
    let warm = client
        .post(&url)
        .json(&serde_json::json!({"user_id": "warm"}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    redis.freeze(true);
    let call = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .json(&serde_json::json!({"user_id": "in-flight"}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut limiter = limiter;
    let stopped = tokio::task::spawn_blocking(move || limiter.terminate(Duration::from_secs(10)));
    let answer = call
        .await
        .unwrap()
        .expect("an answer, not a dropped connection");
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "timeout");
    assert!(stopped.await.unwrap(), "the limiter stopped");
    redis.freeze(false);
}

/// Defect: readiness needed the breaker closed, and only a decision closed it; with no
/// traffic (a readiness probe that took every replica out of its Service keeps it away)
/// a Redis blip left the limiter unready for ever. Readiness now probes the store itself.
#[tokio::test]
async fn readiness_comes_back_after_a_redis_blip_without_traffic() {
    let mut redis = RedisServer::start();
    let limiter = limiter(
        &redis,
        &["--breaker-failures", "1", "--breaker-open-ms", "50"],
    )
    .await;
    assert!(limiter.ready().await);
    redis.kill();
    // One decision while Redis is away opens the breaker (fail-open: degraded).
    assert!(limiter.check(&req("u")).await.unwrap().degraded);
    assert!(!limiter.ready().await, "not ready while Redis is away");
    redis.restart();
    // No decision from here on: only readiness probes, as a Service's would.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !limiter.ready().await {
        assert!(
            Instant::now() < deadline,
            "still unready 3 s after Redis came back, with no traffic"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!limiter.check(&req("u")).await.unwrap().degraded);
}
