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

/// What became of a decision's event in [`BucketStore::decide_recorded`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Recording {
    /// Not recorded: the caller publishes it.
    #[default]
    No,
    /// Recorded in the step that decided (or dropped past the outbox's bound): the caller
    /// publishes nothing.
    Yes,
    /// Unknown: the call failed on its way (a timeout), and the store may have run it, or
    /// may still. The caller holds the event until [`BucketStore::settle`] says whether
    /// the store ran the call, and publishes it only if it did not.
    InDoubt(Ticket),
}

/// A call in doubt, as [`BucketStore::settle`] asks after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Where the store remembers the call's batch.
    pub batch: std::sync::Arc<str>,
    /// The call in its batch.
    pub field: String,
}

/// Who the calls of one [`BucketStore::decide_recorded`] are, for a store that remembers
/// its answers (Redis): a call asked again under the same names is answered as it was
/// decided, whichever limiter asks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallNames<'a> {
    /// The batch's id from its sender (the gateway's, the same when it asks another
    /// replica); none: the store names the call itself, unique to it.
    pub batch: Option<&'a str>,
    /// The sender sends the batch again: the store first looks for an answer to each call.
    pub again: bool,
    /// With a batch id: each request's place in the sender's batch (same positions as the
    /// requests). The store binds an answer to the place and to what was asked, so that it
    /// is never given to another question.
    pub places: &'a [usize],
}

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
    /// what became of its event ([`Recording`]). A store without an outbox records nothing.
    /// `names` name the calls, for a store that remembers answers ([`CallNames`]).
    async fn decide_recorded(
        &self,
        requests: &[RequestTake],
        events: &[Option<EventTemplate>],
        names: CallNames<'_>,
    ) -> Result<Vec<(Decided, Recording)>, StoreError> {
        let _ = (events, names);
        Ok(self
            .decide_many(requests)
            .await?
            .into_iter()
            .map(|d| (d, Recording::No))
            .collect())
    }

    /// For each call in doubt ([`Recording::InDoubt`]), whether the store ran it (and so
    /// recorded its event) and, if it did, whether it allowed the request: `None` when it
    /// did not run (and now never will), `Some(allowed)` when it did. A store that never
    /// leaves a call in doubt answers that none ran.
    async fn settle(&self, tickets: &[Ticket]) -> Result<Vec<Option<bool>>, StoreError> {
        Ok(vec![None; tickets.len()])
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
