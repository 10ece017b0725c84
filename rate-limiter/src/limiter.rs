//! The limiter: one decision per request, from the shared store or (fail-open) a local
//! fallback bucket, and one event per decision to the analytics stream.

mod reported;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use metrics::Unit;
use ratelimit_domain::api::{CheckRequest, CheckResponse, LimitStatus, RefusedCheck};
use ratelimit_domain::descriptor::DEFAULT_DOMAIN;
use ratelimit_domain::event::{RuleHit, RuleOutcome, SCHEMA_VERSION};
use ratelimit_domain::keys::DEFAULT_LIMIT_NAME;
use ratelimit_domain::keys::limit_key;
use ratelimit_domain::limits::{Applied, LimitOutcome, Outcome};
use ratelimit_domain::store::{LimitTake, RequestTake};
use ratelimit_domain::{Clock, Decision, Policy, Quota, RateLimitEvent};
use service_kit::config::FailMode;
use service_kit::stream::EventPublisher;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::breaker::{Breaker, BreakerState};
use crate::overrides::Overrides;
use crate::refusals::Refusals;
use crate::resilience::{
    BreakerLayer, FallbackLayer, StoreCall, StoreReply, StoreService, Verdict,
};
use crate::rules::Rules;
use crate::store::{BucketStore, MemoryStore};

/// A decision and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The request's decision, with the numbers of the limit closest to refusing (when
    /// refused: the enforced limit that refused with the longest wait).
    pub decision: Decision,
    /// Made by the local fallback because the shared store was unreachable.
    pub degraded: bool,
    /// Every limit that applied.
    pub limits: Vec<LimitStatus>,
    /// The window of the limit the decision's numbers come from.
    pub window: std::time::Duration,
    /// Some shadow limit would have refused the request.
    pub shadow_refused: bool,
}

impl Checked {
    pub fn to_response(&self) -> CheckResponse {
        self.clone().into_response()
    }

    /// [`Checked::to_response`], without copying the limits.
    pub fn into_response(self) -> CheckResponse {
        let quota = self.decision.quota();
        CheckResponse {
            allowed: self.decision.is_allowed(),
            limit: quota.limit,
            remaining: quota.remaining,
            retry_after_ms: duration_ms_ceil(self.decision.retry_after()),
            reset_after_ms: duration_ms_ceil(quota.reset_after),
            window_ms: duration_ms_ceil(self.window),
            degraded: self.degraded,
            limits: self.limits,
        }
    }

    /// The decision of a request with every limit in `plan` and their `outcome`.
    fn new(plan: &Plan, outcome: &Outcome, degraded: bool, cost: i64) -> Self {
        let limits: Vec<LimitStatus> = plan
            .limits
            .iter()
            .zip(&outcome.limits)
            .map(|(p, o)| LimitStatus {
                name: p.name.to_string(),
                algorithm: p.applied.spec.algorithm().name().to_owned(),
                descriptor: p.descriptor,
                limit: o.quota.limit,
                remaining: o.quota.remaining,
                reset_after_ms: duration_ms_ceil(o.quota.reset_after),
                retry_after_ms: if o.admits {
                    0
                } else {
                    duration_ms_ceil(o.retry_after)
                },
                window_ms: duration_ms_ceil(p.applied.spec.window()),
                refused: cost > 0 && !o.admits,
                shadow: p.applied.shadow,
            })
            .collect();
        let enforced = || {
            plan.limits
                .iter()
                .zip(&outcome.limits)
                .filter(|(p, _)| !p.applied.shadow)
        };
        let deciding = if outcome.allowed {
            enforced().min_by_key(|(_, o)| (o.quota.remaining, o.quota.limit))
        } else {
            enforced()
                .filter(|(_, o)| !o.admits)
                .max_by_key(|(_, o)| o.retry_after)
        };
        let (decision, window) = match deciding {
            Some((p, o)) if outcome.allowed => {
                (Decision::Allowed(o.quota), p.applied.spec.window())
            }
            Some((p, o)) => (
                Decision::Limited {
                    quota: o.quota,
                    retry_after: o.retry_after,
                },
                p.applied.spec.window(),
            ),
            // No enforced limit applied: allowed, with nothing to count down.
            None => (
                Decision::Allowed(Quota {
                    limit: 0,
                    remaining: 0,
                    reset_after: std::time::Duration::ZERO,
                }),
                std::time::Duration::ZERO,
            ),
        };
        Self {
            decision,
            degraded,
            shadow_refused: cost > 0 && limits.iter().any(|l| l.shadow && l.refused),
            limits,
            window,
        }
    }
}

