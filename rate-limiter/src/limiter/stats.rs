//! The limiter's counts: kept in atomics on the decision path (the one source), shown as
//! Prometheus metrics at each scrape and as this instance's status report.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Unit;

use crate::back::breaker::BreakerState;

use super::Limiter;

/// Describes the limiter's metrics (help text and unit), once per process, after installing
/// the recorder; [`Limiter::new`] calls it.
pub fn describe_metrics() {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        kit::metrics::handle();
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
            "ratelimit_events_in_doubt",
            Unit::Count,
            "Events of fail-open decisions whose Redis call timed out, held until Redis says whether it ran the call (and so recorded the event in the outbox)"
        );
        metrics::describe_counter!(
            "ratelimit_events_settled_total",
            Unit::Count,
            "Events held in doubt and settled, by what became of them: recorded (Redis ran the call), published (it did not), overflowed (published unsettled, the holding space full)"
        );
        metrics::describe_counter!(
            "ratelimit_events_recorded_otherwise_total",
            Unit::Count,
            "Events settled as recorded whose Redis call decided otherwise than the fail-open fallback answered: counted as Redis decided"
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
    /// Events the store took with their decision, into the outbox (or dropped there past
    /// its bound): published, as far as this limiter is concerned.
    pub outboxed: AtomicU64,
}

impl Limiter {
    pub fn stats(&self) -> &LimiterStats {
        &self.stats
    }

    /// What became of the events held in doubt (with the outbox; see [`crate::back::settle`]).
    pub fn settled_stats(&self) -> Option<&crate::back::settle::SettleStats> {
        self.settler.as_ref().map(|s| s.stats())
    }

    /// This instance's numbers, for the deployment-wide `/status` of a standalone gateway.
    pub fn report(&self) -> kit::report::Report {
        let s = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let p = self.publisher.stats();
        // The events held in doubt now, and those settled as recorded by the store.
        let (held, recorded) = self
            .settler
            .as_ref()
            .map_or((0, 0), |s| (s.held() as u64, load(&s.stats().recorded)));
        kit::report::Report {
            allowed: load(&s.allowed),
            limited: load(&s.limited),
            degraded: load(&s.degraded),
            store_errors: load(&s.store_errors),
            breaker_closed: self.breaker.state() == BreakerState::Closed,
            published: p.published + load(&s.outboxed) + recorded,
            dropped: p.dropped,
            buffered: p.buffered + held,
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
        if let Some(settler) = &self.settler {
            metrics::gauge!("ratelimit_events_in_doubt").set(settler.held() as f64);
            let stats = settler.stats();
            for (how, n) in [
                ("recorded", load(&stats.recorded)),
                ("published", load(&stats.published)),
                ("overflowed", load(&stats.overflowed)),
            ] {
                metrics::counter!("ratelimit_events_settled_total", "as" => how).absolute(n);
            }
            metrics::counter!("ratelimit_events_recorded_otherwise_total")
                .absolute(load(&stats.recorded_otherwise));
        }
    }
}
