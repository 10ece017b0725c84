//! Errors: a client's mistake in one field, the body every error answer carries, and the
//! typed reason a check got no decision.

use serde::{Deserialize, Serialize};

/// A client mistake in one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// Every error answer: a stable machine-readable `error`, a human `detail`, and the
/// offending `field` when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Why the limiter gave no decision on a check: the one error of the gateway-to-limiter
/// hop. The limiter returns it; `POST /check/batch` carries it per check as an
/// [`ErrorBody`] (the field and its detail apart, so nothing is parsed out of a sentence);
/// the gateway reads it back as it was sent, whether the limiter is across the network or
/// in the same process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(into = "ErrorBody", from = "ErrorBody")]
pub enum CheckError {
    /// The check cannot be decided as sent (e.g. a cost above every capacity it meets).
    #[error("invalid request: {0}")]
    Invalid(FieldError),
    /// The shared store is unreachable and the fail mode is `closed`.
    #[error("the rate-limit store is unavailable")]
    StoreUnavailable,
    /// The limiter is shedding load.
    #[error("the rate limiter is overloaded")]
    Overloaded,
    /// An error code this version does not know (a newer limiter's), kept as sent.
    #[error("{}: {}", .0.error, .0.detail)]
    Other(ErrorBody),
}

impl CheckError {
    /// A cost above the capacity of a limit the check meets: no wait would admit it.
    pub fn cost_above_capacity(capacity: u64) -> Self {
        CheckError::Invalid(FieldError::new(
            "cost",
            format!("must be at most the bucket capacity {capacity}"),
        ))
    }
}

impl From<CheckError> for ErrorBody {
    fn from(err: CheckError) -> Self {
        let body = |error: &str, detail: &str| ErrorBody {
            error: error.to_owned(),
            detail: detail.to_owned(),
            field: None,
        };
        match err {
            CheckError::Invalid(FieldError { field, detail }) => ErrorBody {
                error: "invalid_request".to_owned(),
                detail,
                field: Some(field),
            },
            CheckError::StoreUnavailable => body(
                "unavailable",
                "the rate-limit store is unavailable; try again shortly",
            ),
            CheckError::Overloaded => body(
                "overloaded",
                "too many requests in flight; try again shortly",
            ),
            CheckError::Other(body) => body,
        }
    }
}

impl From<ErrorBody> for CheckError {
    fn from(body: ErrorBody) -> Self {
        match body.error.as_str() {
            "invalid_request" => CheckError::Invalid(FieldError {
                field: body.field.unwrap_or_else(|| "body".to_owned()),
                detail: body.detail,
            }),
            "unavailable" => CheckError::StoreUnavailable,
            "overloaded" => CheckError::Overloaded,
            _ => CheckError::Other(body),
        }
    }
}

/// A request type that decodes and validates itself from a JSON body, naming the offending
/// field on failure (the HTTP extractor of every service takes any such type).
pub trait FromJson: Sized {
    fn from_json(body: &[u8]) -> Result<Self, FieldError>;
}

/// Decodes a JSON object body into `T`, naming the offending field on failure.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FieldError> {
    // serde would also read a struct from a JSON array; only an object is a request.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(FieldError::new("body", "must be a JSON object"));
    }
    // The usual body is valid: decoded without tracking the path (which copies every key
    // it meets); one that fails is decoded again with the path, to name the field. Neither
    // looks past the object (the same acceptance either way).
    if let Ok(value) = T::deserialize(&mut serde_json::Deserializer::from_slice(body)) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        // Syntax errors have no meaningful path ("." or "?"): blame the body.
        let field = if err.inner().is_data() && path != "." && path != "?" {
            path
        } else {
            "body".to_owned()
        };
        FieldError::new(field, err.into_inner().to_string())
    })
}
