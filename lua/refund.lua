-- refund.lua: give a failed claim's unit, quota and points back, exactly once.
--
-- KEYS[1] stock    hash of the claim's period (taken, taken:<option_id>)
-- KEYS[2] used     hash of the claim's period (<user_id> = claims taken)
-- KEYS[3] refunded set of claim ids already refunded in that period
-- KEYS[4] codes    hash of free redemption codes (see claim.lua)
-- KEYS[5] codexp   zset of expiring code buckets
-- KEYS[6] live     run id of the server whose counters recovery verified
-- KEYS[7] points   hash of the members' points lots (see claim.lua)
-- KEYS[8] points live   run id of the server whose points mirror recovery verified
-- ARGV[1] claim_id   ARGV[2] user_id   ARGV[3] option_id
-- ARGV[4] "1" to give the reserved redemption code back too, "0" when none is left to give
-- ARGV[5] ttl of the refunded set in seconds
-- ARGV[6] expiry (unix ms) of the code bucket the claim reserved ("0" or "": never expires)
-- ARGV[7] the points the claim took, "lot:amount:expiry_ms,..." ("": none): each amount goes
--         back to its own lot, unless that lot has expired by the server's clock
-- ARGV[8] the bundle's claim id when the claim is one option of a bundle ("": not a bundle)
-- ARGV[9] the bundle's size   ARGV[10] the prize a draw gave ("": not a draw)
-- An option of a bundle gives back its option's unit, code and points; the bundle's unit of
-- stock and the member's quota come back with the last of its options to be refunded. A draw
-- gives its prize's unit back too (the member's pity count is left as it is).
-- Returns {1, dropped} when refunded now, where dropped lists the points not given back
-- because their lot had expired ("lot:amount,..."); {0, ""} when this claim was refunded
-- before; {-1, ""} when the counters or the points mirror are being recovered (nothing
-- changed; try again once they are live).
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[6]) ~= run_id then
  return {-1, ''}
end
local paid = ARGV[7] or ''
if paid ~= '' and redis.call('GET', KEYS[8]) ~= run_id then
  return {-1, ''}
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then
  return {0, ''}
end
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
local function decrement(key, field)
  local value = tonumber(redis.call('HGET', key, field) or '0')
  if value > 0 then
    redis.call('HINCRBY', key, field, -1)
  end
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local dropped = {}
if paid ~= '' then
  local lots = {}
  local at = {}
  for id, left, exp in string.gmatch(redis.call('HGET', KEYS[7], ARGV[2]) or '',
      '(%d+):(%d+):(%d+)') do
    lots[#lots + 1] = {id, tonumber(left), tonumber(exp)}
    at[id] = #lots
  end
  for id, amount, exp in string.gmatch(paid, '(%d+):(%d+):(%d+)') do
    exp = tonumber(exp)
    if exp ~= 0 and exp <= now_ms then
      dropped[#dropped + 1] = id .. ':' .. amount
    elseif at[id] then
      lots[at[id]][2] = lots[at[id]][2] + tonumber(amount)
    else
      lots[#lots + 1] = {id, tonumber(amount), exp}
      at[id] = #lots
    end
  end
  table.sort(lots, function(a, b)
    local ea = a[3] == 0 and math.huge or a[3]
    local eb = b[3] == 0 and math.huge or b[3]
    if ea ~= eb then
      return ea < eb
    end
    return tonumber(a[1]) < tonumber(b[1])
  end)
  local kept = {}
  for _, lot in ipairs(lots) do
    if lot[3] == 0 or lot[3] > now_ms then
      kept[#kept + 1] = lot[1] .. ':' .. lot[2] .. ':' .. lot[3]
    end
  end
  redis.call('HSET', KEYS[7], ARGV[2], table.concat(kept, ','))
end
local bundle = ARGV[8] or ''
local whole = true
if bundle ~= '' then
  for k = 0, tonumber(ARGV[9]) - 1 do
    local item_id = bundle
    if k > 0 then
      item_id = string.sub(bundle, 1, 30) .. string.format('%02x', k)
    end
    if redis.call('SISMEMBER', KEYS[3], item_id) == 0 then
      whole = false
      break
    end
  end
end
if whole then
  decrement(KEYS[1], 'taken')
  decrement(KEYS[2], ARGV[2])
end
decrement(KEYS[1], 'taken:' .. ARGV[3])
if (ARGV[10] or '') ~= '' then
  decrement(KEYS[1], 'prize:' .. ARGV[10])
end
if ARGV[4] == '1' then
  local expiry = tonumber(ARGV[6]) or 0
  if expiry == 0 then
    redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
  else
    if expiry > now_ms then -- an expired code is worth nothing: it is not given back
      local field = ARGV[3] .. '|' .. expiry
      redis.call('HINCRBY', KEYS[4], field, 1)
      redis.call('ZADD', KEYS[5], expiry, field)
    end
  end
end
return {1, table.concat(dropped, ',')}
