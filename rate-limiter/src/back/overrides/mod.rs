//! Overrides: per-customer limits that do not belong in a rules file, set through the admin
//! API (`PUT /admin/overrides`) and applied by every limiter within a second.
//!
//! An override names a domain and one exact descriptor (`[api_key=acme]`) and gives it its
//! own limits (in the rules file's `rate_limits` form), or makes it unlimited. A request
//! whose descriptor is exactly that one gets the override's limits instead of whatever the
//! rules give it. Bucket keys depend on the descriptor and the limit's name only, so an
//! override whose limit keeps the rule's name keeps its counter.
//!
//! Kept by an [`OverrideStore`]: in Redis (a hash of id → JSON, and a version counter
//! bumped on every change, which each limiter polls every 250 ms) when the limiter has
//! Redis ([`RedisOverrides`]); in memory otherwise ([`MemoryOverrides`], the embedded
//! form). Both pass one contract (`store::contract`). At most [`MAX_OVERRIDES`].
//!
//! Beside them, in Redis, an epoch that resets and refunds made through any limiter bump
//! (`<prefix>{overrides}:e`), polled with the version: the refusal caches of every limiter
//! forget what they hold within a poll (see [`crate::back::refusals`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use domain::api::{FieldError, FromJson};
use domain::descriptor::{Descriptor, Entry};
use domain::rules::{Rule, limits_from_json};
use kit::redis::Connection;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub mod store;

pub use store::{MemoryOverrides, OverrideStore, RedisOverrides};

/// The most overrides a deployment holds.
pub const MAX_OVERRIDES: usize = 10_000;
/// Longest override id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// How often a limiter looks for changes made through another limiter.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// One override as the admin API takes and shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideDoc {
    /// `[A-Za-z0-9_.-]`, 1 to 128 bytes; `PUT` with an existing id replaces it.
    pub id: String,
    #[serde(default = "default_domain")]
    pub domain: String,
    /// The exact descriptor the override applies to.
    pub entries: Vec<Entry>,
    /// The limits, each as a `rate_limits` item of a rules file (each needs a `name`);
    /// `[{"unlimited": true}]` makes the descriptor unlimited.
    pub limits: serde_json::Value,
    /// Decided and reported, never enforced.
    #[serde(default)]
    pub shadow_mode: bool,
}

fn default_domain() -> String {
    domain::descriptor::DEFAULT_DOMAIN.to_owned()
}

impl OverrideDoc {
    /// Checks every field and builds the rule the override stands for.
    pub fn validate(&self) -> Result<Rule, FieldError> {
        if self.id.is_empty()
            || self.id.len() > MAX_ID_BYTES
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(FieldError::new(
                "id",
                format!("must be 1 to {MAX_ID_BYTES} characters of A-Z, a-z, 0-9, '_', '.', '-'"),
            ));
        }
        let request = serde_json::json!({
            "domain": self.domain,
            "descriptors": [{"entries": self.entries}],
        });
        // The same checks as a request's descriptor (lengths, the identity rule).
        let checked = domain::api::CheckRequest::from_json(request.to_string().as_bytes())
            .map_err(|e| FieldError::new(e.field.replace("descriptors[0].", ""), e.detail))?;
        if checked.domain != self.domain || checked.descriptors[0].entries != self.entries {
            return Err(FieldError::new(
                "entries",
                "must be given in their canonical (NFC) form",
            ));
        }
        let (limits, unlimited) =
            limits_from_json(self.limits.clone()).map_err(|e| FieldError::new("limits", e))?;
        Ok(Rule {
            path: format!("override.{}", self.id),
            limits,
            unlimited,
            shadow: self.shadow_mode,
            detailed_metric: false,
            replaces: Vec::new(),
        })
    }
}

/// The overrides in force, by domain and exact descriptor.
#[derive(Default)]
pub struct OverrideSet {
    by_descriptor: HashMap<String, HashMap<Descriptor, Arc<Rule>>>,
    docs: BTreeMap<String, OverrideDoc>,
}

