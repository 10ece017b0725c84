//! `gateway`: the public API in front of the rate limiter.

use clap::Parser;
use kit::runtime;

// mimalloc: the allocator was ~15 % of CPU with glibc malloc (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::load_dotenv();
    let config = gateway::config::GatewayConfig::parse();
    runtime::init_tracing();
    let shutdown = runtime::shutdown_token();
    let gateway = gateway::from_config(&config, &shutdown).await?;
    let upstream = gateway::proxy::Upstream::from_args(&config.upstream)?.map(std::sync::Arc::new);
    let listener =
        tokio::net::TcpListener::bind((config.serve.bind_addr, config.gateway.port)).await?;
    gateway::proxy::run(
        listener,
        gateway,
        upstream,
        &config.serve.limits(),
        shutdown,
    )
    .await?;
    Ok(())
}
