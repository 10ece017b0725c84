//! The limiter over HTTP: checks queue for a batch (answered here instead when the refusal
//! cache holds their refusal), and `/admin` requests are passed on.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::http::{Request, StatusCode, Uri, header};
use domain::api::{CheckRequest, CheckResponse, RefusedCheck};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use metrics::Unit;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::batch::{
    Exchanger, HttpClient, Pending, QUEUE_CAPACITY, Queued, dispatch, status_and_body,
};
use super::discovery::{Endpoint, Refresh, Replicas, Resolve};
use super::{AdminRequest, ClientError, LimiterClient};
use crate::refusals::GatewayRefusals;

/// Describes the HTTP limiter client's metrics (help text and unit), once per process, after
/// installing the recorder; [`HttpLimiterClient::new`] calls it.
pub fn describe_metrics() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        kit::metrics::handle();
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
    /// Each resolved replica.
    targets: Replicas,
}

/// How the client batches its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most checks in one exchange (at most [`domain::api::MAX_BATCH`]).
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
            last_resolved: Mutex::new(vec![Vec::new(); endpoints.len()]),
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
        let exchanger = Arc::new(Exchanger::new(
            client,
            timeout,
            targets.clone(),
            refusals.clone(),
            resolve_every,
        ));
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

    /// The base URLs of the replicas requests currently go to.
    pub fn targets(&self) -> Vec<String> {
        self.targets
            .read()
            .expect("targets lock")
            .iter()
            .map(|t| t.base.to_string())
            .collect()
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
            target.base.clone()
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
        Ok(status_and_body(response).await)
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
