//! A bounded map whose entries hold until a deadline: what the refusal caches of the
//! limiter and the gateway keep their refusals in.
//!
//! Sharded (one lock each, held for a lookup or an insert, never across an `.await`). At
//! most `capacity` entries: a full shard first drops what has expired, and when nothing
//! has, the new entry is not kept. So a client that sends endless new keys fills it at
//! worst, and then is simply not remembered.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shards of the map, each with its own lock.
const SHARDS: usize = 16;

struct Held<V> {
    until_us: u64,
    value: V,
}

type Shard<V> = Mutex<HashMap<String, Held<V>>>;

/// Entries that hold until a deadline (microseconds on the caller's clock).
pub struct ExpiringMap<V> {
    shards: Box<[Shard<V>]>,
    per_shard: usize,
    /// Entries held (some may have expired); lets a caller skip the lookup when empty.
    len: AtomicUsize,
}

impl<V> ExpiringMap<V> {
    /// A map of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            len: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Held<V>>> {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        self.shards[hash as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What `read` makes of `key`'s entry, if one holds at `now_us`.
    pub fn get<R>(&self, key: &str, now_us: u64, read: impl FnOnce(&V) -> Option<R>) -> Option<R> {
        if self.is_empty() {
            return None;
        }
        let shard = self.shard(key);
        let held = shard.get(key)?;
        if now_us >= held.until_us {
            return None;
        }
        read(&held.value)
    }

    /// Keeps `value` under `key` until `until_us` (replacing what was there), if there is
    /// room once what expired by `now_us` is dropped.
    pub fn insert(&self, key: &str, value: V, until_us: u64, now_us: u64) {
        if until_us <= now_us {
            return;
        }
        let mut shard = self.shard(key);
        if let Some(held) = shard.get_mut(key) {
            *held = Held { until_us, value };
            return;
        }
        if shard.len() >= self.per_shard {
            let before = shard.len();
            shard.retain(|_, h| h.until_us > now_us);
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
            if shard.len() >= self.per_shard {
                return;
            }
        }
        shard.insert(key.to_owned(), Held { until_us, value });
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets `key`.
    pub fn remove(&self, key: &str) {
        if self.is_empty() {
            return;
        }
        if self.shard(key).remove(key).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_holds_until_its_deadline() {
        let map = ExpiringMap::new(10);
        map.insert("k", 7, 100, 0);
        assert_eq!(map.get("k", 99, |v| Some(*v)), Some(7));
        assert_eq!(map.get("k", 100, |v| Some(*v)), None);
        assert_eq!(map.get("other", 0, |v| Some(*v)), None);
        map.remove("k");
        assert!(map.is_empty());
        map.insert("past", 1, 5, 5);
        assert!(map.is_empty(), "an entry already over is not kept");
    }

    #[test]
    fn it_is_bounded_and_makes_room_from_what_expired() {
        let map = ExpiringMap::new(32);
        for i in 0..10_000 {
            map.insert(&format!("k{i}"), i, 1_000, 0);
        }
        assert!(map.len() <= 32, "{} entries", map.len());
        map.insert("late", 1, 2_000, 1_000);
        assert_eq!(map.get("late", 1_500, |v| Some(*v)), Some(1));
    }
}
