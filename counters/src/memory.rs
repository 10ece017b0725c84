//! Counters in this process's memory (the embedded default).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use domain::analytics::UserAnalytics;

use domain::analytics::{
    AnalyticsReader, BlockedUser, CounterError, CounterStore, DAY_MS, MAX_COUNTED_RULES, MINUTE_MS,
    MinuteCounts, PartitionBatch, RuleCounts, TOP_KEEP, TOP_WINDOW_MINUTES,
};

use crate::tally::{Minutes, fill_series, global_tally, sorted_rules, top_n};

#[derive(Debug, Default)]
struct UserCounters {
    allowed: u64,
    blocked: u64,
    /// Timestamp of the user's latest decision: the least recent go first at the cap.
    last_ms: u64,
    /// Last number counted, per partition and dedup stream (publisher epoch, or offsets),
    /// the most recently begun last; at most [`STREAMS_KEPT`].
    applied: Vec<(Stream, i64)>,
    /// (minute, allowed, blocked), oldest first, within the retention.
    minutes: VecDeque<(u64, u64, u64)>,
}

/// A partition and the epoch its numbers belong to (`None`: its offsets).
type Stream = (i32, Option<Box<str>>);

/// Dedup streams remembered per user and globally: older ones are forgotten (a replay of
/// their events would count again), so restarts do not grow the records.
const STREAMS_KEPT: usize = 16;

/// Everyone's counts over time, with the last number applied per stream.
#[derive(Debug, Default)]
struct Global {
    applied: Vec<(Stream, i64)>,
    minutes: Minutes,
    top_minutes: BTreeMap<u64, HashMap<Box<str>, u64>>,
    top_days: BTreeMap<u64, HashMap<Box<str>, u64>>,
    rules: HashMap<String, [u64; 3]>,
}

/// Adds a stream's first number, forgetting the least recently begun stream past
/// [`STREAMS_KEPT`].
fn remember(applied: &mut Vec<(Stream, i64)>, stream: Stream, number: i64) {
    if applied.len() >= STREAMS_KEPT {
        applied.remove(0);
    }
    applied.push((stream, number));
}

/// Keeps exactly the `TOP_KEEP` most blocked (ties by user id) once a set has grown to
/// twice that, so a set never holds more than `2 * TOP_KEEP` users, however many tie
/// (before, every user tied at the cut was kept: a million ids blocked once each stayed).
fn trim(set: &mut HashMap<Box<str>, u64>) {
    if set.len() > 2 * TOP_KEEP {
        let mut entries: Vec<(Box<str>, u64)> = set.drain().collect();
        entries.select_nth_unstable_by(TOP_KEEP - 1, |a, b| {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        });
        entries.truncate(TOP_KEEP);
        set.extend(entries);
    }
}

/// Per-user counters in memory, for at most `max_users` distinct users, so a client cannot
/// grow the map without bound. At the cap a new user is still counted: the least recently
/// active 1 % of the users are forgotten to make room (their all-time counts start again
/// from zero if they come back), so a flood of throwaway ids evicts idle users and itself,
/// never locking real users out.
pub struct MemoryCounters {
    users: DashMap<Box<str>, UserCounters>,
    global: Mutex<Global>,
    max_users: usize,
    /// Distinct users held.
    user_count: AtomicUsize,
    retention_minutes: u64,
    evicted: AtomicU64,
}

impl MemoryCounters {
    pub fn new(max_users: usize, retention: Duration) -> Self {
        Self {
            users: DashMap::new(),
            global: Mutex::default(),
            max_users,
            user_count: AtomicUsize::new(0),
            retention_minutes: (retention.as_millis() as u64 / MINUTE_MS).max(1),
            evicted: AtomicU64::new(0),
        }
    }

