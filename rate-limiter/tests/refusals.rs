//! The refusal cache is exact: a random workload (three algorithms, two limits on one key,
//! refunds, resets, override and rule changes, time moving by random steps and exactly to
//! the end of a refusal's wait) decided by a limiter with the cache and one without gives
//! the same decision and the same wait every time. And against a real Redis: refusals
//! answered by one limiter's cache cost no Redis call, and a reset made through another
//! limiter reaches that cache within a poll.

use std::sync::Arc;
use std::time::Duration;

use domain::api::CheckRequest;
use domain::descriptor::{Descriptor, Entry};
use domain::rules::RuleSet;
use domain::{Clock, ManualClock, Policy};
use kit::redis::Endpoint;
use kit::stream::NullPublisher;
use rate_limiter::back::breaker::Breaker;
use rate_limiter::back::overrides::{OverrideDoc, Overrides};
use rate_limiter::back::rules::Rules;
use rate_limiter::back::store::{BucketStore, MemoryStore, RedisStore};
use rate_limiter::config::FailMode;
use rate_limiter::limiter::{Checked, Limiter, Parts};

const RULES_A: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limits:
      - name: burst
        algorithm: fixed_window
        requests_per_unit: 3
        window: 1s
      - name: sustained
        requests_per_unit: 8
        unit: minute
  - key: ip
    rate_limits:
      - name: sliding
        algorithm: sliding_window
        requests_per_unit: 4
        window: 2s
"#;

/// The same descriptors with other numbers: a rule change that gives room.
const RULES_B: &str = r#"
domain: api
descriptors:
  - key: api_key
    rate_limits:
      - name: burst
        algorithm: fixed_window
        requests_per_unit: 5
        window: 1s
      - name: sustained
        requests_per_unit: 12
        unit: minute
  - key: ip
    rate_limits:
      - name: sliding
        algorithm: sliding_window
        requests_per_unit: 6
        window: 2s
"#;

fn rule_set(text: &str) -> RuleSet {
    RuleSet::from_files(&[("rules.yaml".to_owned(), text.to_owned())]).expect("valid rules")
}

/// A small deterministic generator (xorshift64*), so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn limiter(clock: Arc<ManualClock>, cache: usize) -> Limiter {
    let policy = Policy::new(4, 2.0).unwrap();
    let store = Arc::new(MemoryStore::new(policy, clock.clone()));
    let rules = Arc::new(Rules::builtin(policy));
    rules.replace(rule_set(RULES_A));
    built(store, policy, FailMode::Closed, clock)
        .with_rules(rules)
        .with_overrides(Arc::new(Overrides::in_memory()))
        .with_refusal_cache(cache)
}

/// A limiter on `store`, with a memory fallback and events to nowhere.
fn built(
    store: Arc<dyn BucketStore>,
    policy: Policy,
    mode: FailMode,
    clock: Arc<dyn Clock>,
) -> Limiter {
    Limiter::new(Parts {
        store,
        fallback: Arc::new(MemoryStore::new(policy, clock.clone())),
        fail_mode: mode,
        breaker: Breaker::new(3, Duration::from_millis(200), clock.clone()),
        publisher: Arc::new(NullPublisher),
        clock,
        instance_id: "test".into(),
    })
}

fn request(rng: &mut Rng) -> CheckRequest {
    let cost = [1, 1, 1, 2, 3][rng.below(5) as usize];
    match rng.below(3) {
        0 => CheckRequest::user(format!("u{}", rng.below(3)), cost as u64),
        kind => {
            let key = if kind == 1 { "api_key" } else { "ip" };
            let value = format!("v{}", rng.below(3));
            CheckRequest {
                user_id: value.clone(),
                domain: "api".into(),
                descriptors: vec![Descriptor {
                    entries: vec![Entry {
                        key: key.into(),
                        value,
                    }],
                }],
                cost,
            }
        }
    }
}

/// The same decision, and the same wait within a millisecond (the stores round fractional
/// tokens, so a wait can come out a microsecond apart; the wire gives whole milliseconds).
fn same(step: usize, cached: &Checked, plain: &Checked) {
    assert_eq!(
        cached.decision.is_allowed(),
        plain.decision.is_allowed(),
        "step {step}: the cached path decided {cached:?}, the plain one {plain:?}"
    );
    let (a, b) = (cached.decision.retry_after(), plain.decision.retry_after());
    assert!(
        a.abs_diff(b) <= Duration::from_millis(1),
        "step {step}: waits {a:?} (cached) and {b:?} (plain)"
    );
}

