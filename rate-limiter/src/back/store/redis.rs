//! The shared bucket store: one atomic round trip to Redis per decision.
//!
//! The decision runs inside Redis as a Lua script (loaded once, called with EVALSHA and
//! reloaded on NOSCRIPT through `kit::redis::Scripts`), using Redis's own `TIME` so that every limiter
//! host agrees on the clock. The arithmetic mirrors [`domain::bucket::decide`]
//! operation for operation, except that a refused request writes nothing (a write is a
//! Redis call, replicated; the refill it would record is recomputed from the stored state
//! next time). A bucket is 16 bytes, the tokens and the µs of the last update as two
//! little-endian doubles (`struct.pack`, cheaper in Lua than formatting and parsing text;
//! the earlier text form is still read), that expires when it would be full again, and its
//! key carries the user id as a hash tag ([`domain::keys`]) so the script is legal
//! on Redis Cluster. Every request shares one multiplexed connection (pipelined), never a
//! connection per request.

use std::time::Duration;

use async_trait::async_trait;
use domain::event::EventTemplate;
use domain::limits::{LimitOutcome, LimitSpec, Outcome, Window};
use domain::store::{CallNames, Decided, Recording, RequestTake, Ticket};
use domain::{Policy, Quota};
use kit::redis::{Connection, Endpoint, Scripts, connect, describe, is_noscript, with_deadline};

use super::memo::{SETTLE, memoized};
use super::outbox::{OutboxKeys, outboxed};
use super::{BucketStore, StoreError};

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
local full = wait(capacity)
-- Kept as it is: it must not expire before it would be full at the rate in force now (a
-- slower refill since it was written would make it come back full early).
if raw then redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(full / 1000)), 'GT') end
return {0, math.floor(tokens), retry, full}
"#;

/// Several limits of one request, all or nothing: every limit is evaluated first, and
/// only when every enforced one admits the cost is it spent (on every limit that admits
/// it). It mirrors [`domain::limits::decide_all`] operation for operation.
///
/// ARGV: the cost (negative: a refund; 0: a peek), then four per key: the algorithm
/// (1 token bucket, 2 fixed window, 3 sliding window), shadow (0/1), and two numbers
/// (capacity and refill per second; or requests and window in µs). Returns the allowed
/// flag, then four per key: admits, remaining, retry (µs, -1 never), reset (µs).
const MULTI_SCRIPT: &str = r#"
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function until_full(tokens, want, cap, rate)
  if tokens >= want then return 0 end
  local us = math.ceil((want - tokens) * 1000000 / rate)
  local step = 1
  while math.min(cap, tokens + us * rate / 1000000) < want do
    us = us + step
    step = step * 2
  end
  return us
