//! The event-stream seam: how the limiter hands decisions to analytics.
//!
//! [`EventPublisher`] is what the limiter calls on every decision; it must never block or
//! slow the answer. Its implementations live elsewhere: the in-process channel in the
//! service kit, the Kafka producer with the rate limiter.

use std::time::Duration;

use async_trait::async_trait;

use crate::RateLimitEvent;

/// Counters every publisher keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Events accepted for delivery.
    pub published: u64,
    /// Events dropped because the buffer was full (or the stream closed).
    pub dropped: u64,
    /// Events accepted but not yet delivered.
    pub buffered: u64,
}

/// Hands decision events to the analytics stream.
#[async_trait]
pub trait EventPublisher: Send + Sync + 'static {
    /// Enqueues `event` without waiting. When the buffer is full the event is dropped and
    /// counted; this never blocks.
    fn publish(&self, event: RateLimitEvent);

    fn stats(&self) -> PublisherStats;

    /// Waits (at most `timeout`) until everything published so far has been delivered.
    /// Returns whether it was.
    async fn flush(&self, timeout: Duration) -> bool;
}
