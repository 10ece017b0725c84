//! No error of `ShouldRateLimit` reaches Envoy: its filter lets an errored call through
//! (`failure_mode_deny: false`, its default), so an error a client can cause would be a way
//! around every limit. Errors raised before our handler runs (a message over
//! [`super::MAX_MESSAGE_BYTES`], bytes that do not decode, a string field that is not
//! UTF-8: all of them reachable through request headers Envoy copies into descriptors)
//! are answered here as `OVER_LIMIT`, with the reason as the 429's body.
//!
//! Left as they are: `UNAVAILABLE` (the store is away in fail-closed mode: Envoy's
//! `failure_mode_deny` is the operator's choice of what that means) and the errors of
//! other methods.

use std::convert::Infallible;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use http_body::Frame;
use http_body_util::StreamBody;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::codegen::{BoxFuture, Bytes};
use tonic::server::NamedService;

/// The one method whose errors are refusals.
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The rate limit service with every error of `ShouldRateLimit` but `UNAVAILABLE`
/// answered as `OVER_LIMIT`.
#[derive(Clone)]
pub struct RefuseErrors<S> {
    inner: S,
}

impl<S> RefuseErrors<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for RefuseErrors<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for RefuseErrors<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let decides = request.uri().path() == SHOULD_RATE_LIMIT;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            if !decides {
                return Ok(response);
            }
            // An error before any message is "trailers-only": its status is in the headers.
            match tonic::Status::from_header_map(response.headers()) {
                Some(status)
                    if !matches!(status.code(), tonic::Code::Ok | tonic::Code::Unavailable) =>
                {
                    Ok(refusal(&status))
                }
                _ => Ok(response),
            }
        })
    }
}

/// `OVER_LIMIT` for a call that could not be read, as a complete gRPC answer.
fn refusal(status: &tonic::Status) -> http::Response<Body> {
    metrics::counter!("ratelimit_grpc_invalid_calls_total").increment(1);
    tracing::debug!(code = ?status.code(), message = status.message(), "envoy call refused as over the limit: unreadable");
    let answer: RateLimitResponse = super::refused_all(
        1,
        serde_json::json!({
            "error": "invalid_request",
            "detail": status.message(),
        }),
    );
    let message = answer.encode_to_vec();
    // A gRPC message: not compressed, its length (big-endian), its bytes.
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = futures::stream::iter([
        Ok::<_, tonic::Status>(Frame::data(Bytes::from(frame))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut response = http::Response::new(Body::new(StreamBody::new(frames)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}
