//! Counting decisions, shared by the services that do it: the analytics worker (events
//! from Kafka) and a rate limiter without Kafka (events from its in-process stream), and
//! the read side the gateway uses.
//!
//! - [`MemoryCounters`] and [`RedisCounters`]: the two implementations of
//!   [`ratelimit_domain::analytics::CounterStore`]; [`RedisAnalytics`] is the read-only
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

use ratelimit_domain::analytics::{AnalyticsReader, CounterStore};
use service_kit::config::{RedisArgs, WorkerArgs};

pub use self::memory::MemoryCounters;
pub use self::redis::{RedisAnalytics, RedisCounters};
use self::worker::WorkerStats;

/// Batches are bigger than one decision: they get more than a decision's deadline.
fn batch_timeout(redis: &RedisArgs) -> Duration {
    Duration::from_millis(redis.timeout_ms).max(Duration::from_secs(2))
}

/// The counter store the configuration asks for: Redis when `REDIS_URL` is set, else memory.
/// `max_users` bounds the in-memory counters; `retention` is how long the per-minute
/// series are kept.
pub fn counter_store(
    redis: &RedisArgs,
    worker: &WorkerArgs,
) -> anyhow::Result<Arc<dyn CounterStore>> {
    let retention = worker.retention.retention;
    Ok(
        match redis.analytics_endpoint().map_err(anyhow::Error::msg)? {
            Some(endpoint) => Arc::new(RedisCounters::new(
                &endpoint,
                &redis.key_prefix,
                batch_timeout(redis),
                retention,
                worker.user_ttl,
            )?),
            None => Arc::new(MemoryCounters::new(worker.max_users as usize, retention)),
        },
    )
}

/// Most events the in-memory counters take in one batch, whatever `ANALYTICS_BATCH_MAX`
/// says: they count on the runtime's own threads, beside the requests, so a batch stays
/// short (a millisecond or so) rather than hold a thread while 50,000 events are added up.
pub const MEMORY_BATCH_MAX: usize = 5_000;

/// The batch size for counting into `redis`'s store: `worker.batch_max`, at most
/// [`MEMORY_BATCH_MAX`] for the in-memory counters.
pub fn batch_max(redis: &RedisArgs, worker: &WorkerArgs) -> usize {
    match redis.analytics_endpoint() {
        Ok(Some(_)) => worker.batch_max as usize,
        _ => (worker.batch_max as usize).min(MEMORY_BATCH_MAX),
    }
}

/// The read side of the counters in Redis at `REDIS_URL`, for a standalone gateway.
pub fn redis_reader(redis: &RedisArgs) -> anyhow::Result<Option<Arc<dyn AnalyticsReader>>> {
    Ok(
        match redis.analytics_endpoint().map_err(anyhow::Error::msg)? {
            Some(endpoint) => Some(Arc::new(RedisAnalytics::new(
                &endpoint,
                &redis.key_prefix,
                batch_timeout(redis),
            )?)),
            None => None,
        },
    )
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
        events: service_kit::stream::ChannelReceiver,
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
        kafka: &service_kit::config::KafkaArgs,
        brokers: &str,
        store: Arc<dyn CounterStore>,
        batch_max: usize,
    ) -> anyhow::Result<Self> {
        // The limiter creates the topic too; whoever starts first does it.
        service_kit::kafka::ensure_topic(
            kafka,
            brokers,
            tokio_util::sync::CancellationToken::new(),
        );
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
