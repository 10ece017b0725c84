//! Where the overrides are kept: the [`OverrideStore`] seam, in this process
//! ([`MemoryOverrides`]) or in Redis, shared by every limiter there ([`RedisOverrides`]).
//! Both pass one contract (`contract`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kit::redis::{Connection, with_deadline};

use super::{MAX_OVERRIDES, OverrideDoc, OverrideError};

/// Keeps the override documents, and (when shared) tells every limiter what changed.
#[async_trait]
pub trait OverrideStore: Send + Sync + 'static {
    /// Every override kept, by id.
    async fn load(&self) -> Result<BTreeMap<String, OverrideDoc>, OverrideError>;

    /// Adds `doc` (already validated), or replaces the one with its id; refused when
    /// [`MAX_OVERRIDES`] others are kept.
    async fn put(&self, doc: &OverrideDoc) -> Result<(), OverrideError>;

    /// Deletes the override `id`.
    async fn delete(&self, id: &str) -> Result<(), OverrideError>;

    /// Tells the other limiters that the limits in room `slots` gained room.
    async fn announce_room(&self, slots: &[usize]) -> Result<(), OverrideError>;

    /// Whether other limiters share this store, so that it must be watched
    /// ([`OverrideStore::versions`], [`OverrideStore::room_counts`]).
    fn is_shared(&self) -> bool;

    /// The store's version (moved by every change) and epoch (moved by every
    /// [`OverrideStore::announce_room`]), `None` while never moved.
    async fn versions(&self) -> Result<(Option<i64>, Option<i64>), OverrideError>;

    /// How many times each room slot was announced.
    async fn room_counts(&self) -> Result<HashMap<u64, i64>, OverrideError>;

    /// The Redis connection, key prefix and call timeout the store lives in (none in
    /// memory), for other state the limiters share (the RLQS demand board).
    fn shared_redis(&self) -> Option<(Connection, String, Duration)> {
        None
    }
}

/// Overrides kept in this process (the embedded form): no one else to tell.
#[derive(Default)]
pub struct MemoryOverrides {
    docs: Mutex<BTreeMap<String, OverrideDoc>>,
}

