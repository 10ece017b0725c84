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
//!
//! A call whose event rides in it (the outbox) and that timed out twice is *in doubt*:
//! Redis may have run it, or may still (it can wait in a frozen Redis's socket). The fail-
//! open fallback answered it and holds its event; [`SETTLE`] then asks the batch's hash:
//! a call that ran has its answer there (its event is in the outbox, so the held one is
//! dropped); one that did not gets a tombstone (`x`) in its place, which the call, should it
//! ever arrive, finds before deciding and stops at (the held event is then published).
//! So for every answered decision exactly one event exists, whichever came first. An
//! outbox call looks its field up even the first time, for that tombstone.

/// `body` (a decision script answering an array of integers whose first is 1 when it
/// wrote) made idempotent per request id.
pub(super) fn memoized(body: &str) -> String {
    format!(
        r#"local mkey, field = ARGV[#ARGV - 3], ARGV[#ARGV - 2]
if ARGV[#ARGV] == '1' then
  local done = redis.call('HGET', mkey, field)
  if done == 'x' then return redis.error_reply('SETTLED the call was settled as not run') end
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

/// Settles the calls in doubt of one batch (`KEYS[1]`, the batch's hash): `ARGV[1]` is how
/// long a tombstone is kept (ms), the rest the calls' fields. Answers, per field, 0 when
/// the call had not run (and now never will), 1 when it ran and refused, 2 when it ran and
/// allowed (its answer's first number). Settling again answers the same.
pub(super) const SETTLE: &str = r#"local ran = {}
for i = 2, #ARGV do
  local done = redis.call('HGET', KEYS[1], ARGV[i])
  if not done then redis.call('HSET', KEYS[1], ARGV[i], 'x') end
  if done and done ~= 'x' then
    ran[i - 1] = (tonumber(string.match(done, '^[^,]+')) == 1) and 2 or 1
  else
    ran[i - 1] = 0
  end
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return ran
"#;