impl OverrideSet {
    fn build(docs: BTreeMap<String, OverrideDoc>) -> Self {
        let mut by_descriptor: HashMap<String, HashMap<Descriptor, Arc<Rule>>> = HashMap::new();
        let mut kept = BTreeMap::new();
        for (id, doc) in docs {
            match doc.validate() {
                Ok(rule) => {
                    by_descriptor.entry(doc.domain.clone()).or_default().insert(
                        Descriptor {
                            entries: doc.entries.clone(),
                        },
                        Arc::new(rule),
                    );
                    kept.insert(id, doc);
                }
                Err(err) => tracing::warn!(id, error = %err, "stored override ignored"),
            }
        }
        Self {
            by_descriptor,
            docs: kept,
        }
    }

    /// The override for `descriptor` in `domain`, if there is one.
    pub fn get(&self, domain: &str, descriptor: &Descriptor) -> Option<&Arc<Rule>> {
        self.by_descriptor.get(domain)?.get(descriptor)
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }
}

/// Why an admin change was not made.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("at most {MAX_OVERRIDES} overrides; delete one first")]
    Full,
    #[error("no override {0}")]
    NotFound(String),
    #[error("the override store is unavailable: {0}")]
    Unavailable(String),
}

/// Slots of the limit keys, for [`RoomSlots`].
pub const ROOM_SLOTS: usize = 1024;

/// Which limits gained room other than by time (a refund or a reset), by slot: every limit
/// key falls in one of [`ROOM_SLOTS`] slots (a stable hash), and a slot's generation moves
/// when a limit of it gets room, here or (through Redis, polled with the overrides) at any
/// limiter. A cached refusal holds only while the slots of its limits have not moved, so a
/// refund or a reset forgets the refusals of about 1/1024 of the keys, not all of them.
pub struct RoomSlots {
    slots: Box<[AtomicU64]>,
}

