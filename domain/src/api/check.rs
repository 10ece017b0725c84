//! One check: the request (`POST /check` at the limiter, `POST /api` at the gateway), its
//! validation, and the limiter's answer.

use serde::{Deserialize, Serialize};

use super::identity::{analytics_identity, canonical_key, canonical_user_id};
use super::{FieldError, FromJson, MAX_COST, MAX_DESCRIPTORS, MAX_ENTRIES, decode};
use crate::descriptor::{DEFAULT_DOMAIN, Descriptor, Entry, USER_ID_KEY};

/// `POST /check` at the limiter and `POST /api` at the gateway: a request's domain and
/// descriptors (`{"user_id":"u1"}` is the descriptor `[user_id=u1]` of the default domain),
/// and its cost. A negative cost is a refund (accepted at the limiter only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    /// Who the analytics count the decision for: the `user_id` given, else the `user_id`
    /// entry of the first descriptor that has one, else the first descriptor's entries
    /// written `key=value/key=value` (cut to [`super::MAX_USER_ID_BYTES`]).
    pub user_id: String,
    pub domain: String,
    pub descriptors: Vec<Descriptor>,
    pub cost: i64,
}

impl CheckRequest {
    /// The built-in request: `[user_id=<id>]` in the default domain.
    pub fn user(user_id: impl Into<String>, cost: u64) -> Self {
        let user_id = user_id.into();
        Self {
            descriptors: vec![Descriptor::user(&user_id)],
            domain: DEFAULT_DOMAIN.to_owned(),
            user_id,
            cost: cost as i64,
        }
    }

    /// Whether this is the built-in form, which travels as `{"user_id","cost"}`.
    pub fn is_user_only(&self) -> bool {
        self.domain == DEFAULT_DOMAIN
            && matches!(self.descriptors.as_slice(), [d] if d.entries.len() == 1
                && d.entries[0].key == USER_ID_KEY && d.entries[0].value == self.user_id)
    }
}

impl Serialize for CheckRequest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let user_only = self.is_user_only();
        let mut map = serializer.serialize_map(Some(if user_only { 2 } else { 4 }))?;
        map.serialize_entry("user_id", &self.user_id)?;
        if !user_only {
            map.serialize_entry("domain", &self.domain)?;
            map.serialize_entry("descriptors", &self.descriptors)?;
        }
        map.serialize_entry("cost", &self.cost)?;
        map.end()
    }
}

#[derive(Deserialize)]
pub(super) struct CheckRequestWire {
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    descriptors: Option<Vec<DescriptorWire>>,
    #[serde(default)]
    cost: Option<i64>,
}

#[derive(Deserialize)]
struct DescriptorWire {
    #[serde(default)]
    entries: Option<Vec<EntryWire>>,
}

#[derive(Deserialize)]
struct EntryWire {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

impl CheckRequestWire {
    /// The request, if every field is valid; field names get `prefix` (e.g. `checks[3].`).
    pub(super) fn validate(self, prefix: &str) -> Result<CheckRequest, FieldError> {
        let named = |e: FieldError| FieldError::new(format!("{prefix}{}", e.field), e.detail);
        let cost = self.cost.unwrap_or(1);
        if cost == 0 || cost.unsigned_abs() > MAX_COST {
            return Err(named(FieldError::new(
                "cost",
                format!(
                    "must be an integer from 1 to {MAX_COST} (or, at the limiter, from -{MAX_COST} to -1 for a refund)"
                ),
            )));
        }
        let user_id = self
            .user_id
            .map(canonical_user_id)
            .transpose()
            .map_err(named)?;
        let Some(descriptors) = self.descriptors else {
            let user_id = user_id
                .ok_or_else(|| FieldError::new("user_id", "is required"))
                .map_err(named)?;
            if self.domain.is_some() {
                return Err(named(FieldError::new(
                    "descriptors",
                    "is required with a domain",
                )));
            }
            let mut request = CheckRequest::user(user_id, 1);
            request.cost = cost;
            return Ok(request);
        };
        let domain = match self.domain {
            Some(domain) => canonical_key("domain", domain).map_err(named)?,
            None => DEFAULT_DOMAIN.to_owned(),
        };
        if descriptors.is_empty() || descriptors.len() > MAX_DESCRIPTORS {
            return Err(named(FieldError::new(
                "descriptors",
                format!("must hold 1 to {MAX_DESCRIPTORS} descriptors"),
            )));
        }
        let descriptors = descriptors
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let field = format!("descriptors[{i}].entries");
                let entries = d
                    .entries
                    .filter(|e| !e.is_empty() && e.len() <= MAX_ENTRIES)
                    .ok_or_else(|| {
                        FieldError::new(&field, format!("must hold 1 to {MAX_ENTRIES} entries"))
                    })?;
                let entries = entries
                    .into_iter()
                    .enumerate()
                    .map(|(j, e)| {
                        let key = e
                            .key
                            .ok_or_else(|| {
                                FieldError::new(format!("{field}[{j}].key"), "is required")
                            })
                            .and_then(|k| canonical_key(&format!("{field}[{j}].key"), k))?;
                        let value = e
                            .value
                            .ok_or_else(|| {
                                FieldError::new(format!("{field}[{j}].value"), "is required")
                            })
                            .and_then(|v| {
                                canonical_user_id(v).map_err(|e| {
                                    FieldError::new(format!("{field}[{j}].value"), e.detail)
                                })
                            })?;
                        Ok(Entry { key, value })
                    })
                    .collect::<Result<Vec<_>, FieldError>>()?;
                Ok(Descriptor { entries })
            })
            .collect::<Result<Vec<_>, FieldError>>()
            .map_err(named)?;
        let user_id = user_id.unwrap_or_else(|| analytics_identity(&descriptors));
        Ok(CheckRequest {
            user_id,
            domain,
            descriptors,
            cost,
        })
    }
}

impl FromJson for CheckRequest {
    /// Decodes and validates a JSON body, naming the offending field on failure.
    fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        decode::<CheckRequestWire>(body)?.validate("")
    }
}

/// The limiter's answer to `POST /check`. The top-level numbers are those of the limit
/// closest to refusing (when refused: the enforced limit that refused with the longest
/// wait); `limits` lists every limit that applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResponse {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after_ms: u64,
    pub reset_after_ms: u64,
    /// Time an empty bucket takes to refill completely (the policy's window).
    #[serde(default)]
    pub window_ms: u64,
    /// Decided by the local fallback bucket while the shared store was unreachable.
    #[serde(default)]
    pub degraded: bool,
    /// Every limit that applied, in the order of the request's descriptors.
    #[serde(default)]
    pub limits: Vec<LimitStatus>,
}

/// One limit's part in a decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    pub name: String,
    /// `token_bucket`, `fixed_window` or `sliding_window`.
    pub algorithm: String,
    /// Index of the descriptor it applied to.
    pub descriptor: usize,
    pub limit: u64,
    pub remaining: u64,
    pub reset_after_ms: u64,
    /// Zero when this limit admits the request.
    pub retry_after_ms: u64,
    pub window_ms: u64,
    /// This limit refuses the request (for a shadow limit: would have refused).
    pub refused: bool,
    /// Decided and reported, never enforced.
    #[serde(default)]
    pub shadow: bool,
}
