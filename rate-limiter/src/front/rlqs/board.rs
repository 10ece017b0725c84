//! The demand board: what each Envoy stream reporting a bucket has asked for lately, shared
//! by every limiter replica so that they divide one limit together.
//!
//! - [`DemandBoard`]: post this stream's demand for a bucket and read everyone's.
//! - [`MemoryBoard`]: in this process (the all-in-one, a limiter without Redis).
//! - [`RedisBoard`]: a Redis hash per bucket, `<prefix>{rlqs}:<domain>:<entries>`, field =
//!   stream id, value = `<demand>:<posted at, ms>`; a post drops the fields older than
//!   the staleness given and sets the hash to expire after it, so a stream that vanishes
//!   (its limiter killed) leaves the division within that time, and a bucket nobody
//!   reports leaves nothing behind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kit::redis::{Connection, with_deadline};

/// Why the board could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("the demand board is unavailable: {0}")]
pub struct BoardError(String);

/// Where the demands of the Envoys reporting each bucket are kept.
#[async_trait::async_trait]
pub trait DemandBoard: Send + Sync + 'static {
    /// Posts `demand` (requests per second) of stream `member` for `bucket` at `now_ms`, and
    /// returns the demands of every stream posted within `stale` (this one included).
    async fn post(
        &self,
        bucket: &str,
        member: &str,
        demand: f64,
        now_ms: u64,
        stale: Duration,
    ) -> Result<Vec<f64>, BoardError>;

    /// Takes stream `member` off `bucket` (its stream ended): its part goes to the others.
    async fn leave(&self, bucket: &str, member: &str);
}

/// A bucket's members: stream → (demand, posted at in ms).
type Members = HashMap<String, (f64, u64)>;

/// The board in this process.
#[derive(Default)]
pub struct MemoryBoard {
    buckets: Mutex<HashMap<String, Members>>,
    /// When every bucket was last swept of stale members (ms).
    swept_ms: AtomicU64,
}

#[async_trait::async_trait]
impl DemandBoard for MemoryBoard {
    async fn post(
        &self,
        bucket: &str,
        member: &str,
        demand: f64,
        now_ms: u64,
        stale: Duration,
    ) -> Result<Vec<f64>, BoardError> {
        let stale_ms = stale.as_millis() as u64;
        let fresh = |at: &u64| now_ms.saturating_sub(*at) <= stale_ms;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Once per staleness period, forget what nobody posted lately everywhere: the map
        // stays as small as the buckets reported now, at a cost spread over many posts.
        if now_ms.saturating_sub(self.swept_ms.load(Ordering::Relaxed)) >= stale_ms {
            self.swept_ms.store(now_ms, Ordering::Relaxed);
            buckets.retain(|_, members| {
                members.retain(|_, (_, at)| fresh(at));
                !members.is_empty()
            });
        }
        let members = buckets.entry(bucket.to_owned()).or_default();
        members.retain(|_, (_, at)| fresh(at));
        members.insert(member.to_owned(), (demand, now_ms));
        Ok(members.values().map(|(d, _)| *d).collect())
    }

    async fn leave(&self, bucket: &str, member: &str) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(members) = buckets.get_mut(bucket) {
            members.remove(member);
            if members.is_empty() {
                buckets.remove(bucket);
            }
        }
    }
}

/// Posts a demand, drops stale ones, returns the fresh ones (flat: member, demand, ...).
const POST: &str = r"
local now = tonumber(ARGV[3])
local stale = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], stale)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, ':', 1, true)
  local at = sep and tonumber(string.sub(v, sep + 1)) or 0
  if now - at > stale then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = string.sub(v, 1, sep - 1)
  end
end
return out
";

/// The board in Redis, shared by the limiters using it.
pub struct RedisBoard {
    conn: Connection,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
}

impl RedisBoard {
    pub fn new(conn: Connection, prefix: &str, timeout: Duration) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            timeout,
            script: redis::Script::new(POST),
        }
    }

    fn key(&self, bucket: &str) -> String {
        format!("{}{{rlqs}}:{bucket}", self.prefix)
    }
}

#[async_trait::async_trait]
impl DemandBoard for RedisBoard {
    async fn post(
        &self,
        bucket: &str,
        member: &str,
        demand: f64,
        now_ms: u64,
        stale: Duration,
    ) -> Result<Vec<f64>, BoardError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.key(bucket))
            .arg(member)
            .arg(format!("{demand:.3}"))
            .arg(now_ms)
            .arg(stale.as_millis().max(1) as u64);
        let fresh: Vec<String> = with_deadline(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|e| BoardError(e.to_string()))?;
        Ok(fresh.iter().filter_map(|d| d.parse().ok()).collect())
    }

    async fn leave(&self, bucket: &str, member: &str) {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(self.key(bucket)).arg(member);
        let left: Result<i64, _> = with_deadline(self.timeout, cmd.query_async(&mut conn)).await;
        if let Err(err) = left {
            tracing::debug!(error = %err, "rlqs: leaving the demand board failed; the entry goes stale");
        }
    }
}
