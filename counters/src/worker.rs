//! The worker loop: read a batch, count it exactly once, then commit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use metrics::Unit;
use tokio_util::sync::CancellationToken;

use crate::source::{EventSource, Record};
use domain::analytics::{CounterStore, PartitionBatch};

/// Describes the worker's metrics (help text and unit), once per process, after installing
/// the recorder. [`WorkerStats::export_metrics`], which records them, calls it first.
pub fn describe_metrics() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        kit::metrics::handle();
        metrics::describe_counter!(
            "analytics_events_applied_total",
            Unit::Count,
            "Valid decision events counted, replays the store recognised as already counted included"
        );
        metrics::describe_counter!(
            "analytics_poison_messages_total",
            Unit::Count,
            "Stream records that were not valid decision events, skipped"
        );
        metrics::describe_counter!(
            "analytics_batches_total",
            Unit::Count,
            "Batches of events applied to the counter store"
        );
        metrics::describe_counter!(
            "analytics_store_errors_total",
            Unit::Count,
            "Failed attempts to apply a batch to the counter store (each retried)"
        );
        metrics::describe_gauge!(
            "analytics_consumer_lag",
            Unit::Count,
            "Messages not yet consumed, per owned Kafka partition (librdkafka statistics, every 5 s)"
        );
    });
}

/// What the worker has done, for logs, metrics and tests.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Valid events counted (including replays the store recognised as already counted).
    pub events: AtomicU64,
    /// Records that were not valid events, skipped.
    pub poison: AtomicU64,
    /// Batches applied.
    pub batches: AtomicU64,
    /// Failed attempts to apply a batch (each retried).
    pub store_errors: AtomicU64,
    /// The stream partitions this worker owns (Kafka), shared with the consumer.
    pub partitions: crate::source::Assignment,
    /// Consumer lag per partition (Kafka), from the client's statistics.
    pub lag: crate::source::Lag,
}

impl WorkerStats {
    /// Total consumer lag over the owned partitions, if known.
    pub fn total_lag(&self) -> Option<i64> {
        let lag = self.lag.lock().expect("lag lock");
        (!lag.is_empty()).then(|| lag.values().map(|l| (*l).max(0)).sum())
    }

    /// Copies the worker's counters into the metrics registry (called before a scrape).
    pub fn export_metrics(&self) {
        describe_metrics();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metrics::counter!("analytics_events_applied_total").absolute(load(&self.events));
        metrics::counter!("analytics_poison_messages_total").absolute(load(&self.poison));
        metrics::counter!("analytics_batches_total").absolute(load(&self.batches));
        metrics::counter!("analytics_store_errors_total").absolute(load(&self.store_errors));
        for (partition, lag) in self.lag.lock().expect("lag lock").iter() {
            metrics::gauge!("analytics_consumer_lag", "partition" => partition.to_string())
                .set(*lag as f64);
        }
    }
}

/// Runs until the source ends or `shutdown`; at shutdown it drains what the source holds
/// without waiting, counts it, commits, and returns.
pub async fn run(
    mut source: Box<dyn EventSource>,
    store: Arc<dyn CounterStore>,
    stats: Arc<WorkerStats>,
    max_batch: usize,
    shutdown: CancellationToken,
) {
    loop {
        let records = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            records = source.next_batch(max_batch) => records,
        };
        let Some(records) = records else { return };
        if !process(source.as_mut(), &*store, &stats, records, &shutdown).await {
            return;
        }
    }
    loop {
        let records = source.drain(max_batch);
        if records.is_empty() {
            break;
        }
        // Shutting down already: one more failure and the rest is left for a replay.
        if !process(
            source.as_mut(),
            &*store,
            &stats,
            records,
            &CancellationToken::new(),
        )
        .await
        {
            break;
        }
    }
    tracing::info!(
        events = stats.events.load(Ordering::Relaxed),
        "analytics worker stopped"
    );
}

