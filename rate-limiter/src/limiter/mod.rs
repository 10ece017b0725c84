//! The limiter: one decision per request, from the shared store or (fail-open) a local
//! fallback bucket, and one event per decision to the analytics stream.
//!
//! - `plan`: which limits a request meets (rules, overrides), and what a store is asked.
//! - `checked`: the decision as the limiter answers and publishes it ([`Checked`]).
//! - `stats`: the limiter's counts ([`LimiterStats`]), as metrics and as a status report.
//! - `reported`: the usage Envoys report over RLQS, decided as the limiter decides.
//!
//! One batch, [`Limiter::check_many`]: each request is planned; the refusals that still
//! hold are answered from the refusal cache; the rest go to the store in one call
//! ([`crate::back::resilience::StorePath`]); each answer is counted and its event published
//! (or, with the Redis outbox, recorded by the store in the same step).

mod checked;
mod plan;
mod reported;
mod stats;
#[cfg(test)]
mod tests;

use crate::config::FailMode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use domain::api::{CheckError, CheckRequest, CheckResponse, RefusedCheck};
use domain::descriptor::DEFAULT_DOMAIN;
use domain::event::{EventTemplate, SCHEMA_VERSION};
use domain::limits::{LimitOutcome, Outcome};
use domain::store::{CallNames, Recording, RequestTake};
use domain::{Clock, Quota, RateLimitEvent};
use kit::stream::EventPublisher;

use crate::back::breaker::{Breaker, BreakerState};
use crate::back::overrides::Overrides;
use crate::back::refusals::Refusals;
use crate::back::resilience::{StorePath, StoreReply, Verdict};
use crate::back::rules::Rules;
use crate::back::settle::Settler;
use crate::back::store::{BucketStore, MemoryStore};

pub use checked::{Checked, duration_ms_ceil};
use checked::{rule_hits, rule_name};
use plan::Plan;
pub use stats::{LimiterStats, describe_metrics};

/// A new process's incarnation (see [`Limiter::incarnation`]).
fn new_incarnation() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // A per-process random key (std's hasher seeds): two limiters started in the same
    // millisecond still differ.
    let random = kit::ids::random_u64();
    (ms << 16) | (random & 0xffff)
}

pub struct Limiter {
    stats: LimiterStats,
    latency: metrics::Histogram,
    store: Arc<dyn BucketStore>,
    /// The per-instance bucket used in fail-open mode while the store is unreachable.
    fallback: Arc<MemoryStore>,
    breaker: Arc<Breaker>,
    /// The way to the store: the fallback around the breaker around the store
    /// ([`crate::back::resilience`]).
    store_path: StorePath,
    publisher: Arc<dyn EventPublisher>,
    clock: Arc<dyn Clock>,
    instance_id: String,
    rules: Arc<Rules>,
    overrides: Arc<Overrides>,
    /// Refusals of the shared store answered again locally while they hold; none in front
    /// of the embedded memory store, whose own decision costs as much as a lookup.
    refusals: Option<Refusals>,
    /// Bumped by every reset and refund made here (see [`Limiter::generation`]).
    room_moves: AtomicU64,
    /// This process's life (see [`Limiter::incarnation`]).
    incarnation: u64,
    /// With the outbox (the store asked to record each decision's event with the decision:
    /// [`crate::back::store::outbox`]; the ones it records are not published here), the
    /// events of decisions whose store call is in doubt, held until the store settles it
    /// ([`crate::back::settle`]).
    settler: Option<Settler>,
}

/// One request of a batch on its way through [`Limiter::check_many`]: its plan (or why it
/// has none), who decided it, and whether the store recorded its event.
struct Pending {
    plan: Result<Plan, CheckError>,
    verdict: Option<Verdict>,
    recorded: Recording,
}

impl Pending {
    /// The plan of a request that has one (only those are asked of the store).
    fn planned(&self) -> &Plan {
        self.plan.as_ref().expect("only planned requests are asked")
    }

    fn planned_mut(&mut self) -> &mut Plan {
        self.plan.as_mut().expect("only planned requests are asked")
    }
}

