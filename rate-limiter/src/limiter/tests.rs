use super::*;
use crate::back::store::StoreError;
use async_trait::async_trait;
use domain::ManualClock;
use domain::Policy;
use kit::stream::{NullPublisher, channel};
use std::time::Duration;

/// A store that is down, to exercise the fail modes without a network.
struct DownStore(Policy);

#[async_trait]
impl BucketStore for DownStore {
    fn policy(&self) -> &Policy {
        &self.0
    }
    fn key_prefix(&self) -> &str {
        ""
    }
    async fn decide_many(
        &self,
        requests: &[RequestTake],
    ) -> Result<Vec<domain::store::Decided>, StoreError> {
        Ok(requests
            .iter()
            .map(|_| Err(StoreError::Unavailable("down".into())))
            .collect())
    }
    async fn reset(&self, _: &[String]) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
}

fn limiter(
    store: Arc<dyn BucketStore>,
    mode: FailMode,
    publisher: Arc<dyn EventPublisher>,
) -> Limiter {
    let clock = Arc::new(ManualClock::new(5_000_000));
    let policy = *store.policy();
    let fallback = Arc::new(MemoryStore::new(policy, clock.clone()));
    fallback.set_parts(2);
    Limiter::new(Parts {
        store,
        fallback,
        fail_mode: mode,
        breaker: Breaker::new(3, Duration::from_secs(60), clock.clone()),
        publisher,
        clock,
        instance_id: "test".into(),
    })
}

fn req(user: &str, cost: u64) -> CheckRequest {
    CheckRequest::user(user, cost)
}

#[tokio::test]
async fn every_decision_is_published() {
    let clock = Arc::new(ManualClock::new(5_000_000));
    let policy = Policy::new(2, 1.0).unwrap();
    let (tx, mut rx) = channel(16);
    let l = limiter(
        Arc::new(MemoryStore::new(policy, clock)),
        FailMode::Closed,
        Arc::new(tx),
    );
    for _ in 0..3 {
        l.check(&req("u", 1)).await.unwrap();
    }
    let allowed: Vec<bool> = (0..3).map(|_| rx.try_recv().unwrap().allowed).collect();
    assert_eq!(allowed, [true, true, false]);
    assert!(rx.try_recv().is_err());
}

/// Two lives of a limiter never share a generation: each process has its own
/// incarnation, and a later start is a greater one.
#[test]
fn every_life_has_its_own_incarnation() {
    let first = new_incarnation();
    std::thread::sleep(Duration::from_millis(2));
    let (second, third) = (new_incarnation(), new_incarnation());
    assert!(second > first && third > first);
    let store = || Arc::new(DownStore(Policy::new(3, 1.0).unwrap()));
    let a = limiter(store(), FailMode::Closed, Arc::new(NullPublisher));
    std::thread::sleep(Duration::from_millis(2));
    let b = limiter(store(), FailMode::Closed, Arc::new(NullPublisher));
    assert!(b.incarnation() > a.incarnation());
}

#[tokio::test]
async fn cost_above_capacity_is_refused_before_the_store() {
    let l = limiter(
        Arc::new(DownStore(Policy::new(3, 1.0).unwrap())),
        FailMode::Closed,
        Arc::new(NullPublisher),
    );
    assert_eq!(
        l.check(&req("u", 4)).await,
        Err(CheckError::cost_above_capacity(3))
    );
}

#[tokio::test]
async fn fail_closed_refuses() {
    let l = limiter(
        Arc::new(DownStore(Policy::new(3, 1.0).unwrap())),
        FailMode::Closed,
        Arc::new(NullPublisher),
    );
    assert_eq!(
        l.check(&req("u", 1)).await,
        Err(CheckError::StoreUnavailable)
    );
    assert!(!l.ready().await);
}

#[tokio::test]
async fn fail_open_uses_a_divided_local_bucket_and_says_so() {
    let (tx, mut rx) = channel(16);
    let l = limiter(
        Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
        FailMode::Open,
        Arc::new(tx),
    );
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(l.check(&req("u", 1)).await.unwrap());
    }
    assert!(results.iter().all(|c| c.degraded));
    assert_eq!(
        results.iter().filter(|c| c.decision.is_allowed()).count(),
        2,
        "capacity 4 split over 2 instances"
    );
    assert!(rx.try_recv().unwrap().degraded);
    // The breaker opened after 3 failures: the store is no longer asked.
    assert_eq!(l.breaker_state(), BreakerState::Open);
}

#[tokio::test]
async fn a_batch_is_decided_in_order_refuses_only_the_bad_check_and_publishes_each() {
    let clock = Arc::new(ManualClock::new(5_000_000));
    let (tx, mut rx) = channel(16);
    let l = limiter(
        Arc::new(MemoryStore::new(Policy::new(2, 1.0).unwrap(), clock)),
        FailMode::Closed,
        Arc::new(tx),
    );
    let results = l
        .check_many(&[
            req("u", 1),
            req("u", 3),
            req("v", 2),
            req("u", 1),
            req("u", 1),
        ])
        .await;
    let got: Vec<Result<bool, CheckError>> = results
        .into_iter()
        .map(|r| r.map(|c| c.decision.is_allowed()))
        .collect();
    assert_eq!(
        got,
        [
            Ok(true),
            Err(CheckError::cost_above_capacity(2)),
            Ok(true),
            Ok(true),
            Ok(false)
        ]
    );
    let events: Vec<(String, bool)> = (0..4)
        .map(|_| rx.try_recv().unwrap())
        .map(|e| (e.user_id, e.allowed))
        .collect();
    assert_eq!(
        events,
        [
            ("u".into(), true),
            ("v".into(), true),
            ("u".into(), true),
            ("u".into(), false)
        ]
    );
    assert!(rx.try_recv().is_err(), "no event for the refused check");
}

#[tokio::test]
async fn a_batch_follows_the_fail_mode_when_the_store_is_down() {
    let closed = limiter(
        Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
        FailMode::Closed,
        Arc::new(NullPublisher),
    );
    let results = closed.check_many(&[req("u", 1), req("w", 1)]).await;
    assert!(
        results
            .iter()
            .all(|r| r == &Err(CheckError::StoreUnavailable))
    );
    let open = limiter(
        Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
        FailMode::Open,
        Arc::new(NullPublisher),
    );
    let results = open
        .check_many(&[req("u", 1), req("u", 1), req("u", 1)])
        .await;
    let allowed: Vec<bool> = results
        .into_iter()
        .map(|r| r.unwrap())
        .inspect(|c| assert!(c.degraded))
        .map(|c| c.decision.is_allowed())
        .collect();
    assert_eq!(allowed, [true, true, false], "capacity 4 split over 2");
}

/// One store call is one verdict for the breaker: a batch whose checks all failed in
/// one call must not count as many failures as it carried checks.
#[tokio::test]
async fn a_failed_batch_counts_one_breaker_failure() {
    let l = limiter(
        Arc::new(DownStore(Policy::new(4, 0.001).unwrap())),
        FailMode::Open,
        Arc::new(NullPublisher),
    );
    let batch: Vec<CheckRequest> = (0..10).map(|i| req(&format!("u{i}"), 1)).collect();
    l.check_many(&batch).await;
    assert_eq!(
        l.breaker_state(),
        BreakerState::Closed,
        "one failure of three"
    );
    l.check_many(&batch).await;
    l.check_many(&batch).await;
    assert_eq!(l.breaker_state(), BreakerState::Open, "three failed calls");
}
