-- refund.lua: give a failed claim's unit and quota back, exactly once.
--
-- KEYS[1] stock    hash of the claim's period (taken, taken:<option_id>)
-- KEYS[2] used     hash of the claim's period (<user_id> = claims taken)
-- KEYS[3] refunded set of claim ids already refunded in that period
-- KEYS[4] codes    hash <option_id> = free redemption codes (card-key options)
-- ARGV[1] claim_id   ARGV[2] user_id   ARGV[3] option_id
-- ARGV[4] "1" to give the reserved redemption code back too, "0" when none is left to give
-- ARGV[5] ttl of the refunded set in seconds
-- Returns 1 when refunded now, 0 when this claim was refunded before.
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
  redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
end
return 1
