//! The test sandbox: the services started in-process on free ports, with their addresses
//! and a shutdown. `embedded` is the all-in-one default; `Distributed` runs the limiters
//! and the gateway apart, talking HTTP, on a real Redis (and Kafka when given brokers).
#![allow(dead_code)]

pub mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use domain::analytics::UserAnalytics;
use gateway::client::{HttpLimiterClient, SystemResolver};
use rate_limiter::limiter::Limiter;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Capacity 5, refill 2/s: the policy of the end-to-end flows.
pub const POLICY: [&str; 4] = [
    "--rate-limit-capacity",
    "5",
    "--rate-limit-refill-per-sec",
    "2",
];

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// The all-in-one system with `args` (e.g. `--rate-limit-capacity 5`).
pub async fn all_in_one(args: &[&str]) -> all_in_one::System {
    let mut argv = vec!["test"];
    argv.extend_from_slice(args);
    let config = all_in_one::Config::try_parse_from(argv).unwrap();
    all_in_one::System::start(
        config,
        listener().await,
        listener().await,
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// One limiter instance running on its own, as the `rate-limiter` binary does.
pub struct LimiterInstance {
    pub addr: SocketAddr,
    pub limiter: Arc<Limiter>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl LimiterInstance {
    /// `args` as for the `rate-limiter` binary.
    pub async fn start(args: &[&str]) -> Self {
        let mut argv = vec!["rate-limiter"];
        argv.extend_from_slice(args);
        let config = rate_limiter::config::LimiterConfig::try_parse_from(argv).unwrap();
        let shutdown = CancellationToken::new();
        let service =
            rate_limiter::Standalone::start(&config, testkit::unique("limiter"), &shutdown)
                .await
                .unwrap();
        let limiter = service.limiter.clone();
        let listener = listener().await;
        let addr = listener.local_addr().unwrap();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                service
                    .serve(listener, &config.serve.limits(), shutdown)
                    .await
                    .unwrap();
            })
        };
        Self {
            addr,
            limiter,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// A standalone gateway asking the limiter at `limiter_url` over HTTP.
pub struct GatewayInstance {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl GatewayInstance {
    pub async fn start(limiter_url: &str, redis_url: &str, prefix: &str, extra: &[&str]) -> Self {
        let mut argv = vec![
            "gateway",
            "--limiter-url",
            limiter_url,
            "--redis-url",
            redis_url,
            "--redis-key-prefix",
            prefix,
        ];
        argv.extend_from_slice(extra);
        let config = gateway::config::GatewayConfig::try_parse_from(argv).unwrap();
        let shutdown = CancellationToken::new();
        let gw = gateway::from_config(&config, &shutdown).await.unwrap();
        let listener = listener().await;
        let addr = listener.local_addr().unwrap();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                gateway::run(listener, gw, &config.serve.limits(), shutdown)
                    .await
                    .unwrap();
            })
        };
        Self {
            addr,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// An HTTP limiter client, for tests of the gateway's client on its own.
pub async fn http_client(url: &str, timeout: Duration) -> HttpLimiterClient {
    HttpLimiterClient::new(
        url,
        timeout,
        Default::default(),
        Duration::from_secs(5),
        Arc::new(SystemResolver),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// `GET url` as JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `POST /api` (or `/check`) for `user`, returning the response.
pub async fn post(client: &reqwest::Client, url: &str, user: &str) -> reqwest::Response {
    client
        .post(url)
        .json(&serde_json::json!({"user_id": user}))
        .send()
        .await
        .unwrap()
}

pub async fn analytics(client: &reqwest::Client, gateway: SocketAddr, user: &str) -> UserAnalytics {
    let url = reqwest::Url::parse(&format!("http://{gateway}/analytics/"))
        .unwrap()
        .join(&urlencode(user))
        .unwrap();
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Polls the analytics of `user` until they equal `(total, allowed, blocked)` or `within`
/// passes; returns the last answer.
pub async fn analytics_settle(
    client: &reqwest::Client,
    gateway: SocketAddr,
    user: &str,
    want: (u64, u64, u64),
    within: Duration,
) -> (u64, u64, u64) {
    let deadline = Instant::now() + within;
    loop {
        let a = analytics(client, gateway, user).await;
        let got = (a.total, a.allowed, a.blocked);
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rules file in a fresh directory; rewrite it with [`RulesFile::write`].
pub struct RulesFile {
    path: std::path::PathBuf,
}

impl RulesFile {
    pub fn new(text: &str) -> Self {
        let dir = std::env::temp_dir().join(testkit::unique("rules"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = Self {
            path: dir.join("api.yaml"),
        };
        file.write(text);
        file
    }

    /// Replaces the file's contents the way editors and config maps do: a new file renamed
    /// over the old one.
    pub fn write(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }

    /// The directory the file is in (a `RULES_PATH` of its own).
    pub fn dir_arg(&self) -> String {
        self.path.parent().unwrap().display().to_string()
    }

    /// Removes the file, leaving its directory empty.
    pub fn remove(&self) {
        std::fs::remove_file(&self.path).unwrap();
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
