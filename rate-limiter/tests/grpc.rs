//! Envoy's rate limit service through a Rust gRPC client built from the same protos: the
//! protocol corners Envoy does not send (bounds, mistakes, descriptors with their own
//! `hits_addend`, refunds), the health service with Redis down, and `POST /json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde_json::{Value, json};
use testkit::RedisServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const RULES: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limits:
      - {name: burst, unit: minute, requests_per_unit: 5}
      - {name: daily, unit: day, requests_per_unit: 100, algorithm: fixed_window}
  - key: bytes
    rate_limit: {name: bytes, unit: minute, requests_per_unit: 10}
  - key: free
    rate_limit: {unlimited: true}
"#;

/// A limiter serving gRPC and HTTP on free ports, with [`RULES`].
struct Service {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    dir: PathBuf,
}

impl Service {
    async fn start(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(testkit::unique("grpc-rules"));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = dir.join("api.yaml");
        std::fs::write(&rules, RULES).unwrap();
        let rules = rules.display().to_string();
        let mut argv = vec!["rate-limiter", "--rules-path", rules.as_str()];
        argv.extend_from_slice(extra);
        let config = rate_limiter::config::LimiterConfig::try_parse_from(argv).unwrap();
        let shutdown = CancellationToken::new();
        let service = rate_limiter::Standalone::start(&config, testkit::unique("grpc"), &shutdown)
            .await
            .unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                service
                    .serve_all(http, Some(grpc), &config.serve.limits(), shutdown)
                    .await
                    .unwrap();
            })
        };
        Self {
            grpc: grpc_addr,
            http: http_addr,
            shutdown,
            task,
            dir,
        }
    }

    async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .max_encoding_message_size(1024 * 1024)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| rate_limit_descriptor::Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..Default::default()
    }
}

fn with_addend(mut d: RateLimitDescriptor, addend: u64) -> RateLimitDescriptor {
    d.hits_addend = Some(UInt64Value { value: addend });
    d
}

fn request(descriptors: Vec<RateLimitDescriptor>, hits_addend: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: "api".into(),
        descriptors,
        hits_addend,
    }
}

async fn call(
    client: &mut RateLimitServiceClient<Channel>,
    r: RateLimitRequest,
) -> RateLimitResponse {
    client.should_rate_limit(r).await.unwrap().into_inner()
}

fn codes(r: &RateLimitResponse) -> Vec<Code> {
    r.statuses
        .iter()
        .map(|s| Code::try_from(s.code).unwrap())
        .collect()
}

/// One status per descriptor, in order: the limit closest to refusing, the unit, what is
/// left; an unlimited descriptor and one no rule matches are OK without a limit; the IETF
/// header fields list both limits of the key.
#[tokio::test]
async fn statuses_follow_the_descriptors() {
    let s = Service::start(&[]).await;
    let mut c = s.client().await;
    let r = call(
        &mut c,
        request(
            vec![
                descriptor(&[("free", "x")]),
                descriptor(&[("api_key", "k1")]),
                descriptor(&[("nobody", "y")]),
            ],
            2,
        ),
    )
    .await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(codes(&r), [Code::Ok, Code::Ok, Code::Ok]);
    assert_eq!(r.statuses[0].current_limit, None);
    assert_eq!(r.statuses[2].current_limit, None);
    let key = &r.statuses[1];
    let limit = key.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit),
        ("burst", 5, 2),
        "5 a minute (unit 2 = MINUTE)"
    );
    assert_eq!(key.limit_remaining, 3, "cost 2 of 5");
    let headers: Vec<(&str, &str)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        headers[0],
        (
            "ratelimit-policy",
            "\"burst\";q=5;w=60, \"daily\";q=100;w=86400"
        )
    );
    assert!(headers[1].1.starts_with("\"burst\";r=3;"), "{headers:?}");
    s.stop().await;
}

