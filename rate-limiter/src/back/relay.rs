//! The outbox relay: moves the Redis outbox's streams ([`crate::back::store::outbox`]) to Kafka,
//! and trims what the broker acknowledged.
//!
//! Every limiter runs one. A stream has **one relay at a time**, by lease (`SET NX PX`,
//! renewed every third of it): two relays sending one stream at once could reorder a
//! partition's events, which the counters' high-water marks would read as replays. The
//! streams are shared out: each relay keeps the streams divided by the relays alive
//! (rounded up), giving back the rest between its relaying rounds, with nothing in flight. The
//! holder reads `XRANGE <stream> - + COUNT` [`BATCH`], produces each entry's event keyed by
//! user id and stamped from Redis (the stream and the entry id, [`Entry::event`]), waits
//! until librdkafka reports every one delivered (it retries while the broker is away, in
//! order: an idempotent producer), then trims the stream up to the last delivered entry
//! and subtracts its bytes. A relay that dies stops renewing; after its lease another
//! takes the stream and starts from its first untrimmed entry: what the dead one had sent
//! but not trimmed is sent again, with the same stamps, and counted once.
//!
//! A stopping limiter gives its leases back, so another relay takes over at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kit::redis::{Connection, Scripts, with_deadline};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::back::store::outbox::{Entry, OutboxKeys, STREAMS};

/// Entries read from one stream at a time.
pub const BATCH: usize = 5_000;
/// How long an idle relay waits before it looks at its streams again.
const POLL: Duration = Duration::from_millis(25);
/// How often the outbox's size is read for the metrics.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

/// One lease round of a relay (`ARGV[1]`, its id; `ARGV[2]`, the lease in ms): it says it
/// is alive in the relays' set (`KEYS[1]`, scored by Redis's clock; those silent for a
/// lease are forgotten), and renews the leases it holds (`KEYS[2..]`, one per stream).
/// With `ARGV[3]` = `1` (only between relaying rounds, when nothing of its is in flight)
/// it also keeps its share, the streams divided by the relays alive, rounded up: it gives
/// back the ones beyond it and takes free ones up to it. Answers, per stream, 1 when this
/// relay holds it.
const LEASE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, lease, settle = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
redis.call('ZADD', KEYS[1], now, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
redis.call('PEXPIRE', KEYS[1], lease * 2)
local share = math.ceil((#KEYS - 1) / redis.call('ZCARD', KEYS[1]))
local held, count = {}, 0
for i = 2, #KEYS do
  held[i - 1] = 0
  if redis.call('GET', KEYS[i]) == me then
    if settle and count >= share then
      redis.call('DEL', KEYS[i])
    else
      redis.call('PEXPIRE', KEYS[i], lease)
      held[i - 1] = 1
      count = count + 1
    end
  end
end
if settle then
  for i = 2, #KEYS do
    if count < share and held[i - 1] == 0 and redis.call('SET', KEYS[i], me, 'NX', 'PX', lease) then
      held[i - 1] = 1
      count = count + 1
    end
  end
end
return held
"#;

/// Trims the stream before ARGV[1] (`XTRIM MINID`), and takes off its bytes the share of
/// ARGV[2] (the bytes of the ARGV[3] entries meant) that was still there: a range trimmed
/// twice (by a relay whose lease ran out, and its successor) is subtracted once. An empty
/// stream holds 0 bytes, whatever the count said.
const TRIM_SCRIPT: &str = r#"
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[2], 'bytes', 0)
elseif trimmed > 0 then
  local share = math.floor(tonumber(ARGV[2]) * trimmed / tonumber(ARGV[3]))
  if redis.call('HINCRBY', KEYS[2], 'bytes', -share) < 0 then
    redis.call('HSET', KEYS[2], 'bytes', 0)
  end
end
return trimmed
"#;

/// Reads up to ARGV[2] entries of the stream KEYS[2] from its start, if this relay still
/// holds its lease KEYS[1] (else nil): a relay that lost its lease unawares (Redis
/// restarted empty, another relay took the stream) does not send what the new holder sends,
/// which could put the same event twice in one of the worker's batches.
const READ_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
return redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[2])
"#;

/// Gives the lease back if this relay holds it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"#;

/// What the relay has done, for the metrics and the tests.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events this relay saw delivered (a re-send after a takeover included).
    pub relayed: AtomicU64,
    /// Entries that were not an event (skipped and trimmed).
    pub malformed: AtomicU64,
    /// Streams this relay holds the lease of.
    pub held: AtomicU64,
    /// The age of the oldest entry not yet relayed in its streams, in ms (0: none).
    pub lag_ms: AtomicU64,
    /// The outbox's entries, bytes and drops, in all streams, at the last look.
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
}

