//! What both counter stores share: a batch summed per user and per minute, and the
//! shapes of the answers.
//!
//! Exactly once: a batch read from a Kafka partition carries each event's offset. Every
//! user's counters remember, per partition, the last offset already counted, and a batch
//! is applied to a user only past that offset, atomically with the increments. Replaying
//! events after a crash (offsets not yet committed) therefore counts nothing twice, and
//! since the offset lives in the user's own key this holds on Redis Cluster too.
//!
//! Over time: per user and globally, allowed and blocked per minute (of the decision's
//! timestamp), kept for a retention period, and the most-blocked users per minute and per
//! day. The global aggregates are kept per partition, with the partition's last applied
//! offset beside them (one hash tag per partition), so they are exactly-once the same way.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;

use domain::RateLimitEvent;
use domain::analytics::{BlockedUser, DAY_MS, MINUTE_MS, MinuteCounts, RuleCounts};
use domain::event::RuleOutcome;

/// Per-minute counts, keyed by minute number (ms / 60,000).
pub(crate) type Minutes = BTreeMap<u64, (u64, u64)>;

/// A user's increments within one batch, and the offsets they span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tally {
    pub first_offset: i64,
    pub last_offset: i64,
    pub allowed: u64,
    pub blocked: u64,
    pub minutes: Minutes,
}

impl Tally {
    fn new(offset: i64) -> Self {
        Self {
            first_offset: offset,
            last_offset: offset,
            allowed: 0,
            blocked: 0,
            minutes: Minutes::new(),
        }
    }

    fn add(&mut self, offset: i64, event: &RateLimitEvent) {
        self.first_offset = self.first_offset.min(offset);
        self.last_offset = self.last_offset.max(offset);
        let minute = self.minutes.entry(event.ts_ms / MINUTE_MS).or_default();
        let (allowed, blocked) = event.requests();
        self.allowed += allowed;
        self.blocked += blocked;
        minute.0 += allowed;
        minute.1 += blocked;
    }
}

/// Sums a batch per user, counting only events past `floor(user)` (the offset already applied).
pub(crate) fn tally<'a>(
    events: impl IntoIterator<Item = &'a (i64, RateLimitEvent)>,
    floor: impl Fn(&str) -> Option<i64>,
) -> Vec<(&'a str, Tally)> {
    let mut per_user: HashMap<&'a str, Tally> = HashMap::new();
    for (offset, event) in events {
        if floor(&event.user_id).is_some_and(|applied| *offset <= applied) {
            continue;
        }
        per_user
            .entry(event.user_id.as_str())
            .or_insert_with(|| Tally::new(*offset))
            .add(*offset, event);
    }
    per_user.into_iter().collect()
}

/// A partition batch's global increments: per minute, and blocked per user per minute and
/// per day, for events past `floor` (the partition's offset already applied).
#[derive(Debug, Default)]
pub(crate) struct GlobalTally<'a> {
    pub first_offset: i64,
    pub last_offset: i64,
    pub minutes: Minutes,
    pub blocked_by_minute: BTreeMap<u64, HashMap<&'a str, u64>>,
    pub blocked_by_day: BTreeMap<u64, HashMap<&'a str, u64>>,
    /// Per rule: allowed, blocked, shadow-blocked.
    pub rules: BTreeMap<&'a str, [u64; 3]>,
}

pub(crate) fn global_tally(
    events: &[(i64, RateLimitEvent)],
    floor: Option<i64>,
) -> GlobalTally<'_> {
    let mut g = GlobalTally {
        first_offset: i64::MAX,
        last_offset: i64::MIN,
        ..GlobalTally::default()
    };
    for (offset, event) in events {
        if floor.is_some_and(|applied| *offset <= applied) {
            continue;
        }
        g.first_offset = g.first_offset.min(*offset);
        g.last_offset = g.last_offset.max(*offset);
        for hit in &event.rules {
            let counts = g.rules.entry(hit.rule.as_str()).or_default();
            counts[match hit.outcome {
                RuleOutcome::Allowed => 0,
                RuleOutcome::Blocked => 1,
                RuleOutcome::ShadowBlocked => 2,
            }] += event.count;
        }
        let minute = event.ts_ms / MINUTE_MS;
        let counts = g.minutes.entry(minute).or_default();
        if event.allowed {
            counts.0 += event.count;
        } else {
            counts.1 += event.count;
            *g.blocked_by_minute
                .entry(minute)
                .or_default()
                .entry(&event.user_id)
                .or_default() += event.count;
            *g.blocked_by_day
                .entry(event.ts_ms / DAY_MS)
                .or_default()
                .entry(&event.user_id)
                .or_default() += event.count;
        }
    }
    g
}

/// A series over `minutes` with zeros where nothing was counted.
pub(crate) fn fill_series(minutes: RangeInclusive<u64>, counts: &Minutes) -> Vec<MinuteCounts> {
    minutes
        .map(|m| {
            let (allowed, blocked) = counts.get(&m).copied().unwrap_or_default();
            MinuteCounts {
                minute_ms: m * MINUTE_MS,
                allowed,
                blocked,
            }
        })
        .collect()
}

/// The `n` most blocked of `counts`, most blocked first (ties by user id).
pub(crate) fn top_n(counts: HashMap<String, u64>, n: usize) -> Vec<BlockedUser> {
    let mut all: Vec<BlockedUser> = counts
        .into_iter()
        .map(|(user_id, blocked)| BlockedUser { user_id, blocked })
        .collect();
    all.sort_by(|a, b| {
        b.blocked
            .cmp(&a.blocked)
            .then_with(|| a.user_id.cmp(&b.user_id))
    });
    all.truncate(n);
    all
}

/// Rule counts sorted most blocked first (then by name).
pub(crate) fn sorted_rules(counts: HashMap<String, [u64; 3]>) -> Vec<RuleCounts> {
    let mut all: Vec<RuleCounts> = counts
        .into_iter()
        .map(|(rule, [allowed, blocked, shadow_blocked])| RuleCounts {
            rule,
            allowed,
            blocked,
            shadow_blocked,
        })
        .collect();
    all.sort_by(|a, b| {
        (b.blocked + b.shadow_blocked)
            .cmp(&(a.blocked + a.shadow_blocked))
            .then_with(|| a.rule.cmp(&b.rule))
    });
    all
}
