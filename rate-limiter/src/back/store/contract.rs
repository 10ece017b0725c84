//! The contract every [`BucketStore`] must honour, run against each implementation
//! (the memory store in its unit tests, the Redis store against a real redis-server).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use domain::{Decision, ManualClock, Policy};

use domain::limits::{Algorithm, Applied, LimitSpec, Outcome};
use domain::store::{BucketStore, LimitTake, RequestTake, StoreError};

/// A user's bucket of the store's built-in policy, the form most checks are written in:
/// [`BucketStore::decide_many`] with one token bucket per request.
#[async_trait::async_trait]
pub trait TakeExt: BucketStore {
    /// Decides one request of `cost` against `user_id`'s bucket.
    async fn take(&self, user_id: &str, cost: u64) -> Result<Decision, StoreError> {
        self.take_many(&[(user_id, cost)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Protocol("no answer".into())))
    }

    /// [`TakeExt::take`] for several requests, in order, in one call.
    async fn take_many(
        &self,
        takes: &[(&str, u64)],
    ) -> Result<Vec<Result<Decision, StoreError>>, StoreError> {
        let requests: Vec<RequestTake> = takes
            .iter()
            .map(|&(user_id, cost)| {
                RequestTake::bucket(
                    domain::keys::bucket_key(self.key_prefix(), user_id),
                    *self.policy(),
                    cost,
                )
            })
            .collect();
        Ok(self
            .decide_many(&requests)
            .await?
            .into_iter()
            .map(|decided| decided.map(|outcome| outcome.single_decision()))
            .collect())
    }
}

impl<S: BucketStore + ?Sized> TakeExt for S {}

/// How the suite lets time pass for a store.
pub enum Advance {
    /// The store reads this clock: move it.
    Manual(Arc<ManualClock>),
    /// The store reads a real clock (Redis `TIME`): sleep.
    Real,
}

impl Advance {
    async fn by(&self, d: Duration) {
        match self {
            Advance::Manual(clock) => clock.advance_us(d.as_micros() as u64),
            Advance::Real => tokio::time::sleep(d).await,
        }
    }
}

/// One `#[tokio::test]` per check of the suite, so that a failure names its case and
/// does not hide the others (quickwit's `metastore_test_suite!` is the model). `$fixture`
/// is made anew in each test (a Redis server, a clock); `$make` makes a fresh, empty store
/// from it (`|fixture, policy| future of (store, Advance)`).
///
/// ```ignore
/// rate_limiter::bucket_store_contract!(RedisServer::start(), |redis, policy| {
///     let store = store(redis, &unique("contract"), policy);
///     async move { (Arc::new(store) as Arc<dyn BucketStore>, Advance::Real) }
/// });
/// ```
#[macro_export]
macro_rules! bucket_store_contract {
    ($fixture:expr, |$f:ident, $policy:ident| $make:expr) => {
        $crate::bucket_store_contract!(@each ($fixture) ($f, $policy, $make)
            several_limits_are_all_or_nothing,
            windows_count_and_refunds_give_back,
            shadow_limits_never_refuse,
            limits_of_several_descriptors_share_one_decision,
            a_batch_decides_in_order_like_single_takes,
            full_bucket_admits_capacity_then_limits,
            users_are_independent,
            refills_after_retry_after,
            cost_counts_and_refusal_spends_nothing,
            concurrent_takes_admit_exactly_capacity,
            fractional_rates);
    };
    (@each ($fixture:expr) $args:tt $($check:ident),*) => {
        $(
            $crate::bucket_store_contract!(@one ($fixture) $args $check);
        )*
    };
    (@one ($fixture:expr) ($f:ident, $policy:ident, $make:expr) $check:ident) => {
        #[tokio::test]
        async fn $check() {
            let fixture = $fixture;
            let $f = &fixture;
            $crate::back::store::contract::$check(&|$policy| $make).await;
        }
    };
}

/// Runs every check with fresh stores made by `make` (each call must give a store with no
/// buckets, e.g. a new key prefix), in one test: for fixtures too costly to make once per
/// check (a Redis Cluster, TLS).
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    full_bucket_admits_capacity_then_limits(&make).await;
    users_are_independent(&make).await;
    refills_after_retry_after(&make).await;
    cost_counts_and_refusal_spends_nothing(&make).await;
    concurrent_takes_admit_exactly_capacity(&make).await;
    fractional_rates(&make).await;
    a_batch_decides_in_order_like_single_takes(&make).await;
    several_limits_are_all_or_nothing(&make).await;
    windows_count_and_refunds_give_back(&make).await;
    shadow_limits_never_refuse(&make).await;
    limits_of_several_descriptors_share_one_decision(&make).await;
}

fn limit(key: &str, algorithm: Algorithm, requests: u64, window_secs: u64) -> LimitTake {
    LimitTake {
        key: key.to_owned(),
        applied: Applied {
            spec: LimitSpec::new(algorithm, requests, Duration::from_secs(window_secs), None)
                .unwrap(),
            shadow: false,
        },
    }
}

