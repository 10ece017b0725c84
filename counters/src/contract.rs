//! The contract every [`CounterStore`] must honour, run against each implementation.

use std::future::Future;
use std::sync::Arc;

use domain::RateLimitEvent;

use domain::analytics::{BlockedUser, CounterStore, DAY_MS, MINUTE_MS, PartitionBatch};

/// A batch from `(offset, user, allowed)` triples.
pub fn batch(partition: Option<i32>, events: &[(i64, &str, bool)]) -> PartitionBatch {
    PartitionBatch {
        partition,
        epoch: None,
        events: events
            .iter()
            .map(|(offset, user, allowed)| {
                (*offset, RateLimitEvent::new(*user, *allowed, 0, "contract"))
            })
            .collect(),
    }
}

/// A batch from `(offset, user, allowed, minute)`: events at the start of that minute.
pub fn timed_batch(partition: Option<i32>, events: &[(i64, &str, bool, u64)]) -> PartitionBatch {
    let plain: Vec<(i64, &str, bool)> = events.iter().map(|(o, u, a, _)| (*o, *u, *a)).collect();
    let mut b = batch(partition, &plain);
    for ((_, event), (_, _, _, minute)) in b.events.iter_mut().zip(events) {
        event.ts_ms = minute * MINUTE_MS + 1_234;
    }
    b
}

/// One `#[tokio::test]` per check of the suite, so that a failure names its case and does
/// not hide the others. `$fixture` is made anew in each test (a Redis server);
/// `$make` makes a fresh, empty store from it (`|fixture| future of Arc<dyn CounterStore>`).
#[macro_export]
macro_rules! counter_store_contract {
    ($fixture:expr, |$f:ident| $make:expr) => {
        $crate::counter_store_contract!(@each ($fixture) ($f, $make)
            unseen_users_read_zero,
            counts_allowed_and_blocked,
            replays_are_not_counted_twice,
            partial_replays_count_only_the_new_part,
            partitions_are_independent,
            unordered_streams_always_count,
            tricky_user_ids_stay_apart,
            series_per_minute,
            series_survive_replays,
            most_blocked_users,
            rules_are_counted_exactly_once,
            numbers_repeated_in_one_batch_count_once,
            an_event_counts_its_requests);
    };
    (@each ($fixture:expr) $args:tt $($check:ident),*) => {
        $(
            $crate::counter_store_contract!(@one ($fixture) $args $check);
        )*
    };
    (@one ($fixture:expr) ($f:ident, $make:expr) $check:ident) => {
        #[tokio::test]
        async fn $check() {
            let fixture = $fixture;
            let $f = &fixture;
            $crate::contract::$check($make.await).await;
        }
    };
}

/// Runs every check, each with a fresh empty store made by `make`, in one test: for
/// fixtures too costly to make once per check (a Redis Cluster).
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
    series_per_minute(make().await).await;
    series_survive_replays(make().await).await;
    most_blocked_users(make().await).await;
    rules_are_counted_exactly_once(make().await).await;
    numbers_repeated_in_one_batch_count_once(make().await).await;
    an_event_counts_its_requests(make().await).await;
}

/// An event that stands for many requests (a usage report of Envoy's quota filter: 50
/// admitted, 7 denied) adds that many to every count: the user's totals and minutes, the
/// global minutes, the most blocked, the rules'; once, however often it is replayed.
pub async fn an_event_counts_its_requests(store: Arc<dyn CounterStore>) {
    use domain::analytics::RuleCounts;
    use domain::event::{RuleHit, RuleOutcome};
    let m = now_minute();
    let mut b = timed_batch(
        Some(0),
        &[
            (1, "name=shared", true, m),
            (2, "name=shared", false, m),
            (3, "one", false, m),
        ],
    );
    for ((_, event), (count, outcome)) in b.events.iter_mut().zip([
        (50, RuleOutcome::Allowed),
        (7, RuleOutcome::Blocked),
        (1, RuleOutcome::Blocked),
    ]) {
        event.count = count;
        event.rules = vec![RuleHit {
            rule: "api:shared".into(),
            outcome,
        }];
    }
    store.apply(&b).await.unwrap();
    store.apply(&b).await.unwrap();
    let c = store.get("name=shared").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (57, 50, 7));
    let u = store.user_series("name=shared", m..=m).await.unwrap();
    assert_eq!((u[0].allowed, u[0].blocked), (50, 7));
    let g = store.global_series(m..=m).await.unwrap();
    assert_eq!((g[0].allowed, g[0].blocked), (50, 8));
    let top = store.top_blocked(m..=m, 10).await.unwrap();
    let blocked = |user: &str| BlockedUser {
        user_id: user.into(),
        blocked: if user == "one" { 1 } else { 7 },
    };
    assert_eq!(top, vec![blocked("name=shared"), blocked("one")]);
    let today = m * MINUTE_MS / DAY_MS;
    assert_eq!(
        store.top_blocked_day(today, 10).await.unwrap(),
        vec![blocked("name=shared"), blocked("one")]
    );
    assert_eq!(
        store.rule_counts().await.unwrap(),
        [RuleCounts {
            rule: "api:shared".into(),
            allowed: 50,
            blocked: 8,
            shadow_blocked: 0
        }]
    );
}

