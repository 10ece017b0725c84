//! Idempotent bucket scripts: a call carries a request id, and the script remembers its
//! answer briefly under it, so a call sent again after a timeout (Redis may have run the
//! first one) is answered from the run that happened rather than decided twice.
//!
//! The decision scripts are wrapped, not edited: their body becomes a function, called
//! only when no answer is remembered. Two arguments follow theirs (which they address from
//! the front): how long to remember, in ms, and the request id (`''`: do not remember).
//! The answer is kept beside the call's first key (same hash tag, so the same Cluster
//! slot), only when the call spent something (its first answer is 1, allowed): a refusal
//! writes nothing, so running it again decides the same way.

use std::sync::atomic::{AtomicU64, Ordering};

/// `body` (a decision script answering an array of integers whose first is 1 when it
/// wrote) made idempotent per request id.
pub(super) fn memoized(body: &str) -> String {
    format!(
        r#"local rid = ARGV[#ARGV]
local memo
if rid ~= '' then
  memo = KEYS[1] .. ':m:' .. rid
  local done = redis.call('GET', memo)
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
if memo and out[1] == 1 then
  local text = {{}}
  for i = 1, #out do text[i] = string.format('%d', out[i]) end
  redis.call('SET', memo, table.concat(text, ','), 'PX', ARGV[#ARGV - 1])
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
