//! The counter-store contract against a real redis-server.

use std::sync::Arc;
use std::time::Duration;

use analytics_counters::RedisCounters;
use analytics_counters::contract;
use ratelimit_domain::analytics::{AnalyticsReader, CounterStore};
use testkit::{RedisCluster, RedisServer, unique};

/// Counters on `url` under a fresh key prefix.
fn counters(url: &str, cluster: bool, name: &str) -> RedisCounters {
    RedisCounters::new(
        url,
        cluster,
        &unique(name),
        Duration::from_secs(2),
        Duration::from_secs(86_400),
    )
    .unwrap()
}

async fn passes_the_contract_suite(url: &str, cluster: bool) {
    contract::run_all(|| {
        let store = counters(url, cluster, "counters");
        async move { Arc::new(store) as Arc<dyn CounterStore> }
    })
    .await;
}

#[tokio::test]
async fn redis_counters_pass_the_contract_suite() {
    let redis = RedisServer::start();
    passes_the_contract_suite(&redis.url(), false).await;
}

#[tokio::test]
async fn redis_cluster_counters_pass_the_contract_suite() {
    let cluster = RedisCluster::start();
    passes_the_contract_suite(&cluster.url(), true).await;
}

#[tokio::test]
async fn applies_after_a_script_flush() {
    let redis = RedisServer::start();
    let store = counters(&redis.url(), false, "flush");
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
