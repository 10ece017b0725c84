//! Token-bucket math: the decision is a pure function of (bucket state, now, policy, cost).
//!
//! Stores only load and save [`BucketState`] atomically; they never decide anything
//! themselves. The Redis store runs the same arithmetic in Lua (see the rate-limiter's
//! `store/redis.rs`); the contract suite checks that both agree.

use std::time::Duration;

const MICROS_PER_SEC: f64 = 1_000_000.0;

/// How much a user may do: a bucket of `capacity` tokens refilled at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    capacity: u64,
    refill_per_sec: f64,
}

/// The largest bucket capacity, in tokens.
pub const MAX_CAPACITY: u64 = 1_000_000_000;
/// The slowest refill: one token a day.
pub const MIN_REFILL_PER_SEC: f64 = 1.0 / 86_400.0;
/// The fastest refill: 10^9 tokens a second.
pub const MAX_REFILL_PER_SEC: f64 = 1e9;
/// The longest time an empty bucket may take to fill (capacity / rate): 365 days.
///
/// These bounds keep every time the arithmetic computes below 2^53 µs, where an f64 still
/// counts single microseconds: the "step until enough" loops then end after a step or two
/// (and are bounded anyway), and the `PX` expiry Redis is given is a plain integer. Without
/// them a typo such as a rate of `1e-12` made one script spin inside Redis.
pub const MAX_REFILL_SECS: f64 = 365.0 * 86_400.0;

/// Why a [`Policy`] could not be built.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("capacity must be at least 1")]
    ZeroCapacity,
    #[error("capacity must be at most {MAX_CAPACITY} tokens, got {0}")]
    CapacityTooLarge(u64),
    #[error(
        "refill rate must be between one token per day (0.0000116) and 1000000000 tokens per second, got {0}"
    )]
    BadRefillRate(f64),
    #[error(
        "an empty bucket would take {0:.0} s to refill (capacity / refill rate); at most 365 days (31536000 s) is allowed"
    )]
    RefillTooSlow(f64),
}

impl Policy {
    /// A policy with a burst of `capacity` tokens refilled at `refill_per_sec` (fractions allowed).
    pub fn new(capacity: u64, refill_per_sec: f64) -> Result<Self, PolicyError> {
        if capacity == 0 {
            return Err(PolicyError::ZeroCapacity);
        }
        if capacity > MAX_CAPACITY {
            return Err(PolicyError::CapacityTooLarge(capacity));
        }
        if !(MIN_REFILL_PER_SEC..=MAX_REFILL_PER_SEC).contains(&refill_per_sec) {
            return Err(PolicyError::BadRefillRate(refill_per_sec));
        }
        let refill_secs = capacity as f64 / refill_per_sec;
        if refill_secs > MAX_REFILL_SECS {
            return Err(PolicyError::RefillTooSlow(refill_secs));
        }
        Ok(Self {
            capacity,
            refill_per_sec,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn refill_per_sec(&self) -> f64 {
        self.refill_per_sec
    }

    /// The same policy with its capacity and rate divided by `parts` (at least 1 token), for
    /// the per-instance fallback bucket used while the shared store is unreachable.
    pub fn divided(&self, parts: u64) -> Self {
        let parts = parts.max(1);
        Self {
            capacity: (self.capacity / parts).max(1),
            refill_per_sec: self.refill_per_sec / parts as f64,
        }
    }

    /// Tokens in a bucket that held `tokens` after `elapsed_us` microseconds of refill.
    ///
    /// The evaluation order (`elapsed * rate / 1e6`) is mirrored by the Lua script so both
    /// implementations round identically.
    fn refill(&self, tokens: f64, elapsed_us: u64) -> f64 {
        let refilled = tokens + elapsed_us as f64 * self.refill_per_sec / MICROS_PER_SEC;
        refilled.min(self.capacity as f64)
    }

    /// Microseconds until a bucket holding `tokens` holds at least `wanted`; exact in the
    /// sense that `refill(tokens, result) >= wanted`.
    fn time_until(&self, tokens: f64, wanted: f64) -> u64 {
        if tokens >= wanted {
            return 0;
        }
        let mut us = ((wanted - tokens) * MICROS_PER_SEC / self.refill_per_sec).ceil() as u64;
        // Floating-point rounding can leave the estimate a hair short: step until it is not.
        // The first step is 1 µs (within the policy bounds one or two are all it takes);
        // each next one doubles, so the loop ends whatever the numbers.
        let mut step = 1u64;
        while self.refill(tokens, us) < wanted && us < u64::MAX {
            us = us.saturating_add(step);
            step = step.saturating_mul(2);
        }
        us
    }
}

/// What a store keeps per user: the tokens left at the last decision and when it was made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    pub tokens: f64,
    pub updated_us: u64,
}

impl BucketState {
    /// A full bucket as of `now_us` (how every user starts).
    pub fn full(policy: &Policy, now_us: u64) -> Self {
        Self {
            tokens: policy.capacity as f64,
            updated_us: now_us,
        }
    }

    /// The tokens this bucket holds at `now_us` (refilled, capped at the capacity).
    pub fn tokens_at(&self, now_us: u64, policy: &Policy) -> f64 {
        policy.refill(self.tokens, now_us.saturating_sub(self.updated_us))
    }

    /// Whether the bucket has refilled completely by `now_us`, so a store may forget it:
    /// a forgotten bucket and a full one decide identically.
    pub fn is_full_at(&self, now_us: u64, policy: &Policy) -> bool {
        let elapsed = now_us.saturating_sub(self.updated_us);
        policy.refill(self.tokens, elapsed) >= policy.capacity as f64
    }
}

/// The numbers a client is told with every decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The bucket capacity.
    pub limit: u64,
    /// Whole tokens left after this decision.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
}

/// The result of asking for tokens. Being over the limit is a result, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed(Quota),
    Limited {
        quota: Quota,
        /// A retry at `now + retry_after` is admitted (if nothing else spent the tokens).
        retry_after: Duration,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }

