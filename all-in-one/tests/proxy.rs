//! The gateway in front of a real service: an upstream HTTP server started here on a free
//! port records every request it receives; the all-in-one proxies to it with
//! `UPSTREAM_URL`. Allowed requests arrive byte for byte, refused ones never arrive, an
//! absent or hanging upstream is a JSON 502 or 504, hop-by-hop headers go.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream received, one request at a time.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    /// Path and query, as received.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

/// A real HTTP service on a free port: records each request, answers 201 with a body, a
/// header of its own and hop-by-hop headers that must not reach the client.
async fn upstream() -> (SocketAddr, Log) {
    async fn record(State(log): State<Log>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        log.lock().unwrap().push(Received {
            method: parts.method.to_string(),
            target: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<bytes>").to_owned()))
                .collect(),
            body: body.to_vec(),
        });
        let mut response = (StatusCode::CREATED, "hello from upstream").into_response();
        let h = response.headers_mut();
        h.insert("x-upstream", HeaderValue::from_static("yes"));
        h.insert("connection", HeaderValue::from_static("x-upstream-hop"));
        h.insert("x-upstream-hop", HeaderValue::from_static("secret"));
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        response
    }
    let log = Log::default();
    let listener = listener().await;
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(record).with_state(log.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, log)
}

fn count(log: &Log) -> usize {
    log.lock().unwrap().len()
}

/// The all-in-one in front of `upstream`, capacity 5 refilled at 2/s, with `extra` args.
async fn gateway_for(upstream: SocketAddr, extra: &[&str]) -> all_in_one::System {
    let url = format!("http://{upstream}");
    let mut args = vec!["--upstream-url", url.as_str()];
    args.extend_from_slice(&POLICY);
    args.extend_from_slice(extra);
    all_in_one(&args).await
}

