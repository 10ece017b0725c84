//! How the gateway tells a client about a decision: the rate-limit headers, and the body
//! of a refusal (today's JSON, or the IETF draft's problem details when asked for).
//!
//! Headers follow draft-ietf-httpapi-ratelimit-headers (revision 10): `RateLimit-Policy`
//! lists every enforced policy that applied (`"burst";q=10;w=1, "daily";q=1000;w=86400`),
//! `RateLimit` reports the one closest to refusing (`"burst";r=0;t=1`). The older
//! `RateLimit-Limit/-Remaining/-Reset` trio, which many clients read, carries the same
//! numbers as `RateLimit`.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::api::{CheckResponse, LimitStatus};
use serde::Serialize;
use serde_json::json;

/// The problem type of the draft's quota-exceeded problem details.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

pub use domain::headers::secs_ceil;

/// The enforced policies that refused the request.
pub fn violated(d: &CheckResponse) -> Vec<&str> {
    d.limits
        .iter()
        .filter(|l| !l.shadow && l.refused)
        .map(|l| l.name.as_str())
        .collect()
}

/// The rate-limit headers of an answer ([`domain::headers`]: the IETF fields and
/// the older trio, with the same numbers). None when no limit applied (an unlimited
/// descriptor), except the degraded marker.
pub fn rate_limit_headers(d: &CheckResponse) -> HeaderMap {
    if d.limits.is_empty() && d.limit > 0 {
        // A limiter that does not list its limits: its one policy is the built-in one.
        let legacy = CheckResponse {
            limits: vec![LimitStatus {
                name: "default".into(),
                limit: d.limit,
                remaining: d.remaining,
                reset_after_ms: d.reset_after_ms,
                retry_after_ms: d.retry_after_ms,
                window_ms: d.window_ms,
                refused: !d.allowed,
                ..LimitStatus::default()
            }],
            ..d.clone()
        };
        return rate_limit_headers(&legacy);
    }
    // Room for the six fields, the answer's `Content-Type` and a 429's `Retry-After`: the
    // map becomes the response's own ([`json`]), never grown or merged.
    let mut h = HeaderMap::with_capacity(8);
    for (name, value) in domain::headers::all(d) {
        // The field's own bytes, checked, not copied.
        if let Ok(value) = HeaderValue::try_from(value) {
            h.insert(header_name(name), value);
        }
    }
    h
}

/// A field name of [`domain::headers`] as a header name made at compile time (parsing
/// the name again for every answer was a tenth of the headers' cost).
fn header_name(name: &'static str) -> HeaderName {
    use domain::headers as f;
    static NAMES: [HeaderName; 6] = [
        HeaderName::from_static(f::RATELIMIT_POLICY),
        HeaderName::from_static(f::RATELIMIT),
        HeaderName::from_static(f::RATELIMIT_LIMIT),
        HeaderName::from_static(f::RATELIMIT_REMAINING),
        HeaderName::from_static(f::RATELIMIT_RESET),
        HeaderName::from_static(f::DEGRADED),
    ];
    NAMES
        .iter()
        .find(|known| known.as_str() == name)
        .cloned()
        .unwrap_or_else(|| HeaderName::from_static(name))
}

/// A JSON answer whose headers are `headers` (the rate-limit fields), taken as the
/// response's own map: the bytes axum's `(status, headers, Json(body))` answers, without
/// building a second map and merging the first into it.
pub fn json(status: StatusCode, mut headers: HeaderMap, body: &impl Serialize) -> Response {
    let Ok(bytes) = serde_json::to_vec(body) else {
        // Our bodies are strings and numbers; axum answers a failed one the same way.
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut response = Response::new(axum::body::Body::from(bytes));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Whether the client asked for problem details (`Accept: application/problem+json`).
pub fn wants_problem(request_headers: &HeaderMap) -> bool {
    request_headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("application/problem+json"))
}

/// The 429 of a refused request, the same for `POST /api` and for a proxied path:
/// `Retry-After` added to the rate-limit `headers`, and the body the client asked for
/// (problem details, or the JSON body naming the policies that refused).
pub fn limited(
    d: &CheckResponse,
    user_id: &str,
    request_headers: &HeaderMap,
    mut headers: HeaderMap,
) -> Response {
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(secs_ceil(d.retry_after_ms).max(1)),
    );
    if wants_problem(request_headers) {
        return problem(d, headers);
    }
    let body = LimitedBody {
        error: "rate_limited",
        user_id,
        retry_after_ms: d.retry_after_ms,
        violated_policies: violated(d),
    };
    json(StatusCode::TOO_MANY_REQUESTS, headers, &body)
}

