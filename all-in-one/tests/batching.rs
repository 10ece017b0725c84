//! The gateway's limiter client batches under load and not when idle: an idle gateway sends
//! each check on its own at once, a loaded one sends what queued up while its exchanges
//! were busy, and batching never lets a user past the limit or loses an answer.
//!
//! One test in this binary: it reads the process-wide metrics registry, where the in-process
//! limiter counts its `POST /check/batch` exchanges.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use domain::api::{CheckRequest, FieldError};
use gateway::client::{Batching, ClientError, HttpLimiterClient, LimiterClient, SystemResolver};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `POST /check/batch` exchanges the limiter has answered so far.
fn exchanges() -> u64 {
    let handle = kit::metrics::handle();
    handle.run_upkeep();
    handle
        .render()
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .filter(|l| l.contains(r#"route="/check/batch""#) && l.contains(r#"status="200""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn check(user: &str, cost: u64) -> CheckRequest {
    CheckRequest::user(user, cost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_batched_under_load_and_sent_alone_when_idle() {
    let config = rate_limiter::config::LimiterConfig::try_parse_from([
        "rate-limiter",
        "--redis-url=",
        "--kafka-brokers=",
        "--rate-limit-capacity=5",
        "--rate-limit-refill-per-sec=0.001",
    ])
    .unwrap();
    let shutdown = CancellationToken::new();
    let (limiter, _events) = rate_limiter::build(
        &config.limiter,
        &config.redis.resolve().unwrap(),
        &config.kafka,
        "batching".into(),
        &shutdown,
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let (limiter, shutdown) = (limiter.clone(), shutdown.clone());
        tokio::spawn(async move {
            rate_limiter::run(listener, limiter, &config.serve.limits(), None, shutdown)
                .await
                .unwrap();
        })
    };
    let client = Arc::new(
        HttpLimiterClient::new(
            &format!("http://{addr}"),
            Duration::from_secs(5),
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

    // Idle: one check at a time, one exchange each.
    let before = exchanges();
    for i in 0..5 {
        let answer = client.check(&check(&format!("idle-{i}"), 1)).await.unwrap();
        assert!(answer.allowed);
        assert_eq!(answer.remaining, 4);
    }
    assert_eq!(
        exchanges() - before,
        5,
        "an idle client sends each check alone"
    );

    // Loaded: 400 checks at once over 40 users with 5 tokens each, one exchange at a time.
    let before = exchanges();
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let user = format!("busy-{}", i % 40);
                (user.clone(), client.check(&check(&user, 1)).await)
            })
        })
        .collect();
    let mut allowed = std::collections::HashMap::<String, u64>::new();
    for task in tasks {
        let (user, answer) = task.await.unwrap();
        let answer = answer.expect("every check is answered");
        *allowed.entry(user).or_default() += u64::from(answer.allowed);
    }
    assert_eq!(allowed.len(), 40);
    assert!(
        allowed.values().all(|&n| n == 5),
        "each user gets exactly its 5 tokens: {allowed:?}"
    );
    let sent = exchanges() - before;
    assert!(
        sent <= 400 / 4,
        "400 concurrent checks went in {sent} exchanges; batches of at least 4 expected"
    );

    // A bad check in a batch is refused alone; the others in it are decided.
    let tasks: Vec<_> = [("mixed-a", 1), ("mixed-b", 6), ("mixed-c", 1)]
        .into_iter()
        .map(|(user, cost)| {
            let client = client.clone();
            tokio::spawn(async move { client.check(&check(user, cost)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    assert!(answers[0].as_ref().unwrap().allowed);
    assert_eq!(
        answers[1],
        Err(ClientError::Invalid(FieldError::new(
            "cost",
            "must be at most the bucket capacity 5"
        )))
    );
    assert!(answers[2].as_ref().unwrap().allowed);

    shutdown.cancel();
    server.await.unwrap();
}