end
local n = #KEYS
local ev = {}
for i = 1, n do
  local algo = tonumber(ARGV[2 + (i - 1) * 4])
  local shadow = tonumber(ARGV[3 + (i - 1) * 4])
  local a = tonumber(ARGV[4 + (i - 1) * 4])
  local b = tonumber(ARGV[5 + (i - 1) * 4])
  local raw = redis.call('GET', KEYS[i])
  local e = {shadow = shadow}
  if algo == 1 then
    local cap, rate = a, b
    local stored, updated = cap, now
    if raw then
      if #raw == 16 then
        stored, updated = struct.unpack('<d<d', raw)
      else
        local sep = string.find(raw, ' ', 1, true)
        stored = tonumber(string.sub(raw, 1, sep - 1))
        updated = tonumber(string.sub(raw, sep + 1))
      end
    end
    local at = now
    if at < updated then at = updated end
    local tokens = math.min(cap, stored + (at - updated) * rate / 1000000)
    local after
    if cost < 0 then
      after = math.min(cap, tokens - cost)
      e.admits = 1
      e.retry = 0
    else
      after = tokens - cost
      if tokens >= cost then e.admits = 1 else e.admits = 0 end
      if e.admits == 1 then e.retry = 0
      elseif cost > cap then e.retry = -1
      else e.retry = until_full(tokens, cost, cap, rate) end
    end
    e.kept = {math.floor(math.max(tokens, 0)), until_full(tokens, cap, cap, rate)}
    if raw then e.keep_px = math.max(1, math.ceil(e.kept[2] / 1000)) end
    local reset = until_full(after, cap, cap, rate)
    e.spent = {math.floor(math.max(after, 0)), reset}
    e.value = struct.pack('<d<d', after, at)
    e.px = math.max(1, math.ceil(reset / 1000))
  elseif algo == 2 then
    local limit, w = a, b
    -- A clock that stepped back never reopens a window (as decide_all).
    local now = now
    local ws, c
    if raw and #raw == 16 then
      ws, c = struct.unpack('<d<d', raw)
      if ws > now then now = ws end
    end
    local start = now - now % w
    local count = 0
    if ws == start then count = c end
    local nxt
    if cost < 0 then nxt = math.max(0, count + cost) else nxt = count + cost end
    if cost <= 0 or nxt <= limit then e.admits = 1 else e.admits = 0 end
    local end_in = start + w - now
    if e.admits == 1 then e.retry = 0 elseif cost > limit then e.retry = -1 else e.retry = end_in end
    local function quota(c)
      local reset = end_in
      if c == 0 then reset = 0 end
      return {math.max(0, limit - c), reset}
    end
    e.kept = quota(count)
    e.spent = quota(nxt)
    e.value = struct.pack('<d<d', start, nxt)
    e.px = math.max(1, math.ceil(end_in / 1000))
  else
    local limit, w = a, b
    local now = now
    local ws, c, p
    if raw and #raw == 24 then
      ws, c, p = struct.unpack('<d<d<d', raw)
      if ws > now then now = ws end
    end
    local start = now - now % w
    local cur, prev = 0, 0
    if ws then
      if ws == start then cur, prev = c, p elseif ws + w == start then prev = c end
    end
    local elapsed = now - start
    local function est(c) return prev * (w - elapsed) / w + c end
    local nxt
    if cost < 0 then nxt = math.max(0, cur + cost) else nxt = cur + cost end
    if cost <= 0 or est(cur) + cost <= limit then e.admits = 1 else e.admits = 0 end
    local function quota(c)
      local reset = 0
      if c > 0 then reset = start + 2 * w - now elseif prev > 0 then reset = start + w - now end
      return {math.floor(math.max(0, limit - est(c))), reset}
    end
    if e.admits == 1 then e.retry = 0
    elseif cost > limit then e.retry = -1
    else
      local function admits_at(at)
        local s2 = at - at % w
        local c2, p2 = 0, 0
        if s2 == start then c2, p2 = cur, prev elseif start + w == s2 then p2 = cur end
        return p2 * (w - (at - s2)) / w + c2 + cost <= limit
      end
      local cand
      if cur + cost <= limit and prev > 0 then
        local room = limit - cur - cost
        cand = start + math.min(math.max(0, math.ceil(w - room * w / prev)), w)
      else
        local nx = start + w
        if cur == 0 then cand = nx else
          local room = limit - cost
          cand = nx + math.min(math.max(0, math.ceil(w - room * w / cur)), w)
        end
      end
      local at = math.max(cand, now)
      local step = 1
      while (not admits_at(at)) and at < now + 3 * w do
        at = at + step
        step = step * 2
      end
      for _ = 1, 4 do
        if at > now and admits_at(at - 1) then at = at - 1 else break end
      end
      e.retry = at - now
    end
    e.kept = quota(cur)
    e.spent = quota(nxt)
    e.value = struct.pack('<d<d<d', start, nxt, prev)
    e.px = math.max(1, math.ceil((start + 2 * w - now) / 1000))
  end
  ev[i] = e
end
local allowed = 1
if cost > 0 then
  for i = 1, n do
    if ev[i].shadow == 0 and ev[i].admits == 0 then allowed = 0 end
  end
end
local out = {allowed}
for i = 1, n do
  local e = ev[i]
  local q = e.kept
  if allowed == 1 and e.admits == 1 and cost ~= 0 then
    redis.call('SET', KEYS[i], e.value, 'PX', e.px)
    q = e.spent
  elseif e.keep_px and cost > 0 then
    -- Not written (refused): a bucket kept as it is must not expire before it would be
    -- full at the rate in force now (a slower refill since it was written would make it
    -- come back full early).
    redis.call('PEXPIRE', KEYS[i], e.keep_px, 'GT')
  end
  table.insert(out, e.admits)
  table.insert(out, q[1])
  table.insert(out, e.retry)
  table.insert(out, q[2])
