-- refund.lua: give a failed claim's unit and quota back, exactly once.
--
-- KEYS[1] stock    hash of the claim's period (taken, taken:<option_id>)
-- KEYS[2] used     hash of the claim's period (<user_id> = claims taken)
-- KEYS[3] refunded set of claim ids already refunded in that period
-- KEYS[4] codes    hash of free redemption codes (see claim.lua)
-- KEYS[5] codexp   zset of expiring code buckets
-- KEYS[6] live     run id of the server whose counters recovery verified
-- ARGV[1] claim_id   ARGV[2] user_id   ARGV[3] option_id
-- ARGV[4] "1" to give the reserved redemption code back too, "0" when none is left to give
-- ARGV[5] ttl of the refunded set in seconds
-- ARGV[6] expiry (unix ms) of the code bucket the claim reserved ("0" or "": never expires)
-- Returns 1 when refunded now, 0 when this claim was refunded before, -1 when the counters are
-- being recovered (nothing changed; try again once the benefit is live).
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[6]) ~= run_id then
  return -1
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then
  return 0
end
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
local function decrement(key, field)
  local value = tonumber(redis.call('HGET', key, field) or '0')
  if value > 0 then
    redis.call('HINCRBY', key, field, -1)
  end
end
decrement(KEYS[1], 'taken')
decrement(KEYS[1], 'taken:' .. ARGV[3])
decrement(KEYS[2], ARGV[2])
if ARGV[4] == '1' then
  local expiry = tonumber(ARGV[6]) or 0
  if expiry == 0 then
    redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
  else
    local clock = redis.call('TIME')
    local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    if expiry > now_ms then -- an expired code is worth nothing: it is not given back
      local field = ARGV[3] .. '|' .. expiry
      redis.call('HINCRBY', KEYS[4], field, 1)
      redis.call('ZADD', KEYS[5], expiry, field)
    end
  end
end
return 1
