//! The bucket-store seam: where token-bucket state lives. The memory and Redis
//! implementations live with the rate limiter; both pass one contract suite.

use async_trait::async_trait;

use crate::{Decision, Policy};

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

/// One request's outcome in [`BucketStore::take_many`].
pub type Taken = Result<Decision, StoreError>;

/// Atomically takes `cost` tokens from a user's bucket, or reports why it cannot.
#[async_trait]
pub trait BucketStore: Send + Sync + 'static {
    /// The policy every bucket of this store follows.
    fn policy(&self) -> &Policy;

    /// Decides one request: load, [`crate::bucket::decide`], store, atomically.
    async fn take(&self, user_id: &str, cost: u64) -> Result<Decision, StoreError>;

    /// Decides several requests, in order, as [`BucketStore::take`] would one after the
    /// other; a store may do it in one round trip. The outer error is a failure of the
    /// whole call (what it decided is unknown, as with a `take` that timed out).
    async fn take_many(&self, takes: &[(&str, u64)]) -> Result<Vec<Taken>, StoreError> {
        let mut taken = Vec::with_capacity(takes.len());
        for &(user_id, cost) in takes {
            taken.push(self.take(user_id, cost).await);
        }
        Ok(taken)
    }

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the store lives outside this process and can fail, so that the limiter
    /// keeps a fail-open fallback beside it (an in-memory store never fails).
    fn is_remote(&self) -> bool {
        true
    }
}
