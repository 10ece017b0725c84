//! The decision as the limiter answers and publishes it.

use domain::api::{CheckRequest, CheckResponse, LimitStatus};
use domain::event::{RuleHit, RuleOutcome};
use domain::limits::Outcome;
use domain::{Decision, Quota};

use super::plan::Plan;

/// A decision and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The request's decision, with the numbers of the limit closest to refusing (when
    /// refused: the enforced limit that refused with the longest wait).
    pub decision: Decision,
    /// Made by the local fallback because the shared store was unreachable.
    pub degraded: bool,
    /// Every limit that applied.
    pub limits: Vec<LimitStatus>,
    /// The window of the limit the decision's numbers come from.
    pub window: std::time::Duration,
    /// Some shadow limit would have refused the request.
    pub shadow_refused: bool,
}

impl Checked {
    /// The answer on the wire ([`CheckResponse`]).
    pub fn into_response(self) -> CheckResponse {
        let quota = self.decision.quota();
        CheckResponse {
            allowed: self.decision.is_allowed(),
            limit: quota.limit,
            remaining: quota.remaining,
            retry_after_ms: duration_ms_ceil(self.decision.retry_after()),
            reset_after_ms: duration_ms_ceil(quota.reset_after),
            window_ms: duration_ms_ceil(self.window),
            degraded: self.degraded,
            limits: self.limits,
        }
    }

    /// The decision of a request with every limit in `plan` and their `outcome`.
    pub(super) fn new(plan: &Plan, outcome: &Outcome, degraded: bool, cost: i64) -> Self {
        let limits: Vec<LimitStatus> = plan
            .limits
            .iter()
            .zip(&outcome.limits)
            .map(|(p, o)| LimitStatus {
                name: p.name.to_string(),
                algorithm: p.applied.spec.algorithm().name().to_owned(),
                descriptor: p.descriptor,
                limit: o.quota.limit,
                remaining: o.quota.remaining,
                reset_after_ms: duration_ms_ceil(o.quota.reset_after),
                retry_after_ms: if o.admits {
                    0
                } else {
                    duration_ms_ceil(o.retry_after)
                },
                window_ms: duration_ms_ceil(p.applied.spec.window()),
                refused: cost > 0 && !o.admits,
                shadow: p.applied.shadow,
            })
            .collect();
        let enforced = || {
            plan.limits
                .iter()
                .zip(&outcome.limits)
                .filter(|(p, _)| !p.applied.shadow)
        };
        let deciding = if outcome.allowed {
            enforced().min_by_key(|(_, o)| (o.quota.remaining, o.quota.limit))
        } else {
            enforced()
                .filter(|(_, o)| !o.admits)
                .max_by_key(|(_, o)| o.retry_after)
        };
        let (decision, window) = match deciding {
            Some((p, o)) if outcome.allowed => {
                (Decision::Allowed(o.quota), p.applied.spec.window())
            }
            Some((p, o)) => (
                Decision::Limited {
                    quota: o.quota,
                    retry_after: o.retry_after,
                },
                p.applied.spec.window(),
            ),
            // No enforced limit applied: allowed, with nothing to count down.
            None => (
                Decision::Allowed(Quota {
                    limit: 0,
                    remaining: 0,
                    reset_after: std::time::Duration::ZERO,
                }),
                std::time::Duration::ZERO,
            ),
        };
        Self {
            decision,
            degraded,
            shadow_refused: cost > 0 && limits.iter().any(|l| l.shadow && l.refused),
            limits,
            window,
        }
    }
}

/// What each limit made of a request, for the per-rule analytics; nothing for the
/// built-in rule alone (its counts are the global ones, and the default path stays lean).
pub(super) fn rule_hits(request: &CheckRequest, plan: &Plan, checked: &Checked) -> Vec<RuleHit> {
    if plan.builtin_only(&request.domain) {
        return Vec::new();
    }
    let allowed = checked.decision.is_allowed();
    checked
        .limits
        .iter()
        .filter_map(|l| {
            let outcome = match (l.shadow, l.refused, allowed) {
                (true, true, _) => RuleOutcome::ShadowBlocked,
                (_, false, true) => RuleOutcome::Allowed,
                (false, true, _) => RuleOutcome::Blocked,
                (_, false, false) => return None,
            };
            Some(RuleHit {
                rule: rule_name(&request.domain, &l.name),
                outcome,
            })
        })
        .collect()
}

/// A rule's name in the analytics, `domain:name`, built in place (once per limit of every
/// decision, without the formatting machinery).
pub(super) fn rule_name(domain: &str, name: &str) -> String {
    let mut rule = String::with_capacity(domain.len() + name.len() + 1);
    rule.push_str(domain);
    rule.push(':');
    rule.push_str(name);
    rule
}

/// Whole milliseconds, rounded up (a retry after the rounded time is still on time).
pub fn duration_ms_ceil(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}
