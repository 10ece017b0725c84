//! `GET /status`: the health of the limiter, store and stream paths, for the dashboard.
//!
//! In the all-in-one process everything is in reach ([`LocalStatus`]); a standalone
//! gateway ([`RemoteStatus`]) asks the limiter's readiness, pings the counter store, and
//! sums the reports every limiter and worker writes to Redis each second
//! ([`ratelimit_core::report`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use analytics_worker::counters::CounterStore;
use analytics_worker::worker::WorkerStats;
use async_trait::async_trait;
use rate_limiter::breaker::BreakerState;
use rate_limiter::limiter::Limiter;
use ratelimit_core::report::{self, Reports, Role};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

impl Health {
    fn new(ok: bool, detail: impl Into<String>) -> Self {
        Self {
            ok,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Decisions {
    pub allowed: u64,
    pub limited: u64,
    pub degraded: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Events {
    pub published: u64,
    pub dropped: u64,
    pub buffered: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub limiter: Health,
    pub store: Health,
    pub stream: Health,
    /// Totals since start: this process's, or the sum over the running instances.
    pub decisions: Option<Decisions>,
    pub events: Option<Events>,
    /// Total consumer lag over the workers' partitions (Kafka only).
    pub consumer_lag: Option<i64>,
}

/// The stream path is healthy while the producers hold fewer than 10,000 undelivered
/// events and the consumers lag fewer than 100,000 behind.
fn stream_ok(buffered: u64, consumer_lag: Option<i64>) -> bool {
    buffered < 10_000 && consumer_lag.is_none_or(|lag| lag < 100_000)
}

#[async_trait]
pub trait StatusSource: Send + Sync + 'static {
    async fn status(&self) -> Status;

    /// Copies in-process counters into the metrics registry before a scrape.
    fn export_metrics(&self) {}
}

/// The all-in-one process: limiter and worker in reach.
pub struct LocalStatus {
    pub limiter: Arc<Limiter>,
    pub worker: Arc<WorkerStats>,
    pub counters: Arc<dyn CounterStore>,
    /// `"redis"` or `"memory"`.
    pub store_kind: &'static str,
    /// `"kafka"` or `"in-process"`.
    pub stream_kind: &'static str,
}

#[async_trait]
impl StatusSource for LocalStatus {
    async fn status(&self) -> Status {
        let stats = self.limiter.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let breaker = self.limiter.breaker_state();
        let store_ok = breaker == BreakerState::Closed && self.counters.ping().await.is_ok();
        let store = Health::new(
            store_ok,
            format!(
                "{}: breaker {:?}, {} errors",
                self.store_kind,
                breaker,
                load(&stats.store_errors)
            )
            .to_lowercase(),
        );
        let p = self.limiter.publisher().stats();
        let lag = self.worker.total_lag();
        let stream = Health::new(
            stream_ok(p.buffered, lag),
            format!(
                "{}: {} buffered, {} dropped",
                self.stream_kind, p.buffered, p.dropped
            ),
        );
        Status {
            limiter: Health::new(true, "in-process"),
            store,
            stream,
            decisions: Some(Decisions {
                allowed: load(&stats.allowed),
                limited: load(&stats.limited),
                degraded: load(&stats.degraded),
            }),
            events: Some(Events {
                published: p.published,
                dropped: p.dropped,
                buffered: p.buffered,
            }),
            consumer_lag: lag,
        }
    }

    fn export_metrics(&self) {
        self.limiter.export_metrics();
        self.worker.export_metrics();
    }
}

/// A standalone gateway: the limiter over HTTP, the counters in Redis.
pub struct RemoteStatus {
    pub limiter_url: String,
    pub counters: Arc<dyn CounterStore>,
    pub reports: Reports,
    pub client: reqwest::Client,
}

impl RemoteStatus {
    pub fn new(limiter_url: &str, counters: Arc<dyn CounterStore>, reports: Reports) -> Self {
        let first = limiter_url
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches('/');
        Self {
            limiter_url: first.to_owned(),
            counters,
            reports,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("http client"),
        }
    }
}

#[async_trait]
impl StatusSource for RemoteStatus {
    async fn status(&self) -> Status {
        let limiter = match self
            .client
            .get(format!("{}/readyz", self.limiter_url))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                Health::new(true, format!("{} ready", self.limiter_url))
            }
            Ok(r) => Health::new(
                false,
                format!("{} answered {}", self.limiter_url, r.status()),
            ),
            Err(e) => Health::new(false, format!("{} unreachable: {e}", self.limiter_url)),
        };
        let (limiters, workers) = tokio::join!(
            self.reports.read(Role::Limiter),
            self.reports.read(Role::Worker)
        );
        let (limiters, workers) = (limiters.unwrap_or_default(), workers.unwrap_or_default());
        let l = report::total(&limiters);
        let w = report::total(&workers);
        let store = match self.counters.ping().await {
            Ok(()) => Health::new(
                l.breaker_closed,
                format!(
                    "redis: {} of {} limiters with the breaker closed, {} errors",
                    limiters.iter().filter(|(_, r)| r.breaker_closed).count(),
                    limiters.len(),
                    l.store_errors
                ),
            ),
            Err(e) => Health::new(false, format!("redis: {e}")),
        };
        let stream = Health::new(
            stream_ok(l.buffered, w.consumer_lag),
            format!(
                "{} limiters: {} buffered, {} dropped; {} workers",
                limiters.len(),
                l.buffered,
                l.dropped,
                workers.len()
            ),
        );
        let reported = !limiters.is_empty();
        Status {
            limiter,
            store,
            stream,
            decisions: reported.then_some(Decisions {
                allowed: l.allowed,
                limited: l.limited,
                degraded: l.degraded,
            }),
            events: reported.then_some(Events {
                published: l.published,
                dropped: l.dropped,
                buffered: l.buffered,
            }),
            consumer_lag: w.consumer_lag,
        }
    }
}
