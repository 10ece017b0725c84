//! The HTTP side of every service: one error type mapped to HTTP in one place, a strict
//! JSON extractor, JSON answers for unknown paths and wrong methods, and what keeps a
//! service answering whatever its clients do:
//!
//! - [`with_load_shedding`]: a bound on requests in flight (past it, 429 at once) and on
//!   how long each runs.
//! - [`with_guards`]: the whole stack: every request's body read in full, under a deadline
//!   and a size limit, *before* the request takes an in-flight slot (a slow sender holds a
//!   connection, never a slot), and the liveness probe outside the load shedder.
//! - [`serve`]: HTTP/1.1 on a listener with a header-read timeout, a send timeout, a cap
//!   on open connections and a graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use ratelimit_domain::api::{CheckError, ErrorBody, FieldError, MAX_BODY_BYTES};

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
    /// The client did not send the request's body within the body timeout.
    #[error("request body timed out")]
    BodyTimeout(Duration),
}

impl From<CheckError> for ApiError {
    fn from(err: CheckError) -> Self {
        match err {
            CheckError::Invalid(field) => ApiError::InvalidField(field),
            CheckError::StoreUnavailable | CheckError::Other(_) => ApiError::Unavailable {
                what: "rate-limit store",
                retry_after_secs: 1,
            },
            CheckError::Overloaded => ApiError::Overloaded,
        }
    }
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
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
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
            ApiError::BodyTimeout(after) => (
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms; send it at once",
                    after.as_millis()
                ),
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

/// What one client may hold of a service, and for how long (from
/// [`ServeArgs::limits`](crate::config::ServeArgs::limits)).
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Requests worked on at once (every route but the liveness probe); past it, 429.
    pub max_in_flight: usize,
    /// A request running longer is answered 503.
    pub request_timeout: Duration,
    /// A request's head must be in this long after the server starts waiting for it: on a
    /// new connection, and between the requests of a kept-alive one (hyper starts the
    /// clock as soon as it waits for a head), so it also closes idle connections.
    pub header_timeout: Duration,
    /// A request's body must be in this long after its head; else 408.
    pub body_timeout: Duration,
    /// A write to the client that makes no progress this long closes the connection.
    pub send_timeout: Duration,
    /// Open connections at once; past it a new connection is closed at once.
    pub max_connections: usize,
    /// After shutdown, how long requests in flight get to finish.
    pub grace: Duration,
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

/// Reads every request's body into memory before `router` sees it: at most `max_body`
/// bytes (413 otherwise), within `timeout` of the head (408 otherwise). Either answer
/// closes the connection; before a 413 the rest of the body, up to [`DRAIN_LIMIT`] and
/// within the same `timeout`, is read and dropped, so that the client gets the answer
/// rather than a reset.
pub fn with_buffered_bodies(
    router: Router,
    max_body: impl Into<BodyLimit>,
    timeout: Duration,
) -> Router {
    let max_body = max_body.into();
    let layer = axum::middleware::from_fn(move |req: Request, next: Next| async move {
        let max_body = max_body.for_path(req.uri().path());
        match buffer_body(req, max_body, timeout).await {
            Ok(req) => next.run(req).await,
            Err(err) => {
                let mut response = err.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        }
    });
    // Around the whole router, as the load shedder is, so it runs before anything else.
    Router::new().fallback_service(tower::ServiceBuilder::new().layer(layer).service(router))
}

/// The largest body a request may carry: one bound, or another for the paths under one
/// prefix (the gateway's `/admin/` routes, which pass override documents on to the limiter
/// and so take what the limiter takes).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    default: usize,
    under: Option<(&'static str, usize)>,
}

impl BodyLimit {
    /// `bytes` for every path.
    pub fn new(bytes: usize) -> Self {
        Self {
            default: bytes,
            under: None,
        }
    }

    /// `bytes` for the paths that start with `prefix`.
    pub fn with_prefix(self, prefix: &'static str, bytes: usize) -> Self {
        Self {
            under: Some((prefix, bytes)),
            ..self
        }
    }

    /// The bound for a request to `path`.
    pub fn for_path(&self, path: &str) -> usize {
        match self.under {
            Some((prefix, bytes)) if path.starts_with(prefix) => bytes,
            _ => self.default,
        }
    }
}

impl From<usize> for BodyLimit {
    fn from(bytes: usize) -> Self {
        Self::new(bytes)
    }
}

/// How far past its limit a body is still read (and thrown away) before the 413 goes out.
/// Closing a socket that holds unread data makes the kernel answer with a reset, which can
/// destroy the response in flight: the client would see a broken connection instead of
/// the 413. Past this, the connection is closed at once all the same.
const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;

async fn buffer_body(
    req: Request,
    max_body: usize,
    timeout: Duration,
) -> Result<Request, ApiError> {
    let (parts, mut body) = req.into_parts();
    if axum::body::HttpBody::is_end_stream(&body) {
        return Ok(Request::from_parts(parts, body));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > max_body as u64) {
        if len <= DRAIN_LIMIT {
            drain(&mut body, deadline).await;
        }
        return Err(ApiError::PayloadTooLarge);
    }
    let mut buffered: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(ApiError::InvalidField(FieldError::new(
                    "body",
                    format!("the body could not be read: {err}"),
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if buffered.len() + data.len() > max_body {
                drain(&mut body, deadline).await;
                return Err(ApiError::PayloadTooLarge);
            }
            buffered.extend_from_slice(&data);
        }
    }
    Ok(Request::from_parts(
        parts,
        Body::from(Bytes::from(buffered)),
    ))
}

/// Reads and drops the rest of a refused body: at most [`DRAIN_LIMIT`] bytes, until
/// `deadline` (the body timeout, so a slow sender holds nothing longer than before).
async fn drain(body: &mut Body, deadline: tokio::time::Instant) {
    let mut seen = 0u64;
    while seen <= DRAIN_LIMIT {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            _ => return,
        }
    }
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown`, then stops accepting,
/// lets requests in flight finish for at most `limits.grace`, and drops what is left.
///
/// Each connection is held to `limits`: its request heads must arrive within
/// `header_timeout` (which also closes a kept-alive connection idle that long), its
/// writes must progress within `send_timeout`, and at most `max_connections` are open at
/// once: past the cap a new connection is accepted and closed at once, without reading
/// it (counted in `http_connections_refused_total`), so the listen queue never fills
/// with clients that would wait in vain.
///
/// HTTP/1.1 only: every client of these services speaks it, and hyper's HTTP/2 server
/// has no header timeout (nor has the version sniffing of its auto builder).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
    limits: &ServeLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let local = listener.local_addr()?.to_string();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // Cancelled when the grace period is over: connections still open are dropped.
    let abandon = tokio_util::sync::CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err, &shutdown).await;
                    continue;
                }
            },
        };
        let Some(slot) = ConnectionSlot::take(&slots, &local) else {
            tracing::debug!(%peer, "connection cap reached; closing a new connection");
            drop(stream);
            continue;
        };
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.send_timeout));
        let io = TokioIo::new(Box::pin(io));
        // Each request knows its client's address (`ConnectInfo`), for whoever needs it
        // (the gateway's proxy: `remote_address` descriptors).
        let service = tower::Layer::layer(
            &axum::Extension(axum::extract::ConnectInfo(peer)),
            router.clone(),
        );
        let connection =
            graceful.watch(http.serve_connection(io, TowerToHyperService::new(service)));
        let abandon = abandon.clone();
        tokio::spawn(async move {
            // Given back however this task ends: done, failed, or dropped.
            let _slot = slot;
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection closed on an error");
                    }
                }
                () = abandon.cancelled() => {}
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!(addr = %local, "every connection closed"),
        () = tokio::time::sleep(limits.grace) => {
            tracing::warn!(grace_ms = limits.grace.as_millis() as u64, "grace period over; dropping unfinished requests");
            abandon.cancel();
        }
    }
    Ok(())
}

/// One open connection's place under the cap, and in the `http_connections_open` gauge;
/// both given back on drop.
struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl ConnectionSlot {
    /// A slot, or `None` (counted) when every one is taken.
    fn take(slots: &Arc<tokio::sync::Semaphore>, local: &str) -> Option<Self> {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total", "addr" => local.to_owned())
                .increment(1);
            return None;
        };
        let gauge = metrics::gauge!("http_connections_open", "addr" => local.to_owned());
        gauge.increment(1);
        Some(Self {
            _permit: permit,
            gauge,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.decrement(1);
    }
}

/// An `accept` that failed: a connection reset before it was accepted is the client's
/// business; anything else (out of file descriptors, mostly) is logged, and accepting
/// pauses a little rather than spin.
async fn accept_failed(err: std::io::Error, shutdown: &tokio_util::sync::CancellationToken) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accept failed; pausing for 100 ms");
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(Duration::from_millis(100)) => {}
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

    fn limits(max_in_flight: usize, body_timeout: Duration) -> ServeLimits {
        ServeLimits {
            max_in_flight,
            request_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            body_timeout,
            send_timeout: Duration::from_secs(5),
            max_connections: 10,
            grace: Duration::from_secs(1),
        }
    }

    /// A router whose `POST /echo` answers the length of the JSON body it got and whose
    /// `GET /stuck` never answers.
    fn guarded(max_in_flight: usize, body_timeout: Duration) -> Router {
        let routes = Router::new()
            .route(
                "/echo",
                axum::routing::post(|body: Bytes| async move { body.len().to_string() }),
            )
            .route(
                "/stuck",
                axum::routing::get(std::future::pending::<&'static str>),
            );
        with_guards(routes, liveness(), 64, &limits(max_in_flight, body_timeout))
    }

    async fn error_of(response: Response) -> (StatusCode, Option<String>, serde_json::Value) {
        let status = response.status();
        let connection = response
            .headers()
            .get(header::CONNECTION)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, connection, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn bodies_are_read_whole_within_their_size_and_time_limits() {
        use tower::ServiceExt;
        let router = guarded(5, Duration::from_millis(50));
        let post = |body: Body, length: Option<usize>| {
            let mut req = Request::builder().method("POST").uri("/echo");
            if let Some(length) = length {
                req = req.header(header::CONTENT_LENGTH, length);
            }
            req.body(body).unwrap()
        };

        // A body within the limit, streamed in pieces, reaches the handler whole.
        let pieces = futures::stream::iter(["{\"a\":", "1}"].map(Ok::<_, std::io::Error>));
        let response = router
            .clone()
            .oneshot(post(Body::from_stream(pieces), None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"7");

        // Declared too large: 413 at once, without reading the body.
        let never = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let response = router.clone().oneshot(post(never, Some(65))).await.unwrap();
        let (status, connection, body) = error_of(response).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(connection.as_deref(), Some("close"));
        assert_eq!(body["error"], "payload_too_large");

        // Streamed past the limit without a length: 413 too.
        let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>("0123456789")));
        let response = router
            .clone()
            .oneshot(post(Body::from_stream(chunks), None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

        // A body that does not come: 408 after the body timeout, with a JSON body.
        let never = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let started = std::time::Instant::now();
        let response = router.clone().oneshot(post(never, Some(10))).await.unwrap();
        let (status, connection, body) = error_of(response).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(connection.as_deref(), Some("close"));
        assert_eq!(body["error"], "body_timeout");
        assert!(body["detail"].as_str().unwrap().contains("50 ms"), "{body}");
    }

    /// A slow body holds no in-flight slot, and the liveness probe answers while every
    /// slot is taken.
    #[tokio::test]
    async fn slow_bodies_and_liveness_take_no_in_flight_slot() {
        use tower::ServiceExt;
        let router = guarded(1, Duration::from_secs(60));
        let get = |uri: &str| Request::builder().uri(uri).body(Body::empty()).unwrap();

        // A body still on its way: the request waits outside the shedder.
        let slow_body = {
            let router = router.clone();
            tokio::spawn(async move {
                let never =
                    Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
                let req = Request::builder()
                    .method("POST")
                    .uri("/echo")
                    .header(header::CONTENT_LENGTH, 10)
                    .body(never)
                    .unwrap();
                router.oneshot(req).await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // So the one slot is free for a request that holds it...
        let stuck = tokio::spawn(router.clone().oneshot(get("/stuck")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // ...after which the next is shed, but the liveness probe still answers.
        let response = router.clone().oneshot(get("/metrics")).await.unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let response = router.clone().oneshot(get("/healthz")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"status":"ok"}"#);
        assert!(!stuck.is_finished() && !slow_body.is_finished());
        stuck.abort();
        slow_body.abort();
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
        assert_eq!(ApiError::BodyTimeout(Duration::from_secs(1)).status(), 408);
    }
}