    pub fn quota(&self) -> Quota {
        match self {
            Decision::Allowed(quota) | Decision::Limited { quota, .. } => *quota,
        }
    }

    /// Zero when allowed.
    pub fn retry_after(&self) -> Duration {
        match self {
            Decision::Allowed(_) => Duration::ZERO,
            Decision::Limited { retry_after, .. } => *retry_after,
        }
    }
}

/// Decides a request of `cost` tokens at `now_us` against a bucket (`None`: never seen, or
/// forgotten because it was full) and returns the decision and the state to store.
///
/// A `cost` above the capacity can never be admitted; it is limited with the largest
/// representable `retry_after` (the HTTP layer refuses such requests before they get here).
pub fn decide(
    state: Option<BucketState>,
    now_us: u64,
    policy: &Policy,
    cost: u64,
) -> (Decision, BucketState) {
    let state = state.unwrap_or_else(|| BucketState::full(policy, now_us));
    // A clock that stepped backwards refills nothing and never moves the bucket back in time.
    let now_us = now_us.max(state.updated_us);
    let tokens = policy.refill(state.tokens, now_us - state.updated_us);
    let cost_f = cost as f64;
    let (decision_tokens, allowed) = if tokens >= cost_f {
        (tokens - cost_f, true)
    } else {
        (tokens, false)
    };
    let new_state = BucketState {
        tokens: decision_tokens,
        updated_us: now_us,
    };
    let quota = Quota {
        limit: policy.capacity,
        remaining: decision_tokens.max(0.0).floor() as u64,
        reset_after: Duration::from_micros(
            policy.time_until(decision_tokens, policy.capacity as f64),
        ),
    };
    let decision = if allowed {
        Decision::Allowed(quota)
    } else if cost > policy.capacity {
        Decision::Limited {
            quota,
            retry_after: Duration::MAX,
        }
    } else {
        Decision::Limited {
            quota,
            retry_after: Duration::from_micros(policy.time_until(tokens, cost_f)),
        }
    };
    (decision, new_state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(capacity: u64, rate: f64) -> Policy {
        Policy::new(capacity, rate).unwrap()
    }

    #[test]
    fn rejects_bad_policies() {
        assert_eq!(Policy::new(0, 1.0), Err(PolicyError::ZeroCapacity));
        assert!(Policy::new(1, 0.0).is_err());
        assert!(Policy::new(1, -1.0).is_err());
        assert!(Policy::new(1, f64::NAN).is_err());
        assert!(Policy::new(1, f64::INFINITY).is_err());
    }

    /// A typo in the rate (`1e-12` for `1e-2`) or an absurd capacity is refused up front:
    /// such a policy made the refill arithmetic loop for ever inside Redis.
    #[test]
    fn rejects_policies_outside_the_bounds() {
        assert_eq!(
            Policy::new(10, 1e-12),
            Err(PolicyError::BadRefillRate(1e-12))
        );
        assert_eq!(Policy::new(10, 2e9), Err(PolicyError::BadRefillRate(2e9)));
        assert_eq!(
            Policy::new(MAX_CAPACITY + 1, 1.0),
            Err(PolicyError::CapacityTooLarge(MAX_CAPACITY + 1))
        );
        assert!(matches!(
            Policy::new(1_000_000, MIN_REFILL_PER_SEC),
            Err(PolicyError::RefillTooSlow(_))
        ));
        // The extremes that are allowed.
        assert!(Policy::new(1, MIN_REFILL_PER_SEC).is_ok());
        assert!(Policy::new(MAX_CAPACITY, MAX_REFILL_PER_SEC).is_ok());
        assert!(Policy::new(365, MIN_REFILL_PER_SEC).is_ok());
    }

    /// At the slowest allowed refill, the longest wait is still computed exactly, in a
    /// step or two.
    #[test]
    fn the_longest_waits_are_exact() {
        let p = policy(MAX_CAPACITY, MAX_CAPACITY as f64 / MAX_REFILL_SECS);
        let (_, s) = decide(None, 0, &p, MAX_CAPACITY);
        let (d, _) = decide(Some(s), 0, &p, MAX_CAPACITY);
        let retry = d.retry_after().as_micros() as u64;
        assert!(retry >= (MAX_REFILL_SECS * 1e6) as u64 - 1);
        let (d, _) = decide(Some(s), retry, &p, MAX_CAPACITY);
        assert!(d.is_allowed(), "a retry after retry_after is admitted");
    }

    #[test]
    fn first_request_sees_a_full_bucket() {
        let p = policy(10, 1.0);
        let (d, s) = decide(None, 5_000_000, &p, 1);
        assert_eq!(
            d,
            Decision::Allowed(Quota {
                limit: 10,
                remaining: 9,
                reset_after: Duration::from_secs(1)
            })
        );
        assert_eq!(s.tokens, 9.0);
    }

    #[test]
    fn limited_request_reports_exact_retry_after() {
        let p = policy(2, 0.5);
        let mut state = None;
        for _ in 0..2 {
            let (d, s) = decide(state, 0, &p, 1);
            assert!(d.is_allowed());
            state = Some(s);
        }
        let (d, s) = decide(state, 0, &p, 1);
        assert!(!d.is_allowed());
        assert_eq!(d.retry_after(), Duration::from_secs(2));
        assert_eq!(d.quota().reset_after, Duration::from_secs(4));
        // One microsecond early is still refused; on time is admitted.
        let (early, _) = decide(Some(s), 1_999_999, &p, 1);
        assert!(!early.is_allowed());
        let (on_time, _) = decide(Some(s), 2_000_000, &p, 1);
        assert!(on_time.is_allowed());
    }

    #[test]
    fn cost_above_capacity_is_never_admitted() {
        let p = policy(3, 1.0);
        let (d, _) = decide(None, 0, &p, 4);
        assert_eq!(d.retry_after(), Duration::MAX);
    }

    #[test]
    fn clock_going_backwards_refills_nothing() {
        let p = policy(1, 1.0);
        let (_, s) = decide(None, 10_000_000, &p, 1);
        let (d, s2) = decide(Some(s), 1_000_000, &p, 1);
        assert!(!d.is_allowed());
        assert_eq!(s2.updated_us, 10_000_000);
    }

    #[test]
    fn full_buckets_are_forgettable() {
        let p = policy(10, 2.0);
        let (_, s) = decide(None, 0, &p, 4);
        assert!(!s.is_full_at(1_999_999, &p));
        assert!(s.is_full_at(2_000_000, &p));
    }

    #[test]
    fn divided_policy_keeps_at_least_one_token() {
        let p = policy(10, 1.0).divided(3);
        assert_eq!(p.capacity(), 3);
        assert!((p.refill_per_sec() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(policy(2, 1.0).divided(5).capacity(), 1);
    }

    proptest! {
        /// Over any window of length t, admitted cost <= capacity + rate * t.
        #[test]
        fn admitted_cost_is_bounded_by_capacity_plus_refill(
            capacity in 1u64..50,
            rate_milli in 1u64..20_000,
            steps in proptest::collection::vec((0u64..400_000, 1u64..4), 1..300),
            window in (0usize..300, 0usize..300),
        ) {
            let p = policy(capacity, rate_milli as f64 / 1000.0);
            let mut now = 1_000_000u64;
            let mut state = None;
            let mut admitted = Vec::new();
            for (gap, cost) in steps {
                now += gap;
                let (d, s) = decide(state, now, &p, cost);
                state = Some(s);
                if d.is_allowed() {
                    admitted.push((now, cost));
                }
            }
            let (a, b) = (window.0.min(window.1), window.0.max(window.1));
            if b < admitted.len() {
                let t = (admitted[b].0 - admitted[a].0) as f64 / 1e6;
                let total: u64 = admitted[a..=b].iter().map(|(_, c)| c).sum();
                prop_assert!(
                    total as f64 <= capacity as f64 + p.refill_per_sec() * t + 1e-9,
                    "admitted {} in {}s with capacity {} rate {}", total, t, capacity, p.refill_per_sec()
                );
            }
        }

        /// A full bucket admits exactly `capacity` back-to-back requests.
        #[test]
        fn full_bucket_admits_exactly_capacity(capacity in 1u64..500, rate_milli in 1u64..100_000) {
            let p = policy(capacity, rate_milli as f64 / 1000.0);
            let mut state = None;
            let mut admitted = 0;
            for _ in 0..capacity + 5 {
                let (d, s) = decide(state, 42, &p, 1);
                state = Some(s);
                admitted += u64::from(d.is_allowed());
            }
            prop_assert_eq!(admitted, capacity);
        }

        /// No request is refused while enough tokens are there, and a retry after exactly
        /// `retry_after` is admitted.
        #[test]
        fn refusals_are_justified_and_retry_after_is_exact(
            capacity in 1u64..50,
            rate_milli in 1u64..20_000,
            steps in proptest::collection::vec((0u64..3_000_000, 1u64..4), 1..100),
        ) {
            let p = policy(capacity, rate_milli as f64 / 1000.0);
            let mut now = 0u64;
            let mut state: Option<BucketState> = None;
            for (gap, cost) in steps {
                let cost = cost.min(capacity);
                now += gap;
                let before = state.map(|s| p.refill(s.tokens, now.saturating_sub(s.updated_us)))
                    .unwrap_or(capacity as f64);
                let (d, s) = decide(state, now, &p, cost);
                if before >= cost as f64 {
                    prop_assert!(d.is_allowed());
                } else {
                    prop_assert!(!d.is_allowed());
                    let retry_at = now + d.retry_after().as_micros() as u64;
                    let (retry, _) = decide(Some(s), retry_at, &p, cost);
                    prop_assert!(retry.is_allowed(), "retry at +{:?} refused", d.retry_after());
                    // And whole milliseconds, rounded up, are still on time.
                    let ms = d.retry_after().as_micros().div_ceil(1000) as u64;
                    let (retry_ms, _) = decide(Some(s), now + ms * 1000, &p, cost);
                    prop_assert!(retry_ms.is_allowed());
                }
                state = Some(s);
            }
        }
    }
}
