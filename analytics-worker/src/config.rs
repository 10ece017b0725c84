//! The analytics worker's configuration.

use clap::{Args, Parser};
use ratelimit_core::config::{KafkaArgs, RedisArgs, ServeArgs};

/// How long the per-minute analytics are kept (read by the worker, which writes them, and
/// the gateway, which bounds the windows it answers).
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Retention of the per-minute series and top-blocked sets, e.g. `24h`.
    #[arg(long = "analytics-retention", env = "ANALYTICS_RETENTION", value_name = "ANALYTICS_RETENTION",
          default_value = "24h", value_parser = ratelimit_core::config::parse_duration)]
    pub retention: std::time::Duration,
}

/// What the worker itself needs, shared by the standalone binary and the all-in-one one.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Most events counted in one batch (one Redis round trip).
    #[arg(long = "analytics-batch-max", env = "ANALYTICS_BATCH_MAX", value_name = "ANALYTICS_BATCH_MAX",
          default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_max: u64,
    /// Most distinct users the in-memory counters keep (embedded mode).
    #[arg(long = "analytics-max-users", env = "ANALYTICS_MAX_USERS", value_name = "ANALYTICS_MAX_USERS",
          default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_users: u64,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// The standalone `analytics-worker` binary: Kafka in, Redis out.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "analytics-worker",
    about = "Consumes decision events and keeps per-user counters",
    version
)]
pub struct WorkerConfig {
    /// Port of the worker's health endpoint.
    #[arg(
        long = "worker-port",
        env = "WORKER_PORT",
        value_name = "WORKER_PORT",
        default_value_t = 8090
    )]
    pub port: u16,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}
