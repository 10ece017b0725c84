//! `rate-limiter`: the token-bucket service on its own (`POST /check`).

use clap::Parser;
use service_kit::runtime;

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
    service.serve(listener, &config.serve, shutdown).await?;
    Ok(())
}
