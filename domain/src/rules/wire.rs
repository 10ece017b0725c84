//! The rules file as written: serde wire types, each validated as it is read so that an
//! error carries the line, column and field path of what is wrong.
//!
//! Every leaf checks itself (a [`Text`] its length and characters, a [`Unit`] its name, a
//! [`Requests`] its range); cross-field rules are checked by `TryFrom` when a mapping ends;
//! a list of descriptors refuses two siblings with the same composite key as it is read.
//!
//! Bounds that hold while reading, before anything can grow: a budget of descriptor nodes
//! and a nesting depth, both counted *before* a descriptor's content is read (so an alias
//! replayed a million times, or a file nested 10,000 deep, stops at the bound), lists of
//! limits and of `replaces` entries with a maximum length, strings checked before they are
//! copied, and `metadata` walked without being kept, against its own budget.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::limits::{Algorithm, LimitError, LimitSpec, MAX_REQUESTS};

use super::{
    MAX_DEPTH, MAX_KEY_BYTES, MAX_LIMITS_PER_DESCRIPTOR, MAX_METADATA_NODES, MAX_REPLACES,
    MAX_RULE_NODES,
};

thread_local! {
    /// Descriptor nodes that may still be read (set per file by [`ReadGuard`]).
    static NODES_LEFT: Cell<usize> = const { Cell::new(0) };
    /// Descriptor nesting depth of the node being read.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// `metadata` nodes that may still be walked.
    static METADATA_LEFT: Cell<usize> = const { Cell::new(0) };
}

/// Sets the reading budgets for one file, and reports and resets them when dropped.
pub(super) struct ReadGuard {
    budget: usize,
}

impl ReadGuard {
    /// Starts reading a file that may hold `nodes` descriptor nodes.
    pub(super) fn new(nodes: usize) -> Self {
        NODES_LEFT.with(|c| c.set(nodes));
        DEPTH.with(|c| c.set(0));
        METADATA_LEFT.with(|c| c.set(MAX_METADATA_NODES));
        Self { budget: nodes }
    }

    /// How many descriptor nodes were read so far.
    pub(super) fn used(&self) -> usize {
        self.budget - NODES_LEFT.with(Cell::get)
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        NODES_LEFT.with(|c| c.set(0));
        DEPTH.with(|c| c.set(0));
        METADATA_LEFT.with(|c| c.set(0));
    }
}

/// One level of descriptor nesting: counted on entry, given back on drop.
struct Level;

impl Level {
    fn enter() -> Result<Self, String> {
        let left = NODES_LEFT.with(Cell::get);
        if left == 0 {
            return Err(format!(
                "too many descriptors: a rule set holds at most {MAX_RULE_NODES}"
            ));
        }
        let depth = DEPTH.with(Cell::get);
        if depth >= MAX_DEPTH {
            return Err(format!(
                "descriptors nested too deep: at most {MAX_DEPTH} levels"
            ));
        }
        NODES_LEFT.with(|c| c.set(left - 1));
        DEPTH.with(|c| c.set(depth + 1));
        Ok(Level)
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// A rules file: one domain and its descriptor tree.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileWire {
    pub domain: Option<Text>,
    pub descriptors: Option<DescriptorList>,
}

/// A validated string: 1 to [`MAX_KEY_BYTES`] bytes without control characters. Checked
/// before it is copied, so an alias of a huge string costs nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a string of at most {MAX_KEY_BYTES} bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                check_text(v).map_err(E::custom)?;
                Ok(Text(v.to_owned()))
            }
        }
        // A plain scalar such as `value: 200` is read as its text, as Go's yaml.v2 does.
        d.deserialize_str(V)
    }
}

/// Why `v` is not a valid key, value, domain or name (the empty string is left to callers:
/// an empty `value` means "no value").
pub(super) fn check_text(v: &str) -> Result<(), String> {
    if v.len() > MAX_KEY_BYTES {
        return Err(format!(
            "must be at most {MAX_KEY_BYTES} bytes, got {}",
            v.len()
        ));
    }
    if v.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// Why no request could ever carry `text` as a descriptor's `what` (key or value): longer
/// than a request's bound, or refused or changed by the identity rule (a format character,
/// a text not in Unicode NFC). Such a rule would never match; it is refused at load.
fn carried(what: &str, text: &str, max_bytes: usize) -> Result<(), String> {
    if text.len() > max_bytes {
        return Err(format!(
            "{what} '{text}' is {} bytes: a request's descriptor {what} is at most {max_bytes}, so it could never match",
            text.len()
        ));
    }
    match crate::api::canonical_user_id(text.to_owned()) {
        Ok(canonical) if canonical == text => Ok(()),
        Ok(_) => Err(format!(
            "{what} {text:?} is not in Unicode NFC, the form requests are compared in, so it could never match: write it in NFC"
        )),
        Err(e) => Err(format!(
            "{what} {text:?}: {}, so it could never match",
            e.detail
        )),
    }
}

/// A list of at most `N` items; the bound is checked per element, so a long list (or an alias
/// of one, replayed) stops at `N + 1`.
#[derive(Debug)]
pub(super) struct Bounded<T, const N: usize>(pub Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Bounded<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::custom(format!(
                            "at most {N} entries are allowed"
                        )));
                    }
                    items.push(item);
                }
                Ok(Bounded(items))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// The descriptors of one level, each a [`DescriptorNode`]. Two siblings with the same
