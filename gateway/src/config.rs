//! The gateway's configuration.

use std::time::Duration;

use clap::{Args, Parser};
use kit::config::{RedisArgs, ServeArgs};

/// What the gateway itself needs, shared by the standalone binary and the all-in-one one.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    #[arg(
        long = "gateway-port",
        env = "GATEWAY_PORT",
        value_name = "GATEWAY_PORT",
        default_value_t = 3000
    )]
    pub port: u16,
    /// When set, `/analytics*`, `/status` and `/metrics` need `Authorization: Bearer
    /// <ADMIN_TOKEN>`; unset, they are open. Never printed by `--help`.
    #[arg(
        long = "admin-token",
        env = "ADMIN_TOKEN",
        value_name = "ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
}

/// The standalone `gateway` binary: asks the limiter over HTTP, reads analytics from Redis.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "gateway",
    about = "Public gateway: POST /api, GET /analytics/{user_id}, the dashboard, and the proxy in front of UPSTREAM_URL",
    version
)]
pub struct GatewayConfig {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Base URL of the rate limiter; a name resolving to several addresses is balanced.
    #[arg(
        long = "limiter-url",
        env = "LIMITER_URL",
        value_name = "LIMITER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub limiter_url: String,
    /// Deadline of one call to the limiter, in milliseconds.
    #[arg(long = "limiter-timeout-ms", env = "LIMITER_TIMEOUT_MS", value_name = "LIMITER_TIMEOUT_MS",
          default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub limiter_timeout_ms: u64,
    /// How often the limiter's host name is re-resolved, in milliseconds.
    #[arg(long = "limiter-resolve-ms", env = "LIMITER_RESOLVE_MS", value_name = "LIMITER_RESOLVE_MS",
          default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub limiter_resolve_ms: u64,
    /// Most checks sent to the limiter in one exchange (`POST /check/batch`).
    #[arg(long = "limiter-max-batch", env = "LIMITER_MAX_BATCH", value_name = "LIMITER_MAX_BATCH",
          default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=domain::api::MAX_BATCH as u64))]
    pub limiter_max_batch: u64,
    /// Most exchanges with the limiter outstanding at once; checks arriving while all are
    /// busy go together in the next one.
    #[arg(long = "limiter-in-flight", env = "LIMITER_IN_FLIGHT", value_name = "LIMITER_IN_FLIGHT",
          default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub limiter_in_flight: u64,
    /// How many of the limiter's refusals the gateway remembers and answers again itself
    /// while they hold (exact; counted by the limiter in a later batch); 0 turns it off.
    #[arg(long = "gateway-refusal-cache-entries", env = "GATEWAY_REFUSAL_CACHE_ENTRIES",
          value_name = "GATEWAY_REFUSAL_CACHE_ENTRIES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub refusal_cache_entries: u64,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub retention: kit::config::RetentionArgs,
    /// The gateway in front of a real service (`UPSTREAM_URL`).
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

impl GatewayConfig {
    pub fn limiter_timeout(&self) -> Duration {
        Duration::from_millis(self.limiter_timeout_ms)
    }

    pub fn limiter_batching(&self) -> crate::client::Batching {
        crate::client::Batching {
            max_batch: self.limiter_max_batch as usize,
            in_flight: self.limiter_in_flight as usize,
            refusal_cache: self.refusal_cache_entries as usize,
        }
    }

    pub fn limiter_resolve(&self) -> Duration {
        Duration::from_millis(self.limiter_resolve_ms)
    }
}

/// The gateway in front of a real service (`UPSTREAM_URL`): every request that is not one
/// of the gateway's own routes is checked against the limits and, when allowed, forwarded.
#[derive(Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// Base URL of the service behind the gateway (`http://127.0.0.1:9000`, optionally
    /// with a path prefix). Unset: no proxy, unknown paths answer 404.
    #[arg(
        long = "upstream-url",
        env = "UPSTREAM_URL",
        value_name = "UPSTREAM_URL"
    )]
    pub upstream_url: Option<String>,
    /// Longest wait for the upstream's response headers once the request has been sent in
    /// full (504 past it), and longest pause inside a body in either direction, in
    /// milliseconds.
    #[arg(long = "upstream-timeout-ms", env = "UPSTREAM_TIMEOUT_MS", value_name = "UPSTREAM_TIMEOUT_MS",
          default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub upstream_timeout_ms: u64,
    /// YAML file saying which descriptors a proxied request produces (Envoy's route
    /// `rate_limits` actions). Unset: one descriptor `[user_id=<client address>]` in the
    /// default domain.
    #[arg(
        long = "upstream-descriptors-path",
        env = "UPSTREAM_DESCRIPTORS_PATH",
        value_name = "UPSTREAM_DESCRIPTORS_PATH"
    )]
    pub upstream_descriptors_path: Option<std::path::PathBuf>,
    /// The client address is the last `X-Forwarded-For` entry (set by the proxy in front
    /// of the gateway) rather than the TCP peer, and an incoming `X-Forwarded-Proto` is
    /// kept. Only behind a proxy that appends to `X-Forwarded-For`: else clients choose
    /// their own address.
    #[arg(long = "trust-forwarded-for", env = "TRUST_FORWARDED_FOR", value_name = "TRUST_FORWARDED_FOR",
          default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded_for: bool,
}

impl UpstreamArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_timeout_ms)
    }
}
