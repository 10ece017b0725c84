//! One deadline per check, from the moment the gateway queues it: a check still queued at
//! its deadline is shed (429 `overloaded`, never sent, nothing spent), and only a check
//! whose exchange left and got no answer in time is a 503.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::LimiterInstance;
use domain::api::CheckRequest;
use gateway::client::{Batching, ClientError, HttpLimiterClient, LimiterClient, SystemResolver};
use testkit::{RedisServer, unique};
use tokio_util::sync::CancellationToken;

fn check(user: &str) -> CheckRequest {
    CheckRequest::user(user, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_still_queued_at_its_deadline_is_shed_and_spends_nothing() {
    let redis = RedisServer::start();
    let (url, prefix) = (redis.url(), unique("deadlines"));
    let limiter = LimiterInstance::start(&[
        "--redis-url",
        &url,
        "--redis-key-prefix",
        &prefix,
        "--kafka-brokers=",
        "--redis-timeout-ms=5000",
        "--request-timeout-ms=10000",
        "--rate-limit-capacity=5",
        "--rate-limit-refill-per-sec=0.001",
    ])
    .await;
    let shutdown = CancellationToken::new();
    let client = Arc::new(
        HttpLimiterClient::new(
            &limiter.url(),
            Duration::from_millis(300),
            Batching {
                refusal_cache: 0,
                max_batch: 64,
                in_flight: 1,
            },
            Duration::from_secs(60),
            Arc::new(SystemResolver),
            shutdown.clone(),
        )
        .await
        .unwrap(),
    );
    // Warm the connection and the script.
    assert!(client.check(&check("warm")).await.unwrap().allowed);

    redis.freeze(true);
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.check(&check("first")).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let queued: Vec<_> = (0..10)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.check(&check(&format!("queued-{i}"))).await })
        })
        .collect();
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(ClientError::Unreachable(_))),
        "sent, unanswered in time: {first:?}"
    );
    for q in queued {
        let answer = q.await.unwrap();
        assert_eq!(answer, Err(ClientError::Overloaded), "still queued: shed");
    }
    redis.freeze(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The shed checks were never sent: their users still have all 5 tokens.
    for i in 0..10 {
        let user = format!("queued-{i}");
        let answer = client.check(&check(&user)).await.unwrap();
        assert_eq!(answer.remaining, 4, "{user} spent nothing while shed");
    }
    shutdown.cancel();
}