end
return out
"#;

/// The names of one batch's calls in the memo (`super::memo`).
struct Memo<'a> {
    /// The batch: `g:<the sender's id>`, or one of this store's own ids.
    batch: String,
    /// The hash the batch's answers share on one Redis: `<prefix>m:<batch>`.
    key: String,
    /// Whether the sender named the batch.
    named: bool,
    /// Whether the sender sends it again (and so each call is asked after first).
    again: bool,
    /// With a sender's name: each request's place in the sender's batch.
    places: &'a [usize],
}

impl<'a> Memo<'a> {
    fn new(prefix: &str, ids: &kit::ids::IdSource, names: CallNames<'a>) -> Self {
        let (batch, named) = match names.batch {
            Some(id) => (format!("g:{id}"), true),
            None => (ids.next_id(), false),
        };
        Self {
            key: format!("{prefix}m:{batch}"),
            batch,
            named,
            again: named && names.again,
            places: if named { names.places } else { &[] },
        }
    }

    /// Request `i`'s field: its position; in a named batch, its place in the sender's
    /// batch and a hash of what it asks (its keys and cost), so that a remembered answer
    /// is only ever given to the same question.
    fn field(&self, requests: &[RequestTake], i: usize) -> String {
        if !self.named {
            return i.to_string();
        }
        let request = &requests[i];
        let mut hash = domain::keys::stable_hash(itoa::Buffer::new().format(request.cost));
        for limit in &request.limits {
            hash = hash.rotate_left(5) ^ domain::keys::stable_hash(&limit.key);
        }
        format!("{}.{hash:x}", self.places.get(i).copied().unwrap_or(i))
    }
}

/// How long a settled call's tombstone is kept (`super::memo::SETTLE`): far longer than a
/// call can wait in a stalled Redis's socket behind the settle that overtook it on another
/// connection.
const TOMBSTONE_LIFE: Duration = Duration::from_secs(60);