/// Per-rule counts (allowed, blocked, shadow-blocked) follow the same exactly-once
/// discipline as the rest: a replayed batch adds nothing.
pub async fn rules_are_counted_exactly_once(store: Arc<dyn CounterStore>) {
    use domain::analytics::RuleCounts;
    use domain::event::{RuleHit, RuleOutcome};
    let m = now_minute();
    let mut b = timed_batch(
        Some(0),
        &[(1, "u", true, m), (2, "u", false, m), (3, "v", true, m)],
    );
    let hit = |rule: &str, outcome| RuleHit {
        rule: rule.into(),
        outcome,
    };
    b.events[0].1.rules = vec![
        hit("api:burst", RuleOutcome::Allowed),
        hit("api:trial", RuleOutcome::ShadowBlocked),
    ];
    b.events[1].1.rules = vec![hit("api:burst", RuleOutcome::Blocked)];
    b.events[2].1.rules = vec![hit("api:burst", RuleOutcome::Allowed)];
    store.apply(&b).await.unwrap();
    store.apply(&b).await.unwrap();
    let counts = store.rule_counts().await.unwrap();
    assert_eq!(
        counts,
        [
            RuleCounts {
                rule: "api:burst".into(),
                allowed: 2,
                blocked: 1,
                shadow_blocked: 0
            },
            RuleCounts {
                rule: "api:trial".into(),
                allowed: 0,
                blocked: 0,
                shadow_blocked: 1
            },
        ]
    );
}

/// Minute numbers near now, so stores with a retention keep them.
fn now_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        / MINUTE_MS
}

pub async fn series_per_minute(store: Arc<dyn CounterStore>) {
    let m = now_minute();
    store
        .apply(&timed_batch(
            Some(0),
            &[
                (0, "u", true, m - 2),
                (1, "u", false, m - 2),
                (2, "v", false, m),
                (3, "u", true, m),
            ],
        ))
        .await
        .unwrap();
    let u = store.user_series("u", m - 3..=m).await.unwrap();
    let got: Vec<(u64, u64, u64)> = u
        .iter()
        .map(|c| (c.minute_ms, c.allowed, c.blocked))
        .collect();
    let want = vec![
        ((m - 3) * MINUTE_MS, 0, 0),
        ((m - 2) * MINUTE_MS, 1, 1),
        ((m - 1) * MINUTE_MS, 0, 0),
        (m * MINUTE_MS, 1, 0),
    ];
    assert_eq!(got, want);
    let g = store.global_series(m - 2..=m).await.unwrap();
    let got: Vec<(u64, u64)> = g.iter().map(|c| (c.allowed, c.blocked)).collect();
    assert_eq!(got, vec![(1, 1), (0, 0), (1, 1)]);
    assert_eq!(
        store.user_series("nobody", m..=m).await.unwrap()[0].allowed,
        0
    );
}

