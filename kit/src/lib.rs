//! The service kit: what every service of the distributed rate limiter runs on, apart from
//! the domain itself (`domain`).
//!
//! - [`http`]: the HTTP side shared by the services: one error type, the strict JSON
//!   extractor, the router's layers (load shedding, bodies read first, the liveness
//!   probe), and the server (a listener and a handler per connection).
//! - [`metrics`]: the Prometheus recorder, `/metrics` rendering, HTTP request metrics.
//! - [`config`]: configuration sections read from `.env` and the environment.
//! - [`redis`]: where Redis is ([`redis::Endpoint`]: single or Cluster, AUTH in the URL,
//!   `rediss://` TLS with the `tls` feature), the connection, calls under a deadline, and
//!   the one place Lua scripts are loaded and reloaded after `NOSCRIPT`.
//! - [`kafka`]: Kafka client settings and topic creation (the `kafka` feature).
//! - [`stream`]: the in-process event stream (a bounded channel).
//! - [`report`]: the status reports every instance writes for a standalone gateway.
//! - [`expiring`]: a bounded map of entries that hold until a deadline (the refusal caches).
//! - [`runtime`]: logging set-up, the instance id and the one shutdown signal.
//! - [`every`]: the periodic loop of every background task, until shutdown.
//! - [`admin`]: the admin token and its constant-time check.
//! - [`ids`]: ids unique across processes (store calls, the gateway's batches).

pub mod admin;
pub mod config;
pub mod every;
pub mod expiring;
pub mod http;
pub mod ids;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod redis;
pub mod report;
pub mod runtime;
pub mod stream;
