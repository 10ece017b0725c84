//! Events held in doubt: with the outbox, a decision whose Redis call timed out is answered
//! by the fail-open fallback, but Redis may have run the call anyway (slow, not gone) and
//! appended the call's own event to the outbox. Publishing the fallback's event as well
//! would count one answer twice; dropping it would lose the answer if Redis never ran the
//! call. So the event is held here until the store settles the call
//! ([`BucketStore::settle`]: ran, and the outbox has its event; or not, and now never
//! will), and published only if it did not run.
//!
//! A call that ran may have decided otherwise than the fallback answered (Redis refused
//! what the fallback allowed, or the reverse): its event in the outbox then counts the
//! request as Redis decided it, not as it was answered. The total stays exact; such
//! events are counted in `recorded_otherwise` (`ratelimit_events_recorded_otherwise_total`).
//!
//! Bounded: at most [`HELD`] events wait; past that an event is published at once (the
//! old risk, a double count, rather than a loss), counted in `overflowed`. Held events
//! live in this process: a limiter that dies while Redis is away loses them, as it loses
//! what its Kafka producer holds (the README's failure table).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use domain::RateLimitEvent;
use domain::store::{BucketStore, Ticket};
use kit::stream::EventPublisher;
use tokio::sync::mpsc;

/// How many events may wait for their calls to be settled.
pub const HELD: usize = 100_000;
/// How many calls one settle asks after.
const BATCH: usize = 1024;
/// The first wait before asking again while the store does not answer, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What became of the events held so far.
#[derive(Debug, Default)]
pub struct SettleStats {
    /// Held, and published once the store said it had not run the call.
    pub published: AtomicU64,
    /// Held, and dropped once the store said it ran the call (its outbox holds the event).
    pub recorded: AtomicU64,
    /// Of `recorded`, those whose call the store decided otherwise than the fallback
    /// answered: counted in the analytics as the store decided.
    pub recorded_otherwise: AtomicU64,
    /// Published without waiting, the holding space being full.
    pub overflowed: AtomicU64,
}

/// The holder of events in doubt: a bounded queue and the task that settles it.
pub struct Settler {
    tx: mpsc::Sender<(Ticket, RateLimitEvent)>,
    publisher: Arc<dyn EventPublisher>,
    stats: Arc<SettleStats>,
}

impl Settler {
    /// A settler asking `store`, publishing to `publisher`, its task spawned on the
    /// current runtime (it ends when the settler is dropped, after what it holds).
    pub fn spawn(store: Arc<dyn BucketStore>, publisher: Arc<dyn EventPublisher>) -> Self {
        let (tx, rx) = mpsc::channel(HELD);
        let stats = Arc::new(SettleStats::default());
        tokio::spawn(settle_loop(rx, store, publisher.clone(), stats.clone()));
        Self {
            tx,
            publisher,
            stats,
        }
    }

    /// Holds `event` until the call of `ticket` is settled.
    pub fn hold(&self, ticket: Ticket, event: RateLimitEvent) {
        if let Err(err) = self.tx.try_send((ticket, event)) {
            let (_, event) = err.into_inner();
            self.stats.overflowed.fetch_add(1, Ordering::Relaxed);
            self.publisher.publish(event);
        }
    }

    pub fn stats(&self) -> &SettleStats {
        &self.stats
    }

    /// Events waiting now.
    pub fn held(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Settles what is held, a batch at a time, asking again (with a growing wait) while the
/// store does not answer: an event leaves only settled.
async fn settle_loop(
    mut rx: mpsc::Receiver<(Ticket, RateLimitEvent)>,
    store: Arc<dyn BucketStore>,
    publisher: Arc<dyn EventPublisher>,
    stats: Arc<SettleStats>,
) {
    let mut held = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut held, BATCH).await > 0 {
        let (tickets, events): (Vec<Ticket>, Vec<RateLimitEvent>) = held.drain(..).unzip();
        let mut wait = RETRY_FIRST;
        let ran = loop {
            match store.settle(&tickets).await {
                Ok(ran) if ran.len() == tickets.len() => break ran,
                Ok(ran) => tracing::warn!(
                    asked = tickets.len(),
                    answered = ran.len(),
                    "settle answered the wrong number of calls; asking again"
                ),
                Err(err) => tracing::debug!(error = %err, "cannot settle held events yet"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        };
        for (event, ran) in events.into_iter().zip(ran) {
            match ran {
                Some(allowed) => {
                    stats.recorded.fetch_add(1, Ordering::Relaxed);
                    if allowed != event.allowed {
                        stats.recorded_otherwise.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    publisher.publish(event);
                }
            }
        }
    }
}
