//! Configuration sections shared by the services.
//!
//! Each service composes these into one typed config (`clap` with `env`), read from the
//! environment after `.env` is loaded ([`crate::runtime::load_dotenv`]) and validated once
//! at start-up: a bad value names the variable and what it accepts, and the process exits
//! non-zero before serving. Every variable is also a `--flag`.

use std::collections::BTreeMap;

use std::path::Path;
use std::time::Duration;

use clap::Args;

use crate::redis::{Endpoint, is_tls_url};

/// How a service listens and stops.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address the HTTP services bind to.
    #[arg(
        long = "bind-addr",
        env = "BIND_ADDR",
        value_name = "BIND_ADDR",
        default_value = "0.0.0.0"
    )]
    pub bind_addr: std::net::IpAddr,
    /// Longest time in-flight requests get to finish after SIGTERM, in milliseconds.
    #[arg(
        long = "shutdown-grace-ms",
        env = "SHUTDOWN_GRACE_MS",
        value_name = "SHUTDOWN_GRACE_MS",
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u64,
    /// Concurrent requests a service works on; past it requests are shed with 429.
    #[arg(long = "max-in-flight", env = "MAX_IN_FLIGHT", value_name = "MAX_IN_FLIGHT",
          default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_in_flight: u64,
    /// Longest a request may take before it is answered 503, in milliseconds.
    #[arg(long = "request-timeout-ms", env = "REQUEST_TIMEOUT_MS", value_name = "REQUEST_TIMEOUT_MS",
          default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,
    /// Longest wait for a request's head, from when the server starts waiting for it (a new
    /// connection, or the next request on a kept-alive one), in milliseconds; past it the
    /// connection is closed.
    #[arg(long = "header-timeout-ms", env = "HEADER_TIMEOUT_MS", value_name = "HEADER_TIMEOUT_MS",
          default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub header_timeout_ms: u64,
    /// Longest wait for a request's body once its head is in, in milliseconds; past it the
    /// request is answered 408 and the connection closed.
    #[arg(long = "body-timeout-ms", env = "BODY_TIMEOUT_MS", value_name = "BODY_TIMEOUT_MS",
          default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub body_timeout_ms: u64,
    /// Longest a write to a client may make no progress (the client does not read its
    /// response), in milliseconds; past it the connection is closed.
    #[arg(long = "send-timeout-ms", env = "SEND_TIMEOUT_MS", value_name = "SEND_TIMEOUT_MS",
          default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub send_timeout_ms: u64,
    /// Open connections a service holds at once; past it a new connection is closed at once.
    #[arg(long = "max-connections", env = "MAX_CONNECTIONS", value_name = "MAX_CONNECTIONS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
}

impl ServeArgs {
    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.request_timeout_ms)
    }

    /// What one client may hold of the service, and for how long.
    pub fn limits(&self) -> crate::http::ServeLimits {
        use std::time::Duration;
        crate::http::ServeLimits {
            max_in_flight: self.max_in_flight as usize,
            request_timeout: self.request_timeout(),
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            send_timeout: Duration::from_millis(self.send_timeout_ms),
            max_connections: self.max_connections as usize,
            grace: self.grace(),
        }
    }
}

/// Parses a duration written `<n>s`, `<n>m`, `<n>h` or `<n>d` (e.g. `15m`, `24h`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 15m, 1h or 7d, got {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3_600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("expected a duration like 15m, 1h or 7d, got {s:?}")),
    };
    if secs == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// How long the per-minute analytics are kept (read by the worker, which writes them, and
/// the gateway, which bounds the windows it answers).
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Retention of the per-minute series and top-blocked sets, e.g. `24h`.
    #[arg(long = "analytics-retention", env = "ANALYTICS_RETENTION", value_name = "ANALYTICS_RETENTION",
          default_value = "24h", value_parser = parse_duration)]
    pub retention: std::time::Duration,
}

