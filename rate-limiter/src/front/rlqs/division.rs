//! How one limit is divided between the Envoys that report a bucket: pure arithmetic, no
//! I/O (the demands come from the [`super::board`], the limits from the [`crate::limiter`]).
//!
//! - [`share`]: an Envoy's part of a rate, in proportion to its recent demand, with a
//!   floor so that a new or quiet Envoy can start.
//! - [`token_bucket`]: a rate as Envoy's filter takes it, whole tokens per whole seconds.
//! - [`Assignment`]: what an Envoy is told for a bucket, and [`Assignment::settled`], which
//!   keeps an assignment that has barely moved (Envoy refills a token bucket it is sent
//!   anew, so resending a near-identical one each interval would admit a burst each time).

/// The part of a limit kept for the floor, divided equally between the Envoys reporting
/// it; the rest goes in proportion to demand. 10 %: a quiet Envoy holds at most this much
/// of the limit unused, and a newcomer starts with at least `FLOOR / n` of it.
pub const FLOOR: f64 = 0.1;

/// Longest fill interval sent to Envoy, in seconds (a share below one request an hour
/// still admits one an hour).
pub const MAX_FILL_SECONDS: u64 = 3_600;

/// How far a new share may move from the one Envoy holds before it is sent (relative).
pub const SETTLE: f64 = 0.05;

/// `own`'s part of `rate` (requests per second) when every Envoy reporting the bucket has
/// the demand in `all` (requests per second, `own` among them): `rate × (FLOOR / n +
/// (1 − FLOOR) × own / Σ all)`; equal parts when nobody has demand yet. The parts add up to
/// `rate`.
pub fn share(rate: f64, own: f64, all: &[f64]) -> f64 {
    let n = all.len().max(1) as f64;
    let total: f64 = all.iter().map(|d| d.max(0.0)).sum();
    if total <= f64::EPSILON {
        return rate / n;
    }
    rate * (FLOOR / n + (1.0 - FLOOR) * own.max(0.0) / total)
}

/// A token bucket Envoy enforces: `tokens_per_fill` tokens every `fill_seconds`, at most
/// `max_tokens` held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_seconds: u64,
}

/// `rate` requests per second in whole tokens and whole seconds (Envoy's filter reads the
/// fill interval in seconds): the shortest interval whose rounding is within 2 % of the
/// rate, else the closest one found in a minute; one token per interval below that. The
/// bucket holds one fill: the burst an Envoy can admit at once is one interval's share.
pub fn token_bucket(rate: f64) -> Bucket {
    let rate = rate.max(0.0);
    if rate * 60.0 < 1.0 {
        let seconds = if rate > 0.0 {
            ((1.0 / rate).ceil() as u64).min(MAX_FILL_SECONDS)
        } else {
            MAX_FILL_SECONDS
        };
        return Bucket {
            max_tokens: 1,
            tokens_per_fill: 1,
            fill_seconds: seconds,
        };
    }
    let mut best = (f64::MAX, 1u32, 1u64);
    for seconds in 1..=60u64 {
        let exact = rate * seconds as f64;
        let tokens = exact.round().clamp(1.0, f64::from(u32::MAX));
        let error = (tokens - exact).abs() / exact;
        if error < best.0 {
            best = (error, tokens as u32, seconds);
        }
        if error <= 0.02 {
            break;
        }
    }
    let (_, tokens, seconds) = best;
    Bucket {
        max_tokens: tokens,
        tokens_per_fill: tokens,
        fill_seconds: seconds,
    }
}

/// What one Envoy is told about one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Assignment {
    /// No enforced limit applies (no rule, `unlimited`, shadow mode).
    AllowAll,
    /// The window's quota is spent.
    DenyAll,
    /// This Envoy's share, `rate` requests per second, as `bucket`.
    Share { rate: f64, bucket: Bucket },
}

impl Assignment {
    /// A share of `rate` requests per second.
    pub fn share(rate: f64) -> Self {
        Assignment::Share {
            rate,
            bucket: token_bucket(rate),
        }
    }

    /// `self`, unless `held` is a share within [`SETTLE`] of it: then `held`, so that Envoy
    /// is not sent a fresh (full) token bucket for a move of a few percent.
    pub fn settled(self, held: Option<Assignment>) -> Assignment {
        match (self, held) {
            (Assignment::Share { rate, .. }, Some(old @ Assignment::Share { rate: was, .. }))
                if (rate - was).abs() <= SETTLE * was =>
            {
                old
            }
            _ => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_demand_and_add_up_to_the_rate() {
        let all = [14.0, 3.0, 3.0];
        let parts: Vec<f64> = all.iter().map(|&d| share(10.0, d, &all)).collect();
        assert!((parts.iter().sum::<f64>() - 10.0).abs() < 1e-9);
        assert!((parts[0] - (10.0 / 30.0 + 9.0 * 0.7)).abs() < 1e-9);
        assert!(parts[1] > 1.0 && parts[1] < 2.0, "{parts:?}");
    }

    #[test]
    fn a_quiet_or_new_envoy_keeps_the_floor() {
        let all = [20.0, 0.0];
        let quiet = share(10.0, 0.0, &all);
        assert!((quiet - 0.5).abs() < 1e-9, "{quiet}");
        // Nobody has demand yet: equal parts.
        assert_eq!(share(9.0, 0.0, &[0.0, 0.0, 0.0]), 3.0);
        // Alone: the whole rate.
        assert!((share(10.0, 5.0, &[5.0]) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn rates_become_whole_tokens_per_whole_seconds() {
        let b = |rate| {
            let b = token_bucket(rate);
            (b.tokens_per_fill, b.fill_seconds)
        };
        assert_eq!(b(10.0), (10, 1));
        assert_eq!(b(1.5), (3, 2));
        assert_eq!(b(1.0 / 3.0), (1, 3));
        assert_eq!(b(6.63), (13, 2));
        // Below one a minute: one token per interval.
        assert_eq!(b(1.0 / 120.0), (1, 120));
        assert_eq!(b(0.0), (1, MAX_FILL_SECONDS));
        let any = token_bucket(1234.5678);
        let rate = f64::from(any.tokens_per_fill) / any.fill_seconds as f64;
        assert!((rate - 1234.5678).abs() / 1234.5678 <= 0.02);
    }

    #[test]
    fn a_small_move_keeps_the_held_share() {
        let held = Assignment::share(10.0);
        assert_eq!(Assignment::share(10.3).settled(Some(held)), held);
        let moved = Assignment::share(12.0);
        assert_eq!(moved.settled(Some(held)), moved);
        assert_eq!(Assignment::DenyAll.settled(Some(held)), Assignment::DenyAll);
        assert_eq!(held.settled(Some(Assignment::AllowAll)), held);
    }
}
