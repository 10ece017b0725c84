//! The shared bucket store: one atomic round trip to Redis per decision.
//!
//! The decision runs inside Redis as a Lua script (loaded once, called with EVALSHA and
//! reloaded on NOSCRIPT through `service_kit::redis::Scripts`), using Redis's own `TIME` so that every limiter
//! host agrees on the clock. The arithmetic mirrors [`ratelimit_domain::bucket::decide`]
//! operation for operation, except that a refused request writes nothing (a write is a
//! Redis call, replicated; the refill it would record is recomputed from the stored state
//! next time). A bucket is 16 bytes, the tokens and the µs of the last update as two
//! little-endian doubles (`struct.pack`, cheaper in Lua than formatting and parsing text;
//! the earlier text form is still read), that expires when it would be full again, and its
//! key carries the user id as a hash tag ([`ratelimit_domain::keys`]) so the script is legal
//! on Redis Cluster. Every request shares one multiplexed connection (pipelined), never a
//! connection per request.

use std::time::Duration;

use async_trait::async_trait;
use ratelimit_domain::{Decision, Policy, Quota, keys};
use service_kit::redis::{
    Connection, Endpoint, Scripts, connect, describe, is_noscript, with_deadline,
};

use super::{BucketStore, StoreError, Taken};

const TAKE_SCRIPT: &str = r#"
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = capacity
local updated = now
local raw = redis.call('GET', KEYS[1])
if raw then
  if #raw == 16 then
    stored, updated = struct.unpack('<d<d', raw)
  else
    -- The earlier text form "<tokens> <updated_us>" (never 16 bytes), during an upgrade.
    local sep = string.find(raw, ' ', 1, true)
    stored = tonumber(string.sub(raw, 1, sep - 1))
    updated = tonumber(string.sub(raw, sep + 1))
  end
end
if now < updated then now = updated end
local elapsed = now - updated
local tokens = math.min(capacity, stored + elapsed * rate / 1000000)
if tokens >= cost then
  tokens = tokens - cost
  local reset = 0
  if tokens < capacity then
    reset = math.ceil((capacity - tokens) * 1000000 / rate)
    local step = 1
    while math.min(capacity, tokens + reset * rate / 1000000) < capacity do
      reset = reset + step
      step = step * 2
    end
  end
  redis.call('SET', KEYS[1], struct.pack('<d<d', tokens, now), 'PX', math.max(1, math.ceil(reset / 1000)))
  return {1, math.floor(tokens), 0, reset}
end
-- The "step until enough" loops: the first step is 1 µs, then each doubles, so they end
-- whatever the numbers (the policy bounds keep them to a step or two).
-- Refused: nothing is written. The bucket stays as stored, so the waits are computed with
-- the very expression a later call will evaluate (stored + elapsed since the update): a
-- retry at now + retry_after sees at least `cost` tokens, bit for bit.
local function wait(want)
  local us = math.ceil((want - tokens) * 1000000 / rate)
  local step = 1
  while math.min(capacity, stored + (elapsed + us) * rate / 1000000) < want do
    us = us + step
    step = step * 2
  end
  return us
end
local retry = -1
if cost <= capacity then retry = wait(cost) end
return {0, math.floor(tokens), retry, wait(capacity)}
"#;

/// Token buckets in Redis, shared by every limiter instance that points at it.
pub struct RedisStore {
    policy: Policy,
    conn: Connection,
    scripts: Scripts,
    key_prefix: String,
    timeout: Duration,
}

impl RedisStore {
    /// A store at `endpoint` whose calls each have `timeout`. Connects lazily and
    /// reconnects by itself, so it can be built while Redis is down.
    pub fn new(
        endpoint: &Endpoint,
        key_prefix: &str,
        policy: Policy,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let conn = connect(endpoint, timeout)?;
        Ok(Self {
            policy,
            conn,
            scripts: Scripts::new(&[TAKE_SCRIPT]),
            key_prefix: key_prefix.to_owned(),
            timeout,
        })
    }

