//! The counter-store contract against a real redis-server.

use std::sync::Arc;
use std::time::Duration;

use counters::RedisCounters;
use counters::contract;
use domain::analytics::{AnalyticsReader, CounterStore};
use kit::redis::Endpoint;
use testkit::{RedisCluster, RedisServer, unique};

/// Counters at `endpoint` under a fresh key prefix.
fn counters(endpoint: &Endpoint, name: &str) -> RedisCounters {
    RedisCounters::new(
        endpoint,
        &unique(name),
        Duration::from_secs(2),
        Duration::from_secs(86_400),
        Duration::from_secs(7 * 86_400),
    )
    .unwrap()
}

async fn passes_the_contract_suite(endpoint: &Endpoint) {
    contract::run_all(|| {
        let store = counters(endpoint, "counters");
        async move { Arc::new(store) as Arc<dyn CounterStore> }
    })
    .await;
}

/// The contract suite, one test per check, each on a Redis of its own.
mod redis_counters_contract {
    use super::*;

    counters::counter_store_contract!(RedisServer::start(), |redis| async {
        Arc::new(counters(&Endpoint::single(redis.url()), "counters")) as Arc<dyn CounterStore>
    });
}

#[tokio::test]
async fn redis_cluster_counters_pass_the_contract_suite() {
    let cluster = RedisCluster::start();
    passes_the_contract_suite(&Endpoint::cluster(cluster.url())).await;
}

#[tokio::test]
async fn applies_after_a_script_flush() {
    let redis = RedisServer::start();
    let store = counters(&Endpoint::single(redis.url()), "flush");
    store
        .apply(&contract::batch(Some(0), &[(0, "u", true)]))
        .await
        .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    store
        .apply(&contract::batch(Some(0), &[(1, "u", false)]))
        .await
        .unwrap();
    let c = store.get("u").await.unwrap();
    assert_eq!((c.total, c.allowed, c.blocked), (2, 1, 1));
}

async fn info_used_memory(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A million throwaway user ids, one decision each: every key they leave in Redis has a
/// lifetime, and the all-time counters go when the user has been idle for the user TTL
/// (before, `c{user}` never expired: Redis grew with every new id for ever).
#[tokio::test]
async fn a_million_throwaway_ids_leave_no_key_without_a_lifetime() {
    const USERS: i64 = 1_000_000;
    let redis = RedisServer::start();
    let prefix = unique("throwaway");
    let store = RedisCounters::new(
        &Endpoint::single(redis.url()),
        &prefix,
        Duration::from_secs(10),
        Duration::from_secs(60),
        // Long enough that nothing expires while the test looks (a slow machine takes a
        // minute to write and scan a million users); the expiry itself is checked below.
        Duration::from_secs(600),
    )
    .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let before = info_used_memory(&mut conn).await;
    let ids: Vec<String> = (0..USERS).map(|i| format!("throwaway-{i}")).collect();
    for (n, chunk) in ids.chunks(5_000).enumerate() {
        let first = n as i64 * 5_000;
        let events: Vec<(i64, &str, bool)> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| (first + i as i64, id.as_str(), i % 3 != 0))
            .collect();
        store
            .apply(&contract::batch(Some(0), &events))
            .await
            .unwrap();
    }
    let after = info_used_memory(&mut conn).await;
    println!(
        "redis bytes per user with one decision (counters + one minute key): {}",
        (after - before) / USERS
    );

    // Every key a client can make grow has a TTL; what has none is the per-partition
    // bookkeeping, bounded by the number of partitions whatever the clients do.
    let mut cursor: u64 = 0;
    let mut seen = 0usize;
    let mut lasting = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("TTL").arg(key);
        }
        let ttls: Vec<i64> = pipe.query_async(&mut conn).await.unwrap();
        for (key, ttl) in keys.iter().zip(ttls) {
            // -1: a key without expiry (-2: it expired since the SCAN saw it).
            if ttl == -1 {
                lasting.push(key.strip_prefix(&prefix).unwrap().to_owned());
            }
        }
        seen += keys.len();
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    assert!(seen as i64 >= USERS, "counters and minute keys: {seen}");
    lasting.sort();
    assert_eq!(lasting, ["gparts", "g{p0}:o"], "keys without a lifetime");

    // The all-time counters go once the user has been idle for the TTL (1 s here).
    let short = RedisCounters::new(
        &Endpoint::single(redis.url()),
        &unique("short"),
        Duration::from_secs(2),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .unwrap();
    short
        .apply(&contract::batch(Some(0), &[(0, "passing-by", true)]))
        .await
        .unwrap();
    assert_eq!(short.get("passing-by").await.unwrap().total, 1);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let c = short.get("passing-by").await.unwrap();
    assert_eq!(c.total, 0, "idle past the user TTL: forgotten");
}

