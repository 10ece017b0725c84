//! The layers every service's router is wrapped in: JSON 404/405, the in-flight bound, the
//! liveness probe outside it, and bodies read in full first ([`super::body`]).

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use domain::api::MAX_BODY_BYTES;

use super::body::{BodyLimit, with_buffered_bodies};
use super::{ApiError, ServeLimits};

/// Adds the body limit and JSON answers for unknown paths (404) and wrong methods (405).
pub fn with_common_layers(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// Bounds in-flight work: past `max_in_flight` concurrent requests (all routes together) a
/// request is shed at once with 429 (never queued), and one running longer than `timeout`
/// answers 503.
pub fn with_load_shedding(router: Router, max_in_flight: usize, timeout: Duration) -> Router {
    // Around the whole router (not `Router::layer`, which wraps each route apart), so the
    // limit counts every request the service has in flight.
    let service = tower::ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|err: tower::BoxError| async move {
            if err.is::<tower::load_shed::error::Overloaded>() {
                ApiError::Overloaded
            } else if err.is::<tower::timeout::error::Elapsed>() {
                ApiError::Timeout
            } else {
                tracing::error!(error = %err, "middleware error");
                ApiError::Unavailable {
                    what: "service",
                    retry_after_secs: 1,
                }
            }
        }))
        .load_shed()
        .concurrency_limit(max_in_flight.max(1))
        .timeout(timeout)
        .service(router);
    Router::new().fallback_service(service)
}

/// The liveness probe's path.
pub const HEALTHZ: &str = "/healthz";
/// The readiness probe's path (served by the services that have one).
pub const READYZ: &str = "/readyz";

/// The liveness probe: `GET /healthz`, `200 {"status":"ok"}` while the process serves.
pub fn liveness() -> Router {
    Router::new().route(
        HEALTHZ,
        axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
    )
}

/// A service's whole HTTP stack, outermost first:
///
/// 1. every request's body is read in full, at most `max_body` bytes within
///    `limits.body_timeout` (else 413 or 408, and the connection is closed), so a slow
///    sender never holds an in-flight slot;
/// 2. the `probes` (the liveness probe) are answered there, outside the load shedder: a
///    service busy with its limit of requests is still alive;
/// 3. everything else goes through [`with_load_shedding`] and [`with_common_layers`] to
///    `routes`.
///
/// `max_body` is the largest body any route accepts; each route's own limit
/// ([`DefaultBodyLimit`]) still applies to the buffered body.
pub fn with_guards(
    routes: Router,
    probes: Router,
    max_body: impl Into<BodyLimit>,
    limits: &ServeLimits,
) -> Router {
    let shed = with_load_shedding(
        with_common_layers(routes),
        limits.max_in_flight,
        limits.request_timeout,
    );
    with_buffered_bodies(probes.fallback_service(shed), max_body, limits.body_timeout)
}
