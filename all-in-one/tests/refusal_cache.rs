//! The refusal caches, limiter and gateway together, against a real Redis: a user who
//! hammers past the limit is refused without an exchange or a Redis call, every refusal is
//! still counted once, and a reset made through another limiter reaches the gateway's
//! cache within a poll and an exchange. (That the limiter's own cache makes no Redis call
//! is tested in rate-limiter/tests/refusals.rs.)

mod common;

use std::time::{Duration, Instant};

use common::LimiterInstance;
use domain::api::CheckRequest;
use gateway::client::LimiterClient;
use std::sync::atomic::Ordering;
use testkit::{RedisServer, unique};

#[tokio::test]
async fn a_hammering_user_is_refused_at_the_gateway_and_every_refusal_is_counted() {
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = unique("rc");
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-key-prefix",
        prefix.as_str(),
        "--rate-limit-capacity",
        "2",
        "--rate-limit-refill-per-sec",
        "0.01",
    ];
    let a = LimiterInstance::start(&args).await;
    let b = LimiterInstance::start(&args).await;
    let gateway = common::http_client(&a.url(), Duration::from_secs(2)).await;
    let mallory = CheckRequest::user("mallory", 1);

    for _ in 0..2 {
        assert!(gateway.check(&mallory).await.unwrap().allowed);
    }
    for i in 0..300 {
        let answer = gateway.check(&mallory).await.unwrap();
        assert!(!answer.allowed, "request {i} admitted");
        assert!(!answer.degraded);
        assert!(answer.retry_after_ms > 60_000, "{answer:?}");
        assert_eq!(answer.limits.len(), 1);
        assert!(answer.limits[0].refused);
    }
    // The first refusal went to Redis; the rest were answered by the gateway.
    let hits = gateway.refusal_cache_hits();
    assert!(
        hits >= 298,
        "{hits} of 300 refusals from the gateway's cache"
    );

    // Every refusal is counted once by the limiter, those answered at the gateway too.
    let stats = a.limiter.stats();
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats.limited.load(Ordering::Relaxed) < 300 && Instant::now() < deadline {
        // Notices travel with the next exchange: give them one.
        let _ = gateway.check(&CheckRequest::user("bystander", 1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.limited.load(Ordering::Relaxed), 300);
    assert_eq!(stats.gateway_refused.load(Ordering::Relaxed), hits);
    // What reached the limiter as a check was answered from its own cache after the first:
    // the store decided 3 times (2 admissions, 1 refusal).
    let decided_by_store = stats.allowed.load(Ordering::Relaxed)
        + stats.limited.load(Ordering::Relaxed)
        - hits
        - a.limiter.refusal_cache_hits();
    assert!(
        decided_by_store <= 2 + 1 + 20,
        "{decided_by_store} store decisions"
    );
    assert!(stats.allowed.load(Ordering::Relaxed) >= 2);

    // A reset through limiter B: A sees the shared epoch move within its 250 ms poll, the
    // gateway sees A's generation move with its next exchange, and mallory is admitted.
    b.limiter.reset(&mallory).await.unwrap();
    let reset_at = Instant::now();
    loop {
        if gateway.check(&mallory).await.unwrap().allowed {
            break;
        }
        assert!(
            reset_at.elapsed() < Duration::from_millis(1500),
            "the gateway still refuses mallory from its cache 1.5 s after the reset"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.stop().await;
    b.stop().await;
}
