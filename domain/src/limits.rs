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
    Fixed { window_start_us: u64, count: u64 },
    /// The counts of the window that starts at `window_start_us` and of the one before.
    Sliding {
        window_start_us: u64,
        count: u64,
        previous: u64,
    },
}
