//! The domain of the distributed rate limiter, with no I/O: every service depends on it,
//! and it depends on no runtime, no network client and no server framework.
//!
//! - [`bucket`]: the token-bucket policy and the pure decision function.
//! - [`clock`]: injectable time, so the algorithm never reads the wall clock itself.
//! - [`event`]: the `RateLimitEvent` every decision emits, and its wire encoding.
//! - [`keys`]: Redis key names, injective per user and hash-tagged for Redis Cluster.
//! - [`api`]: the JSON wire types and the validation of what clients send.
//! - [`headers`]: the rate-limit header fields of a decision (IETF draft, or the older trio).
//! - [`limits`]: limits of every algorithm (one file each) and the all-or-nothing decision
//!   over the limits of one request.
//! - [`rules`]: the rules files: descriptors matched to limits, as envoyproxy/ratelimit
//!   reads them, validated and bounded.
//! - [`descriptor`]: a request's domain and descriptors (ordered key=value entries).
//!
//! The seams, each with an embedded and a real implementation elsewhere:
//! - [`store`]: `BucketStore`, where buckets live (memory, Redis).
//! - [`stream`]: `EventPublisher`, how decisions reach analytics (channel, Kafka).
//! - [`analytics`]: `CounterStore`, what the worker writes, and `AnalyticsReader`, the
//!   read-only side the gateway uses (memory, Redis).

//! # One request's results, from the store out
//!
//! | type | where | what it is |
//! |---|---|---|
//! | [`Decision`] | [`bucket`] | one token bucket's answer: allowed or limited, with its [`Quota`] |
//! | [`limits::LimitOutcome`] | [`limits`] | one limit's part in a decision (admits, quota, retry) |
//! | [`limits::Outcome`] | [`limits`] | the decision over every limit of one request |
//! | [`store::Decided`] | [`store`] | a store's answer for one request: an `Outcome`, or why none |
//! | `Verdict` | rate-limiter `resilience` | who decided: the store, the fail-open fallback, or nobody |
//! | `Checked` | rate-limiter `limiter` | the limiter's decision with its limits, as it publishes and answers it |
//! | [`api::CheckResponse`] | [`api`] | that decision on the wire (`POST /check`, each batch result) |
//! | [`api::CheckError`] | [`api`] | why a check got no decision, the same on both sides of the hop |

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
