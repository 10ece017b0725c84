//! The limiter's replicas: the configured base URLs, each host name resolved again and
//! again to the addresses behind it, so replicas added or removed are picked up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::Uri;
use tokio_util::sync::CancellationToken;

/// The limiter's route for batches of checks, below each replica's base URL.
const CHECK_BATCH: &str = "/check/batch";

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

/// The replicas requests currently go to, in a stable order; swapped whole on a change.
pub(super) type Replicas = Arc<RwLock<Arc<[Target]>>>;

/// One replica: its base URL (`http://10.0.0.5:8080`), which names it and every route is
/// built from, and its batch route, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) base: Arc<str>,
    pub(super) check_batch: Uri,
}

impl Target {
    fn new(base: String) -> Option<Self> {
        let check_batch = format!("{base}{CHECK_BATCH}").parse().ok()?;
        Some(Self {
            base: Arc::from(base),
            check_batch,
        })
    }
}

/// One configured limiter URL.
pub(super) struct Endpoint {
    host: String,
    port: u16,
    /// The URL as configured, without a trailing slash: used as is when the name does not
    /// resolve (or needs no resolving).
    base: String,
    /// A plain-HTTP host name (not an IP literal): resolved to its replicas.
    pub(super) needs_resolving: bool,
}

impl Endpoint {
    pub(super) fn parse(url: &str) -> anyhow::Result<Self> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| anyhow::anyhow!("LIMITER_URL is invalid: {url:?}: {e}"))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("LIMITER_URL has no host: {url:?}"))?
            .to_owned();
        let needs_resolving = parsed.scheme() == "http"
            && host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_err();
        Ok(Self {
            port: parsed.port_or_known_default().unwrap_or(80),
            host,
            base: url.trim_end_matches('/').to_owned(),
            needs_resolving,
        })
    }
}

pub(super) struct Refresh {
    pub(super) resolver: Arc<dyn Resolve>,
    pub(super) endpoints: Vec<Endpoint>,
    /// Per endpoint, the replicas of its last successful resolution.
    pub(super) last_resolved: Mutex<Vec<Vec<String>>>,
    pub(super) targets: Replicas,
}

impl Refresh {
    pub(super) async fn once(&self) {
        let mut urls = Vec::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if !endpoint.needs_resolving {
                urls.push(endpoint.base.clone());
                continue;
            }
            match self.resolver.resolve(&endpoint.host, endpoint.port).await {
                Ok(mut addrs) if !addrs.is_empty() => {
                    addrs.sort();
                    addrs.dedup();
                    let resolved: Vec<String> =
                        addrs.iter().map(|a| format!("http://{a}")).collect();
                    urls.extend(resolved.iter().cloned());
                    self.last_resolved.lock().expect("resolved lock")[i] = resolved;
                }
                Ok(_) | Err(_) => {
                    // Keep this endpoint's last known replicas; else use the name itself.
                    let last = self.last_resolved.lock().expect("resolved lock")[i].clone();
                    if last.is_empty() {
                        urls.push(endpoint.base.clone());
                    } else {
                        urls.extend(last);
                    }
                    continue;
                }
            }
        }
        urls.sort();
        urls.dedup();
        let urls: Arc<[Target]> = urls.into_iter().filter_map(Target::new).collect();
        let mut targets = self.targets.write().expect("targets lock");
        if **targets != *urls {
            let names: Vec<&str> = urls.iter().map(|t| &*t.base).collect();
            tracing::info!(replicas = urls.len(), targets = ?names, "limiter replicas");
            *targets = urls;
        }
    }

    pub(super) async fn every(self, interval: Duration, shutdown: CancellationToken) {
        let mut every = kit::every::Every::after(interval, shutdown);
        while every.tick().await {
            self.once().await;
        }
    }
}
