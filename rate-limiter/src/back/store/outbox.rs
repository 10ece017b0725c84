//! The Redis outbox: a decision's event appended to a Redis stream by the very script that
//! decides, so that an answered decision and its event are one atomic fact, whatever
//! becomes of the limiter after Redis ran the script ([`crate::back::relay`] moves the streams
//! to Kafka).
//!
//! - `outboxed` wraps a decision script (as `super::memo` does, without editing its
//!   body): after the decision, when the call carries an event template, it appends
//!   `XADD <stream> * e <template> o <outcome>` and answers one more number: 1 appended,
//!   2 dropped (the stream is at its bound), 0 nothing to append (a peek, a refund).
//! - [`OutboxKeys`]: a fixed number of streams ([`STREAMS`]), a user's chosen by a hash of
//!   the user id (so one user's events stay in order in one stream), each with a small
//!   hash of its own (`bytes` it holds, `dropped` past its bound) and a relay lease.
//!
//! Bounded in bytes: an entry counts the template's length plus [`ENTRY_OVERHEAD`]; past
//! `max_bytes / STREAMS` in one stream the script appends nothing and counts a drop (the
//! decision stands, as it does past the Kafka producer's buffer). The relay subtracts what
//! it trims.

use domain::event::EventTemplate;

/// How many streams the outbox spreads over: each has one relay at a time, so this is
/// how many limiters can share the relaying.
pub const STREAMS: usize = 16;

/// What an entry costs Redis beyond its template, counted against the bound: the
/// stream's own bookkeeping per entry (id, field names, the outcome, the radix tree and
/// listpack nodes). Measured (`bench/outbox-cost.sh`): 135 to 212 bytes of `used_memory`
/// per held entry whose template is about 37 bytes.
pub const ENTRY_OVERHEAD: u64 = 128;

/// Where the outbox lives in Redis: its streams, their bookkeeping and their leases.
#[derive(Debug, Clone)]
pub struct OutboxKeys {
    prefix: String,
    /// The bound of one stream, in bytes.
    max_stream_bytes: u64,
}

impl OutboxKeys {
    /// The outbox under `prefix`, at most `max_bytes` in all.
    pub fn new(prefix: &str, max_bytes: u64) -> Self {
        Self {
            prefix: prefix.to_owned(),
            max_stream_bytes: (max_bytes / STREAMS as u64).max(1),
        }
    }

    /// Stream `n`.
    pub fn stream(&self, n: usize) -> String {
        format!("{}ob:{n}", self.prefix)
    }

    /// Stream `n`'s bookkeeping: `bytes`, `dropped`.
    pub fn meta(&self, n: usize) -> String {
        format!("{}ob:{n}:m", self.prefix)
    }

    /// Stream `n`'s relay lease: who relays it now.
    pub fn lease(&self, n: usize) -> String {
        format!("{}ob:{n}:lease", self.prefix)
    }

    /// The relays alive now: a sorted set of relay ids, scored by their last lease round.
    pub fn relays(&self) -> String {
        format!("{}ob:relays", self.prefix)
    }

    /// The stream a user's events go to.
    pub fn stream_of(user_id: &str) -> usize {
        (domain::keys::stable_hash(user_id) % STREAMS as u64) as usize
    }

    pub fn max_stream_bytes(&self) -> u64 {
        self.max_stream_bytes
    }

    /// The four arguments `outboxed` reads for a call with `template` (none: a call
    /// that appends nothing), in the order they go before the memo's.
    pub fn args(&self, template: Option<&EventTemplate>) -> [String; 4] {
        match template {
            Some(t) => {
                let n = Self::stream_of(&t.user_id);
                [
                    self.max_stream_bytes.to_string(),
                    self.meta(n),
                    self.stream(n),
                    serde_json::to_string(t).expect("a template serializes"),
                ]
            }
            None => [String::new(), String::new(), String::new(), String::new()],
        }
    }
}

/// The size an entry is counted at: the same sum in the script (on append) and in the
/// relay (on trim).
pub fn entry_size(template_len: usize) -> u64 {
    template_len as u64 + ENTRY_OVERHEAD
}