/// Counts `records` (retrying the store until it answers or `shutdown`) and commits them.
/// Returns false if it gave up because of `shutdown`.
async fn process(
    source: &mut dyn EventSource,
    store: &dyn CounterStore,
    stats: &WorkerStats,
    records: Vec<Record>,
    shutdown: &CancellationToken,
) -> bool {
    // One batch per partition and dedup stream: a stamped event is checked against its
    // publisher's epoch and numbered by its sequence, an unstamped one (an earlier build's)
    // by its offset as before, and the in-process stream's under the source's epoch.
    // Found by the borrowed epoch, from the last batch back (most records join the batch of
    // the one before), so the epoch is copied once per batch, not once per event.
    let mut batches: Vec<PartitionBatch> = Vec::new();
    let mut done: BTreeMap<i32, i64> = BTreeMap::new();
    for record in records {
        if let Some(partition) = record.partition {
            let last = done.entry(partition).or_insert(record.offset);
            *last = (*last).max(record.offset);
        }
        match record.event {
            Ok(event) => {
                let (epoch, number) = match (&event.stamp, record.partition) {
                    (Some(stamp), _) => (Some(stamp.epoch.as_str()), stamp.seq as i64),
                    (None, Some(_)) => (None, record.offset),
                    (None, None) => (source.epoch(), record.offset),
                };
                let of_record = |b: &PartitionBatch| {
                    b.partition == record.partition && b.epoch.as_deref() == epoch
                };
                let at = match batches.iter().rposition(of_record) {
                    Some(at) => at,
                    None => {
                        batches.push(PartitionBatch {
                            partition: record.partition,
                            epoch: epoch.map(str::to_owned),
                            events: Vec::new(),
                        });
                        batches.len() - 1
                    }
                };
                batches[at].events.push((number, event));
            }
            Err(err) => {
                let poison = stats.poison.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    partition = record.partition,
                    offset = record.offset,
                    error = %err,
                    poison_total = poison,
                    "skipping a record that is not a valid event"
                );
            }
        }
    }
    // The partitions' batches are independent (each checks its own offsets): they go to
    // the store at once, so one's round trip does not wait for another's.
    let applied = futures::future::join_all(
        batches
            .iter()
            .map(|batch| apply_until_done(store, stats, batch, shutdown)),
    )
    .await;
    if applied.contains(&false) {
        return false;
    }
    let done: Vec<(i32, i64)> = done.into_iter().collect();
    source.commit(&done).await;
    true
}

