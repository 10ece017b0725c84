//! Counters in Redis.
//!
//! Per user (hash tag = the user id, so one slot per user on Redis Cluster):
//! - `<prefix>c{<user>}`: a hash with `allowed`, `blocked`, per publisher epoch
//!   `q:<epoch>` = the last sequence number already counted for this user (stamped events,
//!   [`domain::event::Stamp`]; the in-process stream's epoch numbers by its
//!   offsets), per partition `o:<partition>` = the last offset counted of unstamped events
//!   (an earlier build's), and `e`, when (Unix seconds) its expiry was last
//!   pushed back: it expires once the user has been idle for the user TTL (pushed back at
//!   most every 1 % of the TTL, at most every minute, by the TTL plus that much);
//! - `<prefix>c{<user>}:m<minute>`: a hash with `a`, `b` (allowed, blocked in that minute),
//!   expiring after the retention (set when the key is made).
//!
//! Per partition (hash tag `p<partition>`, or `local` for the in-process stream):
//! - `<prefix>g{p3}:q:<epoch>`: the last sequence number of that epoch counted from
//!   partition 3 into the global aggregates (`g{local}:q:<epoch>` for the in-process
//!   stream), expiring after [`DEDUP_KEEP_SECS`]; `<prefix>g{p3}:o`: the last offset of
//!   unstamped events;
//! - `<prefix>g{p3}:m<minute>`: everyone's `a`, `b` in that minute (expiring);
//! - `<prefix>g{p3}:t<minute>` / `:d<day>`: sorted sets of blocked counts per user, trimmed
//!   to the [`TOP_KEEP`] highest (expiring).
//!
//! and `<prefix>gparts`, the set of partition tags, so readers know which keys to sum.
//!
//! The epochs' records are bounded: an epoch's name tells when it began, a publisher starts
//! a new one at least daily, and a user's `q:` fields of epochs begun more than
//! [`DEDUP_KEEP_SECS`] ago are deleted when a new epoch first writes to the user (so a
//! user holds about three per publisher), with the per-process `o:<epoch>` fields of
//! earlier builds. A replay is recognised for a day past its epoch's end; a later one
//! counts again.
//!
//! A Lua script checks the offsets and applies the counts atomically with them: one call
//! for up to [`USERS_PER_CALL`] users on a single Redis (one per user on a Cluster, where a
//! script's keys share a slot), each user checked against its own offset, and one call per
//! partition for the global aggregates; all of a batch goes in one pipeline. A user costs
//! Redis one read and one write of its counters and an increment of its minute key; the
//! top-blocked sets are merged (ZMSCORE, then one ZADD of the sums) rather than bumped by a
//! ZINCRBY per user, with the same result.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use domain::analytics::UserAnalytics;
use domain::analytics::{
    AnalyticsReader, BlockedUser, CounterError, CounterStore, MAX_COUNTED_RULES, MinuteCounts,
    PartitionBatch, RuleCounts, TOP_KEEP, TOP_WINDOW_MINUTES,
};
use domain::event::Stamp;
use domain::keys;
use kit::redis::{Connection, Endpoint, Scripts};

use crate::tally::{
    GlobalTally, Minutes, Tally, fill_series, global_tally, sorted_rules, tally, top_n,
};

/// Per user, for many users in one call: checks each user's offset and applies its tally
/// atomically with it. Returns `{i, applied}` pairs (flattened, `i` from 0) for the users
/// whose counters already held part of their events (the caller re-tallies those past
/// `applied`); everyone else is applied or was already counted.
///
/// ARGV: the offset field (`''`: no check), the all-time TTL, how often (seconds) it is
/// refreshed, the retention, the number of users, their numbers packed (cheaper in Lua
/// than an argument each, parsed): per user `<i8i8I4I4I4` first offset, last offset,
/// allowed, blocked, number of minutes, then per minute `<I4I4` allowed, blocked), and how
/// long an epoch's `q:` fields are kept. KEYS: per user its counters, then its minute keys.
const USERS_SCRIPT: &str = r#"
local field, ttl, every, retention = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local packed = ARGV[6]
local keep = tonumber(ARGV[7])
local checked = field ~= ''
local epoch_field = string.sub(field, 1, 2) == 'q:'
local read = checked and field or 'e'
local clock = redis.call('TIME')[1]
local now = tonumber(clock)
-- Numbers go to Redis as text made by `%d`: cheaper than Redis's own `%.17g` of a number.
local format = string.format
-- A user's first write from an epoch deletes the fields of epochs begun more than `keep`
-- seconds ago (their names start with the start time in hex) and the per-process offset
-- fields of earlier builds (`o:` and a non-number), so they do not grow with restarts.
local function prune(key)
  for _, f in ipairs(redis.call('HKEYS', key)) do
    local start = string.match(f, '^q:(%x+)%-')
    if (start and now - tonumber(start, 16) > keep) or string.match(f, '^o:.*%D') then
      redis.call('HDEL', key, f)
    end
  end
