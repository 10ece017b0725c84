//! JSON wire types of the public API and the validation of what clients send.

use serde::{Deserialize, Serialize};

use crate::descriptor::{DEFAULT_DOMAIN, Descriptor, Entry, USER_ID_KEY};

/// Longest accepted `user_id`, in bytes of UTF-8.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Largest accepted `cost`.
pub const MAX_COST: u64 = 1_000_000;
/// Largest accepted request body, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// Largest body of an `/admin` request (an override document), at the limiter and at the
/// gateway that passes it on.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

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

/// Most descriptors in one request.
pub const MAX_DESCRIPTORS: usize = 16;
/// Most entries in one descriptor.
pub const MAX_ENTRIES: usize = 16;
/// Longest descriptor key or domain, in bytes of UTF-8 (values are as long as user ids).
pub const MAX_KEY_BYTES: usize = 128;

/// `POST /check` at the limiter and `POST /api` at the gateway: a request's domain and
/// descriptors (`{"user_id":"u1"}` is the descriptor `[user_id=u1]` of the default domain),
/// and its cost. A negative cost is a refund (accepted at the limiter only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    /// Who the analytics count the decision for: the `user_id` given, else the `user_id`
    /// entry of the first descriptor that has one, else the first descriptor's entries
    /// written `key=value/key=value` (cut to [`MAX_USER_ID_BYTES`]).
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
struct CheckRequestWire {
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

/// A domain or descriptor key: 1 to [`MAX_KEY_BYTES`] bytes, the identity rule of ids.
fn canonical_key(field: &str, raw: String) -> Result<String, FieldError> {
    if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be 1 to {MAX_KEY_BYTES} bytes of UTF-8"),
        ));
    }
    canonical_user_id(raw).map_err(|e| FieldError::new(field, e.detail))
}

impl CheckRequestWire {
    /// The request, if every field is valid; field names get `prefix` (e.g. `checks[3].`).
    fn validate(self, prefix: &str) -> Result<CheckRequest, FieldError> {
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

/// Who the analytics count a descriptor request for, when it names no `user_id`: the
/// `user_id` entry of the first descriptor that has one, else the first descriptor's
/// entries as `key=value/key=value`, cut at a character boundary to the longest id.
pub fn analytics_identity(descriptors: &[Descriptor]) -> String {
    if let Some(entry) = descriptors
        .iter()
        .flat_map(|d| &d.entries)
        .find(|e| e.key == USER_ID_KEY)
    {
        return entry.value.clone();
    }
    let mut id = String::new();
    for (i, e) in descriptors
        .first()
        .map(|d| d.entries.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if i > 0 {
            id.push('/');
        }
        id.push_str(&e.key);
        id.push('=');
        id.push_str(&e.value);
    }
    if id.len() > MAX_USER_ID_BYTES {
        let mut cut = MAX_USER_ID_BYTES;
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        id.truncate(cut);
    }
    if id.is_empty() {
        id.push('-');
    }
    id
}

/// Decodes a JSON object body into `T`, naming the offending field on failure.
fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FieldError> {
    // serde would also read a struct from a JSON array; only an object is a request.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(FieldError::new("body", "must be a JSON object"));
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

impl CheckRequest {
    /// Decodes and validates a JSON body, naming the offending field on failure.
    pub fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        decode::<CheckRequestWire>(body)?.validate("")
    }
}

/// Most checks in one `POST /check/batch`.
pub const MAX_BATCH: usize = 256;
/// Largest accepted `POST /check/batch` body, in bytes: room for [`MAX_BATCH`] checks of the
/// longest user id with every character escaped.
pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

/// `POST /check/batch` at the limiter: several checks decided in one exchange, in order.
/// The gateway sends what queued up while its previous exchanges were in flight.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct BatchRequest {
    pub checks: Vec<CheckRequest>,
    /// Checks the gateway has already refused from its refusal cache (a refusal the limiter
    /// made that still holds), sent to be counted: the limiter publishes their events and
    /// decides nothing. No answer comes back for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedCheck>,
    /// Notices in `refused` that were not valid, dropped when decoding (each alone).
    #[serde(skip)]
    pub dropped: usize,
}

/// A check the gateway refused itself, and the names of the limits that refused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedCheck {
    pub check: CheckRequest,
    pub limits: Vec<String>,
}

