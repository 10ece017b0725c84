//! The limiter: one decision per request, from the shared store or (fail-open) a local
//! fallback bucket, and one event per decision to the analytics stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Instant;

use metrics::Unit;
use ratelimit_domain::api::{CheckRequest, CheckResponse};
use ratelimit_domain::event::SCHEMA_VERSION;
use ratelimit_domain::{Clock, Decision, Policy, RateLimitEvent};
use service_kit::config::FailMode;
use service_kit::stream::EventPublisher;

use crate::breaker::{Breaker, BreakerState, Permit};
use crate::store::{BucketStore, MemoryStore, Taken};

/// A decision and how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    /// Made by the local fallback bucket because the shared store was unreachable.
    pub degraded: bool,
}

impl Checked {
    pub fn to_response(&self, policy: &Policy) -> CheckResponse {
        let quota = self.decision.quota();
        let window_secs = policy.capacity() as f64 / policy.refill_per_sec();
        CheckResponse {
            allowed: self.decision.is_allowed(),
            limit: quota.limit,
            remaining: quota.remaining,
            retry_after_ms: duration_ms_ceil(self.decision.retry_after()),
            reset_after_ms: duration_ms_ceil(quota.reset_after),
            window_ms: (window_secs * 1000.0).ceil().min(u64::MAX as f64) as u64,
            degraded: self.degraded,
        }
    }
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
            "ratelimit_refused_total",
            Unit::Count,
            "Requests refused (fail-closed) because the shared store was unavailable"
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
}

pub struct Limiter {
    stats: LimiterStats,
    latency: metrics::Histogram,
    store: Arc<dyn BucketStore>,
    /// The per-instance bucket used in fail-open mode while the store is unreachable.
    fallback: Arc<MemoryStore>,
    fail_mode: FailMode,
    breaker: Breaker,
    publisher: Arc<dyn EventPublisher>,
    clock: Arc<dyn Clock>,
    instance_id: String,
    /// Fail-open in front of a store that can fail: the fallback is seeded from the
    /// store's answers. Derived once, off the hot path; false for the embedded memory
    /// store, whose fallback is never asked.
    seeds_fallback: bool,
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
        let seeds_fallback = fail_mode == FailMode::Open && store.is_remote();
        Self {
            seeds_fallback,
            stats: LimiterStats::default(),
            latency: metrics::histogram!("ratelimit_decision_duration_seconds"),
            store,
            fallback,
            fail_mode,
            breaker,
            publisher,
            clock,
            instance_id,
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

    pub fn capacity(&self) -> u64 {
        self.store.policy().capacity()
    }

    pub fn policy(&self) -> &Policy {
        self.store.policy()
    }

    /// Decides `request` and answers in the wire format.
    pub async fn check_response(
        &self,
        request: &CheckRequest,
    ) -> Result<CheckResponse, LimiterError> {
        Ok(self.check(request).await?.to_response(self.policy()))
    }

    /// Whether the shared store answers and the breaker is closed.
    pub async fn ready(&self) -> bool {
        self.breaker.state() == BreakerState::Closed && self.store.ping().await.is_ok()
    }

    /// Decides `request` and publishes the decision.
    pub async fn check(&self, request: &CheckRequest) -> Result<Checked, LimiterError> {
        self.admissible(request)?;
        let started = Instant::now();
        let stored = match self.breaker.permit() {
            Some(permit) => {
                let taken = self.store.take(&request.user_id, request.cost).await;
                self.stored(permit, taken)
            }
            None => None,
        };
        if let Some(decision) = &stored {
            self.remember(&request.user_id, decision);
        }
        self.settle(request, stored, started)
    }

    /// Decides `requests` in order, as [`Limiter::check`] would one after the other, in one
    /// call to the store, and publishes each decision.
    pub async fn check_many(
        &self,
        requests: &[CheckRequest],
    ) -> Vec<Result<Checked, LimiterError>> {
        let started = Instant::now();
        let admissible: Vec<Result<(), LimiterError>> =
            requests.iter().map(|r| self.admissible(r)).collect();
        let takes: Vec<(&str, u64)> = requests
            .iter()
            .zip(&admissible)
            .filter(|(_, ok)| ok.is_ok())
            .map(|(r, _)| (r.user_id.as_str(), r.cost))
            .collect();
        let permit = if takes.is_empty() {
            None
        } else {
            self.breaker.permit()
        };
        // One store call, one verdict for the breaker, however many checks it carried.
        let stored: Vec<Option<Decision>> = match permit {
            Some(permit) => match self.store.take_many(&takes).await {
                Ok(taken) => {
                    let failed = taken.iter().filter(|t| t.is_err()).count();
                    if failed == 0 {
                        permit.success();
                    } else {
                        permit.failure();
                        self.stats
                            .store_errors
                            .fetch_add(failed as u64, Ordering::Relaxed);
                    }
                    taken.into_iter().map(Result::ok).collect()
                }
                Err(err) => {
                    self.stored(permit, Err(err));
                    vec![None; takes.len()]
                }
            },
            None => vec![None; takes.len()],
        };
        for (&(user_id, _), decision) in takes.iter().zip(&stored) {
            if let Some(decision) = decision {
                self.remember(user_id, decision);
            }
        }
        let mut stored = stored.into_iter();
        requests
            .iter()
            .zip(admissible)
            .map(|(request, admissible)| {
                admissible?;
                self.settle(request, stored.next().flatten(), started)
            })
            .collect()
    }

    /// Gives the fallback bucket a share of how many tokens the shared store left the
    /// user, so that an outage starts them from there, not from a full bucket. Only for
    /// users the store left at half or less (the others lose at most half a bucket to an
    /// outage): a write per decision is for the users who are spending fast.
    fn remember(&self, user_id: &str, decision: &Decision) {
        if self.seeds_fallback {
            let quota = decision.quota();
            if quota.remaining * 2 <= quota.limit {
                self.fallback.seed(user_id, quota.remaining);
            }
        }
    }

    /// Gives the fail-open fallback `1 / parts` of the policy: one share per live limiter.
    pub fn set_fallback_parts(&self, parts: u64) {
        self.fallback.set_parts(parts);
    }

    /// Refuses a request no bucket can ever admit.
    fn admissible(&self, request: &CheckRequest) -> Result<(), LimiterError> {
        let capacity = self.capacity();
        if request.cost > capacity {
            return Err(LimiterError::CostAboveCapacity {
                cost: request.cost,
                capacity,
            });
        }
        Ok(())
    }

    /// The store's decision, or `None` (noted by the breaker) when it could not decide.
    fn stored(&self, permit: Permit<'_>, taken: Taken) -> Option<Decision> {
        match taken {
            Ok(decision) => {
                permit.success();
                Some(decision)
            }
            Err(err) => {
                permit.failure();
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %err, "bucket store call failed");
                None
            }
        }
    }