#[tokio::test]
async fn allowed_requests_reach_the_upstream_byte_for_byte() {
    let (up, log) = upstream().await;
    let system = gateway_for(up, &[]).await;
    let gw = system.gateway_addr;

    // 1 MiB, far past the 4 KiB that the gateway's own routes accept.
    let body: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = http()
        .post(format!("http://{gw}/v1/orders/7?x=1&y=%20two"))
        .header("x-custom", "kept as is")
        .header("content-type", "application/octet-stream")
        .header("x-forwarded-for", "198.51.100.9")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-upstream"], "yes");
    // The limit the request was counted against, as on POST /api.
    assert_eq!(r.headers()["ratelimit-limit"], "5");
    assert_eq!(r.headers()["ratelimit-remaining"], "4");
    assert_eq!(r.text().await.unwrap(), "hello from upstream");

    let got = log.lock().unwrap()[0].clone();
    assert_eq!(got.method, "POST");
    assert_eq!(got.target, "/v1/orders/7?x=1&y=%20two");
    assert_eq!(got.body.len(), body.len());
    assert!(got.body == body, "the body arrived changed");
    assert_eq!(got.header("x-custom"), Some("kept as is"));
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("content-length"), Some("1048576"));
    // The Host the client asked for; this hop added to the forwarding headers.
    assert_eq!(got.header("host"), Some(gw.to_string().as_str()));
    assert_eq!(
        got.header("x-forwarded-for"),
        Some("198.51.100.9, 127.0.0.1")
    );
    assert_eq!(got.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        got.header("forwarded"),
        Some(format!("for=127.0.0.1;proto=http;host=\"{gw}\"").as_str())
    );

    // The gateway's own routes are still its own: never forwarded.
    let r = post(&http(), &format!("http://{gw}/api"), "u1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        http()
            .get(format!("http://{gw}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(count(&log), 1);
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn refused_requests_never_reach_the_upstream() {
    let (up, log) = upstream().await;
    let system = gateway_for(up, &[]).await;
    let url = format!("http://{}/things", system.gateway_addr);
    let client = http();
    for _ in 0..5 {
        assert_eq!(client.get(&url).send().await.unwrap().status(), 201);
    }
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert_eq!(r.headers()["ratelimit-policy"], "\"default\";q=5;w=3");
    assert!(r.headers().contains_key("ratelimit"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["user_id"], "127.0.0.1");
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);

    // Problem details when asked for, as on POST /api; a refused body is not forwarded.
    let r = client
        .post(&url)
        .header("accept", "application/problem+json")
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);

    assert_eq!(
        count(&log),
        5,
        "only the allowed requests reached the upstream"
    );
    system.shutdown().await.unwrap();
}

fn descriptors_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.yaml", testkit::unique("descriptors")));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn two_api_keys_are_limited_apart_and_no_key_is_not_limited() {
    let (up, log) = upstream().await;
    // The default domain's built-in rule, keyed by the API key instead of the address.
    let path = descriptors_file(
        "descriptors:\n  - [{request_header: {header_name: X-Api-Key, descriptor_key: user_id}}]\n",
    );
    let system = gateway_for(up, &["--upstream-descriptors-path", path.to_str().unwrap()]).await;
    let url = format!("http://{}/v1/search", system.gateway_addr);
    let client = http();
    let call = |key: Option<&'static str>| {
        let mut request = client.get(&url);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        async move { request.send().await.unwrap() }
    };
    let key_a = Box::leak(testkit::unique("key-a").into_boxed_str());
    let key_b = Box::leak(testkit::unique("key-b").into_boxed_str());
    for _ in 0..5 {
        assert_eq!(call(Some(key_a)).await.status(), 201);
    }
    assert_eq!(call(Some(key_a)).await.status(), 429, "key A is spent");
    let r = call(Some(key_b)).await;
    assert_eq!(r.status(), 201, "key B has its own bucket");
    assert_eq!(r.headers()["ratelimit-remaining"], "4");
    assert_eq!(count(&log), 6);

    // No key: the one descriptor is dropped (as Envoy does), so nothing limits it.
    for _ in 0..8 {
        let r = call(None).await;
        assert_eq!(r.status(), 201);
        assert!(!r.headers().contains_key("ratelimit-limit"));
    }
    assert_eq!(count(&log), 14);

    // A key longer than the bound: 400 naming the header, and not forwarded.
    let r = client
        .get(&url)
        .header("x-api-key", "k".repeat(257))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "header X-Api-Key");
    assert_eq!(count(&log), 14);
    system.shutdown().await.unwrap();
    std::fs::remove_file(path).unwrap();
}

/// A `path` rule holds whatever spelling of the path a client sends: `/%73earch`,
/// `/./search`, `//search`, `/x/../search` are `/search` to the upstream, so they are
/// `/search` to the rules too (once they escaped a `path: "/search*"` limit); the upstream
/// receives the normal form, the query as sent.
#[tokio::test]
async fn every_spelling_of_a_path_meets_its_limit() {
    let (up, log) = upstream().await;
    let descriptors = descriptors_file("domain: web\ndescriptors:\n  - [{path: {}}]\n");
    let rules = RulesFile::new(
        "domain: web\ndescriptors:\n  - key: path\n    value: \"/search*\"\n    rate_limit: {name: search, unit: hour, requests_per_unit: 1}\n",
    );
    let system = gateway_for(
        up,
        &[
            "--upstream-descriptors-path",
            descriptors.to_str().unwrap(),
            "--rules-path",
            &rules.arg(),
        ],
    )
    .await;
    let gw = system.gateway_addr;
    let get = |target: &'static str| async move {
        let answer = raw(
            gw,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        answer[9..12].to_owned()
    };
    assert_eq!(get("/search?q=1").await, "201");
    for target in [
        "/search?q=2",
        "/%73earch?q=3",
        "/./search",
        "//search",
        "/x/../search",
        "/%2E/search",
        "/%2e%2e/search",
        "/SEARCH/../search",
    ] {
        assert_eq!(get(target).await, "429", "{target}");
    }
    assert_eq!(count(&log), 1, "none of the spellings reached the upstream");
    assert_eq!(log.lock().unwrap()[0].target, "/search?q=1");
    // Another path is another resource; its normal form is what the upstream receives.
    assert_eq!(get("/a/./b/../%63?x=%2f").await, "201");
    assert_eq!(log.lock().unwrap()[1].target, "/a/c?x=%2f");
    system.shutdown().await.unwrap();
    std::fs::remove_file(descriptors).unwrap();
}

