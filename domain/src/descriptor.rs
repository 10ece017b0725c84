//! Descriptors: what a request says about itself, in envoyproxy/ratelimit's terms. A
//! request names a `domain` and one or more descriptors; each descriptor is an ordered list
//! of `key`/`value` entries (`[plan=free, user_id=u1]`). The rules of the domain say which
//! limits each descriptor gets ([`crate::rules`]).

use serde::{Deserialize, Serialize};

/// The domain of a request that names none, and of the built-in rule
/// (`{"user_id":"u1"}` is the descriptor `[user_id=u1]` in this domain).
pub const DEFAULT_DOMAIN: &str = "default";
/// The key of the built-in rule's one entry.
pub const USER_ID_KEY: &str = "user_id";

/// One `key`/`value` pair of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

impl Entry {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// An ordered list of entries, matched against the rules from the first entry down.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Descriptor {
    pub entries: Vec<Entry>,
}

impl Descriptor {
    /// The built-in descriptor of a request that names only a user: `[user_id=<id>]`.
    pub fn user(user_id: &str) -> Self {
        Self {
            entries: vec![Entry::new(USER_ID_KEY, user_id)],
        }
    }
}