/// composite key (`key` or `key_value`, as envoyproxy/ratelimit names them) are refused.
#[derive(Debug, Default)]
pub(super) struct DescriptorList(pub Vec<DescriptorNode>);

impl<'de> Deserialize<'de> for DescriptorList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DescriptorList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of descriptors")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut nodes: Vec<DescriptorNode> = Vec::new();
                let mut seen: HashMap<String, usize> = HashMap::new();
                while let Some(node) = seq.next_element::<DescriptorNode>()? {
                    let index = nodes.len();
                    if let Some(first) = seen.insert(node.composite_key(), index) {
                        return Err(de::Error::custom(format!(
                            "duplicate descriptor composite key '{}': entries {first} and {index} \
                             have the same key and value",
                            node.composite_key()
                        )));
                    }
                    nodes.push(node);
                }
                Ok(DescriptorList(nodes))
            }
        }
        d.deserialize_seq(V)
    }
}

/// One descriptor of the tree, validated.
#[derive(Debug)]
pub(super) struct DescriptorNode {
    pub key: String,
    /// `None` when absent or empty: one limit per distinct value.
    pub value: Option<String>,
    pub limits: Option<LimitsDraft>,
    pub shadow: bool,
    pub detailed_metric: bool,
    pub children: Vec<DescriptorNode>,
}

