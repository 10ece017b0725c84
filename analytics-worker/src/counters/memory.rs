//! Counters in this process's memory (the embedded default).

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;
use ratelimit_core::api::UserAnalytics;

use super::{CounterError, CounterStore, PartitionBatch};

#[derive(Debug, Default)]
struct UserCounters {
    allowed: u64,
    blocked: u64,
    /// Last offset counted, per partition.
    applied: Vec<(i32, i64)>,
}

/// Per-user counters in memory, for at most `max_users` distinct users (a client cannot
/// grow the map without bound; events of users past the cap are counted as overflow).
pub struct MemoryCounters {
    users: DashMap<Box<str>, UserCounters>,
    max_users: usize,
    overflow: AtomicU64,
}

impl MemoryCounters {
    pub fn new(max_users: usize) -> Self {
        Self {
            users: DashMap::new(),
            max_users,
            overflow: AtomicU64::new(0),
        }
    }

    /// Events not counted because the user cap was reached.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl CounterStore for MemoryCounters {
    async fn apply(&self, batch: &PartitionBatch) -> Result<(), CounterError> {
        for (offset, event) in &batch.events {
            let mut entry = match self.users.get_mut(event.user_id.as_str()) {
                Some(entry) => entry,
                None if self.users.len() >= self.max_users => {
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
                    .or_default(),
            };
            if let Some(partition) = batch.partition {
                match entry.applied.iter_mut().find(|(p, _)| *p == partition) {
                    Some((_, applied)) if *applied >= *offset => continue,
                    Some((_, applied)) => *applied = *offset,
                    None => entry.applied.push((partition, *offset)),
                }
            }
            if event.allowed {
                entry.allowed += 1;
            } else {
                entry.blocked += 1;
            }
        }
        Ok(())
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

    async fn ping(&self) -> Result<(), CounterError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn passes_the_contract_suite() {
        super::super::contract::run_all(|| async {
            Arc::new(MemoryCounters::new(1_000_000)) as Arc<dyn CounterStore>
        })
        .await;
    }

    #[tokio::test]
    async fn caps_distinct_users() {
        let store = MemoryCounters::new(2);
        let batch = super::super::contract::batch(
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
}