    /// Users forgotten so far to make room at the cap.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Forgets the least recently active 1 % of the users (at least one). One pass over the
    /// map, run once per 1 % of the cap in new users.
    fn evict_idle(&self) {
        let quota = (self.max_users / 100).max(1);
        let mut last: Vec<u64> = self.users.iter().map(|u| u.last_ms).collect();
        if last.is_empty() {
            return;
        }
        let nth = quota.min(last.len()) - 1;
        let cutoff = *last.select_nth_unstable(nth).1;
        let mut removed = 0usize;
        self.users.retain(|_, u| {
            let evict = removed < quota && u.last_ms <= cutoff;
            removed += usize::from(evict);
            !evict
        });
        self.user_count.fetch_sub(removed, Ordering::Relaxed);
        let total = self.evicted.fetch_add(removed as u64, Ordering::Relaxed) + removed as u64;
        tracing::info!(
            max_users = self.max_users,
            evicted = removed,
            evicted_total = total,
            "analytics user cap reached; the least recently active users were forgotten"
        );
    }

    fn apply_users(&self, batch: &PartitionBatch) {
        for (offset, event) in &batch.events {
            // A known user is found by the borrowed id: its key is copied only for a new one.
            let mut entry = match self.users.get_mut(event.user_id.as_str()) {
                Some(entry) => entry,
                None => {
                    // The count, not `DashMap::len` (which visits every shard), per new user.
                    if self.user_count.load(Ordering::Relaxed) >= self.max_users {
                        self.evict_idle();
                    }
                    self.users
                        .entry(Box::from(event.user_id.as_str()))
                        .or_insert_with(|| {
                            self.user_count.fetch_add(1, Ordering::Relaxed);
                            UserCounters::default()
                        })
                }
            };
            entry.last_ms = entry.last_ms.max(event.ts_ms);
            if let Some(partition) = batch.partition {
                let epoch = batch.epoch.as_deref();
                match entry
                    .applied
                    .iter_mut()
                    .find(|((p, e), _)| *p == partition && e.as_deref() == epoch)
                {
                    Some((_, applied)) if *applied >= *offset => continue,
                    Some((_, applied)) => *applied = *offset,
                    None => remember(
                        &mut entry.applied,
                        (partition, epoch.map(Box::from)),
                        *offset,
                    ),
                }
            }
            let minute = event.ts_ms / MINUTE_MS;
            let (a, b) = event.requests();
            entry.allowed += a;
            entry.blocked += b;
            // Events arrive almost in time order; a late one is placed where it belongs.
            let minutes = &mut entry.minutes;
            match minutes.iter().rposition(|(m, _, _)| *m <= minute) {
                Some(i) if minutes[i].0 == minute => {
                    minutes[i].1 += a;
                    minutes[i].2 += b;
                }
                Some(i) => minutes.insert(i + 1, (minute, a, b)),
                None => minutes.push_front((minute, a, b)),
            }
            let oldest = minutes
                .back()
                .map_or(0, |m| m.0)
                .saturating_sub(self.retention_minutes);
            while minutes.front().is_some_and(|(m, _, _)| *m < oldest) {
                minutes.pop_front();
            }
        }
    }