/// What the worker itself needs, shared by the standalone binary and the all-in-one one.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Most events counted in one batch (one pipeline to Redis). A batch takes what is
    /// waiting, up to this: an idle worker counts each event at once, a busy one adds up
    /// more of a user's events before it writes (50,000: 320,000-384,000 events/s into
    /// Redis where 5,000 gave 107,000-128,000, BENCHMARKS.md).
    #[arg(long = "analytics-batch-max", env = "ANALYTICS_BATCH_MAX", value_name = "ANALYTICS_BATCH_MAX",
          default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_max: u64,
    /// Most distinct users the in-memory counters keep (embedded mode).
    #[arg(long = "analytics-max-users", env = "ANALYTICS_MAX_USERS", value_name = "ANALYTICS_MAX_USERS",
          default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_users: u64,
    /// How long a user's all-time counters are kept in Redis after their last decision
    /// (refreshed by every decision), e.g. `7d`: throwaway ids do not stay for ever.
    #[arg(long = "analytics-user-ttl", env = "ANALYTICS_USER_TTL", value_name = "ANALYTICS_USER_TTL",
          default_value = "7d", value_parser = parse_duration)]
    pub user_ttl: std::time::Duration,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// Where shared state lives: Redis, or (unset) this process's memory.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// redis:// URL, or rediss:// for TLS; a password (`redis://:PASSWORD@host`) or an ACL
    /// user (`redis://USER:PASSWORD@host`) goes in it. Unset or empty keeps buckets and
    /// counters in memory (embedded mode). With `REDIS_CLUSTER=true`, one or more cluster
    /// nodes, comma-separated.
    /// Its value is never printed (`--help` hides it: it may hold a password).
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        hide_env_values = true
    )]
    pub url: Option<String>,
    /// Redis URL of the analytics counters and status reports, when they should not share
    /// the buckets' Redis (analytics reads then cannot slow decisions down); unset: the
    /// same as `REDIS_URL`. Never printed by `--help`.
    #[arg(
        long = "analytics-redis-url",
        env = "ANALYTICS_REDIS_URL",
        value_name = "ANALYTICS_REDIS_URL",
        hide_env_values = true
    )]
    pub analytics_url: Option<String>,
    /// `REDIS_URL` (and `ANALYTICS_REDIS_URL`) is a Redis Cluster: follow its slot map,
    /// one connection per node.
    #[arg(long = "redis-cluster", env = "REDIS_CLUSTER", value_name = "REDIS_CLUSTER",
          default_value_t = false, action = clap::ArgAction::Set)]
    pub cluster: bool,
    /// Prefix of every key this system writes.
    #[arg(
        long = "redis-key-prefix",
        env = "REDIS_KEY_PREFIX",
        value_name = "REDIS_KEY_PREFIX",
        default_value = "rl:"
    )]
    pub key_prefix: String,
    /// Deadline of every Redis call, in milliseconds.
    #[arg(long = "redis-timeout-ms", env = "REDIS_TIMEOUT_MS", value_name = "REDIS_TIMEOUT_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,
    /// Send a bucket-store batch that timed out once more, answered from the first run
    /// where Redis did run it (the scripts remember their answers briefly); costs Redis
    /// more CPU per decision. `false`: a timed-out batch goes to the fallback at once.
    #[arg(long = "redis-idempotent-retry", env = "REDIS_IDEMPOTENT_RETRY", value_name = "REDIS_IDEMPOTENT_RETRY",
          default_value_t = true, action = clap::ArgAction::Set)]
    pub idempotent_retry: bool,
    /// For rediss://: a PEM file of the CA certificates to trust instead of the system's.
    #[arg(
        long = "redis-ca-file",
        env = "REDIS_CA_FILE",
        value_name = "REDIS_CA_FILE"
    )]
    pub ca_file: Option<String>,
    /// For rediss://: a PEM client certificate (chain) to present to a Redis that asks for
    /// one (`tls-auth-clients`); with REDIS_CLIENT_KEY.
    #[arg(
        long = "redis-client-cert",
        env = "REDIS_CLIENT_CERT",
        value_name = "REDIS_CLIENT_CERT"
    )]
    pub client_cert: Option<String>,
    /// The PEM private key of REDIS_CLIENT_CERT.
    #[arg(
        long = "redis-client-key",
        env = "REDIS_CLIENT_KEY",
        value_name = "REDIS_CLIENT_KEY"
    )]
    pub client_key: Option<String>,
}

/// A file setting, if set (an empty value counts as unset, as in `.env`).
fn file(setting: &Option<String>) -> Option<&Path> {
    setting
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(Path::new)
}