impl Default for RoomSlots {
    fn default() -> Self {
        Self {
            slots: (0..ROOM_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RoomSlots {
    /// The slot of a limit key (a hash stable across processes and versions).
    pub fn slot_of(key: &str) -> usize {
        (domain::keys::stable_hash(key) % ROOM_SLOTS as u64) as usize
    }

    /// A mark of the slots of `keys` now: it moves when any of them moves.
    pub fn mark<'a>(&self, keys: impl Iterator<Item = &'a str>) -> u64 {
        keys.map(|k| self.slots[Self::slot_of(k)].load(Ordering::Acquire))
            .fold(0, u64::wrapping_add)
    }

    /// The limits in `slots` gained room.
    pub fn move_slots(&self, slots: impl Iterator<Item = usize>) {
        for slot in slots {
            self.slots[slot % ROOM_SLOTS].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Every limit may have gained room (the shared record of slots was lost).
    pub fn move_all(&self) {
        self.move_slots(0..ROOM_SLOTS);
    }
}

/// The overrides in force, and where they are kept.
pub struct Overrides {
    current: RwLock<Arc<OverrideSet>>,
    /// Whether any override is in force: read on every decision, so that a deployment
    /// without overrides takes no lock for them.
    any: AtomicBool,
    /// Moves when the overrides change or the shared epoch moves (a reset or a refund
    /// anywhere): refusals remembered before no longer hold.
    generation: AtomicU64,
    /// Moves of the shared epoch seen here (a reset or a refund at any limiter).
    epoch_moves: AtomicU64,
    /// The limits that gained room, by slot (see [`RoomSlots`]).
    room: RoomSlots,
    store: Box<dyn OverrideStore>,
}

impl Overrides {
    /// Overrides kept in `store`.
    pub fn new(store: Box<dyn OverrideStore>) -> Self {
        Self {
            current: RwLock::new(Arc::new(OverrideSet::default())),
            any: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            epoch_moves: AtomicU64::new(0),
            room: RoomSlots::default(),
            store,
        }
    }

    /// Overrides kept in this process (the embedded form).
    pub fn in_memory() -> Self {
        Self::new(Box::new(MemoryOverrides::default()))
    }

    /// Overrides kept in Redis under `prefix`, shared by every limiter there.
    pub fn in_redis(conn: Connection, prefix: &str, timeout: Duration) -> Self {
        Self::new(Box::new(RedisOverrides::new(conn, prefix, timeout)))
    }

    /// The Redis connection, key prefix and call timeout the overrides are shared through
    /// (none in memory), for other state the limiters share (the RLQS demand board).
    pub fn shared_redis(&self) -> Option<(Connection, String, Duration)> {
        self.store.shared_redis()
    }

    /// The overrides in force.
    pub fn current(&self) -> Arc<OverrideSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, docs: BTreeMap<String, OverrideDoc>) {
        if self.current().docs == docs {
            // Read again, unchanged (the first poll, or a change undone): nothing to forget.
            return;
        }
        let set = Arc::new(OverrideSet::build(docs));
        let any = !set.is_empty();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = set;
        self.any.store(any, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// How many times the overrides or the shared epoch moved, as seen here.
    pub fn generation(&self) -> u64 {
        self.content_generation()
            .wrapping_add(self.epoch_moves.load(Ordering::Acquire))
    }

    /// How many times the overrides themselves changed, as seen here (a reset or a refund
    /// moves only the [`RoomSlots`] of its limits).
    pub fn content_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The limits that gained room, by slot.
    pub fn room(&self) -> &RoomSlots {
        &self.room
    }

    /// Tells this limiter and every other that the limits under `keys` may have room sooner
    /// than they said (a reset or a refund): their slots move here at once, and through
    /// the store (at the others within a poll).
    pub async fn give_room(&self, keys: &[String]) -> Result<(), OverrideError> {
        let mut slots: Vec<usize> = keys.iter().map(|k| RoomSlots::slot_of(k)).collect();
        slots.sort_unstable();
        slots.dedup();
        self.room.move_slots(slots.iter().copied());
        self.store.announce_room(&slots).await
    }

    /// Whether any override is in force (no lock).
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Every override, by id.
    pub fn list(&self) -> Vec<OverrideDoc> {
        self.current().docs.values().cloned().collect()
    }

    /// Adds or replaces an override; in force here at once, elsewhere within a second.
    pub async fn put(&self, doc: OverrideDoc) -> Result<(), OverrideError> {
        doc.validate()?;
        self.store.put(&doc).await?;
        self.refresh().await
    }

    /// Deletes an override.
    pub async fn delete(&self, id: &str) -> Result<(), OverrideError> {
        self.store.delete(id).await?;
        self.refresh().await
    }

    /// Reads every override from the store and puts it in force.
    async fn refresh(&self) -> Result<(), OverrideError> {
        let docs = self.store.load().await?;
        self.install(docs);
        Ok(())
    }

    /// With a shared store: reads the overrides now, then polls its version and epoch every
    /// 250 ms and reads them again when the version moved (a change made through any
    /// limiter), or moves the generation when the epoch did, until `shutdown`. Nothing to
    /// watch in memory.
    pub fn spawn_poller(self: &Arc<Self>, shutdown: CancellationToken) {
        if !self.store.is_shared() {
            return;
        }
        let overrides = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut seen: Option<Option<i64>> = None;
            let mut seen_epoch: Option<Option<i64>> = None;
            // The slots' counts as last read (None: not read yet).
            let mut seen_slots: Option<HashMap<u64, i64>> = None;
            let mut every = kit::every::Every::new(POLL_INTERVAL, shutdown);
            while every.tick().await {
                let Some(overrides) = overrides.upgrade() else {
                    return;
                };
                let (now, now_epoch) = match overrides.store.versions().await {
                    Ok(v) => v,
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot read the overrides' version");
                        continue;
                    }
                };
                if seen_epoch.is_none_or(|e| e != now_epoch) {
                    if seen_epoch.is_some() {
                        overrides.epoch_moves.fetch_add(1, Ordering::AcqRel);
                    }
                    // Which limits gained room: the slots whose counts moved.
                    match overrides.store.room_counts().await {
                        Ok(now_slots) => {
                            if let Some(before) = &seen_slots {
                                let moved = (0..ROOM_SLOTS as u64)
                                    .filter(|slot| before.get(slot) != now_slots.get(slot));
                                overrides.room.move_slots(moved.map(|s| s as usize));
                            }
                            seen_slots = Some(now_slots);
                        }
                        Err(err) => {
                            tracing::debug!(error = %err, "cannot read the room slots; every cached refusal is forgotten");
                            overrides.room.move_all();
                            seen_slots = None;
                        }
                    }
                }
                seen_epoch = Some(now_epoch);
                if seen == Some(now) {
                    continue;
                }
                match overrides.refresh().await {
                    Ok(()) => seen = Some(now),
                    Err(err) => tracing::warn!(error = %err, "cannot read the overrides"),
                }
            }
        });
    }
}