impl MemoryOverrides {
    fn docs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OverrideDoc>> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl OverrideStore for MemoryOverrides {
    async fn load(&self) -> Result<BTreeMap<String, OverrideDoc>, OverrideError> {
        Ok(self.docs().clone())
    }

    async fn put(&self, doc: &OverrideDoc) -> Result<(), OverrideError> {
        let mut docs = self.docs();
        if !docs.contains_key(&doc.id) && docs.len() >= MAX_OVERRIDES {
            return Err(OverrideError::Full);
        }
        docs.insert(doc.id.clone(), doc.clone());
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<(), OverrideError> {
        match self.docs().remove(id) {
            Some(_) => Ok(()),
            None => Err(OverrideError::NotFound(id.to_owned())),
        }
    }

    async fn announce_room(&self, _slots: &[usize]) -> Result<(), OverrideError> {
        Ok(())
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn versions(&self) -> Result<(Option<i64>, Option<i64>), OverrideError> {
        Ok((None, None))
    }

    async fn room_counts(&self) -> Result<HashMap<u64, i64>, OverrideError> {
        Ok(HashMap::new())
    }
}

/// Overrides kept in Redis, shared by every limiter there: a hash of id → JSON, a version
/// bumped by every change, an epoch and a hash of room-slot counts bumped by every
/// announced room. One hash tag for all four, so that a change is one transaction on a
/// Cluster too.
pub struct RedisOverrides {
    conn: Connection,
    hash: String,
    version: String,
    epoch: String,
    /// A hash of slot -> count of room given there (see [`super::RoomSlots`]).
    slots: String,
    prefix: String,
    timeout: Duration,
}

impl RedisOverrides {
    pub fn new(conn: Connection, prefix: &str, timeout: Duration) -> Self {
        Self {
            conn,
            hash: format!("{prefix}{{overrides}}"),
            version: format!("{prefix}{{overrides}}:v"),
            epoch: format!("{prefix}{{overrides}}:e"),
            slots: format!("{prefix}{{overrides}}:s"),
            prefix: prefix.to_owned(),
            timeout: timeout.max(Duration::from_millis(500)),
        }
    }
}

#[async_trait]
impl OverrideStore for RedisOverrides {
    async fn load(&self) -> Result<BTreeMap<String, OverrideDoc>, OverrideError> {
        let mut c = self.conn.clone();
        let raw: HashMap<String, String> = with_deadline(
            self.timeout,
            redis::cmd("HGETALL").arg(&self.hash).query_async(&mut c),
        )
        .await
        .map_err(|e| OverrideError::Unavailable(e.to_string()))?;
        Ok(raw
            .into_iter()
            .take(MAX_OVERRIDES)
            .filter_map(
                |(id, json)| match serde_json::from_str::<OverrideDoc>(&json) {
                    Ok(doc) => Some((id, doc)),
                    Err(err) => {
                        tracing::warn!(id, error = %err, "stored override unreadable, ignored");
                        None
                    }
                },
            )
            .collect())
    }

    async fn put(&self, doc: &OverrideDoc) -> Result<(), OverrideError> {
        let json = serde_json::to_string(doc).expect("serializes");
        // Checked and written in one script: the bound holds with many admins.
        let script = redis::Script::new(
            r"if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
              redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
              redis.call('INCR', KEYS[2])
              return 1",
        );
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.hash)
            .key(&self.version)
            .arg(&doc.id)
            .arg(json)
            .arg(MAX_OVERRIDES);
        let mut c = self.conn.clone();
        let done: i64 = with_deadline(self.timeout, invocation.invoke_async(&mut c))
            .await
            .map_err(|e| OverrideError::Unavailable(e.to_string()))?;
        if done == 0 {
            return Err(OverrideError::Full);
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<(), OverrideError> {
        let mut pipe = redis::pipe();
        pipe.atomic().hdel(&self.hash, id).incr(&self.version, 1);
        let mut c = self.conn.clone();
        let (removed, _): (i64, i64) = with_deadline(self.timeout, pipe.query_async(&mut c))
            .await
            .map_err(|e| OverrideError::Unavailable(e.to_string()))?;
        if removed == 0 {
            return Err(OverrideError::NotFound(id.to_owned()));
        }
        Ok(())
    }

    async fn announce_room(&self, slots: &[usize]) -> Result<(), OverrideError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for slot in slots {
            pipe.hincr(&self.slots, *slot, 1).ignore();
        }
        pipe.incr(&self.epoch, 1).ignore();
        let mut c = self.conn.clone();
        let _: () = with_deadline(self.timeout, pipe.query_async(&mut c))
            .await
            .map_err(|e| OverrideError::Unavailable(e.to_string()))?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn versions(&self) -> Result<(Option<i64>, Option<i64>), OverrideError> {
        let mut c = self.conn.clone();
        with_deadline(
            self.timeout,
            redis::cmd("MGET")
                .arg(&self.version)
                .arg(&self.epoch)
                .query_async(&mut c),
        )
        .await
        .map_err(|e| OverrideError::Unavailable(e.to_string()))
    }

    async fn room_counts(&self) -> Result<HashMap<u64, i64>, OverrideError> {
        let mut c = self.conn.clone();
        with_deadline(
            self.timeout,
            redis::cmd("HGETALL").arg(&self.slots).query_async(&mut c),
        )
        .await
        .map_err(|e| OverrideError::Unavailable(e.to_string()))
    }

    fn shared_redis(&self) -> Option<(Connection, String, Duration)> {
        Some((self.conn.clone(), self.prefix.clone(), self.timeout))
    }
}

/// The contract every [`OverrideStore`] honours, run against each: a fresh, empty store.
#[cfg(any(test, feature = "testsuite"))]
pub async fn contract(store: &dyn OverrideStore) {
    let doc = |id: &str, value: &str| OverrideDoc {
        id: id.to_owned(),
        domain: "default".to_owned(),
        entries: vec![domain::descriptor::Entry {
            key: "api_key".to_owned(),
            value: value.to_owned(),
        }],
        limits: serde_json::json!([{"name": "burst", "requests_per_unit": 5, "unit": "second"}]),
        shadow_mode: false,
    };
    assert!(store.load().await.unwrap().is_empty());
    let (version, _) = store.versions().await.unwrap();
    store.put(&doc("a", "acme")).await.unwrap();
    store.put(&doc("b", "bolt")).await.unwrap();
    // A put with an existing id replaces it.
    store.put(&doc("a", "apex")).await.unwrap();
    let kept = store.load().await.unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept["a"], doc("a", "apex"));
    assert_eq!(kept["b"], doc("b", "bolt"));
    store.delete("b").await.unwrap();
    assert!(matches!(
        store.delete("b").await,
        Err(OverrideError::NotFound(id)) if id == "b"
    ));
    assert_eq!(
        store.load().await.unwrap().keys().collect::<Vec<_>>(),
        ["a"]
    );
    store.announce_room(&[3, 7]).await.unwrap();
    store.announce_room(&[7]).await.unwrap();
    if store.is_shared() {
        // Every change moves the version; every announcement the epoch and its slots.
        let (moved, epoch) = store.versions().await.unwrap();
        assert_ne!(moved, version);
        assert!(epoch.is_some());
        let counts = store.room_counts().await.unwrap();
        assert_eq!((counts.get(&3), counts.get(&7)), (Some(&1), Some(&2)));
    } else {
        assert!(store.room_counts().await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_overrides_pass_the_contract() {
        contract(&MemoryOverrides::default()).await;
    }

    #[tokio::test]
    async fn memory_overrides_hold_at_most_the_bound() {
        let store = MemoryOverrides::default();
        let doc = |i: usize| OverrideDoc {
            id: format!("o{i}"),
            domain: "default".to_owned(),
            entries: Vec::new(),
            limits: serde_json::Value::Null,
            shadow_mode: false,
        };
        for i in 0..MAX_OVERRIDES {
            store.put(&doc(i)).await.unwrap();
        }
        assert!(matches!(
            store.put(&doc(MAX_OVERRIDES)).await,
            Err(OverrideError::Full)
        ));
        // Replacing one that is kept is still allowed.
        store.put(&doc(0)).await.unwrap();
    }
}
