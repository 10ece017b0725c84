//! What only a process holding all three services can do: ask its limiter without a
//! socket ([`InProcessClient`]) and report on every part from memory ([`LocalStatus`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use counters::worker::WorkerStats;
use domain::analytics::AnalyticsReader;
use domain::api::{CheckRequest, CheckResponse};
use gateway::client::{AdminRequest, ClientError, LimiterClient};
use gateway::status::{Decisions, Events, Health, Status, StatusSource, stream_ok};
use rate_limiter::back::breaker::BreakerState;
use rate_limiter::limiter::Limiter;

/// The limiter in the same process, and its `/admin` routes.
pub struct InProcessClient {
    pub limiter: Arc<Limiter>,
    pub admin: axum::Router,
}

impl InProcessClient {
    pub fn new(limiter: Arc<Limiter>, admin_token: Option<kit::admin::AdminToken>) -> Self {
        Self {
            admin: rate_limiter::front::admin::routes(limiter.clone(), admin_token),
            limiter,
        }
    }
}

#[async_trait]
impl LimiterClient for InProcessClient {
    /// The limiter's own `/admin` routes, called without a socket.
    async fn admin(
        &self,
        request: AdminRequest,
    ) -> Result<(axum::http::StatusCode, axum::body::Bytes), ClientError> {
        use tower::ServiceExt;
        let mut builder = axum::http::Request::builder()
            .method(request.method)
            .uri(request.path_and_query);
        if let Some(auth) = request.authorization {
            builder = builder.header(axum::http::header::AUTHORIZATION, auth);
        }
        let forwarded = builder
            .body(axum::body::Body::from(request.body))
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let response = self
            .admin
            .clone()
            .oneshot(forwarded)
            .await
            .unwrap_or_else(|never| match never {});
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        Ok((status, body))
    }

    async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, ClientError> {
        self.limiter
            .check_response(request)
            .await
            .map_err(ClientError::from)
    }
}

/// The all-in-one process: limiter and worker in reach.
pub struct LocalStatus {
    pub limiter: Arc<Limiter>,
    pub worker: Arc<WorkerStats>,
    pub counters: Arc<dyn AnalyticsReader>,
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