impl RefusedCheck {
    /// A notice of `check` refused by the limits `names` (sorted, each once), if it is one
    /// the limiter takes: a positive cost, 1 to [`MAX_LIMITS_PER_REQUEST`] names of 1 to
    /// [`MAX_LIMIT_NAME_BYTES`] bytes. The gateway builds its notices here, and the
    /// limiter accepts exactly these, so the two agree by construction.
    pub fn new(check: CheckRequest, names: impl IntoIterator<Item = String>) -> Option<Self> {
        let mut limits: Vec<String> = names.into_iter().collect();
        limits.sort_unstable();
        limits.dedup();
        let valid = check.cost > 0
            && !limits.is_empty()
            && limits.len() <= MAX_LIMITS_PER_REQUEST
            && limits
                .iter()
                .all(|n| !n.is_empty() && n.len() <= MAX_LIMIT_NAME_BYTES);
        valid.then_some(Self { check, limits })
    }

    fn from_wire(wire: RefusedCheckWire) -> Option<Self> {
        let check = wire.check?.validate("").ok()?;
        let limits = wire.limits.unwrap_or_default();
        if limits.len() > MAX_LIMITS_PER_REQUEST {
            return None;
        }
        Self::new(check, limits)
    }
}

#[derive(Deserialize)]
struct BatchRequestWire {
    #[serde(default)]
    checks: Option<Vec<CheckRequestWire>>,
    #[serde(default)]
    refused: Option<Vec<RefusedCheckWire>>,
}

#[derive(Deserialize)]
struct RefusedCheckWire {
    #[serde(default)]
    check: Option<CheckRequestWire>,
    #[serde(default)]
    limits: Option<Vec<String>>,
}

impl BatchRequest {
    /// Decodes and validates a JSON body; a bad check is named by its index
    /// (`checks[3].user_id`).
    pub fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        let wire = decode::<BatchRequestWire>(body)?;
        let refused = wire.refused.unwrap_or_default();
        let checks = match wire.checks {
            Some(checks) => checks,
            None if !refused.is_empty() => Vec::new(),
            None => return Err(FieldError::new("checks", "is required")),
        };
        if (checks.is_empty() && refused.is_empty()) || checks.len() > MAX_BATCH {
            return Err(FieldError::new(
                "checks",
                format!("must hold 1 to {MAX_BATCH} checks"),
            ));
        }
        if refused.len() > MAX_BATCH {
            return Err(FieldError::new(
                "refused",
                format!("must hold at most {MAX_BATCH} checks"),
            ));
        }
        let checks = checks
            .into_iter()
            .enumerate()
            .map(|(i, wire)| wire.validate(&format!("checks[{i}].")))
            .collect::<Result<_, _>>()?;
        // A notice is one user's: a bad one is dropped alone (and counted), never the
        // batch, so that nothing one user sends changes another's answer.
        let mut dropped = 0;
        let refused = refused
            .into_iter()
            .filter_map(|wire| {
                let notice = RefusedCheck::from_wire(wire);
                dropped += usize::from(notice.is_none());
                notice
            })
            .collect();
        Ok(Self {
            checks,
            refused,
            dropped,
        })
    }
}

/// Most limits one request can meet: every descriptor with the most limits a rule holds
/// (the same limit counts again when a descriptor is repeated).
pub const MAX_LIMITS_PER_REQUEST: usize = MAX_DESCRIPTORS * crate::rules::MAX_LIMITS_PER_DESCRIPTOR;
/// The longest limit name, written in a rules file or an override, or made from a rule's
/// place in the tree (shortened with a hash past it): the bound the gateway's refusal
/// notices are held to, by construction.
pub const MAX_LIMIT_NAME_BYTES: usize = crate::rules::MAX_KEY_BYTES;