/// What each limit made of a request, for the per-rule analytics; nothing for the
/// built-in rule alone (its counts are the global ones, and the default path stays lean).
fn rule_hits(request: &CheckRequest, plan: &Plan, checked: &Checked) -> Vec<RuleHit> {
    let builtin_only = request.domain == DEFAULT_DOMAIN
        && matches!(plan.limits.as_slice(), [only] if &*only.name == DEFAULT_LIMIT_NAME);
    if builtin_only {
        return Vec::new();
    }
    let allowed = checked.decision.is_allowed();
    checked
        .limits
        .iter()
        .filter_map(|l| {
            let outcome = match (l.shadow, l.refused, allowed) {
                (true, true, _) => RuleOutcome::ShadowBlocked,
                (_, false, true) => RuleOutcome::Allowed,
                (false, true, _) => RuleOutcome::Blocked,
                (_, false, false) => return None,
            };
            // `domain:name`, built in place (once per limit of every decision).
            let mut rule = String::with_capacity(request.domain.len() + l.name.len() + 1);
            rule.push_str(&request.domain);
            rule.push(':');
            rule.push_str(&l.name);
            Some(RuleHit { rule, outcome })
        })
        .collect()
}

/// One limit of a planned request: its name, its descriptor and its numbers.
#[derive(Debug, Clone)]
struct PlannedLimit {
    name: Arc<str>,
    descriptor: usize,
    applied: Applied,
}

/// A request resolved against the rules: what the store decides, and what it means.
#[derive(Debug, Clone)]
struct Plan {
    take: RequestTake,
    limits: Vec<PlannedLimit>,
}

/// A new process's incarnation (see [`Limiter::incarnation`]).
fn new_incarnation() -> u64 {
    use std::hash::BuildHasher;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // A per-process random key (std's hasher seeds): two limiters started in the same
    // millisecond still differ.
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    (ms << 16) | (random & 0xffff)
}

/// Whole milliseconds, rounded up (a retry after the rounded time is still on time).
pub fn duration_ms_ceil(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

impl LimiterError {
    /// What a client is told about a cost above the capacity.
    pub fn cost_field_error(capacity: u64) -> ratelimit_domain::api::FieldError {
        ratelimit_domain::api::FieldError::new(
            "cost",
            format!("must be at most the bucket capacity {capacity}"),
        )
    }
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimiterError {
    #[error("cost {cost} exceeds the bucket capacity {capacity}")]
    CostAboveCapacity { cost: u64, capacity: u64 },
    /// The shared store is unreachable and the fail mode is `closed`.
    #[error("the rate-limit store is unavailable")]
    StoreUnavailable,
}

/// Describes the limiter's metrics (help text and unit), once per process, after installing
/// the recorder; [`Limiter::new`] calls it.
pub fn describe_metrics() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        service_kit::metrics::handle();
        metrics::describe_counter!(
            "ratelimit_decisions_total",
            Unit::Count,
            "Rate-limit decisions made, by outcome (allowed or limited)"
        );
        metrics::describe_counter!(
            "ratelimit_degraded_decisions_total",
            Unit::Count,
            "Decisions made by the local fail-open fallback bucket while the shared store was unreachable"
        );
        metrics::describe_counter!(
            "ratelimit_refusal_cache_hits_total",
            Unit::Count,
            "Refusals answered from the limiter's exact refusal cache, without a store call"
        );
        metrics::describe_counter!(
            "ratelimit_gateway_refusals_total",
            Unit::Count,
            "Refusals a gateway answered from its refusal cache and sent here to be counted"
        );
        metrics::describe_counter!(
            "ratelimit_refused_total",
            Unit::Count,
            "Requests refused (fail-closed) because the shared store was unavailable"
        );
        metrics::describe_counter!(
            "ratelimit_shadow_refusals_total",
            Unit::Count,
            "Requests a shadow-mode limit would have refused (admitted all the same)"
        );
        metrics::describe_histogram!(
            "ratelimit_decision_duration_seconds",
            Unit::Seconds,
            "Time to decide a check, in seconds, the store call included"
        );
        metrics::describe_counter!(
            "ratelimit_store_errors_total",
            Unit::Count,
            "Bucket-store calls that failed or timed out"
        );
        metrics::describe_gauge!(
            "ratelimit_breaker_state",
            "State of the circuit breaker in front of the bucket store: 0 closed, 1 half-open, 2 open"
        );
        metrics::describe_counter!(
            "ratelimit_events_published_total",
            Unit::Count,
            "Decision events accepted for delivery to the analytics stream"
        );
        metrics::describe_counter!(
            "ratelimit_events_dropped_total",
            Unit::Count,
            "Decision events dropped because the publisher's buffer was full (or the stream closed)"
        );
        metrics::describe_gauge!(
            "ratelimit_events_buffered",
            Unit::Count,
            "Decision events accepted but not yet delivered to the analytics stream"
        );
    });
}