    /// Loads the script now, so the first request does not pay for it.
    pub async fn preload(&self) -> Result<(), StoreError> {
        self.scripts
            .load(&self.conn, self.timeout.max(Duration::from_secs(1)))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl BucketStore for RedisStore {
    fn policy(&self) -> &Policy {
        &self.policy
    }

    /// One take is a batch of one: the same pipeline, the same `NOSCRIPT` handling.
    async fn take(&self, user_id: &str, cost: u64) -> Result<Decision, StoreError> {
        self.take_many(&[(user_id, cost)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Protocol("no answer".into())))
    }

    /// Every take in one pipeline of `EVALSHA`s: one write and one round trip for the batch.
    /// Redis runs them one after the other, each atomic, in order. Takes that find the
    /// script missing (`NOSCRIPT`: Redis restarted or flushed) did not run; they are sent
    /// again once the script is loaded.
    async fn take_many(&self, takes: &[(&str, u64)]) -> Result<Vec<Taken>, StoreError> {
        let mut taken: Vec<Option<Taken>> = takes.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..takes.len()).collect();
        for round in 0..2 {
            let answers = self.run_takes(takes, &pending).await?;
            let mut missing_script = Vec::new();
            for (&i, answer) in pending.iter().zip(answers) {
                match answer {
                    Ok(answer) => taken[i] = Some(self.decision(answer)),
                    Err(err) if round == 0 && is_noscript(&err) => missing_script.push(i),
                    Err(err) => taken[i] = Some(Err(StoreError::Unavailable(describe(&err)))),
                }
            }
            if missing_script.is_empty() {
                break;
            }
            self.preload().await?;
            pending = missing_script;
        }
        Ok(taken
            .into_iter()
            .map(|t| t.unwrap_or_else(|| Err(StoreError::Protocol("no answer".into()))))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String =
            with_deadline(self.timeout, redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }
}

/// What the script returns: allowed (0/1), whole tokens left, retry after (µs, -1 for
/// never), reset after (µs).
type Answer = (i64, i64, i64, i64);

impl RedisStore {
    /// Sends the takes at `indices` and returns their answers, in the order of `indices`.
    /// On one Redis: one pipeline. On a Cluster, where a pipeline must stay in one slot:
    /// one pipeline per user (so one user's takes still run in order), all at once.
    async fn run_takes(
        &self,
        takes: &[(&str, u64)],
        indices: &[usize],
    ) -> Result<Vec<redis::RedisResult<Answer>>, StoreError> {
        let groups: Vec<Vec<usize>> = if self.conn.is_cluster() {
            let mut by_user: Vec<(&str, Vec<usize>)> = Vec::new();
            let mut position: std::collections::HashMap<&str, usize> = Default::default();
            for &i in indices {
                let user = takes[i].0;
                let at = *position.entry(user).or_insert_with(|| {
                    by_user.push((user, Vec::new()));
                    by_user.len() - 1
                });
                by_user[at].1.push(i);
            }
            by_user.into_iter().map(|(_, group)| group).collect()
        } else {
            vec![indices.to_vec()]
        };
        let pipelines = groups.iter().map(|group| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in group {
                let (user_id, cost) = takes[i];
                pipe.cmd("EVALSHA")
                    .arg(self.scripts.hash(0))
                    .arg(1)
                    .arg(keys::bucket_key(&self.key_prefix, user_id))
                    .arg(self.policy.capacity())
                    .arg(self.policy.refill_per_sec())
                    .arg(cost);
            }
            let mut conn = self.conn.clone();
            async move {
                let answers: Vec<redis::RedisResult<Answer>> = pipe.query_async(&mut conn).await?;
                if answers.len() != group.len() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "wrong number of answers",
                        format!("{} answers to {} takes", answers.len(), group.len()),
                    )));
                }
                Ok(group.iter().copied().zip(answers).collect::<Vec<_>>())
            }
        });
        let answered = with_deadline(
            self.batch_timeout(indices.len()),
            futures::future::try_join_all(pipelines),
        )
        .await?;
        let mut by_take: Vec<Option<redis::RedisResult<Answer>>> =
            takes.iter().map(|_| None).collect();
        for (i, answer) in answered.into_iter().flatten() {
            by_take[i] = Some(answer);
        }
        Ok(indices
            .iter()
            .map(|&i| by_take[i].take().expect("every take answered"))
            .collect())
    }

    /// The deadline of one call carrying `takes` decisions: `REDIS_TIMEOUT_MS` for one, and
    /// as much again for every 64 more (a full batch of 256 gets 5 times as long), so that a
    /// big batch is not held to the deadline of a single decision.
    fn batch_timeout(&self, takes: usize) -> Duration {
        self.timeout * (1 + takes.saturating_sub(1) as u32 / 64)
    }

    fn decision(&self, answer: Answer) -> Result<Decision, StoreError> {
        let (allowed, remaining, retry_us, reset_us) = answer;
        let quota = Quota {
            limit: self.policy.capacity(),
            remaining: remaining.max(0) as u64,
            reset_after: Duration::from_micros(reset_us.max(0) as u64),
        };
        Ok(match (allowed, retry_us) {
            (1, _) => Decision::Allowed(quota),
            (0, -1) => Decision::Limited {
                quota,
                retry_after: Duration::MAX,
            },
            (0, us) if us >= 0 => Decision::Limited {
                quota,
                retry_after: Duration::from_micros(us as u64),
            },
            other => return Err(StoreError::Protocol(format!("script returned {other:?}"))),
        })
    }
}