/// The Redis settings, resolved once at start-up ([`RedisArgs::resolve`]) and passed down
/// as they are: where the buckets and where the counters live (the TLS files read), the
/// key prefix and the call deadline.
#[derive(Clone)]
pub struct RedisSettings {
    /// `REDIS_URL`: the buckets (none: in memory).
    pub buckets: Option<Endpoint>,
    /// `ANALYTICS_REDIS_URL`, else `REDIS_URL`: the counters and the status reports (none:
    /// in memory).
    pub analytics: Option<Endpoint>,
    pub key_prefix: String,
    /// The deadline of a decision's call.
    pub timeout: Duration,
    pub idempotent_retry: bool,
}

impl RedisSettings {
    /// The deadline of a call that is not a decision (a report, a batch of counts): it can
    /// wait longer.
    pub fn slow_timeout(&self, at_least: Duration) -> Duration {
        self.timeout.max(at_least)
    }
}

impl RedisArgs {
    /// Every Redis setting checked and resolved, or why they cannot be used (see
    /// `RedisArgs::endpoint`).
    pub fn resolve(&self) -> Result<RedisSettings, String> {
        Ok(RedisSettings {
            buckets: self.endpoint()?,
            analytics: self.analytics_endpoint()?,
            key_prefix: self.key_prefix.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            idempotent_retry: self.idempotent_retry,
        })
    }

    /// The Redis URL, if one is configured (an empty value counts as unset).
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref().map(str::trim).filter(|u| !u.is_empty())
    }

    /// Where the counters and the status reports live: `ANALYTICS_REDIS_URL`, else
    /// `REDIS_URL` (the same Redis as the buckets), else none (memory).
    fn analytics_url(&self) -> Option<&str> {
        self.analytics_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .or_else(|| self.url())
    }

    /// Where Redis is, if it is configured, with the certificate files read; or why these
    /// settings cannot be used, naming the variables: a client certificate without its key
    /// (or the key alone), TLS settings without a `rediss://` URL, a file that cannot be
    /// read or holds no PEM certificate (or key), a `rediss://` URL in a build without TLS
    /// support ([`crate::redis::NO_TLS`]).
    fn endpoint(&self) -> Result<Option<Endpoint>, String> {
        self.endpoint_of(self.url())
    }

    /// The Redis of the counters and reports (`ANALYTICS_REDIS_URL`, else `REDIS_URL`), as
    /// `RedisArgs::endpoint` reads it; the TLS settings apply to both.
    fn analytics_endpoint(&self) -> Result<Option<Endpoint>, String> {
        self.endpoint_of(self.analytics_url())
    }

    fn endpoint_of(&self, url: Option<&str>) -> Result<Option<Endpoint>, String> {
        let Some(url) = url else {
            return Ok(None);
        };
        let endpoint = if self.cluster {
            Endpoint::cluster(url)
        } else {
            Endpoint::single(url)
        };
        let (ca_file, client_cert, client_key) = (
            file(&self.ca_file),
            file(&self.client_cert),
            file(&self.client_key),
        );
        if client_cert.is_some() != client_key.is_some() {
            return Err(
                "REDIS_CLIENT_CERT and REDIS_CLIENT_KEY go together: set both or neither".into(),
            );
        }
        let tls_files = ca_file.is_some() || client_cert.is_some();
        if !endpoint.is_tls() {
            if tls_files {
                return Err("REDIS_CA_FILE, REDIS_CLIENT_CERT and REDIS_CLIENT_KEY apply to a rediss:// (TLS) REDIS_URL; REDIS_URL is not one".into());
            }
            return Ok(Some(endpoint));
        }
        if url
            .split(',')
            .any(|node| !node.trim().is_empty() && !is_tls_url(node))
        {
            return Err(
                "REDIS_URL mixes rediss:// (TLS) and plain nodes: use rediss:// for every node"
                    .into(),
            );
        }
        #[cfg(not(feature = "tls"))]
        return Err(crate::redis::NO_TLS.into());
        #[cfg(feature = "tls")]
        {
            use crate::redis::TlsFiles;
            if !tls_files {
                return Ok(Some(endpoint));
            }
            let named = |var: &'static str| move |err: String| format!("invalid {var}: {err}");
            let ca = ca_file
                .map(TlsFiles::read_certificates)
                .transpose()
                .map_err(named("REDIS_CA_FILE"))?;
            let client = match (client_cert, client_key) {
                (Some(cert), Some(key)) => Some((
                    TlsFiles::read_certificates(cert).map_err(named("REDIS_CLIENT_CERT"))?,
                    TlsFiles::read_key(key).map_err(named("REDIS_CLIENT_KEY"))?,
                )),
                _ => None,
            };
            Ok(Some(endpoint.with_tls(TlsFiles { ca, client })))
        }
    }
}

