//! Counter stores: per-user totals (allowed, blocked), applied exactly once.
//!
//! One trait, two implementations (memory for the embedded default, Redis shared by every
//! worker and read by the gateway), one contract suite ([`contract`]) that both pass.
//!
//! Exactly once: a batch read from a Kafka partition carries each event's offset. Every
//! user's counters remember, per partition, the last offset already counted, and a batch
//! is applied to a user only past that offset, atomically with the increments. Replaying
//! events after a crash (offsets not yet committed) therefore counts nothing twice, and
//! since the offset lives in the user's own key this holds on Redis Cluster too.

pub mod contract;
mod memory;
mod redis;

use async_trait::async_trait;
use ratelimit_core::RateLimitEvent;
use ratelimit_core::api::UserAnalytics;

pub use self::memory::MemoryCounters;
pub use self::redis::RedisCounters;

/// Events of one stream partition in offset order.
#[derive(Debug, Clone, Default)]
pub struct PartitionBatch {
    /// The partition the offsets belong to; `None` for a stream that never replays (the
    /// in-process channel), whose events are applied without an offset check.
    pub partition: Option<i32>,
    pub events: Vec<(i64, RateLimitEvent)>,
}

/// Why counters could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("counter store call timed out")]
    Timeout,
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    #[error("counter store answered unexpectedly: {0}")]
    Protocol(String),
}

/// A user's increments within one batch, and the offsets they span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub first_offset: i64,
    pub last_offset: i64,
    pub allowed: u64,
    pub blocked: u64,
}

/// Sums a batch per user, counting only events past `floor(user)` (the offset already applied).
pub(crate) fn tally<'a>(
    events: impl IntoIterator<Item = &'a (i64, RateLimitEvent)>,
    floor: impl Fn(&str) -> Option<i64>,
) -> Vec<(&'a str, Tally)> {
    let mut per_user: std::collections::HashMap<&'a str, Tally> = std::collections::HashMap::new();
    for (offset, event) in events {
        if floor(&event.user_id).is_some_and(|applied| *offset <= applied) {
            continue;
        }
        let t = per_user.entry(event.user_id.as_str()).or_insert(Tally {
            first_offset: *offset,
            last_offset: *offset,
            allowed: 0,
            blocked: 0,
        });
        t.first_offset = t.first_offset.min(*offset);
        t.last_offset = t.last_offset.max(*offset);
        if event.allowed {
            t.allowed += 1;
        } else {
            t.blocked += 1;
        }
    }
    per_user.into_iter().collect()
}

#[async_trait]
pub trait CounterStore: Send + Sync + 'static {
    /// Counts `batch`, skipping for each user what that user's counters already include.
    async fn apply(&self, batch: &PartitionBatch) -> Result<(), CounterError>;

    /// A user's counters; zeros for a user never seen.
    async fn get(&self, user_id: &str) -> Result<UserAnalytics, CounterError>;

    async fn ping(&self) -> Result<(), CounterError>;
}
