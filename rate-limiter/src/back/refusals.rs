//! The exact refusal cache: refusals the shared store made, answered again locally until
//! they can no longer hold.
//!
//! Why it is exact: a request of cost `c` refused at time `t` with `retry_after` `r` cannot
//! be admitted before `t + r` (nor could any higher cost; the cache answers the same cost
//! only, so that the wait it gives is the store's too). Each of our algorithms (token bucket,
//! fixed window, sliding window) gives the earliest time at which the refusing limit admits
//! `c` if nothing else is spent, and what a limit allows only grows with time up to then:
//! tokens refill, a window's count stays until it ends, a sliding window's weighted count
//! only falls. Spending by anyone else only pushes it later. So a refusal is remembered
//! with the time the store call was *sent* (at or before the store's own "now", measured on
//! this process's clock both times, so the store host's clock does not matter) and answered
//! locally while `now < sent + r`, with no store call.
//!
//! Only four things give a limit room sooner: a rule change, an override change, a reset
//! and a refund. A rule or override change bumps a generation; an entry of an older
//! generation is never used. A reset or a refund moves only the room slots of its limits
//! (see [`RoomSlots`]: one of 1,024 by a hash of the limit key; here at once, and through
//! Redis at every limiter, polled with the overrides every 250 ms); an entry whose limits'
//! slots moved is never used. So a refund forgets about 1/1024 of the refusals, not all.
//! A request the store admits removes its entry. Shadow limits are never cached: their
//! outcome is reported, and a cached one could be stale.
//!
//! Bounded: at most `capacity` entries and 512 bytes each on average ([`ExpiringMap`]);
//! when it is full of refusals that still hold, a new one is simply not cached, nor is one
//! of more than 16 KiB (a request of many long descriptors is asked of the store again).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use domain::limits::{LimitOutcome, Outcome};
use domain::store::RequestTake;
use kit::expiring::ExpiringMap;

use crate::back::overrides::RoomSlots;

/// The end of a wait that is left to the store (see [`Refusals::record`]).
const ROUNDING_MARGIN: Duration = Duration::from_millis(1);

struct Entry {
    cost: i64,
    /// When the store call that refused was sent, on this process's clock.
    sent_us: u64,
    generation: u64,
    /// The mark of its limits' room slots when it was recorded.
    room: u64,
    outcome: Outcome,
}

/// Refusals answered locally (see the module documentation).
pub struct Refusals {
    entries: ExpiringMap<Entry>,
    hits: AtomicU64,
}

