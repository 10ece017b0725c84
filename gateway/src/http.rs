//! The public API: `POST /api`, `GET /analytics[/{user_id}][?window=15m]`, `GET /status`,
//! `GET /metrics`, `GET /dashboard`, `GET /healthz`.

use std::sync::Arc;
use std::time::Duration;

use std::ops::RangeInclusive;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::analytics::{
    AnalyticsReader, CounterError, DAY_MS, MINUTE_MS, MinuteCounts, UserAnalytics,
};
use domain::api::{CheckRequest, FieldError, MAX_BODY_BYTES, canonical_user_id};
use domain::{Clock, SystemClock};
use kit::http::{ApiError, Direct, Guarded, ServeLimits, ValidJson, liveness, with_guards};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::admin::AdminToken;
use crate::analytics_reads::AnalyticsReads;
use crate::client::LimiterClient;
use crate::status::{Status, StatusSource};

/// What the gateway's handlers share.
#[derive(Clone)]
pub struct Gateway {
    pub limiter: Arc<dyn LimiterClient>,
    /// The counters, read-only.
    pub analytics: Arc<dyn AnalyticsReader>,
    pub status: Arc<dyn StatusSource>,
    /// How far back the per-minute analytics go: the longest window answered.
    pub retention: Duration,
    /// When set, the admin routes (`/analytics*`, `/status`, `/metrics`) need
    /// `Authorization: Bearer <token>`.
    pub admin_token: Option<AdminToken>,
}

/// The handlers' state: the gateway and what bounds the cost of its analytics reads.
#[derive(Clone)]
struct Shared {
    gateway: Gateway,
    reads: Arc<AnalyticsReads>,
}

/// The gateway's own paths. The router serves these and nothing else, and the proxy
/// forwards every path that is not one of them ([`is_own_route`]): one list, so a route
/// added to the gateway can never be proxied upstream as well.
pub mod routes {
    pub const API: &str = "/api";
    pub const ANALYTICS: &str = "/analytics";
    pub const USER_ANALYTICS: &str = "/analytics/{user_id}";
    pub const STATUS: &str = "/status";
    pub const METRICS: &str = "/metrics";
    pub const DASHBOARD: &str = "/dashboard";
    /// The limiter's administration, passed on.
    pub const LIMITER_ADMIN: &str = "/admin/{*rest}";
    /// Reserved for the gateway's administration: answered here (404), never forwarded.
    pub const ADMIN: &str = "/admin";

    /// Every route, in axum's syntax (`{name}` one segment, `{*name}` the rest).
    pub const ALL: [&str; 10] = [
        API,
        ANALYTICS,
        USER_ANALYTICS,
        STATUS,
        METRICS,
        DASHBOARD,
        LIMITER_ADMIN,
        ADMIN,
        kit::http::HEALTHZ,
        kit::http::READYZ,
    ];
}

/// Whether `path` is one of the gateway's own routes ([`routes::ALL`]), never forwarded.
pub fn is_own_route(path: &str) -> bool {
    routes::ALL.iter().any(|route| match route.find('{') {
        // `/analytics/{user_id}`: `/analytics/` and anything below it.
        Some(at) => path.starts_with(&route[..at]),
        None => path == *route,
    })
}

/// The gateway's routes, with body limits, JSON 404/405, metrics, load shedding and the
/// slow-client guards ([`with_guards`]); the admin routes behind `ADMIN_TOKEN` when set.
pub fn router(gateway: Gateway, limits: &ServeLimits) -> Guarded {
    let token = gateway.admin_token.clone();
    let admin = Router::new()
        .route(routes::ANALYTICS, get(global_analytics))
        .route(routes::USER_ANALYTICS, get(analytics))
        .route(routes::STATUS, get(status))
        .route(routes::METRICS, get(metrics))
        .route_layer(axum::middleware::from_fn(move |req, next| {
            crate::admin::require(token.clone(), req, next)
        }));
    let admin_token = gateway.admin_token.clone();
    let limiter_admin = Router::new()
        .route(routes::LIMITER_ADMIN, axum::routing::any(limiter_admin))
        .route_layer(axum::middleware::from_fn(move |req, next| {
            crate::admin::require_configured(admin_token.clone(), req, next)
        }));
    let state = Shared {
        gateway,
        reads: Arc::new(AnalyticsReads::new()),
    };
    let routes = Router::new()
        .route(routes::API, post(api))
        .merge(admin)
        .merge(limiter_admin)
        .route(routes::DASHBOARD, get(crate::dashboard::dashboard))
        .with_state(state.clone());
    let routes = kit::metrics::with_http_metrics(routes, "gateway");
    // Outside the load shedder: a gateway at its in-flight limit is busy, not dead.
    let probes = kit::metrics::with_http_metrics(liveness(), "gateway");
    let bodies = kit::http::BodyLimit::new(MAX_BODY_BYTES)
        .with_prefix("/admin/", domain::api::MAX_ADMIN_BODY_BYTES);
    // `POST /api`, every request's route, answered before the router (the same handler).
    with_guards(routes, probes, bodies, limits).with_direct(Direct::post(
        routes::API,
        api,
        state,
        "gateway",
    ))
}

use crate::answer::{json, limited, rate_limit_headers};

