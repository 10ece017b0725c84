//! The gateway: the public face of the system. `POST /api` asks the limiter and answers
//! 200 or 429 with rate-limit headers; `GET /analytics/{user_id}` reads the counters.
//!
//! - [`client`]: the limiter-client trait, and its HTTP form: batches, replica discovery
//!   and balancing.
//! - [`refusals`]: the refusal cache in front of the client: refusals that still hold,
//!   answered without an exchange (and sent along later to be counted).
//! - [`http`]: the gateway's own routes (one list, [`http::routes`]); [`answer`], how a
//!   decision becomes headers and a 429.
//! - [`proxy`]: the gateway in front of a real service (`UPSTREAM_URL`), and [`actions`],
//!   which descriptors a proxied request produces; [`path`], the one normal form of a
//!   path that the rules, the routing and the upstream all see.
//! - [`analytics_reads`]: what bounds the cost of the analytics reads; [`status`], the
//!   deployment-wide `/status`; [`dashboard`], the page.
//! - [`config`]: the gateway's configuration.

pub mod actions;
/// The admin token's guard (shared with the limiter's `/admin` routes).
pub use kit::admin;
pub mod analytics_reads;
pub mod answer;
pub mod client;
pub mod config;
pub mod dashboard;

pub mod http;
pub mod path;
pub mod proxy;
pub mod refusals;
pub mod status;

use std::sync::Arc;

use kit::http::ServeLimits;
use tokio_util::sync::CancellationToken;

pub use crate::http::{Gateway, router};

/// Serves the gateway on `listener` until `shutdown`, then finishes in-flight requests
/// (at most the grace period).
pub async fn run(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    limits: &ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    kit::http::serve(listener, router(gateway, limits), shutdown, limits).await
}

/// Builds the standalone gateway from its configuration: the limiter over HTTP, the
/// counters in Redis.
pub async fn from_config(
    config: &config::GatewayConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Gateway> {
    let redis = config.redis.resolve().map_err(anyhow::Error::msg)?;
    let Some(endpoint) = &redis.analytics else {
        anyhow::bail!(
            "REDIS_URL is required: the standalone gateway reads analytics from Redis (run the all-in-one binary for the embedded mode)"
        );
    };
    let analytics = counters::redis_reader(endpoint, &redis)?;
    let reports = kit::report::Reports::at(endpoint, &redis)?;
    let limiter = client::HttpLimiterClient::new(
        &config.limiter_url,
        config.limiter_timeout(),
        config.limiter_batching(),
        config.limiter_resolve(),
        Arc::new(client::SystemResolver),
        shutdown.clone(),
    )
    .await?;
    Ok(Gateway {
        limiter: Arc::new(limiter),
        status: Arc::new(status::RemoteStatus::new(
            &config.limiter_url,
            analytics.clone(),
            reports,
        )),
        analytics,
        admin_token: admin::AdminToken::from_setting(config.gateway.admin_token.as_deref()),
        retention: config.retention.retention,
    })
}
