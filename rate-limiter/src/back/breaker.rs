//! A circuit breaker in front of the shared store.
//!
//! Closed: calls go through; `threshold` consecutive failures open it. Open: calls are
//! refused without touching the store until `open_for` has passed. Then one caller is let
//! through as a probe (half-open): success closes the breaker, failure opens it again.
//! Lock-free (atomics only): it sits on every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use domain::Clock;

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
    clock: Arc<dyn Clock>,
    consecutive_failures: AtomicU32,
    /// Clock time (µs) until which the breaker stays open; 0 when closed.
    open_until_us: AtomicU64,
    probing: AtomicBool,
}

/// Leave for one call to the store, held while the call runs. Its verdict is
/// [`Permit::success`] or [`Permit::failure`]; a permit dropped without one (its future was
/// dropped: a client that went away, a request deadline) gives back what it took: a probe
/// counts as failed, so the breaker opens again for its period and the next caller after
/// it probes anew, instead of the slot staying taken for ever.
#[must_use = "a permit is given back by its verdict or on drop"]
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    /// Its verdict was given (success or failure); else dropping it gives one.
    reported: bool,
}

impl Permit {
    /// The store answered.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    /// The store failed (or timed out).
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(self.probe);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            tracing::debug!("circuit breaker probe abandoned; counted as a failure");
            self.breaker.on_failure(true);
        }
    }
}

impl Breaker {
    /// A breaker that opens after `threshold` consecutive failures, for `open_for`, on the
    /// time of `clock`.
    pub fn new(threshold: u32, open_for: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for_us: open_for.as_micros() as u64,
            clock,
            consecutive_failures: AtomicU32::new(0),
            open_until_us: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_us(&self) -> u64 {
        // Never 0, so that 0 can mean "closed".
        self.clock.now_us().max(1)
    }

    /// Leave to call the store, or `None` while the breaker is open (or another caller is
    /// probing it).
    pub fn permit(self: &Arc<Self>) -> Option<Permit> {
        let until = self.open_until_us.load(Ordering::Acquire);
        let probe = if until == 0 {
            false
        } else if self.now_us() < until {
            return None;
        } else {
            // Half-open: exactly one caller probes.
            self.probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .ok()?;
            true
        };
        Some(Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        })
    }

    fn on_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.open_until_us.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("store answered again: circuit breaker closed");
        }
        self.probing.store(false, Ordering::Release);
    }

    fn on_failure(&self, probe: bool) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if probe || failures >= self.threshold {
            let until = self.now_us() + self.open_for_us;
            if self.open_until_us.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(failures, "store failing: circuit breaker opened");
            }
        }
        if probe {
            self.probing.store(false, Ordering::Release);
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
    use domain::ManualClock;

    const MS: u64 = 1_000;

    fn breaker(threshold: u32, open_ms: u64) -> (Arc<Breaker>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let b = Arc::new(Breaker::new(
            threshold,
            Duration::from_millis(open_ms),
            clock.clone(),
        ));
        (b, clock)
    }

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let (b, clock) = breaker(3, 20);
        for _ in 0..2 {
            b.permit().unwrap().failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.permit().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.permit().is_none());
        clock.advance_us(25 * MS);
        let probe = b.permit().expect("the probe");
        assert!(b.permit().is_none(), "only one probe at a time");
        probe.failure();
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance_us(25 * MS);
        b.permit().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        let (p1, p2) = (b.permit(), b.permit());
        assert!(p1.is_some() && p2.is_some());
    }

    #[test]
    fn success_resets_the_failure_count() {
        let (b, _) = breaker(2, 10_000);
        b.permit().unwrap().failure();
        b.permit().unwrap().success();
        b.permit().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_dropped_probe_gives_its_slot_back() {
        let (b, clock) = breaker(1, 20);
        b.permit().unwrap().failure();
        clock.advance_us(25 * MS);
        drop(b.permit().expect("the probe"));
        // Counted as a failed probe: open again for the period, then probed anew.
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.permit().is_none());
        clock.advance_us(25 * MS);
        b.permit().expect("a new probe").success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_dropped_ordinary_call_changes_nothing() {
        let (b, _) = breaker(1, 20);
        drop(b.permit().unwrap());
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
