//! `GET /status`: the health of the limiter, store and stream paths, for the dashboard.
//!
//! The all-in-one process, where everything is in reach, brings its own [`StatusSource`];
//! a standalone gateway ([`RemoteStatus`]) asks the limiter's readiness, pings the counter store, and
//! sums the reports every limiter and worker writes to Redis each second
//! ([`kit::report`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::analytics::AnalyticsReader;
use kit::report::{self, Reports, Role};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

impl Health {
    pub fn new(ok: bool, detail: impl Into<String>) -> Self {
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
pub fn stream_ok(buffered: u64, consumer_lag: Option<i64>) -> bool {
    buffered < 10_000 && consumer_lag.is_none_or(|lag| lag < 100_000)
}

#[async_trait]
pub trait StatusSource: Send + Sync + 'static {
    async fn status(&self) -> Status;

    /// Copies in-process counters into the metrics registry before a scrape.
    fn export_metrics(&self) {}
}

/// A standalone gateway: the limiter over HTTP, the counters in Redis.
pub struct RemoteStatus {
    pub limiter_url: String,
    pub counters: Arc<dyn AnalyticsReader>,
    pub reports: Reports,
    pub client: reqwest::Client,
}

impl RemoteStatus {
    pub fn new(limiter_url: &str, counters: Arc<dyn AnalyticsReader>, reports: Reports) -> Self {
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
