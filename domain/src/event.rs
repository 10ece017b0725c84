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
    /// What each request of the decision cost (the tokens it asked for).
    pub cost: u64,
    /// How many requests the event stands for, all with the same outcome: 1 for a decision
    /// of the limiter's own; what a report names for requests decided elsewhere (Envoy's
    /// quota filter reports how many it admitted and denied). The counters add this many.
    /// Absent from the encoding when 1, so an ordinary event's wire form is unchanged and
    /// events of earlier builds decode as one request.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u64,
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
    /// Who published the event and where in its sequence: what the counters deduplicate
    /// on, whatever the broker does to offsets. Absent from events of earlier builds (and
    /// of the in-process stream), which are deduplicated on the stream's offsets instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
}

fn one() -> u64 {
    1
}

// serde's `skip_serializing_if` passes a reference.
fn is_one(n: &u64) -> bool {
    *n == 1
}

/// A publisher's identity and an event's place in its sequence.
///
/// `epoch` is random per publishing process (a restart is a new epoch), and `seq` grows by
/// one per event published under it, in the order the events are handed to the broker: so
/// the events of one epoch reach any one partition (one user's always reach the same one,
/// keyed by `user_id`) in increasing `seq`, and a counter that remembers the highest `seq`
/// it applied per epoch recognises every replay, whatever offsets the broker gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub epoch: String,
    pub seq: u64,
}

impl Stamp {
    /// How long a publisher keeps one epoch before it starts a new one (at most): the
    /// counters can then forget an epoch's bookkeeping once it is older than this plus
    /// the replay window they promise ([`Stamp::started_secs`]).
    pub const EPOCH_LIFETIME_SECS: u64 = 86_400;

    /// A fresh epoch started at `now_secs` (Unix seconds): `<start, hex>-<64 random bits,
    /// hex>`, so whoever keeps per-epoch records can tell an old epoch by its name.
    pub fn new_epoch(now_secs: u64) -> String {
        use std::hash::{BuildHasher, Hasher};
        // `RandomState` is seeded from the OS's randomness once per process (and moves on
        // for each new one); the time and pid make two processes' epochs differ even if not.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        format!("{now_secs:x}-{:016x}", h.finish())
    }

    /// When an epoch made by [`Stamp::new_epoch`] started (Unix seconds).
    pub fn started_secs(epoch: &str) -> Option<u64> {
        u64::from_str_radix(epoch.split_once('-')?.0, 16).ok()
    }
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

/// What a decision's event will say, known before the decision is made: for a store that
/// records the event in the same atomic step as the decision (the Redis outbox), which
/// fills in the outcome ([`EventTemplate::event`]). Short field names: it is stored with
/// every outboxed decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTemplate {
    #[serde(rename = "u")]
    pub user_id: String,
    #[serde(rename = "c")]
    pub cost: u64,
    #[serde(rename = "l")]
    pub limiter_id: String,
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Per limit of the request, in the store's order: its rule (`<domain>:<limit name>`)
    /// and whether it is a shadow limit. Empty when the event lists no rules (the built-in
    /// rule alone).
    #[serde(rename = "r", default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<(String, bool)>,
}