/// Defect: the in-process stream's events carried no offset, so a batch applied again after
/// a timeout that had in fact applied it was counted twice (users and global minutes).
/// Under a per-process epoch its offsets are checked like a partition's.
#[tokio::test]
async fn an_in_process_batch_applied_twice_counts_once() {
    let redis = RedisServer::start();
    let store = counters(&Endpoint::single(redis.url()), "epoch");
    let mut batch = contract::batch(None, &[(0, "u", true), (1, "u", false), (2, "v", true)]);
    batch.epoch = Some("epoch-a".into());
    store.apply(&batch).await.unwrap();
    // The retry of a call that timed out after Redis had run it.
    store.apply(&batch).await.unwrap();
    let u = store.get("u").await.unwrap();
    assert_eq!((u.total, u.allowed, u.blocked), (2, 1, 1));
    let minute = store.global_series(0..=0).await.unwrap();
    assert_eq!((minute[0].allowed, minute[0].blocked), (2, 1));
    // Another process numbers its events from 0 too: a new epoch, counted.
    batch.epoch = Some("epoch-b".into());
    store.apply(&batch).await.unwrap();
    let u = store.get("u").await.unwrap();
    assert_eq!(u.total, 4);
    let minute = store.global_series(0..=0).await.unwrap();
    assert_eq!((minute[0].allowed, minute[0].blocked), (4, 2));
}

