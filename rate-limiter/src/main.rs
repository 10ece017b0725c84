//! `rate-limiter`: the token-bucket service on its own (`POST /check`).

use clap::Parser;
use ratelimit_core::runtime;

// mimalloc: the allocator was ~15 % of CPU with glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::load_dotenv();
    let config = rate_limiter::config::LimiterConfig::parse();
    runtime::init_tracing();
    let shutdown = runtime::shutdown_token();
    let (limiter, events) = rate_limiter::build(
        &config.limiter,
        &config.redis,
        &config.kafka,
        runtime::instance_id(),
        &shutdown,
    )
    .await?;
    // Without Kafka the decisions are counted in-process, into the configured counter store.
    let worker = match events {
        Some(events) => {
            let store = analytics_worker::counter_store(
                &config.redis,
                config.worker.max_users as usize,
                config.worker.retention.retention,
            )?;
            Some(analytics_worker::SpawnedWorker::in_process(
                events,
                store,
                config.worker.batch_max as usize,
            ))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind((config.serve.bind_addr, config.port)).await?;
    rate_limiter::run(listener, limiter.clone(), &config.serve, shutdown).await?;
    rate_limiter::flush(&limiter).await;
    if let Some(worker) = worker {
        worker.stop().await;
    }
    Ok(())
}
