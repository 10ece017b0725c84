//! axum pieces shared by the HTTP services: one error type mapped to HTTP in one place,
//! a strict JSON extractor, and JSON answers for unknown paths and wrong methods.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use ratelimit_domain::api::{ErrorBody, FieldError, MAX_BODY_BYTES};

/// Everything a handler can answer besides success. Mapped to a status and a JSON
/// [`ErrorBody`] in [`IntoResponse`] below, and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    InvalidField(FieldError),
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A dependency (the limiter, its store, the analytics store) cannot answer now.
    #[error("{what} unavailable")]
    Unavailable {
        what: &'static str,
        retry_after_secs: u64,
    },
    /// Too much in flight: shed at once rather than queue.
    #[error("overloaded")]
    Overloaded,
    /// An admin route asked without the right `Authorization: Bearer` token.
    #[error("unauthorized")]
    Unauthorized,
    /// The request did not finish within the service's request timeout.
    #[error("request timed out")]
    Timeout,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidField(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // The original design answers overload with 429: shed, come back shortly.
            ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable { .. } | ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The JSON body this error answers with.
    pub fn body(&self) -> ErrorBody {
        let (error, detail, field) = match self {
            ApiError::InvalidField(e) => (
                "invalid_request",
                format!("{}: {}", e.field, e.detail),
                Some(e.field.clone()),
            ),
            ApiError::UnsupportedMediaType => (
                "unsupported_media_type",
                "the body must be JSON sent with Content-Type: application/json".to_owned(),
                None,
            ),
            ApiError::PayloadTooLarge => (
                "payload_too_large",
                format!("the body must be at most {MAX_BODY_BYTES} bytes"),
                None,
            ),
            ApiError::NotFound => ("not_found", "no such route".to_owned(), None),
            ApiError::MethodNotAllowed => (
                "method_not_allowed",
                "this route does not accept that method".to_owned(),
                None,
            ),
            ApiError::Unavailable { what, .. } => (
                "unavailable",
                format!("the {what} is unavailable; try again shortly"),
                None,
            ),
            ApiError::Overloaded => (
                "overloaded",
                "too many requests in flight; try again shortly".to_owned(),
                None,
            ),
            ApiError::Unauthorized => (
                "unauthorized",
                "this route needs Authorization: Bearer <ADMIN_TOKEN>".to_owned(),
                None,
            ),
            ApiError::Timeout => (
                "timeout",
                "the request did not finish in time; try again shortly".to_owned(),
                None,
            ),
        };
        ErrorBody {
            error: error.to_owned(),
            detail,
            field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let retry_after = match &self {
            ApiError::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::Overloaded | ApiError::Timeout => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::InvalidField(e)
    }
}

/// A request body type that decodes and validates itself.
pub trait FromJsonBody: Sized {
    fn from_json(body: &[u8]) -> Result<Self, FieldError>;
}

impl FromJsonBody for ratelimit_domain::api::CheckRequest {
    fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        ratelimit_domain::api::CheckRequest::from_json(body)
    }
}

impl FromJsonBody for ratelimit_domain::api::BatchRequest {
    fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        ratelimit_domain::api::BatchRequest::from_json(body)
    }
}

/// A JSON body that was sent as JSON, fits the size limit and validated: 415, 413 or 400
/// (naming the field) otherwise.
pub struct ValidJson<T>(pub T);

impl<S: Send + Sync, T: FromJsonBody> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::InvalidField(FieldError::new("body", rejection.body_text()))
            }
        })?;
        T::from_json(&body).map(ValidJson).map_err(ApiError::from)
    }
}

/// `application/json`, `application/json; charset=utf-8`, or any `application/*+json`.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}

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

/// Serves `router` on `listener` until `shutdown`, then stops accepting and lets in-flight
/// requests finish for at most `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    tokio::select! {
        result = server => result,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; dropping unfinished requests");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn recognises_json_content_types() {
        assert!(is_json(&headers("application/json")));
        assert!(is_json(&headers("Application/JSON; charset=utf-8")));
        assert!(is_json(&headers("application/vnd.api+json")));
        assert!(!is_json(&headers("text/plain")));
        assert!(!is_json(&headers("application/x-www-form-urlencoded")));
        assert!(!is_json(&headers("json")));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn sheds_past_the_in_flight_limit_and_times_out_slow_requests() {
        use tower::ServiceExt;
        // Two slow routes share the one limit. with_state turns handlers into services
        // once, as the services' routers do.
        let handler = || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "done"
        };
        let slow = Router::new()
            .route("/slow", axum::routing::get(handler))
            .route("/other", axum::routing::get(handler))
            .with_state(());

        let router = with_load_shedding(slow, 5, Duration::from_secs(5));
        let calls: Vec<_> = (0..50usize)
            .map(|i| {
                let router = router.clone();
                tokio::spawn(async move {
                    let req = Request::builder()
                        .uri(if i % 2 == 0 { "/slow" } else { "/other" })
                        .body(axum::body::Body::empty())
                        .unwrap();
                    let response = router.oneshot(req).await.unwrap();
                    (
                        response.status(),
                        response.headers().contains_key(header::RETRY_AFTER),
                    )
                })
            })
            .collect();
        let mut ok = 0;
        let mut shed = 0;
        for call in calls {
            match call.await.unwrap() {
                (StatusCode::OK, _) => ok += 1,
                (StatusCode::TOO_MANY_REQUESTS, true) => shed += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((ok, shed), (5, 45));

        let router = with_load_shedding(
            Router::new().route(
                "/stuck",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }),
            ),
            5,
            Duration::from_millis(50),
        );
        let req = Request::builder()
            .uri("/stuck")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(
            ApiError::InvalidField(FieldError::new("a", "b")).status(),
            400
        );
        assert_eq!(ApiError::UnsupportedMediaType.status(), 415);
        assert_eq!(ApiError::PayloadTooLarge.status(), 413);
        assert_eq!(ApiError::NotFound.status(), 404);
        assert_eq!(ApiError::MethodNotAllowed.status(), 405);
        assert_eq!(ApiError::Overloaded.status(), 429);
        assert_eq!(ApiError::Timeout.status(), 503);
    }
}