/// Decisions made since start, by outcome and by how they were made.
#[derive(Debug, Default)]
pub struct LimiterStats {
    pub allowed: AtomicU64,
    pub limited: AtomicU64,
    /// Decisions (allowed or limited) made by the fallback bucket.
    pub degraded: AtomicU64,
    /// Bucket-store calls that failed or timed out.
    pub store_errors: AtomicU64,
    /// Requests refused (fail-closed) because the store was unavailable.
    pub refused: AtomicU64,
    /// Requests a shadow limit would have refused (admitted all the same).
    pub shadow_refused: AtomicU64,
    /// Refusals a gateway answered from its own refusal cache, counted here.
    pub gateway_refused: AtomicU64,
}

pub struct Limiter {
    stats: LimiterStats,
    latency: metrics::Histogram,
    store: Arc<dyn BucketStore>,
    /// The per-instance bucket used in fail-open mode while the store is unreachable.
    fallback: Arc<MemoryStore>,
    breaker: Arc<Breaker>,
    /// The way to the store: the fallback around the breaker around the store
    /// ([`crate::resilience`]).
    store_calls: BoxCloneSyncService<StoreCall, StoreReply, Infallible>,
    publisher: Arc<dyn EventPublisher>,
    clock: Arc<dyn Clock>,
    instance_id: String,
    rules: Arc<Rules>,
    overrides: Arc<Overrides>,
    /// Refusals of the shared store answered again locally while they hold; none in front
    /// of the embedded memory store, whose own decision costs as much as a lookup.
    refusals: Option<Refusals>,
    /// Bumped by every reset and refund made here (see [`Limiter::generation`]).
    room_given: AtomicU64,
    /// This process's life (see [`Limiter::incarnation`]).
    incarnation: u64,
}

impl Limiter {
    pub fn new(
        store: Arc<dyn BucketStore>,
        fallback: Arc<MemoryStore>,
        fail_mode: FailMode,
        breaker: Breaker,
        publisher: Arc<dyn EventPublisher>,
        clock: Arc<dyn Clock>,
        instance_id: String,
    ) -> Self {
        describe_metrics();
        // Fail-open in front of a store that can fail: the fallback learns from the store's
        // answers (not for the embedded memory store, whose fallback is never asked).
        let seeds_fallback = fail_mode == FailMode::Open && store.is_remote();
        let rules = Arc::new(Rules::builtin(*store.policy()));
        let breaker = Arc::new(breaker);
        let store_calls = BoxCloneSyncService::new(
            tower::ServiceBuilder::new()
                .layer(FallbackLayer::new(
                    fallback.clone(),
                    fail_mode,
                    seeds_fallback,
                ))
                .layer(BreakerLayer::new(breaker.clone()))
                .service(StoreService::new(store.clone())),
        );
        Self {
            rules,
            overrides: Arc::new(Overrides::in_memory()),
            stats: LimiterStats::default(),
            latency: metrics::histogram!("ratelimit_decision_duration_seconds"),
            store,
            fallback,
            breaker,
            store_calls,
            publisher,
            clock,
            instance_id,
            refusals: None,
            room_given: AtomicU64::new(0),
            incarnation: new_incarnation(),
        }
    }