/// Descriptors with their own `hits_addend` are decided as groups of one cost, all or
/// nothing: when one group is over, the others are refunded.
#[tokio::test]
async fn per_descriptor_hits_addend_is_all_or_nothing() {
    let s = Service::start(&[]).await;
    let mut c = s.client().await;
    // bytes: 10 a minute; api_key: 5 a minute.
    let both = |bytes: u64| {
        request(
            vec![
                with_addend(descriptor(&[("bytes", "b1")]), bytes),
                descriptor(&[("api_key", "k1")]),
            ],
            1,
        )
    };
    let r = call(&mut c, both(8)).await;
    assert_eq!(codes(&r), [Code::Ok, Code::Ok]);
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (2, 4)
    );
    let r = call(&mut c, both(3)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&r), [Code::OverLimit, Code::Ok]);
    // The key's request was taken, then given back: still 4.
    let r = call(&mut c, both(2)).await;
    assert_eq!(codes(&r), [Code::Ok, Code::Ok]);
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (0, 3),
        "the refused call spent nothing on the key"
    );
    // is_negative_hits gives back.
    let mut back = with_addend(descriptor(&[("bytes", "b1")]), 6);
    back.is_negative_hits = true;
    let r = call(&mut c, request(vec![back], 0)).await;
    assert_eq!(r.statuses[0].limit_remaining, 6);
    // More than the capacity: over the limit (not an error Envoy would let through).
    let r = call(
        &mut c,
        request(vec![with_addend(descriptor(&[("bytes", "b2")]), 11)], 0),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "bytes");
    s.stop().await;
}

/// Mistakes and oversized calls: never an error (Envoy's default `failure_mode_deny: false`
/// lets an errored call through, so an error a client can cause is a way around every
/// limit), but `OVER_LIMIT` with the reason as the 429's body; the service still answers
/// afterwards.
#[tokio::test]
async fn mistakes_are_over_the_limit_never_errors() {
    let s = Service::start(&[]).await;
    let mut c = s.client().await;
    let mut no_domain = request(vec![descriptor(&[("api_key", "k")])], 0);
    no_domain.domain.clear();
    let cases: Vec<(RateLimitRequest, &str)> = vec![
        (no_domain, "domain"),
        (request(vec![], 0), "descriptors"),
        (
            request(vec![descriptor(&[("api_key", "k")]); 17], 0),
            "descriptors",
        ),
        (request(vec![descriptor(&[])], 0), "descriptors[0].entries"),
        (
            request(vec![descriptor(&[("a", "b"); 17])], 0),
            "descriptors[0].entries",
        ),
        (
            request(vec![descriptor(&[("api_key", &"x".repeat(257))])], 0),
            "descriptors[0].entries[0].value",
        ),
        (
            request(vec![descriptor(&[("api_key", "a\u{202e}b")])], 0),
            "descriptors[0].entries[0].value",
        ),
        (
            request(vec![descriptor(&[(&"k".repeat(129), "v")])], 0),
            "descriptors[0].entries[0].key",
        ),
        (
            request(
                vec![RateLimitDescriptor {
                    limit: Some(rate_limit_descriptor::RateLimitOverride {
                        requests_per_unit: 1,
                        unit: 1,
                    }),
                    ..descriptor(&[("api_key", "k")])
                }],
                0,
            ),
            "descriptors[0].limit",
        ),
    ];
    for (r, field) in cases {
        let answer = c
            .should_rate_limit(r)
            .await
            .unwrap_or_else(|e| panic!("{field}: an error Envoy would let through: {e:?}"))
            .into_inner();
        assert_eq!(answer.overall_code, Code::OverLimit as i32, "{field}");
        assert!(
            codes(&answer).iter().all(|c| *c == Code::OverLimit),
            "{field}"
        );
        let body: Value = serde_json::from_slice(&answer.raw_body).unwrap();
        assert_eq!(body["field"], field, "{body}");
    }
    // 100 KiB in one call: over the 64 KiB message limit, refused before decoding.
    let huge = request(vec![descriptor(&[("api_key", &"x".repeat(100 * 1024))])], 0);
    let answer = call(&mut c, huge).await;
    assert_eq!(answer.overall_code, Code::OverLimit as i32);
    let body: Value = serde_json::from_slice(&answer.raw_body).unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("message length too large"),
        "{body}"
    );
    let ok = call(&mut c, request(vec![descriptor(&[("api_key", "k")])], 0)).await;
    assert_eq!(ok.overall_code, Code::Ok as i32);
    s.stop().await;
}