/// The limiter's answer to `POST /check/batch`: one result per check, in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub results: Vec<BatchResult>,
    /// Moves whenever some limit at this limiter may have gained room other than by time
    /// (a rule or override change, a reset, a refund): refusals the gateway remembers from
    /// an earlier generation no longer hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Which life of the limiter answered: its start time (milliseconds since the Unix
    /// epoch) in the high bits and random low bits, so that a restarted limiter at the same
    /// address, or another pod behind the same Service address, never answers with the
    /// generation of another (see [`Generation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<u64>,
}

/// The state of one limiter that a refusal was made under: its incarnation (one per
/// process) and its generation counter (which moves whenever a limit there may have gained
/// room other than by time). Ordered: a later process, then a later change, is greater; a
/// gateway takes a replica's answers only in that order, so a late answer cannot set it
/// back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation {
    pub incarnation: u64,
    pub counter: u64,
}

impl BatchResponse {
    /// The generation this answer was made under, if the limiter says (an older limiter
    /// gives its counter only, with incarnation 0).
    pub fn made_under(&self) -> Option<Generation> {
        self.generation.map(|counter| Generation {
            incarnation: self.incarnation.unwrap_or(0),
            counter,
        })
    }
}

/// One check's result: `{"ok":{...}}` with the decision as `POST /check` answers it, or
/// `{"error":{...}}` with the error body `POST /check` would have answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchResult {
    Ok(CheckResponse),
    Error(ErrorBody),
}

/// The identity rule: a user id is compared, stored and keyed in Unicode Normalization
/// Form C, so a decomposed `é` (`e` + U+0301) and a precomposed one (U+00E9) are one user;
/// and it may not hold characters that render as nothing or reorder what is around them
/// (control characters, format characters such as U+200B zero-width space, U+200D
/// zero-width joiner, U+202E right-to-left override or U+FEFF, and the line and
/// paragraph separators), so two ids that look the same on the dashboard are the same id.
///
/// Stable across versions: an id that is already NFC and free of those characters (every
/// ASCII id without control characters is) is used byte for byte as before, so its bucket
/// and counters do not move on upgrade. Returns the canonical id, or why it is refused.
pub fn canonical_user_id(raw: String) -> Result<String, FieldError> {
    let id = if raw.is_ascii()
        || unicode_normalization::is_nfc_quick(raw.chars())
            == unicode_normalization::IsNormalized::Yes
    {
        raw
    } else {
        use unicode_normalization::UnicodeNormalization;
        raw.nfc().collect()
    };
    validate_user_id(&id)?;
    Ok(id)
}

/// Whether `user_id` is a valid id as it stands: 1..=256 bytes of UTF-8 without control,
/// format or separator characters (see [`canonical_user_id`], which also normalises it).
pub fn validate_user_id(user_id: &str) -> Result<(), FieldError> {
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(FieldError::new(
            "user_id",
            format!("must be 1 to {MAX_USER_ID_BYTES} bytes of UTF-8"),
        ));
    }
    if user_id.chars().any(char::is_control) {
        return Err(FieldError::new(
            "user_id",
            "must not contain control characters",
        ));
    }
    if !user_id.is_ascii() && user_id.chars().any(is_invisible) {
        return Err(FieldError::new(
            "user_id",
            "must not contain invisible format characters (zero-width characters, bidirectional controls, line or paragraph separators)",
        ));
    }
    Ok(())
}

/// Format characters (general category Cf) and the line and paragraph separators.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
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

