//! The token bucket as a limit: [`crate::bucket`]'s decision, with refunds.

use std::time::Duration;

use super::{Evaluated, LimitState};
use crate::bucket::{BucketState, Policy};

pub(super) fn evaluate(
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