/// A cost the service will not honour is over the limit for its descriptor, and the call
/// spends nothing anywhere: above [`domain::api::MAX_COST`] (once an error that
/// Envoy let through), above a rule's capacity, and above an override's capacity on a
/// descriptor no rule covers (once `OK`: the capacity was checked against the rules only).
#[tokio::test]
async fn a_cost_never_honoured_is_over_the_limit() {
    let s = Service::start(&["--admin-token", "t0ken"]).await;
    let mut c = s.client().await;
    // Above MAX_COST, beside a descriptor that would pass: nothing spent on it.
    let r = call(
        &mut c,
        request(
            vec![
                with_addend(descriptor(&[("api_key", "big")]), 1_000_001),
                descriptor(&[("bytes", "big")]),
            ],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&r)[0], Code::OverLimit);
    // Every limit of the key refuses it; the status names the longest wait.
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "daily");
    for addend in [u64::MAX, 1 << 63, 2_000_000] {
        let r = call(
            &mut c,
            request(
                vec![with_addend(descriptor(&[("api_key", "big")]), addend)],
                0,
            ),
        )
        .await;
        assert_eq!(r.overall_code, Code::OverLimit as i32, "{addend}");
    }
    // Even where no rule applies, such a cost is not honoured.
    let r = call(
        &mut c,
        request(
            vec![with_addend(descriptor(&[("nobody", "y")]), 1_000_001)],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let r = call(&mut c, request(vec![descriptor(&[("bytes", "big")])], 1)).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 9,
        "nothing was spent on bytes"
    );
    let r = call(&mut c, request(vec![descriptor(&[("api_key", "big")])], 1)).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 4,
        "nothing was spent on the key"
    );

    // An override of 5 on a descriptor no rule covers: 6 is over it, 5 passes.
    let put = reqwest::Client::new()
        .put(format!("http://{}/admin/overrides", s.http))
        .bearer_auth("t0ken")
        .json(&json!({
            "id": "tenant-a",
            "domain": "api",
            "entries": [{"key": "tenant", "value": "a"}],
            "limits": [{"name": "tenant", "requests_per_unit": 5, "unit": "minute"}],
        }))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let tenant = |addend| request(vec![with_addend(descriptor(&[("tenant", "a")]), addend)], 0);
    let r = call(&mut c, tenant(6)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "tenant");
    let r = call(&mut c, tenant(5)).await;
    assert_eq!(
        r.overall_code,
        Code::Ok as i32,
        "the refused 6 spent nothing"
    );
    assert_eq!(r.statuses[0].limit_remaining, 0);
    s.stop().await;
}

