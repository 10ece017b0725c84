//! One error type for everything a handler answers besides success, mapped to a status
//! and a JSON [`ErrorBody`] here and nowhere else.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::api::{CheckError, ErrorBody, FieldError, MAX_BODY_BYTES};

/// Everything a handler can answer besides success. Mapped to a status and a JSON
/// [`ErrorBody`] in [`IntoResponse`] below, and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    InvalidField(FieldError),
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A dependency (the limiter, its store, the analytics store) cannot answer now.
    #[error("{what} unavailable")]
    Unavailable {
        what: &'static str,
        retry_after_secs: u64,
    },
    /// Too much in flight: shed at once rather than queue.
    #[error("overloaded")]
    Overloaded,
    /// An admin route asked without the right `Authorization: Bearer` token.
    #[error("unauthorized")]
    Unauthorized,
    /// The request did not finish within the service's request timeout.
    #[error("request timed out")]
    Timeout,
    /// The client did not send the request's body within the body timeout.
    #[error("request body timed out")]
    BodyTimeout(Duration),
}

impl From<CheckError> for ApiError {
    fn from(err: CheckError) -> Self {
        match err {
            CheckError::Invalid(field) => ApiError::InvalidField(field),
            CheckError::StoreUnavailable | CheckError::Other(_) => ApiError::Unavailable {
                what: "rate-limit store",
                retry_after_secs: 1,
            },
            CheckError::Overloaded => ApiError::Overloaded,
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidField(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // The original design answers overload with 429: shed, come back shortly.
            ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable { .. } | ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The JSON body this error answers with.
    pub fn body(&self) -> ErrorBody {
        let (error, detail, field) = match self {
            ApiError::InvalidField(e) => (
                "invalid_request",
                format!("{}: {}", e.field, e.detail),
                Some(e.field.clone()),
            ),
            ApiError::UnsupportedMediaType => (
                "unsupported_media_type",
                "the body must be JSON sent with Content-Type: application/json".to_owned(),
                None,
            ),
            ApiError::PayloadTooLarge => (
                "payload_too_large",
                format!("the body must be at most {MAX_BODY_BYTES} bytes"),
                None,
            ),
            ApiError::NotFound => ("not_found", "no such route".to_owned(), None),
            ApiError::MethodNotAllowed => (
                "method_not_allowed",
                "this route does not accept that method".to_owned(),
                None,
            ),
            ApiError::Unavailable { what, .. } => (
                "unavailable",
                format!("the {what} is unavailable; try again shortly"),
                None,
            ),
            ApiError::Overloaded => (
                "overloaded",
                "too many requests in flight; try again shortly".to_owned(),
                None,
            ),
            ApiError::Unauthorized => (
                "unauthorized",
                "this route needs Authorization: Bearer <ADMIN_TOKEN>".to_owned(),
                None,
            ),
            ApiError::Timeout => (
                "timeout",
                "the request did not finish in time; try again shortly".to_owned(),
                None,
            ),
            ApiError::BodyTimeout(after) => (
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms; send it at once",
                    after.as_millis()
                ),
                None,
            ),
        };
        ErrorBody {
            error: error.to_owned(),
            detail,
            field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let retry_after = match &self {
            ApiError::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            ApiError::Overloaded | ApiError::Timeout => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::InvalidField(e)
    }
}