impl DescriptorNode {
    /// envoyproxy/ratelimit's name for the node among its siblings: `key` or `key_value`.
    pub fn composite_key(&self) -> String {
        match &self.value {
            Some(value) => format!("{}_{value}", self.key),
            None => self.key.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for DescriptorNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Counted before the content is read: the bounds hold however the YAML is shaped.
        let _level = Level::enter().map_err(de::Error::custom)?;
        let wire = DescriptorWire::deserialize(d)?;
        DescriptorNode::try_from(wire).map_err(de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorWire {
    key: Option<Text>,
    value: Option<Text>,
    rate_limit: Option<LimitDraft>,
    rate_limits: Option<Bounded<LimitDraft, MAX_LIMITS_PER_DESCRIPTOR>>,
    descriptors: Option<DescriptorList>,
    shadow_mode: Option<bool>,
    detailed_metric: Option<bool>,
    quota_mode: Option<bool>,
    share_threshold: Option<bool>,
    /// Only changes the names of envoyproxy/ratelimit's statistics: read and ignored.
    #[allow(dead_code)]
    value_to_metric: Option<bool>,
    /// envoyproxy/ratelimit returns it as dynamic metadata: read (bounded) and ignored.
    #[allow(dead_code)]
    metadata: Option<Metadata>,
}

impl TryFrom<DescriptorWire> for DescriptorNode {
    type Error = String;

    fn try_from(w: DescriptorWire) -> Result<Self, String> {
        let key = match w.key {
            Some(Text(key)) if !key.is_empty() => key,
            _ => return Err("descriptor has empty key: `key` is required".to_owned()),
        };
        let value = w.value.map(|Text(v)| v).filter(|v| !v.is_empty());
        carried("key", &key, crate::api::MAX_KEY_BYTES)?;
        if let Some(value) = &value {
            carried("value", value, crate::api::MAX_USER_ID_BYTES)?;
        }
        if w.quota_mode == Some(true) {
            return Err("quota_mode is not supported".to_owned());
        }
        if w.share_threshold == Some(true) {
            return Err("share_threshold is not supported".to_owned());
        }
        let limits = match (w.rate_limit, w.rate_limits) {
            (Some(_), Some(_)) => {
                return Err("give either rate_limit or rate_limits, not both".to_owned());
            }
            (Some(one), None) => Some(LimitsDraft::from_one(one)),
            (None, Some(Bounded(many))) => Some(LimitsDraft::from_many(many)?),
            (None, None) => None,
        };
        Ok(DescriptorNode {
            key,
            value,
            limits,
            shadow: w.shadow_mode.unwrap_or(false),
            detailed_metric: w.detailed_metric.unwrap_or(false),
            children: w.descriptors.unwrap_or_default().0,
        })
    }
}

/// What a descriptor's `rate_limit` or `rate_limits` says.
#[derive(Debug)]
pub(super) enum LimitsDraft {
    Unlimited { replaces: Vec<String> },
    Limited(Vec<LimitOne>),
}

/// One counted limit of a descriptor.
#[derive(Debug)]
pub(super) struct LimitOne {
    /// As written; `None` gets a name from the descriptor's path.
    pub name: Option<String>,
    pub spec: LimitSpec,
    pub replaces: Vec<String>,
}

impl LimitsDraft {
    fn from_one(one: LimitDraft) -> Self {
        match one {
            LimitDraft::Unlimited { replaces } => LimitsDraft::Unlimited { replaces },
            LimitDraft::Limited(limit) => LimitsDraft::Limited(vec![limit]),
        }
    }

    fn from_many(many: Vec<LimitDraft>) -> Result<Self, String> {
        if many.is_empty() {
            return Err("rate_limits must hold at least one limit".to_owned());
        }
        let mut limits: Vec<LimitOne> = Vec::with_capacity(many.len());
        for (i, draft) in many.into_iter().enumerate() {
            let LimitDraft::Limited(limit) = draft else {
                return Err(format!(
                    "rate_limits[{i}]: unlimited is only allowed in rate_limit"
                ));
            };
            let Some(name) = &limit.name else {
                return Err(format!(
                    "rate_limits[{i}]: every limit of rate_limits needs a name"
                ));
            };
            if limits.iter().any(|l| l.name.as_ref() == Some(name)) {
                return Err(format!(
                    "rate_limits[{i}]: the name '{name}' is used twice in this descriptor"
                ));
            }
            limits.push(limit);
        }
        // A limit replacing a sibling would switch off part of its own rule.
        for (i, limit) in limits.iter().enumerate() {
            for replaced in &limit.replaces {
                if limits.iter().any(|l| l.name.as_ref() == Some(replaced)) {
                    return Err(format!(
                        "rate_limits[{i}]: replaces should not contain name of same descriptor ('{replaced}')"
                    ));
                }
            }
        }
        Ok(LimitsDraft::Limited(limits))
    }
}

/// One `rate_limit` mapping, validated.
#[derive(Debug)]
pub(super) enum LimitDraft {
    Unlimited { replaces: Vec<String> },
    Limited(LimitOne),
}

impl<'de> Deserialize<'de> for LimitDraft {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = LimitWire::deserialize(d)?;
        LimitDraft::try_from(wire).map_err(de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitWire {
    unit: Option<Unit>,
    requests_per_unit: Option<Requests>,
    unlimited: Option<bool>,
    name: Option<Text>,
    replaces: Option<Bounded<ReplaceWire, MAX_REPLACES>>,
    // Our extensions.
    algorithm: Option<AlgorithmWire>,
    window: Option<Window>,
    burst: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceWire {
    name: Option<Text>,
}

impl TryFrom<LimitWire> for LimitDraft {
    type Error = String;

    fn try_from(w: LimitWire) -> Result<Self, String> {
        let name = w.name.map(|Text(n)| n).filter(|n| !n.is_empty());
        let mut replaces = Vec::new();
        for r in w.replaces.map(|b| b.0).unwrap_or_default() {
            match r.name {
                Some(Text(n)) if !n.is_empty() => {
                    if name.as_ref() == Some(&n) {
                        return Err(
                            "replaces should not contain name of same descriptor".to_owned()
                        );
                    }
                    replaces.push(n);
                }
                _ => return Err("should not have an empty replaces entry".to_owned()),
            }
        }
        if w.unlimited == Some(true) {
            let given: Vec<&str> = [
                ("unit", w.unit.is_some()),
                ("window", w.window.is_some()),
                ("requests_per_unit", w.requests_per_unit.is_some()),
                ("algorithm", w.algorithm.is_some()),
                ("burst", w.burst.is_some()),
            ]
            .into_iter()
            .filter_map(|(field, given)| given.then_some(field))
            .collect();
            if !given.is_empty() {
                return Err(format!(
                    "should not specify {} when unlimited",
                    given.join(", ")
                ));
            }
            return Ok(LimitDraft::Unlimited { replaces });
        }
        let window =
            match (w.unit, w.window) {
                (Some(_), Some(_)) => return Err("give either unit or window, not both".to_owned()),
                (Some(unit), None) => unit.0,
                (None, Some(window)) => window.0,
                (None, None) => return Err(
                    "unit is required (second, minute, hour, day, week, month or year), or window"
                        .to_owned(),
                ),
            };
        let Some(Requests(requests)) = w.requests_per_unit else {
            return Err("requests_per_unit is required".to_owned());
        };
        let algorithm = w.algorithm.map_or(Algorithm::TokenBucket, |a| a.0);
        let spec = LimitSpec::new(algorithm, requests, window, w.burst).map_err(|e| match e {
            LimitError::BurstWithoutBucket => {
                format!(
                    "burst applies to the token bucket only, not to {}",
                    algorithm.name()
                )
            }
            LimitError::Policy(e) => format!(
                "{e} (a token bucket refills at requests_per_unit per unit; for long units use \
                 algorithm: fixed_window or sliding_window)"
            ),
            e => e.to_string(),
        })?;
        Ok(LimitDraft::Limited(LimitOne {
            name,
            spec,
            replaces,
        }))
    }
}

/// envoyproxy/ratelimit's `unit`, read case-insensitively as theirs is.
#[derive(Debug)]
struct Unit(Duration);

/// The unit names and lengths of envoyproxy/ratelimit (`utils.UnitToDivider`): a month is
/// 30 days and a year 365.
pub(super) const UNITS: [(&str, u64); 7] = [
    ("second", 1),
    ("minute", 60),
    ("hour", 3_600),
    ("day", 86_400),
    ("week", 7 * 86_400),
    ("month", 30 * 86_400),
    ("year", 365 * 86_400),
];

impl<'de> Deserialize<'de> for Unit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&text))
            .map(|&(_, secs)| Unit(Duration::from_secs(secs)))
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown unit {text:?}; choices are [second, minute, hour, day, week, month, year]"
                ))
            })
    }
}