/// Describes the relay's metrics (once per process, with the limiter's).
pub fn describe_metrics() {
    use metrics::Unit;
    metrics::describe_counter!(
        "ratelimit_outbox_relayed_total",
        "Outbox events this limiter's relay saw delivered to Kafka"
    );
    metrics::describe_gauge!(
        "ratelimit_outbox_entries",
        "Decision events in the Redis outbox, not yet relayed to Kafka"
    );
    metrics::describe_gauge!(
        "ratelimit_outbox_bytes",
        Unit::Bytes,
        "What the Redis outbox holds, as counted against OUTBOX_MAX_BYTES"
    );
    metrics::describe_counter!(
        "ratelimit_outbox_dropped_total",
        "Decision events not appended to the Redis outbox because it was at its bound"
    );
    metrics::describe_gauge!(
        "ratelimit_outbox_relay_lag_seconds",
        Unit::Seconds,
        "Age of the oldest outbox event this limiter's relay has yet to deliver"
    );
    metrics::describe_gauge!(
        "ratelimit_outbox_streams_held",
        "Outbox streams this limiter relays"
    );
}

/// One limiter's relay.
pub struct Relay {
    conn: Connection,
    keys: OutboxKeys,
    producer: FutureProducer,
    topic: String,
    /// Who this relay is in the leases: the instance id and a random part, so a
    /// restarted limiter is never taken for its previous life.
    me: String,
    lease: Duration,
    timeout: Duration,
    scripts: Scripts,
    stats: Arc<RelayStats>,
}

