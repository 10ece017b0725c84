//! What a decision stands on.
//!
//! - [`store`]: where limit states live (the `BucketStore` seam; memory and Redis), and the
//!   Redis outbox that records a decision's event in the step that decides it.
//! - [`resilience`]: the way to the store: the fail mode around the [`breaker`] around it.
//! - [`refusals`]: the refusal cache, refusals that still hold answered without the store.
//! - [`rules`]: the rules in force and their watcher; [`overrides`]: per-descriptor limits
//!   set through the admin API, behind their own seam (`OverrideStore`).
//! - [`kafka`]: the Kafka event publisher; [`relay`]: the outbox relay to Kafka;
//!   [`settle`]: the events of decisions whose outbox call is in doubt, held until settled.

pub mod breaker;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod overrides;
pub mod refusals;
#[cfg(feature = "kafka")]
pub mod relay;
pub mod resilience;
pub mod rules;
pub mod settle;
pub mod store;
