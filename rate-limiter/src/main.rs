//! `rate-limiter`: the token-bucket service on its own (`POST /check`), and Envoy's rate
//! limit service over gRPC on `GRPC_PORT`.

use clap::Parser;
use kit::runtime;

// mimalloc: the allocator was ~15 % of CPU with glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::load_dotenv();
    let config = rate_limiter::config::LimiterConfig::parse();
    runtime::init_tracing();
    let shutdown = runtime::shutdown_token();
    let service =
        rate_limiter::Standalone::start(&config, runtime::instance_id(), &shutdown).await?;
    let listener = tokio::net::TcpListener::bind((config.serve.bind_addr, config.port)).await?;
    let grpc =
        tokio::net::TcpListener::bind((config.serve.bind_addr, config.grpc.grpc_port)).await?;
    service
        .serve_all(listener, Some(grpc), &config.serve.limits(), shutdown)
        .await?;
    Ok(())
}