async fn connect(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The top-blocked sets are written by merging (the held scores read with ZMSCORE, the sums
/// and the new users that can still make the top written with ZADD): they must come out
/// exactly as with a ZINCRBY per user and a trim, also past `TOP_KEEP` users, with ties at
/// the bottom and more than 1,000 users in one batch.
#[tokio::test]
async fn top_sets_are_the_same_as_with_a_zincrby_per_user() {
    use domain::analytics::TOP_KEEP;
    let redis = RedisServer::start();
    let prefix = unique("top");
    let store = RedisCounters::new(
        &Endpoint::single(redis.url()),
        &prefix,
        Duration::from_secs(10),
        Duration::from_secs(86_400),
        Duration::from_secs(86_400),
    )
    .unwrap();
    let mut conn = connect(&redis).await;
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        / domain::analytics::MINUTE_MS;
    let mut offset = 0i64;
    let mut seed = 7u64;
    for round in 0..6 {
        // 1,600 blocked decisions over 3,000 users, skewed towards the low ids, and a few
        // users blocked many times.
        let mut users: Vec<String> = Vec::new();
        for _ in 0..1_600 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let r = (seed >> 33) % 3_000;
            users.push(format!("u{}", r * r / 3_000 + round));
        }
        for heavy in 0..20 {
            for _ in 0..heavy {
                users.push(format!("heavy{heavy}"));
            }
        }
        let events: Vec<(i64, &str, bool, u64)> = users
            .iter()
            .map(|u| {
                offset += 1;
                (offset, u.as_str(), false, minute)
            })
            .collect();
        store
            .apply(&contract::timed_batch(Some(0), &events))
            .await
            .unwrap();
        // The reference: what the earlier script did, a ZINCRBY per user, then the trim.
        let mut counts: std::collections::HashMap<&str, u64> = Default::default();
        for u in &users {
            *counts.entry(u.as_str()).or_default() += 1;
        }
        let mut pipe = redis::pipe();
        for (u, n) in &counts {
            pipe.cmd("ZINCRBY")
                .arg("reference")
                .arg(*n)
                .arg(*u)
                .ignore();
        }
        pipe.cmd("ZREMRANGEBYRANK")
            .arg("reference")
            .arg(0)
            .arg(-(TOP_KEEP as i64 + 1))
            .ignore();
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        let read = |key: String| {
            let mut conn = conn.clone();
            async move {
                let set: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                set
            }
        };
        let reference = read("reference".into()).await;
        assert_eq!(reference.len(), TOP_KEEP, "the reference set is full");
        assert_eq!(
            read(format!("{prefix}g{{p0}}:t{minute}")).await,
            reference,
            "minute set after round {round}"
        );
        assert_eq!(
            read(format!("{prefix}g{{p0}}:d{}", minute / 1_440)).await,
            reference,
            "day set after round {round}"
        );
    }
}

/// A replay of more users than one script call carries, each user's counters holding the
/// first half of its events: every user (in whichever call) and the partition's aggregates
/// count only the second half.
#[tokio::test]
async fn a_partly_applied_batch_of_many_users_counts_only_its_new_part() {
    let redis = RedisServer::start();
    let store = counters(&Endpoint::single(redis.url()), "partial");
    const USERS: i64 = 700;
    let ids: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
    let events: Vec<(i64, &str, bool)> = (0..2 * USERS)
        .map(|i| (i, ids[(i % USERS) as usize].as_str(), i % 3 != 0))
        .collect();
    store
        .apply(&contract::batch(Some(4), &events[..USERS as usize]))
        .await
        .unwrap();
    // The worker crashed before committing: the partition is read again from the start.
    store
        .apply(&contract::batch(Some(4), &events))
        .await
        .unwrap();
    for id in &ids {
        assert_eq!(store.get(id).await.unwrap().total, 2, "{id}");
    }
    let minute = store.global_series(0..=0).await.unwrap();
    assert_eq!(minute[0].allowed + minute[0].blocked, 2 * USERS as u64);
    let u0 = store.user_series("user-0", 0..=0).await.unwrap();
    assert_eq!((u0[0].allowed, u0[0].blocked), (1, 1));
}

/// A minute key gets its expiry when it is made, not at every write: it has one after
/// several writes, and again when it is made anew in the same minute (after it expired).
/// The all-time counters' expiry is pushed back by the TTL plus at most a minute.
#[tokio::test]
async fn minute_keys_and_counters_always_have_an_expiry() {
    let redis = RedisServer::start();
    let prefix = unique("ttl");
    let store = RedisCounters::new(
        &Endpoint::single(redis.url()),
        &prefix,
        Duration::from_secs(2),
        Duration::from_secs(3_600),
        Duration::from_secs(7 * 86_400),
    )
    .unwrap();
    let mut conn = connect(&redis).await;
    let minute_key = domain::keys::counter_minute_key(&prefix, "u", 0);
    let counters_key = domain::keys::counter_key(&prefix, "u");
    let ttl_conn = conn.clone();
    let ttl = |key: String| {
        let mut conn = ttl_conn.clone();
        async move {
            let ttl: i64 = redis::cmd("TTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            ttl
        }
    };
    for offset in 0..3 {
        store
            .apply(&contract::batch(Some(0), &[(offset, "u", offset != 1)]))
            .await
            .unwrap();
        let t = ttl(minute_key.clone()).await;
        assert!((3_500..=3_600).contains(&t), "minute key TTL {t}");
        let t = ttl(counters_key.clone()).await;
        assert!(
            (7 * 86_400 - 100..=7 * 86_400 + 60).contains(&t),
            "counters TTL {t}"
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(&minute_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    store
        .apply(&contract::batch(Some(0), &[(3, "u", false)]))
        .await
        .unwrap();
    let t = ttl(minute_key.clone()).await;
    assert!(
        (3_500..=3_600).contains(&t),
        "minute key made again: TTL {t}"
    );
    let c = store.get("u").await.unwrap();
    assert_eq!((c.allowed, c.blocked), (2, 2));
}

/// Defect: every process's in-process stream left a field of its own epoch in each user's
/// counters, for as long as the user stayed active: they grew with restarts. An epoch's
/// record is now forgotten once the epoch is older than the dedup window; only the live
/// epochs' remain.
#[tokio::test]
async fn epoch_records_do_not_grow_with_restarts() {
    let redis = RedisServer::start();
    let prefix = unique("epochs");
    let store = RedisCounters::new(
        &Endpoint::single(redis.url()),
        &prefix,
        Duration::from_secs(2),
        Duration::from_secs(86_400),
        Duration::from_secs(7 * 86_400),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Ten processes that began three days ago, each counting the user once, then one
    // that began now.
    for i in 0..10u64 {
        let mut batch = contract::batch(None, &[(0, "u", true)]);
        batch.epoch = Some(format!("{:x}-{i:016x}", now - 3 * 86_400));
        store.apply(&batch).await.unwrap();
    }
    let mut batch = contract::batch(None, &[(0, "u", true)]);
    batch.epoch = Some(domain::event::Stamp::new_epoch(now));
    store.apply(&batch).await.unwrap();
    assert_eq!(store.get("u").await.unwrap().allowed, 11);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(domain::keys::counter_key(&prefix, "u"))
        .query_async(&mut connect(&redis).await)
        .await
        .unwrap();
    let records: Vec<&String> = fields
        .iter()
        .filter(|f| f.starts_with("o:") || f.starts_with("q:"))
        .collect();
    assert_eq!(records.len(), 1, "{fields:?}");
}
