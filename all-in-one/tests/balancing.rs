//! The gateway spreads its calls over every limiter replica, as `docker-compose up --scale
//! rate-limiter=3` needs: Docker's DNS answers the service name with one address per
//! replica, and a keep-alive client that resolved it once would pin every request to one.
//!
//! Real limiters listen on the same port of 127.0.0.1 and 127.0.0.2 (Linux routes all of
//! 127.0.0.0/8 to the loopback), and a resolver stands in for Docker's DNS, answering the
//! name `limiter.test` with whichever replicas a test says are up.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::Parser;
use domain::api::CheckRequest;
use gateway::client::{HttpLimiterClient, LimiterClient, Resolve};
use kit::stream::ChannelReceiver;
use rate_limiter::limiter::Limiter;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAME: &str = "limiter.test";

/// One `rate-limiter` service, buckets in memory, serving on `addr`.
struct Replica {
    addr: SocketAddr,
    limiter: Arc<Limiter>,
    /// Held so the in-process event stream stays open and every decision is published.
    _events: Option<ChannelReceiver>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Replica {
    async fn start(listener: TcpListener) -> Self {
        // Explicit empty values: the test stays in memory whatever the environment holds.
        let config = rate_limiter::config::LimiterConfig::try_parse_from([
            "rate-limiter",
            "--redis-url=",
            "--kafka-brokers=",
            "--rate-limit-capacity=1000",
        ])
        .unwrap();
        let shutdown = CancellationToken::new();
        let (limiter, events) = rate_limiter::build(
            &config.limiter,
            &config.redis.resolve().unwrap(),
            &config.kafka,
            format!("replica-{}", listener.local_addr().unwrap()),
            &shutdown,
        )
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = {
            let (limiter, shutdown) = (limiter.clone(), shutdown.clone());
            tokio::spawn(async move {
                rate_limiter::run(listener, limiter, &config.serve.limits(), None, shutdown)
                    .await
                    .unwrap();
            })
        };
        Self {
            addr,
            limiter,
            _events: events,
            shutdown,
            task,
        }
    }

    /// Decisions this replica has made (one event is published per decision).
    fn decisions(&self) -> u64 {
        self.limiter.publisher().stats().published
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// Two replicas on the same port, at 127.0.0.1 and 127.0.0.2, like two containers behind
/// one service name.
async fn two_replicas() -> (Replica, Replica) {
    for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        // The same port may be taken on 127.0.0.2 by someone else: then take another.
        if let Ok(second) = TcpListener::bind(("127.0.0.2", port)).await {
            return (Replica::start(first).await, Replica::start(second).await);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// A stand-in for Docker's DNS: `answer` changes what a name resolves to.
#[derive(Default)]
struct FakeDns {
    names: Mutex<HashMap<String, Result<Vec<IpAddr>, ()>>>,
    lookups: AtomicU64,
}

impl FakeDns {
    fn answer(&self, name: &str, addrs: &[SocketAddr]) {
        let ips = addrs.iter().map(SocketAddr::ip).collect();
        self.names.lock().unwrap().insert(name.to_owned(), Ok(ips));
    }

    fn fail(&self, name: &str) {
        self.names.lock().unwrap().insert(name.to_owned(), Err(()));
    }

    fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Resolve for FakeDns {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        match self.names.lock().unwrap().get(host) {
            Some(Ok(ips)) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            Some(Err(())) => Err(std::io::Error::other("server failure")),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}: no such name"),
            )),
        }
    }
}

async fn client(dns: &Arc<FakeDns>, port: u16, resolve_every: Duration) -> HttpLimiterClient {
    HttpLimiterClient::new(
        &format!("http://{NAME}:{port}"),
        Duration::from_secs(2),
        Default::default(),
        resolve_every,
        dns.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

fn replica_urls(replicas: &[&Replica]) -> Vec<String> {
    let mut urls: Vec<String> = replicas
        .iter()
        .map(|r| format!("http://{}", r.addr))
        .collect();
    urls.sort();
    urls
}

/// Sends `n` checks (each for a new user, so none is limited); every one must be decided.
async fn send_checks(client: &HttpLimiterClient, n: usize) {
    for i in 0..n {
        let request = CheckRequest::user(format!("user-{i}"), 1);
        let decision = client.check(&request).await.unwrap();
        assert!(decision.allowed, "{decision:?}");
    }
}

/// Waits until the client's targets are `want` (the periodic re-resolution picked up the
/// change), failing after `within`.
async fn wait_for_targets(client: &HttpLimiterClient, want: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    while client.targets() != want {
        assert!(
            Instant::now() < deadline,
            "targets still {:?}, want {want:?} after {within:?}",
            client.targets()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_gateway_spreads_requests_over_every_address_of_the_limiter_name() {
    let (a, b) = two_replicas().await;
    let dns = Arc::new(FakeDns::default());
    dns.answer(NAME, &[a.addr, b.addr]);
    let limiter = client(&dns, a.addr.port(), Duration::from_secs(60)).await;
    assert_eq!(limiter.targets(), replica_urls(&[&a, &b]));

    // Through the gateway's own HTTP API, as a user calls it.
    let config = gateway::config::GatewayConfig::try_parse_from(["gateway"]).unwrap();
    let counters: Arc<dyn domain::analytics::AnalyticsReader> = Arc::new(
        counters::MemoryCounters::new(1000, Duration::from_secs(3600)),
    );
    let gw = gateway::Gateway {
        limiter: Arc::new(limiter),
        // Not asked here: /status is not part of this test (the connection is lazy).
        status: Arc::new(gateway::status::RemoteStatus::new(
            &format!("http://{}", a.addr),
            counters.clone(),
            kit::report::Reports::new(
                &kit::redis::Endpoint::single("redis://127.0.0.1:1"),
                "rl:",
                Duration::from_millis(50),
            )
            .unwrap(),
        )),
        analytics: counters,
        admin_token: None,
        retention: Duration::from_secs(3600),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { gateway::run(listener, gw, &config.serve.limits(), shutdown).await }
    });

    let http = reqwest::Client::new();
    for i in 0..20 {
        let response = http
            .post(format!("http://{gateway_addr}/api"))
            .json(&serde_json::json!({"user_id": format!("user-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // Round-robin: each replica decided half, although the client keeps connections alive.
    assert_eq!((a.decisions(), b.decisions()), (10, 10));

    shutdown.cancel();
    server.await.unwrap().unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn replicas_added_or_removed_are_picked_up_after_the_refresh_interval() {
    let (a, b) = two_replicas().await;
    let dns = Arc::new(FakeDns::default());
    dns.answer(NAME, &[a.addr]);
    let refresh = Duration::from_millis(100);
    let limiter = client(&dns, a.addr.port(), refresh).await;

    assert_eq!(limiter.targets(), replica_urls(&[&a]));
    send_checks(&limiter, 4).await;
    assert_eq!((a.decisions(), b.decisions()), (4, 0));

    // Scaled up: the name now answers both replicas.
    dns.answer(NAME, &[a.addr, b.addr]);
    wait_for_targets(&limiter, &replica_urls(&[&a, &b]), refresh * 20).await;
    send_checks(&limiter, 10).await;
    assert_eq!((a.decisions(), b.decisions()), (4 + 5, 5));

    // Scaled down: `a` leaves the name, then stops; no request goes to it any more.
    dns.answer(NAME, &[b.addr]);
    wait_for_targets(&limiter, &replica_urls(&[&b]), refresh * 20).await;
    a.stop().await;
    send_checks(&limiter, 6).await;
    assert_eq!(b.decisions(), 5 + 6);

    b.stop().await;
}

#[tokio::test]
async fn an_address_that_refuses_connections_is_skipped() {
    // A replica gone (or restarting) since the last resolve: nothing listens on 127.0.0.3.
    let (a, b) = two_replicas().await;
    let gone = SocketAddr::new([127, 0, 0, 3].into(), a.addr.port());
    let dns = Arc::new(FakeDns::default());
    dns.answer(NAME, &[a.addr, gone]);
    let limiter = client(&dns, a.addr.port(), Duration::from_secs(60)).await;
    assert_eq!(limiter.targets().len(), 2);

    // Every request is decided, by the replica that is there.
    send_checks(&limiter, 6).await;
    assert_eq!(a.decisions(), 6);

    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_address_that_answers_nothing_is_asked_last_after_its_first_timeout() {
    // A replica cut off the network, or whose container is gone: connections to it are
    // never answered. Here a listener on 127.0.0.3 that accepts nothing (the kernel still
    // completes the handshakes), so an exchange sent there waits out its deadline.
    let (a, b) = two_replicas().await;
    let silent =
        std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, 3), a.addr.port()))
            .unwrap();
    let dns = Arc::new(FakeDns::default());
    dns.answer(NAME, &[a.addr, silent.local_addr().unwrap()]);
    let limiter = client(&dns, a.addr.port(), Duration::from_secs(60)).await;

    // Round-robin would send every other check there; after the first one that got no
    // answer, the gateway asks the replica that answers first.
    let mut failed = 0;
    for i in 0..10 {
        let request = CheckRequest::user(format!("user-{i}"), 1);
        match limiter.check(&request).await {
            Ok(decision) => assert!(decision.allowed, "{decision:?}"),
            Err(_) => failed += 1,
        }
    }
    assert!(failed <= 1, "{failed} of 10 checks failed");
    assert_eq!(a.decisions(), 10 - failed);

    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_failed_resolution_keeps_the_last_known_replicas() {
    let (a, b) = two_replicas().await;
    let dns = Arc::new(FakeDns::default());
    dns.answer(NAME, &[a.addr, b.addr]);
    let refresh = Duration::from_millis(50);
    let limiter = client(&dns, a.addr.port(), refresh).await;

    dns.fail(NAME);
    // Let several refreshes fail.
    let lookups = dns.lookups();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dns.lookups() < lookups + 3 {
        assert!(Instant::now() < deadline, "the name is not re-resolved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(limiter.targets(), replica_urls(&[&a, &b]));
    send_checks(&limiter, 4).await;
    assert_eq!((a.decisions(), b.decisions()), (2, 2));

    a.stop().await;
    b.stop().await;
}

/// A stand-in replica that reads one `POST /check/batch` per connection and hands its body
/// to the test; with `answer`, it then answers every check allowed, else it closes the
/// connection unanswered, as a limiter SIGKILLed between deciding and answering does.
fn batch_catcher(
    listener: std::net::TcpListener,
    answer: bool,
) -> tokio::sync::mpsc::UnboundedReceiver<serde_json::Value> {
    use std::io::{BufRead, BufReader, Read, Write};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let batch: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let checks = batch["checks"].as_array().map_or(0, Vec::len);
            let _ = tx.send(batch);
            if answer {
                let result = serde_json::json!({"ok": domain::api::CheckResponse {
                    allowed: true,
                    limit: 10,
                    remaining: 9,
                    ..Default::default()
                }});
                let reply = serde_json::json!({"results": vec![result; checks]}).to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                    reply.len()
                );
            }
            // Dropped: closed, answered or not.
        }
    });
    rx
}

/// A replica that dies between deciding a batch and answering it: the gateway asks the
/// next replica the same batch, under the same id and marked `again`, so that a replica
/// on the same Redis answers what the first decided instead of deciding it twice
/// (`rate-limiter/tests/outbox.rs` shows the limiter's side).
#[tokio::test]
async fn a_batch_asked_again_keeps_its_id_and_says_so() {
    let dying = std::net::TcpListener::bind("127.0.0.4:0").unwrap();
    let port = dying.local_addr().unwrap().port();
    let Ok(answering) = std::net::TcpListener::bind(("127.0.0.5", port)) else {
        panic!("port {port} taken on 127.0.0.5");
    };
    let (dying_addr, answering_addr) =
        (dying.local_addr().unwrap(), answering.local_addr().unwrap());
    let mut first = batch_catcher(dying, false);
    let mut second = batch_catcher(answering, true);
    let dns = Arc::new(FakeDns::default());
    dns.answer(NAME, &[dying_addr, answering_addr]);
    let limiter = client(&dns, port, Duration::from_secs(60)).await;
    // Round-robin from one of the two: within two checks one goes to the dying replica
    // first.
    for i in 0..2 {
        let decision = limiter
            .check(&CheckRequest::user(format!("user-{i}"), 1))
            .await
            .unwrap();
        assert!(decision.allowed);
    }
    let died = first.recv().await.expect("the dying replica was asked");
    let id = died["id"]
        .as_str()
        .expect("a batch carries an id")
        .to_owned();
    assert_eq!(died.get("again"), None, "sent the first time: {died}");
    let mut asked_again = None;
    while let Ok(batch) = second.try_recv() {
        if batch["id"] == id.as_str() {
            asked_again = Some(batch);
        }
    }
    let asked_again = asked_again.expect("the batch was asked of the other replica");
    assert_eq!(asked_again["again"], true, "{asked_again}");
    assert_eq!(asked_again["checks"], died["checks"]);
}
