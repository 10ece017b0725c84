//! `bench-client`: sends exactly `--requests` decisions to one service and says how they
//! were answered, for `bench/instructions.sh`, which counts the instructions a service
//! spends on them under valgrind (wrk and oha run for a time, not for a count).
//!
//! - `bench-client http URL --body user|throttle`: `POST` JSON bodies over keep-alive
//!   connections: `check` and `api` post `{"user_id":"user-<n>"}` (the limiter's
//!   `/check`, the gateway's or all-in-one's `/api`), `throttle` posts throttlecrab-server's
//!   `{"key":"user-<n>","max_burst":..}` with a limit no run reaches.
//! - `bench-client grpc ADDR --domain envoy --key user`: Envoy's `ShouldRateLimit` with one
//!   descriptor `[key=user-<n>]`, on HTTP/2 connections, as Envoy calls it.
//!
//! `n` cycles over `--users` (10,000); `--concurrency` (8) requests are in flight at once.
//! Prints one line `CLIENT requests=.. ok=.. refused=.. errors=.. secs=..`; exits non-zero
//! when a request failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    target: Target,
    /// Decisions to send.
    #[arg(long, short = 'n', default_value_t = 10_000, global = true)]
    requests: u64,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 8, global = true)]
    concurrency: u64,
    /// Users the requests cycle over.
    #[arg(long, default_value_t = 10_000, global = true)]
    users: u64,
}

#[derive(Subcommand)]
enum Target {
    /// POST JSON to URL.
    Http {
        url: String,
        #[arg(long, value_enum, default_value_t = Body::User)]
        body: Body,
    },
    /// ShouldRateLimit at ADDR (host:port).
    Grpc {
        addr: String,
        #[arg(long, default_value = "envoy")]
        domain: String,
        #[arg(long, default_value = "user")]
        key: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Body {
    /// `{"user_id":"user-<n>"}`: the limiter's `POST /check`, the gateway's `POST /api`.
    User,
    Throttle,
}

fn body(kind: Body, n: u64) -> String {
    match kind {
        Body::User => format!(r#"{{"user_id":"user-{n}"}}"#),
        Body::Throttle => format!(
            r#"{{"key":"user-{n}","max_burst":1000000000,"count_per_period":1000000000,"period":1,"quantity":1}}"#
        ),
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (next, tally, requests, users) =
            (next.clone(), tally.clone(), args.requests, args.users);
        match &args.target {
            Target::Http { url, body: kind } => {
                let (url, kind) = (url.clone(), *kind);
                // One connection per task, kept alive.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()?;
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            return;
                        }
                        let sent = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body(kind, i % users))
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                                tally.ok.fetch_add(1, Ordering::Relaxed)
                            }
                            Ok(r) if r.status().as_u16() == 429 => {
                                let _ = r.bytes().await;
                                tally.refused.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => tally.errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
            Target::Grpc { addr, domain, key } => {
                let mut client = RateLimitServiceClient::connect(format!("http://{addr}")).await?;
                let (domain, key) = (domain.clone(), key.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            return;
                        }
                        let request = RateLimitRequest {
                            domain: domain.clone(),
                            descriptors: vec![RateLimitDescriptor {
                                entries: vec![rate_limit_descriptor::Entry {
                                    key: key.clone(),
                                    value: format!("user-{}", i % users),
                                }],
                                ..Default::default()
                            }],
                            hits_addend: 1,
                        };
                        match client.should_rate_limit(request).await {
                            Ok(r) if r.get_ref().overall_code == Code::Ok as i32 => {
                                tally.ok.fetch_add(1, Ordering::Relaxed)
                            }
                            Ok(_) => tally.refused.fetch_add(1, Ordering::Relaxed),
                            Err(_) => tally.errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
    }
    futures::future::join_all(tasks).await;
    let errors = tally.errors.load(Ordering::Relaxed);
    println!(
        "CLIENT requests={} ok={} refused={} errors={} secs={:.3}",
        args.requests,
        tally.ok.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        errors,
        started.elapsed().as_secs_f64()
    );
    if errors > 0 {
        anyhow::bail!("{errors} requests failed");
    }
    Ok(())
}
