//! The event every decision emits, and its JSON encoding on the stream.

use serde::{Deserialize, Serialize};

/// The schema version this build writes and accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// One rate-limit decision, as the analytics path sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitEvent {
    pub schema_version: u32,
    pub user_id: String,
    pub allowed: bool,
    pub cost: u64,
    /// When the decision was made, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The limiter instance that decided.
    pub limiter_id: String,
    /// Decided by the local fallback bucket while the shared store was unreachable.
    #[serde(default)]
    pub degraded: bool,
    /// The request's domain, when not the default one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// What each rule's limit made of the request (absent for the built-in rule alone,
    /// whose counts are the global ones): its name and outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleHit>,
}

/// One limit's part in a decision, as the per-rule analytics count it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHit {
    /// `<domain>:<limit name>`.
    pub rule: String,
    pub outcome: RuleOutcome,
}

/// How a limit took part in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleOutcome {
    /// It admitted a request that was admitted.
    Allowed,
    /// It refused the request (enforced).
    Blocked,
    /// A shadow limit that would have refused the request.
    ShadowBlocked,
}

/// Why bytes on the stream are not a usable event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a rate-limit event: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported schema version {0} (this build reads {SCHEMA_VERSION})")]
    UnsupportedVersion(u32),
}

impl RateLimitEvent {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and booleans cannot fail.
        serde_json::to_vec(self).expect("event serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let event: Self = serde_json::from_slice(bytes)?;
        if event.schema_version != SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedVersion(event.schema_version));
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> RateLimitEvent {
        RateLimitEvent {
            schema_version: SCHEMA_VERSION,
            user_id: "u\"1}{\u{1F600}".into(),
            allowed: false,
            cost: 3,
            ts_ms: 1_700_000_000_000,
            limiter_id: "host-1".into(),
            degraded: true,
            domain: Some("api".into()),
            rules: vec![RuleHit {
                rule: "api:burst".into(),
                outcome: RuleOutcome::ShadowBlocked,
            }],
        }
    }

    #[test]
    fn round_trips() {
        let e = event();
        assert_eq!(RateLimitEvent::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn rejects_other_schema_versions() {
        let mut e = event();
        e.schema_version = 2;
        assert!(matches!(
            RateLimitEvent::decode(&e.encode()),
            Err(DecodeError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(RateLimitEvent::decode(b"\xff\x00garbage").is_err());
        assert!(RateLimitEvent::decode(b"{}").is_err());
        assert!(RateLimitEvent::decode(b"").is_err());
    }

    proptest! {
        // Fuzzing: many more cases than the default 256, still well under a second.
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        // Fuzz: the worker's decoder never panics on arbitrary bytes.

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = RateLimitEvent::decode(&bytes);
        }

        // Fuzz: near-miss JSON objects are decoded or refused, never a panic.
        #[test]
        fn decoding_mutated_events_never_panics(pos in 0usize..200, byte in any::<u8>()) {
            let mut bytes = event().encode();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            let _ = RateLimitEvent::decode(&bytes);
        }
    }
}
