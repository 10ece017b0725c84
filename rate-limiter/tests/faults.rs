//! The limiter against a real redis-server that fails the ways Redis fails: killed, then
//! frozen (SIGSTOP) while a caller waits on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use domain::api::CheckRequest;
use domain::{Clock, SystemClock};
use rate_limiter::back::breaker::Breaker;
use rate_limiter::back::store::outbox::{self, OutboxKeys};
use rate_limiter::back::store::{MemoryStore, RedisStore};
use rate_limiter::config::{FailMode, LimiterConfig};
use rate_limiter::limiter::{Limiter, Parts};
use testkit::{RedisServer, unique};
use tokio_util::sync::CancellationToken;

async fn limiter(redis: &RedisServer, extra: &[&str]) -> Arc<Limiter> {
    let url = redis.url();
    let prefix = unique("faults");
    let mut argv = vec![
        "rate-limiter",
        "--redis-url",
        &url,
        "--redis-key-prefix",
        &prefix,
    ];
    argv.extend_from_slice(extra);
    let config = LimiterConfig::try_parse_from(argv).unwrap();
    let (limiter, _events) = rate_limiter::build(
        &config.limiter,
        &config.redis.resolve().unwrap(),
        &config.kafka,
        "faults".into(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    limiter
}

fn req(user: &str) -> CheckRequest {
    CheckRequest::user(user, 1)
}

/// Defect: the breaker's half-open probe held its slot until it finished; a probe whose
/// caller gave up (a disconnect, `REQUEST_TIMEOUT_MS`, the gateway's deadline) never
/// finished, so no call probed again and every decision stayed degraded until a restart.
#[tokio::test]
async fn a_probe_dropped_while_redis_is_frozen_does_not_keep_the_breaker_open() {
    let mut redis = RedisServer::start();
    // A Redis deadline longer than the caller's patience: the caller drops the probe.
    let limiter = limiter(
        &redis,
        &[
            "--redis-timeout-ms",
            "5000",
            "--breaker-failures",
            "1",
            "--breaker-open-ms",
            "50",
            "--rate-limit-capacity",
            "1000",
        ],
    )
    .await;
    assert!(!limiter.check(&req("u")).await.unwrap().degraded);

    redis.kill();
    assert!(
        limiter.check(&req("u")).await.unwrap().degraded,
        "a refused connection opens the breaker"
    );
    redis.restart();
    redis.freeze(true);
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The open period is over: this call is the probe, and its caller gives up on it.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), limiter.check(&req("u"))).await;
    assert!(gave_up.is_err(), "the probe waits on the frozen Redis");
    redis.freeze(false);

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let checked = limiter.check(&req("u")).await.unwrap();
        if !checked.degraded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still degraded 3 s after Redis came back: the breaker never probed again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(limiter.ready().await, "/readyz is ready again");
}

/// Defect: the fail-open fallback started every user full, so a Redis blip gave a user the
/// limiter had just seen at 0 tokens `capacity` fresh ones.
#[tokio::test]
async fn an_exhausted_user_stays_exhausted_when_redis_goes_away() {
    let mut redis = RedisServer::start();
    let limiter = limiter(
        &redis,
        &[
            "--rate-limit-capacity",
            "10",
            "--rate-limit-refill-per-sec",
            "0.01",
            "--fail-open-instances",
            "1",
            // The fallback is what is tested: the refusal cache would answer greedy's
            // refusals itself (exactly, and not degraded) while they hold.
            "--refusal-cache-entries",
            "0",
        ],
    )
    .await;
    for _ in 0..10 {
        let c = limiter.check(&req("greedy")).await.unwrap();
        assert!(c.decision.is_allowed() && !c.degraded);
    }
    assert!(
        !limiter
            .check(&req("greedy"))
            .await
            .unwrap()
            .decision
            .is_allowed()
    );
    redis.kill();
    for _ in 0..5 {
        let c = limiter.check(&req("greedy")).await.unwrap();
        assert!(c.degraded, "decided by the fallback");
        assert!(
            !c.decision.is_allowed(),
            "the fallback remembers the user was exhausted"
        );
    }
    // A user this limiter had not seen drained gets the fallback's share.
    let fresh = limiter.check(&req("fresh")).await.unwrap();
    assert!(fresh.degraded && fresh.decision.is_allowed());
}