impl Refusals {
    /// A cache of at most `capacity` refusals.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: ExpiringMap::new(capacity),
            hits: AtomicU64::new(0),
        }
    }

    /// Requests answered from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Refusals held now (some may have expired).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The key of a request's limits together (one limit: its own key, no copy).
    fn key(take: &RequestTake) -> Cow<'_, str> {
        match take.limits.as_slice() {
            [one] => Cow::Borrowed(one.key.as_str()),
            many => Cow::Owned(
                many.iter()
                    .map(|l| l.key.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        }
    }

    fn room_mark(take: &RequestTake, room: &RoomSlots) -> u64 {
        room.mark(take.limits.iter().map(|l| l.key.as_str()))
    }

    /// The store's refusal of `take`, answered again, if one of this `generation` holds at
    /// `now_us` and no limit of it gained room since (`room`): every limit's waits
    /// shortened by the time since.
    pub fn lookup(
        &self,
        take: &RequestTake,
        now_us: u64,
        generation: u64,
        room: &RoomSlots,
    ) -> Option<Outcome> {
        if take.cost <= 0 || self.is_empty() {
            return None;
        }
        let (sent_us, mut outcome) = self.entries.get(&Self::key(take), now_us, |entry| {
            (entry.generation == generation
                && entry.cost == take.cost
                && entry.room == Self::room_mark(take, room))
            .then(|| (entry.sent_us, entry.outcome.clone()))
        })?;
        let elapsed = Duration::from_micros(now_us.saturating_sub(sent_us));
        for limit in &mut outcome.limits {
            limit.retry_after = limit.retry_after.saturating_sub(elapsed);
            limit.quota.reset_after = limit.quota.reset_after.saturating_sub(elapsed);
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(outcome)
    }

    /// Notes what the store made of `take` (sent at `sent_us`): a refusal is remembered
    /// until it can no longer hold; an admission forgets any refusal of the same limits.
    pub fn record(
        &self,
        take: &RequestTake,
        outcome: &Outcome,
        sent_us: u64,
        generation: u64,
        room: &RoomSlots,
    ) {
        if take.cost <= 0 || take.limits.iter().any(|l| l.applied.shadow) {
            return;
        }
        let key = Self::key(take);
        if outcome.allowed {
            self.entries.remove(&key);
            return;
        }
        // The request is refused while any refusing limit still refuses: until the longest
        // of their waits is over, less a margin for the stores' rounding of fractional
        // tokens (a wait can come out a microsecond long): the last millisecond of a wait
        // is asked of the store again.
        let wait = outcome
            .limits
            .iter()
            .filter(|l| !l.admits)
            .map(|l| l.retry_after)
            .max()
            .unwrap_or_default()
            .saturating_sub(ROUNDING_MARGIN);
        let until_us = sent_us.saturating_add(wait.as_micros().min(u64::MAX as u128) as u64);
        let entry = Entry {
            cost: take.cost,
            sent_us,
            generation,
            room: Self::room_mark(take, room),
            outcome: outcome.clone(),
        };
        let held = entry.outcome.limits.len() * std::mem::size_of::<LimitOutcome>();
        self.entries.insert(&key, entry, held, until_us, sent_us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::Policy;
    use domain::Quota;
    use domain::limits::{Applied, LimitSpec};
    use domain::store::LimitTake;

    fn take(key: &str, cost: i64, shadow: bool) -> RequestTake {
        RequestTake {
            limits: vec![LimitTake {
                key: key.to_owned(),
                applied: Applied {
                    spec: LimitSpec::TokenBucket(Policy::new(5, 1.0).unwrap()),
                    shadow,
                },
            }],
            cost,
        }
    }

    fn refused(retry_ms: u64) -> Outcome {
        Outcome {
            allowed: false,
            limits: vec![LimitOutcome {
                admits: false,
                quota: Quota {
                    limit: 5,
                    remaining: 0,
                    reset_after: Duration::from_millis(5000),
                },
                retry_after: Duration::from_millis(retry_ms),
            }],
        }
    }

    #[test]
    fn a_refusal_holds_until_its_wait_is_over_for_the_same_cost() {
        let cache = Refusals::new(100);
        let room = RoomSlots::default();
        cache.record(&take("k", 2, false), &refused(1000), 1_000_000, 0, &room);
        let hit = cache
            .lookup(&take("k", 2, false), 1_400_000, 0, &room)
            .unwrap();
        assert_eq!(hit.limits[0].retry_after, Duration::from_millis(600));
        assert!(
            cache
                .lookup(&take("k", 2, false), 1_998_999, 0, &room)
                .is_some()
        );
        assert!(
            cache
                .lookup(&take("k", 2, false), 1_999_000, 0, &room)
                .is_none(),
            "its last ms"
        );
        assert!(
            cache
                .lookup(&take("k", 3, false), 1_400_000, 0, &room)
                .is_none(),
            "its wait differs"
        );
        assert!(
            cache
                .lookup(&take("k", 1, false), 1_400_000, 0, &room)
                .is_none(),
            "a lower cost may fit"
        );
        assert!(
            cache
                .lookup(&take("k", 2, false), 2_000_000, 0, &room)
                .is_none(),
            "the wait is over"
        );
        assert!(
            cache
                .lookup(&take("k", 2, false), 1_400_000, 1, &room)
                .is_none(),
            "another generation"
        );
        assert!(
            cache
                .lookup(&take("other", 2, false), 1_400_000, 0, &room)
                .is_none()
        );
        assert_eq!(cache.hits(), 2);
    }

    /// Defect: a refund or a reset emptied every cache of every limiter (the shared epoch
    /// moved one generation for all); anyone who reaches the limiter's port could keep
    /// them empty. Now only the refusals of the limits whose room slots moved are forgotten.
    #[test]
    fn a_refund_forgets_only_the_refusals_of_its_limits() {
        let cache = Refusals::new(10_000);
        let room = RoomSlots::default();
        let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        for key in &keys {
            cache.record(&take(key, 1, false), &refused(60_000), 0, 0, &room);
        }
        room.move_slots([RoomSlots::slot_of("k7")].into_iter());
        assert!(cache.lookup(&take("k7", 1, false), 10, 0, &room).is_none());
        let held = keys
            .iter()
            .filter(|k| cache.lookup(&take(k, 1, false), 10, 0, &room).is_some())
            .count();
        assert!(
            held >= 195,
            "only {held} of 200 refusals held after one refund"
        );
    }

    #[test]
    fn an_admission_forgets_and_shadow_limits_are_never_cached() {
        let cache = Refusals::new(100);
        let room = RoomSlots::default();
        cache.record(&take("k", 1, false), &refused(1000), 0, 0, &room);
        let admitted = Outcome {
            allowed: true,
            ..refused(0)
        };
        cache.record(&take("k", 1, false), &admitted, 10, 0, &room);
        assert!(cache.lookup(&take("k", 1, false), 20, 0, &room).is_none());
        assert!(cache.is_empty());
        cache.record(&take("s", 1, true), &refused(1000), 0, 0, &room);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = Refusals::new(32);
        let room = RoomSlots::default();
        for i in 0..10_000 {
            cache.record(
                &take(&format!("k{i}"), 1, false),
                &refused(60_000),
                0,
                0,
                &room,
            );
        }
        assert!(cache.len() <= 32, "{} entries", cache.len());
        // Once they expire, new refusals take their place.
        cache.record(
            &take("late", 1, false),
            &refused(1000),
            60_000_000,
            0,
            &room,
        );
        assert!(
            cache
                .lookup(&take("late", 1, false), 60_000_001, 0, &room)
                .is_some()
        );
    }
}
