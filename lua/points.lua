-- points.lua: change the points mirror outside a claim (claims take points in claim.lua).
--
-- The mirror holds, per member, the lots PostgreSQL's ledger gave them with what is left of
-- each: "lot:remaining:expiry_ms,..." ordered first expiring first (expiry 0: never). Lots
-- that expired by the server's clock are spendable no more and are dropped when written.
-- A lot spent to zero stays (until it expires) so that adding it again changes nothing.
--
-- KEYS[1] points hash   KEYS[2] points live marker
-- KEYS[3] holds hash: reference -> "user|lot:amount:expiry_ms,..." (kept as the record of
--         what a negative adjustment took, so repeating it takes nothing more)
-- ARGV[1] the operation:
--   "add", then triples user, lot, amount, expiry_ms: add each lot unless the member already
--          has it or it has expired. Returns the number of lots added.
--   "take", user, reference, amount: hold amount points for a negative adjustment, first
--          expiring first. Returns {"took", lots} ("lot:amount:expiry_ms,..."), {"held", lots}
--          when the reference holds points already, or {"short", spendable}.
--   "release", user, reference: give a hold's points back (its ledger entry was not written).
--          Returns 1, or 0 when there was no such hold.
-- Every operation returns -1 (changing nothing) while the mirror is not verified live.

local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[2]) ~= run_id then
  return -1
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function spendable(lot)
  return lot[3] == 0 or lot[3] > now_ms
end
local function read(user)
  local lots = {}
  for id, left, exp in string.gmatch(redis.call('HGET', KEYS[1], user) or '',
      '(%d+):(%d+):(%d+)') do
    lots[#lots + 1] = {id, tonumber(left), tonumber(exp)}
  end
  return lots
end
local function write(user, lots)
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
    if spendable(lot) then
      kept[#kept + 1] = lot[1] .. ':' .. lot[2] .. ':' .. lot[3]
    end
  end
  redis.call('HSET', KEYS[1], user, table.concat(kept, ','))
end
-- Give "lot:amount:expiry,..." back to user's lots (expired lots take nothing back).
local function give_back(user, spec)
  local lots = read(user)
  local at = {}
  for i, lot in ipairs(lots) do
    at[lot[1]] = i
  end
  for id, amount, exp in string.gmatch(spec, '(%d+):(%d+):(%d+)') do
    if at[id] then
      lots[at[id]][2] = lots[at[id]][2] + tonumber(amount)
    else
      lots[#lots + 1] = {id, tonumber(amount), tonumber(exp)}
      at[id] = #lots
    end
  end
  write(user, lots)
end

local op = ARGV[1]
if op == 'add' then
  local added = 0
  for i = 2, #ARGV, 4 do
    local user, id = ARGV[i], ARGV[i + 1]
    local amount, exp = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    local lots = read(user)
    local found = false
    for _, lot in ipairs(lots) do
      if lot[1] == id then
        found = true
      end
    end
    local lot = {id, amount, exp}
    if not found and spendable(lot) then
      lots[#lots + 1] = lot
      write(user, lots)
      added = added + 1
    end
  end
  return added
elseif op == 'take' then
  local user, reference, amount = ARGV[2], ARGV[3], tonumber(ARGV[4])
  local held = redis.call('HGET', KEYS[3], reference)
  if held then
    return {'held', string.match(held, '|(.*)$')}
  end
  local lots = read(user)
  local total = 0
  for _, lot in ipairs(lots) do
    if spendable(lot) then
      total = total + lot[2]
    end
  end
  if total < amount then
    return {'short', total}
  end
  local taken = {}
  local need = amount
  for _, lot in ipairs(lots) do
    if need > 0 and spendable(lot) and lot[2] > 0 then
      local take = math.min(need, lot[2])
      lot[2] = lot[2] - take
      need = need - take
      taken[#taken + 1] = lot[1] .. ':' .. take .. ':' .. lot[3]
    end
  end
  write(user, lots)
  local spec = table.concat(taken, ',')
  redis.call('HSET', KEYS[3], reference, user .. '|' .. spec)
  return {'took', spec}
elseif op == 'release' then
  local user, reference = ARGV[2], ARGV[3]
  local held = redis.call('HGET', KEYS[3], reference)
  if not held then
    return 0
  end
  redis.call('HDEL', KEYS[3], reference)
  give_back(user, string.match(held, '|(.*)$'))
  return 1
end
return redis.error_reply('unknown operation ' .. tostring(op))
