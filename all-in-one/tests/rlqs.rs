//! Envoy's rate limit quota service in the all-in-one: served on its gRPC port, with the
//! rules file, its demand board in memory, and the usage Envoy reports in the same
//! analytics as the other paths (the behaviour behind real Envoys is tested in
//! `rate-limiter/tests/rlqs.rs`).

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::RulesFile;
use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::Strategy;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaUsageReports};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A report of 7 admitted and 3 denied is answered with a token bucket of the rule's rate,
/// and counted once, request by request (not one per report), for the bucket's identity
/// and its rule; a bucket of two entries (no rule: allowed all) is counted under its
/// entries in key order, `name=shared/tenant=acme`, read with the `/` percent-encoded.
#[tokio::test]
async fn the_all_in_one_serves_quotas_and_counts_reports() {
    let rules = RulesFile::new(
        r#"
domain: api
descriptors:
  - key: name
    value: shared
    rate_limit: {name: shared, unit: minute, requests_per_unit: 600}
"#,
    );
    let config =
        all_in_one::Config::try_parse_from(["test", "--rules-path", rules.arg().as_str()]).unwrap();
    let system = all_in_one::System::start_with_grpc(
        config,
        common::listener().await,
        common::listener().await,
        Some(common::listener().await),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let grpc = system.grpc_addr.unwrap();
    let mut client = RateLimitQuotaServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let report = RateLimitQuotaUsageReports {
        domain: "api".into(),
        bucket_quota_usages: vec![
            BucketQuotaUsage {
                bucket_id: Some(BucketId {
                    bucket: [("name".to_owned(), "shared".to_owned())].into(),
                }),
                time_elapsed: None,
                num_requests_allowed: 7,
                num_requests_denied: 3,
            },
            BucketQuotaUsage {
                bucket_id: Some(BucketId {
                    bucket: [
                        ("tenant".to_owned(), "acme".to_owned()),
                        ("name".to_owned(), "shared".to_owned()),
                    ]
                    .into(),
                }),
                time_elapsed: None,
                num_requests_allowed: 4,
                num_requests_denied: 0,
            },
        ],
    };
    let mut answers = client
        .stream_rate_limit_quotas(futures::stream::iter(vec![report]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(BucketAction::QuotaAssignmentAction(action)) = answer.bucket_action[0].bucket_action
    else {
        panic!("{answer:?}");
    };
    let Some(Strategy::TokenBucket(bucket)) = action.rate_limit_strategy.unwrap().strategy else {
        panic!("not a token bucket");
    };
    // 600 a minute, one Envoy: 10 a second.
    assert_eq!(
        (
            bucket.tokens_per_fill.unwrap().value,
            bucket.fill_interval.unwrap().seconds
        ),
        (10, 1)
    );
    assert_eq!(action.assignment_time_to_live.unwrap().seconds, 11);

    // Counted once, request by request, for the bucket's identity and its rule.
    let http = common::http();
    let get = |path: &str| {
        let request = http.get(format!("http://{}{path}", system.gateway_addr));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let user = get("/analytics/name=shared").await;
        let tenant = get("/analytics/name=shared%2Ftenant=acme").await;
        let all = get("/analytics").await;
        let rule = json!([{"rule": "api:shared", "allowed": 7, "blocked": 3, "shadow_blocked": 0}]);
        let tenant_counted = tenant["user_id"] == "name=shared/tenant=acme"
            && tenant["allowed"] == 4
            && tenant["blocked"] == 0;
        if user["allowed"] == 7 && user["blocked"] == 3 && all["rules"] == rule && tenant_counted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{user} {tenant} {}",
            all["rules"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = system.limiter.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((load(&stats.allowed), load(&stats.limited)), (7 + 4, 3));
    system.shutdown().await.unwrap();
}
