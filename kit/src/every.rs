//! The one periodic loop of every background task (rules and overrides polled, buckets
//! swept, reports written, health and replicas refreshed): a tick every period until
//! shutdown, a late tick delayed rather than bunched.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Ticks every period until its shutdown token is cancelled.
///
/// ```ignore
/// let mut every = Every::new(POLL_INTERVAL, shutdown);
/// while every.tick().await {
///     poll().await;
/// }
/// ```
pub struct Every {
    interval: Interval,
    shutdown: CancellationToken,
}

impl Every {
    /// The first tick at once, then one every `period`.
    pub fn new(period: Duration, shutdown: CancellationToken) -> Self {
        Self::starting(Instant::now(), period, shutdown)
    }

    /// The first tick one `period` from now (for a task that has just done its work once).
    pub fn after(period: Duration, shutdown: CancellationToken) -> Self {
        Self::starting(Instant::now() + period, period, shutdown)
    }

    fn starting(start: Instant, period: Duration, shutdown: CancellationToken) -> Self {
        let mut interval = tokio::time::interval_at(start, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { interval, shutdown }
    }

    /// Waits for the next tick: `true`, or `false` once shutdown has begun (at once, even
    /// mid-wait).
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(40);

    #[tokio::test]
    async fn ticks_every_period_until_shutdown() {
        let shutdown = CancellationToken::new();
        let mut every = Every::new(PERIOD, shutdown.clone());
        let start = Instant::now();
        assert!(every.tick().await);
        assert!(every.tick().await);
        assert!(start.elapsed() >= PERIOD, "the second tick one period on");
        shutdown.cancel();
        let cancelled = Instant::now();
        assert!(!every.tick().await);
        assert!(
            cancelled.elapsed() < PERIOD,
            "shutdown ends the wait at once"
        );
    }

    #[tokio::test]
    async fn after_waits_one_period_first() {
        let mut every = Every::after(PERIOD, CancellationToken::new());
        let start = Instant::now();
        assert!(every.tick().await);
        assert!(start.elapsed() >= PERIOD);
    }
}
