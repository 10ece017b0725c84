//! Bodies read in full before a handler runs, within a size and a time limit; a refused
//! body drained (up to a bound) so that the client gets the answer rather than a reset.

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::IntoResponse;
use domain::api::FieldError;
use http_body_util::BodyExt;

use super::ApiError;

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
pub const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;

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
pub async fn drain(body: &mut Body, deadline: tokio::time::Instant) {
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
