//! The gateway's refusal cache: a refusal the limiter made is answered again here, with no
//! exchange, while it still holds; the refusal is then sent to the limiter in a later batch
//! to be counted (it publishes its event without asking Redis), so analytics stay exact.
//!
//! Why it is exact: the same argument as the limiter's (`rate_limiter::back::refusals`): a check
//! of cost `c` refused with a wait `w` cannot be admitted before the wait is over unless a
//! limit gained room other than by time. The wait travels in whole milliseconds rounded up,
//! so an entry holds until `sent + retry_after_ms - 2 ms` (the rounding, and the stores'
//! microsecond rounding of fractional tokens): never past the true end of the wait.
//!
//! Room gained otherwise (a rule or override change, a reset, a refund, through any
//! limiter) moves that limiter's generation, which every batch answer carries. An entry is
//! used only while the replica that refused it answers with the same generation and was
//! heard from within [`FRESH`]; an admin change forwarded by this gateway forgets everything
//! at once. So a change made anywhere reaches this cache within the limiters' poll of the
//! shared epoch (250 ms) plus one exchange, and a replica that went silent stops vouching
//! for its refusals after [`FRESH`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use domain::api::{CheckRequest, CheckResponse, Generation};
use kit::expiring::ExpiringMap;

/// How recently the refusing replica must have answered for its refusals to be used.
pub const FRESH: Duration = Duration::from_secs(1);

/// Taken off the wait the limiter gave (rounded up to whole milliseconds).
const MARGIN_MS: u64 = 2;

/// Most replicas whose generation is remembered (more: forget them all and start over).
const MAX_REPLICAS: usize = 1024;

struct Entry {
    cost: i64,
    sent_us: u64,
    replica: Arc<str>,
    generation: Generation,
    local_generation: u64,
    response: CheckResponse,
    /// The names of the limits that refused, for the limiter's count.
    limits: Vec<String>,
}

#[derive(Clone, Copy)]
struct Heard {
    generation: Generation,
    at_us: u64,
}

/// A refusal answered from the cache: what to answer, and what to send to be counted.
pub struct Hit {
    pub response: CheckResponse,
    pub limits: Vec<String>,
}

/// See the module documentation.
pub struct GatewayRefusals {
    entries: ExpiringMap<Entry>,
    epoch: Instant,
    replicas: RwLock<HashMap<Arc<str>, Heard>>,
    /// Bumped by admin changes this gateway forwards.
    local_generation: AtomicU64,
    hits: AtomicU64,
}

impl GatewayRefusals {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: ExpiringMap::new(capacity),
            epoch: Instant::now(),
            replicas: RwLock::new(HashMap::new()),
            local_generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// Microseconds on this process's monotonic clock.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Refusals answered from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Forgets every refusal (an admin change went through this gateway).
    pub fn invalidate(&self) {
        self.local_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Notes that `replica` answered under `generation`. Only forward: an answer under an
    /// earlier generation than the last one heard (a late answer, or a process that has
    /// since been replaced) neither sets the generation back nor vouches for anything.
    pub fn heard(&self, replica: &Arc<str>, generation: Generation) {
        let at_us = self.now_us();
        let mut replicas = self.replicas.write().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = replicas.get(replica)
            && generation < last.generation
        {
            return;
        }
        if replicas.len() >= MAX_REPLICAS && !replicas.contains_key(replica) {
            replicas.clear();
        }
        replicas.insert(replica.clone(), Heard { generation, at_us });
    }

    /// What identifies a check's decision: its domain and descriptors (the user id only
    /// names it in the analytics).
    fn key(request: &CheckRequest) -> String {
        // Separators that no key or value holds (the identity rule refuses control
        // characters).
        let mut key = String::with_capacity(64);
        key.push_str(&request.domain);
        for descriptor in &request.descriptors {
            key.push('\u{1c}');
            for entry in &descriptor.entries {
                key.push('\u{1d}');
                key.push_str(&entry.key);
                key.push('\u{1e}');
                key.push_str(&entry.value);
            }
        }
        key
    }

    /// The limiter's refusal of `request`, answered again, if one still holds.
    pub fn lookup(&self, request: &CheckRequest) -> Option<Hit> {
        if request.cost <= 0 || self.entries.is_empty() {
            return None;
        }
        let now_us = self.now_us();
        let local = self.local_generation.load(Ordering::Acquire);
        let hit = self.entries.get(&Self::key(request), now_us, |entry| {
            if entry.cost != request.cost || entry.local_generation != local {
                return None;
            }
            let heard = *self
                .replicas
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&entry.replica)?;
            let fresh = now_us.saturating_sub(heard.at_us) < FRESH.as_micros() as u64;
            (fresh && heard.generation == entry.generation).then(|| {
                let elapsed_ms = now_us.saturating_sub(entry.sent_us) / 1000;
                let mut response = entry.response.clone();
                let less = |ms: &mut u64| *ms = ms.saturating_sub(elapsed_ms).max(1);
                less(&mut response.retry_after_ms);
                response.reset_after_ms = response.reset_after_ms.saturating_sub(elapsed_ms);
                for limit in &mut response.limits {
                    if limit.refused {
                        less(&mut limit.retry_after_ms);
                    }
                    limit.reset_after_ms = limit.reset_after_ms.saturating_sub(elapsed_ms);
                }
                Hit {
                    response,
                    limits: entry.limits.clone(),
                }
            })
        })?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(hit)
    }

