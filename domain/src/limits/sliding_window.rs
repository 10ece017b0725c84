//! The sliding window, estimated Cloudflare's way: the previous window's count weighted by
//! its overlap with the last window, plus the current count.

use std::time::Duration;

use super::{Evaluated, LimitState};

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

pub(super) fn evaluate(
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
