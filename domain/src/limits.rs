//! Limits of every algorithm, and the all-or-nothing decision over several of them.
//!
//! A [`LimitSpec`] is one limit's numbers and algorithm. The limits that apply to one
//! request are decided together by [`decide_all`]: when any enforced limit refuses, none is
//! spent. Stores load and save each limit's [`LimitState`] atomically; they never decide
//! anything themselves (the Redis store runs the same arithmetic in Lua, and the contract
//! suite checks that both agree).

use std::time::Duration;

use crate::bucket::{BucketState, Policy};

/// The shortest window a fixed or sliding window may have: one millisecond.
pub const MIN_WINDOW_US: u64 = 1_000;
/// The longest window: 366 days.
pub const MAX_WINDOW_US: u64 = 366 * 86_400 * 1_000_000;
/// The most requests one window may admit.
pub const MAX_REQUESTS: u64 = crate::bucket::MAX_CAPACITY;

/// How a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// A bucket of `burst` tokens refilled continuously (the default).
    TokenBucket,
    /// Counts per window aligned to the epoch, as envoyproxy/ratelimit does: up to twice
    /// the limit can pass around a window's edge.
    FixedWindow,
    /// Cloudflare's sliding window: the previous window's count, weighted by how much of it
    /// still overlaps the last `window`, plus the current window's count.
    SlidingWindow,
}

impl Algorithm {
    /// The name used in rules files and answers.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
        }
    }

    /// A short tag that goes into a limit's key: a limit whose algorithm changes starts
    /// a new counter (the stored state of one algorithm means nothing to another).
    pub fn key_tag(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "tb",
            Algorithm::FixedWindow => "fw",
            Algorithm::SlidingWindow => "sw",
        }
    }
}

/// Why a limit's numbers are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error(transparent)]
    Policy(#[from] crate::bucket::PolicyError),
    #[error("requests must be from 1 to {MAX_REQUESTS}, got {0}")]
    Requests(u64),
    #[error("the window must be from 1 ms to 366 days, got {0} µs")]
    Window(u64),
    #[error("burst applies to the token bucket only")]
    BurstWithoutBucket,
}

/// One limit: its algorithm and numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitSpec {
    /// A token bucket (capacity = burst, refilled at `requests / window`).
    TokenBucket(Policy),
    /// At most `requests` per window of `window_us`, windows aligned to the Unix epoch.
    FixedWindow { requests: u64, window_us: u64 },
    /// At most `requests` in any `window_us`, estimated Cloudflare's way.
    SlidingWindow { requests: u64, window_us: u64 },
}

impl LimitSpec {
    /// A limit of `requests` per `window` counted by `algorithm`; `burst` (token bucket only)
    /// is the bucket's capacity, `requests` when absent.
    pub fn new(
        algorithm: Algorithm,
        requests: u64,
        window: Duration,
        burst: Option<u64>,
    ) -> Result<Self, LimitError> {
        let window_us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        if !(MIN_WINDOW_US..=MAX_WINDOW_US).contains(&window_us) {
            return Err(LimitError::Window(window_us));
        }
        if !(1..=MAX_REQUESTS).contains(&requests) {
            return Err(LimitError::Requests(requests));
        }
        match algorithm {
            Algorithm::TokenBucket => {
                let rate = requests as f64 * 1_000_000.0 / window_us as f64;
                Ok(LimitSpec::TokenBucket(Policy::new(
                    burst.unwrap_or(requests),
                    rate,
                )?))
            }
            _ if burst.is_some() => Err(LimitError::BurstWithoutBucket),
            Algorithm::FixedWindow => Ok(LimitSpec::FixedWindow {
                requests,
                window_us,
            }),
            Algorithm::SlidingWindow => Ok(LimitSpec::SlidingWindow {
                requests,
                window_us,
            }),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            LimitSpec::TokenBucket(_) => Algorithm::TokenBucket,
            LimitSpec::FixedWindow { .. } => Algorithm::FixedWindow,
            LimitSpec::SlidingWindow { .. } => Algorithm::SlidingWindow,
        }
    }

    /// The most a request may cost and still be admitted some day (the capacity).
    pub fn limit(&self) -> u64 {
        match self {
            LimitSpec::TokenBucket(p) => p.capacity(),
            LimitSpec::FixedWindow { requests, .. } | LimitSpec::SlidingWindow { requests, .. } => {
                *requests
            }
        }
    }

