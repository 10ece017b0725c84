//! The rate-limit header fields of a decision, as names and text, for every service that
//! tells a client about one (the limiter's Envoy rate limit service, the gateway's
//! answers).
//!
//! - [`ietf`]: draft-ietf-httpapi-ratelimit-headers (revision 10): `RateLimit-Policy` lists
//!   every enforced policy that applied (`"burst";q=10;w=1, "daily";q=1000;w=86400`),
//!   `RateLimit` reports the one closest to refusing (`"burst";r=0;t=1`).
//! - [`trio`]: the older `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`,
//!   with the numbers of that same closest policy: what envoyproxy/ratelimit sends when
//!   its `LIMIT_RESPONSE_HEADERS_ENABLED` is on, under the same default names.
//!
//! Both add `X-RateLimit-Degraded: true` to a decision the local fail-open fallback made.
//! Shadow limits are never shown (they are not the client's business), and a decision no
//! enforced limit applied to has no field.

use crate::api::{CheckResponse, LimitStatus};

pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
pub const RATELIMIT: &str = "ratelimit";
pub const RATELIMIT_LIMIT: &str = "ratelimit-limit";
pub const RATELIMIT_REMAINING: &str = "ratelimit-remaining";
pub const RATELIMIT_RESET: &str = "ratelimit-reset";
pub const DEGRADED: &str = "x-ratelimit-degraded";

