//! `distributed-rate-limiter`: the gateway, the rate limiter and the analytics worker in
//! one process: `cargo run --release` with nothing else installed.

use clap::Parser;
use kit::runtime;

// mimalloc: the allocator was ~15 % of CPU with glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::load_dotenv();
    let config = all_in_one::Config::parse();
    runtime::init_tracing();
    let gateway =
        tokio::net::TcpListener::bind((config.serve.bind_addr, config.gateway.port)).await?;
    let limiter =
        tokio::net::TcpListener::bind((config.limiter_bind_addr, config.limiter_port)).await?;
    let grpc =
        tokio::net::TcpListener::bind((config.limiter_bind_addr, config.grpc.grpc_port)).await?;
    let mode = match (
        config.redis.url().is_some(),
        config.kafka.brokers().is_some(),
    ) {
        (false, false) => "embedded (memory buckets, in-process event stream)",
        (true, false) => "Redis buckets and counters, in-process event stream",
        (false, true) => "memory buckets, Kafka event stream",
        (true, true) => "Redis buckets and counters, Kafka event stream",
    };
    tracing::info!(mode, "starting the all-in-one system");
    let system = all_in_one::System::start_with_grpc(
        config,
        gateway,
        limiter,
        Some(grpc),
        runtime::shutdown_token(),
    )
    .await?;
    system.wait().await
}