    /// The policy's window, for the `w` of the `RateLimit-Policy` header: the window of
    /// a fixed or sliding window; the time an empty token bucket takes to fill.
    pub fn window(&self) -> Duration {
        match self {
            LimitSpec::TokenBucket(p) => {
                Duration::from_secs_f64(p.capacity() as f64 / p.refill_per_sec())
            }
            LimitSpec::FixedWindow { window_us, .. }
            | LimitSpec::SlidingWindow { window_us, .. } => Duration::from_micros(*window_us),
        }
    }
}

/// What a store keeps per limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitState {
    Bucket(BucketState),
    /// The count of the window that starts at `window_start_us`.
    Fixed {
        window_start_us: u64,
        count: u64,
    },
    /// The counts of the window that starts at `window_start_us` and of the one before.
    Sliding {
        window_start_us: u64,
        count: u64,
        previous: u64,
    },
}

impl LimitSpec {
    /// The same limit divided by `parts` (at least 1 request), for the per-instance fallback
    /// used while the shared store is unreachable.
    pub fn divided(&self, parts: u64) -> Self {
        let parts = parts.max(1);
        match *self {
            LimitSpec::TokenBucket(p) => LimitSpec::TokenBucket(p.divided(parts)),
            LimitSpec::FixedWindow {
                requests,
                window_us,
            } => LimitSpec::FixedWindow {
                requests: (requests / parts).max(1),
                window_us,
            },
            LimitSpec::SlidingWindow {
                requests,
                window_us,
            } => LimitSpec::SlidingWindow {
                requests: (requests / parts).max(1),
                window_us,
            },
        }
    }

    /// How long a state must be kept at `now_us` before forgetting it changes nothing
    /// (a forgotten state and a fresh one decide alike); zero when it can go now.
    pub fn keep_for_us(&self, state: &LimitState, now_us: u64) -> u64 {
        match (self, state) {
            (LimitSpec::TokenBucket(p), LimitState::Bucket(b)) => {
                if b.is_full_at(now_us, p) {
                    0
                } else {
                    let (peek, _) = crate::bucket::decide(Some(*b), now_us, p, 0);
                    u64::try_from(peek.quota().reset_after.as_micros()).unwrap_or(u64::MAX)
                }
            }
            (
                LimitSpec::FixedWindow { window_us, .. },
                LimitState::Fixed {
                    window_start_us, ..
                },
            ) => (window_start_us + window_us).saturating_sub(now_us),
            (
                LimitSpec::SlidingWindow { window_us, .. },
                LimitState::Sliding {
                    window_start_us, ..
                },
            ) => (window_start_us + 2 * window_us).saturating_sub(now_us),
            _ => 0,
        }
    }
}

/// One limit applied to a request: its numbers and whether it is enforced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Applied {
    pub spec: LimitSpec,
    /// Decided and reported, never enforced: a refusal by a shadow limit refuses nothing.
    pub shadow: bool,
}

/// One limit's part of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOutcome {
    /// Whether this limit, alone, admits the request's cost.
    pub admits: bool,
    /// The numbers after the decision (spent when the request was admitted).
    pub quota: crate::Quota,
    /// When this limit would admit the cost (zero when it admits it now; `Duration::MAX`
    /// when it never can).
    pub retry_after: Duration,
}

/// The decision over every limit of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Admitted: every enforced limit admits the cost (and each one spent it).
    pub allowed: bool,
    /// One per applied limit, in order.
    pub limits: Vec<LimitOutcome>,
}

impl Outcome {
    /// The decision of a request with one limit, in the terms of a token bucket's answer.
    pub fn single_decision(&self) -> crate::Decision {
        let limit = self.limits.first().copied().unwrap_or(LimitOutcome {
            admits: self.allowed,
            quota: crate::Quota {
                limit: 0,
                remaining: 0,
                reset_after: Duration::ZERO,
            },
            retry_after: Duration::ZERO,
        });
        if self.allowed {
            crate::Decision::Allowed(limit.quota)
        } else {
            crate::Decision::Limited {
                quota: limit.quota,
                retry_after: limit.retry_after,
            }
        }
    }

