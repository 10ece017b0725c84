//! Bodies read in full before a handler runs, within a size and a time limit; a refused
//! body drained (up to a bound) so that the client gets the answer rather than a reset.

use std::time::Duration;

use axum::BoxError;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use domain::api::FieldError;
use http_body_util::BodyExt;

use super::ApiError;

/// The answer to a body refused by [`buffer_body`]: its error, and the connection closed
/// (what is left of the body is not read).
pub(crate) fn refused_body(err: ApiError) -> Response {
    let mut response = err.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
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

/// `req` with its body read into memory: at most `max_body` bytes (413 otherwise), within
/// `timeout` (408 otherwise). Before a 413 the rest of the body, up to [`DRAIN_LIMIT`] and
/// within the same `timeout`, is read and dropped, so that the client gets the answer
/// rather than a reset. A body that arrives in one piece (the usual small JSON body) is
/// kept as it came, without a copy.
pub(crate) async fn buffer_body<B>(
    req: axum::http::Request<B>,
    max_body: usize,
    timeout: Duration,
) -> Result<Request, ApiError>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return Ok(Request::from_parts(parts, Body::new(body)));
    }
    let mut body = std::pin::pin!(body);
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
    let mut buffered = Buffered::default();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout(timeout)),
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                let err: BoxError = err.into();
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
            buffered.push(data);
        }
    }
    Ok(Request::from_parts(
        parts,
        Body::from(buffered.into_bytes()),
    ))
}

/// A body's pieces as they are read: the first kept as it came, the others (rare: a body
/// split across reads) copied after it.
#[derive(Default)]
enum Buffered {
    #[default]
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl Buffered {
    fn len(&self) -> usize {
        match self {
            Buffered::Empty => 0,
            Buffered::One(b) => b.len(),
            Buffered::Many(v) => v.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::take(self) {
            Buffered::Empty => Buffered::One(data),
            Buffered::One(first) => {
                let mut all = Vec::with_capacity(first.len() + data.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                Buffered::Many(all)
            }
            Buffered::Many(mut all) => {
                all.extend_from_slice(&data);
                Buffered::Many(all)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Buffered::Empty => Bytes::new(),
            Buffered::One(b) => b,
            Buffered::Many(v) => Bytes::from(v),
        }
    }
}

/// Reads and drops the rest of a refused body: at most [`DRAIN_LIMIT`] bytes, until
/// `deadline` (the body timeout, so a slow sender holds nothing longer than before).
pub async fn drain<B: HttpBody<Data = Bytes> + Unpin>(
    body: &mut B,
    deadline: tokio::time::Instant,
) {
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
