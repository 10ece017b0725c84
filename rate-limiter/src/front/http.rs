//! The limiter's HTTP API: `POST /check`, `POST /check/batch`, `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, and envoyproxy/ratelimit's `POST /json` ([`crate::front::grpc::json`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::api::{
    BatchRequest, BatchResponse, BatchResult, CheckRequest, CheckResponse, FieldError,
    MAX_BATCH_BODY_BYTES,
};
use kit::http::{ApiError, Direct, Guarded, ServeLimits, ValidJson, liveness, with_guards};
use serde_json::json;

use crate::config::ResponseHeaders;
use crate::front::grpc::{self, CallError, RateLimitService};
use crate::limiter::Limiter;

/// The limiter's routes, with body limits, JSON 404/405, metrics, load shedding and the
/// slow-client guards ([`with_guards`]); `POST /json` answers with the IETF header fields.
pub fn router(
    limiter: Arc<Limiter>,
    limits: &ServeLimits,
    admin_token: Option<kit::admin::AdminToken>,
) -> Guarded {
    router_with(limiter, limits, admin_token, ResponseHeaders::default())
}

/// [`router`], with `POST /json` answering with the given header fields.
pub fn router_with(
    limiter: Arc<Limiter>,
    limits: &ServeLimits,
    admin_token: Option<kit::admin::AdminToken>,
    headers: ResponseHeaders,
) -> Guarded {
    let admin = crate::front::admin::routes(limiter.clone(), admin_token);
    let envoy = Router::new()
        .route(
            "/json",
            post(envoy_json).layer(DefaultBodyLimit::max(grpc::MAX_MESSAGE_BYTES)),
        )
        .with_state(RateLimitService::new(limiter.clone(), headers));
    let routes = Router::new()
        .route("/check", post(check))
        .route(
            "/check/batch",
            post(check_batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        )
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(limiter.clone())
        .merge(admin)
        .merge(envoy);
    let routes = kit::metrics::with_http_metrics(routes, "rate-limiter");
    // Outside the load shedder: a limiter at its in-flight limit is busy, not dead.
    let probes = kit::metrics::with_http_metrics(liveness(), "rate-limiter");
    // `POST /check`, the hot route, answered before the router (the same handler).
    with_guards(routes, probes, MAX_BATCH_BODY_BYTES, limits).with_direct(Direct::post(
        "/check",
        check,
        limiter,
        "rate-limiter",
    ))
}

async fn check(
    State(limiter): State<Arc<Limiter>>,
    ValidJson(request): ValidJson<CheckRequest>,
) -> Result<axum::response::Response, ApiError> {
    Ok(json_answer(&limiter.check_response(&request).await?))
}

/// What `Json(answer)` answers, serialised into one `Vec` sized for a decision: axum's
/// `Json` writes through a `BytesMut` writer that checks and grows its buffer at every
/// token, which costs more than the decision itself. The response is made as it is sent
/// (`(headers, body).into_response()` sets a content type and then replaces it).
fn json_answer(answer: &CheckResponse) -> axum::response::Response {
    let mut body = Vec::with_capacity(512);
    encode_check_response(answer, &mut body);
    let mut response = axum::response::Response::new(axum::body::Body::from(body));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// `serde_json::to_writer(out, answer)`, by hand: the field names are constants here, so
/// only each limit's name and algorithm go through JSON's escaping, where serde_json
/// escapes every key of every answer. Held to serde_json's bytes by the tests below.
fn encode_check_response(r: &CheckResponse, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"allowed\":");
    push_bool(out, r.allowed);
    out.extend_from_slice(b",\"limit\":");
    push_u64(out, r.limit);
    out.extend_from_slice(b",\"remaining\":");
    push_u64(out, r.remaining);
    out.extend_from_slice(b",\"retry_after_ms\":");
    push_u64(out, r.retry_after_ms);
    out.extend_from_slice(b",\"reset_after_ms\":");
    push_u64(out, r.reset_after_ms);
    out.extend_from_slice(b",\"window_ms\":");
    push_u64(out, r.window_ms);
    out.extend_from_slice(b",\"degraded\":");
    push_bool(out, r.degraded);
    out.extend_from_slice(b",\"limits\":[");
    for (i, l) in r.limits.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        push_str(out, &l.name);
        out.extend_from_slice(b",\"algorithm\":");
        push_str(out, &l.algorithm);
        out.extend_from_slice(b",\"descriptor\":");
        push_u64(out, l.descriptor as u64);
        out.extend_from_slice(b",\"limit\":");
        push_u64(out, l.limit);
        out.extend_from_slice(b",\"remaining\":");
        push_u64(out, l.remaining);
        out.extend_from_slice(b",\"reset_after_ms\":");
        push_u64(out, l.reset_after_ms);
        out.extend_from_slice(b",\"retry_after_ms\":");
        push_u64(out, l.retry_after_ms);
        out.extend_from_slice(b",\"window_ms\":");
        push_u64(out, l.window_ms);
        out.extend_from_slice(b",\"refused\":");
        push_bool(out, l.refused);
        out.extend_from_slice(b",\"shadow\":");
        push_bool(out, l.shadow);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

fn push_bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string, escaped as serde_json escapes it (writing a `str` into a `Vec` cannot fail).
fn push_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Several checks in one exchange (what the gateway sends under load): each is decided,
/// or refused, as `POST /check` would, in order.
async fn check_batch(
    State(limiter): State<Arc<Limiter>>,
    ValidJson(batch): ValidJson<BatchRequest>,
) -> Json<BatchResponse> {
    // Read before deciding: a change during the batch moves it, and the gateway then
    // distrusts what this answer says.
    let generation = limiter.generation();
    if batch.dropped > 0 {
        tracing::warn!(
            dropped = batch.dropped,
            "refusal notices that were not valid were dropped (the batch's checks are decided)"
        );
        metrics::counter!("ratelimit_refusal_notices_dropped_total")
            .increment(batch.dropped as u64);
    }
    limiter.count_refused(&batch.refused);
    let results = limiter
        .check_batch(&batch.checks, batch.id.as_deref(), batch.again)
        .await
        .into_iter()
        .map(|result| match result {
            Ok(checked) => BatchResult::Ok(checked.into_response()),
            Err(err) => BatchResult::Error(err),
        })
        .collect();
    Json(BatchResponse {
        results,
        generation: Some(generation),
        incarnation: Some(limiter.incarnation()),
    })
}

/// envoyproxy/ratelimit's `POST /json`: `ShouldRateLimit` in proto3 JSON, any content
/// type (their examples post with curl's default); 200 OK, 429 over the limit.
async fn envoy_json(
    State(service): State<RateLimitService>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::response::Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::InvalidField(FieldError::new("body", rejection.body_text()))
        }
    })?;
    let request = grpc::json::request(&body)?;
    let answer = service
        .should_rate_limit(&request)
        .await
        .map_err(|err| match err {
            CallError::Invalid(e) => ApiError::InvalidField(e),
            CallError::Unavailable => ApiError::Unavailable {
                what: "rate-limit store",
                retry_after_secs: 1,
            },
        })?;
    let over = answer.overall_code == grpc::OVER_LIMIT;
    let status = if over {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::OK
    };
    Ok((status, Json(grpc::json::response(&answer))).into_response())
}