async fn decide(store: &Arc<dyn BucketStore>, limits: &[LimitTake], cost: i64) -> Outcome {
    let request = RequestTake {
        limits: limits.to_vec(),
        cost,
    };
    store
        .decide_many(std::slice::from_ref(&request))
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

fn remaining(outcome: &Outcome) -> Vec<u64> {
    outcome.limits.iter().map(|l| l.quota.remaining).collect()
}

/// A burst limit and a daily quota on one key: each refuses on its own, and a refusal by
/// either spends nothing on the other.
pub async fn several_limits_are_all_or_nothing<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(5, 0.01).unwrap()).await;
    let p = store.key_prefix().to_owned();
    let limits = [
        limit(
            &format!("{p}l{{k1}}:burst:tb"),
            Algorithm::TokenBucket,
            3,
            3600,
        ),
        limit(
            &format!("{p}l{{k1}}:daily:fw"),
            Algorithm::FixedWindow,
            5,
            86_400,
        ),
    ];
    for expected in [[2, 4], [1, 3], [0, 2]] {
        let o = decide(&store, &limits, 1).await;
        assert!(o.allowed);
        assert_eq!(remaining(&o), expected);
    }
    let refused = decide(&store, &limits, 1).await;
    assert!(!refused.allowed, "the burst refuses");
    assert!(!refused.limits[0].admits && refused.limits[1].admits);
    assert_eq!(
        remaining(&refused),
        [0, 2],
        "nothing spent on the daily quota"
    );
    // The daily quota alone refuses a cost of 3 that the burst limit would admit.
    let fresh = [
        limit(
            &format!("{p}l{{k2}}:burst:tb"),
            Algorithm::TokenBucket,
            10,
            3600,
        ),
        limit(
            &format!("{p}l{{k2}}:daily:fw"),
            Algorithm::FixedWindow,
            4,
            86_400,
        ),
    ];
    assert!(decide(&store, &fresh, 2).await.allowed);
    let refused = decide(&store, &fresh, 3).await;
    assert!(!refused.allowed);
    assert!(refused.limits[0].admits && !refused.limits[1].admits);
    assert_eq!(remaining(&refused), [8, 2], "nothing spent on the burst");
    let retry = refused.limits[1].retry_after;
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(86_400),
        "{retry:?}"
    );
}

/// Fixed and sliding windows count costs up to their limit; a refund gives back, never
/// above the limit.
pub async fn windows_count_and_refunds_give_back<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(5, 0.01).unwrap()).await;
    let p = store.key_prefix().to_owned();
    for (algorithm, tag) in [
        (Algorithm::FixedWindow, "fw"),
        (Algorithm::SlidingWindow, "sw"),
        (Algorithm::TokenBucket, "tb"),
    ] {
        let l = [limit(&format!("{p}l{{w}}:n:{tag}"), algorithm, 4, 86_400)];
        assert_eq!(remaining(&decide(&store, &l, 3).await), [1], "{tag}");
        assert!(!decide(&store, &l, 2).await.allowed, "{tag}");
        let refunded = decide(&store, &l, -2).await;
        assert!(refunded.allowed);
        assert_eq!(remaining(&refunded), [3], "{tag}");
        assert_eq!(
            remaining(&decide(&store, &l, -100).await),
            [4],
            "{tag}: capped"
        );
        assert_eq!(
            remaining(&decide(&store, &l, 0).await),
            [4],
            "{tag}: a peek"
        );
        assert!(decide(&store, &l, 4).await.allowed, "{tag}");
        let refused = decide(&store, &l, 1).await;
        assert!(!refused.allowed, "{tag}");
        assert!(refused.limits[0].retry_after > Duration::ZERO);
        assert_eq!(
            decide(&store, &l, 5).await.limits[0].retry_after,
            Duration::MAX,
            "{tag}: above the limit, never"
        );
    }
}

/// A shadow limit is decided and reported, never enforced.
pub async fn shadow_limits_never_refuse<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(5, 0.01).unwrap()).await;
    let p = store.key_prefix().to_owned();
    let mut shadow = limit(
        &format!("{p}l{{s}}:trial:fw"),
        Algorithm::FixedWindow,
        2,
        86_400,
    );
    shadow.applied.shadow = true;
    let limits = [
        limit(
            &format!("{p}l{{s}}:real:tb"),
            Algorithm::TokenBucket,
            10,
            86_400,
        ),
        shadow,
    ];
    let outcomes = [
        decide(&store, &limits, 1).await,
        decide(&store, &limits, 1).await,
        decide(&store, &limits, 1).await,
    ];
    assert!(outcomes.iter().all(|o| o.allowed));
    assert!(
        !outcomes[2].limits[1].admits,
        "the shadow limit would have refused"
    );
    assert_eq!(outcomes[2].limits[0].quota.remaining, 7);
}