/// Defect: `FAIL_OPEN_INSTANCES` defaulted to 1, so N limiters admitted N times the limit
/// while Redis was away. Unset, the share now follows the live limiters' reports.
#[tokio::test]
async fn the_fail_open_share_follows_the_live_limiters() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let prefix = unique("share");
    let start = || {
        let argv = [
            "rate-limiter",
            "--redis-url",
            &url,
            "--redis-key-prefix",
            &prefix,
            "--rate-limit-capacity",
            "10",
            "--rate-limit-refill-per-sec",
            "0.01",
        ];
        let config = LimiterConfig::try_parse_from(argv).unwrap();
        async move {
            rate_limiter::Standalone::start(&config, unique("limiter"), &CancellationToken::new())
                .await
                .unwrap()
        }
    };
    let a = start().await;
    let _b = start().await;
    // Reports every second, counted every two.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    redis.kill();
    let mut admitted = 0;
    for _ in 0..10 {
        let c = a.limiter.check(&req("newcomer")).await.unwrap();
        assert!(c.degraded);
        admitted += u32::from(c.decision.is_allowed());
    }
    assert_eq!(admitted, 5, "half of the capacity on each of two limiters");
}

/// Defect: a stopping limiter whose grace ran out dropped requests it had read (and maybe
/// decided) when the process exited; the gateway took the reset for "never read" and asked
/// another replica, so the batch was decided twice. Now every request read is answered
/// before the process closes its connections. The `rate-limiter` binary, SIGTERMed.
#[tokio::test]
async fn a_stopping_limiter_answers_every_request_it_has_read() {
    let redis = RedisServer::start();
    // Counters on a Redis of their own, which stays up: the process has nothing else to
    // wait for once its grace is over.
    let counters = RedisServer::start();
    let limiter = testkit::Service::start(
        "rate-limiter",
        "grace",
        "LIMITER_PORT",
        &[
            ("REDIS_URL", redis.url()),
            ("ANALYTICS_REDIS_URL", counters.url()),
            ("REDIS_KEY_PREFIX", unique("grace")),
            ("REDIS_TIMEOUT_MS", "5000".into()),
            ("REQUEST_TIMEOUT_MS", "1500".into()),
            ("SHUTDOWN_GRACE_MS", "1".into()),
        ],
    );
    let url = format!("{}/check", limiter.url());
    // Warm the connection to Redis, then freeze it: the next check waits on it.
    let client = reqwest::Client::new();
    let warm = client
        .post(&url)
        .json(&serde_json::json!({"user_id": "warm"}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    redis.freeze(true);
    let call = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .json(&serde_json::json!({"user_id": "in-flight"}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut limiter = limiter;
    let stopped = tokio::task::spawn_blocking(move || limiter.terminate(Duration::from_secs(10)));
    let answer = call
        .await
        .unwrap()
        .expect("an answer, not a dropped connection");
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "timeout");
    assert!(stopped.await.unwrap(), "the limiter stopped");
    redis.freeze(false);
}

/// Defect: readiness needed the breaker closed, and only a decision closed it; with no
/// traffic (a readiness probe that took every replica out of its Service keeps it away)
/// a Redis blip left the limiter unready for ever. Readiness now probes the store itself.
#[tokio::test]
async fn readiness_comes_back_after_a_redis_blip_without_traffic() {
    let mut redis = RedisServer::start();
    let limiter = limiter(
        &redis,
        &["--breaker-failures", "1", "--breaker-open-ms", "50"],
    )
    .await;
    assert!(limiter.ready().await);
    redis.kill();
    // One decision while Redis is away opens the breaker (fail-open: degraded).
    assert!(limiter.check(&req("u")).await.unwrap().degraded);
    assert!(!limiter.ready().await, "not ready while Redis is away");
    redis.restart();
    // No decision from here on: only readiness probes, as a Service's would.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !limiter.ready().await {
        assert!(
            Instant::now() < deadline,
            "still unready 3 s after Redis came back, with no traffic"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!limiter.check(&req("u")).await.unwrap().degraded);
}

/// The user of every event the outbox holds.
async fn outbox_users(redis: &RedisServer, keys: &OutboxKeys) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    outbox::held_users(&mut conn, keys).await
}

/// A limiter in fail-open mode on `redis` with the outbox, its events published to the
/// returned channel, each call given 40 ms (and its repeat 20 ms).
async fn outbox_limiter(
    redis: &RedisServer,
) -> (Limiter, OutboxKeys, kit::stream::ChannelReceiver) {
    outbox_limiter_on(redis, &unique("settle")).await
}

/// [`outbox_limiter`], its keys under `prefix` (two limiters on one prefix share buckets).
async fn outbox_limiter_on(
    redis: &RedisServer,
    prefix: &str,
) -> (Limiter, OutboxKeys, kit::stream::ChannelReceiver) {
    let url = redis.url();
    let config = LimiterConfig::try_parse_from([
        "rate-limiter",
        "--redis-url",
        &url,
        "--redis-key-prefix",
        prefix,
        "--redis-timeout-ms",
        "40",
    ])
    .unwrap();
    let settings = config.redis.resolve().unwrap();
    let policy = config.limiter.policy.policy().unwrap();
    let keys = OutboxKeys::new(prefix, 64 << 20);
    let store = RedisStore::new(
        settings.buckets.as_ref().unwrap(),
        prefix,
        policy,
        settings.timeout,
    )
    .unwrap()
    .with_outbox(keys.clone())
    .unwrap();
    store.preload().await.unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (publisher, published) = kit::stream::channel(10_000);
    let limiter = Limiter::new(Parts {
        store: Arc::new(store),
        fallback: Arc::new(MemoryStore::new(policy, clock.clone())),
        fail_mode: FailMode::Open,
        // Never opens here: every check goes to Redis.
        breaker: Breaker::new(1_000, Duration::from_secs(1), clock.clone()),
        publisher: Arc::new(publisher),
        clock,
        instance_id: "settle".into(),
    })
    .with_outbox(true);
    let warm = limiter.check(&req("warm")).await.unwrap();
    assert!(!warm.degraded);
    (limiter, keys, published)
}

/// Checks `users` (one each) while Redis is frozen: each call and its repeat time out and
/// the fail-open fallback answers. The calls wait in Redis's socket.
async fn check_while_frozen(limiter: &Limiter, redis: &RedisServer, users: &[String]) {
    redis.freeze(true);
    let checks: Vec<CheckRequest> = users.iter().map(|u| req(u)).collect();
    let answers = futures::future::join_all(checks.iter().map(|c| limiter.check(c))).await;
    for answer in &answers {
        let answer = answer.as_ref().unwrap();
        assert!(answer.degraded && answer.decision.is_allowed());
    }
}

/// Waits until each of `users` has an event, in the outbox or published, then 2 s more
/// for one that comes late, and asserts that each has exactly one: both would be a double
/// count, neither a lost one.
async fn assert_one_event_each(
    redis: &RedisServer,
    keys: &OutboxKeys,
    published: &mut kit::stream::ChannelReceiver,
    users: &[String],
) {
    let mut published_users: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = async || {
        while let Ok(event) = published.try_recv() {
            *published_users.entry(event.user_id).or_default() += 1;
        }
        let mut all = published_users.clone();
        for user in outbox_users(redis, keys).await {
            *all.entry(user).or_default() += 1;
        }
        all.remove("warm");
        all
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = count().await;
        if users.iter().all(|u| all.get(u).is_some_and(|&n| n >= 1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after Redis came back, some answers have no event: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = count().await;
    assert!(
        users.iter().all(|u| all.get(u) == Some(&1)) && all.len() == users.len(),
        "each of the {} answers should leave exactly one event: {all:?}",
        users.len()
    );
}

/// Defect (issue 24): with the outbox, a check whose Redis call timed out (and its repeat
/// too) was answered by the fail-open fallback, and the fallback's event published; Redis,
/// only slow, then ran the call and appended the call's event to the outbox as well: one
/// answer, two events, counted twice. Now the fallback's event waits until Redis says
/// whether it ran the call, and is published only if it did not.
#[tokio::test]
async fn a_fail_open_answer_whose_call_redis_ran_late_leaves_one_event() {
    let redis = RedisServer::start();
    let (limiter, keys, mut published) = outbox_limiter(&redis).await;
    let users: Vec<String> = (0..20).map(|i| format!("late-{i}")).collect();
    check_while_frozen(&limiter, &redis, &users).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Redis runs the waiting calls: their events are in the outbox.
    redis.freeze(false);
    assert_one_event_each(&redis, &keys, &mut published, &users).await;
    assert_eq!(outbox_users(&redis, &keys).await.len(), users.len() + 1);
    let settled = limiter.settled_stats().unwrap();
    assert_eq!(
        settled.recorded.load(std::sync::atomic::Ordering::Relaxed),
        20
    );
    assert_eq!(
        settled
            .recorded_otherwise
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "Redis allowed what the fallback allowed"
    );
}

/// A fail-open answer whose call Redis ran, and refused (another limiter had spent the
/// bucket; this one's fallback knew nothing of it): the outbox's event counts the refusal,
/// the fallback's held event is dropped (one event per answer), and the limiter reports
/// the answer as counted otherwise than it was given.
#[tokio::test]
async fn a_fail_open_answer_that_redis_decided_otherwise_is_reported() {
    let redis = RedisServer::start();
    let prefix = unique("otherwise");
    let (limiter, _keys, mut published) = outbox_limiter_on(&redis, &prefix).await;
    let (other, _, _) = outbox_limiter_on(&redis, &prefix).await;
    let users: Vec<String> = (0..20).map(|i| format!("spent-{i}")).collect();
    for user in &users {
        // The default policy: 10 at once, one a second.
        for _ in 0..10 {
            assert!(other.check(&req(user)).await.unwrap().decision.is_allowed());
        }
    }
    check_while_frozen(&limiter, &redis, &users).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.freeze(false);
    let settled = limiter.settled_stats().unwrap();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while load(&settled.recorded) + load(&settled.published) < 20 {
        assert!(Instant::now() < deadline, "not settled within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(load(&settled.recorded), 20, "Redis ran every call");
    assert_eq!(load(&settled.recorded_otherwise), 20, "and refused each");
    assert!(published.try_recv().is_err(), "no held event published");
}

/// The other way a call in doubt ends: Redis never runs it (killed with the call in its
/// socket, restarted empty). The held event is then the only one, and is published.
#[tokio::test]
async fn a_fail_open_answer_whose_call_redis_never_ran_is_published() {
    let mut redis = RedisServer::start();
    let (limiter, keys, mut published) = outbox_limiter(&redis).await;
    let users: Vec<String> = (0..20).map(|i| format!("lost-{i}")).collect();
    check_while_frozen(&limiter, &redis, &users).await;
    // The held events wait for an answer while Redis is away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(published.try_recv().is_err(), "nothing published unsettled");
    redis.crash();
    redis.restart();
    assert_one_event_each(&redis, &keys, &mut published, &users).await;
    assert!(outbox_users(&redis, &keys).await.is_empty());
}
