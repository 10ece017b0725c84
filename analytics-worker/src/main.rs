//! `analytics-worker`: consumes decision events from Kafka and counts them into Redis.

use clap::Parser;
use kit::runtime;

// mimalloc: the allocator was ~15 % of CPU with glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::load_dotenv();
    let config = analytics_worker::config::WorkerConfig::parse();
    runtime::init_tracing();
    let listener = tokio::net::TcpListener::bind((config.serve.bind_addr, config.port)).await?;
    analytics_worker::run(listener, config, runtime::shutdown_token()).await
}
