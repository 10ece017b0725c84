//! The public API: `POST /api`, `GET /analytics/{user_id}`, `GET /healthz`.

use std::sync::Arc;
use std::time::Duration;

use analytics_worker::counters::CounterStore;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ratelimit_core::api::{
    CheckRequest, CheckResponse, FieldError, UserAnalytics, validate_user_id,
};
use ratelimit_core::http::{ApiError, ValidJson, with_common_layers, with_load_shedding};
use serde_json::json;

use crate::client::LimiterClient;

/// What the gateway's handlers share.
#[derive(Clone)]
pub struct Gateway {
    pub limiter: Arc<dyn LimiterClient>,
    pub counters: Arc<dyn CounterStore>,
}

/// The gateway's routes, with body limits, JSON 404/405 and load shedding.
pub fn router(gateway: Gateway, max_in_flight: usize, request_timeout: Duration) -> Router {
    let routes = Router::new()
        .route("/api", post(api))
        .route("/analytics/{user_id}", get(analytics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(gateway);
    with_load_shedding(with_common_layers(routes), max_in_flight, request_timeout)
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static DEGRADED: HeaderName = HeaderName::from_static("x-ratelimit-degraded");

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The rate-limit headers every `/api` answer carries: the widely deployed
/// `RateLimit-Limit/-Remaining/-Reset` trio, and the IETF httpapi draft's
/// `RateLimit-Policy` and `RateLimit` fields.
fn rate_limit_headers(d: &CheckResponse) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(7);
    let reset = secs_ceil(d.reset_after_ms);
    h.insert(&RATELIMIT_LIMIT, HeaderValue::from(d.limit));
    h.insert(&RATELIMIT_REMAINING, HeaderValue::from(d.remaining));
    h.insert(&RATELIMIT_RESET, HeaderValue::from(reset));
    let policy = format!(
        "\"default\";q={};w={}",
        d.limit,
        secs_ceil(d.window_ms).max(1)
    );
    let current = format!("\"default\";r={};t={}", d.remaining, reset);
    h.insert(
        &RATELIMIT_POLICY,
        HeaderValue::from_str(&policy).expect("ascii"),
    );
    h.insert(&RATELIMIT, HeaderValue::from_str(&current).expect("ascii"));
    if d.degraded {
        h.insert(&DEGRADED, HeaderValue::from_static("true"));
    }
    h
}

async fn api(
    State(gateway): State<Gateway>,
    ValidJson(request): ValidJson<CheckRequest>,
) -> Result<Response, ApiError> {
    let decision = gateway.limiter.check(&request).await?;
    let mut headers = rate_limit_headers(&decision);
    if decision.allowed {
        let body =
            json!({"allowed": true, "user_id": request.user_id, "remaining": decision.remaining});
        Ok((StatusCode::OK, headers, Json(body)).into_response())
    } else {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(secs_ceil(decision.retry_after_ms).max(1)),
        );
        let body = json!({
            "error": "rate_limited",
            "user_id": request.user_id,
            "retry_after_ms": decision.retry_after_ms,
        });
        Ok((StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response())
    }
}

async fn analytics(
    State(gateway): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UserAnalytics>, ApiError> {
    let Path(user_id) = path.map_err(|e| FieldError::new("user_id", e.body_text()))?;
    validate_user_id(&user_id)?;
    gateway
        .counters
        .get(&user_id)
        .await
        .map(Json)
        .map_err(|err| {
            tracing::warn!(error = %err, "cannot read analytics");
            ApiError::Unavailable {
                what: "analytics store",
                retry_after_secs: 1,
            }
        })
}
