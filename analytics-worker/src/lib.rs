//! The analytics worker service: a Kafka consumer-group member that keeps exact per-user
//! counters in Redis, with its health and stats endpoints.
//!
//! The counting itself (stores, sources, the batch-count-commit loop) is the
//! `counters` library, which a rate limiter without Kafka also runs in-process.
//!
//! - [`router`]: `/healthz`, `/readyz`, `/stats`, `/metrics`.
//! - [`run`]: the standalone service.
//! - [`config`]: the worker's configuration.

pub mod config;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use counters::worker::WorkerStats;
#[cfg(feature = "kafka")]
use counters::{SpawnedWorker, counter_store};
use domain::analytics::CounterStore;

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
                kit::metrics::render()
            }),
        )
        .with_state((store, stats));
    let routes = kit::metrics::with_http_metrics(routes, "analytics-worker");
    kit::http::with_common_layers(routes)
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
    let redis = config.redis.resolve().map_err(anyhow::Error::msg)?;
    if redis.analytics.is_none() {
        anyhow::bail!(
            "REDIS_URL is required: the standalone worker keeps its counters in Redis, where the gateway reads them"
        );
    }
    let store = counter_store(&redis, &config.worker)?;
    let worker = SpawnedWorker::kafka(
        &config.kafka,
        brokers,
        store.clone(),
        config.worker.batch_max as usize,
    )?;
    // For a standalone gateway's /status: this worker's events and consumer lag.
    if let Some(reports) = kit::report::Reports::from_settings(&redis)? {
        let stats = worker.stats.clone();
        reports.spawn_writer(
            kit::report::Role::Worker,
            kit::runtime::instance_id(),
            move || kit::report::Report {
                events: stats.events.load(std::sync::atomic::Ordering::Relaxed),
                consumer_lag: stats.total_lag(),
                ..Default::default()
            },
            shutdown.clone(),
        );
    }
    tracing::info!(addr = %listener.local_addr()?, "analytics worker health endpoints listening");
    kit::http::serve(
        listener,
        router(store, worker.stats.clone()),
        shutdown,
        &config.serve.limits(),
    )
    .await?;
    worker.stop().await;
    Ok(())
}