/// The call as bytes: string fields that are not UTF-8, as Envoy sends a header's bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    descriptors: Vec<RawDescriptor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawDescriptor {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<RawEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// A value that is not UTF-8 fails to decode before our handler runs: over the limit all
/// the same, never the error Envoy would let through.
#[tokio::test]
async fn bytes_that_do_not_decode_are_over_the_limit() {
    let s = Service::start(&[]).await;
    let channel = Channel::from_shared(format!("http://{}", s.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let call = |value: &[u8]| RawRequest {
        domain: b"api".to_vec(),
        descriptors: vec![RawDescriptor {
            entries: vec![RawEntry {
                key: b"api_key".to_vec(),
                value: value.to_vec(),
            }],
        }],
    };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    );
    for value in [&b"k\xff"[..], b"\xc3\x28", b"ok"] {
        grpc.ready().await.unwrap();
        let answer: RateLimitResponse = grpc
            .unary(
                tonic::Request::new(call(value)),
                path.clone(),
                tonic_prost::ProstCodec::<RawRequest, RateLimitResponse>::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{value:?}: an error Envoy would let through: {e:?}"))
            .into_inner();
        let want = if value == b"ok" {
            Code::Ok
        } else {
            Code::OverLimit
        };
        assert_eq!(answer.overall_code, want as i32, "{value:?}");
    }
    s.stop().await;
}

async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::new(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    let status = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

async fn health_becomes(addr: SocketAddr, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let overall = health(addr, "").await;
        let rls = health(addr, "envoy.service.ratelimit.v3.RateLimitService").await;
        if overall == want && rls == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health is {overall:?}/{rls:?}, not {want:?}, after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fail-closed with Redis killed: calls are UNAVAILABLE (Envoy then follows its
/// failure_mode_deny) and the health service says NOT_SERVING; SERVING again once Redis is
/// back. Fail-open answers degraded decisions and stays SERVING.
#[tokio::test]
async fn redis_down_fail_closed_is_unavailable_and_not_serving() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let prefix = testkit::unique("grpc");
    let args = |mode: &'static str| {
        vec![
            "--redis-url".to_owned(),
            url.clone(),
            "--redis-key-prefix".to_owned(),
            prefix.clone(),
            "--redis-timeout-ms".to_owned(),
            "100".to_owned(),
            "--fail-mode".to_owned(),
            mode.to_owned(),
        ]
    };
    let closed_args = args("closed");
    let open_args = args("open");
    let closed = Service::start(&closed_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let open = Service::start(&open_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    health_becomes(closed.grpc, ServingStatus::Serving).await;
    let one = || request(vec![descriptor(&[("api_key", "k")])], 0);
    let mut c = closed.client().await;
    let mut o = open.client().await;
    assert_eq!(call(&mut c, one()).await.overall_code, Code::Ok as i32);
    redis.kill();
    let t = Instant::now();
    let status = c.should_rate_limit(one()).await.expect_err("unavailable");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    health_becomes(closed.grpc, ServingStatus::NotServing).await;
    let degraded = call(&mut o, one()).await;
    assert_eq!(degraded.overall_code, Code::Ok as i32);
    assert!(
        degraded
            .response_headers_to_add
            .iter()
            .any(|h| h.key == "x-ratelimit-degraded" && h.value == "true"),
        "{degraded:?}"
    );
    assert_eq!(health(open.grpc, "").await, ServingStatus::Serving);
    redis.restart();
    health_becomes(closed.grpc, ServingStatus::Serving).await;
    closed.stop().await;
    open.stop().await;
}

async fn post_json(s: &Service, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/json", s.http))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// envoyproxy/ratelimit's `POST /json`: their request and answer shapes, 429 over the
/// limit, 400 naming the field.
#[tokio::test]
async fn the_json_endpoint_speaks_their_json() {
    let s = Service::start(&["--response-headers", "envoy"]).await;
    let body = r#"{"domain":"api","descriptors":[{"entries":[{"key":"api_key","value":"j1"}]}],"hits_addend":4}"#;
    let (status, answer) = post_json(&s, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({
            "overallCode": "OK",
            "statuses": [{
                "code": "OK",
                "currentLimit": {"name": "burst", "requestsPerUnit": 5, "unit": "MINUTE"},
                "limitRemaining": 1,
                "durationUntilReset": answer["statuses"][0]["durationUntilReset"],
            }],
            "responseHeadersToAdd": [
                {"key": "ratelimit-limit", "value": "5"},
                {"key": "ratelimit-remaining", "value": "1"},
                {"key": "ratelimit-reset", "value": answer["responseHeadersToAdd"][2]["value"]},
            ],
        })
    );
    assert!(
        answer["statuses"][0]["durationUntilReset"]
            .as_str()
            .unwrap()
            .ends_with('s')
    );
    let (status, answer) = post_json(&s, body).await;
    assert_eq!(status, 429);
    assert_eq!(answer["overallCode"], "OVER_LIMIT");
    assert_eq!(answer["statuses"][0]["code"], "OVER_LIMIT");
    let (status, answer) = post_json(
        &s,
        r#"{"domain":"api","descriptors":[{"entries":[{"key":"api_key"}]}]}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["field"], "descriptors[0].entries[0].value",
        "{answer}"
    );
    let (status, answer) = post_json(&s, r#"{"domain":"api","descriptorz":[]}"#).await;
    assert_eq!(status, 400, "{answer}");
    s.stop().await;
}

/// The gRPC port is bounded as the HTTP ports are (it was not): past MAX_CONNECTIONS a new
/// connection is closed on arrival; past MAX_IN_FLIGHT a call is refused at once instead of
/// queueing behind calls stuck on a frozen Redis; a call never runs past
/// REQUEST_TIMEOUT_MS.
#[tokio::test]
async fn the_grpc_port_is_bounded_like_the_http_ports() {
    let redis = RedisServer::start();
    let url = redis.url();
    let prefix = testkit::unique("grpc");
    let s = Service::start(&[
        "--redis-url",
        &url,
        "--redis-key-prefix",
        &prefix,
        "--redis-timeout-ms",
        "3000",
        "--request-timeout-ms",
        "1000",
        "--max-in-flight",
        "1",
        "--max-connections",
        "2",
    ])
    .await;
    let one = || request(vec![descriptor(&[("api_key", "k")])], 0);
    let mut c = s.client().await;
    assert_eq!(call(&mut c, one()).await.overall_code, Code::Ok as i32);

    // One call stuck on a frozen Redis; the next one is refused at once, not queued.
    redis.freeze(true);
    let mut stuck_client = c.clone();
    let stuck = tokio::spawn(async move {
        let started = Instant::now();
        let answer = stuck_client.should_rate_limit(one()).await;
        (
            started.elapsed(),
            answer.map(|a| a.into_inner().overall_code),
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let refused = c.should_rate_limit(one()).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused at once: {:?}",
        started.elapsed()
    );
    let (took, _) = stuck.await.unwrap();
    assert!(
        took < Duration::from_millis(1_600),
        "the stuck call ran past REQUEST_TIMEOUT_MS: {took:?}"
    );
    redis.freeze(false);

    // Two connections held open; a third is closed on arrival.
    use tokio::io::AsyncReadExt;
    let _held = (
        tokio::net::TcpStream::connect(s.grpc).await.unwrap(),
        tokio::net::TcpStream::connect(s.grpc).await.unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(s.grpc).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut byte))
        .await
        .expect("the third connection is closed at once, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    s.stop().await;
}
