//! How the gateway asks the limiter: the [`LimiterClient`] trait and why it may give no
//! decision ([`ClientError`]). Over HTTP when the services run apart
//! ([`HttpLimiterClient`]); the all-in-one binary brings an in-process one.
//!
//! - `http`: the HTTP client: the queue, the refusal cache in front of it, `/admin` passed on.
//! - `batch`: the batches: how one is posted to one replica after another, and how each
//!   check's caller gets its answer.
//! - `discovery`: the replicas: the configured URLs, their names resolved again and again.

mod batch;
mod discovery;
mod http;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::http::StatusCode;
pub use discovery::{Resolve, SystemResolver};
use domain::api::{CheckError, CheckRequest, CheckResponse, FieldError};
pub use http::{Batching, HttpLimiterClient, describe_metrics};
use kit::http::ApiError;

/// Why the limiter gave no decision.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    /// The limiter refused the request as invalid (e.g. a cost above the capacity).
    #[error("invalid request: {0}")]
    Invalid(FieldError),
    /// The limiter's store is down and it fails closed.
    #[error("the rate-limit store is unavailable")]
    StoreUnavailable,
    /// The limiter did not answer (unreachable, timed out, or answered nonsense).
    #[error("the rate limiter is unreachable: {0}")]
    Unreachable(String),
    /// The limiter is shedding load.
    #[error("the rate limiter is overloaded")]
    Overloaded,
}

impl From<CheckError> for ClientError {
    fn from(err: CheckError) -> Self {
        match err {
            CheckError::Invalid(field) => ClientError::Invalid(field),
            CheckError::StoreUnavailable => ClientError::StoreUnavailable,
            CheckError::Overloaded => ClientError::Overloaded,
            CheckError::Other(body) => {
                ClientError::Unreachable(format!("limiter answered {}", body.error))
            }
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(err: ClientError) -> Self {
        // What the limiter said maps as the limiter's own answers do (`kit::http`).
        match err {
            ClientError::Invalid(field) => CheckError::Invalid(field).into(),
            ClientError::StoreUnavailable => CheckError::StoreUnavailable.into(),
            ClientError::Overloaded => CheckError::Overloaded.into(),
            ClientError::Unreachable(_) => ApiError::Unavailable {
                what: "rate limiter",
                retry_after_secs: 1,
            },
        }
    }
}

#[async_trait]
pub trait LimiterClient: Send + Sync + 'static {
    async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, ClientError>;

    /// Passes an `/admin` request (overrides, bucket peeks and resets) to the limiter,
    /// which checks the admin token again, and returns its answer.
    async fn admin(&self, request: AdminRequest) -> Result<(StatusCode, Bytes), ClientError>;
}

/// An `/admin` request as the gateway passes it on: what the limiter needs, no more.
#[derive(Debug, Clone)]
pub struct AdminRequest {
    pub method: axum::http::Method,
    /// The path and query, e.g. `/admin/buckets?user_id=u1`.
    pub path_and_query: String,
    pub authorization: Option<axum::http::HeaderValue>,
    pub body: Bytes,
}
