//! The domain shared by every service of the distributed rate limiter.
//!
//! - [`bucket`]: the token-bucket policy and the pure decision function.
//! - [`clock`]: injectable time, so the algorithm never reads the wall clock itself.
//! - [`event`]: the `RateLimitEvent` every decision emits, and its wire encoding.
//! - [`stream`]: the event-publisher seam and its in-process (channel) implementation.
//! - [`kafka`]: Kafka client settings and topic creation, shared by producer and consumer.
//! - [`keys`]: Redis key names, injective per user and hash-tagged for Redis Cluster.
//! - [`api`]: the JSON wire types and the validation of what clients send.
//! - [`http`]: axum pieces shared by the HTTP services (strict JSON extractor, error bodies).
//! - [`config`]: configuration sections read from `.env` and the environment.
//! - [`metrics`]: the Prometheus recorder, `/metrics` rendering, HTTP request metrics.
//! - [`redis`]: the Redis connection and deadline both Redis stores use.
//! - [`runtime`]: logging set-up and the one shutdown signal.

pub mod api;
pub mod bucket;
pub mod clock;
pub mod config;
pub mod event;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod keys;
pub mod metrics;
pub mod redis;
pub mod report;
pub mod runtime;
pub mod stream;

pub use bucket::{BucketState, Decision, Policy, Quota};
pub use clock::{Clock, ManualClock, SystemClock};
pub use event::RateLimitEvent;