/// The Kafka event stream; unset brokers keep the in-process stream.
#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Bootstrap servers, comma-separated; unset or empty keeps the in-process stream.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        value_name = "KAFKA_BROKERS"
    )]
    pub brokers: Option<String>,
    #[arg(
        long = "kafka-topic",
        env = "KAFKA_TOPIC",
        value_name = "KAFKA_TOPIC",
        default_value = "rate-limit-events"
    )]
    pub topic: String,
    #[arg(
        long = "kafka-group-id",
        env = "KAFKA_GROUP_ID",
        value_name = "KAFKA_GROUP_ID",
        default_value = "analytics-worker"
    )]
    pub group_id: String,
    /// Partitions of the topic when it is created at start-up.
    #[arg(long = "kafka-partitions", env = "KAFKA_PARTITIONS", value_name = "KAFKA_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// Replication factor of the topic when it is created at start-up.
    #[arg(long = "kafka-replication", env = "KAFKA_REPLICATION", value_name = "KAFKA_REPLICATION", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=32))]
    pub replication: i32,
    /// Events the producer holds while the broker is unreachable; past it events are dropped.
    #[arg(long = "kafka-producer-buffer", env = "KAFKA_PRODUCER_BUFFER", value_name = "KAFKA_PRODUCER_BUFFER", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub producer_buffer: u64,
    /// Bytes of events the producer holds while the broker is unreachable (keys and
    /// payloads); past it events are dropped, counted and logged like past the count.
    #[arg(long = "kafka-producer-buffer-bytes", env = "KAFKA_PRODUCER_BUFFER_BYTES", value_name = "KAFKA_PRODUCER_BUFFER_BYTES",
          default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024 * 1024..=2 * 1024 * 1024 * 1024 - 1024))]
    pub producer_buffer_bytes: u64,
}

impl KafkaArgs {
    pub fn brokers(&self) -> Option<&str> {
        self.brokers
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty())
    }

    /// Any librdkafka setting, passed through from `RDKAFKA_<NAME>` variables:
    /// `RDKAFKA_SECURITY_PROTOCOL=SASL_SSL` sets `security.protocol` (lower-cased, `_` -> `.`).
    pub fn passthrough(&self) -> BTreeMap<String, String> {
        passthrough_from(std::env::vars())
    }
}