impl EventTemplate {
    /// The event of the decision: `allowed`, and per limit whether it admitted the cost
    /// (in the order of [`EventTemplate::rules`]), decided at `ts_ms`. Each rule's outcome
    /// is what the limiter reports for the same answer: a refusing shadow limit is
    /// `shadow_blocked`, an admitting one of an admitted request `allowed`, a refusing
    /// enforced one `blocked`; an admitting limit of a refused request is left out.
    pub fn event(&self, allowed: bool, admits: &[bool], ts_ms: u64) -> RateLimitEvent {
        let rules = self
            .rules
            .iter()
            .zip(admits.iter().copied().chain(std::iter::repeat(allowed)))
            .filter_map(|((rule, shadow), admits)| {
                let refused = self.cost > 0 && !admits;
                let outcome = match (*shadow, refused, allowed) {
                    (true, true, _) => RuleOutcome::ShadowBlocked,
                    (_, false, true) => RuleOutcome::Allowed,
                    (false, true, _) => RuleOutcome::Blocked,
                    (_, false, false) => return None,
                };
                Some(RuleHit {
                    rule: rule.clone(),
                    outcome,
                })
            })
            .collect();
        RateLimitEvent {
            schema_version: SCHEMA_VERSION,
            user_id: self.user_id.clone(),
            allowed,
            cost: self.cost,
            count: 1,
            ts_ms,
            limiter_id: self.limiter_id.clone(),
            degraded: false,
            domain: self.domain.clone(),
            rules,
            stamp: None,
        }
    }
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
    /// One request of cost 1 by `user_id`, decided by `limiter_id` at `ts_ms` in the default
    /// domain: not degraded, no rule hits, no stamp. Set the rest with struct update syntax.
    pub fn new(
        user_id: impl Into<String>,
        allowed: bool,
        ts_ms: u64,
        limiter_id: impl Into<String>,
    ) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            user_id: user_id.into(),
            allowed,
            cost: 1,
            count: 1,
            ts_ms,
            limiter_id: limiter_id.into(),
            degraded: false,
            domain: None,
            rules: Vec::new(),
            stamp: None,
        }
    }

    /// The requests the event stands for, as (allowed, blocked): its `count` on the side
    /// of its outcome (1 for a decision; a usage report's many).
    pub fn requests(&self) -> (u64, u64) {
        if self.allowed {
            (self.count, 0)
        } else {
            (0, self.count)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and booleans cannot fail.
        serde_json::to_vec(self).expect("event serializes")
    }

    /// [`RateLimitEvent::encode`] of this event with `stamp` in place of its own: the
    /// encoding is made first and the stamp appended, so a publisher can number events
    /// under a lock without encoding under it.
    pub fn encode_stamped(encoded: &mut Vec<u8>, stamp: &Stamp) {
        debug_assert_eq!(encoded.last(), Some(&b'}'));
        encoded.pop();
        encoded.extend_from_slice(b",\"stamp\":");
        // A struct of a string and an integer serializes.
        serde_json::to_writer(&mut *encoded, stamp).expect("stamp serializes");
        encoded.push(b'}');
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
            count: 1,
            ts_ms: 1_700_000_000_000,
            limiter_id: "host-1".into(),
            degraded: true,
            domain: Some("api".into()),
            rules: vec![RuleHit {
                rule: "api:burst".into(),
                outcome: RuleOutcome::ShadowBlocked,
            }],
            stamp: Some(Stamp {
                epoch: "00ff".into(),
                seq: 7,
            }),
        }
    }

    #[test]
    fn a_stamp_appended_to_an_encoding_decodes_as_the_stamped_event() {
        let mut e = event();
        let stamp = e.stamp.take().unwrap();
        let mut bytes = e.encode();
        RateLimitEvent::encode_stamped(&mut bytes, &stamp);
        e.stamp = Some(stamp);
        assert_eq!(RateLimitEvent::decode(&bytes).unwrap(), e);
    }

    /// An event of one request is encoded as before `count` existed, and an event of an
    /// earlier build (no `count`) decodes as one request; an event of many carries its count.
    #[test]
    fn count_is_absent_for_one_request_and_carried_for_many() {
        let mut e = event();
        let bytes = e.encode();
        assert!(!String::from_utf8_lossy(&bytes).contains("count"));
        let earlier = br#"{"schema_version":1,"user_id":"u","allowed":true,"cost":1,"ts_ms":5,"limiter_id":"l"}"#;
        assert_eq!(RateLimitEvent::decode(earlier).unwrap().count, 1);
        e.count = 50;
        e.stamp = None;
        let bytes = e.encode();
        assert!(String::from_utf8_lossy(&bytes).contains(r#""count":50"#));
        assert_eq!(RateLimitEvent::decode(&bytes).unwrap(), e);
        let mut stamped = bytes.clone();
        RateLimitEvent::encode_stamped(
            &mut stamped,
            &Stamp {
                epoch: "e".into(),
                seq: 1,
            },
        );
        assert_eq!(RateLimitEvent::decode(&stamped).unwrap().count, 50);
    }

    #[test]
    fn events_without_a_stamp_still_decode() {
        let mut e = event();
        e.stamp = None;
        let bytes = e.encode();
        assert!(!String::from_utf8_lossy(&bytes).contains("stamp"));
        assert_eq!(RateLimitEvent::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn epochs_differ_and_tell_their_start() {
        let (a, b) = (
            Stamp::new_epoch(1_700_000_000),
            Stamp::new_epoch(1_700_000_000),
        );
        assert_ne!(a, b);
        assert_eq!(Stamp::started_secs(&a), Some(1_700_000_000));
        assert_eq!(Stamp::started_secs("garbage"), None);
    }

    #[test]
    fn a_template_fills_in_each_rules_outcome() {
        let t = EventTemplate {
            user_id: "u".into(),
            cost: 2,
            limiter_id: "l".into(),
            domain: Some("api".into()),
            rules: vec![
                ("api:burst".into(), false),
                ("api:trial".into(), true),
                ("api:daily".into(), false),
            ],
        };
        let hits = |allowed, admits: &[bool]| -> Vec<(String, RuleOutcome)> {
            t.event(allowed, admits, 5)
                .rules
                .into_iter()
                .map(|h| (h.rule, h.outcome))
                .collect()
        };
        assert_eq!(
            hits(true, &[true, false, true]),
            vec![
                ("api:burst".into(), RuleOutcome::Allowed),
                ("api:trial".into(), RuleOutcome::ShadowBlocked),
                ("api:daily".into(), RuleOutcome::Allowed),
            ]
        );
        assert_eq!(
            hits(false, &[true, true, false]),
            vec![("api:daily".into(), RuleOutcome::Blocked)]
        );
        let e = t.event(false, &[true, true, false], 5);
        assert_eq!((e.user_id.as_str(), e.cost, e.ts_ms), ("u", 2, 5));
        let encoded = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<EventTemplate>(&encoded).unwrap(), t);
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