end
local partial = {}
local k, p = 1, 1
for i = 1, tonumber(ARGV[5]) do
  local key = KEYS[k]
  local first, last, al, bl, nm
  first, last, al, bl, nm, p = struct.unpack('<i8i8I4I4I4', packed, p)
  -- One read and one write per user: the counts are written whole, not incremented.
  local held = redis.call('HMGET', key, 'allowed', 'blocked', 'e', read)
  local applied = checked and tonumber(held[4] or '-1') or -1
  if epoch_field and not held[4] and held[3] then prune(key) end
  if checked and applied >= first then
    if applied < last then
      partial[#partial + 1] = i - 1
      partial[#partial + 1] = applied
    end
    k, p = k + 1 + nm, p + 8 * nm
  else
    local allowed = format('%d', (tonumber(held[1]) or 0) + al)
    local blocked = format('%d', (tonumber(held[2]) or 0) + bl)
    last = format('%d', last)
    -- The all-time counters live until the user has been idle for the user TTL: the
    -- expiry is pushed back at most every `every` seconds (`e`: when it last was), by
    -- the TTL plus that much, so it never comes early.
    local seen = tonumber(held[3])
    if seen == nil or now - seen >= every then
      if checked then
        redis.call('HSET', key, field, last, 'allowed', allowed, 'blocked', blocked, 'e', clock)
      else
        redis.call('HSET', key, 'allowed', allowed, 'blocked', blocked, 'e', clock)
      end
      redis.call('EXPIRE', key, ttl)
    elseif checked then
      redis.call('HSET', key, field, last, 'allowed', allowed, 'blocked', blocked)
    else
      redis.call('HSET', key, 'allowed', allowed, 'blocked', blocked)
    end
    k = k + 1
    for _ = 1, nm do
      local ma, mb
      ma, mb, p = struct.unpack('<I4I4', packed, p)
      local mkey = KEYS[k]
      k = k + 1
      -- A minute key gets its expiry when it is made: when a field is new (its value is
      -- the increment), not at every write.
      local new = false
      if ma > 0 then new = redis.call('HINCRBY', mkey, 'a', format('%d', ma)) == ma end
      if mb > 0 and redis.call('HINCRBY', mkey, 'b', format('%d', mb)) == mb then new = true end
      if new then redis.call('EXPIRE', mkey, retention) end
    end
  end
end
return partial
"#;

/// Per partition: the global minutes and the top-blocked sets. Returns `{-2}` when applied,
/// `{-1}` when everything was already counted, or `{applied}`, the offset already counted,
/// when only part of the batch is new (the caller re-tallies past it).
const GLOBAL_SCRIPT: &str = r#"
if ARGV[1] ~= '' then
  local applied = tonumber(redis.call('GET', KEYS[1]) or '-1')
  if applied >= tonumber(ARGV[3]) then return {-1} end
  if applied >= tonumber(ARGV[2]) then return {applied} end
  if ARGV[1] == 'e' then
    -- An epoch's number is kept DEDUP_KEEP_SECS, as long as the day sets (ARGV[5]).
    redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
end
local retention, day_ttl, keep = ARGV[4], ARGV[5], tonumber(ARGV[6])
local nm, nd = tonumber(ARGV[7]), tonumber(ARGV[8])
local a, k = 9, 2
-- Adds the next `n` (user, blocked) pairs of ARGV to the sorted set and keeps its `keep`
-- highest: the same set as a ZINCRBY per user and a trim, with fewer calls. Only a user the
-- set holds, or one whose increment reaches the lowest score of a full set, can be among
-- the highest after the increments (every held score only grows), so only those are
-- written, in a few ZADDs of the summed scores; the trim decides the rest as before.
local function bump(zkey, n, ttl)
  if n == 0 then return end
  local users, held = {}, {}
  for i = 1, n do users[i] = ARGV[a + 2 * (i - 1)] end
  -- The held scores, 1,000 users a call (Lua's stack bounds an unpack).
  for from = 1, n, 1000 do
    local to = math.min(n, from + 999)
    local got = redis.pcall('ZMSCORE', zkey, unpack(users, from, to))
    for i = from, to do
      if got.err then
        -- Redis before 6.2: one ZSCORE a user.
        held[i] = redis.call('ZSCORE', zkey, users[i])
      else
        held[i] = got[i - from + 1]
      end
    end
  end
  local least = -1
  if redis.call('ZCARD', zkey) >= keep then
    least = tonumber(redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')[2])
  end
  local add, m = {}, 0
  for i = 1, n do
    local d = tonumber(ARGV[a + 1])
    a = a + 2
    local s = held[i]
    if s then
      add[m + 1] = tonumber(s) + d
    elseif d >= least then
      add[m + 1] = d
    end
    if add[m + 1] then
      add[m + 2] = users[i]
      m = m + 2
    end
    if m >= 1000 then
      redis.call('ZADD', zkey, unpack(add, 1, m))
      add, m = {}, 0
    end
  end
  if m > 0 then redis.call('ZADD', zkey, unpack(add, 1, m)) end
  redis.call('ZREMRANGEBYRANK', zkey, 0, -(keep + 1))
  redis.call('EXPIRE', zkey, ttl)
end
for _ = 1, nm do
  local mkey, tkey = KEYS[k], KEYS[k + 1]
  k = k + 2
  local ma, mb, nu = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if ma ~= '0' then redis.call('HINCRBY', mkey, 'a', ma) end
  if mb ~= '0' then redis.call('HINCRBY', mkey, 'b', mb) end
  redis.call('EXPIRE', mkey, retention)
  bump(tkey, nu, retention)
end
for _ = 1, nd do
  local dkey = KEYS[k]
  k = k + 1
  local nu = tonumber(ARGV[a])
  a = a + 1
  bump(dkey, nu, day_ttl)
end
local nr, cap = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
a = a + 2
if nr > 0 then
  local rkey = KEYS[k]
  for _ = 1, nr do
    local field, n = ARGV[a], ARGV[a + 1]
    a = a + 2
    if redis.call('HEXISTS', rkey, field) == 1 or redis.call('HLEN', rkey) < cap then
      redis.call('HINCRBY', rkey, field, n)
    end
  end
  redis.call('EXPIRE', rkey, retention)
end
return {-2}
"#;

/// How long (seconds) the counters keep an epoch's records: its lifetime at the publisher
/// ([`Stamp::EPOCH_LIFETIME_SECS`]) and a day in which its replays are still recognised.
pub const DEDUP_KEEP_SECS: u64 = Stamp::EPOCH_LIFETIME_SECS + 86_400;

/// The day sets' TTL, which the global script also gives an epoch's record.
const DAY_SET_TTL_SECS: u64 = 2 * 86_400;
const _: () = assert!(DAY_SET_TTL_SECS == DEDUP_KEEP_SECS);

/// How many of each top-blocked set a read takes.
const TOP_READ: usize = 100;

/// A count within one batch as the users script reads it (`I4`): a batch's events stand
/// for one request each, or for a usage report's requests (the limiter takes at most a
/// billion per bucket and report), far fewer than 2^32 per user; past it, clamped.
fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Users per call of the users script on a single Redis: enough that a call's own cost is
/// spread thin, few enough that one call holds Redis for about a millisecond.
const USERS_PER_CALL: usize = 256;

/// The scripts of [`RedisCounters`], by position.
const USERS: usize = 0;
const GLOBAL: usize = 1;

/// The read side of the counters in Redis: all the gateway needs, and no script.
#[derive(Clone)]
pub struct RedisAnalytics {
    conn: Connection,
    key_prefix: String,
    timeout: Duration,
}

impl RedisAnalytics {
    /// Reads counters at `endpoint` (see [`RedisCounters::new`]); every call has `timeout`.
    pub fn new(
        endpoint: &Endpoint,
        key_prefix: &str,
        timeout: Duration,
    ) -> Result<Self, CounterError> {
        Ok(Self {
            conn: kit::redis::connect(endpoint, timeout)?,
            key_prefix: key_prefix.to_owned(),
            timeout,
        })
    }

    async fn deadline<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CounterError> {
        Ok(kit::redis::with_deadline(self.timeout, call).await?)
    }

    fn global_key(&self, tag: &str, suffix: &str) -> String {
        format!("{}g{{{tag}}}:{suffix}", self.key_prefix)
    }

    fn tags_key(&self) -> String {
        format!("{}gparts", self.key_prefix)
    }

    async fn tags(&self) -> Result<Vec<String>, CounterError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("SMEMBERS").arg(self.tags_key()).to_owned();
        self.deadline(cmd.query_async(&mut conn)).await
    }

    /// Sums `HMGET key a b` over `keys` per minute.
    async fn sum_minutes(&self, keys: Vec<(u64, String)>) -> Result<Minutes, CounterError> {
        let mut pipe = redis::pipe();
        for (_, key) in &keys {
            pipe.cmd("HMGET").arg(key).arg("a").arg("b");
        }
        let mut conn = self.conn.clone();
        let rows: Vec<(Option<u64>, Option<u64>)> =
            self.deadline(pipe.query_async(&mut conn)).await?;
        let mut minutes = Minutes::new();
        for ((minute, _), (a, b)) in keys.iter().zip(rows) {
            let m = minutes.entry(*minute).or_default();
            m.0 += a.unwrap_or(0);
            m.1 += b.unwrap_or(0);
        }
        Ok(minutes)
    }

    /// Merges the tops of the sorted sets at `keys` into blocked counts per user: the
    /// [`TOP_READ`] most blocked of each set, not all it keeps (a user is in one partition,
    /// so a day's top is exact; over several minutes a user just below each minute's top
    /// can be missed).
    async fn merge_sets(&self, keys: Vec<String>) -> Result<HashMap<String, u64>, CounterError> {
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("ZREVRANGE")
                .arg(key)
                .arg(0)
                .arg(TOP_READ - 1)
                .arg("WITHSCORES");
        }
        let mut conn = self.conn.clone();
        let sets: Vec<Vec<(String, f64)>> = self.deadline(pipe.query_async(&mut conn)).await?;
        let mut merged = HashMap::new();
        for (user, score) in sets.into_iter().flatten() {
            *merged.entry(user).or_default() += score as u64;
        }
        Ok(merged)
    }
}

/// Counters in Redis, written exactly once by the analytics worker (and a limiter that
/// counts in-process); reads go through its [`RedisAnalytics`].
pub struct RedisCounters {
    read: RedisAnalytics,
    scripts: Scripts,
    retention_secs: u64,
    user_ttl_secs: u64,
    /// Partition tags already registered in `<prefix>gparts` by this process.
    registered: Mutex<HashSet<String>>,
}

impl RedisCounters {
    /// Counters at `endpoint`, keeping time series for `retention` and a user's all-time
    /// counters until they have been idle for `user_ttl`; every call has `timeout`.
    /// Connects lazily and reconnects by itself.
    pub fn new(
        endpoint: &Endpoint,
        key_prefix: &str,
        timeout: Duration,
        retention: Duration,
        user_ttl: Duration,
    ) -> Result<Self, CounterError> {
        Ok(Self {
            read: RedisAnalytics::new(endpoint, key_prefix, timeout)?,
            scripts: Scripts::new(&[USERS_SCRIPT, GLOBAL_SCRIPT]),
            retention_secs: retention.as_secs().max(60),
            user_ttl_secs: user_ttl.as_secs().max(1),
            registered: Mutex::default(),
        })
    }

    /// Sends `pipe`; after a `NOSCRIPT` (Redis restarted or flushed its scripts) the
    /// scripts are loaded and it is sent again (the offsets make the repeat harmless).
    async fn query_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, CounterError> {
        Ok(self
            .scripts
            .query_idempotent(&self.read.conn, pipe, self.read.timeout)
            .await?)
    }

    fn tag(partition: Option<i32>) -> String {
        partition.map_or_else(|| "local".to_owned(), |p| format!("p{p}"))
    }

    /// Adds to `pipe` the calls of the users script that apply `tallies` (several users a
    /// call on a single Redis; one on a Cluster, where a script's keys share a slot);
    /// returns how many users each call carries.
    fn user_calls(
        &self,
        pipe: &mut redis::Pipeline,
        field: &str,
        tallies: &[(&str, Tally)],
    ) -> usize {
        let per_call = if self.read.conn.is_cluster() {
            1
        } else {
            USERS_PER_CALL
        };
        let every = self.ttl_refresh_secs();
        let mut minute_key = String::new();
        let mut packed = Vec::new();
        for chunk in tallies.chunks(per_call) {
            let keys: usize = chunk.iter().map(|(_, t)| 1 + t.minutes.len()).sum();
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.hash(USERS)).arg(keys);
            for (user, t) in chunk {
                let key = keys::counter_key(&self.read.key_prefix, user);
                cmd.arg(&key);
                for minute in t.minutes.keys() {
                    // `keys::counter_minute_key`, without escaping the id again.
                    minute_key.clear();
                    let _ = write!(minute_key, "{key}:m{minute}");
                    cmd.arg(minute_key.as_str());
                }
            }
            packed.clear();
            for (_, t) in chunk {
                packed.extend_from_slice(&t.first_offset.to_le_bytes());
                packed.extend_from_slice(&t.last_offset.to_le_bytes());
                packed.extend_from_slice(&count(t.allowed).to_le_bytes());
                packed.extend_from_slice(&count(t.blocked).to_le_bytes());
                packed.extend_from_slice(&count(t.minutes.len() as u64).to_le_bytes());
                for (a, b) in t.minutes.values() {
                    packed.extend_from_slice(&count(*a).to_le_bytes());
                    packed.extend_from_slice(&count(*b).to_le_bytes());
                }
            }
            cmd.arg(field)
                .arg(self.user_ttl_secs + every)
                .arg(every)
                .arg(self.retention_secs)
                .arg(chunk.len())
                .arg(packed.as_slice())
                .arg(DEDUP_KEEP_SECS);
            pipe.add_command(cmd);
        }
        per_call
    }

    /// How often a user's all-time expiry is pushed back: every write for a TTL under 100
    /// seconds, else at most every 1 % of it, at most every minute.
    fn ttl_refresh_secs(&self) -> u64 {
        (self.user_ttl_secs / 100).min(60)
    }

    /// Adds to `pipe` the call of the global script for one partition's tally (or the
    /// in-process stream's).
    fn global_call(
        &self,
        pipe: &mut redis::Pipeline,
        tag: &str,
        batch: &PartitionBatch,
        g: &GlobalTally<'_>,
    ) {
        // Where the last applied number is kept, and how it is checked: an epoch's for
        // DEDUP_KEEP_SECS (`e`), a partition's offset for ever (`1`), or not at all.
        let (offset_key, check) = match (batch.partition, &batch.epoch) {
            (_, Some(epoch)) => (self.read.global_key(tag, &format!("q:{epoch}")), "e"),
            (Some(_), None) => (self.read.global_key(tag, "o"), "1"),
            (None, None) => (self.read.global_key(tag, "o"), ""),
        };
        let mut invocation = self.scripts.get(GLOBAL).key(offset_key);
        invocation
            .arg(check)
            .arg(g.first_offset)
            .arg(g.last_offset)
            .arg(self.retention_secs)
            .arg(DAY_SET_TTL_SECS)
            .arg(TOP_KEEP)
            .arg(g.minutes.len())
            .arg(g.blocked_by_day.len());
        for (minute, (a, b)) in &g.minutes {
            invocation.key(self.read.global_key(tag, &format!("m{minute}")));
            invocation.key(self.read.global_key(tag, &format!("t{minute}")));
            let users = g.blocked_by_minute.get(minute);
            invocation
                .arg(*a)
                .arg(*b)
                .arg(users.map_or(0, HashMap::len));
            for (user, n) in users.into_iter().flatten() {
                invocation.arg(*user).arg(*n);
            }
        }
        for (day, users) in &g.blocked_by_day {
            invocation.key(self.read.global_key(tag, &format!("d{day}")));
            invocation.arg(users.len());
            for (user, n) in users {
                invocation.arg(*user).arg(*n);
            }
        }
        // Per rule: `a|<rule>`, `b|<rule>`, `s|<rule>` in one hash per partition.
        let fields: Vec<(String, u64)> = g
            .rules
            .iter()
            .flat_map(|(rule, counts)| {
                ["a", "b", "s"]
                    .into_iter()
                    .zip(counts)
                    .filter(|(_, n)| **n > 0)
                    .map(move |(kind, n)| (format!("{kind}|{rule}"), *n))
            })
            .collect();
        invocation.arg(fields.len()).arg(3 * MAX_COUNTED_RULES);
        if !fields.is_empty() {
            invocation.key(self.read.global_key(tag, "r"));
            for (field, n) in &fields {
                invocation.arg(field).arg(*n);
            }
        }
        pipe.invoke_script(&invocation);
    }

    async fn register(&self, tag: &str) -> Result<(), CounterError> {
        if self
            .registered
            .lock()
            .expect("registered lock")
            .contains(tag)
        {
            return Ok(());
        }
        let mut conn = self.read.conn.clone();
        let cmd = redis::cmd("SADD")
            .arg(self.read.tags_key())
            .arg(tag)
            .to_owned();
        let _: i64 = self.read.deadline(cmd.query_async(&mut conn)).await?;
        self.registered
            .lock()
            .expect("registered lock")
            .insert(tag.to_owned());
        Ok(())
    }
}

#[async_trait]
impl CounterStore for RedisCounters {
    async fn apply(&self, batch: &PartitionBatch) -> Result<(), CounterError> {
        // The user's field holding the last number counted from this stream.
        let field = match (batch.partition, &batch.epoch) {
            (_, Some(epoch)) => format!("q:{epoch}"),
            (Some(p), None) => format!("o:{p}"),
            (None, None) => String::new(),
        };
        let tag = Self::tag(batch.partition);
        let forward = batch.forward();
        let mut users: Vec<(&str, Tally)> = tally(forward.iter(), |_| None);
        let mut global = Some(global_tally(&forward, None)).filter(|g| !g.minutes.is_empty());
        if global.is_some() {
            self.register(&tag).await?;
        }
        // Each round applies the users and the partition's aggregates in one pipeline, and
        // settles all but those whose offsets already held part of the batch; those are
        // re-tallied past what they hold. One round is the rule.
        for _ in 0..8 {
            if users.is_empty() && global.is_none() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            let per_call = self.user_calls(&mut pipe, &field, &users);
            if let Some(g) = &global {
                self.global_call(&mut pipe, &tag, batch, g);
            }
            let answers: Vec<Vec<i64>> = self.query_scripts(&pipe).await?;
            let calls = users.len().div_ceil(per_call);
            let floors: HashMap<&str, i64> = answers[..calls]
                .iter()
                .enumerate()
                .flat_map(|(call, partial)| {
                    partial
                        .chunks_exact(2)
                        .map(move |p| (call * per_call + p[0] as usize, p[1]))
                })
                .filter_map(|(i, applied)| Some((users.get(i)?.0, applied)))
                .collect();
            users = if floors.is_empty() {
                Vec::new()
            } else {
                let events = forward
                    .iter()
                    .filter(|(_, e)| floors.contains_key(e.user_id.as_str()));
                tally(events, |user| floors.get(user).copied())
            };
            global = match answers.get(calls).and_then(|a| a.first()) {
                Some(&applied) if global.is_some() && applied >= 0 => {
                    Some(global_tally(&forward, Some(applied))).filter(|g| !g.minutes.is_empty())
                }
                _ => None,
            };
        }
        Err(CounterError::Protocol(
            if users.is_empty() {
                "partition offset kept moving under a batch"
            } else {
                "user offsets kept moving under a batch"
            }
            .into(),
        ))
    }
}

#[async_trait]
impl AnalyticsReader for RedisAnalytics {
    /// Summed over the partitions' `r` hashes.
    async fn rule_counts(&self) -> Result<Vec<RuleCounts>, CounterError> {
        let tags = self.tags().await?;
        let mut pipe = redis::pipe();
        for tag in &tags {
            pipe.cmd("HGETALL").arg(self.global_key(tag, "r"));
        }
        let mut conn = self.conn.clone();
        let hashes: Vec<HashMap<String, u64>> = self.deadline(pipe.query_async(&mut conn)).await?;
        let mut counts: HashMap<String, [u64; 3]> = HashMap::new();
        for (field, n) in hashes.into_iter().flatten() {
            let Some((kind, rule)) = field.split_once('|') else {
                continue;
            };
            let slot = match kind {
                "a" => 0,
                "b" => 1,
                "s" => 2,
                _ => continue,
            };
            counts.entry(rule.to_owned()).or_default()[slot] += n;
        }
        Ok(sorted_rules(counts))
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

    async fn user_series(
        &self,
        user_id: &str,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError> {
        let keys = minutes
            .clone()
            .map(|m| (m, keys::counter_minute_key(&self.key_prefix, user_id, m)))
            .collect();
        let counts = self.sum_minutes(keys).await?;
        Ok(fill_series(minutes, &counts))
    }

    async fn global_series(
        &self,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError> {
        let tags = self.tags().await?;
        let keys = tags
            .iter()
            .flat_map(|tag| {
                minutes
                    .clone()
                    .map(move |m| (m, self.global_key(tag, &format!("m{m}"))))
            })
            .collect();
        let counts = self.sum_minutes(keys).await?;
        Ok(fill_series(minutes, &counts))
    }

    async fn top_blocked(
        &self,
        minutes: RangeInclusive<u64>,
        n: usize,
    ) -> Result<Vec<BlockedUser>, CounterError> {
        let newest = *minutes.end();
        let oldest = (*minutes.start()).max(newest.saturating_sub(TOP_WINDOW_MINUTES - 1));
        let tags = self.tags().await?;
        let keys = tags
            .iter()
            .flat_map(|tag| (oldest..=newest).map(move |m| self.global_key(tag, &format!("t{m}"))))
            .collect();
        Ok(top_n(self.merge_sets(keys).await?, n))
    }

    async fn top_blocked_day(&self, day: u64, n: usize) -> Result<Vec<BlockedUser>, CounterError> {
        let tags = self.tags().await?;
        let keys = tags
            .iter()
            .map(|tag| self.global_key(tag, &format!("d{day}")))
            .collect();
        Ok(top_n(self.merge_sets(keys).await?, n))
    }

    async fn ping(&self) -> Result<(), CounterError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .deadline(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }
}

/// The writer reads through its reader.
#[async_trait]
impl AnalyticsReader for RedisCounters {
    async fn rule_counts(&self) -> Result<Vec<RuleCounts>, CounterError> {
        self.read.rule_counts().await
    }

    async fn get(&self, user_id: &str) -> Result<UserAnalytics, CounterError> {
        self.read.get(user_id).await
    }

    async fn user_series(
        &self,
        user_id: &str,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError> {
        self.read.user_series(user_id, minutes).await
    }

    async fn global_series(
        &self,
        minutes: RangeInclusive<u64>,
    ) -> Result<Vec<MinuteCounts>, CounterError> {
        self.read.global_series(minutes).await
    }

    async fn top_blocked(
        &self,
        minutes: RangeInclusive<u64>,
        n: usize,
    ) -> Result<Vec<BlockedUser>, CounterError> {
        self.read.top_blocked(minutes, n).await
    }

    async fn top_blocked_day(&self, day: u64, n: usize) -> Result<Vec<BlockedUser>, CounterError> {
        self.read.top_blocked_day(day, n).await
    }

    async fn ping(&self) -> Result<(), CounterError> {
        self.read.ping().await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn minute_keys_follow_the_user_hash_tag() {
        let key = domain::keys::counter_minute_key("rl:", "a}b", 7);
        assert_eq!(key, "rl:c{a%7Db}:m7");
        assert_eq!(domain::analytics::MINUTE_MS, 60_000);
    }
}
