//! How the gateway asks the limiter: the [`LimiterClient`] trait, over HTTP when the
//! services run apart ([`HttpLimiterClient`]); the all-in-one binary brings an in-process
//! one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics::Unit;
use ratelimit_domain::api::{
    BatchRequest, BatchResponse, BatchResult, CheckError, CheckRequest, CheckResponse, FieldError,
    MAX_BATCH, RefusedCheck,
};
use service_kit::http::ApiError;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::refusals::GatewayRefusals;

/// Why the limiter gave no decision.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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

impl From<CheckError> for ClientError {
    fn from(err: CheckError) -> Self {
        match err {
            CheckError::Invalid(field) => ClientError::Invalid(field),
            CheckError::StoreUnavailable => ClientError::StoreUnavailable,
            CheckError::Overloaded => ClientError::Overloaded,
            CheckError::Other(body) => {
                ClientError::Unreachable(format!("limiter answered {}", body.error))
            }
        }
    }
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

    /// Passes an `/admin` request (overrides, bucket peeks and resets) to the limiter,
    /// which checks the admin token again, and returns its answer.
    async fn admin(&self, request: AdminRequest) -> Result<(StatusCode, Bytes), ClientError>;
}

/// An `/admin` request as the gateway passes it on: what the limiter needs, no more.
#[derive(Debug, Clone)]
pub struct AdminRequest {
    pub method: axum::http::Method,
    /// The path and query, e.g. `/admin/buckets?user_id=u1`.
    pub path_and_query: String,
    pub authorization: Option<axum::http::HeaderValue>,
    pub body: Bytes,
}

/// Describes the HTTP limiter client's metrics (help text and unit), once per process, after
/// installing the recorder; [`HttpLimiterClient::new`] calls it.
pub fn describe_metrics() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        service_kit::metrics::handle();
        metrics::describe_histogram!(
            "gateway_limiter_batch_size",
            Unit::Count,
            "Checks sent in one exchange with the limiter (1 when idle, more under load)"
        );
        metrics::describe_counter!(
            "gateway_limiter_retries_total",
            Unit::Count,
            "Limiter calls that got no answer (connection refused, or closed before any answer) and were asked of the next replica"
        );
        metrics::describe_counter!(
            "gateway_refusal_cache_hits_total",
            Unit::Count,
            "Checks refused from the gateway's refusal cache, with no exchange"
        );
        metrics::describe_counter!(
            "gateway_refusals_uncounted_total",
            Unit::Count,
            "Refusals answered from the gateway's cache that could not be sent to the limiter to be counted"
        );
    });
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
///
/// Checks are sent in batches (`POST /check/batch`) with at most `in_flight` exchanges
/// outstanding: a check that arrives while they are all busy waits for the next one, with
/// whatever else arrived meanwhile. An idle gateway therefore sends each check at once, on
/// its own, and a loaded one sends a few large exchanges instead of one per request.
pub struct HttpLimiterClient {
    queue: mpsc::Sender<Queued>,
    /// Refusals answered here while they hold (none when `refusal_cache` is 0).
    refusals: Option<Arc<GatewayRefusals>>,
    /// `gateway_refusal_cache_hits_total`, looked up once (not per hit).
    cache_hits: metrics::Counter,
    /// The pooled client the batches use, for the rare `/admin` request.
    admin_client: HttpClient,
    timeout: Duration,
    /// `http://<addr>/check/batch` for each resolved replica.
    targets: Arc<RwLock<Arc<[Target]>>>,
}

/// How the client batches its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most checks in one exchange (at most [`MAX_BATCH`]).
    pub max_batch: usize,
    /// Most exchanges outstanding at once, over all replicas.
    pub in_flight: usize,
    /// Most refusals remembered and answered here while they hold (0: none); see
    /// [`crate::refusals`].
    pub refusal_cache: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch: 128,
            in_flight: 4,
            refusal_cache: 65_536,
        }
    }
}

/// What waits for the next exchange: a check, or a refusal answered here, to be counted.
enum Queued {
    Check(Pending),
    Refused(RefusedCheck),
}

/// Checks waiting for an exchange; past this, a check is refused as overloaded at once.
const QUEUE_CAPACITY: usize = 16_384;

