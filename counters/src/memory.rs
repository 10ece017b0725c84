//! Counters in this process's memory (the embedded default).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use ratelimit_domain::api::UserAnalytics;

use ratelimit_domain::analytics::{
    AnalyticsReader, BlockedUser, CounterError, CounterStore, DAY_MS, MINUTE_MS, MinuteCounts,
    PartitionBatch, TOP_KEEP, TOP_WINDOW_MINUTES,
};

use crate::tally::{Minutes, fill_series, global_tally, top_n};

#[derive(Debug, Default)]
struct UserCounters {
    allowed: u64,
    blocked: u64,
    /// Last offset counted, per partition.
    applied: Vec<(i32, i64)>,
    /// (minute, allowed, blocked), oldest first, within the retention.
    minutes: VecDeque<(u64, u64, u64)>,
}

/// Everyone's counts over time, with the last offset applied per partition.
#[derive(Debug, Default)]
struct Global {
    applied: HashMap<i32, i64>,
    minutes: Minutes,
    top_minutes: BTreeMap<u64, HashMap<Box<str>, u64>>,
    top_days: BTreeMap<u64, HashMap<Box<str>, u64>>,
}

/// Keeps the `TOP_KEEP` most blocked once a set has grown to twice that.
fn trim(set: &mut HashMap<Box<str>, u64>) {
    if set.len() > 2 * TOP_KEEP {
        let mut counts: Vec<u64> = set.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let floor = counts[TOP_KEEP - 1];
        set.retain(|_, c| *c >= floor);
    }
}

/// Per-user counters in memory, for at most `max_users` distinct users (a client cannot
/// grow the map without bound; events of users past the cap are counted as overflow).
pub struct MemoryCounters {
    users: DashMap<Box<str>, UserCounters>,
    global: Mutex<Global>,
    max_users: usize,
    /// Distinct users held (users are never removed).
    user_count: AtomicUsize,
    retention_minutes: u64,
    overflow: AtomicU64,
}

impl MemoryCounters {
    pub fn new(max_users: usize, retention: Duration) -> Self {
        Self {
            users: DashMap::new(),
            global: Mutex::default(),
            max_users,
            user_count: AtomicUsize::new(0),
            retention_minutes: (retention.as_millis() as u64 / MINUTE_MS).max(1),
            overflow: AtomicU64::new(0),
        }
    }

    /// Events not counted because the user cap was reached.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    fn apply_users(&self, batch: &PartitionBatch) {
        for (offset, event) in &batch.events {
            let mut entry = match self.users.get_mut(event.user_id.as_str()) {
                Some(entry) => entry,
                // The count, not `DashMap::len` (which visits every shard), per new user.
                None if self.user_count.load(Ordering::Relaxed) >= self.max_users => {
                    let n = self.overflow.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 || n.is_multiple_of(10_000) {
                        tracing::warn!(
                            max_users = self.max_users,
                            overflow = n,
                            "analytics user cap reached; event not counted"
                        );
                    }
                    continue;
                }
                None => self
                    .users
                    .entry(Box::from(event.user_id.as_str()))
                    .or_insert_with(|| {
                        self.user_count.fetch_add(1, Ordering::Relaxed);
                        UserCounters::default()
                    }),
            };
            if let Some(partition) = batch.partition {
                match entry.applied.iter_mut().find(|(p, _)| *p == partition) {
                    Some((_, applied)) if *applied >= *offset => continue,
                    Some((_, applied)) => *applied = *offset,
                    None => entry.applied.push((partition, *offset)),
                }
            }
            let minute = event.ts_ms / MINUTE_MS;
            let (a, b) = (u64::from(event.allowed), u64::from(!event.allowed));
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
            .and_then(|p| global.applied.get(&p).copied());
        let tally = global_tally(&batch.events, floor);
        if tally.minutes.is_empty() {
            return;
        }
        if let Some(p) = batch.partition {
            global.applied.insert(p, tally.last_offset);
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
}

#[async_trait]
impl AnalyticsReader for MemoryCounters {
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

    #[tokio::test]
    async fn passes_the_contract_suite() {
        crate::contract::run_all(|| async {
            Arc::new(MemoryCounters::new(1_000_000, DAY)) as Arc<dyn CounterStore>
        })
        .await;
    }

    #[tokio::test]
    async fn caps_distinct_users() {
        let store = MemoryCounters::new(2, DAY);
        let batch = crate::contract::batch(
            None,
            &[
                (0, "a", true),
                (1, "b", true),
                (2, "c", true),
                (3, "a", false),
            ],
        );
        store.apply(&batch).await.unwrap();
        assert_eq!(store.get("a").await.unwrap().total, 2);
        assert_eq!(store.get("c").await.unwrap().total, 0);
        assert_eq!(store.overflow(), 1);
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