/// Token buckets in Redis, shared by every limiter instance that points at it.
pub struct RedisStore {
    policy: Policy,
    conn: Connection,
    scripts: Scripts,
    key_prefix: String,
    timeout: Duration,
    ids: kit::ids::IdSource,
    /// Whether a batch that timed out is sent once more, answered from its first run.
    idempotent_retry: bool,
    /// Where decisions' events are appended, when they are (`super::outbox`).
    outbox: Option<OutboxKeys>,
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
            scripts: Scripts::new(&[&memoized(TAKE_SCRIPT), &memoized(MULTI_SCRIPT), SETTLE]),
            key_prefix: key_prefix.to_owned(),
            timeout,
            ids: kit::ids::IdSource::new(),
            idempotent_retry: true,
            outbox: None,
        })
    }

    /// Appends each decision's event to the outbox (`super::outbox`) in the script that
    /// decides, for the calls of [`BucketStore::decide_recorded`] that carry a template.
    /// Not on a Cluster (a script's keys share a slot, and the outbox's streams are not
    /// laid out per slot): there it is refused.
    pub fn with_outbox(mut self, outbox: OutboxKeys) -> Result<Self, StoreError> {
        if self.conn.is_cluster() {
            return Err(StoreError::Unavailable(
                "the events outbox is not available on Redis Cluster".into(),
            ));
        }
        self.scripts = Scripts::new(&[
            &memoized(&outboxed(TAKE_SCRIPT)),
            &memoized(&outboxed(MULTI_SCRIPT)),
            SETTLE,
        ]);
        self.outbox = Some(outbox);
        Ok(self)
    }

    /// Where the outbox lives, when decisions are appended to it.
    pub fn outbox(&self) -> Option<&OutboxKeys> {
        self.outbox.as_ref()
    }

    /// The connection, shared with the outbox's relay.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Whether a batch that timed out is sent once more under the same request ids, the
    /// calls Redis did run answered from that run (`REDIS_IDEMPOTENT_RETRY`, on by
    /// default); off, the scripts remember nothing and a timed-out batch fails at once.
    pub fn with_idempotent_retry(mut self, on: bool) -> Self {
        self.idempotent_retry = on;
        self
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

    fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Every request in one pipeline of `EVALSHA`s: one write and one round trip for the
    /// batch. Redis runs them one after the other, each atomic, in order. Requests that find
    /// the script missing (`NOSCRIPT`: Redis restarted or flushed) did not run; they are
    /// sent again once the scripts are loaded.
    ///
    /// On a Cluster, a request whose limits live in more than one slot (several descriptors)
    /// cannot be one script: see `RedisStore::decide_across_slots`.
    async fn decide_many(&self, requests: &[RequestTake]) -> Result<Vec<Decided>, StoreError> {
        Ok(self
            .decide_recorded(requests, &[], CallNames::default())
            .await?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// [`BucketStore::decide_many`], each event of `events` appended to the outbox by the
    /// script that decides (when this store has one: [`RedisStore::with_outbox`]).
    async fn decide_recorded(
        &self,
        requests: &[RequestTake],
        events: &[Option<EventTemplate>],
        names: CallNames<'_>,
    ) -> Result<Vec<(Decided, Recording)>, StoreError> {
        let mut recorded = vec![Recording::No; requests.len()];
        let mut decided: Vec<Option<Decided>> = requests.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            if request.limits.is_empty() {
                decided[i] = Some(Ok(Outcome {
                    allowed: true,
                    limits: Vec::new(),
                }));
            } else if self.conn.is_cluster() && !one_slot(request) {
                decided[i] = Some(self.decide_across_slots(request).await);
            } else {
                pending.push(i);
            }
        }
        // A batch that timed out may have run: it is sent once more under the same ids,
        // and the calls that did run are answered from that run (`super::memo`).
        let memo = Memo::new(&self.key_prefix, &self.ids, names);
        for round in 0..2 {
            if pending.is_empty() {
                break;
            }
            let answers = match self.run(requests, events, &pending, &memo, false).await {
                Err(StoreError::Timeout) if self.idempotent_retry => {
                    self.run(requests, events, &pending, &memo, true).await
                }
                answers => answers,
            };
            let answers = match answers {
                Ok(answers) => answers,
                // Redis may have run the calls that carried an event, or may yet: their
                // events are in doubt until settled (`super::memo`).
                Err(StoreError::Timeout) if self.outbox.is_some() => {
                    let batch: std::sync::Arc<str> = memo.key.as_str().into();
                    for &i in &pending {
                        decided[i] = Some(Err(StoreError::Timeout));
                        if events.get(i).is_some_and(Option::is_some) {
                            recorded[i] = Recording::InDoubt(Ticket {
                                batch: batch.clone(),
                                field: memo.field(requests, i),
                            });
                        }
                    }
                    break;
                }
                Err(err) => return Err(err),
            };
            let mut missing_script = Vec::new();
            for (&i, answer) in pending.iter().zip(answers) {
                match answer {
                    Ok(mut answer) => {
                        // With an outbox every call answers one more number: whether it
                        // appended (1) or dropped (2) the event.
                        if self.outbox.is_some() && answer.pop().is_some_and(|flag| flag > 0) {
                            recorded[i] = Recording::Yes;
                        }
                        decided[i] = Some(outcome(&requests[i], &answer));
                    }
                    Err(err) if round == 0 && is_noscript(&err) => missing_script.push(i),
                    Err(err) => decided[i] = Some(Err(StoreError::Unavailable(describe(&err)))),
                }
            }
            if missing_script.is_empty() {
                break;
            }
            self.preload().await?;
            pending = missing_script;
        }
        Ok(decided
            .into_iter()
            .map(|d| d.unwrap_or_else(|| Err(StoreError::Protocol("no answer".into()))))
            .zip(recorded)
            .collect())
    }

    /// Asks each batch's hash whether its calls ran, leaving a tombstone for those that
    /// did not (`super::memo::SETTLE`): one script call per batch, in one pipeline.
    async fn settle(&self, tickets: &[Ticket]) -> Result<Vec<Option<bool>>, StoreError> {
        let mut batches: Vec<(&str, Vec<usize>)> = Vec::new();
        for (n, ticket) in tickets.iter().enumerate() {
            match batches.iter_mut().find(|(b, _)| *b == &*ticket.batch) {
                Some((_, calls)) => calls.push(n),
                None => batches.push((&ticket.batch, vec![n])),
            }
        }
        let mut pipe = redis::pipe();
        for (batch, calls) in &batches {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.scripts.hash(2))
                .arg(1)
                .arg(*batch)
                .arg(TOMBSTONE_LIFE.as_millis() as u64);
            for &n in calls {
                cmd.arg(&tickets[n].field);
            }
        }
        let answers: Vec<Vec<i64>> = self
            .scripts
            .query_idempotent(&self.conn, &pipe, self.timeout * 4)
            .await?;
        let mut ran = vec![None; tickets.len()];
        for ((_, calls), answer) in batches.iter().zip(answers) {
            for (&n, flag) in calls.iter().zip(answer) {
                ran[n] = (flag > 0).then_some(flag == 2);
            }
        }
        Ok(ran)
    }

    /// One `DEL` per key, all at once (the keys of one request may live in several Cluster
    /// slots).
    async fn reset(&self, keys: &[String]) -> Result<(), StoreError> {
        let deletes = keys.iter().map(|key| {
            let mut conn = self.conn.clone();
            async move {
                let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
                Ok::<(), redis::RedisError>(())
            }
        });
        with_deadline(self.timeout * 2, futures::future::try_join_all(deletes)).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String =
            with_deadline(self.timeout, redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }
}

/// The hash tag of a key (what Redis Cluster hashes): the text between the first `{` and
/// the next `}`; every key of ours has one.
fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            key[open + 1..]
                .find('}')
                .map(|len| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key)
}