impl Relay {
    pub fn new(
        conn: Connection,
        keys: OutboxKeys,
        producer: FutureProducer,
        topic: &str,
        instance_id: &str,
        lease: Duration,
        timeout: Duration,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            conn,
            keys,
            producer,
            topic: topic.to_owned(),
            me: format!("{instance_id}/{}", domain::event::Stamp::new_epoch(now)),
            lease,
            timeout: timeout.max(Duration::from_millis(500)),
            scripts: Scripts::new(&[LEASE_SCRIPT, TRIM_SCRIPT, RELEASE_SCRIPT, READ_SCRIPT]),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs the relay in the background until `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut held = [false; STREAMS];
        let mut next_lease = Instant::now();
        let mut next_look = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if Instant::now() >= next_lease {
                self.leases(&mut held, true).await;
                next_lease = Instant::now() + self.lease / 3;
            }
            if Instant::now() >= next_look {
                self.observe().await;
                next_look = Instant::now() + OBSERVE_EVERY;
            }
            let read = self.read(&mut held).await;
            let oldest = read
                .iter()
                .filter_map(|(_, entries)| entries.first())
                .filter_map(|e| e.id_parts().ok())
                .map(|(ms, _)| ms)
                .min();
            let lag = oldest.map_or(0, |ms| now_ms().saturating_sub(ms));
            self.stats.lag_ms.store(lag, Ordering::Relaxed);
            metrics::gauge!("ratelimit_outbox_relay_lag_seconds").set(lag as f64 / 1000.0);
            if read.iter().all(|(_, entries)| entries.is_empty()) {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            // Every stream's entries are produced, in order; the deliveries are awaited
            // while the leases are kept.
            let sends: Vec<_> = read
                .iter()
                .map(|(stream, entries)| self.send(*stream, entries))
                .collect();
            let delivered = futures::future::join_all(sends);
            tokio::pin!(delivered);
            let delivered = loop {
                tokio::select! {
                    delivered = &mut delivered => break delivered,
                    _ = shutdown.cancelled() => {
                        self.release(&held).await;
                        return;
                    }
                    // Renewed only: a stream is given back with nothing of it in
                    // flight, so that two relays never send one stream at once.
                    _ = tokio::time::sleep_until(next_lease.into()) => {
                        self.leases(&mut held, false).await;
                        next_lease = Instant::now() + self.lease / 3;
                    }
                }
            };
            self.trim(&read, &delivered).await;
        }
        self.release(&held).await;
    }

    /// Renews the leases held; with `share`, also keeps this relay's share of the streams
    /// (`LEASE_SCRIPT`).
    async fn leases(&self, held: &mut [bool; STREAMS], share: bool) {
        let mut pipe = redis::pipe();
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(self.scripts.hash(0))
            .arg(STREAMS + 1)
            .arg(self.keys.relays());
        for n in 0..STREAMS {
            cmd.arg(self.keys.lease(n));
        }
        cmd.arg(&self.me)
            .arg(self.lease.as_millis() as u64)
            .arg(if share { "1" } else { "0" });
        match self
            .scripts
            .query_idempotent::<(Vec<i64>,)>(&self.conn, &pipe, self.timeout)
            .await
        {
            Ok((answers,)) => {
                for (n, answer) in answers.into_iter().enumerate().take(STREAMS) {
                    if held[n] != (answer == 1) {
                        tracing::info!(stream = n, held = answer == 1, "outbox lease");
                    }
                    held[n] = answer == 1;
                }
            }
            // Not renewed: it may lapse and go to another relay, which sends from the
            // first untrimmed entry (harmless). This relay stops reading until it knows.
            Err(err) => {
                tracing::warn!(error = %err, "cannot renew the outbox leases");
                *held = [false; STREAMS];
            }
        }
        let count = held.iter().filter(|h| **h).count() as u64;
        self.stats.held.store(count, Ordering::Relaxed);
        metrics::gauge!("ratelimit_outbox_streams_held").set(count as f64);
    }

    async fn release(&self, held: &[bool; STREAMS]) {
        // Out of the relays alive, so that the others' shares grow at once.
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(self.keys.relays()).arg(&self.me);
        for n in (0..STREAMS).filter(|&n| held[n]) {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.hash(2))
                .arg(1)
                .arg(self.keys.lease(n))
                .arg(&self.me);
        }
        if let Err(err) = self
            .scripts
            .query_idempotent::<Vec<i64>>(&self.conn, &pipe, self.timeout)
            .await
        {
            tracing::warn!(error = %err, "cannot give the outbox leases back");
        }
    }

    /// The first entries of every stream held, in one round trip; a stream whose lease
    /// turns out lost is held no more.
    async fn read(&self, held: &mut [bool; STREAMS]) -> Vec<(usize, Vec<Entry>)> {
        let streams: Vec<usize> = (0..STREAMS).filter(|&n| held[n]).collect();
        if streams.is_empty() {
            return Vec::new();
        }
        let mut pipe = redis::pipe();
        for &n in &streams {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.hash(3))
                .arg(2)
                .arg(self.keys.lease(n))
                .arg(self.keys.stream(n))
                .arg(&self.me)
                .arg(BATCH);
        }
        type Range = Option<Vec<(String, Vec<String>)>>;
        match self
            .scripts
            .query_idempotent::<Vec<Range>>(&self.conn, &pipe, self.timeout)
            .await
        {
            Ok(ranges) => streams
                .into_iter()
                .zip(ranges)
                .filter_map(|(n, range)| {
                    let Some(range) = range else {
                        tracing::info!(stream = n, "outbox lease lost");
                        held[n] = false;
                        return None;
                    };
                    let entries = range
                        .into_iter()
                        .map(|(id, fields)| entry(id, fields))
                        .collect();
                    Some((n, entries))
                })
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the outbox");
                Vec::new()
            }
        }
    }

    /// Produces `entries` of `stream` in order and waits for their deliveries: how many
    /// from the first were delivered (or malformed, so skipped).
    async fn send(&self, stream: usize, entries: &[Entry]) -> usize {
        let mut deliveries = Vec::with_capacity(entries.len());
        for e in entries {
            let event = match e.event(stream) {
                Ok(event) => event,
                Err(err) => {
                    tracing::warn!(error = %err, "skipping an outbox entry");
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    deliveries.push(None);
                    continue;
                }
            };
            let payload = event.encode();
            let record = FutureRecord::to(&self.topic)
                .key(event.user_id.as_str())
                .payload(payload.as_slice());
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(Some(delivery)),
                // The producer's queue is full: the rest waits for the next round, so
                // that the stream is sent in order.
                Err((err, _)) => {
                    tracing::debug!(error = %err, "outbox relay: enqueue refused");
                    break;
                }
            }
        }
        let mut done = 0;
        for delivery in deliveries {
            let ok = match delivery {
                None => true,
                Some(delivery) => matches!(delivery.await, Ok(Ok(_))),
            };
            if !ok {
                break;
            }
            done += 1;
        }
        self.stats.relayed.fetch_add(done as u64, Ordering::Relaxed);
        metrics::counter!("ratelimit_outbox_relayed_total").increment(done as u64);
        done
    }

    /// Trims every stream up to its last delivered entry, in one round trip.
    async fn trim(&self, read: &[(usize, Vec<Entry>)], delivered: &[usize]) {
        let mut pipe = redis::pipe();
        let mut any = false;
        for ((stream, entries), &done) in read.iter().zip(delivered) {
            let Some(last) = done.checked_sub(1).map(|i| &entries[i]) else {
                continue;
            };
            let Ok(min_id) = last.next_id() else { continue };
            let bytes: u64 = entries[..done].iter().map(Entry::size).sum();
            pipe.cmd("EVALSHA")
                .arg(self.scripts.hash(1))
                .arg(2)
                .arg(self.keys.stream(*stream))
                .arg(self.keys.meta(*stream))
                .arg(min_id)
                .arg(bytes)
                .arg(done);
            any = true;
        }
        if !any {
            return;
        }
        if let Err(err) = self
            .scripts
            .query_idempotent::<Vec<i64>>(&self.conn, &pipe, self.timeout)
            .await
        {
            // Sent again next round: counted once all the same.
            tracing::warn!(error = %err, "cannot trim the outbox");
        }
    }

    /// Reads the outbox's size and drops, for the metrics.
    async fn observe(&self) {
        let mut pipe = redis::pipe();
        for n in 0..STREAMS {
            pipe.cmd("XLEN").arg(self.keys.stream(n));
            pipe.cmd("HMGET")
                .arg(self.keys.meta(n))
                .arg("bytes")
                .arg("dropped");
        }
        let mut conn = self.conn.clone();
        type Look = (u64, (Option<u64>, Option<u64>));
        let Ok(looks) = with_deadline(self.timeout, pipe.query_async::<Vec<Look>>(&mut conn)).await
        else {
            return;
        };
        let (mut entries, mut bytes, mut dropped) = (0, 0, 0);
        for (len, (b, d)) in looks {
            entries += len;
            bytes += b.unwrap_or(0);
            dropped += d.unwrap_or(0);
        }
        self.stats.entries.store(entries, Ordering::Relaxed);
        self.stats.bytes.store(bytes, Ordering::Relaxed);
        self.stats.dropped.store(dropped, Ordering::Relaxed);
        metrics::gauge!("ratelimit_outbox_entries").set(entries as f64);
        metrics::gauge!("ratelimit_outbox_bytes").set(bytes as f64);
        metrics::counter!("ratelimit_outbox_dropped_total").absolute(dropped);
    }
}

/// An entry from its id and its field-value list.
fn entry(id: String, fields: Vec<String>) -> Entry {
    let mut template = String::new();
    let mut outcome = String::new();
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match name.as_str() {
            "e" => template = value,
            "o" => outcome = value,
            _ => {}
        }
    }
    Entry {
        id,
        template,
        outcome,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