/// A check waiting for its batch, and where its answer goes.
struct Pending {
    request: CheckRequest,
    reply: oneshot::Sender<Result<CheckResponse, ClientError>>,
    /// When its caller stops waiting: `LIMITER_TIMEOUT_MS` after it was queued. One clock
    /// for the whole way: the exchange that carries it gives up at the latest deadline of
    /// its checks, and a check still queued at its deadline is never sent.
    deadline: tokio::time::Instant,
    /// Set when its exchange leaves: a caller that times out before that was shed
    /// (429 `overloaded`, nothing spent); after, the limiter did not answer in time (503).
    sent: Arc<std::sync::atomic::AtomicBool>,
}

/// A batch's results in order, the replica that answered, and its generation.
type Answered = (
    Vec<Result<CheckResponse, ClientError>>,
    Arc<str>,
    Option<ratelimit_domain::api::Generation>,
);

/// What the batches are sent with.
struct Exchanger {
    client: HttpClient,
    /// The least time left for a check to be worth sending (a quarter of
    /// `LIMITER_TIMEOUT_MS`): one with less is shed rather than spend a token on a
    /// decision its caller is unlikely to wait for.
    min_budget: Duration,
    targets: Arc<RwLock<Arc<[Target]>>>,
    next: AtomicUsize,
    refusals: Option<Arc<GatewayRefusals>>,
    /// Replicas whose last connection attempt failed, and until when they are asked only
    /// after the others (one resolve interval: by then the name's answer has dropped them,
    /// or they are back).
    unreachable: Mutex<HashMap<Arc<str>, Instant>>,
    avoid_for: Duration,
}

/// hyper's pooled HTTP/1 client: reqwest's conveniences (redirects, URL parsing, cookies)
/// cost more per call than this hop needs (measured in BENCHMARKS.md).
type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// One replica's `/check` URL, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: String,
    uri: Uri,
    /// The URL again, shared, to name the replica a refusal came from.
    name: Arc<str>,
}

impl Target {
    fn new(url: String) -> Option<Self> {
        let uri = url.parse().ok()?;
        let name = Arc::from(url.as_str());
        Some(Self { url, uri, name })
    }
}

impl HttpLimiterClient {
    /// A client for `urls`: one base URL (e.g. `http://rate-limiter:8080`) or several,
    /// comma-separated. Every address of every URL receives requests in turn.
    pub async fn new(
        urls: &str,
        timeout: Duration,
        batching: Batching,
        resolve_every: Duration,
        resolver: Arc<dyn Resolve>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        describe_metrics();
        let endpoints = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(Endpoint::parse)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            anyhow::bail!(
                "LIMITER_URL is empty: give the limiter's base URL, e.g. http://127.0.0.1:8080"
            );
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A quarter of the deadline, so that the retry on the next replica still fits: a
        // replica whose container is gone leaves an address that answers nothing, not even
        // a refusal, until the next resolve drops it.
        connector.set_connect_timeout(Some(timeout / 4));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            // Below the limiter's HEADER_TIMEOUT_MS (5 s by default), after which the
            // limiter closes a connection idle between requests: an idle connection is
            // dropped here first, never reused just as the limiter closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .build(connector);
        let refresh = Refresh {
            resolver,
            last_resolved: std::sync::Mutex::new(vec![Vec::new(); endpoints.len()]),
            endpoints,
            targets: Arc::new(RwLock::new(Arc::from(Vec::new()))),
        };
        refresh.once().await;
        let targets = refresh.targets.clone();
        if refresh.endpoints.iter().any(|e| e.needs_resolving) {
            tokio::spawn(refresh.every(resolve_every, shutdown));
        }
        let (queue, waiting) = mpsc::channel(QUEUE_CAPACITY);
        let admin_client = client.clone();
        let refusals = (batching.refusal_cache > 0)
            .then(|| Arc::new(GatewayRefusals::new(batching.refusal_cache)));
        let exchanger = Arc::new(Exchanger {
            client,
            min_budget: timeout / 4,
            targets: targets.clone(),
            next: AtomicUsize::new(0),
            refusals: refusals.clone(),
            unreachable: Mutex::new(HashMap::new()),
            avoid_for: resolve_every,
        });
        tokio::spawn(dispatch(exchanger, waiting, batching));
        Ok(Self {
            queue,
            refusals,
            cache_hits: metrics::counter!("gateway_refusal_cache_hits_total"),
            admin_client,
            timeout,
            targets,
        })
    }