/// A user's all-time counters, as `GET /analytics/:user_id` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAnalytics {
    pub user_id: String,
    pub total: u64,
    pub allowed: u64,
    pub blocked: u64,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_batch_is_validated_check_by_check_and_names_the_bad_one() {
        let b =
            BatchRequest::from_json(br#"{"checks":[{"user_id":"a"},{"user_id":"b","cost":3}]}"#)
                .unwrap();
        assert_eq!(
            b.checks,
            [CheckRequest::user("a", 1), CheckRequest::user("b", 3)]
        );
        let field = |body: &[u8]| BatchRequest::from_json(body).unwrap_err().field;
        assert_eq!(
            field(br#"{"checks":[{"user_id":"a"},{"cost":2}]}"#),
            "checks[1].user_id"
        );
        assert_eq!(
            field(br#"{"checks":[{"user_id":"a","cost":0}]}"#),
            "checks[0].cost"
        );
        assert_eq!(
            field(br#"{"checks":[{"user_id":""}]}"#),
            "checks[0].user_id"
        );
        assert_eq!(field(br#"{"checks":[{"user_id":7}]}"#), "checks[0].user_id");
        assert_eq!(field(br#"{"checks":[]}"#), "checks");
        assert_eq!(field(br#"{}"#), "checks");
        assert_eq!(field(br#"[]"#), "body");
        let many = format!(
            r#"{{"checks":[{}]}}"#,
            vec![r#"{"user_id":"u"}"#; MAX_BATCH + 1].join(",")
        );
        assert_eq!(field(many.as_bytes()), "checks");
    }

    #[test]
    fn a_batch_may_carry_refusals_to_count_and_they_are_validated_too() {
        let b = BatchRequest::from_json(
            br#"{"refused":[{"check":{"user_id":"a","cost":2},"limits":["default"]}]}"#,
        )
        .unwrap();
        assert!(b.checks.is_empty());
        assert_eq!(
            b.refused,
            [RefusedCheck {
                check: CheckRequest::user("a", 2),
                limits: vec!["default".into()]
            }]
        );
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(BatchRequest::from_json(json.as_bytes()).unwrap(), b);
        // A bad notice is dropped alone: the batch's checks are still decided.
        for bad in [
            r#"{"check":{"user_id":"a"},"limits":[]}"#,
            r#"{"check":{"user_id":"a","cost":-1},"limits":["x"]}"#,
            r#"{"check":{"user_id":""},"limits":["x"]}"#,
            r#"{"limits":["x"]}"#,
            r#"{"check":{"user_id":"a"},"limits":[""]}"#,
        ] {
            let body = format!(r#"{{"checks":[{{"user_id":"b"}}],"refused":[{bad}]}}"#);
            let b = BatchRequest::from_json(body.as_bytes()).unwrap();
            assert_eq!(
                (b.checks.len(), b.refused.len(), b.dropped),
                (1, 0, 1),
                "{bad}"
            );
        }
        let field = |body: &[u8]| BatchRequest::from_json(body).unwrap_err().field;
        assert_eq!(field(br#"{"checks":[],"refused":[]}"#), "checks");
    }

    /// What a rule can name (a limit name of 256 bytes, 16 descriptors of 16 limits, the
    /// same descriptor twice) is a notice the limiter takes; the names are sent once each.
    #[test]
    fn every_refusal_a_rule_can_make_is_a_notice_the_limiter_takes() {
        let long = "n".repeat(MAX_LIMIT_NAME_BYTES);
        let many: Vec<String> = (0..MAX_LIMITS_PER_REQUEST)
            .map(|i| format!("l{i}"))
            .collect();
        for names in [
            vec![long.clone()],
            many.clone(),
            vec!["burst".to_owned(), "burst".to_owned()],
        ] {
            let notice = RefusedCheck::new(CheckRequest::user("a", 1), names.clone())
                .unwrap_or_else(|| panic!("{names:?}"));
            let body = serde_json::to_string(&BatchRequest {
                refused: vec![notice.clone()],
                ..Default::default()
            })
            .unwrap();
            let b = BatchRequest::from_json(body.as_bytes()).unwrap();
            assert_eq!((b.refused, b.dropped), (vec![notice], 0));
        }
        let notice = RefusedCheck::new(
            CheckRequest::user("a", 1),
            ["b".into(), "a".into(), "b".into()],
        );
        assert_eq!(notice.unwrap().limits, ["a", "b"]);
        assert!(RefusedCheck::new(CheckRequest::user("a", 1), [long + "n"]).is_none());
    }

    #[test]
    fn batch_results_round_trip_as_ok_or_error() {
        let response = BatchResponse {
            results: vec![
                BatchResult::Ok(CheckResponse {
                    allowed: true,
                    limit: 10,
                    remaining: 9,
                    retry_after_ms: 0,
                    reset_after_ms: 100,
                    window_ms: 1000,
                    degraded: false,
                    limits: Vec::new(),
                }),
                BatchResult::Error(ErrorBody {
                    error: "unavailable".into(),
                    detail: "down".into(),
                    field: None,
                }),
            ],
            generation: Some(3),
            incarnation: Some(7),
        };
        let json = serde_json::to_string(&response).unwrap();
        assert!(
            json.starts_with(r#"{"results":[{"ok":{"allowed":true"#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"error":{"error":"unavailable""#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<BatchResponse>(&json).unwrap(),
            response
        );
    }

    #[test]
    fn descriptor_requests_round_trip_and_name_their_analytics_identity() {
        let r = CheckRequest::from_json(
            br#"{"domain":"api","descriptors":[{"entries":[{"key":"plan","value":"free"},{"key":"user_id","value":"u1"}]},{"entries":[{"key":"path","value":"/x"}]}],"cost":2}"#,
        )
        .unwrap();
        assert_eq!(r.domain, "api");
        assert_eq!(r.descriptors.len(), 2);
        assert_eq!(r.user_id, "u1");
        assert_eq!(r.cost, 2);
        let again = CheckRequest::from_json(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        let anonymous = CheckRequest::from_json(
            br#"{"domain":"api","descriptors":[{"entries":[{"key":"api_key","value":"k1"},{"key":"path","value":"/x"}]}]}"#,
        )
        .unwrap();
        assert_eq!(anonymous.user_id, "api_key=k1/path=/x");
        // The built-in form travels as it always did.
        let plain = CheckRequest::user("u1", 1);
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"user_id":"u1","cost":1}"#
        );
        let refund = CheckRequest::from_json(br#"{"user_id":"u1","cost":-3}"#).unwrap();
        assert_eq!(refund.cost, -3);
        let many = format!(
            r#"{{"descriptors":[{}]}}"#,
            vec![r#"{"entries":[{"key":"k","value":"v"}]}"#; MAX_DESCRIPTORS + 1].join(",")
        );
        assert_eq!(
            CheckRequest::from_json(many.as_bytes()).unwrap_err().field,
            "descriptors"
        );
    }

    #[test]
    fn accepts_a_plain_request_and_defaults_cost() {
        let r = CheckRequest::from_json(br#"{"user_id":"u1"}"#).unwrap();
        assert_eq!(r, CheckRequest::user("u1", 1));
        let r =
            CheckRequest::from_json(br#"{"user_id":"\u00e9\u6f22","cost":5,"extra":[1]}"#).unwrap();
        assert_eq!(r.user_id, "é漢");
        assert_eq!(r.cost, 5);
    }

    /// Look-alike ids: a decomposed `é` is the precomposed one; zero-width and
    /// bidirectional characters are refused, naming the field.
    #[test]
    fn look_alike_ids_are_one_id_or_refused() {
        let decomposed =
            CheckRequest::from_json("{\"user_id\":\"caf\u{65}\u{301}\"}".as_bytes()).unwrap();
        let precomposed =
            CheckRequest::from_json("{\"user_id\":\"caf\u{e9}\"}".as_bytes()).unwrap();
        assert_eq!(decomposed.user_id, precomposed.user_id);
        assert_eq!(precomposed.user_id, "caf\u{e9}");
        for invisible in [
            "\u{200b}", "\u{200d}", "\u{202e}", "\u{2066}", "\u{feff}", "\u{ad}", "\u{2028}",
        ] {
            let body = format!("{{\"user_id\":\"ad{invisible}min\"}}");
            let err = CheckRequest::from_json(body.as_bytes()).unwrap_err();
            assert!(err.field == "user_id", "{invisible:?}: {err:?}");
        }
    }

    /// The rule keeps every id that was valid and canonical before byte for byte, so no
    /// bucket moves on upgrade.
    #[test]
    fn canonical_ids_are_kept_byte_for_byte() {
        for id in [
            "u1",
            "user-42@example.com",
            "\u{e9}\u{6f22}",
            "\u{1f600}",
            "a b",
            "\u{5d0}\u{5d1}",
        ] {
            assert_eq!(canonical_user_id(id.to_owned()).unwrap(), id);
        }
    }

    #[test]
    fn names_the_offending_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{}"#, "user_id"),
            (br#"{"user_id":null}"#, "user_id"),
            (br#"{"user_id":5}"#, "user_id"),
            (br#"{"user_id":""}"#, "user_id"),
            (br#"{"user_id":"a\u0000b"}"#, "user_id"),
            (br#"{"user_id":"a\nb"}"#, "user_id"),
            (br#"{"user_id":"u","cost":0}"#, "cost"),
            (br#"{"user_id":"u","cost":-1000001}"#, "cost"),
            (br#"{"user_id":"u","descriptors":[]}"#, "descriptors"),
            (br#"{"domain":"api"}"#, "user_id"),
            (br#"{"user_id":"u","domain":"api"}"#, "descriptors"),
            (
                br#"{"descriptors":[{"entries":[]}]}"#,
                "descriptors[0].entries",
            ),
            (
                br#"{"descriptors":[{"entries":[{"key":"k"}]}]}"#,
                "descriptors[0].entries[0].value",
            ),
            (
                br#"{"descriptors":[{"entries":[{"key":"","value":"v"}]}]}"#,
                "descriptors[0].entries[0].key",
            ),
            (
                br#"{"descriptors":[{"entries":[{"key":"k","value":"a\u202eb"}]}]}"#,
                "descriptors[0].entries[0].value",
            ),
            (
                br#"{"descriptors":[{"entries":[{"key":"k","value":"v"}]}],"domain":""}"#,
                "domain",
            ),
            (br#"{"user_id":"u","cost":1.5}"#, "cost"),
            (br#"{"user_id":"u","cost":"1"}"#, "cost"),
            (br#"{"user_id":"u","cost":1000001}"#, "cost"),
            (br#"[1,2]"#, "body"),
            (br#"{"user_id":"u""#, "body"),
            (b"\xff\xfe", "body"),
        ];
        for (body, field) in cases {
            let err = CheckRequest::from_json(body).unwrap_err();
            assert_eq!(
                &err.field,
                field,
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(257));
        assert_eq!(
            CheckRequest::from_json(long.as_bytes()).unwrap_err().field,
            "user_id"
        );
        let max = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(256));
        assert!(CheckRequest::from_json(max.as_bytes()).is_ok());
    }

    proptest! {
        // Fuzzing: many more cases than the default 256, still well under a second.
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        // Fuzz: decoding arbitrary bytes never panics, and anything accepted is valid.

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(r) = CheckRequest::from_json(&bytes) {
                prop_assert!(validate_user_id(&r.user_id).is_ok());
                prop_assert!(r.cost != 0 && r.cost.unsigned_abs() <= MAX_COST);
            }
        }

        /// Any id without control, format or separator characters is accepted as its NFC
        /// form, and that form is its own canonical id (the rule is idempotent).
        #[test]
        fn any_valid_user_id_round_trips_as_its_nfc_form(user in "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,64}") {
            use unicode_normalization::UnicodeNormalization;
            let nfc: String = user.nfc().collect();
            prop_assume!(nfc.len() <= MAX_USER_ID_BYTES);
            let body = serde_json::to_vec(&serde_json::json!({"user_id": user})).unwrap();
            let id = CheckRequest::from_json(&body).unwrap().user_id;
            prop_assert_eq!(&id, &nfc);
            prop_assert_eq!(canonical_user_id(id.clone()).unwrap(), id);
        }
    }
}