    /// Which life of this limiter is answering: its start time in milliseconds since the
    /// Unix epoch in the high bits, random low bits. With [`Limiter::generation`] it names
    /// the state a refusal was made under, unique per process: a restarted limiter at the
    /// same address never answers with the generation of its previous life.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Answers refusals of the store again locally while they hold, keeping at most
    /// `capacity` of them (0: no cache). See [`crate::refusals`].
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
        let local = self.room_given.load(Ordering::Acquire);
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
    async fn room_given(&self, keys: &[String]) {
        self.room_given.fetch_add(1, Ordering::AcqRel);
        // Told even by a limiter without a cache: the others may have one.
        if let Err(err) = self.overrides.give_room(keys).await {
            tracing::warn!(error = %err, "cannot tell the other limiters of a reset or refund; their cached refusals hold until they expire");
        }
    }

    pub fn publisher(&self) -> &Arc<dyn EventPublisher> {
        &self.publisher
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub fn stats(&self) -> &LimiterStats {
        &self.stats
    }

    /// This instance's numbers, for the deployment-wide `/status` of a standalone gateway.
    pub fn report(&self) -> service_kit::report::Report {
        let s = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let p = self.publisher.stats();
        service_kit::report::Report {
            allowed: load(&s.allowed),
            limited: load(&s.limited),
            degraded: load(&s.degraded),
            store_errors: load(&s.store_errors),
            breaker_closed: self.breaker.state() == BreakerState::Closed,
            published: p.published,
            dropped: p.dropped,
            buffered: p.buffered,
            ..Default::default()
        }
    }

    /// Copies the limiter's counters into the metrics registry (called before a scrape).
    pub fn export_metrics(&self) {
        let s = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let degraded = load(&s.degraded);
        metrics::counter!("ratelimit_decisions_total", "outcome" => "allowed")
            .absolute(load(&s.allowed));
        metrics::counter!("ratelimit_decisions_total", "outcome" => "limited")
            .absolute(load(&s.limited));
        metrics::counter!("ratelimit_degraded_decisions_total").absolute(degraded);
        metrics::counter!("ratelimit_store_errors_total").absolute(load(&s.store_errors));
        metrics::counter!("ratelimit_refused_total").absolute(load(&s.refused));
        metrics::counter!("ratelimit_shadow_refusals_total").absolute(load(&s.shadow_refused));
        metrics::counter!("ratelimit_refusal_cache_hits_total").absolute(self.refusal_cache_hits());
        metrics::counter!("ratelimit_gateway_refusals_total").absolute(load(&s.gateway_refused));
        let breaker = match self.breaker.state() {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!("ratelimit_breaker_state").set(breaker);
        let p = self.publisher.stats();
        metrics::counter!("ratelimit_events_published_total").absolute(p.published);
        metrics::counter!("ratelimit_events_dropped_total").absolute(p.dropped);
        metrics::gauge!("ratelimit_events_buffered").set(p.buffered as f64);
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
    pub async fn peek(&self, request: &CheckRequest) -> Result<Checked, LimiterError> {
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
    pub async fn reset(&self, request: &CheckRequest) -> Result<usize, LimiterError> {
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
        self.room_given(&keys).await;
        reset.map_err(|err| {
            tracing::warn!(error = %err, "reset failed");
            LimiterError::StoreUnavailable
        })?;
        Ok(keys.len())
    }

    /// The built-in policy.
    pub fn policy(&self) -> &Policy {
        self.store.policy()
    }

    /// Decides `request` and answers in the wire format.
    pub async fn check_response(
        &self,
        request: &CheckRequest,
    ) -> Result<CheckResponse, LimiterError> {
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
    pub async fn check(&self, request: &CheckRequest) -> Result<Checked, LimiterError> {
        self.check_many(std::slice::from_ref(request))
            .await
            .pop()
            .expect("one result per request")
    }

    /// Resolves `request` against the rules in force: every limit that applies, keyed; an
    /// error when its cost is above what some enforced limit can ever admit.
    fn plan(&self, request: &CheckRequest) -> Result<Plan, LimiterError> {
        let plan = self.resolve(request);
        if request.cost > 0 {
            let cost = request.cost as u64;
            if let Some(p) = plan
                .limits
                .iter()
                .filter(|p| !p.applied.shadow && cost > p.applied.spec.limit())
                .min_by_key(|p| p.applied.spec.limit())
            {
                return Err(LimiterError::CostAboveCapacity {
                    cost,
                    capacity: p.applied.spec.limit(),
                });
            }
        }
        Ok(plan)
    }

    /// Refuses `request` without asking the store, because its cost is one the service
    /// will not honour: above what some enforced limit (rules and overrides alike) can
    /// ever admit, or above [`ratelimit_domain::api::MAX_COST`] (`never` is then true). Counted and published as
    /// any refusal; every limit whose capacity is below the cost is refused, with a wait of
    /// its window; the others are reported as spent, with nothing taken. Callers that must
    /// not let an error through (Envoy's default `failure_mode_deny: false`) answer this
    /// refusal instead of an error.
    pub fn refuse_unhonoured(&self, request: &CheckRequest, never: bool) -> Checked {
        let plan = self.resolve(request);
        let cost = request.cost.unsigned_abs();
        let limits: Vec<LimitOutcome> = plan
            .limits
            .iter()
            .map(|p| {
                let limit = p.applied.spec.limit();
                let window = p.applied.spec.window();
                let refuses = !p.applied.shadow && (never || cost > limit);
                LimitOutcome {
                    admits: !refuses,
                    quota: Quota {
                        limit,
                        remaining: 0,
                        reset_after: window,
                    },
                    retry_after: if refuses { window } else { Duration::ZERO },
                }
            })
            .collect();
        let outcome = Outcome {
            allowed: false,
            limits,
        };
        let mut checked = Checked::new(&plan, &outcome, false, request.cost);
        if checked.decision.is_allowed() {
            // No enforced limit applies, yet the cost is one the service does not honour.
            checked.decision = Decision::Limited {
                quota: Quota {
                    limit: 0,
                    remaining: 0,
                    reset_after: Duration::ZERO,
                },
                retry_after: Duration::ZERO,
            };
        }
        self.count(request, &plan, &checked, Instant::now());
        checked
    }

    /// Every limit that applies to `request` under the rules and overrides in force, keyed.
    fn resolve(&self, request: &CheckRequest) -> Plan {
        let rules = self.rules.current();
        let mut matched = rules.resolve(&request.domain, &request.descriptors);
        if self.overrides.any() {
            let overrides = self.overrides.current();
            for (descriptor, rule) in request.descriptors.iter().zip(matched.iter_mut()) {
                if let Some(custom) = overrides.get(&request.domain, descriptor) {
                    *rule = Some(custom.clone());
                }
            }
        }
        let prefix = self.store.key_prefix();
        let mut plan = Plan {
            take: RequestTake {
                limits: Vec::new(),
                cost: request.cost,
            },
            limits: Vec::new(),
        };
        for (i, (descriptor, rule)) in request.descriptors.iter().zip(matched).enumerate() {
            let Some(rule) = rule else { continue };
            for limit in &rule.limits {
                let applied = Applied {
                    spec: limit.spec,
                    shadow: rule.shadow,
                };
                plan.take.limits.push(LimitTake {
                    key: limit_key(
                        prefix,
                        &request.domain,
                        descriptor,
                        &limit.name,
                        applied.spec.algorithm(),
                    ),
                    applied,
                });
                plan.limits.push(PlannedLimit {
                    name: Arc::from(limit.name.as_str()),
                    descriptor: i,
                    applied,
                });
            }
        }
        plan
    }

    /// Decides `requests` in order, as [`Limiter::check`] would one after the other, in one
    /// call to the store, and publishes each decision.
    pub async fn check_many(
        &self,
        requests: &[CheckRequest],
    ) -> Vec<Result<Checked, LimiterError>> {
        let started = Instant::now();
        let mut plans: Vec<Result<Plan, LimiterError>> =
            requests.iter().map(|r| self.plan(r)).collect();
        // Requests that some limit applies to go to the store; the others are allowed.
        let asked: Vec<usize> = plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_ok_and(|p| !p.limits.is_empty()))
            .map(|(i, _)| i)
            .collect();
        let mut verdicts: Vec<Option<Verdict>> = vec![None; requests.len()];
        // Refusals that still hold are answered here; the rest go to the store.
        let sent_us = self.clock.now_us();
        let generation = self.cache_generation();
        let room = self.overrides.room();
        let asked: Vec<usize> = match &self.refusals {
            Some(refusals) => asked
                .into_iter()
                .filter(|&i| {
                    let take = &plans[i].as_ref().expect("planned").take;
                    match refusals.lookup(take, sent_us, generation, room) {
                        Some(outcome) => {
                            verdicts[i] = Some(Verdict::Stored(outcome));
                            false
                        }
                        None => true,
                    }
                })
                .collect(),
            None => asked,
        };
        // Moved out for the store call, and back after: no copy of the keys.
        let takes: Vec<RequestTake> = asked
            .iter()
            .map(|&i| std::mem::take(&mut plans[i].as_mut().expect("planned").take))
            .collect();
        let reply = self.call_store(takes).await;
        let mut refunded: Vec<String> = Vec::new();
        for ((&i, take), verdict) in asked.iter().zip(reply.takes).zip(reply.verdicts) {
            if let (Some(refusals), Verdict::Stored(outcome)) = (&self.refusals, &verdict) {
                refusals.record(&take, outcome, sent_us, generation, room);
            }
            if take.cost < 0 {
                refunded.extend(take.limits.iter().map(|l| l.key.clone()));
            }
            plans[i].as_mut().expect("planned").take = take;
            verdicts[i] = Some(verdict);
        }
        if !refunded.is_empty() {
            // Asked of the store even when it failed: the refund may have landed.
            self.room_given(&refunded).await;
        }
        requests
            .iter()
            .zip(plans)
            .zip(verdicts)
            .map(|((request, plan), verdict)| {
                let plan = plan?;
                let verdict = match verdict {
                    Some(verdict) => verdict,
                    // No limit applies: allowed, with nothing to count down.
                    None => Verdict::Stored(Outcome {
                        allowed: true,
                        limits: Vec::new(),
                    }),
                };
                self.settle(request, &plan, verdict, started)
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
            let _ = self.settle(request, &plan, Verdict::Stored(outcome), Instant::now());
        }
    }

    /// One call down the store stack (fallback, breaker, store) for `takes`, which come
    /// back with the reply.
    async fn call_store(&self, takes: Vec<RequestTake>) -> StoreReply {
        if takes.is_empty() {
            // All answered already (no limit applied, or refusals that still hold).
            return StoreReply {
                takes,
                verdicts: Vec::new(),
                errors: 0,
            };
        }
        let reply = match self.store_calls.clone().oneshot(StoreCall { takes }).await {
            Ok(reply) => reply,
            Err(never) => match never {},
        };
        if reply.errors > 0 {
            self.stats
                .store_errors
                .fetch_add(reply.errors, Ordering::Relaxed);
        }
        reply
    }

    /// The decision of `plan` from its verdict: the store's, the fail-open fallback's
    /// (degraded), or none (fail-closed).
    fn decided(&self, plan: &Plan, verdict: Verdict, cost: i64) -> Result<Checked, LimiterError> {
        match verdict {
            Verdict::Stored(outcome) => Ok(Checked::new(plan, &outcome, false, cost)),
            Verdict::Fallback(outcome) => Ok(Checked::new(plan, &outcome, true, cost)),
            Verdict::Unavailable => Err(LimiterError::StoreUnavailable),
        }
    }

    /// Gives the fail-open fallback `1 / parts` of the policy: one share per live limiter.
    pub fn set_fallback_parts(&self, parts: u64) {
        self.fallback.set_parts(parts);
    }

    /// Completes a decision from its verdict (an error when nobody decided: fail-closed with
    /// the store away), counts it and publishes it.
    fn settle(
        &self,
        request: &CheckRequest,
        plan: &Plan,
        verdict: Verdict,
        started: Instant,
    ) -> Result<Checked, LimiterError> {
        let checked = self.decided(plan, verdict, request.cost).inspect_err(|_| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        })?;
        self.count(request, plan, &checked, started);
        Ok(checked)
    }

    /// Counts a decision and publishes its event (nothing for a refund, which is not a
    /// decision).
    fn count(&self, request: &CheckRequest, plan: &Plan, checked: &Checked, started: Instant) {
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
        self.publisher.publish(RateLimitEvent {
            schema_version: SCHEMA_VERSION,
            user_id: request.user_id.clone(),
            allowed: checked.decision.is_allowed(),
            cost: request.cost.unsigned_abs(),
            ts_ms: self.clock.now_ms(),
            limiter_id: self.instance_id.clone(),
            degraded: checked.degraded,
            domain: (request.domain != DEFAULT_DOMAIN).then(|| request.domain.clone()),
            rules: rule_hits(request, plan, checked),
            stamp: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use async_trait::async_trait;
    use ratelimit_domain::ManualClock;
    use service_kit::stream::{NullPublisher, channel};
    use std::time::Duration;

    /// A store that is down, to exercise the fail modes without a network.
    struct DownStore(Policy);

    #[async_trait]
    impl BucketStore for DownStore {
        fn policy(&self) -> &Policy {
            &self.0
        }
        fn key_prefix(&self) -> &str {
            ""
        }
        async fn decide_many(
            &self,
            requests: &[RequestTake],
        ) -> Result<Vec<ratelimit_domain::store::Decided>, StoreError> {
            Ok(requests
                .iter()
                .map(|_| Err(StoreError::Unavailable("down".into())))
                .collect())
        }
        async fn reset(&self, _: &[String]) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
    }

    fn limiter(
        store: Arc<dyn BucketStore>,
        mode: FailMode,
        publisher: Arc<dyn EventPublisher>,
    ) -> Limiter {
        let clock = Arc::new(ManualClock::new(5_000_000));
        let policy = *store.policy();
        let fallback = Arc::new(MemoryStore::new(policy, clock.clone()));
        fallback.set_parts(2);
        Limiter::new(
            store,
            fallback,
            mode,
            Breaker::new(3, Duration::from_secs(60), clock.clone()),
            publisher,
            clock,
            "test".into(),
        )
    }

    fn req(user: &str, cost: u64) -> CheckRequest {
        CheckRequest::user(user, cost)
    }

    #[tokio::test]
    async fn every_decision_is_published() {
        let clock = Arc::new(ManualClock::new(5_000_000));
        let policy = Policy::new(2, 1.0).unwrap();
        let (tx, mut rx) = channel(16);
        let l = limiter(
            Arc::new(MemoryStore::new(policy, clock)),
            FailMode::Closed,
            Arc::new(tx),
        );
        for _ in 0..3 {
            l.check(&req("u", 1)).await.unwrap();
        }
        let allowed: Vec<bool> = (0..3).map(|_| rx.try_recv().unwrap().allowed).collect();
        assert_eq!(allowed, [true, true, false]);
        assert!(rx.try_recv().is_err());
    }

    /// Two lives of a limiter never share a generation: each process has its own
    /// incarnation, and a later start is a greater one.
    #[test]
    fn every_life_has_its_own_incarnation() {
        let first = new_incarnation();
        std::thread::sleep(Duration::from_millis(2));
        let (second, third) = (new_incarnation(), new_incarnation());
        assert!(second > first && third > first);
        let store = || Arc::new(DownStore(Policy::new(3, 1.0).unwrap()));
        let a = limiter(store(), FailMode::Closed, Arc::new(NullPublisher));
        std::thread::sleep(Duration::from_millis(2));
        let b = limiter(store(), FailMode::Closed, Arc::new(NullPublisher));
        assert!(b.incarnation() > a.incarnation());
    }

    #[tokio::test]
    async fn cost_above_capacity_is_refused_before_the_store() {
        let l = limiter(
            Arc::new(DownStore(Policy::new(3, 1.0).unwrap())),
            FailMode::Closed,
            Arc::new(NullPublisher),
        );
        assert_eq!(
            l.check(&req("u", 4)).await,
            Err(LimiterError::CostAboveCapacity {
                cost: 4,
                capacity: 3
            })
        );
    }

    #[tokio::test]
    async fn fail_closed_refuses() {
        let l = limiter(
            Arc::new(DownStore(Policy::new(3, 1.0).unwrap())),
            FailMode::Closed,
            Arc::new(NullPublisher),
        );
        assert_eq!(
            l.check(&req("u", 1)).await,
            Err(LimiterError::StoreUnavailable)
        );
        assert!(!l.ready().await);
    }

    #[tokio::test]
    async fn fail_open_uses_a_divided_local_bucket_and_says_so() {
        let (tx, mut rx) = channel(16);
        let l = limiter(
            Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
            FailMode::Open,
            Arc::new(tx),
        );
        let mut results = Vec::new();
        for _ in 0..3 {
            results.push(l.check(&req("u", 1)).await.unwrap());
        }
        assert!(results.iter().all(|c| c.degraded));
        assert_eq!(
            results.iter().filter(|c| c.decision.is_allowed()).count(),
            2,
            "capacity 4 split over 2 instances"
        );
        assert!(rx.try_recv().unwrap().degraded);
        // The breaker opened after 3 failures: the store is no longer asked.
        assert_eq!(l.breaker_state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn a_batch_is_decided_in_order_refuses_only_the_bad_check_and_publishes_each() {
        let clock = Arc::new(ManualClock::new(5_000_000));
        let (tx, mut rx) = channel(16);
        let l = limiter(
            Arc::new(MemoryStore::new(Policy::new(2, 1.0).unwrap(), clock)),
            FailMode::Closed,
            Arc::new(tx),
        );
        let results = l
            .check_many(&[
                req("u", 1),
                req("u", 3),
                req("v", 2),
                req("u", 1),
                req("u", 1),
            ])
            .await;
        let got: Vec<Result<bool, LimiterError>> = results
            .into_iter()
            .map(|r| r.map(|c| c.decision.is_allowed()))
            .collect();
        assert_eq!(
            got,
            [
                Ok(true),
                Err(LimiterError::CostAboveCapacity {
                    cost: 3,
                    capacity: 2
                }),
                Ok(true),
                Ok(true),
                Ok(false)
            ]
        );
        let events: Vec<(String, bool)> = (0..4)
            .map(|_| rx.try_recv().unwrap())
            .map(|e| (e.user_id, e.allowed))
            .collect();
        assert_eq!(
            events,
            [
                ("u".into(), true),
                ("v".into(), true),
                ("u".into(), true),
                ("u".into(), false)
            ]
        );
        assert!(rx.try_recv().is_err(), "no event for the refused check");
    }

    #[tokio::test]
    async fn a_batch_follows_the_fail_mode_when_the_store_is_down() {
        let closed = limiter(
            Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
            FailMode::Closed,
            Arc::new(NullPublisher),
        );
        let results = closed.check_many(&[req("u", 1), req("w", 1)]).await;
        assert!(
            results
                .iter()
                .all(|r| r == &Err(LimiterError::StoreUnavailable))
        );
        let open = limiter(
            Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
            FailMode::Open,
            Arc::new(NullPublisher),
        );
        let results = open
            .check_many(&[req("u", 1), req("u", 1), req("u", 1)])
            .await;
        let allowed: Vec<bool> = results
            .into_iter()
            .map(|r| r.unwrap())
            .inspect(|c| assert!(c.degraded))
            .map(|c| c.decision.is_allowed())
            .collect();
        assert_eq!(allowed, [true, true, false], "capacity 4 split over 2");
    }

    /// One store call is one verdict for the breaker: a batch whose checks all failed in
    /// one call must not count as many failures as it carried checks.
    #[tokio::test]
    async fn a_failed_batch_counts_one_breaker_failure() {
        let l = limiter(
            Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
            FailMode::Open,
            Arc::new(NullPublisher),
        );
        let batch: Vec<CheckRequest> = (0..10).map(|i| req(&format!("u{i}"), 1)).collect();
        l.check_many(&batch).await;
        assert_eq!(
            l.breaker_state(),
            BreakerState::Closed,
            "one failure of three"
        );
        l.check_many(&batch).await;
        l.check_many(&batch).await;
        assert_eq!(l.breaker_state(), BreakerState::Open, "three failed calls");
    }
}
