//! The analytics seams: what the worker writes and what the gateway reads.
//!
//! [`CounterStore`] counts decision events exactly once (the analytics worker, and a
//! limiter that counts in-process); [`AnalyticsReader`] is its narrow read-only side, all
//! the gateway needs. The memory and Redis implementations live in the
//! `counters` crate.

use std::ops::RangeInclusive;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::RateLimitEvent;

/// A user's all-time counters, as `GET /analytics/:user_id` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAnalytics {
    pub user_id: String,
    pub total: u64,
    pub allowed: u64,
    pub blocked: u64,
}

/// Events of one dedup stream of one partition, in order: numbered by their offsets, or by
/// their publisher's sequence under its epoch.
#[derive(Debug, Clone, Default)]
pub struct PartitionBatch {
    /// The Kafka partition the events came from; `None` for the in-process stream.
    pub partition: Option<i32>,
    /// The dedup stream the numbers belong to, when not the partition's offsets: the
    /// publisher's epoch of stamped events ([`crate::event::Stamp`]), whose numbers are its
    /// sequence, so a topic recreated, offsets reset or a replay count each event once; or
    /// the in-process stream's identity (one per process, its offsets starting at 0 in
    /// every process), so a batch applied again after a timeout that had in fact applied it
    /// counts nothing twice. `None` with no partition: applied without a check.
    pub epoch: Option<String>,
    /// Each event with its number (offset or sequence), increasing.
    pub events: Vec<(i64, RateLimitEvent)>,
}

impl PartitionBatch {
    /// The events whose numbers move forward: a number met again in the batch (two relays
    /// that both sent one stretch of an outbox) is left out, so that it counts once. The
    /// batch itself when its numbers only increase, as they do but in that case.
    pub fn forward(&self) -> std::borrow::Cow<'_, [(i64, RateLimitEvent)]> {
        if self.events.windows(2).all(|w| w[0].0 < w[1].0) {
            return std::borrow::Cow::Borrowed(&self.events);
        }
        let mut last = i64::MIN;
        std::borrow::Cow::Owned(
            self.events
                .iter()
                .filter(|(number, _)| {
                    let forward = *number > last;
                    last = last.max(*number);
                    forward
                })
                .cloned()
                .collect(),
        )
    }
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

/// Milliseconds in a minute and in a day: the buckets of the time series.
pub const MINUTE_MS: u64 = 60_000;
pub const DAY_MS: u64 = 86_400_000;
/// Most users kept per minute and per day in a top-blocked set; past it the least blocked
/// are dropped, which bounds memory whatever the number of users.
pub const TOP_KEEP: usize = 1_000;
/// The top-blocked answer over a window covers at most its newest this-many minutes (a
/// day's top comes from the per-day sets instead).
pub const TOP_WINDOW_MINUTES: u64 = 60;

/// Allowed and blocked decisions within one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MinuteCounts {
    /// The minute's start, milliseconds since the Unix epoch.
    pub minute_ms: u64,
    pub allowed: u64,
    pub blocked: u64,
}

/// A user and how many of their requests were blocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedUser {
    pub user_id: String,
    pub blocked: u64,
}

/// One rule's counts since the counters began (or were last expired): requests it
/// admitted, refused, and would have refused in shadow mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RuleCounts {
    /// `<domain>:<limit name>`.
    pub rule: String,
    pub allowed: u64,
    pub blocked: u64,
    pub shadow_blocked: u64,
}

/// Most rules the per-rule counts keep (names come from the rules and overrides, which are
/// bounded; past this, new names are not counted).
pub const MAX_COUNTED_RULES: usize = 10_000;

#[async_trait]
pub trait AnalyticsReader: Send + Sync + 'static {
    /// Every rule's counts, most blocked first.
    async fn rule_counts(&self) -> Result<Vec<RuleCounts>, CounterError>;

    /// A user's all-time counters; zeros for a user never seen.
    async fn get(&self, user_id: &str) -> Result<UserAnalytics, CounterError>;

    /// A user's counts per minute over `minutes` (minute numbers, inclusive), zeros included.
    async fn user_series(
        &self,
        user_id: &str,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError>;

    /// Everyone's counts per minute over `minutes`, zeros included.
    async fn global_series(
        &self,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError>;

    /// The `n` users most blocked over `minutes` (at most the newest [`TOP_WINDOW_MINUTES`]).
    async fn top_blocked(
        &self,
        minutes: RangeInclusive<u64>,
        n: usize,
    ) -> Result<Vec<BlockedUser>, CounterError>;

    /// The `n` users most blocked on `day` (days since the epoch, UTC).
    async fn top_blocked_day(&self, day: u64, n: usize) -> Result<Vec<BlockedUser>, CounterError>;

    async fn ping(&self) -> Result<(), CounterError>;
}

/// Counts decision events, exactly once per user and per stream position.
#[async_trait]
pub trait CounterStore: AnalyticsReader {
    /// Counts `batch`, skipping for each user what that user's counters already include.
    async fn apply(&self, batch: &PartitionBatch) -> Result<(), CounterError>;

    /// The most events this store should take in one batch, whatever the worker's own
    /// limit (`ANALYTICS_BATCH_MAX`) allows; `None`: no limit of its own.
    fn batch_cap(&self) -> Option<usize> {
        None
    }
}