/// Limits on two descriptors (two hash tags) are one decision too.
pub async fn limits_of_several_descriptors_share_one_decision<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(5, 0.01).unwrap()).await;
    let p = store.key_prefix().to_owned();
    let limits = [
        limit(
            &format!("{p}l{{api/user=a}}:u:tb"),
            Algorithm::TokenBucket,
            5,
            3600,
        ),
        limit(
            &format!("{p}l{{api/path=x}}:p:fw"),
            Algorithm::FixedWindow,
            2,
            86_400,
        ),
    ];
    assert!(decide(&store, &limits, 1).await.allowed);
    assert!(decide(&store, &limits, 1).await.allowed);
    let refused = decide(&store, &limits, 1).await;
    assert!(!refused.allowed);
    assert_eq!(
        remaining(&refused),
        [3, 0],
        "the user's bucket kept its token"
    );
    assert_eq!(remaining(&decide(&store, &limits[..1], 0).await), [3]);
}

pub async fn a_batch_decides_in_order_like_single_takes<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(3, 0.01).unwrap()).await;
    store.take("carol", 1).await.unwrap();
    // carol has 2 tokens left, dave 3: the batch must see them in order.
    let takes = [
        ("carol", 1),
        ("dave", 2),
        ("carol", 1),
        ("carol", 1),
        ("dave", 2),
        ("dave", 1),
    ];
    let taken = store.take_many(&takes).await.unwrap();
    let got: Vec<(bool, u64)> = taken
        .into_iter()
        .map(|t| t.unwrap())
        .map(|d| (d.is_allowed(), d.quota().remaining))
        .collect();
    assert_eq!(
        got,
        [
            (true, 1),
            (true, 1),
            (true, 0),
            (false, 0),
            (false, 1),
            (true, 0)
        ]
    );
    // And the state it left is the one single takes see.
    assert!(!store.take("carol", 1).await.unwrap().is_allowed());
    assert!(!store.take("dave", 1).await.unwrap().is_allowed());
}

pub async fn full_bucket_admits_capacity_then_limits<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(5, 0.01).unwrap()).await;
    for expected in (0..5).rev() {
        let d = store.take("alice", 1).await.unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.quota().limit, 5);
        assert_eq!(d.quota().remaining, expected);
    }
    let d = store.take("alice", 1).await.unwrap();
    assert!(!d.is_allowed(), "the 6th request of a 5-token bucket");
    assert_eq!(d.quota().remaining, 0);
    // One token at 0.01/s takes 100 s; allow the few ms that passed while we ran.
    let retry = d.retry_after();
    assert!(
        retry > Duration::from_secs(99) && retry <= Duration::from_secs(100),
        "{retry:?}"
    );
    let reset = d.quota().reset_after;
    assert!(
        reset > Duration::from_secs(499) && reset <= Duration::from_secs(500),
        "{reset:?}"
    );
}

pub async fn users_are_independent<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(1, 0.01).unwrap()).await;
    // Ids that a naive key scheme would confuse: separators, braces, escapes, Unicode.
    let ids = [
        "a}",
        "{a",
        "a",
        "a%7D",
        "%7Ba",
        "ü",
        "u\u{308}",
        "x:y",
        "x",
        "\u{1F600}",
    ];
    for id in ids {
        assert!(
            store.take(id, 1).await.unwrap().is_allowed(),
            "first request of {id:?}"
        );
    }
    for id in ids {
        assert!(
            !store.take(id, 1).await.unwrap().is_allowed(),
            "second request of {id:?}"
        );
    }
}

pub async fn refills_after_retry_after<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, advance) = make(Policy::new(2, 20.0).unwrap()).await;
    store.take("bob", 2).await.unwrap();
    let d = store.take("bob", 1).await.unwrap();
    assert!(!d.is_allowed());
    assert!(
        d.retry_after() <= Duration::from_millis(50),
        "{:?}",
        d.retry_after()
    );
    advance.by(d.retry_after()).await;
    assert!(store.take("bob", 1).await.unwrap().is_allowed());
    // After a full refill period the bucket is full again.
    advance.by(Duration::from_millis(150)).await;
    let d = store.take("bob", 2).await.unwrap();
    assert!(d.is_allowed());
}

pub async fn cost_counts_and_refusal_spends_nothing<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(10, 0.01).unwrap()).await;
    assert_eq!(store.take("carol", 7).await.unwrap().quota().remaining, 3);
    let refused = store.take("carol", 4).await.unwrap();
    assert!(!refused.is_allowed());
    assert_eq!(refused.quota().remaining, 3);
    assert!(store.take("carol", 3).await.unwrap().is_allowed());
    assert!(!store.take("carol", 1).await.unwrap().is_allowed());
}

pub async fn concurrent_takes_admit_exactly_capacity<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(50, 0.001).unwrap()).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.take("dave", 1).await.unwrap().is_allowed() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += u32::from(t.await.unwrap());
    }
    assert_eq!(admitted, 50);
}

pub async fn fractional_rates<F, Fut>(make: &F)
where
    F: Fn(Policy) -> Fut,
    Fut: Future<Output = (Arc<dyn BucketStore>, Advance)>,
{
    let (store, _) = make(Policy::new(1, 0.5).unwrap()).await;
    store.take("erin", 1).await.unwrap();
    let d = store.take("erin", 1).await.unwrap();
    let retry = d.retry_after();
    assert!(
        retry > Duration::from_millis(1900) && retry <= Duration::from_secs(2),
        "{retry:?}"
    );
}
