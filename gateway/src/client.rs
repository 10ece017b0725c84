//! How the gateway asks the limiter: the [`LimiterClient`] trait, over HTTP when the
//! services run apart ([`HttpLimiterClient`]), or an in-process call in the all-in-one
//! binary ([`InProcessClient`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rate_limiter::limiter::{Limiter, LimiterError};
use ratelimit_core::api::{CheckRequest, CheckResponse, ErrorBody, FieldError};
use ratelimit_core::http::ApiError;
use tokio_util::sync::CancellationToken;

/// Why the limiter gave no decision.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    /// The limiter refused the request as invalid (e.g. a cost above the capacity).
    #[error("invalid request: {0}")]
    Invalid(FieldError),
    /// The limiter's store is down and it fails closed.
    #[error("the rate-limit store is unavailable")]
    StoreUnavailable,
    /// The limiter did not answer (unreachable, timed out, or answered nonsense).
    #[error("the rate limiter is unreachable: {0}")]
    Unreachable(String),
    /// The limiter is shedding load.
    #[error("the rate limiter is overloaded")]
    Overloaded,
}

impl From<ClientError> for ApiError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Invalid(field) => ApiError::InvalidField(field),
            ClientError::StoreUnavailable => ApiError::Unavailable {
                what: "rate-limit store",
                retry_after_secs: 1,
            },
            ClientError::Unreachable(_) => ApiError::Unavailable {
                what: "rate limiter",
                retry_after_secs: 1,
            },
            ClientError::Overloaded => ApiError::Overloaded,
        }
    }
}

#[async_trait]
pub trait LimiterClient: Send + Sync + 'static {
    async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, ClientError>;
}

/// The limiter in the same process.
pub struct InProcessClient(pub Arc<Limiter>);

#[async_trait]
impl LimiterClient for InProcessClient {
    async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, ClientError> {
        self.0
            .check_response(request)
            .await
            .map_err(|err| match err {
                LimiterError::StoreUnavailable => ClientError::StoreUnavailable,
                other @ LimiterError::CostAboveCapacity { .. } => match ApiError::from(other) {
                    ApiError::InvalidField(field) => ClientError::Invalid(field),
                    _ => unreachable!("a cost error is a field error"),
                },
            })
    }
}

/// Resolves a host name to the addresses of its limiter replicas.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (with Docker, the service name answers one address per replica).
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// The limiter over HTTP: a keep-alive pool, a timeout per call, and requests spread
/// round-robin over every address the limiter's host name resolves to, re-resolved
/// periodically so replicas added or removed are picked up.
pub struct HttpLimiterClient {
    client: reqwest::Client,
    /// `http://<addr>/check` for each resolved replica.
    targets: Arc<RwLock<Arc<[String]>>>,
    next: AtomicUsize,
}

impl HttpLimiterClient {
    /// A client for `base_url` (e.g. `http://rate-limiter:8080`).
    pub async fn new(
        base_url: &str,
        timeout: Duration,
        resolve_every: Duration,
        resolver: Arc<dyn Resolve>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(base_url)
            .map_err(|e| anyhow::anyhow!("LIMITER_URL is invalid: {base_url:?}: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("LIMITER_URL has no host: {base_url:?}"))?
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let scheme = url.scheme().to_owned();
        let fallback: Arc<[String]> =
            Arc::from(vec![format!("{}/check", base_url.trim_end_matches('/'))]);
        let targets = Arc::new(RwLock::new(fallback.clone()));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .http1_only()
            .build()?;
        // An IP literal needs no resolving; a name is resolved now and then periodically.
        if host.parse::<std::net::IpAddr>().is_err() && scheme == "http" {
            let refresh = Refresh {
                resolver,
                host,
                port,
                targets: targets.clone(),
                fallback,
            };
            refresh.once().await;
            tokio::spawn(refresh.every(resolve_every, shutdown));
        }
        Ok(Self {
            client,
            targets,
            next: AtomicUsize::new(0),
        })
    }

    fn target(&self) -> String {
        let targets = self.targets.read().expect("targets lock").clone();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % targets.len();
        targets[i].clone()
    }
}

struct Refresh {
    resolver: Arc<dyn Resolve>,
    host: String,
    port: u16,
    targets: Arc<RwLock<Arc<[String]>>>,
    fallback: Arc<[String]>,
}

impl Refresh {
    async fn once(&self) {
        match self.resolver.resolve(&self.host, self.port).await {
            Ok(mut addrs) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                let urls: Arc<[String]> =
                    addrs.iter().map(|a| format!("http://{a}/check")).collect();
                let mut targets = self.targets.write().expect("targets lock");
                if **targets != *urls {
                    tracing::info!(
                        host = self.host,
                        replicas = urls.len(),
                        "limiter replicas resolved"
                    );
                    *targets = urls;
                }
            }
            Ok(_) | Err(_) => {
                // Keep what we had; if we never had anything, use the name itself.
                let mut targets = self.targets.write().expect("targets lock");
                if targets.is_empty() {
                    *targets = self.fallback.clone();
                }
            }
        }
    }

    async fn every(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => self.once().await,
            }
        }
    }
}

#[async_trait]
impl LimiterClient for HttpLimiterClient {
    async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, ClientError> {
        let response = self
            .client
            .post(self.target())
            .json(request)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return response
                .json()
                .await
                .map_err(|e| ClientError::Unreachable(format!("bad answer: {e}")));
        }
        let body: Option<ErrorBody> = response.json().await.ok();
        Err(match status.as_u16() {
            400 => {
                let field = body
                    .as_ref()
                    .and_then(|b| b.field.clone())
                    .unwrap_or_else(|| "body".into());
                let detail = body.map(|b| b.detail).unwrap_or_default();
                let detail = detail
                    .strip_prefix(&format!("{field}: "))
                    .unwrap_or(&detail)
                    .to_owned();
                ClientError::Invalid(FieldError::new(field, detail))
            }
            429 => ClientError::Overloaded,
            503 if body.as_ref().is_some_and(|b| b.error == "unavailable") => {
                ClientError::StoreUnavailable
            }
            _ => ClientError::Unreachable(format!("limiter answered {status}")),
        })
    }
}