#[tokio::test]
async fn an_absent_upstream_is_a_json_502() {
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let system = gateway_for(gone, &[]).await;
    let started = Instant::now();
    let r = http()
        .get(format!("http://{}/anything", system.gateway_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(started.elapsed() < Duration::from_secs(2));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway");
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_hanging_upstream_is_a_json_504_within_the_timeout() {
    // Accepts connections and never answers.
    let hanging = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hanging.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            open.push(socket);
        }
    });
    let system = gateway_for(addr, &["--upstream-timeout-ms", "300"]).await;
    let started = Instant::now();
    let r = http()
        .get(format!("http://{}/slow", system.gateway_addr))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "gateway_timeout");
    assert!(body["detail"].as_str().unwrap().contains("300 ms"));
    held.abort();
    system.shutdown().await.unwrap();
}

/// One raw HTTP/1.1 exchange: the request as written, the response as read (the
/// connection is closed by the request's `Connection: close`).
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8(response).unwrap()
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (up, log) = upstream().await;
    let system = gateway_for(up, &[]).await;
    let response = raw(
        system.gateway_addr,
        "POST /hop HTTP/1.1\r\nHost: shop.example\r\nConnection: close, X-Client-Hop\r\n\
         X-Client-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
         Proxy-Authorization: Basic eA==\r\nX-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let head = response
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 201"), "{response}");
    assert!(head.contains("x-upstream: yes"), "{head}");
    assert!(!head.contains("x-upstream-hop"), "{head}");
    assert!(!head.contains("proxy-authenticate"), "{head}");
    assert!(response.ends_with("hello from upstream"), "{response}");

    let got = log.lock().unwrap()[0].clone();
    assert_eq!(got.body, b"hello world");
    assert_eq!(got.header("x-kept"), Some("yes"));
    assert_eq!(got.header("host"), Some("shop.example"));
    for gone in ["x-client-hop", "keep-alive", "te", "proxy-authorization"] {
        assert_eq!(got.header(gone), None, "{gone} reached the upstream");
    }
    // The client's Connection: close is its own; the gateway keeps its pool alive.
    assert_ne!(got.header("connection"), Some("close"));
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_descriptors_file_stops_the_start_naming_file_line_and_field() {
    let path = descriptors_file(
        "domain: api\ndescriptors:\n  - [{request_header: {header_name: X-Api-Key}}]\n",
    );
    let config = <all_in_one::Config as clap::Parser>::try_parse_from([
        "test",
        "--upstream-url",
        "http://127.0.0.1:9",
        "--upstream-descriptors-path",
        path.to_str().unwrap(),
    ])
    .unwrap();
    let err = all_in_one::System::start(
        config,
        listener().await,
        listener().await,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .expect("a bad descriptors file refuses to start");
    let message = err.to_string();
    assert!(
        message.contains(&format!("{}:3:", path.display())),
        "{message}"
    );
    assert!(message.contains("descriptor_key"), "{message}");
    std::fs::remove_file(path).unwrap();
}

#[tokio::test]
async fn without_an_upstream_unknown_paths_are_still_404() {
    let system = all_in_one(&POLICY).await;
    let r = http()
        .get(format!("http://{}/v1/orders", system.gateway_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    system.shutdown().await.unwrap();
}
