//! Requests decided elsewhere and reported here: Envoy's rate limit quota filter admits and
//! denies on its own, from the assignment the limiter sent ([`crate::front::rlqs`]), and reports
//! how many. What it admitted is spent from the same limits as any request, and counted
//! and published as the limiter's own decisions are.

use std::sync::atomic::Ordering;

use domain::RateLimitEvent;
use domain::api::CheckRequest;
use domain::descriptor::DEFAULT_DOMAIN;
use domain::event::{RuleHit, RuleOutcome, SCHEMA_VERSION};
use domain::limits::Outcome;

use domain::api::CheckError;

use super::checked::rule_name;
use super::{Checked, Limiter};
use crate::back::resilience::Verdict;

impl Limiter {
    /// Spends `request.cost` requests already admitted elsewhere from every limit that
    /// applies to `request`, at most what its enforced limits have left (what was admitted
    /// beyond is lost: the limit is spent either way), without an event. Returns the limits
    /// as they stand after: none when no limit applies (no rule, `unlimited`).
    pub async fn spend_admitted(&self, request: &CheckRequest) -> Result<Checked, CheckError> {
        let mut look = request.clone();
        look.cost = 0;
        let mut plan = self.plan(&look)?;
        if plan.limits.is_empty() {
            let none = Outcome {
                allowed: true,
                limits: Vec::new(),
            };
            return Ok(Checked::new(&plan, &none, false, 0));
        }
        let mut reply = self.call_store(vec![plan.take.clone()]).await;
        let seen = self.decided(
            &plan,
            reply.verdicts.pop().unwrap_or(Verdict::Unavailable),
            0,
        )?;
        let left = seen
            .limits
            .iter()
            .filter(|l| !l.shadow)
            .map(|l| l.remaining)
            .min();
        let cost = match left {
            Some(left) => request.cost.min(i64::try_from(left).unwrap_or(i64::MAX)),
            // Shadow limits only: all of it, so they see what they would have refused.
            None => request.cost,
        };
        if cost <= 0 {
            return Ok(seen);
        }
        plan.take.cost = cost;
        let mut reply = self.call_store(vec![plan.take.clone()]).await;
        let spent = self.decided(
            &plan,
            reply.verdicts.pop().unwrap_or(Verdict::Unavailable),
            cost,
        )?;
        // Refused: another replica spent the rest in between; the limits are spent anyway.
        Ok(if spent.decision.is_allowed() {
            spent
        } else {
            seen
        })
    }

    /// Counts and publishes `allowed` and `denied` requests of `request` decided elsewhere
    /// (one event for each that is not zero, standing for that many requests: its
    /// `count`), against the limits in `checked` (from [`Limiter::spend_admitted`]).
    pub fn count_reported(
        &self,
        request: &CheckRequest,
        checked: &Checked,
        allowed: u64,
        denied: u64,
    ) {
        self.stats.allowed.fetch_add(allowed, Ordering::Relaxed);
        self.stats.limited.fetch_add(denied, Ordering::Relaxed);
        if checked.shadow_refused {
            self.stats.shadow_refused.fetch_add(1, Ordering::Relaxed);
        }
        for (admitted, count) in [(true, allowed), (false, denied)] {
            if count == 0 {
                continue;
            }
            let rules = if checked.limits.is_empty() {
                Vec::new()
            } else {
                checked
                    .limits
                    .iter()
                    .map(|l| RuleHit {
                        rule: rule_name(&request.domain, &l.name),
                        outcome: match (admitted, l.shadow, l.refused) {
                            (true, true, true) => RuleOutcome::ShadowBlocked,
                            (true, _, _) => RuleOutcome::Allowed,
                            (false, _, _) => RuleOutcome::Blocked,
                        },
                    })
                    .collect()
            };
            self.publisher.publish(RateLimitEvent {
                schema_version: SCHEMA_VERSION,
                user_id: request.user_id.clone(),
                allowed: admitted,
                // Envoy's filter spends one token a request (it has no cost per request).
                cost: 1,
                count,
                ts_ms: self.clock.now_ms(),
                limiter_id: self.instance_id.clone(),
                degraded: checked.degraded,
                domain: (request.domain != DEFAULT_DOMAIN).then(|| request.domain.clone()),
                rules,
                stamp: None,
            });
        }
    }
}
