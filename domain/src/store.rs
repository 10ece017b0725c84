//! The bucket-store seam: where token-bucket state lives. The memory and Redis
//! implementations live with the rate limiter; both pass one contract suite.

use async_trait::async_trait;

use crate::Policy;
use crate::event::EventTemplate;
use crate::limits::{Applied, LimitSpec, Outcome};

/// Why a store could not decide. Being over the limit is not an error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store call timed out")]
    Timeout,
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store answered unexpectedly: {0}")]
    Protocol(String),
}

/// One limit of a request as a store sees it: the key its state lives under and its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitTake {
    pub key: String,
    pub applied: Applied,
}

/// One request: every limit that applies to it, decided together, and its cost (negative:
/// a refund; zero: a peek).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestTake {
    pub limits: Vec<LimitTake>,
    pub cost: i64,
}

impl RequestTake {
    /// A request of `cost` against one token bucket of `policy` under `key`.
    pub fn bucket(key: String, policy: Policy, cost: u64) -> Self {
        Self {
            limits: vec![LimitTake {
                key,
                applied: Applied {
                    spec: LimitSpec::TokenBucket(policy),
                    shadow: false,
                },
            }],
            cost: cost as i64,
        }
    }

    /// The applied limits, in order.
    pub fn applied(&self) -> Vec<Applied> {
        self.limits.iter().map(|l| l.applied).collect()
    }
}

/// One request's outcome in [`BucketStore::decide_many`].
pub type Decided = Result<Outcome, StoreError>;

/// Decides requests against the limits they carry, each all or nothing
/// ([`crate::limits::decide_all`]), atomically; or reports why it cannot.
#[async_trait]
pub trait BucketStore: Send + Sync + 'static {
    /// The built-in policy (of the rules' built-in default limit).
    fn policy(&self) -> &Policy;

    /// The prefix of this store's keys.
    fn key_prefix(&self) -> &str;

    /// Decides several requests, in order, as if one after the other; a store may do it in
    /// one round trip. The outer error is a failure of the whole call (what it decided is
    /// unknown, as with a call that timed out).
    async fn decide_many(&self, requests: &[RequestTake]) -> Result<Vec<Decided>, StoreError>;

    /// [`BucketStore::decide_many`], and for each request with an event template in
    /// `events` (same positions; shorter means none for the rest), the decision's event
    /// recorded in the same atomic step, when the store keeps an outbox. Each answer says
    /// whether its event was recorded (or dropped past the outbox's bound: either way the
    /// caller must not publish it). A store without an outbox records nothing.
    async fn decide_recorded(
        &self,
        requests: &[RequestTake],
        events: &[Option<EventTemplate>],
    ) -> Result<Vec<(Decided, bool)>, StoreError> {
        let _ = events;
        Ok(self
            .decide_many(requests)
            .await?
            .into_iter()
            .map(|d| (d, false))
            .collect())
    }

    /// Forgets the state under `keys` (an admin's reset): those limits start afresh.
    async fn reset(&self, keys: &[String]) -> Result<(), StoreError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the store lives outside this process and can fail, so that the limiter
    /// keeps a fail-open fallback beside it (an in-memory store never fails).
    fn is_remote(&self) -> bool {
        true
    }
}
