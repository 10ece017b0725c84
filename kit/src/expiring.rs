//! A bounded map whose entries hold until a deadline: what the refusal caches of the
//! limiter and the gateway keep their refusals in.
//!
//! Sharded (one lock each, held for a lookup or an insert, never across an `.await`). At
//! most `capacity` entries and `max_bytes` bytes (keys, values and what the values hold, as
//! the caller weighs them): a full shard first drops what has expired, and when nothing
//! has, the new entry is not kept; an entry heavier than [`MAX_ENTRY_BYTES`] is never
//! kept. So a client that sends endless new keys, or long ones, fills it at worst, and
//! then is simply not remembered.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shards of the map, each with its own lock.
const SHARDS: usize = 16;

/// The heaviest entry kept, in bytes (a refusal of 16 descriptors of long values is a few
/// KiB; past this it is asked of the store again rather than remembered).
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;

/// Bytes an entry is allowed on average when only a count is given (see
/// [`ExpiringMap::new`]).
pub const AVERAGE_ENTRY_BYTES: usize = 512;

struct Held<V> {
    until_us: u64,
    bytes: usize,
    value: V,
}

struct Shard<V> {
    entries: HashMap<String, Held<V>>,
    bytes: usize,
}

/// Entries that hold until a deadline (microseconds on the caller's clock).
pub struct ExpiringMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    per_shard: usize,
    bytes_per_shard: usize,
    /// Entries held (some may have expired); lets a caller skip the lookup when empty.
    len: AtomicUsize,
}

impl<V> ExpiringMap<V> {
    /// A map of at most `capacity` entries and `capacity` × [`AVERAGE_ENTRY_BYTES`] bytes.
    pub fn new(capacity: usize) -> Self {
        Self::bounded(capacity, capacity.saturating_mul(AVERAGE_ENTRY_BYTES))
    }

    /// A map of at most `capacity` entries and `max_bytes` bytes.
    pub fn bounded(capacity: usize, max_bytes: usize) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: HashMap::new(),
                        bytes: 0,
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            bytes_per_shard: max_bytes.div_ceil(SHARDS).max(1),
            len: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard<V>> {
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
        let held = shard.entries.get(key)?;
        if now_us >= held.until_us {
            return None;
        }
        read(&held.value)
    }

    /// Keeps `value` under `key` until `until_us` (replacing what was there), if there is
    /// room once what expired by `now_us` is dropped. `held_bytes` is what the value holds
    /// beyond itself (its vectors and strings); the entry weighs that, its key and the
    /// value itself.
    pub fn insert(&self, key: &str, value: V, held_bytes: usize, until_us: u64, now_us: u64) {
        if until_us <= now_us {
            return;
        }
        let bytes = key.len() + std::mem::size_of::<Held<V>>() + held_bytes;
        if bytes > MAX_ENTRY_BYTES {
            return;
        }
        let mut shard = self.shard(key);
        if let Some(old) = shard.entries.remove(key) {
            shard.bytes -= old.bytes;
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        if shard.entries.len() >= self.per_shard || shard.bytes + bytes > self.bytes_per_shard {
            let before = shard.entries.len();
            let mut freed = 0;
            shard.entries.retain(|_, h| {
                let keep = h.until_us > now_us;
                if !keep {
                    freed += h.bytes;
                }
                keep
            });
            shard.bytes -= freed;
            self.len
                .fetch_sub(before - shard.entries.len(), Ordering::Relaxed);
            if shard.entries.len() >= self.per_shard || shard.bytes + bytes > self.bytes_per_shard {
                return;
            }
        }
        shard.entries.insert(
            key.to_owned(),
            Held {
                until_us,
                bytes,
                value,
            },
        );
        shard.bytes += bytes;
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes held now (some entries may have expired).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).bytes)
            .sum()
    }

    /// Forgets `key`.
    pub fn remove(&self, key: &str) {
        if self.is_empty() {
            return;
        }
        let mut shard = self.shard(key);
        if let Some(old) = shard.entries.remove(key) {
            shard.bytes -= old.bytes;
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
        map.insert("k", 7, 0, 100, 0);
        assert_eq!(map.get("k", 99, |v| Some(*v)), Some(7));
        assert_eq!(map.get("k", 100, |v| Some(*v)), None);
        assert_eq!(map.get("other", 0, |v| Some(*v)), None);
        map.remove("k");
        assert!(map.is_empty());
        map.insert("past", 1, 0, 5, 5);
        assert!(map.is_empty(), "an entry already over is not kept");
    }

    #[test]
    fn it_is_bounded_and_makes_room_from_what_expired() {
        let map = ExpiringMap::new(32);
        for i in 0..10_000 {
            map.insert(&format!("k{i}"), i, 0, 1_000, 0);
        }
        assert!(map.len() <= 32, "{} entries", map.len());
        map.insert("late", 1, 0, 2_000, 1_000);
        assert_eq!(map.get("late", 1_500, |v| Some(*v)), Some(1));
    }

    /// Defect: bounded by count only, so long keys (16 descriptors of long values) made
    /// each entry kilobytes: now bounded by bytes too, and an entry past
    /// [`MAX_ENTRY_BYTES`] is never kept.
    #[test]
    fn it_is_bounded_by_bytes() {
        let map = ExpiringMap::bounded(100_000, 64 * 1024);
        let long = "k".repeat(2_000);
        for i in 0..10_000 {
            map.insert(&format!("{long}{i}"), i, 0, 1_000, 0);
        }
        assert!(map.bytes() <= 64 * 1024, "{} bytes", map.bytes());
        assert!(map.len() < 40, "{} entries", map.len());
        let huge = "k".repeat(MAX_ENTRY_BYTES);
        let small = ExpiringMap::new(10);
        small.insert(&huge, 1, 0, 1_000, 0);
        assert!(small.is_empty());
        small.insert("k", 1, 100, 1_000, 0);
        let one = small.bytes();
        small.insert("k", 2, 100, 1_000, 0);
        assert_eq!(small.bytes(), one, "a replaced entry is not counted twice");
        small.remove("k");
        assert_eq!(small.bytes(), 0);
    }
}
