use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;

use domain::api::FieldError;

use super::json::is_json;
use super::layers::with_load_shedding;
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
fn guarded(max_in_flight: usize, body_timeout: Duration) -> Guarded {
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

/// A route answered before the router ([`Direct`]) answers what the router answers for
/// it, whatever the request: the same statuses and bodies (the JSON extractor's 415, its
/// 413 at the route's body limit, 400 naming the field; the router's 405 for another
/// method), within the same in-flight bound and timeout, and counted in the HTTP metrics
/// under its route.
#[tokio::test]
async fn a_direct_route_answers_as_the_router_would() {
    use tower::ServiceExt;
    let handler = |axum::extract::State(greeting): axum::extract::State<&'static str>,
                   ValidJson(r): ValidJson<domain::api::CheckRequest>| async move {
        if r.user_id == "stuck" {
            std::future::pending::<()>().await;
        }
        format!("{greeting} {}", r.user_id)
    };
    let make = |direct: bool, max_in_flight: usize| {
        let routes = Router::new()
            .route("/echo", axum::routing::post(handler))
            .with_state("hello");
        let routes = crate::metrics::with_http_metrics(routes, "direct-test-router");
        let mut limits = limits(max_in_flight, Duration::from_secs(5));
        limits.request_timeout = Duration::from_millis(300);
        let guarded = with_guards(routes, liveness(), 64 * 1024, &limits);
        if direct {
            guarded.with_direct(Direct::post("/echo", handler, "hello", "direct-test"))
        } else {
            guarded
        }
    };
    let request = |method: &str, content_type: &str, body: String| {
        Request::builder()
            .method(method)
            .uri("/echo")
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap()
    };
    let big = format!(r#"{{"user_id":"u1","pad":"{}"}}"#, "x".repeat(5000));
    let cases = [
        ("POST", "application/json", r#"{"user_id":"u1"}"#.to_owned()),
        ("POST", "application/json", big.clone()),
        ("POST", "text/plain", big),
        ("POST", "application/json", r#"{"user_id":""}"#.to_owned()),
        ("POST", "application/json", "{".to_owned()),
        ("GET", "application/json", String::new()),
        (
            "POST",
            "application/json",
            r#"{"user_id":"stuck"}"#.to_owned(),
        ),
    ];
    let mut answers = Vec::new();
    for direct in [false, true] {
        let service = make(direct, 5);
        let mut these = Vec::new();
        for (method, content_type, body) in &cases {
            let response = service
                .clone()
                .oneshot(request(method, content_type, body.clone()))
                .await
                .unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            these.push((status, body));
        }
        answers.push(these);
    }
    let statuses: Vec<u16> = answers[1].iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(statuses, [200, 413, 415, 400, 400, 405, 503]);
    assert_eq!(&answers[1][0].1[..], b"hello u1");
    assert_eq!(
        answers[0], answers[1],
        "the router's answers, then the direct route's"
    );

    // One slot: a direct request that holds it sheds the next, direct or not.
    let service = make(true, 1);
    let stuck = tokio::spawn(service.clone().oneshot(request(
        "POST",
        "application/json",
        r#"{"user_id":"stuck"}"#.to_owned(),
    )));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shed = service
        .clone()
        .oneshot(request(
            "POST",
            "application/json",
            r#"{"user_id":"u2"}"#.to_owned(),
        ))
        .await
        .unwrap();
    assert_eq!(shed.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        stuck.await.unwrap().unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    let body = crate::metrics::render()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    // A timed-out request is not counted under its route, through the router or not.
    for status in [200, 413, 415, 400] {
        let series = format!(
            r#"http_requests_total{{service="direct-test",route="/echo",status="{status}"}}"#
        );
        assert!(text.contains(&series), "{series} missing from\n{text}");
    }
    assert!(
        text.contains(
            r#"http_request_duration_seconds_count{service="direct-test",route="/echo"}"#
        ),
        "{text}"
    );
}
