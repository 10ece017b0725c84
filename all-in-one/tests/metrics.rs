//! `/metrics` and `/status` move with the traffic. Its own test binary: the metrics
//! registry is per process, and another system in the same process would share it.

mod common;

use common::*;
use testkit::unique;

#[tokio::test]
async fn metrics_and_status_show_the_traffic() {
    let system = all_in_one(&POLICY).await;
    let client = http();
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let scrape = || async {
        client
            .get(format!("http://{}/metrics", system.gateway_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    let user = unique("metrics");
    for _ in 0..8 {
        post(
            &client,
            &format!("http://{}/api", system.gateway_addr),
            &user,
        )
        .await;
    }
    let after = scrape().await;
    let allowed = r#"ratelimit_decisions_total{outcome="allowed"}"#;
    let limited = r#"ratelimit_decisions_total{outcome="limited"}"#;
    assert_eq!(
        metric(&after, allowed) - metric(&before, allowed),
        5,
        "{after}"
    );
    assert_eq!(
        metric(&after, limited) - metric(&before, limited),
        3,
        "{after}"
    );
    assert!(
        after.contains("ratelimit_decision_duration_seconds_bucket"),
        "{after}"
    );
    assert!(after.contains("ratelimit_events_published_total"));
    assert!(!after.contains(&user), "user ids are never labels");
    let status = get_json(&client, &format!("http://{}/status", system.gateway_addr)).await;
    assert_eq!(status["limiter"]["ok"], true, "{status}");
    assert_eq!(status["store"]["ok"], true, "{status}");
    assert!(
        status["decisions"]["limited"].as_u64().unwrap() >= 3,
        "{status}"
    );
    // The limiter's own /metrics on its port.
    let limiter_metrics = client
        .get(format!("http://{}/metrics", system.limiter_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        limiter_metrics.contains("ratelimit_breaker_state 0"),
        "{limiter_metrics}"
    );
    system.shutdown().await.unwrap();
}