fn passthrough_from(vars: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.filter_map(|(k, v)| {
        let name = k.strip_prefix("RDKAFKA_")?;
        (!name.is_empty()).then(|| (name.to_ascii_lowercase().replace('_', "."), v))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Serve {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn slow_client_limits_have_defaults_and_bounds() {
        let limits = Serve::try_parse_from(["x"]).unwrap().serve.limits();
        assert_eq!(limits.header_timeout, std::time::Duration::from_secs(5));
        assert_eq!(limits.body_timeout, std::time::Duration::from_secs(5));
        assert_eq!(limits.send_timeout, std::time::Duration::from_secs(30));
        assert_eq!(limits.max_connections, 10_000);
        assert_eq!(limits.max_in_flight, 4096);
        for (flag, variable) in [
            ("--header-timeout-ms", "HEADER_TIMEOUT_MS"),
            ("--body-timeout-ms", "BODY_TIMEOUT_MS"),
            ("--send-timeout-ms", "SEND_TIMEOUT_MS"),
            ("--max-connections", "MAX_CONNECTIONS"),
        ] {
            for bad in ["0", "-1", "5s", "2000000"] {
                let err = Serve::try_parse_from(["x", &format!("{flag}={bad}")]).unwrap_err();
                assert!(err.to_string().contains(variable), "{flag} {bad}: {err}");
            }
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("15m"),
            Ok(std::time::Duration::from_secs(900))
        );
        assert_eq!(
            parse_duration("24h"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_duration("2d"),
            Ok(std::time::Duration::from_secs(172_800))
        );
        for bad in ["", "m", "15", "0m", "-1h", "1.5h", "1w", "h1"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[derive(Parser, Debug)]
    struct RedisCfg {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn redis(args: &[&str]) -> Result<Option<Endpoint>, String> {
        let argv = std::iter::once("x").chain(args.iter().copied());
        RedisCfg::try_parse_from(argv).unwrap().redis.endpoint()
    }

    #[test]
    fn tls_urls_are_told_by_their_scheme() {
        for url in [
            "rediss://h:6379",
            "REDISS://h",
            " valkeys://h",
            "rediss://u:p@h/0",
        ] {
            assert!(is_tls_url(url), "{url}");
        }
        for url in [
            "redis://h:6379",
            "redis://rediss/",
            "unix:///tmp/redis.sock",
            "",
        ] {
            assert!(!is_tls_url(url), "{url}");
        }
        assert!(redis(&[]).unwrap().is_none());
        let plain = redis(&["--redis-url", "redis://:pw@127.0.0.1:6379/"]).unwrap();
        assert!(!plain.unwrap().is_tls());
    }

    /// A CA file or client certificate beside a plain URL is a mistake (a forgotten `s`),
    /// not something to ignore; so is a cluster whose nodes disagree.
    #[test]
    fn tls_settings_need_a_rediss_url_on_every_node() {
        let err = redis(&[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-ca-file",
            "/ca.pem",
        ])
        .err()
        .unwrap();
        assert!(
            err.contains("REDIS_CA_FILE") && err.contains("rediss://"),
            "{err}"
        );
        let err = redis(&[
            "--redis-cluster",
            "true",
            "--redis-url",
            "rediss://127.0.0.1:7000,redis://127.0.0.1:7001",
        ])
        .err()
        .unwrap();
        assert!(err.contains("REDIS_URL") && err.contains("mixes"), "{err}");
    }

    /// A client certificate needs its key and the key its certificate; an empty value is
    /// unset, as `.env` writes it.
    #[test]
    fn a_client_certificate_needs_its_key_and_the_key_its_certificate() {
        let url = "rediss://127.0.0.1:6379";
        for given in [
            ["--redis-client-cert", "/a.pem", "--redis-client-key", ""],
            ["--redis-client-key", "/a.pem", "--redis-client-cert", " "],
        ] {
            let mut args = vec!["--redis-url", url];
            args.extend(given);
            let err = redis(&args).err().unwrap();
            assert!(
                err.contains("REDIS_CLIENT_CERT and REDIS_CLIENT_KEY go together"),
                "{err}"
            );
        }
        let empty = [
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-ca-file",
            "",
            "--redis-client-cert",
            "",
            "--redis-client-key",
            "",
        ];
        assert!(redis(&empty).unwrap().is_some());
    }

    /// A build without the `tls` feature (the embedded default) refuses `rediss://` at
    /// start-up, saying how to get a build that has it.
    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_tls_support_a_rediss_url_is_refused() {
        let err = redis(&["--redis-url", "rediss://127.0.0.1:6379"])
            .err()
            .unwrap();
        assert_eq!(err, crate::redis::NO_TLS);
        let endpoint = Endpoint::single("rediss://127.0.0.1:6379");
        let err = crate::redis::connect(&endpoint, std::time::Duration::from_secs(1)).err();
        assert_eq!(err.unwrap().to_string(), crate::redis::NO_TLS);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn with_tls_support_a_rediss_url_without_files_trusts_the_system_roots() {
        let endpoint = redis(&["--redis-url", "rediss://127.0.0.1:6379"]).unwrap();
        assert!(endpoint.unwrap().is_tls());
    }

    #[test]
    fn passthrough_maps_names() {
        let vars = [
            ("RDKAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("RDKAFKA_SASL_USERNAME", "me"),
            ("RDKAFKA_", "ignored"),
            ("OTHER", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let map = passthrough_from(vars);
        assert_eq!(map.len(), 2);
        assert_eq!(map["security.protocol"], "SASL_SSL");
        assert_eq!(map["sasl.username"], "me");
    }
}
