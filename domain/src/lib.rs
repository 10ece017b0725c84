//! The domain of the distributed rate limiter, with no I/O: every service depends on it,
//! and it depends on no runtime, no network client and no server framework.
//!
//! - [`bucket`]: the token-bucket policy and the pure decision function.
//! - [`clock`]: injectable time, so the algorithm never reads the wall clock itself.
//! - [`event`]: the `RateLimitEvent` every decision emits, and its wire encoding.
//! - [`keys`]: Redis key names, injective per user and hash-tagged for Redis Cluster.
//! - [`api`]: the JSON wire types and the validation of what clients send.
//! - [`headers`]: the rate-limit header fields of a decision (IETF draft, or the older trio).
//!
//! The seams, each with an embedded and a real implementation elsewhere:
//! - [`store`]: `BucketStore`, where buckets live (memory, Redis).
//! - [`stream`]: `EventPublisher`, how decisions reach analytics (channel, Kafka).
//! - [`analytics`]: `CounterStore`, what the worker writes, and `AnalyticsReader`, the
//!   read-only side the gateway uses (memory, Redis).

pub mod analytics;
pub mod api;
pub mod bucket;
pub mod clock;
pub mod descriptor;
pub mod event;
pub mod headers;
pub mod keys;
pub mod limits;
pub mod rules;
pub mod store;
pub mod stream;

pub use bucket::{BucketState, Decision, Policy, Quota};
pub use clock::{Clock, ManualClock, SystemClock};
pub use event::RateLimitEvent;