/// Applies `batch`, retrying the store with a growing pause until it answers; false if it
/// gave up because of `shutdown`.
async fn apply_until_done(
    store: &dyn CounterStore,
    stats: &WorkerStats,
    batch: &PartitionBatch,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.apply(batch).await {
            Ok(()) => break,
            Err(err) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = batch.partition, error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot apply counters; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    stats
        .events
        .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryCounters;
    use async_trait::async_trait;
    use domain::RateLimitEvent;
    use domain::analytics::AnalyticsReader;

    /// A scripted source: fixed batches, then the end; records commits.
    struct Scripted {
        batches: Vec<Vec<Record>>,
        commits: Arc<std::sync::Mutex<Vec<(i32, i64)>>>,
    }

    #[async_trait]
    impl EventSource for Scripted {
        async fn next_batch(&mut self, _max: usize) -> Option<Vec<Record>> {
            if self.batches.is_empty() {
                None
            } else {
                Some(self.batches.remove(0))
            }
        }
        fn drain(&mut self, _max: usize) -> Vec<Record> {
            Vec::new()
        }
        async fn commit(&mut self, done: &[(i32, i64)]) {
            self.commits.lock().unwrap().extend_from_slice(done);
        }
    }

    fn rec(partition: i32, offset: i64, user: &str, allowed: bool) -> Record {
        Record {
            partition: Some(partition),
            offset,
            event: Ok(RateLimitEvent::new(user, allowed, 0, "t")),
        }
    }

    #[tokio::test]
    async fn poison_is_skipped_counted_and_committed_past() {
        let poison = Record {
            partition: Some(0),
            offset: 1,
            event: RateLimitEvent::decode(b"garbage"),
        };
        let commits = Arc::default();
        let source = Scripted {
            batches: vec![vec![
                rec(0, 0, "u", true),
                poison,
                rec(0, 2, "u", false),
                rec(1, 7, "v", true),
            ]],
            commits: Arc::clone(&commits),
        };
        let store = Arc::new(MemoryCounters::new(100, Duration::from_secs(3600)));
        let stats = Arc::new(WorkerStats::default());
        run(
            Box::new(source),
            store.clone(),
            stats.clone(),
            100,
            CancellationToken::new(),
        )
        .await;
        let u = store.get("u").await.unwrap();
        assert_eq!((u.total, u.allowed, u.blocked), (2, 1, 1));
        assert_eq!(stats.poison.load(Ordering::Relaxed), 1);
        assert_eq!(stats.events.load(Ordering::Relaxed), 3);
        assert_eq!(*commits.lock().unwrap(), [(0, 2), (1, 7)]);
    }

    /// Runs the worker over `batches` into fresh memory counters, until the source ends.
    async fn counted_in_memory(batches: Vec<Vec<Record>>) -> Arc<MemoryCounters> {
        let source = Scripted {
            batches,
            commits: Arc::default(),
        };
        let store = Arc::new(MemoryCounters::new(100, Duration::from_secs(3600)));
        run(
            Box::new(source),
            store.clone(),
            Arc::new(WorkerStats::default()),
            100,
            CancellationToken::new(),
        )
        .await;
        store
    }

    fn stamped(partition: i32, offset: i64, user: &str, epoch: &str, seq: u64) -> Record {
        let mut record = rec(partition, offset, user, true);
        if let Ok(event) = &mut record.event {
            event.stamp = Some(domain::event::Stamp {
                epoch: epoch.into(),
                seq,
            });
        }
        record
    }

    /// Two relays that both sent a stretch of an outbox (one whose lease ran out while it
    /// was sending) put the same stamped events twice in one batch: each counts once.
    #[tokio::test]
    async fn a_batch_that_holds_stamped_events_twice_counts_them_once() {
        let e1 = "20261205-ob3";
        let store = counted_in_memory(vec![
            (0..5)
                .map(|i| stamped(0, i, "u", e1, i as u64))
                .chain((0..5).map(|i| stamped(0, 5 + i, "u", e1, i as u64)))
                .chain([stamped(0, 10, "u", e1, 5)])
                .collect(),
        ])
        .await;
        let u = store.get("u").await.unwrap();
        assert_eq!(u.allowed, 6, "{u:?}");
    }

    /// Offsets are the broker's, and a recreated topic (or a reset partition) numbers from 0
    /// again: stamped events count once by their publisher's epoch and sequence, whatever
    /// offsets they arrive at, and a replay of them counts nothing.
    #[tokio::test]
    async fn stamped_events_count_once_whatever_offsets_the_broker_gives_them() {
        let (e1, e2) = ("65000000-aa", "65000000-bb");
        let store = counted_in_memory(vec![
            // Two publishers, one partition.
            (0..5)
                .map(|i| stamped(0, 100 + i, "u", e1, i as u64))
                .chain([stamped(0, 105, "u", e2, 0)])
                .collect(),
            // The topic recreated: offsets from 0, the publishers' sequences go on.
            (0..3)
                .map(|i| stamped(0, i, "u", e1, 5 + i as u64))
                .chain([stamped(0, 3, "u", e2, 1)])
                .collect(),
            // The group replays everything from a reset offset.
            (0..8)
                .map(|i| stamped(0, 50 + i, "u", e1, i as u64))
                .chain([stamped(0, 58, "u", e2, 0), stamped(0, 59, "u", e2, 1)])
                .collect(),
        ])
        .await;
        let u = store.get("u").await.unwrap();
        assert_eq!(u.allowed, 10, "{u:?}");
        let global: u64 = store
            .global_series(0..=0)
            .await
            .unwrap()
            .iter()
            .map(|m| m.allowed)
            .sum();
        assert_eq!(global, 10);
    }
}
