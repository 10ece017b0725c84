//! The in-process event stream: a bounded channel from a limiter to a worker of the same
//! process (the embedded default), and the drop counter every publisher shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use domain::RateLimitEvent;
pub use domain::stream::{EventPublisher, PublisherStats};
use tokio::sync::mpsc;

/// Counts dropped events and logs the first drop and then every 1,000th, so a flood of
/// drops does not flood the log.
#[derive(Debug, Default)]
pub struct DropCounter(AtomicU64);

impl DropCounter {
    pub fn drop_one(&self, reason: &str) {
        let dropped = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 || dropped.is_multiple_of(1000) {
            tracing::warn!(dropped_total = dropped, reason, "decision event dropped");
        }
    }

    /// Events dropped so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The in-process stream: a bounded channel into the analytics worker of the same process.
#[derive(Clone)]
pub struct ChannelPublisher {
    tx: mpsc::Sender<RateLimitEvent>,
    published: Arc<AtomicU64>,
    dropped: Arc<DropCounter>,
}

/// The receiving end of [`channel`], read by the analytics worker.
pub type ChannelReceiver = mpsc::Receiver<RateLimitEvent>;

/// A bounded in-process stream holding at most `capacity` undelivered events.
pub fn channel(capacity: usize) -> (ChannelPublisher, ChannelReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        ChannelPublisher {
            tx,
            published: Arc::default(),
            dropped: Arc::default(),
        },
        rx,
    )
}

#[async_trait]
impl EventPublisher for ChannelPublisher {
    fn publish(&self, event: RateLimitEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped.drop_one("buffer full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.dropped.drop_one("stream closed"),
        }
    }

    fn stats(&self) -> PublisherStats {
        PublisherStats {
            published: self.published.load(Ordering::Relaxed),
            dropped: self.dropped.get(),
            buffered: (self.tx.max_capacity() - self.tx.capacity()) as u64,
        }
    }

    async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.tx.capacity() < self.tx.max_capacity() && !self.tx.is_closed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// A publisher that delivers nowhere, for tests and tools that make decisions only.
#[derive(Debug, Default)]
pub struct NullPublisher;

#[async_trait]
impl EventPublisher for NullPublisher {
    fn publish(&self, _event: RateLimitEvent) {}

    fn stats(&self) -> PublisherStats {
        PublisherStats::default()
    }

    async fn flush(&self, _timeout: Duration) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str) -> RateLimitEvent {
        RateLimitEvent::new(user, true, 0, "t")
    }

    #[tokio::test]
    async fn full_channel_drops_and_counts_without_blocking() {
        let (tx, mut rx) = channel(2);
        for i in 0..5 {
            tx.publish(event(&i.to_string()));
        }
        assert_eq!(
            tx.stats(),
            PublisherStats {
                published: 2,
                dropped: 3,
                buffered: 2
            }
        );
        assert!(!tx.flush(Duration::from_millis(20)).await);
        assert_eq!(rx.recv().await.unwrap().user_id, "0");
        assert_eq!(rx.recv().await.unwrap().user_id, "1");
        assert!(tx.flush(Duration::from_millis(20)).await);
    }
}