/// `body` (a decision script answering an array of integers: four for one token bucket,
/// or the allowed flag and four per limit) followed by the append of its event. Its
/// arguments sit just before the memo's four (`super::memo`), addressed from the end:
/// the stream's bound, its bookkeeping hash, the stream, and the event template (`''`:
/// append nothing). The outcome stored is the allowed flag then, for several limits, each
/// one's admits flag. `out.wrote` tells the memo that this call wrote (a refusal included),
/// so that a repeat is answered from it rather than appended again.
pub(super) fn outboxed(body: &str) -> String {
    format!(
        r#"local function decide_only()
{body}
end
local out = decide_only()
local template = ARGV[#ARGV - 4]
if template == '' then
  out[#out + 1] = 0
  return out
end
local stream, meta, max = ARGV[#ARGV - 5], ARGV[#ARGV - 6], tonumber(ARGV[#ARGV - 7])
local outcome = string.format('%d', out[1])
if #out ~= 4 then
  for i = 2, #out, 4 do outcome = outcome .. string.format('%d', out[i]) end
end
local size = #template + {overhead}
local held = tonumber(redis.call('HGET', meta, 'bytes') or '0')
if held + size > max then
  redis.call('HINCRBY', meta, 'dropped', 1)
  out[#out + 1] = 2
else
  redis.call('XADD', stream, '*', 'e', template, 'o', outcome)
  redis.call('HINCRBY', meta, 'bytes', size)
  out[#out + 1] = 1
end
out.wrote = true
return out
"#,
        overhead = ENTRY_OVERHEAD
    )
}

/// The user of every event the outbox under `keys` holds now, stream by stream (for
/// tests: what was recorded and not yet relayed).
#[cfg(any(test, feature = "testsuite"))]
pub async fn held_users(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &OutboxKeys,
) -> Vec<String> {
    let mut users = Vec::new();
    for n in 0..STREAMS {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(keys.stream(n))
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .expect("the outbox streams read");
        for (_, fields) in entries {
            let at = fields.iter().position(|f| f == "e").expect("a template");
            let template: EventTemplate =
                serde_json::from_str(&fields[at + 1]).expect("a template decodes");
            users.push(template.user_id);
        }
    }
    users
}

/// An outbox entry read back: its stream id and fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `<ms>-<n>`.
    pub id: String,
    pub template: String,
    pub outcome: String,
}

/// Why an entry cannot be relayed.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("outbox entry {0} is malformed: {1}")]
    Malformed(String, String),
}

impl Entry {
    /// The id as (ms, n).
    pub fn id_parts(&self) -> Result<(u64, u64), EntryError> {
        let bad = || EntryError::Malformed(self.id.clone(), "id".into());
        let (ms, n) = self.id.split_once('-').ok_or_else(bad)?;
        Ok((
            ms.parse().map_err(|_| bad())?,
            n.parse().map_err(|_| bad())?,
        ))
    }

    /// The event, stamped from Redis: the epoch names the stream and the day of the entry
    /// (a new epoch a day, as publishers do, so the counters can forget old ones), the
    /// sequence is the entry id packed as `(ms since the day began) · 2^20 + n`: under
    /// 2^47, so exact in the counters' Lua, whose numbers are doubles (an id's whole `ms ·
    /// 2^20` is not). Entry ids only grow in a stream, so whoever relays it, a repeat
    /// carries the stamp it had the first time.
    pub fn event(&self, stream: usize) -> Result<domain::RateLimitEvent, EntryError> {
        let (ms, n) = self.id_parts()?;
        let template: EventTemplate = serde_json::from_str(&self.template)
            .map_err(|e| EntryError::Malformed(self.id.clone(), e.to_string()))?;
        let flags: Vec<bool> = self.outcome.bytes().map(|b| b == b'1').collect();
        let Some((&allowed, admits)) = flags.split_first() else {
            return Err(EntryError::Malformed(self.id.clone(), "outcome".into()));
        };
        let mut event = template.event(allowed, admits, ms);
        let secs = ms / 1000;
        let day = secs - secs % domain::event::Stamp::EPOCH_LIFETIME_SECS;
        event.stamp = Some(domain::event::Stamp {
            epoch: format!("{day:x}-ob{stream}"),
            seq: ((ms - day * 1000) << 20) | n.min((1 << 20) - 1),
        });
        Ok(event)
    }

    /// The first id after this one: what `XTRIM MINID` keeps from.
    pub fn next_id(&self) -> Result<String, EntryError> {
        let (ms, n) = self.id_parts()?;
        Ok(format!("{ms}-{}", n + 1))
    }

    /// What this entry was counted at against the bound.
    pub fn size(&self) -> u64 {
        entry_size(self.template.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::event::{RuleOutcome, Stamp};

    fn template(user: &str) -> EventTemplate {
        EventTemplate {
            user_id: user.into(),
            cost: 1,
            limiter_id: "l1".into(),
            domain: Some("api".into()),
            rules: vec![("api:a".into(), false), ("api:b".into(), true)],
        }
    }

    #[test]
    fn an_entry_becomes_its_event_stamped_by_its_id() {
        let t = template("u1");
        let entry = Entry {
            id: "1700000000123-7".into(),
            template: serde_json::to_string(&t).unwrap(),
            outcome: "110".into(),
        };
        let event = entry.event(3).unwrap();
        assert!(event.allowed);
        assert_eq!(event.ts_ms, 1_700_000_000_123);
        assert_eq!(event.user_id, "u1");
        assert_eq!(event.rules[1].outcome, RuleOutcome::ShadowBlocked);
        let stamp = event.stamp.unwrap();
        assert_eq!(
            stamp.seq,
            ((1_700_000_000_123 - 1_699_920_000_000) << 20) | 7
        );
        // Exact as a double, as the counters' Lua reads it.
        assert!(stamp.seq < 1 << 53);
        assert_eq!(Stamp::started_secs(&stamp.epoch), Some(1_699_920_000));
        assert!(stamp.epoch.ends_with("-ob3"));
        assert_eq!(entry.next_id().unwrap(), "1700000000123-8");
    }

    #[test]
    fn later_entries_have_higher_sequences() {
        let e = |id: &str| Entry {
            id: id.into(),
            template: serde_json::to_string(&template("u")).unwrap(),
            outcome: "1".into(),
        };
        let seq = |id| e(id).event(0).unwrap().stamp.unwrap().seq;
        assert!(seq("1700000000123-8") > seq("1700000000123-7"));
        assert!(seq("1700000000124-0") > seq("1700000000123-900000"));
    }

    #[test]
    fn a_user_keeps_to_one_stream_and_users_spread() {
        assert_eq!(OutboxKeys::stream_of("u1"), OutboxKeys::stream_of("u1"));
        let used: std::collections::HashSet<usize> = (0..200)
            .map(|i| OutboxKeys::stream_of(&format!("user-{i}")))
            .collect();
        assert_eq!(used.len(), STREAMS);
    }

    #[test]
    fn malformed_entries_are_refused() {
        let bad = Entry {
            id: "x".into(),
            template: "{}".into(),
            outcome: String::new(),
        };
        assert!(bad.event(0).is_err());
    }
}
