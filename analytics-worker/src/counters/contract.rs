//! The contract every [`CounterStore`] must honour, run against each implementation.

use std::future::Future;
use std::sync::Arc;

use ratelimit_core::RateLimitEvent;
use ratelimit_core::event::SCHEMA_VERSION;

use super::{CounterStore, PartitionBatch};

/// A batch from `(offset, user, allowed)` triples.
pub fn batch(partition: Option<i32>, events: &[(i64, &str, bool)]) -> PartitionBatch {
    PartitionBatch {
        partition,
        events: events
            .iter()
            .map(|(offset, user, allowed)| {
                (
                    *offset,
                    RateLimitEvent {
                        schema_version: SCHEMA_VERSION,
                        user_id: (*user).to_owned(),
                        allowed: *allowed,
                        cost: 1,
                        ts_ms: 0,
                        limiter_id: "contract".into(),
                        degraded: false,
                    },
                )
            })
            .collect(),
    }
}

/// Runs every check, each with a fresh empty store made by `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CounterStore>>,
{
    unseen_users_read_zero(make().await).await;
    counts_allowed_and_blocked(make().await).await;
    replays_are_not_counted_twice(make().await).await;
    partial_replays_count_only_the_new_part(make().await).await;
    partitions_are_independent(make().await).await;
    unordered_streams_always_count(make().await).await;
    tricky_user_ids_stay_apart(make().await).await;
}

async fn unseen_users_read_zero(store: Arc<dyn CounterStore>) {
    let c = store.get("nobody").await.unwrap();
    assert_eq!(
        (c.user_id.as_str(), c.total, c.allowed, c.blocked),
        ("nobody", 0, 0, 0)
    );
}

async fn counts_allowed_and_blocked(store: Arc<dyn CounterStore>) {
    store
        .apply(&batch(
            Some(0),
            &[
                (0, "u1", true),
                (1, "u1", false),
                (2, "u2", true),
                (3, "u1", true),
            ],
        ))
        .await
        .unwrap();
    let c = store.get("u1").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (3, 2, 1));
    assert_eq!(store.get("u2").await.unwrap().total, 1);
}

async fn replays_are_not_counted_twice(store: Arc<dyn CounterStore>) {
    let b = batch(
        Some(3),
        &[(10, "u", true), (11, "u", false), (12, "v", true)],
    );
    store.apply(&b).await.unwrap();
    store.apply(&b).await.unwrap();
    let c = store.get("u").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (2, 1, 1));
    assert_eq!(store.get("v").await.unwrap().total, 1);
}

async fn partial_replays_count_only_the_new_part(store: Arc<dyn CounterStore>) {
    store
        .apply(&batch(Some(1), &[(5, "u", true), (6, "u", true)]))
        .await
        .unwrap();
    // After a crash the partition is re-read from an older commit, in different batches.
    store
        .apply(&batch(
            Some(1),
            &[
                (4, "w", true),
                (5, "u", true),
                (6, "u", true),
                (7, "u", false),
                (8, "u", true),
            ],
        ))
        .await
        .unwrap();
    let c = store.get("u").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (4, 3, 1));
    assert_eq!(store.get("w").await.unwrap().total, 1);
}

async fn partitions_are_independent(store: Arc<dyn CounterStore>) {
    store
        .apply(&batch(Some(0), &[(100, "u", true)]))
        .await
        .unwrap();
    // Offset 5 of another partition is new, though it is below 100.
    store
        .apply(&batch(Some(1), &[(5, "u", true)]))
        .await
        .unwrap();
    assert_eq!(store.get("u").await.unwrap().total, 2);
}

async fn unordered_streams_always_count(store: Arc<dyn CounterStore>) {
    let b = batch(None, &[(0, "u", true), (1, "u", false)]);
    store.apply(&b).await.unwrap();
    store.apply(&b).await.unwrap();
    let c = store.get("u").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (4, 2, 2));
}

async fn tricky_user_ids_stay_apart(store: Arc<dyn CounterStore>) {
    let ids = ["a}", "{a", "a", "a%7D", "x:c", "\u{1F600}"];
    let events: Vec<(i64, &str, bool)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (i as i64, *id, true))
        .collect();
    store.apply(&batch(Some(0), &events)).await.unwrap();
    for id in ids {
        assert_eq!(store.get(id).await.unwrap().total, 1, "{id:?}");
    }
}
