//! Limits of every algorithm, and the all-or-nothing decision over several of them.
//!
//! A [`LimitSpec`] is one limit's numbers and algorithm. The limits that apply to one
//! request are decided together by [`decide_all`]: when any enforced limit refuses, none is
//! spent. Stores load and save each limit's [`LimitState`] atomically; they never decide
//! anything themselves (the Redis store runs the same arithmetic in Lua, and the contract
//! suite checks that both agree).
//!
//! One file per algorithm, each with its arithmetic over its own state:
//! `token_bucket` (over [`crate::bucket`], the bucket's own math), `fixed_window` and
//! `sliding_window`, both counting over a [`Window`].

use std::time::Duration;

use crate::bucket::{BucketState, Policy};

mod fixed_window;
mod sliding_window;
#[cfg(test)]
mod tests;
mod token_bucket;

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
    FixedWindow(Window),
    /// At most `requests` in any `window_us`, estimated Cloudflare's way.
    SlidingWindow(Window),
}

/// The numbers of a fixed or a sliding window: at most `requests` per `window_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub requests: u64,
    pub window_us: u64,
}

impl Window {
    /// The same window admitting a `parts`-th of its requests (at least 1).
    fn divided(self, parts: u64) -> Self {
        Window {
            requests: (self.requests / parts).max(1),
            ..self
        }
    }
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
            Algorithm::FixedWindow => Ok(LimitSpec::FixedWindow(Window {
                requests,
                window_us,
            })),
            Algorithm::SlidingWindow => Ok(LimitSpec::SlidingWindow(Window {
                requests,
                window_us,
            })),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            LimitSpec::TokenBucket(_) => Algorithm::TokenBucket,
            LimitSpec::FixedWindow(Window { .. }) => Algorithm::FixedWindow,
            LimitSpec::SlidingWindow(Window { .. }) => Algorithm::SlidingWindow,
        }
    }

    /// The most a request may cost and still be admitted some day (the capacity).
    pub fn limit(&self) -> u64 {
        match self {
            LimitSpec::TokenBucket(p) => p.capacity(),
            LimitSpec::FixedWindow(w) | LimitSpec::SlidingWindow(w) => w.requests,
        }
    }

    /// The policy's window, for the `w` of the `RateLimit-Policy` header: the window of
    /// a fixed or sliding window; the time an empty token bucket takes to fill.
    pub fn window(&self) -> Duration {
        match self {
            LimitSpec::TokenBucket(p) => {
                Duration::from_secs_f64(p.capacity() as f64 / p.refill_per_sec())
            }
            LimitSpec::FixedWindow(w) | LimitSpec::SlidingWindow(w) => {
                Duration::from_micros(w.window_us)
            }
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
            LimitSpec::FixedWindow(w) => LimitSpec::FixedWindow(w.divided(parts)),
            LimitSpec::SlidingWindow(w) => LimitSpec::SlidingWindow(w.divided(parts)),
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
                LimitSpec::FixedWindow(Window { window_us, .. }),
                LimitState::Fixed {
                    window_start_us, ..
                },
            ) => (window_start_us + window_us).saturating_sub(now_us),
            (
                LimitSpec::SlidingWindow(Window { window_us, .. }),
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
        let (limit, write) = e.settle(allowed, cost);
        limits.push(limit);
        writes.push(write);
    }
    (Outcome { allowed, limits }, writes)
}

/// [`decide_all`] for one limit: the same outcome and the same write, without the
/// vectors that hold several.
pub fn decide_one(
    state: Option<LimitState>,
    now_us: u64,
    applied: &Applied,
    cost: i64,
) -> (Outcome, Option<LimitState>) {
    let e = evaluate(&applied.spec, state, now_us, cost);
    let allowed = cost <= 0 || applied.shadow || e.admits;
    let (limit, write) = e.settle(allowed, cost);
    let outcome = Outcome {
        allowed,
        limits: vec![limit],
    };
    (outcome, write)
}

/// One limit evaluated for a cost: both the state it would store and the numbers either way.
pub(super) struct Evaluated {
    pub(super) admits: bool,
    pub(super) spent: LimitState,
    pub(super) spent_quota: crate::Quota,
    pub(super) kept_quota: crate::Quota,
    pub(super) retry_after: Duration,
}

impl Evaluated {
    /// The limit's part once the request is decided (`allowed`, all limits together): it
    /// spends the cost when the request is allowed and it admits it, and says which quota
    /// is left; with the state to store (`None`: leave it as it is).
    fn settle(self, allowed: bool, cost: i64) -> (LimitOutcome, Option<LimitState>) {
        let spend = allowed && self.admits && cost != 0;
        let limit = LimitOutcome {
            admits: self.admits,
            quota: if spend {
                self.spent_quota
            } else {
                self.kept_quota
            },
            retry_after: self.retry_after,
        };
        (limit, spend.then_some(self.spent))
    }
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
            token_bucket::evaluate(&policy, bucket, now_us, cost)
        }
        LimitSpec::FixedWindow(Window {
            requests,
            window_us,
        }) => fixed_window::evaluate(requests, window_us, state, now_us, cost),
        LimitSpec::SlidingWindow(Window {
            requests,
            window_us,
        }) => sliding_window::evaluate(requests, window_us, state, now_us, cost),
    }
}
