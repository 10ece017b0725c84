//! Redis key names.
//!
//! Every key of one user carries the user's id as its hash tag (`{...}`), so on Redis
//! Cluster all of a user's keys live in one slot and single-key scripts stay legal. The id
//! is escaped so that it cannot end the hash tag early or collide with another id: `%`,
//! `{` and `}` are percent-encoded, which is injective.

use std::fmt::Write;

/// The escaped form of a user id, safe inside a hash tag.
pub fn escape_user_id(user_id: &str) -> String {
    let mut out = String::with_capacity(user_id.len() + 2);
    for c in user_id.chars() {
        match c {
            '%' | '{' | '}' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The key of a user's token bucket: `<prefix>b{<escaped id>}`.
pub fn bucket_key(prefix: &str, user_id: &str) -> String {
    format!("{prefix}b{{{}}}", escape_user_id(user_id))
}

/// The key of a user's all-time counters: `<prefix>c{<escaped id>}`.
pub fn counter_key(prefix: &str, user_id: &str) -> String {
    format!("{prefix}c{{{}}}", escape_user_id(user_id))
}

/// The key of a user's counts in one minute: `<prefix>c{<escaped id>}:m<minute>` (same
/// slot as the user's counters).
pub fn counter_minute_key(prefix: &str, user_id: &str, minute: u64) -> String {
    format!("{prefix}c{{{}}}:m{minute}", escape_user_id(user_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn braces_cannot_escape_the_hash_tag() {
        assert_eq!(bucket_key("rl:", "a}b"), "rl:b{a%7Db}");
        assert_eq!(bucket_key("rl:", "{x}"), "rl:b{%7Bx%7D}");
        assert_eq!(counter_key("rl:", "50%"), "rl:c{50%25}");
    }

    proptest! {
        #[test]
        fn distinct_users_get_distinct_keys(a in ".{0,12}", b in ".{0,12}") {
            prop_assume!(a != b);
            prop_assert_ne!(bucket_key("p:", &a), bucket_key("p:", &b));
            prop_assert_ne!(bucket_key("p:", &a), counter_key("p:", &b));
        }

        #[test]
        fn hash_tag_is_the_whole_escaped_id(a in ".{1,12}") {
            let key = bucket_key("p:", &a);
            let open = key.find('{').unwrap();
            let close = open + key[open..].find('}').unwrap();
            prop_assert_eq!(&key[open + 1..close], escape_user_id(&a));
            prop_assert_eq!(close, key.len() - 1);
        }
    }
}