async fn api(
    State(Shared { gateway, .. }): State<Shared>,
    request_headers: HeaderMap,
    ValidJson(request): ValidJson<CheckRequest>,
) -> Result<Response, ApiError> {
    if request.cost < 1 {
        // Refunds are for the services behind the limiter, never for its clients.
        return Err(FieldError::new(
            "cost",
            format!("must be an integer from 1 to {}", domain::api::MAX_COST),
        )
        .into());
    }
    let decision = gateway.limiter.check(&request).await?;
    let headers = rate_limit_headers(&decision);
    if decision.allowed {
        let body = AllowedBody {
            allowed: true,
            user_id: &request.user_id,
            remaining: decision.remaining,
        };
        Ok(json(StatusCode::OK, headers, &body))
    } else {
        Ok(limited(
            &decision,
            &request.user_id,
            &request_headers,
            headers,
        ))
    }
}

/// `/admin/*` (overrides, bucket peeks and resets): passed on to the limiter, which owns
/// them and checks the token again.
async fn limiter_admin(
    State(Shared { gateway, .. }): State<Shared>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, domain::api::MAX_ADMIN_BODY_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge)?;
    let forwarded = crate::client::AdminRequest {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
        body,
    };
    let (status, body) = gateway.limiter.admin(forwarded).await?;
    Ok((
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// `POST /api` when allowed.
#[derive(Serialize)]
struct AllowedBody<'a> {
    allowed: bool,
    user_id: &'a str,
    remaining: u64,
}

fn analytics_unavailable(err: CounterError) -> ApiError {
    tracing::warn!(error = %err, "cannot read analytics");
    ApiError::Unavailable {
        what: "analytics store",
        retry_after_secs: 1,
    }
}

/// `?window=15m`: a time window of whole minutes ending with the current one.
#[derive(Debug, Deserialize)]
struct WindowQuery {
    window: Option<String>,
}

/// The minute numbers a window covers, and its length in seconds.
fn window_minutes(
    window: &str,
    retention: Duration,
) -> Result<(RangeInclusive<u64>, u64), ApiError> {
    let d = kit::config::parse_duration(window).map_err(|e| FieldError::new("window", e))?;
    if d > retention {
        return Err(FieldError::new(
            "window",
            format!(
                "must be at most the analytics retention ({}m)",
                retention.as_secs() / 60
            ),
        )
        .into());
    }
    let minutes = d.as_secs().div_ceil(60).max(1);
    let now = SystemClock.now_ms() / MINUTE_MS;
    Ok((now + 1 - minutes..=now, minutes * 60))
}

fn query(q: Result<Query<WindowQuery>, QueryRejection>) -> Result<WindowQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| FieldError::new("query", e.body_text()).into())
}

fn sum(series: &[MinuteCounts]) -> (u64, u64) {
    series
        .iter()
        .fold((0, 0), |(a, b), m| (a + m.allowed, b + m.blocked))
}

async fn analytics(
    State(Shared { gateway, reads }): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(user_id) = path.map_err(|e| FieldError::new("user_id", e.body_text()))?;
    let user_id = canonical_user_id(user_id)?;
    let Some(window) = query(q)?.window else {
        let all_time: UserAnalytics = gateway
            .analytics
            .get(&user_id)
            .await
            .map_err(analytics_unavailable)?;
        return Ok(Json(serde_json::to_value(all_time).expect("serializes")));
    };
    let (minutes, window_secs) = window_minutes(&window, gateway.retention)?;
    // A window read costs a Redis call per minute: a few at a time, the rest shed.
    let _permit = reads.user_window_permit().ok_or(ApiError::Overloaded)?;
    let series = gateway
        .analytics
        .user_series(&user_id, minutes)
        .await
        .map_err(analytics_unavailable)?;
    let (allowed, blocked) = sum(&series);
    Ok(Json(json!({
        "user_id": user_id,
        "total": allowed + blocked,
        "allowed": allowed,
        "blocked": blocked,
        "window_secs": window_secs,
        "series": series,
    })))
}

/// How many users the top-blocked lists show.
const TOP_N: usize = 10;

/// Everyone's analytics over a window: computed at most once a second per window, by one
/// caller while the others wait for its answer (single-flight), since it costs a Redis call
/// per minute and partition; every caller within that second shares the answer.
async fn global_analytics(
    State(Shared { gateway, reads }): State<Shared>,
    q: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let window = query(q)?.window.unwrap_or_else(|| "15m".to_owned());
    let (minutes, window_secs) = window_minutes(&window, gateway.retention)?;
    let second = SystemClock.now_ms() / 1000;
    let answer = reads
        .global(window_secs, second, || async {
            let today = *minutes.end() * MINUTE_MS / DAY_MS;
            let counters = &gateway.analytics;
            let (series, top, top_day, mut rules) = tokio::try_join!(
                counters.global_series(minutes.clone()),
                counters.top_blocked(minutes.clone(), TOP_N),
                counters.top_blocked_day(today, TOP_N),
                counters.rule_counts(),
            )?;
            rules.truncate(RULES_SHOWN);
            let (allowed, blocked) = sum(&series);
            Ok(json!({
                "window_secs": window_secs,
                "total": allowed + blocked,
                "allowed": allowed,
                "blocked": blocked,
                "series": series,
                "top_blocked": top,
                "top_blocked_day": top_day,
                "rules": rules,
            }))
        })
        .await
        .map_err(analytics_unavailable)?;
    Ok(Json((*answer).clone()))
}

/// The most rules `GET /analytics` lists (most blocked first).
const RULES_SHOWN: usize = 100;

async fn status(State(Shared { gateway, .. }): State<Shared>) -> Json<Status> {
    Json(gateway.status.status().await)
}

async fn metrics(State(Shared { gateway, .. }): State<Shared>) -> Response {
    gateway.status.export_metrics();
    kit::metrics::render()
}
