//! The batches: checks wait in a queue; each batch is posted to one replica after another
//! until one answers, and each check's caller gets its answer. A refusal the gateway
//! answered from its cache rides along, to be counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Request, StatusCode, header};
use domain::api::{
    BatchRequest, BatchResponse, BatchResult, CheckError, CheckRequest, CheckResponse, Generation,
    MAX_BATCH, RefusedCheck,
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::ClientError;
use super::discovery::{Replicas, Target};
use super::http::Batching;
use crate::refusals::GatewayRefusals;

/// What waits for the next exchange: a check, or a refusal answered here, to be counted.
pub(super) enum Queued {
    Check(Pending),
    Refused(RefusedCheck),
}

/// Checks waiting for an exchange; past this, a check is refused as overloaded at once.
pub(super) const QUEUE_CAPACITY: usize = 16_384;

/// A check waiting for its batch, and where its answer goes.
pub(super) struct Pending {
    pub(super) request: CheckRequest,
    pub(super) reply: oneshot::Sender<Result<CheckResponse, ClientError>>,
    /// When its caller stops waiting: `LIMITER_TIMEOUT_MS` after it was queued. One clock
    /// for the whole way: the exchange that carries it gives up at the latest deadline of
    /// its checks, and a check still queued at its deadline is never sent.
    pub(super) deadline: tokio::time::Instant,
    /// Set when its exchange leaves: a caller that times out before that was shed
    /// (429 `overloaded`, nothing spent); after, the limiter did not answer in time (503).
    pub(super) sent: Arc<std::sync::atomic::AtomicBool>,
}

/// A batch's answer: each check's result in order, the replica that answered, and the
/// generation it answered under.
struct BatchAnswer {
    results: Vec<Result<CheckResponse, ClientError>>,
    replica: Arc<str>,
    generation: Option<Generation>,
}

/// What the batches are sent with.
pub(super) struct Exchanger {
    client: HttpClient,
    /// The least time left for a check to be worth sending (a quarter of
    /// `LIMITER_TIMEOUT_MS`): one with less is shed rather than spend a token on a
    /// decision its caller is unlikely to wait for.
    min_budget: Duration,
    targets: Replicas,
    next: AtomicUsize,
    refusals: Option<Arc<GatewayRefusals>>,
    /// Replicas whose last connection attempt failed, and until when they are asked only
    /// after the others (one resolve interval: by then the name's answer has dropped them,
    /// or they are back).
    unreachable: Mutex<HashMap<Arc<str>, Instant>>,
    avoid_for: Duration,
    /// Names each batch: asked again of another replica, it keeps its name, so that what
    /// the first decided is not decided twice (`BatchRequest::id`).
    ids: kit::ids::IdSource,
}

/// hyper's pooled HTTP/1 client: reqwest's conveniences (redirects, URL parsing, cookies)
/// cost more per call than this hop needs (measured in BENCHMARKS.md).
pub(super) type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

impl Exchanger {
    pub(super) fn new(
        client: HttpClient,
        timeout: Duration,
        targets: Replicas,
        refusals: Option<Arc<GatewayRefusals>>,
        avoid_for: Duration,
    ) -> Self {
        Self {
            client,
            min_budget: timeout / 4,
            targets,
            next: AtomicUsize::new(0),
            refusals,
            unreachable: Mutex::new(HashMap::new()),
            avoid_for,
            ids: kit::ids::IdSource::new(),
        }
    }
}

/// Sends what waits in `queue` in batches, at most `batching.in_flight` at a time, until
/// the client is dropped.
pub(super) async fn dispatch(
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
            exchanger.deliver(pending).await;
            drop(permit);
        });
    }
}

impl Exchanger {
    /// Asks the limiter to decide `pending` and hands each check its answer. A check whose
    /// caller stopped waiting (timed out, or the client went away) is not sent: nobody would
    /// learn its decision, so it must not spend a token.
    async fn deliver(&self, queued: Vec<Queued>) {
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
        batch.id = Some(self.ids.next_id());
        if batch.checks.is_empty() {
            // Only refusals to count: they have no caller waiting, so a short deadline.
            latest = now + self.min_budget * 4;
        }
        if !batch.checks.is_empty() {
            metrics::histogram!("gateway_limiter_batch_size").record(batch.checks.len() as f64);
        }
        match self.send(&batch, latest).await {
            Ok(BatchAnswer {
                results,
                replica,
                generation,
            }) => {
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

    /// Sends one batch, to one replica after another until one answers or the deadline
    /// passes; an error is the whole batch's.
    async fn send(
        &self,
        batch: &BatchRequest,
        deadline: tokio::time::Instant,
    ) -> Result<BatchAnswer, ClientError> {
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
                order.sort_by_key(|t| unreachable.contains_key(&t.base));
            }
        }
        let count = batch.checks.len();
        let body = Bytes::from(serde_json::to_vec(batch).expect("a batch serializes"));
        let avoid = |target: &Target| {
            self.unreachable
                .lock()
                .expect("unreachable lock")
                .insert(target.base.clone(), Instant::now() + self.avoid_for);
        };
        // The replica being asked, for when the deadline passes first.
        let asking = AtomicUsize::new(0);
        let exchange = async {
            let mut attempt = 0;
            let mut body = body;
            loop {
                let target = order[attempt % order.len()];
                asking.store(attempt % order.len(), Ordering::Relaxed);
                let result = self.post(target, body.clone()).await;
                if let Err(err) = &result
                    && err.is_connect()
                {
                    avoid(target);
                }
                match result {
                    Ok((status, body)) => return Ok((status, body, target.base.clone())),
                    Err(err) if attempt + 1 < attempts && unanswered(&err) => {
                        metrics::counter!("gateway_limiter_retries_total").increment(1);
                        tracing::debug!(target = &*target.base, error = %err, "limiter call unanswered; asking the next replica");
                        if attempt == 0 {
                            // The replica may have decided it before it died: the next
                            // answers what was decided under the batch's id, if anything.
                            let again = BatchRequest {
                                again: true,
                                ..batch.clone()
                            };
                            body = Bytes::from(
                                serde_json::to_vec(&again).expect("a batch serializes"),
                            );
                        }
                        attempt += 1;
                    }
                    Err(err) => {
                        tracing::warn!(target = &*target.base, error = %err, source = ?std::error::Error::source(&err), "limiter call failed");
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
        let generation = answer.made_under();
        let results = answer
            .results
            .into_iter()
            .map(|result| match result {
                BatchResult::Ok(decision) => Ok(decision),
                BatchResult::Error(err) => Err(err.into()),
            })
            .collect();
        Ok(BatchAnswer {
            results,
            replica,
            generation,
        })
    }

    /// One batch posted to one replica: the status and the body.
    async fn post(
        &self,
        target: &Target,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), hyper_util::client::legacy::Error> {
        let request = Request::post(target.check_batch.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let response = self.client.request(request).await?;
        Ok(status_and_body(response).await)
    }
}

/// A response's status and whole body. A body that breaks off mid-way reads as empty (which
/// then fails to parse as an answer).
pub(super) async fn status_and_body(
    response: axum::http::Response<hyper::body::Incoming>,
) -> (StatusCode, Bytes) {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (status, body)
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
/// A replica that dies (SIGKILL, crash) after deciding but before answering has decided
/// the batch: the second ask carries the batch's id marked `again`, and a replica on the
/// same Redis answers what was decided under it rather than decide it twice.
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
