//! The way to the bucket store: the store itself, the circuit breaker in front of it, and
//! the fail-mode fallback around both ([`StorePath`]). The limiter takes it once per batch.
//!
//! ```text
//! limiter ── fail mode ── breaker ── store ── Redis (or memory)
//!            fail-open: the  one permit  decide_many
//!            local bucket    per call
//! ```
//!
//! Plain functions, not `tower` layers: every step answers every request (a verdict, never
//! an error), and none has a readiness of its own to report (the breaker answers at once
//! while open rather than wait), so a layer would add only boxing.
//!
//! State that a call takes lives in guards, so a call whose future is dropped (a client
//! that went away, a deadline) gives it back: the breaker's permit counts an abandoned
//! probe as failed ([`crate::back::breaker::Permit`]). The fallback holds nothing across the
//! call.

use std::sync::Arc;

use crate::config::FailMode;
use domain::event::EventTemplate;
use domain::limits::Outcome;
use domain::store::{CallNames, Recording, RequestTake};

use crate::back::breaker::Breaker;
use crate::back::store::{BucketStore, MemoryStore};

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

/// The requests of one call, handed back with one verdict each and how many store errors
/// the call met (for the limiter's count).
pub struct StoreReply {
    pub takes: Vec<RequestTake>,
    pub verdicts: Vec<Verdict>,
    pub errors: u64,
    /// Per request, what became of its event in the store (same positions; shorter means
    /// not recorded for the rest): recorded, the limiter publishes nothing; in doubt, it
    /// holds the event until the store settles the call.
    pub recorded: Vec<Recording>,
}

/// The store, the breaker in front of it and the fail mode around both.
pub struct StorePath {
    store: Arc<dyn BucketStore>,
    breaker: Arc<Breaker>,
    fallback: Arc<MemoryStore>,
    fail_mode: FailMode,
    /// Whether the fallback learns from the store's answers (fail-open in front of a remote
    /// store).
    seeds: bool,
}

impl StorePath {
    pub fn new(
        store: Arc<dyn BucketStore>,
        breaker: Arc<Breaker>,
        fallback: Arc<MemoryStore>,
        fail_mode: FailMode,
    ) -> Self {
        let seeds = fail_mode == FailMode::Open && store.is_remote();
        Self {
            store,
            breaker,
            fallback,
            fail_mode,
            seeds,
        }
    }

    /// Decides `takes`: through the breaker to the store, then, where the store made no
    /// decision, by the fail mode. `events` are the decisions' events, for a store that
    /// records them with the decision (the Redis outbox); same positions as `takes`,
    /// shorter means none for the rest.
    pub async fn decide(
        &self,
        takes: Vec<RequestTake>,
        events: Vec<Option<EventTemplate>>,
        names: CallNames<'_>,
    ) -> StoreReply {
        let reply = self.through_breaker(takes, events, names).await;
        self.apply_fail_mode(reply)
    }

    /// A call goes through with a permit, or is answered `Unavailable` at once while the
    /// breaker is open. One verdict per call, however many requests it carried: a failing
    /// batch counts one failure, not one per request.
    async fn through_breaker(
        &self,
        takes: Vec<RequestTake>,
        events: Vec<Option<EventTemplate>>,
        names: CallNames<'_>,
    ) -> StoreReply {
        let permit = if takes.is_empty() {
            None
        } else {
            self.breaker.permit()
        };
        let Some(permit) = permit else {
            let verdicts = vec![Verdict::Unavailable; takes.len()];
            return StoreReply {
                takes,
                verdicts,
                errors: 0,
                recorded: Vec::new(),
            };
        };
        // The permit lives in this future: dropped with it, it gives its slot back.
        let reply = decide_in(&*self.store, takes, &events, names).await;
        if reply.errors == 0 {
            permit.success();
        } else {
            permit.failure();
        }
        reply
    }

    /// Where the store made no decision, the local fallback bucket decides (fail-open,
    /// degraded) or nobody does (fail-closed). In fail-open mode in front of a remote
    /// store, the fallback also learns what the store left each spending key, so that an
    /// outage starts from there rather than from a full bucket.
    fn apply_fail_mode(&self, mut reply: StoreReply) -> StoreReply {
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
}

/// One call of the store: a verdict per request, and whether it recorded its event.
async fn decide_in(
    store: &dyn BucketStore,
    takes: Vec<RequestTake>,
    events: &[Option<EventTemplate>],
    names: CallNames<'_>,
) -> StoreReply {
    let mut recorded = Vec::new();
    let (verdicts, errors) = match store.decide_recorded(&takes, events, names).await {
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
    StoreReply {
        takes,
        verdicts,
        errors,
        recorded,
    }
}
