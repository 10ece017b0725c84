//! Counting decisions, shared by the services that do it: the analytics worker (events
//! from Kafka) and a rate limiter without Kafka (events from its in-process stream), and
//! the read side the gateway uses.
//!
//! - [`MemoryCounters`] and [`RedisCounters`]: the two implementations of
//!   [`domain::analytics::CounterStore`]; [`RedisAnalytics`] is the read-only
//!   side of the Redis one (no Lua script), what a standalone gateway links.
//! - [`source`]: where events come from (the in-process channel; a Kafka consumer group
//!   with the `kafka` feature).
//! - [`worker`]: the loop: batch, count exactly once, commit.
//! - `contract` (the `testsuite` feature): the suite every counter store passes.

#[cfg(any(test, feature = "testsuite"))]
pub mod contract;
mod memory;
mod redis;
pub mod source;
mod tally;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use domain::analytics::{AnalyticsReader, CounterStore};
use kit::config::{RedisSettings, WorkerArgs};
use kit::redis::Endpoint;

pub use self::memory::MemoryCounters;
pub use self::redis::{RedisAnalytics, RedisCounters};
use self::worker::WorkerStats;

/// Batches are bigger than one decision: they get more than a decision's deadline.
const BATCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The counter store the settings ask for: in the analytics Redis when there is one, else
/// in memory. `max_users` bounds the in-memory counters; `retention` is how long the
/// per-minute series are kept.
pub fn counter_store(
    redis: &RedisSettings,
    worker: &WorkerArgs,
) -> anyhow::Result<Arc<dyn CounterStore>> {
    let retention = worker.retention.retention;
    Ok(match &redis.analytics {
        Some(endpoint) => Arc::new(RedisCounters::new(
            endpoint,
            &redis.key_prefix,
            redis.slow_timeout(BATCH_TIMEOUT),
            retention,
            worker.user_ttl,
        )?),
        None => Arc::new(MemoryCounters::new(worker.max_users as usize, retention)),
    })
}

/// The read side of the counters in Redis at `endpoint`, for a standalone gateway.
pub fn redis_reader(
    endpoint: &Endpoint,
    redis: &RedisSettings,
) -> anyhow::Result<Arc<dyn AnalyticsReader>> {
    Ok(Arc::new(RedisAnalytics::new(
        endpoint,
        &redis.key_prefix,
        redis.slow_timeout(BATCH_TIMEOUT),
    )?))
}

/// A worker running in the background of this process.
pub struct SpawnedWorker {
    pub stats: Arc<WorkerStats>,
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl SpawnedWorker {
    /// Counts `source` into `store` until [`SpawnedWorker::stop`].
    pub fn spawn(
        source: Box<dyn source::EventSource>,
        store: Arc<dyn CounterStore>,
        batch_max: usize,
    ) -> Self {
        Self::spawn_with_stats(source, store, batch_max, Arc::default())
    }

    fn spawn_with_stats(
        source: Box<dyn source::EventSource>,
        store: Arc<dyn CounterStore>,
        batch_max: usize,
        stats: Arc<WorkerStats>,
    ) -> Self {
        let batch_max = store
            .batch_cap()
            .map_or(batch_max, |cap| batch_max.min(cap));
        let stop = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(worker::run(
            source,
            store,
            stats.clone(),
            batch_max,
            stop.clone(),
        ));
        Self {
            stats,
            stop,
            handle,
        }
    }

    /// Counts the in-process stream of a limiter in the same process.
    pub fn in_process(
        events: kit::stream::ChannelReceiver,
        store: Arc<dyn CounterStore>,
        batch_max: usize,
    ) -> Self {
        Self::spawn(
            Box::new(source::ChannelSource::new(events)),
            store,
            batch_max,
        )
    }

    #[cfg(feature = "kafka")]
    /// Joins the Kafka consumer group and counts the topic.
    pub fn kafka(
        kafka: &kit::config::KafkaArgs,
        brokers: &str,
        store: Arc<dyn CounterStore>,
        batch_max: usize,
    ) -> anyhow::Result<Self> {
        // The limiter creates the topic too; whoever starts first does it.
        kit::kafka::ensure_topic(kafka, brokers, tokio_util::sync::CancellationToken::new());
        let source = source::KafkaSource::new(kafka, brokers)?;
        tracing::info!(
            topic = kafka.topic,
            group = kafka.group_id,
            "analytics worker joined the consumer group"
        );
        let stats = Arc::new(WorkerStats {
            partitions: source.assignment(),
            lag: source.lag(),
            ..WorkerStats::default()
        });
        Ok(Self::spawn_with_stats(
            Box::new(source),
            store,
            batch_max,
            stats,
        ))
    }

    /// Counts what the source still holds without waiting, commits, and stops. For the
    /// in-process stream, call it after the limiter has stopped deciding and flushed.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::RateLimitEvent;
    use kit::stream::EventPublisher;
    use std::sync::atomic::Ordering;

    /// The in-memory counters take at most `MEMORY_BATCH_MAX` events a batch, whatever the
    /// worker's own limit: 12,000 waiting events are counted in at least three batches.
    #[tokio::test]
    async fn the_memory_store_caps_the_batch() {
        let (tx, rx) = kit::stream::channel(20_000);
        for i in 0..12_000 {
            tx.publish(RateLimitEvent::new(format!("u{}", i % 100), true, 0, "t"));
        }
        let store = Arc::new(MemoryCounters::new(1_000, Duration::from_secs(3600)));
        let worker = SpawnedWorker::in_process(rx, store, 50_000);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while worker.stats.events.load(Ordering::Relaxed) < 12_000 {
            assert!(std::time::Instant::now() < deadline, "not all counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let batches = worker.stats.batches.load(Ordering::Relaxed);
        assert!(batches >= 3, "12,000 events in {batches} batches");
    }
}
