//! The admin routes' guard: with `ADMIN_TOKEN` set, `/analytics*`, `/status` and
//! `/metrics` answer only to `Authorization: Bearer <token>`; unset, they are open (the
//! seed's behaviour). The comparison takes the same time whatever the token sent, so it
//! cannot be guessed a byte at a time.

use std::sync::Arc;

use crate::http::ApiError;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// The operator's admin token.
#[derive(Clone)]
pub struct AdminToken(Arc<[u8]>);

impl AdminToken {
    /// The token `ADMIN_TOKEN` holds, if it is set and not blank.
    pub fn from_setting(value: Option<&str>) -> Option<Self> {
        value
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| Self(Arc::from(t.as_bytes())))
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        presented.len() == self.0.len() && bool::from(presented.ct_eq(&self.0))
    }
}

/// The `/admin` routes' guard: disabled (a JSON 404, as for any unknown path) when no token
/// is configured; otherwise only `Authorization: Bearer <token>` passes, anything else is
/// answered 401.
pub async fn require_configured(token: Option<AdminToken>, req: Request, next: Next) -> Response {
    if token.is_none() {
        return ApiError::NotFound.into_response();
    }
    require(token, req, next).await
}

/// Lets the request through when no token is configured or it carries the right one;
/// answers 401 `unauthorized` otherwise.
pub async fn require(token: Option<AdminToken>, req: Request, next: Next) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented {
        Some(p) if token.matches(p.as_bytes()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_settings_mean_no_token_and_only_the_exact_token_matches() {
        assert!(AdminToken::from_setting(None).is_none());
        assert!(AdminToken::from_setting(Some("  ")).is_none());
        let t = AdminToken::from_setting(Some("s3cret")).unwrap();
        assert!(t.matches(b"s3cret"));
        for wrong in [&b"s3cre"[..], b"s3cret!", b"S3cret", b""] {
            assert!(!t.matches(wrong));
        }
    }
}
