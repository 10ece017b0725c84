-- wrk script: POST {"user_id":"user-<n>"} as application/json to the URL's path, with n
-- drawn over a population of users.
--
--   wrk -t2 -c200 -d10s --latency -s bench/post.lua http://127.0.0.1:3000/api -- 10000
--   wrk ... -s bench/post.lua http://127.0.0.1:8080/check -- 100000 seq
--
-- Arguments after `--` (or the environment when absent):
--   1. population (POPULATION, default 10000): n is uniform in [0, population)
--   2. "seq" (MODE=seq): every request is a new user instead, n = offset + thread * 1e8 +
--      request number, so a run touches as many users as it sends requests (to fill
--      buckets); the population is then unused
--   3. in seq mode, the offset (OFFSET, default 0), to keep successive runs apart
--
-- BODY_MODE=three (environment): the same users, each asking in domain "bench" with one
-- descriptor [user_id=user-<n>] that bench/run.sh's rules give three limits (a token bucket,
-- a fixed window and a sliding window), instead of the built-in one.
--
-- done() prints one machine-readable line that bench/run.sh parses:
--   BENCH requests=.. duration_us=.. rps=.. p50_us=.. p90_us=.. p99_us=.. p999_us=..
--         max_us=.. non2xx=.. errors=..

local population = 10000
local sequential = false
local offset = 0
local thread_count = 0
local next_seq = 0
local headers = { ["Content-Type"] = "application/json" }
local three = os.getenv("BODY_MODE") == "three"
-- BODY_MODE=envoy: the body as usual, and the user also in an `x-user` header (what the
-- Envoy scenario's rate_limits action turns into a descriptor).
local envoy = os.getenv("BODY_MODE") == "envoy"
-- BODY_MODE=throttle: throttlecrab-server's POST /throttle body for the same user, with a
-- limit no run reaches (the peer row of bench/run.sh).
local throttle = os.getenv("BODY_MODE") == "throttle"

local function configure(args)
  local p = (args and args[1]) or os.getenv("POPULATION")
  if p ~= nil and p ~= "" then
    population = tonumber(p)
  end
  local mode = (args and args[2]) or os.getenv("MODE")
  sequential = (mode == "seq")
  local o = (args and args[3]) or os.getenv("OFFSET")
  if o ~= nil and o ~= "" then
    offset = tonumber(o)
  end
end

-- Runs once per thread in the main Lua state, before init: numbers the threads (the
-- thread's own state then has a global `id`).
function setup(thread)
  thread:set("id", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  id = id or 0
  configure(args)
  -- Each thread has its own Lua state; seed each differently.
  math.randomseed(os.time() * 1000 + id * 7919)
  next_seq = offset + id * 100000000
end

function request()
  local n
  if sequential then
    n = next_seq
    next_seq = next_seq + 1
  else
    n = math.random(0, population - 1)
  end
  if envoy then
    return wrk.format("POST", nil, { ["Content-Type"] = "application/json", ["x-user"] = "user-" .. n },
      '{"user_id":"user-' .. n .. '"}')
  end
  if throttle then
    return wrk.format("POST", nil, headers, '{"key":"user-' .. n
      .. '","max_burst":1000000000,"count_per_period":1000000000,"period":1,"quantity":1}')
  end
  if three then
    return wrk.format("POST", nil, headers,
      '{"domain":"bench","descriptors":[{"entries":[{"key":"user_id","value":"user-' .. n .. '"}]}]}')
  end
  return wrk.format("POST", nil, headers, '{"user_id":"user-' .. n .. '"}')
end

function done(summary, latency, requests)
  local e = summary.errors
  local duration_s = summary.duration / 1e6
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d non2xx=%d errors=%d\n",
    summary.requests, summary.duration, summary.requests / duration_s,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, e.status,
    e.connect + e.read + e.write + e.timeout))
end
