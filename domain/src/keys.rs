//! Redis key names.
//!
//! Every key of one user carries the user's id as its hash tag (`{...}`), so on Redis
//! Cluster all of a user's keys live in one slot and single-key scripts stay legal. The id
//! is escaped so that it cannot end the hash tag early or collide with another id: `%`,
//! `{` and `}` are percent-encoded, which is injective.

/// A 64-bit FNV-1a hash of `text`: stable across processes, builds and versions (std's
/// hasher is seeded per process), for names and slots that must agree everywhere: a
/// shortened rule name, a limit key's room slot.
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The escaped form of a user id, safe inside a hash tag.
pub fn escape_user_id(user_id: &str) -> String {
    let mut out = String::with_capacity(user_id.len() + 2);
    escape_into(&mut out, user_id, &[]);
    out
}

/// Appends `text` to `out` with `%`, `{`, `}` and the ASCII characters of `also`
/// percent-encoded (injective: `%` itself is always encoded). The runs between them are
/// copied whole (every character escaped is ASCII, so a byte of one never belongs to
/// another character).
fn escape_into(out: &mut String, text: &str, also: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut run = 0;
    for (i, b) in text.bytes().enumerate() {
        if matches!(b, b'%' | b'{' | b'}') || also.contains(&b) {
            out.push_str(&text[run..i]);
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
            run = i + 1;
        }
    }
    out.push_str(&text[run..]);
}

/// The key of a user's token bucket: `<prefix>b{<escaped id>}`.
pub fn bucket_key(prefix: &str, user_id: &str) -> String {
    // Built in place: one allocation, no formatting machinery (one call per decision).
    let mut key = String::with_capacity(prefix.len() + user_id.len() + 4);
    key.push_str(prefix);
    key.push_str("b{");
    escape_into(&mut key, user_id, &[]);
    key.push('}');
    key
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

/// Escapes `%`, `{`, `}` and the separators of a limit key (`/`, `=`, `:`), injectively.
fn escape_part(out: &mut String, part: &str) {
    escape_into(out, part, b"/=:");
}

/// The key of one limit of one descriptor:
/// `<prefix>l{<domain>/<key>=<value>/...}:<limit name>:<algorithm tag>`.
///
/// The hash tag is the whole descriptor, so the limits of one descriptor share a Redis
/// Cluster slot (and are decided in one script there too). The limit's numbers are not in
/// the key: changing a limit keeps its counter. Its name and algorithm are: two limits on
/// one descriptor count apart, and a state of one algorithm is never read by another.
///
/// The built-in rule's limit (domain `default`, descriptor `[user_id=<id>]`, the limit named
/// `default`, a token bucket) keeps the key every earlier version used for the user's
/// bucket, [`bucket_key`], so no bucket moves on upgrade or when the same rule moves into
/// a rules file.
pub fn limit_key(
    prefix: &str,
    domain: &str,
    descriptor: &crate::descriptor::Descriptor,
    limit_name: &str,
    algorithm: crate::limits::Algorithm,
) -> String {
    use crate::descriptor::{DEFAULT_DOMAIN, USER_ID_KEY};
    if let [entry] = descriptor.entries.as_slice()
        && domain == DEFAULT_DOMAIN
        && entry.key == USER_ID_KEY
        && limit_name == DEFAULT_LIMIT_NAME
        && algorithm == crate::limits::Algorithm::TokenBucket
    {
        return bucket_key(prefix, &entry.value);
    }
    let mut key = String::with_capacity(prefix.len() + 64);
    key.push_str(prefix);
    key.push_str("l{");
    escape_part(&mut key, domain);
    for entry in &descriptor.entries {
        key.push('/');
        escape_part(&mut key, &entry.key);
        key.push('=');
        escape_part(&mut key, &entry.value);
    }
    key.push_str("}:");
    escape_part(&mut key, limit_name);
    key.push(':');
    key.push_str(algorithm.key_tag());
    key
}

/// The name of the built-in rule's limit.
pub const DEFAULT_LIMIT_NAME: &str = "default";

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

    #[test]
    fn the_built_in_limit_keeps_the_user_bucket_key() {
        use crate::descriptor::Descriptor;
        use crate::limits::Algorithm;
        let d = Descriptor::user("u1");
        assert_eq!(
            limit_key("rl:", "default", &d, "default", Algorithm::TokenBucket),
            bucket_key("rl:", "u1")
        );
        assert_eq!(
            limit_key("rl:", "api", &d, "default", Algorithm::TokenBucket),
            "rl:l{api/user_id=u1}:default:tb"
        );
    }

    #[test]
    fn a_descriptor_cannot_escape_its_hash_tag() {
        use crate::descriptor::{Descriptor, Entry};
        use crate::limits::Algorithm;
        let d = Descriptor {
            entries: vec![Entry::new("k}x{", "v/a=b:c%")],
        };
        let key = limit_key("p:", "d", &d, "n:{", Algorithm::FixedWindow);
        assert_eq!(key, "p:l{d/k%7Dx%7B=v%2Fa%3Db%3Ac%25}:n%3A%7B:fw");
    }

    proptest! {
        /// Different descriptors (or names) never share a key, and the hash tag is exactly
        /// the escaped descriptor.
        #[test]
        fn limit_keys_are_injective(
            a in proptest::collection::vec((".{0,6}", ".{0,6}"), 1..3),
            b in proptest::collection::vec((".{0,6}", ".{0,6}"), 1..3),
            na in ".{1,4}", nb in ".{1,4}",
        ) {
            use crate::descriptor::{Descriptor, Entry};
            use crate::limits::Algorithm;
            let da = Descriptor { entries: a.iter().map(|(k, v)| Entry::new(k, v)).collect() };
            let db = Descriptor { entries: b.iter().map(|(k, v)| Entry::new(k, v)).collect() };
            prop_assume!(da != db || na != nb);
            let ka = limit_key("p:", "d", &da, &na, Algorithm::SlidingWindow);
            let kb = limit_key("p:", "d", &db, &nb, Algorithm::SlidingWindow);
            prop_assert_ne!(&ka, &kb);
            let open = ka.find('{').unwrap();
            let close = ka.find('}').unwrap();
            let tag_has_brace = ka[open + 1..close].contains('{');
            prop_assert!(!tag_has_brace);
        }

        /// The escaping is the one every stored key was made with: character by
        /// character, `%XX` for `%`, `{`, `}` and the characters asked for.
        #[test]
        fn escaping_is_the_reference_one(text in "\\PC{0,16}|[%{}/=:a]{0,8}") {
            let reference = |also: &[char]| {
                text.chars()
                    .map(|c| {
                        if matches!(c, '%' | '{' | '}') || also.contains(&c) {
                            format!("%{:02X}", c as u32)
                        } else {
                            c.to_string()
                        }
                    })
                    .collect::<String>()
            };
            let mut plain = String::new();
            escape_into(&mut plain, &text, &[]);
            prop_assert_eq!(plain, reference(&[]));
            let mut part = String::new();
            escape_part(&mut part, &text);
            prop_assert_eq!(part, reference(&['/', '=', ':']));
        }

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
