//! A circuit breaker in front of the shared store.
//!
//! Closed: calls go through; `threshold` consecutive failures open it. Open: calls are
//! refused without touching the store until `open_for` has passed. Then one caller is let
//! through as a probe (half-open): success closes the breaker, failure opens it again.
//! Lock-free (atomics only): it sits on every request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the breaker stands, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

pub struct Breaker {
    threshold: u32,
    open_for_us: u64,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Microseconds since `epoch` until which the breaker stays open; 0 when closed.
    open_until_us: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for_us: open_for.as_micros() as u64,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            open_until_us: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_us(&self) -> u64 {
        // Never 0, so that 0 can mean "closed".
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    /// Whether this call may go to the store.
    pub fn allow(&self) -> bool {
        let until = self.open_until_us.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now_us() < until {
            return false;
        }
        // Half-open: exactly one caller probes.
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn on_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.open_until_us.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("store answered again: circuit breaker closed");
        }
        self.probing.store(false, Ordering::Release);
    }

    pub fn on_failure(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        if was_probe || failures >= self.threshold {
            let until = self.now_us() + self.open_for_us;
            if self.open_until_us.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(failures, "store failing: circuit breaker opened");
            }
        }
    }

    pub fn state(&self) -> BreakerState {
        let until = self.open_until_us.load(Ordering::Acquire);
        if until == 0 {
            BreakerState::Closed
        } else if self.now_us() < until && !self.probing.load(Ordering::Acquire) {
            BreakerState::Open
        } else {
            BreakerState::HalfOpen
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let b = Breaker::new(3, Duration::from_millis(20));
        for _ in 0..2 {
            assert!(b.allow());
            b.on_failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.allow(), "the probe");
        assert!(!b.allow(), "only one probe at a time");
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.allow());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow() && b.allow());
    }

    #[test]
    fn success_resets_the_failure_count() {
        let b = Breaker::new(2, Duration::from_secs(10));
        b.on_failure();
        b.on_success();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
