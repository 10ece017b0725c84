//! The contract every [`BucketStore`] must honour, run against each implementation
//! (the memory store in its unit tests, the Redis store against a real redis-server).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ratelimit_domain::{ManualClock, Policy};

use ratelimit_domain::store::BucketStore;

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

/// Runs every check with fresh stores made by `make` (each call must give a store with no
/// buckets, e.g. a new key prefix).
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
}

async fn a_batch_decides_in_order_like_single_takes<F, Fut>(make: &F)
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

async fn full_bucket_admits_capacity_then_limits<F, Fut>(make: &F)
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

async fn users_are_independent<F, Fut>(make: &F)
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

async fn refills_after_retry_after<F, Fut>(make: &F)
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

async fn cost_counts_and_refusal_spends_nothing<F, Fut>(make: &F)
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

async fn concurrent_takes_admit_exactly_capacity<F, Fut>(make: &F)
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

async fn fractional_rates<F, Fut>(make: &F)
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