#[tokio::test]
async fn cached_and_uncached_decide_alike_over_a_random_workload() {
    for seed in 1..=20u64 {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let cached = limiter(clock.clone(), 1_000);
        let plain = limiter(clock.clone(), 0);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut last_wait = Duration::ZERO;
        let mut rules_b = false;
        for step in 0..3_000 {
            match rng.below(100) {
                0..=69 => {
                    let r = request(&mut rng);
                    match (cached.check(&r).await, plain.check(&r).await) {
                        (Ok(c), Ok(p)) => {
                            same(step, &c, &p);
                            if !p.decision.is_allowed() {
                                last_wait = p.decision.retry_after();
                            }
                        }
                        (Err(c), Err(p)) => assert_eq!(c.to_string(), p.to_string()),
                        (c, p) => panic!("step {step}: cached {c:?}, plain {p:?}"),
                    }
                }
                70..=71 => {
                    let mut r = request(&mut rng);
                    r.cost = -(r.cost.max(1));
                    let _ = cached.check(&r).await;
                    let _ = plain.check(&r).await;
                }
                72 => {
                    let r = request(&mut rng);
                    let _ = cached.reset(&r).await;
                    let _ = plain.reset(&r).await;
                }
                73 => {
                    let doc: OverrideDoc = serde_json::from_value(serde_json::json!({
                        "id": "gold",
                        "domain": "api",
                        "entries": [{"key": "api_key", "value": "v0"}],
                        "limits": [{"name": "burst", "algorithm": "fixed_window",
                                    "requests_per_unit": 2 + rng.below(6), "window": "1s"}],
                    }))
                    .unwrap();
                    cached.overrides().put(doc.clone()).await.unwrap();
                    plain.overrides().put(doc).await.unwrap();
                }
                74 => {
                    let _ = cached.overrides().delete("gold").await;
                    let _ = plain.overrides().delete("gold").await;
                }
                75 => {
                    rules_b = !rules_b;
                    let text = if rules_b { RULES_B } else { RULES_A };
                    cached.rules().replace(rule_set(text));
                    plain.rules().replace(rule_set(text));
                }
                // Exactly to the end of the last refusal's wait, and a microsecond short.
                76..=79 => clock.advance_us(last_wait.as_micros() as u64),
                80..=82 => clock.advance_us((last_wait.as_micros() as u64).saturating_sub(1)),
                _ => clock.advance_us(rng.below(100_000)),
            }
        }
        assert!(
            cached.refusal_cache_hits() > 50,
            "seed {seed}: the workload must exercise the cache ({} hits)",
            cached.refusal_cache_hits()
        );
        assert_eq!(plain.refusal_cache_hits(), 0);
        let _ = clock.now_us();
    }
}

/// Against a real Redis: limiter A answers a user's repeated refusals itself (Redis sees
/// no further script call), and a reset made through limiter B reaches A within a poll.
#[tokio::test]
async fn refusals_cost_no_redis_call_and_a_reset_elsewhere_reaches_the_cache() {
    let redis = testkit::RedisServer::start();
    let prefix = testkit::unique("refusals");
    let policy = Policy::new(2, 0.01).unwrap();
    let start = |cache: usize| {
        let endpoint = Endpoint::single(redis.url());
        let prefix = prefix.clone();
        async move {
            let clock: Arc<dyn Clock> = Arc::new(domain::SystemClock);
            let store = Arc::new(
                RedisStore::new(&endpoint, &prefix, policy, Duration::from_secs(1)).unwrap(),
            );
            let overrides = Arc::new(Overrides::in_redis(
                kit::redis::connect(&endpoint, Duration::from_secs(1)).unwrap(),
                &prefix,
                Duration::from_secs(1),
            ));
            let shutdown = tokio_util::sync::CancellationToken::new();
            overrides.spawn_poller(shutdown.clone());
            let limiter = built(store, policy, FailMode::Open, clock)
                .with_overrides(overrides)
                .with_refusal_cache(cache);
            (limiter, shutdown)
        }
    };
    let (a, _a_down) = start(1_000).await;
    let (b, _b_down) = start(0).await;
    let user = CheckRequest::user("mallory", 1);
    assert!(a.check(&user).await.unwrap().decision.is_allowed());
    assert!(a.check(&user).await.unwrap().decision.is_allowed());
    assert!(!a.check(&user).await.unwrap().decision.is_allowed());

    let calls_before = script_calls(&redis).await;
    for _ in 0..500 {
        let checked = a.check(&user).await.unwrap();
        assert!(!checked.decision.is_allowed());
        assert!(!checked.degraded);
        assert!(checked.decision.retry_after() > Duration::from_secs(10));
    }
    let calls = script_calls(&redis).await - calls_before;
    assert!(calls <= 1, "500 refusals made {calls} script calls");
    assert_eq!(a.refusal_cache_hits(), 500);

    // B refunds someone else: A keeps mallory's refusal (once every refund anywhere
    // emptied every cache).
    let other = CheckRequest::user("alice", 1);
    assert!(b.check(&other).await.unwrap().decision.is_allowed());
    let mut refund = other.clone();
    refund.cost = -1;
    b.check(&refund).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let calls_before = script_calls(&redis).await;
    for _ in 0..100 {
        assert!(!a.check(&user).await.unwrap().decision.is_allowed());
    }
    let calls = script_calls(&redis).await - calls_before;
    assert!(
        calls <= 1,
        "a refund of alice cost mallory's refusals {calls} script calls"
    );

    // B resets mallory: within a poll (250 ms) A asks Redis again and admits.
    b.reset(&user).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if a.check(&user).await.unwrap().decision.is_allowed() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A still refuses mallory from its cache 1 s after B reset it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Scripts Redis has run (`EVALSHA` and `EVAL` calls), from `INFO commandstats`.
async fn script_calls(redis: &testkit::RedisServer) -> u64 {
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}
