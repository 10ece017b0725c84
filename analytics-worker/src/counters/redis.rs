//! Counters in Redis: a hash per user (`<prefix>c{<user>}`) with `allowed`, `blocked` and,
//! per partition, `o:<partition>` = the last offset already counted.
//!
//! One Lua script per user and batch checks that offset and applies the increments
//! atomically (a single key, so legal on Redis Cluster); all users of a batch go in one
//! pipelined round trip.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use ratelimit_core::api::UserAnalytics;
use ratelimit_core::keys;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{CounterError, CounterStore, PartitionBatch, Tally, tally};

/// Returns -2 when applied, -1 when everything was already counted, or the offset
/// already counted when only part of the batch is new (the caller re-tallies past it).
const APPLY_SCRIPT: &str = r#"
local field = ARGV[1]
if field ~= '' then
  local applied = tonumber(redis.call('HGET', KEYS[1], field) or '-1')
  if applied >= tonumber(ARGV[3]) then return -1 end
  if applied >= tonumber(ARGV[2]) then return applied end
  redis.call('HSET', KEYS[1], field, ARGV[3])
end
if ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'allowed', ARGV[4]) end
if ARGV[5] ~= '0' then redis.call('HINCRBY', KEYS[1], 'blocked', ARGV[5]) end
return -2
"#;

pub struct RedisCounters {
    conn: ConnectionManager,
    script: redis::Script,
    key_prefix: String,
    timeout: Duration,
}

impl RedisCounters {
    /// Counters on `url`; every call has `timeout`. Connects lazily and reconnects by itself.
    pub fn new(url: &str, key_prefix: &str, timeout: Duration) -> Result<Self, CounterError> {
        let client =
            redis::Client::open(url).map_err(|e| CounterError::Unavailable(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| CounterError::Unavailable(e.to_string()))?;
        Ok(Self {
            conn,
            script: redis::Script::new(APPLY_SCRIPT),
            key_prefix: key_prefix.to_owned(),
            timeout,
        })
    }

    async fn deadline<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CounterError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(CounterError::Timeout),
            Ok(Err(e)) if e.is_timeout() => Err(CounterError::Timeout),
            Ok(Err(e)) => Err(CounterError::Unavailable(e.to_string())),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Runs the script for every user's tally in one pipeline; returns the script results.
    async fn apply_tallies(
        &self,
        field: &str,
        tallies: &[(&str, Tally)],
    ) -> Result<Vec<i64>, CounterError> {
        let mut pipe = redis::pipe();
        for (user, t) in tallies {
            let mut invocation = self.script.key(keys::counter_key(&self.key_prefix, user));
            invocation
                .arg(field)
                .arg(t.first_offset)
                .arg(t.last_offset)
                .arg(t.allowed)
                .arg(t.blocked);
            pipe.invoke_script(&invocation);
        }
        let mut conn = self.conn.clone();
        match self.deadline(pipe.query_async::<Vec<i64>>(&mut conn)).await {
            Err(CounterError::Unavailable(msg))
                if msg.to_ascii_lowercase().contains("noscript") =>
            {
                // Redis restarted or flushed its script cache: load and send again (the
                // offsets make the repeat harmless).
                let invocation = self.script.prepare_invoke();
                self.deadline(invocation.load_async(&mut conn)).await?;
                self.deadline(pipe.query_async(&mut conn)).await
            }
            other => other,
        }
    }
}

#[async_trait]
impl CounterStore for RedisCounters {
    async fn apply(&self, batch: &PartitionBatch) -> Result<(), CounterError> {
        let field = batch
            .partition
            .map(|p| format!("o:{p}"))
            .unwrap_or_default();
        let mut floors: HashMap<&str, i64> = HashMap::new();
        let mut pending: Vec<(&str, Tally)> = tally(&batch.events, |_| None);
        // Each round settles every user but those whose counters already held part of
        // the batch; those are re-tallied past what they hold. One round is the rule.
        for _ in 0..8 {
            if pending.is_empty() {
                return Ok(());
            }
            let results = self.apply_tallies(&field, &pending).await?;
            let mut retry = false;
            for ((user, _), result) in pending.iter().zip(&results) {
                if *result >= 0 {
                    floors.insert(user, *result);
                    retry = true;
                }
            }
            if !retry {
                return Ok(());
            }
            let events = batch
                .events
                .iter()
                .filter(|(_, e)| floors.contains_key(e.user_id.as_str()));
            pending = tally(events, |user| floors.get(user).copied());
            // Users whose floors were just set are the only ones left; clear for next round.
            floors.clear();
        }
        Err(CounterError::Protocol(
            "offsets kept moving under a batch".into(),
        ))
    }

    async fn get(&self, user_id: &str) -> Result<UserAnalytics, CounterError> {
        let mut conn = self.conn.clone();
        let key = keys::counter_key(&self.key_prefix, user_id);
        let cmd = redis::cmd("HMGET")
            .arg(key)
            .arg("allowed")
            .arg("blocked")
            .to_owned();
        let (allowed, blocked): (Option<u64>, Option<u64>) =
            self.deadline(cmd.query_async(&mut conn)).await?;
        let (allowed, blocked) = (allowed.unwrap_or(0), blocked.unwrap_or(0));
        Ok(UserAnalytics {
            user_id: user_id.to_owned(),
            total: allowed + blocked,
            allowed,
            blocked,
        })
    }

    async fn ping(&self) -> Result<(), CounterError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .deadline(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }
}
