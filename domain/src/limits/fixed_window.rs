//! The fixed window: a count per window aligned to the Unix epoch.

use std::time::Duration;

use super::{Evaluated, LimitState};

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

pub(super) fn evaluate(
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