/// Whether every limit of `request` lives in one Cluster slot (shares one hash tag).
fn one_slot(request: &RequestTake) -> bool {
    let first = hash_tag(&request.limits[0].key);
    request.limits.iter().all(|l| hash_tag(&l.key) == first)
}

/// Whether a request can go to the single-bucket script (the common case, and the
/// cheaper script): one enforced token bucket, a positive cost.
fn is_single_bucket(request: &RequestTake) -> bool {
    matches!(request.limits.as_slice(), [only] if !only.applied.shadow
        && matches!(only.applied.spec, LimitSpec::TokenBucket(_)))
        && request.cost > 0
}

/// The decision a script's answer carries.
fn outcome(request: &RequestTake, answer: &[i64]) -> Decided {
    let micros = |us: i64| match us {
        -1 => Ok(Duration::MAX),
        us if us >= 0 => Ok(Duration::from_micros(us as u64)),
        other => Err(StoreError::Protocol(format!(
            "script returned a wait of {other}"
        ))),
    };
    if is_single_bucket(request) {
        let &[allowed, remaining, retry_us, reset_us] = answer else {
            return Err(StoreError::Protocol(format!("script returned {answer:?}")));
        };
        let limit = request.limits[0].applied.spec.limit();
        return Ok(Outcome {
            allowed: allowed == 1,
            limits: vec![LimitOutcome {
                admits: allowed == 1,
                quota: Quota {
                    limit,
                    remaining: remaining.max(0) as u64,
                    reset_after: micros(reset_us.max(0))?,
                },
                retry_after: if allowed == 1 {
                    Duration::ZERO
                } else {
                    micros(retry_us)?
                },
            }],
        });
    }
    if answer.len() != 1 + 4 * request.limits.len() {
        return Err(StoreError::Protocol(format!("script returned {answer:?}")));
    }
    let limits = request
        .limits
        .iter()
        .zip(answer[1..].chunks_exact(4))
        .map(|(l, a)| {
            Ok(LimitOutcome {
                admits: a[0] == 1,
                quota: Quota {
                    limit: l.applied.spec.limit(),
                    remaining: a[1].max(0) as u64,
                    reset_after: micros(a[3].max(0))?,
                },
                retry_after: micros(a[2])?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Outcome {
        allowed: answer[0] == 1,
        limits,
    })
}

impl RedisStore {
    /// Adds one request's script call to `pipe`, its answer remembered under `memo`
    /// (`super::memo`: the hash, the field, and whether the call looks its field up first).
    fn invoke(
        &self,
        pipe: &mut redis::Pipeline,
        request: &RequestTake,
        event: Option<&EventTemplate>,
        memo: (&str, &str, bool),
    ) {
        // The outbox's arguments go between the script's own and the memo's.
        let outbox = self.outbox.as_ref().map(|o| o.args(event));
        // Long enough for the repeat of a batch that timed out (twice its deadline, at
        // most 5 timeouts each), short enough that the answers take little memory.
        let remember_ms = (self.timeout * 10).max(Duration::from_secs(1)).as_millis() as u64;
        let (memo_key, field, look_up) = memo;
        // An outbox call looks its field up too, for a tombstone.
        let repeat = if look_up || event.is_some() { "1" } else { "" };
        if is_single_bucket(request) {
            let LimitSpec::TokenBucket(policy) = request.limits[0].applied.spec else {
                unreachable!("checked by is_single_bucket");
            };
            pipe.cmd("EVALSHA")
                .arg(self.scripts.hash(0))
                .arg(1)
                .arg(&request.limits[0].key)
                .arg(policy.capacity())
                .arg(policy.refill_per_sec())
                .arg(request.cost)
                .arg(outbox.as_ref().map(|a| &a[..]).unwrap_or_default())
                .arg(memo_key)
                .arg(field)
                .arg(remember_ms)
                .arg(repeat);
            return;
        }
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(self.scripts.hash(1))
            .arg(request.limits.len());
        for limit in &request.limits {
            cmd.arg(&limit.key);
        }
        cmd.arg(request.cost);
        for limit in &request.limits {
            let shadow = u8::from(limit.applied.shadow);
            match limit.applied.spec {
                LimitSpec::TokenBucket(p) => cmd
                    .arg(1)
                    .arg(shadow)
                    .arg(p.capacity())
                    .arg(p.refill_per_sec()),
                LimitSpec::FixedWindow(Window {
                    requests,
                    window_us,
                }) => cmd.arg(2).arg(shadow).arg(requests).arg(window_us),
                LimitSpec::SlidingWindow(Window {
                    requests,
                    window_us,
                }) => cmd.arg(3).arg(shadow).arg(requests).arg(window_us),
            };
        }
        cmd.arg(outbox.as_ref().map(|a| &a[..]).unwrap_or_default())
            .arg(memo_key)
            .arg(field)
            .arg(remember_ms)
            .arg(repeat);
    }

    /// A request whose limits span Cluster slots: one script per slot, one after the
    /// other, each all or nothing; when a later slot refuses, what the earlier ones spent is
    /// refunded. So across slots the request is all or nothing in its result, but for the
    /// few milliseconds between the calls the spend is visible to other requests (which may
    /// then be refused where a single script would have admitted them). Never lets more
    /// through than the limits allow.
    async fn decide_across_slots(&self, request: &RequestTake) -> Decided {
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, limit) in request.limits.iter().enumerate() {
            let tag = hash_tag(&limit.key);
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, members)) => members.push(i),
                None => groups.push((tag, vec![i])),
            }
        }
        let mut limits: Vec<Option<LimitOutcome>> = vec![None; request.limits.len()];
        let mut spent: Vec<RequestTake> = Vec::new();
        let mut allowed = true;
        for (_, members) in &groups {
            let part = RequestTake {
                limits: members.iter().map(|&i| request.limits[i].clone()).collect(),
                cost: request.cost,
            };
            let decided = self.decide_many(std::slice::from_ref(&part)).await;
            let decided = match decided.map(|mut d| d.pop()) {
                Ok(Some(Ok(outcome))) => outcome,
                Ok(Some(Err(err))) | Err(err) => {
                    self.refund(spent).await;
                    return Err(err);
                }
                Ok(None) => {
                    self.refund(spent).await;
                    return Err(StoreError::Protocol("no answer".into()));
                }
            };
            for (&i, outcome) in members.iter().zip(decided.limits) {
                limits[i] = Some(outcome);
            }
            if !decided.allowed {
                allowed = false;
                break;
            }
            if request.cost > 0 {
                spent.push(part);
            }
        }
        if !allowed {
            // What the refund gives back is what these limits are left with.
            for part in &spent {
                for limit in &part.limits {
                    if let Some(Some(outcome)) = request
                        .limits
                        .iter()
                        .position(|l| l.key == limit.key)
                        .map(|i| limits[i].as_mut())
                    {
                        outcome.quota.remaining = (outcome.quota.remaining
                            + request.cost.unsigned_abs())
                        .min(outcome.quota.limit);
                    }
                }
            }
            self.refund(spent).await;
        }
        // A limit of a slot never asked (after a refusal) is reported as admitting.
        let limits = limits
            .into_iter()
            .zip(&request.limits)
            .map(|(l, take)| {
                l.unwrap_or(LimitOutcome {
                    admits: true,
                    quota: Quota {
                        limit: take.applied.spec.limit(),
                        remaining: take.applied.spec.limit(),
                        reset_after: Duration::ZERO,
                    },
                    retry_after: Duration::ZERO,
                })
            })
            .collect();
        Ok(Outcome { allowed, limits })
    }

    /// Gives back what `spent` took (best effort: a failure is logged).
    async fn refund(&self, spent: Vec<RequestTake>) {
        for mut part in spent {
            part.cost = -part.cost;
            if let Err(err) = self.decide_many(std::slice::from_ref(&part)).await {
                tracing::warn!(error = %err, "could not refund a request refused in another slot");
            }
        }
    }

    /// Sends the requests at `indices` and returns their answers, in the order of `indices`.
    /// On one Redis: one pipeline. On a Cluster, where a pipeline must stay in one slot:
    /// one pipeline per hash tag (so one key's requests still run in order), all at once.
    async fn run(
        &self,
        requests: &[RequestTake],
        events: &[Option<EventTemplate>],
        indices: &[usize],
        memo: &Memo<'_>,
        repeat: bool,
    ) -> Result<Vec<redis::RedisResult<Vec<i64>>>, StoreError> {
        let batch = &memo.batch;
        let groups: Vec<Vec<usize>> = if self.conn.is_cluster() {
            let mut by_tag: Vec<Vec<usize>> = Vec::new();
            let mut position: std::collections::HashMap<&str, usize> = Default::default();
            for &i in indices {
                let tag = hash_tag(&requests[i].limits[0].key);
                let at = *position.entry(tag).or_insert_with(|| {
                    by_tag.push(Vec::new());
                    by_tag.len() - 1
                });
                by_tag[at].push(i);
            }
            by_tag
        } else {
            vec![indices.to_vec()]
        };
        let pipelines = groups.iter().map(|group| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            // On one Redis the batch's answers share a hash; on a Cluster each call keeps
            // its own beside its first key (same slot).
            for &i in group {
                let own;
                let memo_key: &str =
                    if !self.idempotent_retry && self.outbox.is_none() && !memo.named {
                        ""
                    } else if self.conn.is_cluster() {
                        own = format!("{}:m:{batch}", requests[i].limits[0].key);
                        &own
                    } else {
                        &memo.key
                    };
                let event = events.get(i).and_then(Option::as_ref);
                // A repeat looks its answer up; so does a call its sender sends again,
                // which another limiter may have decided.
                self.invoke(
                    &mut pipe,
                    &requests[i],
                    event,
                    (memo_key, &memo.field(requests, i), repeat || memo.again),
                );
            }
            let mut conn = self.conn.clone();
            async move {
                let answers: Vec<redis::RedisResult<Vec<i64>>> =
                    pipe.query_async(&mut conn).await?;
                if answers.len() != group.len() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "wrong number of answers",
                        format!("{} answers to {} requests", answers.len(), group.len()),
                    )));
                }
                Ok(group.iter().copied().zip(answers).collect::<Vec<_>>())
            }
        });
        let weight: usize = indices.iter().map(|&i| requests[i].limits.len()).sum();
        // A repeat has half the deadline: Redis answers it from memory if it ran the first
        // call, and a caller in fail-open waits at most 1.5 deadlines for its fallback.
        let deadline = if repeat {
            self.batch_timeout(weight) / 2
        } else {
            self.batch_timeout(weight)
        };
        let answered = with_deadline(deadline, futures::future::try_join_all(pipelines)).await?;
        let mut by_request: Vec<Option<redis::RedisResult<Vec<i64>>>> =
            requests.iter().map(|_| None).collect();
        for (i, answer) in answered.into_iter().flatten() {
            by_request[i] = Some(answer);
        }
        Ok(indices
            .iter()
            .map(|&i| by_request[i].take().expect("every request answered"))
            .collect())
    }

    /// The deadline of one call carrying `limits` limit decisions: `REDIS_TIMEOUT_MS` for
    /// one, and as much again for every 64 more (a full batch of 256 gets 5 times as long),
    /// so that a big batch is not held to the deadline of a single decision.
    fn batch_timeout(&self, limits: usize) -> Duration {
        self.timeout * (1 + limits.saturating_sub(1).min(64 * 64) as u32 / 64)
    }
}