    /// The retry time of a refused request: the longest wait among the enforced limits that
    /// refuse (zero when allowed).
    pub fn retry_after(&self, applied: &[Applied]) -> Duration {
        self.limits
            .iter()
            .zip(applied)
            .filter(|(l, a)| !a.shadow && !l.admits)
            .map(|(l, _)| l.retry_after)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// Decides a request of `cost` against every limit in `applied` at `now_us`, all or
/// nothing, and returns the decision and the state to store for each limit (`None`: leave
/// it as it is).
///
/// - `cost > 0`: admitted when every enforced limit admits it; then every limit that admits
///   it spends it (a shadow limit that would refuse is left as it is). Refused: nothing is
///   spent anywhere.
/// - `cost == 0`: a peek; nothing changes.
/// - `cost < 0`: a refund of `-cost`: each limit gets it back, never above its capacity
///   (a refund for work that turned out cheaper); always admitted.
pub fn decide_all(
    states: &[Option<LimitState>],
    now_us: u64,
    applied: &[Applied],
    cost: i64,
) -> (Outcome, Vec<Option<LimitState>>) {
    debug_assert_eq!(states.len(), applied.len());
    let evaluated: Vec<Evaluated> = applied
        .iter()
        .zip(states)
        .map(|(a, s)| evaluate(&a.spec, *s, now_us, cost))
        .collect();
    let allowed = cost <= 0
        || evaluated
            .iter()
            .zip(applied)
            .all(|(e, a)| a.shadow || e.admits);
    let mut limits = Vec::with_capacity(applied.len());
    let mut writes = Vec::with_capacity(applied.len());
    for e in evaluated {
        let spend = allowed && e.admits && cost != 0;
        limits.push(LimitOutcome {
            admits: e.admits,
            quota: if spend { e.spent_quota } else { e.kept_quota },
            retry_after: e.retry_after,
        });
        writes.push(spend.then_some(e.spent));
    }
    (Outcome { allowed, limits }, writes)
}

/// One limit evaluated for a cost: both the state it would store and the numbers either way.
struct Evaluated {
    admits: bool,
    spent: LimitState,
    spent_quota: crate::Quota,
    kept_quota: crate::Quota,
    retry_after: Duration,
}

fn evaluate(spec: &LimitSpec, state: Option<LimitState>, now_us: u64, cost: i64) -> Evaluated {
    // A clock that stepped back (NTP, another store host) never reopens a window: the
    // window of the state stands until the clock is past its start again (the token
    // bucket clamps `now` to its last update the same way).
    let now_us = match state {
        Some(LimitState::Fixed {
            window_start_us, ..
        })
        | Some(LimitState::Sliding {
            window_start_us, ..
        }) => now_us.max(window_start_us),
        _ => now_us,
    };
    match *spec {
        LimitSpec::TokenBucket(policy) => {
            let bucket = match state {
                Some(LimitState::Bucket(b)) => Some(b),
                _ => None,
            };
            bucket_evaluate(&policy, bucket, now_us, cost)
        }
        LimitSpec::FixedWindow {
            requests,
            window_us,
        } => fixed_evaluate(requests, window_us, state, now_us, cost),
        LimitSpec::SlidingWindow {
            requests,
            window_us,
        } => sliding_evaluate(requests, window_us, state, now_us, cost),
    }
}

fn bucket_evaluate(
    policy: &Policy,
    bucket: Option<BucketState>,
    now_us: u64,
    cost: i64,
) -> Evaluated {
    use crate::bucket::decide;
    let (kept, kept_state) = decide(bucket, now_us, policy, 0);
    if cost < 0 {
        let refunded = BucketState {
            tokens: (kept_state.tokens + cost.unsigned_abs() as f64).min(policy.capacity() as f64),
            updated_us: kept_state.updated_us,
        };
        let (after, _) = decide(Some(refunded), refunded.updated_us, policy, 0);
        return Evaluated {
            admits: true,
            spent: LimitState::Bucket(refunded),
            spent_quota: after.quota(),
            kept_quota: kept.quota(),
            retry_after: Duration::ZERO,
        };
    }
    let (decision, state) = decide(bucket, now_us, policy, cost as u64);
    Evaluated {
        admits: decision.is_allowed(),
        spent: LimitState::Bucket(state),
        spent_quota: decision.quota(),
        kept_quota: kept.quota(),
        retry_after: decision.retry_after(),
    }
}

/// The count of the fixed window containing `now_us`.
fn fixed_count(window_us: u64, state: Option<LimitState>, now_us: u64) -> (u64, u64) {
    let start = now_us - now_us % window_us;
    match state {
        Some(LimitState::Fixed {
            window_start_us,
            count,
        }) if window_start_us == start => (start, count),
        _ => (start, 0),
    }
}

fn fixed_evaluate(
    requests: u64,
    window_us: u64,
    state: Option<LimitState>,
    now_us: u64,
    cost: i64,
) -> Evaluated {
    let (start, count) = fixed_count(window_us, state, now_us);
    let end_in = Duration::from_micros(start + window_us - now_us);
    let quota = |count: u64| crate::Quota {
        limit: requests,
        remaining: requests.saturating_sub(count),
        reset_after: if count == 0 { Duration::ZERO } else { end_in },
    };
    let next = if cost < 0 {
        count.saturating_sub(cost.unsigned_abs())
    } else {
        count.saturating_add(cost as u64)
    };
    let admits = cost <= 0 || next <= requests;
    let retry_after = if admits {
        Duration::ZERO
    } else if cost as u64 > requests {
        Duration::MAX
    } else {
        end_in
    };
    Evaluated {
        admits,
        spent: LimitState::Fixed {
            window_start_us: start,
            count: next,
        },
        spent_quota: quota(next),
        kept_quota: quota(count),
        retry_after,
    }
}

/// The current and previous counts of the sliding window at `now_us`.
fn sliding_counts(window_us: u64, state: Option<LimitState>, now_us: u64) -> (u64, u64, u64) {
    let start = now_us - now_us % window_us;
    match state {
        Some(LimitState::Sliding {
            window_start_us,
            count,
            previous,
        }) => {
            if window_start_us == start {
                (start, count, previous)
            } else if window_start_us + window_us == start {
                (start, 0, count)
            } else {
                (start, 0, 0)
            }
        }
        _ => (start, 0, 0),
    }
}

/// Cloudflare's estimate of the requests in the last window: the previous window's count
/// weighted by its share of the last `window_us`, plus the current count. The Lua script
/// evaluates the same expression in the same order.
fn sliding_estimate(window_us: u64, previous: u64, count: u64, elapsed_us: u64) -> f64 {
    previous as f64 * (window_us - elapsed_us) as f64 / window_us as f64 + count as f64
}

/// Whether a sliding window admits `cost` at `at_us` (at or after `start`), given the
/// counts as of the window starting at `start`.
fn sliding_admits_at(
    requests: u64,
    window_us: u64,
    start: u64,
    count: u64,
    previous: u64,
    at_us: u64,
    cost: u64,
) -> bool {
    let (start2, count2, previous2) = sliding_counts(
        window_us,
        Some(LimitState::Sliding {
            window_start_us: start,
            count,
            previous,
        }),
        at_us,
    );
    sliding_estimate(window_us, previous2, count2, at_us - start2) + cost as f64 <= requests as f64
}

fn sliding_evaluate(
    requests: u64,
    window_us: u64,
    state: Option<LimitState>,
    now_us: u64,
    cost: i64,
) -> Evaluated {
    let (start, count, previous) = sliding_counts(window_us, state, now_us);
    let elapsed = now_us - start;
    let quota = |count: u64| {
        let estimate = sliding_estimate(window_us, previous, count, elapsed);
        crate::Quota {
            limit: requests,
            remaining: (requests as f64 - estimate).max(0.0).floor() as u64,
            reset_after: Duration::from_micros(if count > 0 {
                start + 2 * window_us - now_us
            } else if previous > 0 {
                start + window_us - now_us
            } else {
                0
            }),
        }
    };
    let next = if cost < 0 {
        count.saturating_sub(cost.unsigned_abs())
    } else {
        count.saturating_add(cost as u64)
    };
    let admits = cost <= 0
        || sliding_estimate(window_us, previous, count, elapsed) + cost as f64 <= requests as f64;
    let retry_after = if admits {
        Duration::ZERO
    } else if cost as u64 > requests {
        Duration::MAX
    } else {
        let cost = cost as u64;
        let admits_at =
            |at: u64| sliding_admits_at(requests, window_us, start, count, previous, at, cost);
        Duration::from_micros(sliding_wait(
            requests, window_us, start, count, previous, now_us, cost, admits_at,
        ))
    };
    Evaluated {
        admits,
        spent: LimitState::Sliding {
            window_start_us: start,
            count: next,
            previous,
        },
        spent_quota: quota(next),
        kept_quota: quota(count),
        retry_after,
    }
}

/// Microseconds from `now_us` until a sliding window admits `cost` (which it does not now,
/// and `cost <= requests`): the estimate only falls with time, so the answer is the first
/// instant at which `admits_at` holds, found from the closed form and corrected by a few
/// steps either way for floating-point rounding. The Lua script mirrors it.
#[allow(clippy::too_many_arguments)]
fn sliding_wait(
    requests: u64,
    window_us: u64,
    start: u64,
    count: u64,
    previous: u64,
    now_us: u64,
    cost: u64,
    admits_at: impl Fn(u64) -> bool,
) -> u64 {
    let w = window_us as f64;
    // In this window: previous * (w - e) / w <= requests - count - cost.
    let candidate = if count + cost <= requests && previous > 0 {
        let room = (requests - count - cost) as f64;
        let e = (w - room * w / previous as f64).ceil().max(0.0) as u64;
        start + e.min(window_us)
    } else {
        // In the next window, where this window's count is the previous one.
        let next = start + window_us;
        if count == 0 {
            next
        } else {
            let room = (requests - cost) as f64;
            let e = (w - room * w / count as f64).ceil().max(0.0) as u64;
            next + e.min(window_us)
        }
    };
    let mut at = candidate.max(now_us);
    let mut step = 1u64;
    while !admits_at(at) && at < now_us + 3 * window_us {
        at += step;
        step *= 2;
    }
    // Rounding may have overshot by a microsecond or two.
    for _ in 0..4 {
        if at > now_us && admits_at(at - 1) {
            at -= 1;
        } else {
            break;
        }
    }
    at - now_us
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000;

    fn fixed(requests: u64, window_secs: u64) -> Applied {
        Applied {
            spec: LimitSpec::new(
                Algorithm::FixedWindow,
                requests,
                Duration::from_secs(window_secs),
                None,
            )
            .unwrap(),
            shadow: false,
        }
    }

    fn sliding(requests: u64, window_secs: u64) -> Applied {
        Applied {
            spec: LimitSpec::new(
                Algorithm::SlidingWindow,
                requests,
                Duration::from_secs(window_secs),
                None,
            )
            .unwrap(),
            shadow: false,
        }
    }

    fn bucket(requests: u64, window_secs: u64, burst: Option<u64>) -> Applied {
        Applied {
            spec: LimitSpec::new(
                Algorithm::TokenBucket,
                requests,
                Duration::from_secs(window_secs),
                burst,
            )
            .unwrap(),
            shadow: false,
        }
    }

    /// Runs requests through `decide_all`, keeping the states as a store would.
    struct Run {
        applied: Vec<Applied>,
        states: Vec<Option<LimitState>>,
    }

    impl Run {
        fn new(applied: Vec<Applied>) -> Self {
            let states = vec![None; applied.len()];
            Self { applied, states }
        }
        fn at(&mut self, now_us: u64, cost: i64) -> Outcome {
            let (outcome, writes) = decide_all(&self.states, now_us, &self.applied, cost);
            for (state, write) in self.states.iter_mut().zip(writes) {
                if let Some(w) = write {
                    *state = Some(w);
                }
            }
            outcome
        }
    }

    /// Defect: the windows took the window of `now` as it came, so a clock that stepped
    /// back (NTP, a failover to another host) reopened the previous window with a zero
    /// count; the token bucket already clamped `now` to its last update.
    #[test]
    fn a_clock_that_steps_back_never_reopens_a_window() {
        for applied in [fixed(2, 10), sliding(2, 10)] {
            let mut run = Run::new(vec![applied]);
            assert!(run.at(25 * SEC, 1).allowed);
            assert!(run.at(25 * SEC, 1).allowed);
            assert!(!run.at(25 * SEC, 1).allowed);
            // Back to the previous window (and before it): still refused.
            for back in [19 * SEC, 5 * SEC, 0] {
                assert!(!run.at(back, 1).allowed, "{applied:?} at {back}");
            }
        }
    }

    #[test]
    fn bounds_are_refused() {
        let w = Duration::from_secs(1);
        assert_eq!(
            LimitSpec::new(Algorithm::FixedWindow, 0, w, None),
            Err(LimitError::Requests(0))
        );
        assert!(
            LimitSpec::new(Algorithm::FixedWindow, 1, Duration::from_micros(10), None).is_err()
        );
        assert!(
            LimitSpec::new(
                Algorithm::SlidingWindow,
                1,
                Duration::from_secs(400 * 86_400),
                None
            )
            .is_err()
        );
        assert_eq!(
            LimitSpec::new(Algorithm::FixedWindow, 5, w, Some(10)),
            Err(LimitError::BurstWithoutBucket)
        );
        assert!(LimitSpec::new(Algorithm::TokenBucket, 10, w, Some(0)).is_err());
        // Burst and rate are separate: 1 per second, bursts of 10.
        let LimitSpec::TokenBucket(p) =
            LimitSpec::new(Algorithm::TokenBucket, 1, w, Some(10)).unwrap()
        else {
            panic!()
        };
        assert_eq!((p.capacity(), p.refill_per_sec()), (10, 1.0));
    }

    /// envoyproxy/ratelimit's behaviour: up to twice the limit passes around a window's edge.
    #[test]
    fn a_fixed_window_lets_a_burst_through_at_its_edge() {
        let mut run = Run::new(vec![fixed(10, 60)]);
        let edge = 1_000 * 60 * SEC;
        let admitted = (0..20).filter(|_| run.at(edge - 1, 1).allowed).count();
        assert_eq!(admitted, 10);
        let refused = run.at(edge - 1, 1);
        assert_eq!(refused.limits[0].retry_after, Duration::from_micros(1));
        let admitted = (0..20).filter(|_| run.at(edge, 1).allowed).count();
        assert_eq!(admitted, 10, "a new window, a new count: 20 within 2 µs");
    }

    /// Cloudflare's weighting: 30 s into a minute, half of the previous minute still counts.
    #[test]
    fn a_sliding_window_weighs_the_previous_window() {
        let mut run = Run::new(vec![sliding(10, 60)]);
        let minute = 1_000 * 60 * SEC;
        assert_eq!((0..10).filter(|_| run.at(minute, 1).allowed).count(), 10);
        // Next minute, 30 s in: estimate = 10 * 0.5 + 0 = 5, so 5 more.
        let half = minute + 90 * SEC;
        assert_eq!((0..10).filter(|_| run.at(half, 1).allowed).count(), 5);
        let refused = run.at(half, 1);
        assert!(!refused.allowed);
        // 10 * (60 - e) / 60 + 5 + 1 <= 10  <=>  e >= 36 s: 6 s from now.
        assert_eq!(refused.limits[0].retry_after, Duration::from_secs(6));
        assert!(run.at(half + 6 * SEC, 1).allowed);
    }

    #[test]
    fn a_refusal_by_one_limit_spends_nothing_on_the_others() {
        let mut run = Run::new(vec![bucket(100, 1, None), fixed(3, 3600)]);
        for _ in 0..3 {
            assert!(run.at(SEC, 1).allowed);
        }
        let refused = run.at(SEC, 1);
        assert!(!refused.allowed);
        assert!(refused.limits[0].admits && !refused.limits[1].admits);
        assert_eq!(
            refused.limits[0].quota.remaining, 97,
            "the bucket kept its token"
        );
        assert_eq!(run.at(SEC, 0).limits[0].quota.remaining, 97);
    }

    #[test]
    fn a_shadow_limit_reports_but_never_refuses() {
        let mut shadowed = fixed(2, 60);
        shadowed.shadow = true;
        let mut run = Run::new(vec![bucket(100, 1, None), shadowed]);
        let outcomes: Vec<Outcome> = (0..4).map(|_| run.at(SEC, 1)).collect();
        assert!(outcomes.iter().all(|o| o.allowed));
        let shadow_refusals = outcomes.iter().filter(|o| !o.limits[1].admits).count();
        assert_eq!(shadow_refusals, 2);
        assert_eq!(outcomes[3].limits[0].quota.remaining, 96);
        assert_eq!(outcomes[3].retry_after(&run.applied), Duration::ZERO);
    }

    #[test]
    fn a_refund_gives_back_never_above_the_capacity() {
        for applied in [bucket(5, 3600, None), fixed(5, 3600), sliding(5, 3600)] {
            let mut run = Run::new(vec![applied]);
            assert!(run.at(SEC, 4).allowed);
            assert_eq!(run.at(SEC, 0).limits[0].quota.remaining, 1);
            let refunded = run.at(SEC, -3);
            assert!(refunded.allowed);
            assert_eq!(refunded.limits[0].quota.remaining, 4, "{applied:?}");
            assert_eq!(
                run.at(SEC, -100).limits[0].quota.remaining,
                5,
                "{applied:?}"
            );
            assert!(run.at(SEC, 5).allowed);
            assert!(!run.at(SEC, 1).allowed);
        }
    }

    #[test]
    fn a_peek_changes_nothing() {
        let mut run = Run::new(vec![bucket(5, 3600, None), fixed(5, 60), sliding(5, 60)]);
        run.at(SEC, 2);
        let before = run.states.clone();
        let peek = run.at(SEC + 5, 0);
        assert!(peek.allowed);
        assert_eq!(run.states, before);
        assert!(peek.limits.iter().all(|l| l.quota.remaining == 3));
    }

    /// A reference model that keeps every admitted request: a window's count is the sum of
    /// the costs admitted inside it.
    #[derive(Default)]
    struct Log(Vec<(u64, u64)>);

    impl Log {
        fn sum(&self, from: u64, to: u64) -> u64 {
            self.0
                .iter()
                .filter(|(t, _)| (from..to).contains(t))
                .map(|(_, c)| c)
                .sum()
        }
        fn fixed_admits(&self, requests: u64, w: u64, now: u64, cost: u64) -> bool {
            let start = now - now % w;
            self.sum(start, start + w) + cost <= requests
        }
        fn sliding_admits(&self, requests: u64, w: u64, now: u64, cost: u64) -> bool {
            let start = now - now % w;
            let previous = if start >= w {
                self.sum(start - w, start)
            } else {
                0
            };
            let current = self.sum(start, start + w);
            previous as f64 * (w - (now - start)) as f64 / w as f64 + current as f64 + cost as f64
                <= requests as f64
        }
    }

    proptest! {
        /// Fixed and sliding windows decide as the reference model over random traffic,
        /// and every refusal's `retry_after` is exact: admitted then, refused a µs before.
        #[test]
        fn windows_agree_with_the_reference_model(
            requests in 1u64..20,
            window_ms in 1u64..5_000,
            steps in proptest::collection::vec((0u64..3_000_000, 1u64..5), 1..80),
        ) {
            let w = window_ms * 1_000;
            for sliding_kind in [false, true] {
                let applied = if sliding_kind {
                    Applied { spec: LimitSpec::SlidingWindow { requests, window_us: w }, shadow: false }
                } else {
                    Applied { spec: LimitSpec::FixedWindow { requests, window_us: w }, shadow: false }
                };
                let mut run = Run::new(vec![applied]);
                let mut log = Log::default();
                let mut now = 10 * w;
                for &(dt, cost) in &steps {
                    now += dt;
                    let expected = if sliding_kind {
                        log.sliding_admits(requests, w, now, cost)
                    } else {
                        log.fixed_admits(requests, w, now, cost)
                    };
                    let outcome = run.at(now, cost as i64);
                    prop_assert_eq!(outcome.allowed, expected, "at {} cost {}", now, cost);
                    if outcome.allowed {
                        log.0.push((now, cost));
                    } else if cost <= requests {
                        let retry = outcome.limits[0].retry_after.as_micros() as u64;
                        let (admits_then, admits_before) = if sliding_kind {
                            (log.sliding_admits(requests, w, now + retry, cost),
                             log.sliding_admits(requests, w, now + retry - 1, cost))
                        } else {
                            (log.fixed_admits(requests, w, now + retry, cost),
                             log.fixed_admits(requests, w, now + retry - 1, cost))
                        };
                        prop_assert!(admits_then, "retry_after {} too early", retry);
                        prop_assert!(!admits_before, "retry_after {} too late", retry);
                    }
                }
            }
        }

        /// All or nothing: a refused request leaves every state as it was.
        #[test]
        fn a_refused_request_writes_nothing(
            steps in proptest::collection::vec((0u64..500_000, 1i64..4), 1..60),
        ) {
            let mut run = Run::new(vec![bucket(5, 1, None), fixed(7, 2), sliding(6, 3)]);
            let mut now = 100 * SEC;
            for &(dt, cost) in &steps {
                now += dt;
                let before = run.states.clone();
                let outcome = run.at(now, cost);
                if !outcome.allowed {
                    prop_assert_eq!(&run.states, &before);
                    prop_assert!(outcome.limits.iter().any(|l| !l.admits));
                } else {
                    prop_assert!(outcome.limits.iter().all(|l| l.admits));
                }
            }
        }
    }
}