/// What a limiter is made of. The rest has a default that a `with_*` call replaces: the
/// built-in rules, overrides kept in memory, no refusal cache, no outbox.
pub struct Parts {
    pub store: Arc<dyn BucketStore>,
    /// The per-instance bucket of fail-open mode, while the store is unreachable.
    pub fallback: Arc<MemoryStore>,
    pub fail_mode: FailMode,
    pub breaker: Breaker,
    pub publisher: Arc<dyn EventPublisher>,
    pub clock: Arc<dyn Clock>,
    /// Names this limiter in its events.
    pub instance_id: String,
}

impl Limiter {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            store,
            fallback,
            fail_mode,
            breaker,
            publisher,
            clock,
            instance_id,
        } = parts;
        describe_metrics();
        let rules = Arc::new(Rules::builtin(*store.policy()));
        let breaker = Arc::new(breaker);
        // Fail-open in front of a store that can fail: the fallback learns from the store's
        // answers (not for the embedded memory store, whose fallback is never asked).
        let store_path =
            StorePath::new(store.clone(), breaker.clone(), fallback.clone(), fail_mode);
        Self {
            rules,
            overrides: Arc::new(Overrides::in_memory()),
            stats: LimiterStats::default(),
            latency: metrics::histogram!("ratelimit_decision_duration_seconds"),
            store,
            fallback,
            breaker,
            store_path,
            publisher,
            clock,
            instance_id,
            refusals: None,
            room_moves: AtomicU64::new(0),
            incarnation: new_incarnation(),
            settler: None,
        }
    }

    /// Asks the store to record each decision's event in the step that decides (a store
    /// with an outbox does; see [`crate::back::relay`]), publishing here only the events it did
    /// not record (refusals answered from a cache, fail-open decisions). The event of a
    /// decision whose store call is in doubt is held until the store settles it (a task
    /// spawned here: call it within a runtime).
    pub fn with_outbox(mut self, on: bool) -> Self {
        self.settler = on.then(|| Settler::spawn(self.store.clone(), self.publisher.clone()));
        self
    }

    /// The event template of a decision the store may record: none for a refund or a peek
    /// (no event).
    fn template(&self, request: &CheckRequest, plan: &Plan) -> Option<EventTemplate> {
        if request.cost <= 0 {
            return None;
        }
        Some(EventTemplate {
            user_id: request.user_id.clone(),
            cost: request.cost.unsigned_abs(),
            limiter_id: self.instance_id.clone(),
            domain: (request.domain != DEFAULT_DOMAIN).then(|| request.domain.clone()),
            rules: if plan.builtin_only(&request.domain) {
                Vec::new()
            } else {
                plan.limits
                    .iter()
                    .map(|l| (rule_name(&request.domain, &l.name), l.applied.shadow))
                    .collect()
            },
        })
    }

    /// Which life of this limiter is answering: its start time in milliseconds since the
    /// Unix epoch in the high bits, random low bits. With [`Limiter::generation`] it names
    /// the state a refusal was made under, unique per process: a restarted limiter at the
    /// same address never answers with the generation of its previous life.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Answers refusals of the store again locally while they hold, keeping at most
    /// `capacity` of them (0: no cache). See [`crate::back::refusals`].
    pub fn with_refusal_cache(mut self, capacity: usize) -> Self {
        self.refusals = (capacity > 0).then(|| Refusals::new(capacity));
        self
    }

    /// Requests answered from the refusal cache so far.
    pub fn refusal_cache_hits(&self) -> u64 {
        self.refusals.as_ref().map_or(0, Refusals::hits)
    }

    /// The generation refusals are remembered under: moves whenever a limit may have
    /// gained room other than by time (rules, overrides, resets, refunds).
    pub fn generation(&self) -> u64 {
        let local = self.room_moves.load(Ordering::Acquire);
        self.rules
            .generation()
            .wrapping_add(self.overrides.generation())
            .wrapping_add(local)
    }

    /// The generation this limiter's own refusal cache holds entries under: rules and
    /// overrides (a reset or a refund moves only the room slots of its limits).
    fn cache_generation(&self) -> u64 {
        self.rules
            .generation()
            .wrapping_add(self.overrides.content_generation())
    }

    /// A reset or refund may have given the limits under `keys` room: forget their refusals
    /// here, and tell the other limiters (through Redis); the gateways, which cannot tell
    /// limits apart, see [`Limiter::generation`] move.
    async fn gave_room(&self, keys: &[String]) {
        self.room_moves.fetch_add(1, Ordering::AcqRel);
        // Told even by a limiter without a cache: the others may have one.
        if let Err(err) = self.overrides.give_room(keys).await {
            tracing::warn!(error = %err, "cannot tell the other limiters of a reset or refund; their cached refusals hold until they expire");
        }
    }

    pub fn publisher(&self) -> &Arc<dyn EventPublisher> {
        &self.publisher
    }

    /// Whether the buckets live outside this process (in Redis).
    pub fn store_is_remote(&self) -> bool {
        self.store.is_remote()
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Decides with `rules` from now on (the built-in rule until then).
    pub fn with_rules(mut self, rules: Arc<Rules>) -> Self {
        self.rules = rules;
        self
    }

    /// The rules in force.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Takes overrides from `overrides` (kept in memory until then).
    pub fn with_overrides(mut self, overrides: Arc<Overrides>) -> Self {
        self.overrides = overrides;
        self
    }

    /// The overrides in force, and where they are kept.
    pub fn overrides(&self) -> &Arc<Overrides> {
        &self.overrides
    }

    /// What every limit that applies to `request` has left, without spending anything and
    /// without an event (an admin's peek; `request.cost` is ignored).
    pub async fn peek(&self, request: &CheckRequest) -> Result<Checked, CheckError> {
        let mut peek = request.clone();
        peek.cost = 0;
        let plan = self.plan(&peek)?;
        if plan.limits.is_empty() {
            return Ok(Checked::new(
                &plan,
                &Outcome {
                    allowed: true,
                    limits: Vec::new(),
                },
                false,
                0,
            ));
        }
        let mut reply = self.call_store(vec![plan.take.clone()]).await;
        let verdict = reply.verdicts.pop().unwrap_or(Verdict::Unavailable);
        self.decided(&plan, verdict, 0)
    }

    /// Resets every limit that applies to `request` (an admin's reset): they start afresh,
    /// here and in the fail-open fallback. Returns how many limits were reset.
    pub async fn reset(&self, request: &CheckRequest) -> Result<usize, CheckError> {
        let mut peek = request.clone();
        peek.cost = 0;
        let plan = self.plan(&peek)?;
        let keys: Vec<String> = plan.take.limits.iter().map(|l| l.key.clone()).collect();
        self.fallback.forget(&keys);
        if keys.is_empty() {
            return Ok(0);
        }
        let reset = self.store.reset(&keys).await;
        // Even a failed reset may have reached the store.
        self.gave_room(&keys).await;
        reset.map_err(|err| {
            tracing::warn!(error = %err, "reset failed");
            CheckError::StoreUnavailable
        })?;
        Ok(keys.len())
    }

    /// Decides `request` and answers in the wire format.
    pub async fn check_response(
        &self,
        request: &CheckRequest,
    ) -> Result<CheckResponse, CheckError> {
        Ok(self.check(request).await?.into_response())
    }

    /// Whether the shared store answers and the breaker is closed. While the breaker is
    /// open past its period, the readiness probe is itself the breaker's probe (a ping of
    /// the store): a Redis blip with no traffic must not keep a limiter unready for ever,
    /// since readiness is what keeps traffic away.
    pub async fn ready(&self) -> bool {
        if self.breaker.state() == BreakerState::Closed {
            return self.store.ping().await.is_ok();
        }
        let Some(permit) = self.breaker.permit() else {
            // Still open, or another caller is probing.
            return false;
        };
        // The permit is given back on drop if this probe is abandoned.
        if self.store.ping().await.is_ok() {
            permit.success();
            true
        } else {
            permit.failure();
            false
        }
    }

    /// Decides `request` and publishes the decision.
    pub async fn check(&self, request: &CheckRequest) -> Result<Checked, CheckError> {
        self.check_many(std::slice::from_ref(request))
            .await
            .pop()
            .expect("one result per request")
    }

    /// Decides `requests` in order, as [`Limiter::check`] would one after the other, in one
    /// call to the store, and publishes each decision.
    pub async fn check_many(&self, requests: &[CheckRequest]) -> Vec<Result<Checked, CheckError>> {
        self.check_batch(requests, None, false).await
    }

    /// [`Limiter::check_many`] for a batch its sender named `batch` (the gateway's
    /// `POST /check/batch` id), sent `again` or for the first time: sent again, a check
    /// already decided under that name and place, by any limiter on the same store, is
    /// answered as it was decided, without spending or counting it again (a store that
    /// remembers answers: Redis, for a while).
    pub async fn check_batch(
        &self,
        requests: &[CheckRequest],
        batch: Option<&str>,
        again: bool,
    ) -> Vec<Result<Checked, CheckError>> {
        let started = Instant::now();
        let mut pending: Vec<Pending> = requests
            .iter()
            .map(|r| Pending {
                plan: self.plan(r),
                verdict: None,
                recorded: Recording::No,
            })
            .collect();
        // Refusals that still hold are answered here; the rest that some limit applies to
        // go to the store (the others are allowed, with nothing to count down).
        let sent_us = self.clock.now_us();
        let generation = self.cache_generation();
        let room = self.overrides.room();
        let mut asked: Vec<usize> = Vec::with_capacity(pending.len());
        for (i, p) in pending.iter_mut().enumerate() {
            let Ok(plan) = &p.plan else { continue };
            if plan.limits.is_empty() {
                continue;
            }
            let held = self
                .refusals
                .as_ref()
                .and_then(|refusals| refusals.lookup(&plan.take, sent_us, generation, room));
            match held {
                Some(outcome) => p.verdict = Some(Verdict::Stored(outcome)),
                None => asked.push(i),
            }
        }
        // With the outbox, each decision's event rides in the store's call.
        let events: Vec<Option<EventTemplate>> = if self.settler.is_some() {
            asked
                .iter()
                .map(|&i| self.template(&requests[i], pending[i].planned()))
                .collect()
        } else {
            Vec::new()
        };
        // Moved out for the store call, and back after: no copy of the keys.
        let takes: Vec<RequestTake> = asked
            .iter()
            .map(|&i| std::mem::take(&mut pending[i].planned_mut().take))
            .collect();
        let names = CallNames {
            batch,
            again,
            places: &asked,
        };
        let reply = self.call_store_recording(takes, events, names).await;
        let mut recorded = reply.recorded.into_iter();
        let mut refunded: Vec<String> = Vec::new();
        for ((&i, take), verdict) in asked.iter().zip(reply.takes).zip(reply.verdicts) {
            if let (Some(refusals), Verdict::Stored(outcome)) = (&self.refusals, &verdict) {
                refusals.record(&take, outcome, sent_us, generation, room);
            }
            if take.cost < 0 {
                refunded.extend(take.limits.iter().map(|l| l.key.clone()));
            }
            let p = &mut pending[i];
            p.planned_mut().take = take;
            p.verdict = Some(verdict);
            p.recorded = recorded.next().unwrap_or_default();
        }
        if !refunded.is_empty() {
            // Asked of the store even when it failed: the refund may have landed.
            self.gave_room(&refunded).await;
        }
        requests
            .iter()
            .zip(pending)
            .map(|(request, p)| {
                let plan = p.plan?;
                let verdict = p.verdict.unwrap_or(Verdict::Stored(Outcome {
                    allowed: true,
                    limits: Vec::new(),
                }));
                self.finish(request, &plan, verdict, started, p.recorded)
            })
            .collect()
    }

    /// Counts and publishes refusals a gateway answered from its refusal cache: each as
    /// refused by the limits it names, without asking the store (their refusal was this
    /// service's, and still holds). A check that no longer plans (a rule changed under it)
    /// is counted with whatever limits it names that still apply.
    pub fn count_refused(&self, refused: &[RefusedCheck]) {
        for notice in refused {
            let request = &notice.check;
            let Ok(plan) = self.plan(request) else {
                continue;
            };
            let limits = plan
                .limits
                .iter()
                .map(|p| LimitOutcome {
                    admits: !notice.limits.iter().any(|n| **n == *p.name),
                    quota: Quota {
                        limit: p.applied.spec.limit(),
                        remaining: 0,
                        reset_after: std::time::Duration::ZERO,
                    },
                    retry_after: std::time::Duration::ZERO,
                })
                .collect::<Vec<_>>();
            if limits.iter().all(|l| l.admits) {
                continue;
            }
            let outcome = Outcome {
                allowed: false,
                limits,
            };
            self.stats.gateway_refused.fetch_add(1, Ordering::Relaxed);
            let _ = self.finish(
                request,
                &plan,
                Verdict::Stored(outcome),
                Instant::now(),
                Recording::No,
            );
        }
    }

    /// One call down the store stack (fallback, breaker, store) for `takes`, which come
    /// back with the reply.
    async fn call_store(&self, takes: Vec<RequestTake>) -> StoreReply {
        self.call_store_recording(takes, Vec::new(), CallNames::default())
            .await
    }

    /// [`Limiter::call_store`], the store asked to record `events` with the decisions.
    async fn call_store_recording(
        &self,
        takes: Vec<RequestTake>,
        events: Vec<Option<EventTemplate>>,
        names: CallNames<'_>,
    ) -> StoreReply {
        if takes.is_empty() {
            // All answered already (no limit applied, or refusals that still hold).
            return StoreReply {
                takes,
                verdicts: Vec::new(),
                errors: 0,
                recorded: Vec::new(),
            };
        }
        let reply = self.store_path.decide(takes, events, names).await;
        if reply.errors > 0 {
            self.stats
                .store_errors
                .fetch_add(reply.errors, Ordering::Relaxed);
        }
        reply
    }

    /// The decision of `plan` from its verdict: the store's, the fail-open fallback's
    /// (degraded), or none (fail-closed).
    fn decided(&self, plan: &Plan, verdict: Verdict, cost: i64) -> Result<Checked, CheckError> {
        match verdict {
            Verdict::Stored(outcome) => Ok(Checked::new(plan, &outcome, false, cost)),
            Verdict::Fallback(outcome) => Ok(Checked::new(plan, &outcome, true, cost)),
            Verdict::Unavailable => Err(CheckError::StoreUnavailable),
        }
    }

    /// Gives the fail-open fallback `1 / parts` of the policy: one share per live limiter.
    pub fn set_fallback_parts(&self, parts: u64) {
        self.fallback.set_parts(parts);
    }

    /// Completes a decision from its verdict (an error when nobody decided: fail-closed with
    /// the store away), counts it and publishes it (unless the store `recorded` its event).
    fn finish(
        &self,
        request: &CheckRequest,
        plan: &Plan,
        verdict: Verdict,
        started: Instant,
        recorded: Recording,
    ) -> Result<Checked, CheckError> {
        let checked = self.decided(plan, verdict, request.cost).inspect_err(|_| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        })?;
        self.count(request, plan, &checked, started, recorded);
        Ok(checked)
    }

    /// Counts a decision and publishes its event (nothing for a refund, which is not a
    /// decision; nothing either when the store `recorded` the event with the decision; held
    /// until settled when that is in doubt).
    fn count(
        &self,
        request: &CheckRequest,
        plan: &Plan,
        checked: &Checked,
        started: Instant,
        recorded: Recording,
    ) {
        self.latency.record(started.elapsed().as_secs_f64());
        if request.cost < 0 {
            return;
        }
        let outcome = if checked.decision.is_allowed() {
            &self.stats.allowed
        } else {
            &self.stats.limited
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        if checked.degraded {
            self.stats.degraded.fetch_add(1, Ordering::Relaxed);
        }
        if checked.shadow_refused {
            self.stats.shadow_refused.fetch_add(1, Ordering::Relaxed);
        }
        let in_doubt = match recorded {
            Recording::Yes => {
                self.stats.outboxed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Recording::InDoubt(ticket) => Some(ticket),
            Recording::No => None,
        };
        let event = RateLimitEvent {
            schema_version: SCHEMA_VERSION,
            user_id: request.user_id.clone(),
            allowed: checked.decision.is_allowed(),
            cost: request.cost.unsigned_abs(),
            count: 1,
            ts_ms: self.clock.now_ms(),
            limiter_id: self.instance_id.clone(),
            degraded: checked.degraded,
            domain: (request.domain != DEFAULT_DOMAIN).then(|| request.domain.clone()),
            rules: rule_hits(request, plan, checked),
            stamp: None,
        };
        match (in_doubt, &self.settler) {
            (Some(ticket), Some(settler)) => settler.hold(ticket, event),
            _ => self.publisher.publish(event),
        }
    }
}