    /// Completes a decision: falls back (fail-open) or refuses (fail-closed) when the store
    /// gave none, counts it and publishes it.
    fn settle(
        &self,
        request: &CheckRequest,
        stored: Option<Decision>,
        started: Instant,
    ) -> Result<Checked, LimiterError> {
        let checked = match (stored, self.fail_mode) {
            (Some(decision), _) => Checked {
                decision,
                degraded: false,
            },
            (None, FailMode::Open) => Checked {
                decision: self.fallback.take_now(&request.user_id, request.cost),
                degraded: true,
            },
            (None, FailMode::Closed) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(LimiterError::StoreUnavailable);
            }
        };
        self.latency.record(started.elapsed().as_secs_f64());
        let outcome = if checked.decision.is_allowed() {
            &self.stats.allowed
        } else {
            &self.stats.limited
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        if checked.degraded {
            self.stats.degraded.fetch_add(1, Ordering::Relaxed);
        }
        self.publisher.publish(RateLimitEvent {
            schema_version: SCHEMA_VERSION,
            user_id: request.user_id.clone(),
            allowed: checked.decision.is_allowed(),
            cost: request.cost,
            ts_ms: self.clock.now_ms(),
            limiter_id: self.instance_id.clone(),
            degraded: checked.degraded,
        });
        Ok(checked)
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
        async fn take(&self, _: &str, _: u64) -> Result<Decision, StoreError> {
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
        Limiter::new(
            store,
            Arc::new(MemoryStore::new(policy.divided(2), clock.clone())),
            mode,
            Breaker::new(3, Duration::from_secs(60), clock.clone()),
            publisher,
            clock,
            "test".into(),
        )
    }

    fn req(user: &str, cost: u64) -> CheckRequest {
        CheckRequest {
            user_id: user.into(),
            cost,
        }
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