    /// Checks refused from the refusal cache so far.
    pub fn refusal_cache_hits(&self) -> u64 {
        self.refusals.as_ref().map_or(0, |r| r.hits())
    }

    /// The `/check/batch` URLs requests currently go to.
    pub fn targets(&self) -> Vec<String> {
        self.targets
            .read()
            .expect("targets lock")
            .iter()
            .map(|t| t.url.clone())
            .collect()
    }
}

/// Sends what waits in `queue` in batches, at most `batching.in_flight` at a time, until
/// the client is dropped.
async fn dispatch(
    exchanger: Arc<Exchanger>,
    mut queue: mpsc::Receiver<Queued>,
    batching: Batching,
) {
    let max_batch = batching.max_batch.clamp(1, MAX_BATCH);
    let in_flight = Arc::new(Semaphore::new(batching.in_flight.max(1)));
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if queue.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        let pending = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
        let exchanger = exchanger.clone();
        tokio::spawn(async move {
            exchanger.settle(pending).await;
            drop(permit);
        });
    }
}

impl Exchanger {
    /// Asks the limiter to decide `pending` and hands each check its answer. A check whose
    /// caller stopped waiting (timed out, or the client went away) is not sent: nobody would
    /// learn its decision, so it must not spend a token.
    async fn settle(&self, queued: Vec<Queued>) {
        let now = tokio::time::Instant::now();
        let sent_us = self.refusals.as_ref().map_or(0, |r| r.now_us());
        let mut latest = now;
        let mut batch = BatchRequest::default();
        let mut replies = Vec::new();
        for item in queued {
            match item {
                Queued::Check(p) => {
                    if p.reply.is_closed() || p.deadline <= now + self.min_budget {
                        continue;
                    }
                    latest = latest.max(p.deadline);
                    p.sent.store(true, Ordering::Release);
                    batch.checks.push(p.request);
                    replies.push(p.reply);
                }
                Queued::Refused(refused) => batch.refused.push(refused),
            }
        }
        if batch.checks.is_empty() && batch.refused.is_empty() {
            return;
        }
        if batch.checks.is_empty() {
            // Only refusals to count: they have no caller waiting, so a short deadline.
            latest = now + self.min_budget * 4;
        }
        if !batch.checks.is_empty() {
            metrics::histogram!("gateway_limiter_batch_size").record(batch.checks.len() as f64);
        }
        match self.decide(&batch, latest).await {
            Ok((results, replica, generation)) => {
                if let (Some(refusals), Some(generation)) = (&self.refusals, generation) {
                    refusals.heard(&replica, generation);
                    for (request, result) in batch.checks.iter().zip(&results) {
                        if let Ok(response) = result {
                            refusals.record(request, response, sent_us, &replica, generation);
                        }
                    }
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(err) => {
                if !batch.refused.is_empty() {
                    metrics::counter!("gateway_refusals_uncounted_total")
                        .increment(batch.refused.len() as u64);
                }
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// One batch exchange, each check's result in order; an error is the whole batch's.
    /// Also which replica answered, and its generation.
    async fn decide(
        &self,
        batch: &BatchRequest,
        deadline: tokio::time::Instant,
    ) -> Result<Answered, ClientError> {
        // A request that got no answer at all is asked again, of the next replica: see
        // `unanswered` for when that is, and why it never lets a client past its limit.
        let targets = self.targets.read().expect("targets lock").clone();
        if targets.is_empty() {
            return Err(ClientError::Unreachable("no limiter address".into()));
        }
        let attempts = targets.len().clamp(2, 3);
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        // The replicas in turn from `first`, those that could not be reached lately last.
        let mut order: Vec<&Target> = (0..targets.len())
            .map(|i| &targets[(first + i) % targets.len()])
            .collect();
        {
            let mut unreachable = self.unreachable.lock().expect("unreachable lock");
            if !unreachable.is_empty() {
                let now = Instant::now();
                unreachable.retain(|_, until| *until > now);
                order.sort_by_key(|t| unreachable.contains_key(&t.name));
            }
        }
        let count = batch.checks.len();
        let body = Bytes::from(serde_json::to_vec(batch).expect("a batch serializes"));
        let avoid = |target: &Target| {
            self.unreachable
                .lock()
                .expect("unreachable lock")
                .insert(target.name.clone(), Instant::now() + self.avoid_for);
        };
        // The replica being asked, for when the deadline passes first.
        let asking = AtomicUsize::new(0);
        let exchange = async {
            let mut attempt = 0;
            loop {
                let target = order[attempt % order.len()];
                asking.store(attempt % order.len(), Ordering::Relaxed);
                let result = self.exchange(target, body.clone()).await;
                if let Err(err) = &result
                    && err.is_connect()
                {
                    avoid(target);
                }
                match result {
                    Ok((status, body)) => return Ok((status, body, target.name.clone())),
                    Err(err) if attempt + 1 < attempts && unanswered(&err) => {
                        metrics::counter!("gateway_limiter_retries_total").increment(1);
                        tracing::debug!(target = target.url, error = %err, "limiter call unanswered; asking the next replica");
                        attempt += 1;
                    }
                    Err(err) => {
                        tracing::warn!(target = target.url, error = %err, source = ?std::error::Error::source(&err), "limiter call failed");
                        return Err(ClientError::Unreachable(err.to_string()));
                    }
                }
            }
        };
        let (status, body, replica) =
            tokio::time::timeout_at(deadline, exchange)
                .await
                .map_err(|_| {
                    // No answer in time: a replica cut off the network looks like this (its
                    // connections answer nothing), as does an overloaded one.
                    avoid(order[asking.load(Ordering::Relaxed)]);
                    ClientError::Unreachable("timed out".into())
                })??;
        if !status.is_success() {
            return Err(refusal(status, serde_json::from_slice(&body).ok()));
        }
        let answer: BatchResponse = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Unreachable(format!("bad answer: {e}")))?;
        if answer.results.len() != count {
            return Err(ClientError::Unreachable(format!(
                "bad answer: {} results for {count} checks",
                answer.results.len()
            )));
        }
        let made_under = answer.made_under();
        let results = answer
            .results
            .into_iter()
            .map(|result| match result {
                BatchResult::Ok(decision) => Ok(decision),
                BatchResult::Error(err) => Err(err.into()),
            })
            .collect();
        Ok((results, replica, made_under))
    }

    /// One exchange with one replica: the status and the body.
    async fn exchange(
        &self,
        target: &Target,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), hyper_util::client::legacy::Error> {
        let request = Request::post(target.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let response = self.client.request(request).await?;
        let status = response.status();
        // A body that breaks off mid-way reads as empty, which fails to parse below.
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok((status, body))
    }
}

/// One configured limiter URL.
struct Endpoint {
    host: String,
    port: u16,
    /// `<url>/check`, used as is when the name does not resolve (or needs no resolving).
    check_url: String,
    /// A plain-HTTP host name (not an IP literal): resolved to its replicas.
    needs_resolving: bool,
}

impl Endpoint {
    fn parse(url: &str) -> anyhow::Result<Self> {
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
            check_url: format!("{}/check/batch", url.trim_end_matches('/')),
            needs_resolving,
        })
    }
}

struct Refresh {
    resolver: Arc<dyn Resolve>,
    endpoints: Vec<Endpoint>,
    /// Per endpoint, the replicas of its last successful resolution.
    last_resolved: std::sync::Mutex<Vec<Vec<String>>>,
    targets: Arc<RwLock<Arc<[Target]>>>,
}

impl Refresh {
    async fn once(&self) {
        let mut urls = Vec::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if !endpoint.needs_resolving {
                urls.push(endpoint.check_url.clone());
                continue;
            }
            match self.resolver.resolve(&endpoint.host, endpoint.port).await {
                Ok(mut addrs) if !addrs.is_empty() => {
                    addrs.sort();
                    addrs.dedup();
                    let resolved: Vec<String> = addrs
                        .iter()
                        .map(|a| format!("http://{a}/check/batch"))
                        .collect();
                    urls.extend(resolved.iter().cloned());
                    self.last_resolved.lock().expect("resolved lock")[i] = resolved;
                }
                Ok(_) | Err(_) => {
                    // Keep this endpoint's last known replicas; else use the name itself.
                    let last = self.last_resolved.lock().expect("resolved lock")[i].clone();
                    if last.is_empty() {
                        urls.push(endpoint.check_url.clone());
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
            let names: Vec<&str> = urls.iter().map(|t| t.url.as_str()).collect();
            tracing::info!(replicas = urls.len(), targets = ?names, "limiter replicas");
            *targets = urls;
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
    /// To the first replica (an admin change reaches the others through Redis).
    async fn admin(&self, request: AdminRequest) -> Result<(StatusCode, Bytes), ClientError> {
        if request.method != axum::http::Method::GET
            && let Some(refusals) = &self.refusals
        {
            // An override, a reset: some limit may have room now (and may even if this
            // call fails, having reached the limiter).
            refusals.invalidate();
        }
        let base = {
            let targets = self.targets.read().expect("targets lock");
            let Some(target) = targets.first() else {
                return Err(ClientError::Unreachable("no limiter address".into()));
            };
            target.url.trim_end_matches("/check/batch").to_owned()
        };
        let uri: Uri = format!("{base}{}", request.path_and_query)
            .parse()
            .map_err(|e| ClientError::Unreachable(format!("bad admin path: {e}")))?;
        let mut builder = Request::builder()
            .method(request.method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(auth) = request.authorization {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        let forwarded = builder
            .body(Full::new(request.body))
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let response = tokio::time::timeout(
            self.timeout.max(Duration::from_secs(2)),
            self.admin_client.request(forwarded),
        )
        .await
        .map_err(|_| ClientError::Unreachable("the limiter did not answer in time".into()))?
        .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok((status, body))
    }

    async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, ClientError> {
        if let Some(hit) = self.refusals.as_ref().and_then(|r| r.lookup(request)) {
            // Counted by the limiter with a later batch; a full queue loses the count, not
            // the answer.
            let counted = RefusedCheck::new(request.clone(), hit.limits)
                .is_some_and(|notice| self.queue.try_send(Queued::Refused(notice)).is_ok());
            if !counted {
                metrics::counter!("gateway_refusals_uncounted_total").increment(1);
            }
            self.cache_hits.increment(1);
            return Ok(hit.response);
        }
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pending = Pending {
            request: request.clone(),
            reply,
            deadline,
            sent: sent.clone(),
        };
        self.queue
            .try_send(Queued::Check(pending))
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => ClientError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    ClientError::Unreachable("the limiter client is stopped".into())
                }
            })?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            // Dropped unsent: too little of its time was left when its exchange came.
            Ok(Err(_)) if !sent.load(Ordering::Acquire) => Err(ClientError::Overloaded),
            Ok(Err(_)) => Err(ClientError::Unreachable("no answer".into())),
            // Still queued at its deadline: shed, it will not be sent.
            Err(_) if !sent.load(Ordering::Acquire) => Err(ClientError::Overloaded),
            Err(_) => Err(ClientError::Unreachable("timed out".into())),
        }
    }
}

/// Why the limiter refused a whole exchange: the error it sent, else what its status says.
fn refusal(status: StatusCode, body: Option<CheckError>) -> ClientError {
    match body {
        Some(err) => err.into(),
        None if status == StatusCode::TOO_MANY_REQUESTS => ClientError::Overloaded,
        None => ClientError::Unreachable(format!("limiter answered {status}")),
    }
}

/// Whether a failed call got no answer at all, so that asking again is how the request gets
/// its one decision:
/// - the connection was refused: the replica is restarting, or gone since the last resolve;
/// - the connection closed (or was reset) before any answer: a keep-alive connection the
///   replica closed as the request went out, which is what a graceful shutdown does to an
///   idle connection. Such a request was never read, so it was never decided.
///
/// Only a replica that dies (SIGKILL, crash) after deciding but before answering makes the
/// second ask a second decision. That costs the client one more token (stricter, never past
/// its limit) and counts one more event than the client saw.
fn unanswered(err: &hyper_util::client::legacy::Error) -> bool {
    if err.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(err) = cause.downcast_ref::<hyper::Error>()
            && (err.is_incomplete_message() || err.is_canceled())
        {
            return true;
        }
        if let Some(err) = cause.downcast_ref::<std::io::Error>()
            && matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        {
            return true;
        }
        source = cause.source();
    }
    false
}