    fn apply_global(&self, batch: &PartitionBatch) {
        let mut global = self.global.lock().expect("global counters lock");
        let floor = batch
            .partition
            .and_then(|p| {
                global
                    .applied
                    .iter()
                    .find(|((q, e), _)| *q == p && e.as_deref() == batch.epoch.as_deref())
            })
            .map(|(_, applied)| *applied);
        // A number met again in the batch (two relays that sent one stretch) counts once.
        let forward = batch.forward();
        let tally = global_tally(&forward, floor);
        if tally.minutes.is_empty() {
            return;
        }
        if let Some(p) = batch.partition {
            let epoch = batch.epoch.as_deref();
            match global
                .applied
                .iter_mut()
                .find(|((q, e), _)| *q == p && e.as_deref() == epoch)
            {
                Some((_, applied)) => *applied = tally.last_offset,
                None => remember(
                    &mut global.applied,
                    (p, epoch.map(Box::from)),
                    tally.last_offset,
                ),
            }
        }
        for (rule, counts) in &tally.rules {
            if !global.rules.contains_key(*rule) && global.rules.len() >= MAX_COUNTED_RULES {
                continue;
            }
            let total = global.rules.entry((*rule).to_owned()).or_default();
            for (t, n) in total.iter_mut().zip(counts) {
                *t += n;
            }
        }
        for (minute, (a, b)) in &tally.minutes {
            let counts = global.minutes.entry(*minute).or_default();
            counts.0 += a;
            counts.1 += b;
        }
        for (minute, users) in tally.blocked_by_minute {
            let set = global.top_minutes.entry(minute).or_default();
            for (user, n) in users {
                *set.entry(Box::from(user)).or_default() += n;
            }
            trim(set);
        }
        for (day, users) in tally.blocked_by_day {
            let set = global.top_days.entry(day).or_default();
            for (user, n) in users {
                *set.entry(Box::from(user)).or_default() += n;
            }
            trim(set);
        }
        // Forget what is past the retention (and days older than yesterday).
        let newest = global.minutes.keys().next_back().copied().unwrap_or(0);
        let oldest = newest.saturating_sub(self.retention_minutes);
        global.minutes = global.minutes.split_off(&oldest);
        global.top_minutes = global.top_minutes.split_off(&oldest);
        let oldest_day = (newest * MINUTE_MS / DAY_MS).saturating_sub(1);
        global.top_days = global.top_days.split_off(&oldest_day);
    }
}

#[async_trait]
impl CounterStore for MemoryCounters {
    async fn apply(&self, batch: &PartitionBatch) -> Result<(), CounterError> {
        self.apply_users(batch);
        self.apply_global(batch);
        Ok(())
    }

    /// These counters add up on the runtime's own threads, beside the requests: a batch
    /// stays short (a millisecond or so) rather than hold a thread for 50,000 events.
    fn batch_cap(&self) -> Option<usize> {
        Some(MEMORY_BATCH_MAX)
    }
}

/// Most events the in-memory counters take in one batch, whatever `ANALYTICS_BATCH_MAX`
/// says (see [`CounterStore::batch_cap`]).
pub const MEMORY_BATCH_MAX: usize = 5_000;

#[async_trait]
impl AnalyticsReader for MemoryCounters {
    async fn rule_counts(&self) -> Result<Vec<RuleCounts>, CounterError> {
        let rules = self
            .global
            .lock()
            .expect("global counters lock")
            .rules
            .clone();
        Ok(sorted_rules(rules))
    }

    async fn get(&self, user_id: &str) -> Result<UserAnalytics, CounterError> {
        let (allowed, blocked) = self
            .users
            .get(user_id)
            .map(|c| (c.allowed, c.blocked))
            .unwrap_or_default();
        Ok(UserAnalytics {
            user_id: user_id.to_owned(),
            total: allowed + blocked,
            allowed,
            blocked,
        })
    }

