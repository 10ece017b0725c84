//! The embedded bucket store: a sharded concurrent map (no global lock on the hot path).
//!
//! A bucket that has refilled completely decides exactly like a missing one, so the sweeper
//! drops it: memory is bounded by the users active within one refill period.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ratelimit_domain::bucket::decide;
use ratelimit_domain::{BucketState, Clock, Decision, Policy};
use tokio_util::sync::CancellationToken;

use super::{BucketStore, StoreError};

/// Token buckets in this process's memory.
///
/// As the limiter's fail-open fallback it holds a share of the policy: the policy divided
/// by the limiter instances that share it (`parts`, changed as instances come and go), and
/// it can be seeded with what the shared store last said of a user, so that an outage does
/// not hand an exhausted user a full bucket.
pub struct MemoryStore {
    /// The whole policy (what [`BucketStore::policy`] reports).
    policy: Policy,
    /// The share each bucket gets: `policy` divided by `parts`.
    parts: AtomicU64,
    clock: Arc<dyn Clock>,
    buckets: DashMap<Box<str>, BucketState>,
}

impl MemoryStore {
    pub fn new(policy: Policy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            parts: AtomicU64::new(1),
            clock,
            buckets: DashMap::new(),
        }
    }

    /// The policy each bucket follows: the whole one divided by the current parts.
    fn share(&self) -> Policy {
        match self.parts.load(Ordering::Relaxed) {
            0 | 1 => self.policy,
            parts => self.policy.divided(parts),
        }
    }

    /// Gives each bucket `1 / parts` of the policy from now on (at least 1 part).
    pub fn set_parts(&self, parts: u64) {
        let parts = parts.max(1);
        if self.parts.swap(parts, Ordering::Relaxed) != parts {
            tracing::info!(parts, "fail-open share of the policy changed");
        }
    }

    /// The current divisor of the policy.
    pub fn parts(&self) -> u64 {
        self.parts.load(Ordering::Relaxed).max(1)
    }

    /// Records that the shared store last left `user_id` with `remaining` of the whole
    /// policy's tokens, now: its bucket here starts from that share (`remaining / parts`,
    /// refilling from now) instead of full. A bucket already lower is left as it is.
    pub fn seed(&self, user_id: &str, remaining: u64) {
        let share = self.share();
        let tokens = (remaining as f64 / self.parts() as f64).min(share.capacity() as f64);
        let now = self.clock.now_us();
        let seeded = BucketState {
            tokens,
            updated_us: now,
        };
        match self.buckets.get_mut(user_id) {
            Some(mut state) => {
                if tokens < state.tokens_at(now, &share) {
                    *state = seeded;
                }
            }
            None => {
                self.buckets.insert(Box::from(user_id), seeded);
            }
        }
    }

    /// Buckets currently held (not yet refilled completely, or not yet swept).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Drops every bucket that is full by now and returns how many were dropped. Gives the
    /// map's memory back when it has shrunk a lot.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_us();
        let before = self.buckets.len();
        let share = self.share();
        self.buckets
            .retain(|_, state| !state.is_full_at(now, &share));
        let after = self.buckets.len();
        if after < self.buckets.capacity() / 4 {
            self.buckets.shrink_to_fit();
        }
        before - after
    }

    /// Sweeps every `interval` until `shutdown`.
    pub fn spawn_sweeper(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(store) = store.upgrade() else { return };
                // retain() walks a million buckets in tens of milliseconds: off the runtime.
                let dropped = tokio::task::spawn_blocking(move || store.sweep())
                    .await
                    .unwrap_or(0);
                if dropped > 0 {
                    tracing::debug!(dropped, "swept full buckets");
                }
            }
        });
    }

    /// The synchronous core of [`BucketStore::take`]; it never fails.
    pub fn take_now(&self, user_id: &str, cost: u64) -> Decision {
        let now = self.clock.now_us();
        let policy = self.share();
        if let Some(mut state) = self.buckets.get_mut(user_id) {
            let (decision, next) = decide(Some(*state), now, &policy, cost);
            *state = next;
            return decision;
        }
        match self.buckets.entry(Box::from(user_id)) {
            Entry::Occupied(mut e) => {
                let (decision, next) = decide(Some(*e.get()), now, &policy, cost);
                *e.get_mut() = next;
                decision
            }
            Entry::Vacant(e) => {
                let (decision, next) = decide(None, now, &policy, cost);
                e.insert(next);
                decision
            }
        }
    }
}

#[async_trait]
impl BucketStore for MemoryStore {
    fn policy(&self) -> &Policy {
        &self.policy
    }

    async fn take(&self, user_id: &str, cost: u64) -> Result<Decision, StoreError> {
        Ok(self.take_now(user_id, cost))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn is_remote(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratelimit_domain::ManualClock;

    fn store(capacity: u64, rate: f64) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(Policy::new(capacity, rate).unwrap(), clock.clone());
        (clock, store)
    }

    #[tokio::test]
    async fn passes_the_contract_suite() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        super::super::contract::run_all(|policy| {
            let clock = clock.clone();
            async move {
                let store: Arc<dyn BucketStore> = Arc::new(MemoryStore::new(policy, clock.clone()));
                (store, super::super::contract::Advance::Manual(clock))
            }
        })
        .await;
    }

    #[test]
    fn sweep_forgets_only_full_buckets() {
        let (clock, store) = store(10, 1.0);
        store.take_now("a", 1);
        store.take_now("b", 5);
        assert_eq!(store.sweep(), 0);
        clock.advance_us(1_000_000);
        assert_eq!(store.sweep(), 1);
        assert_eq!(store.len(), 1);
        // b is still 4 tokens short: forgetting it now would hand out a free token.
        assert_eq!(store.take_now("b", 1).quota().remaining, 5);
    }

    #[test]
    fn concurrent_takes_never_overdraw() {
        let (_clock, store) = store(1000, 0.001);
        let store = Arc::new(store);
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..600 {
                        if store.take_now("hot", 1).is_allowed() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 1000);
    }
}
