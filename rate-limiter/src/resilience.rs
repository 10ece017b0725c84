//! The way to the bucket store, as `tower` layers: the store itself as a [`Service`], the
//! circuit breaker around it ([`BreakerLayer`]) and the fail-mode fallback around that
//! ([`FallbackLayer`]). The limiter calls the stack once per batch.
//!
//! ```text
//! limiter ── FallbackLayer ── BreakerLayer ── StoreService ── Redis (or memory)
//!            fail-open: the      one permit      decide_many
//!            local bucket        per call
//! ```
//!
//! State that a call takes lives in guards, so a call whose future is dropped (a client
//! that went away, a deadline) gives it back: the breaker's permit counts an abandoned
//! probe as failed ([`crate::breaker::Permit`]). The fallback holds nothing across the
//! call. Every call's future is `'static` (it owns its requests and hands them back), so
//! the stack can be boxed, cloned and called from any task.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ratelimit_domain::event::EventTemplate;
use ratelimit_domain::limits::Outcome;
use ratelimit_domain::store::RequestTake;
use service_kit::config::FailMode;
use tower::{Layer, Service};

use crate::breaker::Breaker;
use crate::store::{BucketStore, MemoryStore};

/// One call to the store: the requests of a batch, moved in and handed back with the reply.
pub struct StoreCall {
    pub takes: Vec<RequestTake>,
    /// The decisions' events, for a store that records them with the decision (the Redis
    /// outbox); same positions as `takes`, shorter means none for the rest.
    pub events: Vec<Option<EventTemplate>>,
}

/// What became of one request.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The shared store decided.
    Stored(Outcome),
    /// The store made no decision and the local fail-open bucket did (degraded).
    Fallback(Outcome),
    /// No decision (the store failed or the breaker is open, and the limiter fails closed).
    Unavailable,
}

/// The reply to a [`StoreCall`]: its requests, one verdict each, and how many store
/// errors the call met (for the limiter's count).
pub struct StoreReply {
    pub takes: Vec<RequestTake>,
    pub verdicts: Vec<Verdict>,
    pub errors: u64,
    /// Per request, whether the store recorded its event (same positions; shorter means
    /// not for the rest): the limiter then publishes nothing for it.
    pub recorded: Vec<bool>,
}

impl StoreReply {
    /// Whether the store recorded request `i`'s event.
    pub fn recorded(&self, i: usize) -> bool {
        self.recorded.get(i).copied().unwrap_or(false)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send + 'static>>;

/// The bucket store as a service: one `decide_many` per call.
#[derive(Clone)]
pub struct StoreService {
    store: Arc<dyn BucketStore>,
}

impl StoreService {
    pub fn new(store: Arc<dyn BucketStore>) -> Self {
        Self { store }
    }
}

impl Service<StoreCall> for StoreService {
    type Response = StoreReply;
    type Error = Infallible;
    type Future = BoxFuture<StoreReply>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: StoreCall) -> Self::Future {
        let store = self.store.clone();
        Box::pin(async move {
            let takes = call.takes;
            let mut recorded = Vec::new();
            let (verdicts, errors) = match store.decide_recorded(&takes, &call.events).await {
                Ok(decided) => {
                    let mut errors = 0;
                    let verdicts = decided
                        .into_iter()
                        .map(|(d, was_recorded)| {
                            recorded.push(was_recorded);
                            match d {
                                Ok(outcome) => Verdict::Stored(outcome),
                                Err(_) => {
                                    errors += 1;
                                    Verdict::Unavailable
                                }
                            }
                        })
                        .collect();
                    (verdicts, errors)
                }
                Err(err) => {
                    tracing::debug!(error = %err, "bucket store call failed");
                    (vec![Verdict::Unavailable; takes.len()], 1)
                }
            };
            Ok(StoreReply {
                takes,
                verdicts,
                errors,
                recorded,
            })
        })
    }
}

/// The circuit breaker around the store: a call goes through with a permit, or is answered
/// `Unavailable` at once while the breaker is open. One verdict per call, however many
/// requests it carried: a failing batch counts one failure, not one per request.
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Arc<Breaker>,
}

impl BreakerLayer {
    pub fn new(breaker: Arc<Breaker>) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> Service<StoreCall> for BreakerService<S>
where
    S: Service<StoreCall, Response = StoreReply, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = StoreReply;
    type Error = Infallible;
    type Future = BoxFuture<StoreReply>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: StoreCall) -> Self::Future {
        let permit = if call.takes.is_empty() {
            None
        } else {
            self.breaker.permit()
        };
        let Some(permit) = permit else {
            let verdicts = vec![Verdict::Unavailable; call.takes.len()];
            return Box::pin(std::future::ready(Ok(StoreReply {
                takes: call.takes,
                verdicts,
                errors: 0,
                recorded: Vec::new(),
            })));
        };
        let reply = self.inner.call(call);
        Box::pin(async move {
            // The permit lives in this future: dropped with it, it gives its slot back.
            let reply = reply.await?;
            if reply.errors == 0 {
                permit.success();
            } else {
                permit.failure();
            }
            Ok(reply)
        })
    }
}

/// The fail mode around the breaker: where the store made no decision, the local fallback
/// bucket decides (fail-open, degraded) or nobody does (fail-closed). In fail-open mode in
/// front of a remote store, the fallback also learns what the store left each spending
/// key, so that an outage starts from there rather than from a full bucket.
#[derive(Clone)]
pub struct FallbackLayer {
    fallback: Arc<MemoryStore>,
    fail_mode: FailMode,
    seeds: bool,
}

impl FallbackLayer {
    /// `seeds`: learn from the store's answers (fail-open in front of a remote store).
    pub fn new(fallback: Arc<MemoryStore>, fail_mode: FailMode, seeds: bool) -> Self {
        Self {
            fallback,
            fail_mode,
            seeds,
        }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = FallbackService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FallbackService<S> {
    inner: S,
    layer: FallbackLayer,
}

impl FallbackLayer {
    /// Gives the fallback a share of what the shared store left each limit, for limits the
    /// store left at half or less (the others lose at most half of it to an outage): a
    /// write per decision only for the keys that are spending fast.
    fn remember(&self, take: &RequestTake, outcome: &Outcome) {
        if self.seeds && take.cost > 0 {
            for (limit, o) in take.limits.iter().zip(&outcome.limits) {
                if o.quota.remaining * 2 <= o.quota.limit {
                    self.fallback
                        .seed(&limit.key, &limit.applied.spec, o.quota.remaining);
                }
            }
        }
    }

    fn settle(&self, mut reply: StoreReply) -> StoreReply {
        for (take, verdict) in reply.takes.iter().zip(reply.verdicts.iter_mut()) {
            match verdict {
                Verdict::Stored(outcome) => self.remember(take, outcome),
                Verdict::Unavailable if self.fail_mode == FailMode::Open => {
                    *verdict = Verdict::Fallback(self.fallback.decide_now(take));
                }
                _ => {}
            }
        }
        reply
    }
}

impl<S> Service<StoreCall> for FallbackService<S>
where
    S: Service<StoreCall, Response = StoreReply, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = StoreReply;
    type Error = Infallible;
    type Future = BoxFuture<StoreReply>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: StoreCall) -> Self::Future {
        let reply = self.inner.call(call);
        let layer = self.layer.clone();
        Box::pin(async move { Ok(layer.settle(reply.await?)) })
    }
}