    async fn user_series(
        &self,
        user_id: &str,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError> {
        let counts: Minutes = self
            .users
            .get(user_id)
            .map(|c| c.minutes.iter().map(|(m, a, b)| (*m, (*a, *b))).collect())
            .unwrap_or_default();
        Ok(fill_series(minutes, &counts))
    }

    async fn global_series(
        &self,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError> {
        let global = self.global.lock().expect("global counters lock");
        Ok(fill_series(minutes, &global.minutes))
    }

    async fn top_blocked(
        &self,
        minutes: RangeInclusive<u64>,
        n: usize,
    ) -> Result<Vec<BlockedUser>, CounterError> {
        let global = self.global.lock().expect("global counters lock");
        let newest = *minutes.end();
        let oldest = (*minutes.start()).max(newest.saturating_sub(TOP_WINDOW_MINUTES - 1));
        let mut merged: HashMap<String, u64> = HashMap::new();
        for set in global.top_minutes.range(oldest..=newest).map(|(_, s)| s) {
            for (user, count) in set {
                *merged.entry(user.to_string()).or_default() += count;
            }
        }
        Ok(top_n(merged, n))
    }

    async fn top_blocked_day(&self, day: u64, n: usize) -> Result<Vec<BlockedUser>, CounterError> {
        let global = self.global.lock().expect("global counters lock");
        let set = global
            .top_days
            .get(&day)
            .map(|s| s.iter().map(|(u, c)| (u.to_string(), *c)).collect())
            .unwrap_or_default();
        Ok(top_n(set, n))
    }

    async fn ping(&self) -> Result<(), CounterError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const DAY: Duration = Duration::from_secs(86_400);

    /// The contract suite, one test per check.
    mod contract {
        use super::*;

        crate::counter_store_contract!((), |_unit| async {
            Arc::new(MemoryCounters::new(1_000_000, DAY)) as Arc<dyn CounterStore>
        });
    }

    /// At the cap the least recently active user makes room: a new user is counted, and
    /// a flood of throwaway ids cannot lock real users out.
    #[tokio::test]
    async fn a_full_cap_forgets_the_idle_not_the_new() {
        let store = MemoryCounters::new(2, DAY);
        let mut batch = crate::contract::batch(
            None,
            &[
                (0, "a", true),
                (1, "b", true),
                (2, "a", false),
                (3, "c", true),
            ],
        );
        for (i, (_, event)) in batch.events.iter_mut().enumerate() {
            event.ts_ms = i as u64 * 1_000;
        }
        store.apply(&batch).await.unwrap();
        assert_eq!(store.get("a").await.unwrap().total, 2);
        assert_eq!(
            store.get("c").await.unwrap().total,
            1,
            "the new user counts"
        );
        assert_eq!(store.get("b").await.unwrap().total, 0, "b was the idlest");
        assert_eq!(store.evicted(), 1);
        assert_eq!(store.user_count.load(Ordering::Relaxed), 2);
    }

    /// A million throwaway ids, each blocked once in the same minute: the top-blocked sets
    /// stay bounded (before, every id tied at the cut was kept, and each batch sorted them
    /// all under the lock `/analytics` takes), and the user map stays at its cap.
    #[tokio::test]
    async fn throwaway_ids_blocked_once_keep_every_set_bounded() {
        let store = MemoryCounters::new(10_000, DAY);
        let ids: Vec<String> = (0..1_000_000).map(|i| format!("t{i}")).collect();
        for (n, chunk) in ids.chunks(5_000).enumerate() {
            let events: Vec<(i64, &str, bool)> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| ((n * 5_000 + i) as i64, id.as_str(), false))
                .collect();
            store
                .apply(&crate::contract::batch(None, &events))
                .await
                .unwrap();
        }
        {
            let global = store.global.lock().unwrap();
            for set in global.top_minutes.values().chain(global.top_days.values()) {
                assert!(set.len() <= 2 * TOP_KEEP, "{} users in a set", set.len());
            }
        }
        assert!(store.users.len() <= 10_000);
        assert_eq!(
            store.get("t999999").await.unwrap().blocked,
            1,
            "the newest id is counted"
        );
    }

    #[tokio::test]
    async fn forgets_minutes_past_the_retention() {
        let store = MemoryCounters::new(10, Duration::from_secs(600));
        let mut b = crate::contract::batch(None, &[(0, "u", true), (1, "u", false)]);
        b.events[1].1.ts_ms = 20 * MINUTE_MS;
        store.apply(&b).await.unwrap();
        let series = store.user_series("u", 0..=20).await.unwrap();
        assert_eq!(
            series[0].allowed, 0,
            "minute 0 is past a 10-minute retention"
        );
        assert_eq!(series[20].blocked, 1);
        assert_eq!(store.global_series(0..=0).await.unwrap()[0].allowed, 0);
        assert_eq!(
            store.get("u").await.unwrap().total,
            2,
            "all-time counts are kept"
        );
    }
}