    /// Notes what `replica` (at `generation`) answered for `request`, sent at `sent_us`.
    pub fn record(
        &self,
        request: &CheckRequest,
        response: &CheckResponse,
        sent_us: u64,
        replica: &Arc<str>,
        generation: Generation,
    ) {
        if request.cost <= 0 {
            return;
        }
        if response.allowed {
            if !self.entries.is_empty() {
                self.entries.remove(&Self::key(request));
            }
            return;
        }
        // Only a refusal the shared store made, with no shadow limit (whose outcome is
        // reported and would go stale), and one that names what refused it.
        if response.degraded || response.limits.iter().any(|l| l.shadow) {
            return;
        }
        let limits: Vec<String> = response
            .limits
            .iter()
            .filter(|l| l.refused)
            .map(|l| l.name.clone())
            .collect();
        if limits.is_empty() || response.retry_after_ms <= MARGIN_MS {
            return;
        }
        let until_us = sent_us.saturating_add((response.retry_after_ms - MARGIN_MS) * 1000);
        let entry = Entry {
            cost: request.cost,
            sent_us,
            replica: replica.clone(),
            generation,
            local_generation: self.local_generation.load(Ordering::Acquire),
            response: response.clone(),
            limits,
        };
        // What the entry holds beyond itself: the answer's limits and their names.
        let held = entry
            .response
            .limits
            .iter()
            .map(|l| std::mem::size_of_val(l) + l.name.len() + l.algorithm.len())
            .sum::<usize>()
            + entry.limits.iter().map(|n| n.len() + 24).sum::<usize>();
        self.entries
            .insert(&Self::key(request), entry, held, until_us, self.now_us());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::api::LimitStatus;

    fn refused(retry_after_ms: u64) -> CheckResponse {
        CheckResponse {
            allowed: false,
            limit: 10,
            remaining: 0,
            retry_after_ms,
            reset_after_ms: 10_000,
            window_ms: 10_000,
            degraded: false,
            limits: vec![LimitStatus {
                name: "default".into(),
                algorithm: "token_bucket".into(),
                descriptor: 0,
                limit: 10,
                remaining: 0,
                reset_after_ms: 10_000,
                retry_after_ms,
                window_ms: 10_000,
                refused: true,
                shadow: false,
            }],
        }
    }

    /// Generation `counter` of the process of incarnation `life`.
    fn g(life: u64, counter: u64) -> Generation {
        Generation {
            incarnation: life,
            counter,
        }
    }

    #[test]
    fn a_refusal_holds_while_its_replica_vouches_for_it() {
        let cache = GatewayRefusals::new(100);
        let a: Arc<str> = Arc::from("http://a");
        let user = CheckRequest::user("mallory", 1);
        cache.heard(&a, g(1, 7));
        cache.record(&user, &refused(5_000), cache.now_us(), &a, g(1, 7));
        let hit = cache.lookup(&user).expect("held");
        assert!(!hit.response.allowed);
        assert!(hit.response.retry_after_ms <= 5_000 && hit.response.retry_after_ms > 4_000);
        assert_eq!(hit.limits, ["default"]);
        assert!(
            cache.lookup(&CheckRequest::user("mallory", 2)).is_none(),
            "another cost"
        );
        assert!(cache.lookup(&CheckRequest::user("alice", 1)).is_none());
        // The replica moved on: a rule, an override, a reset or a refund.
        cache.heard(&a, g(1, 8));
        assert!(cache.lookup(&user).is_none());
        cache.invalidate();
        assert!(
            cache.lookup(&user).is_none(),
            "an admin change here forgets all"
        );
        assert_eq!(cache.hits(), 1);
    }

    /// Defect: the generation was a per-process counter from 0, and the last answer heard
    /// set it, so a late answer set it back and a restarted limiter (counter 0 again)
    /// revived refusals its previous life had invalidated.
    #[test]
    fn late_answers_and_restarts_never_revive_a_refusal() {
        let cache = GatewayRefusals::new(100);
        let a: Arc<str> = Arc::from("http://a");
        let user = CheckRequest::user("mallory", 1);
        cache.heard(&a, g(1, 0));
        cache.record(&user, &refused(5_000), cache.now_us(), &a, g(1, 0));
        assert!(cache.lookup(&user).is_some());
        // A reset: generation 1; then the late answer of a batch sent before it.
        cache.heard(&a, g(1, 1));
        cache.heard(&a, g(1, 0));
        assert!(cache.lookup(&user).is_none(), "a late answer set it back");
        // The limiter restarts at the same address: counter 0 again, in a new life.
        cache.heard(&a, g(2, 0));
        assert!(cache.lookup(&user).is_none(), "a restart revived it");
        // Its previous life, heard late (or another pod behind the same address that
        // started earlier), vouches for nothing.
        cache.heard(&a, g(1, 0));
        assert!(cache.lookup(&user).is_none());
        // The new life's own refusals hold as usual.
        cache.record(&user, &refused(5_000), cache.now_us(), &a, g(2, 0));
        assert!(cache.lookup(&user).is_some());
    }

    #[test]
    fn degraded_shadow_and_admitted_answers_are_not_cached() {
        let cache = GatewayRefusals::new(100);
        let a: Arc<str> = Arc::from("http://a");
        let user = CheckRequest::user("u", 1);
        cache.heard(&a, g(1, 1));
        let mut degraded = refused(5_000);
        degraded.degraded = true;
        cache.record(&user, &degraded, cache.now_us(), &a, g(1, 1));
        let mut shadow = refused(5_000);
        shadow.limits[0].shadow = true;
        cache.record(&user, &shadow, cache.now_us(), &a, g(1, 1));
        assert!(cache.lookup(&user).is_none());
        cache.record(&user, &refused(5_000), cache.now_us(), &a, g(1, 1));
        assert!(cache.lookup(&user).is_some());
        let mut admitted = refused(0);
        admitted.allowed = true;
        cache.record(&user, &admitted, cache.now_us(), &a, g(1, 1));
        assert!(cache.lookup(&user).is_none(), "an admission forgets");
    }
}