async fn metrics(State(limiter): State<Arc<Limiter>>) -> axum::response::Response {
    limiter.export_metrics();
    kit::metrics::render()
}

async fn ready(State(limiter): State<Arc<Limiter>>) -> (StatusCode, Json<serde_json::Value>) {
    if limiter.ready().await {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "detail": "the rate-limit store is unreachable"})),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::api::LimitStatus;

    fn limit(name: &str, n: u64) -> LimitStatus {
        LimitStatus {
            name: name.to_owned(),
            algorithm: "sliding_window".to_owned(),
            descriptor: n as usize,
            limit: n,
            remaining: n / 2,
            reset_after_ms: n * 3,
            retry_after_ms: n * 5,
            window_ms: n * 7,
            refused: n.is_multiple_of(2),
            shadow: n.is_multiple_of(3),
        }
    }

    /// The hand-written answer is byte for byte serde_json's, whatever the numbers and
    /// whatever a rule's name holds.
    #[test]
    fn the_check_answer_is_serde_jsons() {
        let answers = [
            CheckResponse::default(),
            CheckResponse {
                allowed: true,
                limit: 10,
                remaining: 9,
                retry_after_ms: 0,
                reset_after_ms: 1_000,
                window_ms: 10_000,
                degraded: false,
                limits: vec![limit("default", 10)],
            },
            CheckResponse {
                allowed: false,
                limit: u64::MAX,
                remaining: 0,
                retry_after_ms: 1,
                reset_after_ms: 123_456_789,
                window_ms: 86_400_000,
                degraded: true,
                limits: vec![
                    limit("q\"uote\\back\nline\u{1}ctl\u{7f}é\u{2028}", 1),
                    limit("", 0),
                    limit("api:burst", 1_000_000_007),
                ],
            },
        ];
        for answer in answers {
            let mut ours = Vec::new();
            encode_check_response(&answer, &mut ours);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }
}
