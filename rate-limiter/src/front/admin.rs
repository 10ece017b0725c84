//! The limiter's `/admin` routes, behind `ADMIN_TOKEN` (disabled, a JSON 404, when it is
//! unset; a 401 for a missing or wrong token):
//!
//! - `GET /admin/overrides`: every override.
//! - `PUT /admin/overrides`: adds or replaces one (see [`crate::back::overrides`]).
//! - `DELETE /admin/overrides/{id}`.
//! - `GET /admin/buckets?domain=api&entry=plan=free&entry=user_id=u1` (or `?user_id=u1` for
//!   the built-in descriptor): what every limit that applies has left, without spending.
//! - `DELETE /admin/buckets?...`: resets them.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use domain::api::{CheckRequest, FieldError, FromJson};
use kit::admin::AdminToken;
use kit::http::ApiError;
use serde_json::json;

use crate::back::overrides::{OverrideDoc, OverrideError};
use crate::limiter::Limiter;

/// Largest `PUT /admin/overrides` body.
pub const MAX_OVERRIDE_BODY_BYTES: usize = domain::api::MAX_ADMIN_BODY_BYTES;

/// The `/admin` routes, guarded by `token`.
pub fn routes(limiter: Arc<Limiter>, token: Option<AdminToken>) -> Router {
    Router::new()
        .route("/admin/overrides", get(list).put(put))
        .route("/admin/overrides/{id}", delete(remove))
        .route("/admin/buckets", get(peek).delete(reset))
        .route_layer(axum::middleware::from_fn(move |req, next| {
            kit::admin::require_configured(token.clone(), req, next)
        }))
        .layer(axum::extract::DefaultBodyLimit::max(
            MAX_OVERRIDE_BODY_BYTES,
        ))
        .with_state(limiter)
}

impl From<OverrideError> for ApiError {
    fn from(err: OverrideError) -> Self {
        match err {
            OverrideError::Invalid(field) => ApiError::InvalidField(field),
            OverrideError::Full => ApiError::InvalidField(FieldError::new("id", err.to_string())),
            OverrideError::NotFound(_) => ApiError::NotFound,
            OverrideError::Unavailable(_) => {
                tracing::warn!(error = %err, "override store unavailable");
                ApiError::Unavailable {
                    what: "override store",
                    retry_after_secs: 1,
                }
            }
        }
    }
}

async fn list(State(limiter): State<Arc<Limiter>>) -> Json<serde_json::Value> {
    Json(json!({"overrides": limiter.overrides().list()}))
}

async fn put(State(limiter): State<Arc<Limiter>>, body: Bytes) -> Result<Response, ApiError> {
    let doc: OverrideDoc = domain::api::decode(&body)?;
    let id = doc.id.clone();
    limiter.overrides().put(doc).await?;
    Ok((StatusCode::OK, Json(json!({"id": id}))).into_response())
}

async fn remove(
    State(limiter): State<Arc<Limiter>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    limiter.overrides().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The request a bucket query names: `domain` (default `default`) and `entry=key=value`
/// (repeated, in order), or `user_id=<id>` alone for the built-in descriptor.
fn named_request(query: Option<String>) -> Result<CheckRequest, ApiError> {
    let query = query.unwrap_or_default();
    let mut domain = None;
    let mut user_id = None;
    let mut entries = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "domain" => domain = Some(value.into_owned()),
            "user_id" => user_id = Some(value.into_owned()),
            "entry" => {
                let Some((key, value)) = value.split_once('=') else {
                    return Err(FieldError::new("entry", "must be key=value").into());
                };
                entries.push(json!({"key": key, "value": value}));
            }
            other => {
                return Err(FieldError::new(other, "is not a parameter of this route").into());
            }
        }
    }
    let mut body = serde_json::Map::new();
    if let Some(user_id) = user_id {
        body.insert("user_id".into(), user_id.into());
    }
    if let Some(domain) = domain {
        body.insert("domain".into(), domain.into());
    }
    if !entries.is_empty() {
        body.insert("descriptors".into(), json!([{"entries": entries}]));
    }
    let body = serde_json::Value::Object(body).to_string();
    Ok(CheckRequest::from_json(body.as_bytes())?)
}

async fn peek(
    State(limiter): State<Arc<Limiter>>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = named_request(query)?;
    let checked = limiter.peek(&request).await?;
    Ok(Json(json!({
        "domain": request.domain,
        "descriptors": request.descriptors,
        "limits": checked.limits,
        "degraded": checked.degraded,
    })))
}

async fn reset(
    State(limiter): State<Arc<Limiter>>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = named_request(query)?;
    let reset = limiter.reset(&request).await?;
    Ok(Json(json!({"reset": reset})))
}