/// One header field: a lowercase name and a value of visible ASCII.
pub type Field = (&'static str, String);

/// Whole seconds, rounded up (a client that waits that long is on time).
pub fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// A policy name as a structured-field string, appended to `out`: printable ASCII, `"` and
/// `\` escaped, any other character replaced by `_` (names come from the operator's rules,
/// but a header must never break).
fn push_sf_string(out: &mut String, name: &str) {
    out.push('"');
    // The usual name needs nothing done: copied whole.
    if name
        .bytes()
        .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
    {
        out.push_str(name);
        out.push('"');
        return;
    }
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
}

/// `n` in decimal, appended to `out` (what `write!(out, "{n}")` writes, without the
/// formatting machinery: these fields are written for every decision).
fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn u64_string(n: u64) -> String {
    let mut out = String::with_capacity(20);
    push_u64(&mut out, n);
    out
}

/// The enforced limits of a decision.
fn enforced(d: &CheckResponse) -> impl Iterator<Item = &LimitStatus> {
    d.limits.iter().filter(|l| !l.shadow)
}

/// The limit the client is told about: the refusing limit with the longest wait, or the
/// one with the fewest requests left.
pub fn closest(d: &CheckResponse) -> Option<&LimitStatus> {
    if d.allowed {
        enforced(d).min_by_key(|l| (l.remaining, l.limit))
    } else {
        enforced(d)
            .filter(|l| l.refused)
            .max_by_key(|l| l.retry_after_ms)
    }
}

/// The degraded marker when `d` is degraded, in room for `room` fields in all.
fn degraded(d: &CheckResponse, room: usize) -> Vec<Field> {
    let mut fields = Vec::with_capacity(room);
    if d.degraded {
        fields.push((DEGRADED, "true".to_owned()));
    }
    fields
}

/// `RateLimit-Policy` and `RateLimit` (and the degraded marker).
pub fn ietf(d: &CheckResponse) -> Vec<Field> {
    let mut fields = degraded(d, 3);
    if let Some(closest) = closest(d) {
        push_ietf(&mut fields, d, closest);
    }
    fields
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (and the degraded marker).
pub fn trio(d: &CheckResponse) -> Vec<Field> {
    let mut fields = degraded(d, 4);
    if let Some(closest) = closest(d) {
        push_trio(&mut fields, closest);
    }
    fields
}

/// [`ietf`]'s fields then [`trio`]'s, the degraded marker once, the closest limit chosen
/// once: what the gateway answers.
pub fn all(d: &CheckResponse) -> Vec<Field> {
    let mut fields = degraded(d, 6);
    if let Some(closest) = closest(d) {
        push_ietf(&mut fields, d, closest);
        push_trio(&mut fields, closest);
    }
    fields
}

fn push_ietf(fields: &mut Vec<Field>, d: &CheckResponse, closest: &LimitStatus) {
    // Written in place (this runs for every decision that answers headers):
    // `"name";q=<limit>;w=<window s>, ...` and `"name";r=<remaining>;t=<reset s>`.
    let mut policies = String::new();
    for (i, l) in enforced(d).enumerate() {
        if i > 0 {
            policies.push_str(", ");
        }
        push_sf_string(&mut policies, &l.name);
        policies.push_str(";q=");
        push_u64(&mut policies, l.limit);
        policies.push_str(";w=");
        push_u64(&mut policies, secs_ceil(l.window_ms).max(1));
    }
    fields.push((RATELIMIT_POLICY, policies));
    let mut current = String::with_capacity(closest.name.len() + 32);
    push_sf_string(&mut current, &closest.name);
    current.push_str(";r=");
    push_u64(&mut current, closest.remaining);
    current.push_str(";t=");
    push_u64(&mut current, secs_ceil(closest.reset_after_ms));
    fields.push((RATELIMIT, current));
}

fn push_trio(fields: &mut Vec<Field>, closest: &LimitStatus) {
    fields.push((RATELIMIT_LIMIT, u64_string(closest.limit)));
    fields.push((RATELIMIT_REMAINING, u64_string(closest.remaining)));
    fields.push((
        RATELIMIT_RESET,
        u64_string(secs_ceil(closest.reset_after_ms)),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str, limit: u64, remaining: u64, window_ms: u64, refused: bool) -> LimitStatus {
        LimitStatus {
            name: name.into(),
            algorithm: "token_bucket".into(),
            limit,
            remaining,
            window_ms,
            refused,
            reset_after_ms: 1500,
            retry_after_ms: if refused { 1000 } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn every_policy_is_listed_and_the_closest_is_reported() {
        let d = CheckResponse {
            allowed: true,
            limits: vec![
                limit("burst", 10, 2, 1000, false),
                limit("daily", 1000, 990, 86_400_000, false),
            ],
            ..Default::default()
        };
        assert_eq!(
            ietf(&d),
            [
                (
                    RATELIMIT_POLICY,
                    "\"burst\";q=10;w=1, \"daily\";q=1000;w=86400".to_owned()
                ),
                (RATELIMIT, "\"burst\";r=2;t=2".to_owned()),
            ]
        );
        assert_eq!(
            trio(&d),
            [
                (RATELIMIT_LIMIT, "10".to_owned()),
                (RATELIMIT_REMAINING, "2".to_owned()),
                (RATELIMIT_RESET, "2".to_owned()),
            ]
        );
    }

    #[test]
    fn a_refusal_reports_the_refusing_limit_and_shadow_limits_stay_hidden() {
        let mut shadow = limit("trial", 1, 0, 1000, true);
        shadow.shadow = true;
        let d = CheckResponse {
            allowed: false,
            degraded: true,
            limits: vec![
                limit("burst", 10, 5, 1000, false),
                limit("daily\"x", 1000, 0, 86_400_000, true),
                shadow,
            ],
            ..Default::default()
        };
        let fields = ietf(&d);
        assert_eq!(fields[0], (DEGRADED, "true".to_owned()));
        assert!(fields[2].1.starts_with("\"daily\\\"x\";r=0"), "{fields:?}");
        assert!(!fields[1].1.contains("trial"));
    }

    #[test]
    fn no_enforced_limit_means_no_fields() {
        let mut shadow = limit("trial", 1, 0, 1000, true);
        shadow.shadow = true;
        let d = CheckResponse {
            allowed: true,
            limits: vec![shadow],
            ..Default::default()
        };
        assert!(ietf(&d).is_empty());
        assert!(trio(&d).is_empty());
    }
}