pub async fn series_survive_replays(store: Arc<dyn CounterStore>) {
    let m = now_minute();
    let first = timed_batch(Some(2), &[(10, "u", false, m), (11, "w", false, m)]);
    store.apply(&first).await.unwrap();
    store.apply(&first).await.unwrap();
    // A replay from an older commit, overlapping the first batch.
    store
        .apply(&timed_batch(
            Some(2),
            &[
                (10, "u", false, m),
                (11, "w", false, m),
                (12, "u", false, m),
                (13, "u", true, m),
            ],
        ))
        .await
        .unwrap();
    let g = store.global_series(m..=m).await.unwrap();
    assert_eq!((g[0].allowed, g[0].blocked), (1, 3));
    let u = store.user_series("u", m..=m).await.unwrap();
    assert_eq!((u[0].allowed, u[0].blocked), (1, 2));
    let top = store.top_blocked(m..=m, 10).await.unwrap();
    assert_eq!(
        top,
        vec![
            BlockedUser {
                user_id: "u".into(),
                blocked: 2
            },
            BlockedUser {
                user_id: "w".into(),
                blocked: 1
            }
        ]
    );
}

pub async fn most_blocked_users(store: Arc<dyn CounterStore>) {
    let m = now_minute();
    let mut events = Vec::new();
    let mut offset = 0;
    for (user, blocked, minute) in [("a", 1, m - 1), ("b", 3, m), ("c", 2, m), ("a", 3, m)] {
        for _ in 0..blocked {
            events.push((offset, user, false, minute));
            offset += 1;
        }
    }
    events.push((offset, "d", true, m));
    // Split over two partitions: the top merges them.
    let (p0, p1) = events.split_at(5);
    store.apply(&timed_batch(Some(0), p0)).await.unwrap();
    store.apply(&timed_batch(Some(1), p1)).await.unwrap();
    let names = |v: Vec<BlockedUser>| {
        v.into_iter()
            .map(|b| (b.user_id, b.blocked))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.top_blocked(m..=m, 10).await.unwrap()),
        vec![("a".into(), 3), ("b".into(), 3), ("c".into(), 2)]
    );
    assert_eq!(
        names(store.top_blocked(m - 1..=m, 1).await.unwrap()),
        vec![("a".into(), 4)]
    );
    let today = m * MINUTE_MS / DAY_MS;
    if (m - 1) * MINUTE_MS / DAY_MS == today {
        assert_eq!(
            names(store.top_blocked_day(today, 2).await.unwrap()),
            vec![("a".into(), 4), ("b".into(), 3)]
        );
    }
    assert!(
        store
            .top_blocked_day(today + 5, 2)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The same numbers twice in one batch of an epoch (two relays that sent one stretch of an
/// outbox): each number counts once.
pub async fn numbers_repeated_in_one_batch_count_once(store: Arc<dyn CounterStore>) {
    let mut b = batch(
        Some(2),
        &[
            (0, "u", true),
            (1, "u", false),
            (2, "v", true),
            (0, "u", true),
            (1, "u", false),
            (2, "v", true),
            (3, "u", true),
        ],
    );
    b.epoch = Some("20261205-ob3".into());
    store.apply(&b).await.unwrap();
    let u = store.get("u").await.unwrap();
    assert_eq!((u.total, u.allowed, u.blocked), (3, 2, 1));
    assert_eq!(store.get("v").await.unwrap().total, 1);
    let minutes = store.global_series(0..=0).await.unwrap();
    let global: (u64, u64) = minutes
        .iter()
        .fold((0, 0), |(a, b), m| (a + m.allowed, b + m.blocked));
    assert_eq!(global, (3, 1));
}

pub async fn unseen_users_read_zero(store: Arc<dyn CounterStore>) {
    let c = store.get("nobody").await.unwrap();
    assert_eq!(
        (c.user_id.as_str(), c.total, c.allowed, c.blocked),
        ("nobody", 0, 0, 0)
    );
}

pub async fn counts_allowed_and_blocked(store: Arc<dyn CounterStore>) {
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

pub async fn replays_are_not_counted_twice(store: Arc<dyn CounterStore>) {
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

pub async fn partial_replays_count_only_the_new_part(store: Arc<dyn CounterStore>) {
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

pub async fn partitions_are_independent(store: Arc<dyn CounterStore>) {
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

pub async fn unordered_streams_always_count(store: Arc<dyn CounterStore>) {
    let b = batch(None, &[(0, "u", true), (1, "u", false)]);
    store.apply(&b).await.unwrap();
    store.apply(&b).await.unwrap();
    let c = store.get("u").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (4, 2, 2));
}

pub async fn tricky_user_ids_stay_apart(store: Arc<dyn CounterStore>) {
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
