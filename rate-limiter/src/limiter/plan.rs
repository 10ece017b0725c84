//! Which limits a request meets (the rules, else an override), and what the store is
//! asked for them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::api::{CheckError, CheckRequest};
use domain::descriptor::DEFAULT_DOMAIN;
use domain::keys::{DEFAULT_LIMIT_NAME, limit_key};
use domain::limits::{Applied, LimitOutcome, Outcome};
use domain::store::{LimitTake, Recording, RequestTake};
use domain::{Decision, Quota};

use super::{Checked, Limiter};

/// One limit of a planned request: its name, its descriptor and its numbers.
#[derive(Debug, Clone)]
pub(super) struct PlannedLimit {
    pub(super) name: Arc<str>,
    pub(super) descriptor: usize,
    pub(super) applied: Applied,
}

/// A request resolved against the rules: what the store decides, and what it means.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) take: RequestTake,
    pub(super) limits: Vec<PlannedLimit>,
}

impl Plan {
    /// Whether the plan is the built-in rule alone in the default domain, whose counts are
    /// the global ones (no per-rule analytics).
    pub(super) fn builtin_only(&self, domain: &str) -> bool {
        domain == DEFAULT_DOMAIN
            && matches!(self.limits.as_slice(), [only] if &*only.name == DEFAULT_LIMIT_NAME)
    }
}

impl Limiter {
    /// Resolves `request` against the rules in force: every limit that applies, keyed; an
    /// error when its cost is above what some enforced limit can ever admit.
    pub(super) fn plan(&self, request: &CheckRequest) -> Result<Plan, CheckError> {
        let plan = self.resolve(request);
        if request.cost > 0 {
            let cost = request.cost as u64;
            if let Some(p) = plan
                .limits
                .iter()
                .filter(|p| !p.applied.shadow && cost > p.applied.spec.limit())
                .min_by_key(|p| p.applied.spec.limit())
            {
                return Err(CheckError::cost_above_capacity(p.applied.spec.limit()));
            }
        }
        Ok(plan)
    }

    /// Refuses `request` without asking the store, because its cost is one the service
    /// will not honour: above what some enforced limit (rules and overrides alike) can
    /// ever admit, or above [`domain::api::MAX_COST`] (`never` is then true). Counted and published as
    /// any refusal; every limit whose capacity is below the cost is refused, with a wait of
    /// its window; the others are reported as spent, with nothing taken. Callers that must
    /// not let an error through (Envoy's default `failure_mode_deny: false`) answer this
    /// refusal instead of an error.
    pub fn refuse_unhonoured(&self, request: &CheckRequest, never: bool) -> Checked {
        let plan = self.resolve(request);
        let cost = request.cost.unsigned_abs();
        let limits: Vec<LimitOutcome> = plan
            .limits
            .iter()
            .map(|p| {
                let limit = p.applied.spec.limit();
                let window = p.applied.spec.window();
                let refuses = !p.applied.shadow && (never || cost > limit);
                LimitOutcome {
                    admits: !refuses,
                    quota: Quota {
                        limit,
                        remaining: 0,
                        reset_after: window,
                    },
                    retry_after: if refuses { window } else { Duration::ZERO },
                }
            })
            .collect();
        let outcome = Outcome {
            allowed: false,
            limits,
        };
        let mut checked = Checked::new(&plan, &outcome, false, request.cost);
        if checked.decision.is_allowed() {
            // No enforced limit applies, yet the cost is one the service does not honour.
            checked.decision = Decision::Limited {
                quota: Quota {
                    limit: 0,
                    remaining: 0,
                    reset_after: Duration::ZERO,
                },
                retry_after: Duration::ZERO,
            };
        }
        self.count(request, &plan, &checked, Instant::now(), Recording::No);
        checked
    }

    /// Every limit that applies to `request` under the rules and overrides in force, keyed.
    fn resolve(&self, request: &CheckRequest) -> Plan {
        let rules = self.rules.current();
        let mut matched = rules.resolve(&request.domain, &request.descriptors);
        if self.overrides.any() {
            let overrides = self.overrides.current();
            for (descriptor, rule) in request.descriptors.iter().zip(matched.iter_mut()) {
                if let Some(custom) = overrides.get(&request.domain, descriptor) {
                    *rule = Some(custom.clone());
                }
            }
        }
        let prefix = self.store.key_prefix();
        // Sized once: a vector grown from empty reallocates on its first push.
        let count = matched.iter().flatten().map(|rule| rule.limits.len()).sum();
        let mut plan = Plan {
            take: RequestTake {
                limits: Vec::with_capacity(count),
                cost: request.cost,
            },
            limits: Vec::with_capacity(count),
        };
        for (i, (descriptor, rule)) in request.descriptors.iter().zip(matched).enumerate() {
            let Some(rule) = rule else { continue };
            for limit in &rule.limits {
                let applied = Applied {
                    spec: limit.spec,
                    shadow: rule.shadow,
                };
                plan.take.limits.push(LimitTake {
                    key: limit_key(
                        prefix,
                        &request.domain,
                        descriptor,
                        &limit.name,
                        applied.spec.algorithm(),
                    ),
                    applied,
                });
                plan.limits.push(PlannedLimit {
                    name: Arc::from(limit.name.as_str()),
                    descriptor: i,
                    applied,
                });
            }
        }
        plan
    }
}
