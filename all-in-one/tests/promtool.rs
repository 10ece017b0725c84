//! Every `/metrics` page passes Prometheus's own linter (`promtool check metrics`): every
//! metric has its help text, and every name follows Prometheus's conventions. Its own test
//! binary: the metrics registry is per process, and this test wants all of it.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use domain::api::CheckRequest;
use gateway::client::LimiterClient;
use testkit::unique;
use tower::ServiceExt;

/// Every metric the services emit (the README's table), each of which this test makes
/// appear on some page.
const METRICS: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds",
    "http_connections_open",
    "ratelimit_decisions_total",
    "ratelimit_degraded_decisions_total",
    "ratelimit_refused_total",
    "ratelimit_decision_duration_seconds",
    "ratelimit_store_errors_total",
    "ratelimit_breaker_state",
    "ratelimit_events_published_total",
    "ratelimit_events_dropped_total",
    "ratelimit_events_buffered",
    "analytics_events_applied_total",
    "analytics_poison_messages_total",
    "analytics_batches_total",
    "analytics_store_errors_total",
    "analytics_consumer_lag",
    "gateway_limiter_batch_size",
    "gateway_limiter_retries_total",
];

#[tokio::test]
async fn every_metrics_page_passes_promtool() {
    let system = all_in_one(&POLICY).await;
    let client = http();

    // Allowed and limited requests through the gateway (capacity 5).
    let user = unique("promtool");
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = post(
            &client,
            &format!("http://{}/api", system.gateway_addr),
            &user,
        )
        .await;
        statuses.push(response.status().as_u16());
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );

    // The standalone gateway's HTTP limiter client, with a dead address first in its
    // list: a call that starts there is retried on the live limiter.
    let dead = format!("http://127.0.0.1:{}", testkit::free_port());
    let remote = http_client(
        &format!("{dead},http://{}", system.limiter_addr),
        Duration::from_secs(2),
    )
    .await;
    let remote_user = unique("promtool-remote");
    for _ in 0..2 {
        let request = CheckRequest::user(remote_user.clone(), 1);
        remote.check(&request).await.unwrap();
    }

    // Consumer lag comes from the Kafka consumer's statistics; this build has no Kafka,
    // so the test reports a partition's lag as the Kafka source would.
    system.worker_stats.lag.lock().unwrap().insert(0, 0);

    let scrape = |addr: std::net::SocketAddr| {
        let client = client.clone();
        async move {
            let response = client
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    let gateway_page = scrape(system.gateway_addr).await;
    let limiter_page = scrape(system.limiter_addr).await;
    // The analytics worker's own router, as the standalone worker serves it.
    let worker_router = analytics_worker::router(
        std::sync::Arc::new(counters::MemoryCounters::new(
            1_000,
            Duration::from_secs(3600),
        )),
        system.worker_stats.clone(),
    );
    let response = worker_router
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let worker_page = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();

    let pages = [
        ("gateway", &gateway_page),
        ("rate-limiter", &limiter_page),
        ("analytics-worker", &worker_page),
    ];
    for (service, page) in pages {
        if let Err(complaints) = testkit::promtool_check_metrics(page) {
            panic!("the {service}'s /metrics fails the linter: {complaints}\n--- page:\n{page}");
        }
    }
    for name in METRICS {
        assert!(
            pages
                .iter()
                .any(|(_, page)| page.contains(&format!("# HELP {name} "))),
            "{name} is on no /metrics page with its help text:\n{gateway_page}"
        );
    }
    system.shutdown().await.unwrap();
}
