//! The analytics worker: reads decision events from a stream (the in-process channel, or
//! a Kafka consumer group) and keeps exact per-user counters (memory or Redis).
//!
//! - [`counters`]: the counter-store trait, its memory and Redis implementations, and the
//!   exactly-once design (per-user, per-partition applied offsets).
//! - [`source`]: the event-source trait, the channel and Kafka implementations.
//! - [`worker`]: the loop: batch, count, commit.
//! - [`config`]: the worker's configuration.

pub mod config;
pub mod counters;
pub mod source;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use crate::counters::{CounterStore, MemoryCounters, RedisCounters};
use crate::worker::WorkerStats;

/// The counter store the configuration asks for: Redis when `REDIS_URL` is set, else memory.
/// `max_users` bounds the in-memory counters; `retention` is how long the per-minute
/// series are kept.
pub fn counter_store(
    redis: &ratelimit_core::config::RedisArgs,
    max_users: usize,
    retention: Duration,
) -> anyhow::Result<Arc<dyn CounterStore>> {
    Ok(match redis.url() {
        Some(url) => Arc::new(RedisCounters::new(
            url,
            redis.cluster,
            &redis.key_prefix,
            // Batches are bigger than one decision: give them more than a decision's deadline.
            Duration::from_millis(redis.timeout_ms).max(Duration::from_secs(2)),
            retention,
        )?),
        None => Arc::new(MemoryCounters::new(max_users, retention)),
    })
}

/// The worker's own HTTP endpoints: `/healthz`, `/readyz` (counter store reachable), `/stats`.
pub fn router(store: Arc<dyn CounterStore>, stats: Arc<WorkerStats>) -> Router {
    let routes = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(|State((store, _)): State<(Arc<dyn CounterStore>, Arc<WorkerStats>)>| async move {
                match store.ping().await {
                    Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
                    Err(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"status": "not_ready", "detail": "the counter store is unreachable"})),
                    ),
                }
            }),
        )
        .route(
            "/stats",
            get(|State((_, stats)): State<(Arc<dyn CounterStore>, Arc<WorkerStats>)>| async move {
                use std::sync::atomic::Ordering::Relaxed;
                Json(json!({
                    "events": stats.events.load(Relaxed),
                    "poison": stats.poison.load(Relaxed),
                    "batches": stats.batches.load(Relaxed),
                    "store_errors": stats.store_errors.load(Relaxed),
                    "partitions": stats.partitions.lock().expect("assignment lock").iter().copied().collect::<Vec<i32>>(),
                    "consumer_lag": stats.total_lag(),
                }))
            }),
        )
        .route(
            "/metrics",
            get(|State((_, stats)): State<(Arc<dyn CounterStore>, Arc<WorkerStats>)>| async move {
                stats.export_metrics();
                ratelimit_core::metrics::render()
            }),
        )
        .with_state((store, stats));
    let routes = ratelimit_core::metrics::with_http_metrics(routes, "analytics-worker");
    ratelimit_core::http::with_common_layers(routes)
}

#[cfg(feature = "kafka")]
/// Runs the standalone worker: a Kafka group member counting into Redis, with its health
/// endpoints on `listener`, until `shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: config::WorkerConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let brokers = config.kafka.brokers().ok_or_else(|| {
        anyhow::anyhow!("KAFKA_BROKERS is required: the standalone worker consumes the Kafka topic (the embedded default runs its worker in-process)")
    })?;
    if config.redis.url().is_none() {
        anyhow::bail!(
            "REDIS_URL is required: the standalone worker keeps its counters in Redis, where the gateway reads them"
        );
    }
    let store = counter_store(
        &config.redis,
        config.worker.max_users as usize,
        config.worker.retention.retention,
    )?;
    let worker = SpawnedWorker::kafka(
        &config.kafka,
        brokers,
        store.clone(),
        config.worker.batch_max as usize,
    )?;
    // For a standalone gateway's /status: this worker's events and consumer lag.
    if let Some(reports) = ratelimit_core::report::Reports::from_args(&config.redis)? {
        let stats = worker.stats.clone();
        reports.spawn_writer(
            ratelimit_core::report::Role::Worker,
            ratelimit_core::runtime::instance_id(),
            move || ratelimit_core::report::Report {
                events: stats.events.load(std::sync::atomic::Ordering::Relaxed),
                consumer_lag: stats.total_lag(),
                ..Default::default()
            },
            shutdown.clone(),
        );
    }
    tracing::info!(addr = %listener.local_addr()?, "analytics worker health endpoints listening");
    ratelimit_core::http::serve(
        listener,
        router(store, worker.stats.clone()),
        shutdown,
        config.serve.grace(),
    )
    .await?;
    worker.stop().await;
    Ok(())
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
        events: ratelimit_core::stream::ChannelReceiver,
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
        kafka: &ratelimit_core::config::KafkaArgs,
        brokers: &str,
        store: Arc<dyn CounterStore>,
        batch_max: usize,
    ) -> anyhow::Result<Self> {
        // The limiter creates the topic too; whoever starts first does it.
        ratelimit_core::kafka::ensure_topic(
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
