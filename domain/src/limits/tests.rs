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
    assert!(LimitSpec::new(Algorithm::FixedWindow, 1, Duration::from_micros(10), None).is_err());
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
    let LimitSpec::TokenBucket(p) = LimitSpec::new(Algorithm::TokenBucket, 1, w, Some(10)).unwrap()
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
                Applied { spec: LimitSpec::SlidingWindow(Window { requests, window_us: w }), shadow: false }
            } else {
                Applied { spec: LimitSpec::FixedWindow(Window { requests, window_us: w }), shadow: false }
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

proptest! {
    /// `decide_one` is `decide_all` for one limit: the same outcome and the same write,
    /// whatever the algorithm, shadow mode, traffic and costs (refunds and peeks included).
    #[test]
    fn decide_one_is_decide_all_of_one(
        kind in 0usize..3,
        requests in 1u64..20,
        window_secs in 1u64..10,
        shadow in any::<bool>(),
        steps in proptest::collection::vec((0u64..3_000_000, -3i64..5), 1..60),
    ) {
        let mut applied = match kind {
            0 => fixed(requests, window_secs),
            1 => sliding(requests, window_secs),
            _ => bucket(requests, window_secs, None),
        };
        applied.shadow = shadow;
        let mut state = None;
        let mut now = 10 * window_secs * SEC;
        for &(dt, cost) in &steps {
            now += dt;
            let (all, writes) = decide_all(&[state], now, &[applied], cost);
            let (one, write) = decide_one(state, now, &applied, cost);
            prop_assert_eq!(&one, &all);
            prop_assert_eq!(write, writes[0]);
            if let Some(w) = write {
                state = Some(w);
            }
        }
    }
}
