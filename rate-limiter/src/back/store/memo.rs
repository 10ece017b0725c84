//! Idempotent bucket scripts: a call carries a request id, and the script remembers its
//! answer briefly under it, so a call sent again after a timeout (Redis may have run the
//! first one) is answered from the run that happened rather than decided twice.
//!
//! The decision scripts are wrapped, not edited: their body becomes a function, called
//! unless a repeat finds its answer. Four arguments follow theirs (which they address from
//! the front): the hash the batch's answers are kept in (`''`: remember nothing), the
//! call's field in it, how long the hash lives (ms, from its first answer), and `1` on a
//! repeat (only a repeat looks an answer up). On one Redis a batch's calls share one hash
//! (one key a batch, not one a decision); on a Cluster each call has its own, beside its
//! first key (same hash tag, so the same slot). An answer is kept only when the call spent
//! something (its first number is 1, allowed), or when the script says it wrote
//! (`out.wrote`: an event appended to the outbox, `super::outbox`, refusals included): a
//! refusal otherwise writes nothing, so running it again decides the same way.

use std::sync::atomic::{AtomicU64, Ordering};

/// `body` (a decision script answering an array of integers whose first is 1 when it
/// wrote) made idempotent per request id.
pub(super) fn memoized(body: &str) -> String {
    format!(
        r#"local mkey, field = ARGV[#ARGV - 3], ARGV[#ARGV - 2]
if ARGV[#ARGV] == '1' then
  local done = redis.call('HGET', mkey, field)
  if done then
    local out = {{}}
    for n in string.gmatch(done, '[^,]+') do out[#out + 1] = tonumber(n) end
    return out
  end
end
local function decide()
{body}
end
local out = decide()
if mkey ~= '' and (out[1] == 1 or out.wrote) then
  local text = {{}}
  for i = 1, #out do text[i] = string.format('%d', out[i]) end
  redis.call('HSET', mkey, field, table.concat(text, ','))
  if redis.call('HLEN', mkey) == 1 then redis.call('PEXPIRE', mkey, ARGV[#ARGV - 1]) end
end
return out
"#
    )
}

/// Request ids: a random prefix per process and a counter, so no two calls share one.
pub(super) struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    pub(super) fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        Self {
            prefix: h.finish(),
            next: AtomicU64::new(0),
        }
    }

    /// The id of a batch; its calls are `<batch>.<index>`.
    pub(super) fn batch(&self) -> String {
        format!(
            "{:x}{:x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_differ() {
        let ids = RequestIds::new();
        assert_ne!(ids.batch(), ids.batch());
        assert_ne!(RequestIds::new().batch(), RequestIds::new().batch());
    }
}
