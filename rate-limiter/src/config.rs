//! The rate limiter's configuration.

use std::time::Duration;

use clap::{Args, Parser};
use service_kit::config::{FailMode, KafkaArgs, PolicyArgs, RedisArgs, ServeArgs};

/// What the limiter itself needs, shared by the standalone binary and the all-in-one one.
#[derive(Args, Debug, Clone)]
pub struct LimiterArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// What to do while Redis is unreachable: `open` (decide with a local bucket) or
    /// `closed` (answer 503).
    #[arg(
        long = "fail-mode",
        env = "FAIL_MODE",
        value_name = "FAIL_MODE",
        value_enum,
        default_value = "open"
    )]
    pub fail_mode: FailMode,
    /// In fail-open mode, the local bucket gets the policy divided by this many instances;
    /// unset: the number of live limiters, from the reports they write to Redis.
    #[arg(long = "fail-open-instances", env = "FAIL_OPEN_INSTANCES", value_name = "FAIL_OPEN_INSTANCES",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub fail_open_instances: Option<u64>,
    /// Consecutive store failures that open the circuit breaker.
    #[arg(long = "breaker-failures", env = "BREAKER_FAILURES", value_name = "BREAKER_FAILURES",
          default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub breaker_failures: u32,
    /// How long the breaker stays open before it probes the store again, in milliseconds.
    #[arg(long = "breaker-open-ms", env = "BREAKER_OPEN_MS", value_name = "BREAKER_OPEN_MS",
          default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub breaker_open_ms: u64,
    /// Capacity of the in-process event stream (embedded mode); past it events are dropped.
    #[arg(long = "event-buffer", env = "EVENT_BUFFER", value_name = "EVENT_BUFFER",
          default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub event_buffer: u64,
    /// Rules in envoyproxy/ratelimit's format (with our extensions): a YAML file, or a
    /// directory of `*.yaml` files, one domain each. Watched: a change applies within a
    /// second; a bad file is refused and logged, the rules in force stay. Unset: one
    /// built-in rule from RATE_LIMIT_CAPACITY and RATE_LIMIT_REFILL_PER_SEC.
    #[arg(long = "rules-path", env = "RULES_PATH", value_name = "RULES_PATH")]
    pub rules_path: Option<std::path::PathBuf>,
    /// Whether a RULES_PATH directory without any rules file is a valid (empty) rule set.
    /// Off: such a directory stops the start-up and, on a change, is refused like a bad
    /// file (the rules in force stay), so that a deploy that empties the directory before
    /// copying new files in never drops every limit.
    #[arg(long = "rules-allow-empty", env = "RULES_ALLOW_EMPTY", value_name = "RULES_ALLOW_EMPTY",
          default_value_t = false, action = clap::ArgAction::Set)]
    pub rules_allow_empty: bool,
    /// How many of Redis's refusals the limiter remembers and answers again itself while
    /// they hold (exact: no request is decided otherwise than Redis would); 0 turns the
    /// cache off. Unused by the embedded memory store.
    #[arg(long = "refusal-cache-entries", env = "REFUSAL_CACHE_ENTRIES", value_name = "REFUSAL_CACHE_ENTRIES",
          default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub refusal_cache_entries: u64,
    /// With Redis (not Cluster) and Kafka: each decision's event is appended to a Redis
    /// stream (the outbox) by the script that decides, and relayed to Kafka by the
    /// limiters, so that no answered decision goes uncounted when a limiter dies. Off:
    /// events go from each limiter's memory to Kafka (lost if it dies before delivery).
    #[arg(long = "events-outbox", env = "EVENTS_OUTBOX", value_name = "EVENTS_OUTBOX",
          default_value_t = true, action = clap::ArgAction::Set)]
    pub events_outbox: bool,
    /// The outbox's bound in bytes (all its streams): past it, decisions stand and their
    /// events are dropped and counted (`ratelimit_outbox_dropped_total`).
    #[arg(long = "outbox-max-bytes", env = "OUTBOX_MAX_BYTES", value_name = "OUTBOX_MAX_BYTES",
          default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(65_536..=68_719_476_736))]
    pub outbox_max_bytes: u64,
    /// How long an outbox stream's relay lease lasts without renewal: how soon the
    /// streams of a limiter that died are relayed by another, in milliseconds.
    #[arg(long = "outbox-lease-ms", env = "OUTBOX_LEASE_MS", value_name = "OUTBOX_LEASE_MS",
          default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(300..=600_000))]
    pub outbox_lease_ms: u64,
}

impl LimiterArgs {
    pub fn breaker_open(&self) -> Duration {
        Duration::from_millis(self.breaker_open_ms)
    }
}

/// Which rate-limit header fields the Envoy rate limit service asks Envoy to add to its
/// answers (`response_headers_to_add`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseHeaders {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    #[default]
    Ietf,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`: what
    /// envoyproxy/ratelimit sends with `LIMIT_RESPONSE_HEADERS_ENABLED=true`.
    Envoy,
    /// None.
    Off,
}

/// Envoy's rate limit service (`envoy.service.ratelimit.v3`, gRPC).
#[derive(Args, Debug, Clone)]
pub struct GrpcArgs {
    /// Port of the gRPC API: Envoy's rate limit service and the gRPC health service. Binds
    /// the address the limiter's HTTP API binds.
    #[arg(
        long = "grpc-port",
        env = "GRPC_PORT",
        value_name = "GRPC_PORT",
        default_value_t = 8081
    )]
    pub grpc_port: u16,
    /// Rate-limit header fields added to Envoy's answers: `ietf` (RateLimit-Policy and
    /// RateLimit), `envoy` (RateLimit-Limit/-Remaining/-Reset, as envoyproxy/ratelimit) or
    /// `off`.
    #[arg(
        long = "response-headers",
        env = "RESPONSE_HEADERS",
        value_name = "RESPONSE_HEADERS",
        value_enum,
        default_value = "ietf"
    )]
    pub response_headers: ResponseHeaders,
}

/// The standalone `rate-limiter` binary.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "rate-limiter",
    about = "Token-bucket rate limiter: POST /check, and Envoy's rate limit service over gRPC",
    version
)]
pub struct LimiterConfig {
    #[arg(
        long = "limiter-port",
        env = "LIMITER_PORT",
        value_name = "LIMITER_PORT",
        default_value_t = 8080
    )]
    pub port: u16,
    #[command(flatten)]
    pub grpc: GrpcArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub limiter: LimiterArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Used when `KAFKA_BROKERS` is unset: decisions are then counted in-process.
    #[command(flatten)]
    pub worker: service_kit::config::WorkerArgs,
    /// Enables the `/admin` routes (overrides, bucket peeks and resets), which then need
    /// `Authorization: Bearer <token>`; unset, they answer 404.
    #[arg(
        long = "admin-token",
        env = "ADMIN_TOKEN",
        value_name = "ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
}