/// The JSON body of a 429.
#[derive(Serialize)]
struct LimitedBody<'a> {
    error: &'static str,
    user_id: &'a str,
    retry_after_ms: u64,
    /// The enforced policies that refused the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    violated_policies: Vec<&'a str>,
}

/// A 429 in the draft's problem-details form.
pub fn problem(d: &CheckResponse, mut headers: HeaderMap) -> Response {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    let body = json!({
        "type": QUOTA_EXCEEDED,
        "title": "Request cannot be satisfied as assigned quota has been exceeded",
        "status": 429,
        "violated-policies": violated(d),
        "retry_after_ms": d.retry_after_ms,
    });
    (
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        headers,
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str, limit: u64, remaining: u64, window_ms: u64, refused: bool) -> LimitStatus {
        LimitStatus {
            name: name.into(),
            algorithm: "token_bucket".into(),
            limit,
            remaining,
            window_ms,
            refused,
            reset_after_ms: 1000,
            retry_after_ms: if refused { 1000 } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn every_policy_is_listed_and_the_closest_is_reported() {
        let d = CheckResponse {
            allowed: true,
            limit: 10,
            remaining: 2,
            reset_after_ms: 1500,
            window_ms: 1000,
            limits: vec![
                limit("burst", 10, 2, 1000, false),
                limit("daily", 1000, 990, 86_400_000, false),
            ],
            ..Default::default()
        };
        let h = rate_limit_headers(&d);
        assert_eq!(
            h["ratelimit-policy"],
            "\"burst\";q=10;w=1, \"daily\";q=1000;w=86400"
        );
        assert_eq!(h["ratelimit"], "\"burst\";r=2;t=1");
        assert_eq!(h["ratelimit-remaining"], "2");
    }

    #[test]
    fn a_refusal_names_the_violated_policies_and_shadow_limits_stay_hidden() {
        let mut shadow = limit("trial", 1, 0, 1000, true);
        shadow.shadow = true;
        let d = CheckResponse {
            allowed: false,
            limits: vec![
                limit("burst", 10, 5, 1000, false),
                limit("daily\"x", 1000, 0, 86_400_000, true),
                shadow,
            ],
            ..Default::default()
        };
        assert_eq!(violated(&d), ["daily\"x"]);
        let h = rate_limit_headers(&d);
        assert!(
            h["ratelimit"]
                .to_str()
                .unwrap()
                .starts_with("\"daily\\\"x\"")
        );
        assert!(!h["ratelimit-policy"].to_str().unwrap().contains("trial"));
    }

    /// `json` answers what axum's `(status, headers, Json(body))` answered before it: the
    /// same status, the same fields (the rate-limit ones and `Content-Type`) and the same
    /// body bytes, for an allowed answer and a refusal (with its `Retry-After`).
    #[tokio::test]
    async fn a_json_answer_is_the_one_axum_builds() {
        use http_body_util::BodyExt;
        let d = CheckResponse {
            allowed: false,
            retry_after_ms: 1500,
            degraded: true,
            limits: vec![
                limit("burst", 10, 0, 1000, true),
                limit("daily", 1000, 990, 86_400_000, false),
            ],
            ..Default::default()
        };
        let body = LimitedBody {
            error: "rate_limited",
            user_id: "alice \"quoted\" é",
            retry_after_ms: d.retry_after_ms,
            violated_policies: violated(&d),
        };
        let mut headers = rate_limit_headers(&d);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(2u64));
        for status in [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
            let ours = json(status, headers.clone(), &body);
            let axums = (status, headers.clone(), axum::Json(&body)).into_response();
            assert_eq!(ours.status(), axums.status());
            let sorted = |h: &HeaderMap| {
                let mut fields: Vec<(String, Vec<u8>)> = h
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                    .collect();
                fields.sort();
                fields
            };
            assert_eq!(sorted(ours.headers()), sorted(axums.headers()));
            assert_eq!(ours.headers().len(), 8, "{:?}", ours.headers());
            assert_eq!(ours.headers()[header::CONTENT_TYPE], "application/json");
            let ours = ours.into_body().collect().await.unwrap().to_bytes();
            let axums = axums.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(ours, axums);
        }
    }

    #[test]
    fn no_limit_means_no_headers() {
        let d = CheckResponse {
            allowed: true,
            ..Default::default()
        };
        assert!(rate_limit_headers(&d).is_empty());
    }
}
