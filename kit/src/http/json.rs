//! The strict JSON extractor: a body sent as JSON, within its size limit, decoded and
//! validated by its type ([`FromJson`], implemented where each request type lives).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use domain::api::{FieldError, FromJson};

use super::ApiError;

/// A JSON body that was sent as JSON, fits the size limit and validated: 415, 413 or 400
/// (naming the field) otherwise.
pub struct ValidJson<T>(pub T);

impl<S: Send + Sync, T: FromJson> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::InvalidField(FieldError::new("body", rejection.body_text()))
            }
        })?;
        T::from_json(&body).map(ValidJson).map_err(ApiError::from)
    }
}

/// `application/json`, `application/json; charset=utf-8`, or any `application/*+json`.
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    // What nearly every client sends, compared whole before anything is parsed.
    if value.as_bytes() == b"application/json" {
        return true;
    }
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"))
}
