//! The rate limiter's configuration.

use std::time::Duration;

use clap::ValueEnum;
use clap::{Args, Parser};
use domain::Policy;
use kit::config::{KafkaArgs, RedisArgs, ServeArgs};

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
    /// Without Kafka, or on a Cluster, there is no outbox whatever this says.
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
    /// Threads that serve the gRPC port, each a single-threaded runtime that owns the
    /// connections it is given (the fewest-connections thread takes the next one). Envoy's
    /// calls on one connection are then read, decided and answered together on one thread,
    /// several answers a write. 0 (the default): one per core with the store in memory;
    /// with the store in Redis, the process's own runtime, where the Redis connection is.
    /// At most 256: each is an OS thread started with the process.
    #[arg(
        long = "grpc-threads",
        env = "GRPC_THREADS",
        value_name = "GRPC_THREADS",
        default_value_t = 0,
        value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(0..=256), usize::from)
    )]
    pub grpc_threads: usize,
}

/// The standalone `rate-limiter` binary.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "rate-limiter",
    about = "Rate limiter: POST /check and /check/batch, and Envoy's rate limit and quota services over gRPC",
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
    pub worker: kit::config::WorkerArgs,
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

/// The token-bucket policy every user gets.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Bucket capacity (the burst), in tokens.
    #[arg(long = "rate-limit-capacity", env = "RATE_LIMIT_CAPACITY", value_name = "RATE_LIMIT_CAPACITY", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=domain::bucket::MAX_CAPACITY))]
    pub capacity: u64,
    /// Refill rate in tokens per second; fractions allowed (0.5 = one token every 2 s).
    #[arg(long = "rate-limit-refill-per-sec", env = "RATE_LIMIT_REFILL_PER_SEC", value_name = "RATE_LIMIT_REFILL_PER_SEC",
          default_value_t = 1.0, value_parser = positive_rate)]
    pub refill_per_sec: f64,
}

impl PolicyArgs {
    /// The policy, or why `RATE_LIMIT_CAPACITY` and `RATE_LIMIT_REFILL_PER_SEC` together
    /// are not one (each is checked alone by the parser).
    pub fn policy(&self) -> Result<Policy, String> {
        Policy::new(self.capacity, self.refill_per_sec).map_err(|err| {
            format!(
                "invalid RATE_LIMIT_CAPACITY={} with RATE_LIMIT_REFILL_PER_SEC={}: {err}",
                self.capacity, self.refill_per_sec
            )
        })
    }
}

fn positive_rate(s: &str) -> Result<f64, String> {
    use domain::bucket::{MAX_REFILL_PER_SEC, MIN_REFILL_PER_SEC};
    match s.parse::<f64>() {
        Ok(v) if (MIN_REFILL_PER_SEC..=MAX_REFILL_PER_SEC).contains(&v) => Ok(v),
        _ => Err(
            "expected tokens per second between one a day (0.0000116) and 1000000000, e.g. 1 or 0.5"
                .into(),
        ),
    }
}

/// What the limiter does while its shared store is unreachable.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Decide with a local in-memory bucket per instance (degraded, still limited).
    Open,
    /// Refuse with 503: the limiter cannot vouch for the request.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cfg {
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(
            long,
            env = "TEST_ONLY_FAIL_MODE",
            value_name = "TEST_ONLY_FAIL_MODE",
            value_enum,
            default_value = "open"
        )]
        fail_mode: FailMode,
        #[command(flatten)]
        grpc: GrpcArgs,
    }

    #[test]
    fn bad_values_name_the_variable_and_choices() {
        let err = Cfg::try_parse_from(["x", "--fail-mode", "opne"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("opne") && msg.contains("open") && msg.contains("closed"),
            "{msg}"
        );
        let err = Cfg::try_parse_from(["x", "--rate-limit-capacity", "0"]).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_CAPACITY"), "{err}");
        let err = Cfg::try_parse_from(["x", "--rate-limit-refill-per-sec=-1"]).unwrap_err();
        assert!(
            err.to_string().contains("RATE_LIMIT_REFILL_PER_SEC"),
            "{err}"
        );
    }

    /// A refill rate that would make the bucket arithmetic spin (a typo such as `1e-12`),
    /// and a policy that would take more than a year to refill, stop the service before it
    /// serves, naming the variables.
    #[test]
    fn policies_outside_the_bounds_name_the_variables() {
        for rate in ["1e-12", "0", "2e9", "NaN", "inf"] {
            let err = Cfg::try_parse_from(["x", "--rate-limit-refill-per-sec", rate]).unwrap_err();
            assert!(
                err.to_string().contains("RATE_LIMIT_REFILL_PER_SEC"),
                "{rate}: {err}"
            );
        }
        let err = Cfg::try_parse_from(["x", "--rate-limit-capacity", "1000000001"]).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_CAPACITY"), "{err}");
        let cfg = Cfg::try_parse_from([
            "x",
            "--rate-limit-capacity",
            "1000000",
            "--rate-limit-refill-per-sec",
            "0.00002",
        ])
        .unwrap();
        let err = cfg.policy.policy().unwrap_err();
        assert!(
            err.contains("RATE_LIMIT_CAPACITY") && err.contains("RATE_LIMIT_REFILL_PER_SEC"),
            "{err}"
        );
    }

    /// Each gRPC thread is an OS thread with a runtime of its own, started at once: a typo
    /// (`GRPC_THREADS=100000`) would start that many before serving. Bounded, named.
    #[test]
    fn grpc_threads_are_bounded() {
        let err = Cfg::try_parse_from(["x", "--grpc-threads", "100000"]).unwrap_err();
        assert!(err.to_string().contains("GRPC_THREADS"), "{err}");
        let cfg = Cfg::try_parse_from(["x", "--grpc-threads", "256"]).unwrap();
        assert_eq!(cfg.grpc.grpc_threads, 256);
    }

    #[test]
    fn fractional_rates_are_accepted() {
        let cfg = Cfg::try_parse_from(["x", "--rate-limit-refill-per-sec", "0.5"]).unwrap();
        assert_eq!(cfg.policy.policy().unwrap().refill_per_sec(), 0.5);
    }
}
