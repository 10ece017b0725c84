//! The limiter against a real redis-server that fails the ways Redis fails: killed, then
//! frozen (SIGSTOP) while a caller waits on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rate_limiter::config::LimiterConfig;
use rate_limiter::limiter::Limiter;
use ratelimit_domain::api::CheckRequest;
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
        &config.redis,
        &config.kafka,
        "faults".into(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    limiter
}

fn req(user: &str) -> CheckRequest {
    CheckRequest {
        user_id: user.into(),
        cost: 1,
    }
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
