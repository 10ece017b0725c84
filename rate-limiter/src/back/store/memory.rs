//! The embedded limit store: a map split into shards, each behind its own lock (no global
//! lock on the hot path). A request's limits are decided together under the locks of the
//! shards their keys fall in, taken in shard order, so several limits are all or nothing
//! here as in the Redis script.
//!
//! Every state is kept until the time after which forgetting it changes nothing (a full
//! bucket, a window that ended), like the expiry the Redis store sets; the sweeper drops
//! what is past it, so memory is bounded by the keys active within one window.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use domain::limits::{Applied, LimitSpec, LimitState, Outcome, Window, decide_all, decide_one};
use domain::store::{Decided, LimitTake, RequestTake};
use domain::{Clock, Decision, Policy, keys};
use tokio_util::sync::CancellationToken;

use super::{BucketStore, StoreError};

const SHARDS: usize = 64;

/// One limit's state and the time after which it can be forgotten.
#[derive(Debug, Clone, Copy)]
struct Slot {
    state: LimitState,
    expires_us: u64,
}

type Shard = HashMap<Box<str>, Slot>;

/// Limit states in this process's memory.
///
/// As the limiter's fail-open fallback it holds a share of each limit: the limit divided
/// by the limiter instances that share it (`parts`, changed as instances come and go), and
/// it can be seeded with what the shared store last said of a key, so that an outage does
/// not hand an exhausted user a full allowance.
pub struct MemoryStore {
    /// The built-in policy (what [`BucketStore::policy`] reports).
    policy: Policy,
    parts: AtomicU64,
    clock: Arc<dyn Clock>,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl MemoryStore {
    pub fn new(policy: Policy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            parts: AtomicU64::new(1),
            clock,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard_of(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock leaves plain data behind: keep using it.
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The share of `spec` each key here gets: the whole divided by the current parts.
    fn share(&self, applied: Applied) -> Applied {
        match self.parts.load(Ordering::Relaxed) {
            0 | 1 => applied,
            parts => Applied {
                spec: applied.spec.divided(parts),
                ..applied
            },
        }
    }

    /// Gives each limit `1 / parts` of its numbers from now on (at least 1 part).
    pub fn set_parts(&self, parts: u64) {
        let parts = parts.max(1);
        if self.parts.swap(parts, Ordering::Relaxed) != parts {
            tracing::info!(parts, "fail-open share of the limits changed");
        }
    }

    /// The current divisor of the limits.
    pub fn parts(&self) -> u64 {
        self.parts.load(Ordering::Relaxed).max(1)
    }

    /// Records that the shared store last left the limit `spec` under `key` with
    /// `remaining` of the whole limit: its state here starts from that share
    /// (`remaining / parts`) instead of a fresh one. A state already lower is left as it is.
    pub fn seed(&self, key: &str, spec: &LimitSpec, remaining: u64) {
        let parts = self.parts();
        let share = spec.divided(parts);
        let now = self.clock.now_us();
        let left = remaining / parts;
        let seeded = match share {
            LimitSpec::TokenBucket(p) => LimitState::Bucket(domain::BucketState {
                tokens: (left as f64).min(p.capacity() as f64),
                updated_us: now,
            }),
            LimitSpec::FixedWindow(Window {
                requests,
                window_us,
            }) => LimitState::Fixed {
                window_start_us: now - now % window_us,
                count: requests.saturating_sub(left),
            },
            LimitSpec::SlidingWindow(Window {
                requests,
                window_us,
            }) => LimitState::Sliding {
                window_start_us: now - now % window_us,
                count: requests.saturating_sub(left),
                previous: 0,
            },
        };
        let applied = Applied {
            spec: share,
            shadow: false,
        };
        let mut shard = self.lock(self.shard_of(key));
        let current = shard
            .get(key)
            .filter(|slot| slot.expires_us > now)
            .map(|slot| slot.state);
        let peek = |state: Option<LimitState>| {
            decide_one(state, now, &applied, 0).0.limits[0]
                .quota
                .remaining
        };
        if current.is_none() || peek(Some(seeded)) < peek(current) {
            let expires_us = now.saturating_add(share.keep_for_us(&seeded, now));
            shard.insert(
                Box::from(key),
                Slot {
                    state: seeded,
                    expires_us,
                },
            );
        }
    }

    /// States currently held (not yet past their time, or not yet swept).
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every state past its time and returns how many were dropped. Gives a
    /// shard's memory back when it has shrunk a lot.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_us();
        let mut dropped = 0;
        for i in 0..SHARDS {
            let mut shard = self.lock(i);
            let before = shard.len();
            shard.retain(|_, slot| slot.expires_us > now);
            dropped += before - shard.len();
            // Shrunk to a quarter or less: give the table back. (Not `capacity()`: after a
            // mass removal the table's tombstones make it report almost none.)
            if shard.len() * 4 <= before && before > 0 {
                shard.shrink_to_fit();
            }
        }
        dropped
    }
    /// Sweeps every `interval` until `shutdown`.
    pub fn spawn_sweeper(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = kit::every::Every::new(interval, shutdown);
            while every.tick().await {
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

    /// Decides one request against its limits, all or nothing, under the locks of the
    /// shards its keys fall in (taken in shard order, so two requests never wait on each
    /// other in a cycle). It never fails.
    pub fn decide_now(&self, request: &RequestTake) -> Outcome {
        if let [limit] = request.limits.as_slice() {
            return self.decide_one(limit, request.cost);
        }
        let now = self.clock.now_us();
        let applied: Vec<Applied> = request
            .limits
            .iter()
            .map(|l| self.share(l.applied))
            .collect();
        let shard_of: Vec<usize> = request
            .limits
            .iter()
            .map(|l| self.shard_of(&l.key))
            .collect();
        let mut order = shard_of.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, self.lock(i))).collect();
        let guard_of = |shard: usize| order.binary_search(&shard).expect("locked");
        let states: Vec<Option<LimitState>> = request
            .limits
            .iter()
            .zip(&shard_of)
            .map(|(l, &s)| {
                guards[guard_of(s)]
                    .1
                    .get(l.key.as_str())
                    .filter(|slot| slot.expires_us > now)
                    .map(|slot| slot.state)
            })
            .collect();
        let (outcome, writes) = decide_all(&states, now, &applied, request.cost);
        for ((limit, &s), (write, a)) in request
            .limits
            .iter()
            .zip(&shard_of)
            .zip(writes.into_iter().zip(&applied))
        {
            let shard = &mut guards[guard_of(s)].1;
            if let Some(state) = write {
                let expires_us = now.saturating_add(a.spec.keep_for_us(&state, now));
                match shard.get_mut(limit.key.as_str()) {
                    Some(slot) => *slot = Slot { state, expires_us },
                    None => {
                        shard.insert(Box::from(limit.key.as_str()), Slot { state, expires_us });
                    }
                }
            } else if request.cost > 0
                && let Some(slot) = shard
                    .get_mut(limit.key.as_str())
                    .filter(|slot| slot.expires_us > now)
            {
                // Kept as it is (refused): not forgotten before it would be full at the
                // limit in force now (a slower refill since it was written).
                let keep = now.saturating_add(a.spec.keep_for_us(&slot.state, now));
                slot.expires_us = slot.expires_us.max(keep);
            }
        }
        outcome
    }

    /// [`MemoryStore::decide_now`] for a request with one limit (the usual one): the same
    /// decision and the same writes, under the one lock, with one lookup of the key and
    /// without the vectors that order the locks of several.
    fn decide_one(&self, limit: &LimitTake, cost: i64) -> Outcome {
        let now = self.clock.now_us();
        let applied = self.share(limit.applied);
        let keep_for =
            |state: &LimitState| now.saturating_add(applied.spec.keep_for_us(state, now));
        let key = limit.key.as_str();
        let mut shard = self.lock(self.shard_of(key));
        match shard.get_mut(key) {
            Some(slot) => {
                let state = (slot.expires_us > now).then_some(slot.state);
                let (outcome, write) = decide_one(state, now, &applied, cost);
                if let Some(state) = write {
                    *slot = Slot {
                        state,
                        expires_us: keep_for(&state),
                    };
                } else if cost > 0 && slot.expires_us > now {
                    // Kept as it is (refused): as in the general case.
                    slot.expires_us = slot.expires_us.max(keep_for(&slot.state));
                }
                outcome
            }
            None => {
                let (outcome, write) = decide_one(None, now, &applied, cost);
                if let Some(state) = write {
                    shard.insert(
                        Box::from(key),
                        Slot {
                            state,
                            expires_us: keep_for(&state),
                        },
                    );
                }
                outcome
            }
        }
    }

    /// Forgets the states under `keys`.
    pub fn forget(&self, keys: &[String]) {
        for key in keys {
            self.lock(self.shard_of(key)).remove(key.as_str());
        }
    }

    /// A user's bucket of the built-in policy: the test suite's `TakeExt::take` without the future.
    pub fn take_now(&self, user_id: &str, cost: u64) -> Decision {
        self.decide_now(&RequestTake::bucket(
            keys::bucket_key("", user_id),
            self.policy,
            cost,
        ))
        .single_decision()
    }
}

#[async_trait]
impl BucketStore for MemoryStore {
    fn policy(&self) -> &Policy {
        &self.policy
    }

    fn key_prefix(&self) -> &str {
        ""
    }

    async fn decide_many(&self, requests: &[RequestTake]) -> Result<Vec<Decided>, StoreError> {
        Ok(requests.iter().map(|r| Ok(self.decide_now(r))).collect())
    }

    /// No outbox here: [`BucketStore::decide_many`], each answer marked as not recorded,
    /// made in one pass (the provided method awaits a boxed `decide_many` and copies its
    /// answers into a second vector).
    async fn decide_recorded(
        &self,
        requests: &[RequestTake],
        _events: &[Option<domain::event::EventTemplate>],
        _names: domain::store::CallNames<'_>,
    ) -> Result<Vec<(Decided, domain::store::Recording)>, StoreError> {
        Ok(requests
            .iter()
            .map(|r| (Ok(self.decide_now(r)), domain::store::Recording::No))
            .collect())
    }

    async fn reset(&self, keys: &[String]) -> Result<(), StoreError> {
        self.forget(keys);
        Ok(())
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
    use domain::ManualClock;

    fn store(capacity: u64, rate: f64) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = MemoryStore::new(Policy::new(capacity, rate).unwrap(), clock.clone());
        (clock, store)
    }

    /// The contract suite, one test per check.
    mod contract {
        use super::*;

        crate::bucket_store_contract!(Arc::new(ManualClock::new(1_000_000)), |clock, policy| {
            let clock = clock.clone();
            async move {
                let store: Arc<dyn BucketStore> = Arc::new(MemoryStore::new(policy, clock.clone()));
                (store, crate::back::store::contract::Advance::Manual(clock))
            }
        });
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

    /// Defect: a refused bucket kept the expiry written at the old rate; after a change to
    /// a slower refill it was forgotten early and came back full.
    #[tokio::test]
    async fn a_slower_refill_keeps_the_count() {
        use domain::limits::{Algorithm, Applied, LimitSpec};
        use domain::store::{LimitTake, RequestTake};
        let (clock, store) = store(10, 10.0);
        let take = |per_secs: u64, cost: i64| RequestTake {
            limits: vec![LimitTake {
                key: "k".into(),
                applied: Applied {
                    spec: LimitSpec::new(
                        Algorithm::TokenBucket,
                        10,
                        Duration::from_secs(per_secs),
                        None,
                    )
                    .unwrap(),
                    shadow: false,
                },
            }],
            cost,
        };
        let decide = |t| {
            let store = &store;
            async move {
                store
                    .decide_many(&[t])
                    .await
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap()
            }
        };
        // 10 a second: spent in full, written to expire in 1 s.
        assert!(decide(take(1, 10)).await.allowed);
        // Now 10 every 100 s (0.1 a second): refused, and kept until it would be full.
        assert!(!decide(take(100, 5)).await.allowed);
        clock.advance_us(2_000_000);
        store.sweep();
        let after = decide(take(100, 5)).await;
        assert!(!after.allowed, "it came back full: {after:?}");
        assert_eq!(after.limits[0].quota.remaining, 0, "0.2 tokens after 2 s");
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

    /// Two limits shared by concurrent requests in different orders: never more than either
    /// admits, and no deadlock.
    #[test]
    fn concurrent_multi_limit_requests_stay_all_or_nothing() {
        use domain::limits::Algorithm;
        use domain::store::LimitTake;
        let (_clock, store) = store(10, 1.0);
        let store = Arc::new(store);
        let limit = |key: &str, requests: u64| LimitTake {
            key: key.into(),
            applied: Applied {
                spec: LimitSpec::new(
                    Algorithm::FixedWindow,
                    requests,
                    Duration::from_secs(3600),
                    None,
                )
                .unwrap(),
                shadow: false,
            },
        };
        let ab = RequestTake {
            limits: vec![limit("a", 300), limit("b", 500)],
            cost: 1,
        };
        let ba = RequestTake {
            limits: vec![limit("b", 500), limit("a", 300)],
            cost: 1,
        };
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for i in 0..4 {
                let request = if i % 2 == 0 { &ab } else { &ba };
                let (store, admitted) = (&store, &admitted);
                s.spawn(move || {
                    for _ in 0..200 {
                        if store.decide_now(request).allowed {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 300);
        let peek = store.decide_now(&RequestTake {
            limits: vec![limit("a", 300), limit("b", 500)],
            cost: 0,
        });
        let remaining: Vec<u64> = peek.limits.iter().map(|l| l.quota.remaining).collect();
        assert_eq!(remaining, [0, 200], "b spent only with a");
    }
}
