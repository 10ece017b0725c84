//! The analytics worker's configuration.

use clap::Parser;
use kit::config::{KafkaArgs, RedisArgs, ServeArgs, WorkerArgs};

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
