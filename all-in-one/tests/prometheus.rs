//! A real Prometheus server scraping the all-in-one's gateway sees exactly the traffic the
//! clients saw, with each metric's help text. Its own test binary: the metrics registry is
//! per process, and the counts asserted are the whole process's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use testkit::{PrometheusServer, unique};

/// Polls Prometheus's instant query `query` until it answers `want` or `within` passes;
/// returns the last answer (`None`: no answer yet, or an empty result).
async fn settle(
    client: &reqwest::Client,
    prometheus: &PrometheusServer,
    query: &str,
    want: f64,
    within: Duration,
) -> Option<f64> {
    let deadline = Instant::now() + within;
    loop {
        let answer = async {
            let response = client
                .get(format!("{}/api/v1/query", prometheus.url()))
                .query(&[("query", query)])
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            body["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        }
        .await;
        if answer == Some(want) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_exact_counts_with_help() {
    // Capacity 5, one token per 1000 s: of 12 requests exactly 5 are allowed.
    let system = all_in_one(&[
        "--rate-limit-capacity",
        "5",
        "--rate-limit-refill-per-sec",
        "0.001",
    ])
    .await;
    let prometheus = PrometheusServer::start(&[system.gateway_addr.to_string()]);
    let client = http();
    let user = unique("prometheus");
    let (mut allowed, mut limited) = (0, 0);
    for _ in 0..12 {
        let response = post(
            &client,
            &format!("http://{}/api", system.gateway_addr),
            &user,
        )
        .await;
        match response.status().as_u16() {
            200 => allowed += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((allowed, limited), (5, 7));

    let expected = [
        (
            r#"sum(http_requests_total{service="gateway",route="/api",status="200"})"#,
            5.0,
        ),
        (
            r#"sum(http_requests_total{service="gateway",route="/api",status="429"})"#,
            7.0,
        ),
        (r#"sum(ratelimit_decisions_total{outcome="allowed"})"#, 5.0),
        (r#"sum(ratelimit_decisions_total{outcome="limited"})"#, 7.0),
    ];
    for (query, want) in expected {
        let got = settle(&client, &prometheus, query, want, Duration::from_secs(30)).await;
        assert_eq!(
            got,
            Some(want),
            "Prometheus answered {got:?} to {query} within 30 s\n--- prometheus log:\n{}",
            prometheus.log()
        );
    }

    // What Prometheus learnt about each metric from the scrapes: its type and help.
    for (metric, kind) in [
        ("http_requests_total", "counter"),
        ("http_request_duration_seconds", "histogram"),
        ("ratelimit_decisions_total", "counter"),
        ("ratelimit_decision_duration_seconds", "histogram"),
    ] {
        let metadata = get_json(
            &client,
            &format!("{}/api/v1/metadata?metric={metric}", prometheus.url()),
        )
        .await;
        let entry = &metadata["data"][metric][0];
        assert_eq!(entry["type"], kind, "{metric}: {metadata}");
        assert!(
            !entry["help"].as_str().unwrap_or_default().is_empty(),
            "{metric} has no help text in Prometheus: {metadata}"
        );
    }
    system.shutdown().await.unwrap();
}