/// Our `window`: a whole number and a unit, `1500ms`, `30s`, `5m`, `1h`, `1d`.
#[derive(Debug)]
struct Window(Duration);

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        parse_window(&text).map(Window).map_err(de::Error::custom)
    }
}

/// Parses `1500ms`, `30s`, `5m`, `1h`, `1d`.
pub(super) fn parse_window(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid window {text:?}: a whole number and ms, s, m, h or d, e.g. 30s");
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let millis_per = match suffix {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let millis = number
        .checked_mul(millis_per)
        .ok_or_else(|| format!("window {text:?} is too long: at most 366 days"))?;
    Ok(Duration::from_millis(millis))
}

/// `requests_per_unit`: from 1 to [`MAX_REQUESTS`].
#[derive(Debug)]
struct Requests(u64);

impl<'de> Deserialize<'de> for Requests {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if !(1..=MAX_REQUESTS).contains(&n) {
            return Err(de::Error::custom(format!(
                "must be from 1 to {MAX_REQUESTS}, got {n}"
            )));
        }
        Ok(Requests(n))
    }
}

/// Our `algorithm`.
#[derive(Debug)]
struct AlgorithmWire(Algorithm);

impl<'de> Deserialize<'de> for AlgorithmWire {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        [
            Algorithm::TokenBucket,
            Algorithm::SlidingWindow,
            Algorithm::FixedWindow,
        ]
        .into_iter()
        .find(|a| a.name() == text)
        .map(AlgorithmWire)
        .ok_or_else(|| {
            de::Error::custom(format!(
                "unknown algorithm {text:?}; choices are [token_bucket, sliding_window, fixed_window]"
            ))
        })
    }
}

/// `metadata`: any YAML, walked against [`MAX_METADATA_NODES`] and dropped.
#[derive(Debug)]
struct Metadata;

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        MetadataSeed.deserialize(d)
    }
}

#[derive(Clone, Copy)]
struct MetadataSeed;

impl MetadataSeed {
    fn count<E: de::Error>() -> Result<(), E> {
        let left = METADATA_LEFT.with(Cell::get);
        if left == 0 {
            return Err(E::custom(format!(
                "metadata too large: at most {MAX_METADATA_NODES} values per file"
            )));
        }
        METADATA_LEFT.with(|c| c.set(left - 1));
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for MetadataSeed {
    type Value = Metadata;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Metadata, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MetadataSeed {
    type Value = Metadata;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_none<E: de::Error>(self) -> Result<Metadata, E> {
        Self::count().map(|()| Metadata)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Metadata, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Metadata, A::Error> {
        Self::count()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(Metadata)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
        Self::count()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(Metadata)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Metadata, A::Error> {
        // A tagged value (`!tag x`): its content is walked like any other.
        use de::VariantAccess;
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant_seed(self)
    }
}
