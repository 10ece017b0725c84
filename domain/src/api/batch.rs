//! `POST /check/batch`: the gateway's exchange with a limiter.

use serde::{Deserialize, Serialize};

use super::check::CheckRequestWire;
use super::{
    CheckError, CheckRequest, CheckResponse, FieldError, FromJson, MAX_DESCRIPTORS, decode,
};

/// Most checks in one `POST /check/batch`.
pub const MAX_BATCH: usize = 256;
/// Largest accepted `POST /check/batch` body, in bytes: room for [`MAX_BATCH`] checks of the
/// longest user id with every character escaped.
pub const MAX_BATCH_BODY_BYTES: usize = 1024 * 1024;

/// `POST /check/batch` at the limiter: several checks decided in one exchange, in order.
/// The gateway sends what queued up while its previous exchanges were in flight.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct BatchRequest {
    /// The sender's name for this batch, the same when it sends the batch again to
    /// another replica (the one it asked died without answering): a replica that finds
    /// the batch's checks decided under it answers as they were decided, spending and
    /// counting nothing more. 1 to [`MAX_BATCH_ID_BYTES`] of `[0-9A-Za-z_-]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Sent again (to another replica) under the same `id`: only then does the limiter
    /// look for what was decided under it, so a first sending costs no lookup.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub again: bool,
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

/// The longest batch id.
pub const MAX_BATCH_ID_BYTES: usize = 64;

#[derive(Deserialize)]
struct BatchRequestWire {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    again: bool,
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

impl FromJson for BatchRequest {
    /// Decodes and validates a JSON body; a bad check is named by its index
    /// (`checks[3].user_id`).
    fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        let wire = decode::<BatchRequestWire>(body)?;
        if let Some(id) = &wire.id
            && (id.is_empty()
                || id.len() > MAX_BATCH_ID_BYTES
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(FieldError::new(
                "id",
                format!("must be 1 to {MAX_BATCH_ID_BYTES} of [0-9A-Za-z_-]"),
            ));
        }
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
        if wire.again && wire.id.is_none() {
            return Err(FieldError::new("again", "needs an id"));
        }
        Ok(Self {
            id: wire.id,
            again: wire.again,
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
/// `{"error":{...}}` with why it got none, as an [`super::ErrorBody`] whose `field` and
/// `detail` are apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchResult {
    Ok(CheckResponse),
    Error(CheckError),
}
