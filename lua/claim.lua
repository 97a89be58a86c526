-- claim.lua: decide a batch of claims on one benefit for one period, atomically.
--
-- KEYS[1]  cfg     hash  version, paused, min_tier, stock, quota ("tier:n,tier:n"), benefit_id,
--                        opt:<option_id> = per-period cap of the option (-1: none),
--                        card:<option_id> present for card-key options
-- KEYS[2]  stock   hash  added (ops top-ups), taken, taken:<option_id>, accepted (this period;
--                        accepted counts every acceptance and is never given back), moved
--                        (a bucket of a sharded benefit: units received less units lent)
-- KEYS[3]  used    hash  <user_id> = claims taken by the member             (this period)
-- KEYS[4]  idem    hash  <len>:<user_id><request_id> = "claim_id|option_id|tier|created_ms"
-- KEYS[5]  stream  the durable hand-off read by the writer's consumer group
-- KEYS[6]  tiers   hash  <user_id> = tier for this period (missing: tier 0)
-- KEYS[7]  pending hash  <claim_id> = stream entry id, until the writer has persisted it
-- KEYS[8]  codes   hash  free redemption codes of card-key options: <option_id> = codes that
--                        never expire, <option_id>|<expiry_ms> = codes expiring then
-- KEYS[9]  codexp  zset  <option_id>|<expiry_ms> scored by expiry_ms
-- KEYS[10] live    the run id of the server whose counters recovery verified
-- KEYS[11] idem of the previous period (a retry across a period boundary), or KEYS[4]
-- KEYS[12] points  hash  <user_id> = the member's points lots, "lot:remaining:expiry_ms,..."
--                        first expiring first (expiry 0: never; see points.lua)
-- KEYS[13] points live   the run id of the server whose points mirror recovery verified
-- KEYS[14] pity    hash  <user_id> = the member's draws in a row without a pity prize
--                                                                              (this period)
--
-- ARGV[1] config version the caller's copy of the benefit was built from
-- ARGV[2] period "YYYY-MM"   ARGV[3], ARGV[4] the period's bounds in unix ms [start, end)
--         (0, 0: a one-off release, one period for its whole window)
-- ARGV[5] opens_at ms   ARGV[6] closes_at ms (0: none)
-- ARGV[7] ttl of the per-period keys in seconds   ARGV[8] n = number of claims
-- then n groups of 7: user_id, request_id, options, new claim_id, account, draw value, event
-- ms
-- then, on a Redis Cluster (where the tier snapshot lives in another slot), the n members'
-- tiers as read by the caller from that snapshot (KEYS[6] is then not read)
-- where options is one option id or, for a bundle, the chosen ids joined by "," (distinct),
-- and the draw value (a draw benefit only, "" otherwise) is the claim's HMAC value v < 2^48,
-- and event ms (a benefit with cfg elig_ms only, "" otherwise) is when the member's latest
-- event of the benefit's eligibility type occurred (unix ms, "" when none): older than
-- elig_ms by the server's clock is refused not_eligible; with cfg elig_hold (a campaign's
-- reward benefit) it is when the member's reward is released, and before it is refused too.
--
-- The server's own clock (TIME) decides: the period, the window and created_at.
-- Returns {"unverified"}, {"points_unverified"}, {"missing"}, {"stale", version} or
-- {"period", now_ms} for the whole batch, otherwise {"decided", now_ms} followed by 7 values
-- per claim: code, claim_id, options, stock_left, tier, extra, detail, where code is one of
-- ok | dup | paused | not_open | closed | unknown_option | tier | not_eligible | quota | sold_out |
-- option_sold_out | points, and extra is created_ms for ok/dup, the member's used count for
-- quota and the member's spendable points for points. options is what was taken (ok, dup:
-- "option_id/prize_id" for a draw) or the option refused (unknown_option, option_sold_out);
-- detail, for a draw taken now, is "prize_id|weights in force|owed|streak|seq" (weights
-- "prize_id:weight,..." in published order, owed "1" when the pity rule restricted the
-- candidates' list, streak the member's count after this draw, seq the draw's number in the
-- period).
--
-- A bundle (several options) takes one unit of stock and one of quota, and a unit of each
-- option's cap and a code of each card-key option, all or none. Its stream entries are one per
-- option: the first carries claim_id, the i-th (i >= 1) claim_id with its last two hex digits
-- replaced by i (the engine makes bundle claim ids end in "00"); each names the bundle (g),
-- its index (gi) and size (gn).
--
-- A draw benefit (cfg prizes "prize_id:weight:stock:option_id,...", stock -1: unlimited;
-- pity "after:prize_id,..."; dprice its points price) draws the prize in the same step: the
-- candidates are the prizes with weight > 0 whose stock, option cap and codes are not
-- exhausted; a member owed the pity prize (streak + 1 >= after) draws among the pity prizes
-- in stock, if any; target = v mod (sum of the candidates' weights), and the first candidate
-- whose running sum of weights exceeds target is drawn (see claim_service/domain/draws.py).
--
-- An option priced in points (cfg pts:<option_id>) takes them from the member's lots in the
-- same step, first expiring first, never from a lot expired by the server's clock; the
-- stream entry carries the price (pp) and the lots taken ("lot:amount:expiry_ms,...", pl).

local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[10]) ~= run_id then
  return {'unverified'}
end
local cfg = redis.call('HMGET', KEYS[1], 'version', 'paused', 'min_tier', 'stock', 'quota',
  'benefit_id', 'priced', 'prizes', 'pity', 'dprice', 'elig_ms', 'elig_hold')
if not cfg[1] then
  return {'missing'}
end
if cfg[1] ~= ARGV[1] then
  return {'stale', cfg[1]}
end
local priced = cfg[7] == '1'
if priced and redis.call('GET', KEYS[13]) ~= run_id then
  return {'points_unverified'}
end

local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local period_start = tonumber(ARGV[3])
local period_end = tonumber(ARGV[4])
if period_end > 0 and (now_ms < period_start or now_ms >= period_end) then
  return {'period', now_ms}
end

local paused = cfg[2] == '1'
local min_tier = tonumber(cfg[3])
local stock = tonumber(cfg[4])
local steps = {}
for t, q in string.gmatch(cfg[5] or '', '(%d+):(%d+)') do
  steps[#steps + 1] = {tonumber(t), tonumber(q)}
end
local benefit_id = cfg[6]

local period = ARGV[2]
local opens_ms = tonumber(ARGV[5])
local closes_ms = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local n = tonumber(ARGV[8])
local tiers_passed = #ARGV >= 8 + n * 8
local elig_ms = tonumber(cfg[11] or '0')
local elig_hold = cfg[12] == '1'

local counters = redis.call('HMGET', KEYS[2], 'added', 'taken', 'moved')
-- a sharded benefit's bucket (see buckets.lua): what it received from others minus what it lent
local added = tonumber(counters[1] or '0') + tonumber(counters[3] or '0')
local taken = tonumber(counters[2] or '0')

local function quota_for(tier)
  local allowed = 0
  for _, step in ipairs(steps) do
    if tier >= step[1] then
      allowed = step[2]
    end
  end
  return allowed
end

-- Card-key codes, first expiring first out. Buckets that have expired are dropped, so an
-- expired pool answers sold_out up front instead of accepting claims it cannot deliver.
local buckets = nil
local bucket_counts = {}
local function load_buckets()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now_ms)
  for _, member in ipairs(expired) do
    redis.call('HDEL', KEYS[8], member)
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now_ms)
  end
  buckets = redis.call('ZRANGEBYSCORE', KEYS[9], '(' .. now_ms, '+inf')
end
local function bucket_count(field)
  local count = bucket_counts[field]
  if count == nil then
    count = tonumber(redis.call('HGET', KEYS[8], field) or '0')
    bucket_counts[field] = count
  end
  return count
end
-- The field a claim of option_id would take a code from, and its expiry (0: never), or nil.
local function find_code(option_id)
  if buckets == nil then
    load_buckets()
  end
  local prefix = option_id .. '|'
  for _, member in ipairs(buckets) do
    if string.sub(member, 1, #prefix) == prefix and bucket_count(member) > 0 then
      return member, tonumber(string.sub(member, #prefix + 1))
    end
  end
  if bucket_count(option_id) > 0 then
    return option_id, 0
  end
  return nil, nil
end
local function take_code(field, expiry)
  bucket_counts[field] = bucket_counts[field] - 1
  if redis.call('HINCRBY', KEYS[8], field, -1) <= 0 and expiry > 0 then
    redis.call('HDEL', KEYS[8], field)
    redis.call('ZREM', KEYS[9], field)
  end
end

-- Points: a member's lots, parsed; the unexpired ones spendable, first expiring first.
local function parse_lots(raw)
  local lots = {}
  for id, left, exp in string.gmatch(raw or '', '(%d+):(%d+):(%d+)') do
    lots[#lots + 1] = {id, tonumber(left), tonumber(exp)}
  end
  return lots
end
local function spendable(lot)
  return lot[3] == 0 or lot[3] > now_ms
end
local function points_of(lots)
  local total = 0
  for _, lot in ipairs(lots) do
    if spendable(lot) then
      total = total + lot[2]
    end
  end
  return total
end
-- Take price points first expiring first; write the lots back without the expired ones.
local function take_points(user, lots, price)
  local taken = {}
  local kept = {}
  local need = price
  for _, lot in ipairs(lots) do
    if spendable(lot) then
      if need > 0 and lot[2] > 0 then
        local take = math.min(need, lot[2])
        lot[2] = lot[2] - take
        need = need - take
        taken[#taken + 1] = lot[1] .. ':' .. take .. ':' .. lot[3]
      end
      kept[#kept + 1] = lot[1] .. ':' .. lot[2] .. ':' .. lot[3]
    end
  end
  redis.call('HSET', KEYS[12], user, table.concat(kept, ','))
  return table.concat(taken, ',')
end

-- Draws: the prize table, the pity rule and each prize's count taken this period.
local prizes = nil
local pity_after, pity_set = 0, {}
if cfg[8] then
  prizes = {}
  for pid, w, st, opt in string.gmatch(cfg[8], '([^:,]+):(%d+):(%-?%d+):([^:,]+)') do
    prizes[#prizes + 1] = {pid, tonumber(w), tonumber(st), opt}
  end
  if cfg[9] then
    local after, listed = string.match(cfg[9], '^(%d+):(.*)$')
    pity_after = tonumber(after)
    for pid in string.gmatch(listed, '[^,]+') do
      pity_set[pid] = true
    end
  end
end
local draw_price = tonumber(cfg[10] or '0')
local prize_taken = {}
local function taken_of_prize(pid)
  local count = prize_taken[pid]
  if count == nil then
    count = tonumber(redis.call('HGET', KEYS[2], 'prize:' .. pid) or '0')
    prize_taken[pid] = count
  end
  return count
end

local option_caps = {}
local option_taken = {}
local option_card = {}
local option_price = {}
-- Whether the option exists (its cap, taken count, card-key flag and price are then cached).
local function known(option_id)
  if option_caps[option_id] == nil then
    local cap = redis.call('HGET', KEYS[1], 'opt:' .. option_id)
    if not cap then
      return false
    end
    option_caps[option_id] = tonumber(cap)
    option_taken[option_id] = tonumber(redis.call('HGET', KEYS[2], 'taken:' .. option_id) or '0')
    option_card[option_id] = redis.call('HEXISTS', KEYS[1], 'card:' .. option_id) == 1
    option_price[option_id] = priced
      and tonumber(redis.call('HGET', KEYS[1], 'pts:' .. option_id) or '0') or 0
  end
  return true
end
-- Whether a unit of the option can be taken now: its cap, and a code for a card-key option.
-- Returns available, code field, code expiry.
local function available(option_id)
  local cap = option_caps[option_id]
  if cap >= 0 and option_taken[option_id] >= cap then
    return false, nil, ''
  end
  if option_card[option_id] then
    local field, expiry = find_code(option_id)
    if field == nil then
      return false, nil, ''
    end
    return true, field, expiry
  end
  return true, nil, ''
end

local out = {'decided', now_ms}
local accepted = 0

for i = 0, n - 1 do
  local base = 9 + i * 7
  local user = ARGV[base]
  local request_id = ARGV[base + 1]
  local option_id = ARGV[base + 2]
  local claim_id = ARGV[base + 3]
  local account = ARGV[base + 4]
  local value = ARGV[base + 5]
  local event_ms = tonumber(ARGV[base + 6]) or -1
  local idem_field = #user .. ':' .. user .. request_id
  local left = stock + added - taken
  local prior = redis.call('HGET', KEYS[4], idem_field)
  if not prior and KEYS[11] ~= KEYS[4] then
    prior = redis.call('HGET', KEYS[11], idem_field)
  end
  local code, extra, tier, detail = nil, 0, 0, ''

  if prior then
    local pc, po, pt, pms = string.match(prior, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    claim_id, option_id, tier, extra, code = pc, po, tonumber(pt), tonumber(pms), 'dup'
  elseif paused then
    code = 'paused'
  elseif now_ms < opens_ms then
    code = 'not_open'
  elseif closes_ms > 0 and now_ms >= closes_ms then
    code = 'closed'
  else
    -- items: {option_id, code field, code expiry, price}
    local items = {}
    if prizes == nil then
      for id in string.gmatch(option_id, '[^,]+') do
        items[#items + 1] = {id, nil, '', 0}
        if code == nil and not known(id) then
          code, option_id = 'unknown_option', id
        end
      end
      if #items == 0 then
        code = 'unknown_option'
      end
    end
    if tiers_passed then
      tier = tonumber(ARGV[9 + n * 7 + i]) or 0
    else
      tier = tonumber(redis.call('HGET', KEYS[6], user) or '0')
    end
    local used = 0
    if code == nil then
      used = tonumber(redis.call('HGET', KEYS[3], user) or '0')
      if tier < min_tier then
        code = 'tier'
      elseif elig_ms > 0 and (event_ms < now_ms - elig_ms or (elig_hold and event_ms > now_ms)) then
        code = 'not_eligible'
      elseif used >= quota_for(tier) then
        code, extra = 'quota', used
      elseif left <= 0 then
        code = 'sold_out'
      end
    end
    local price, lots = 0, nil
    local prize, streak, owed = nil, 0, false
    if code == nil and prizes ~= nil and draw_price > 0 then
      -- Before the draw: a refusal must not tell which prize the request would have drawn.
      local balance = points_of(parse_lots(redis.call('HGET', KEYS[12], user)))
      if balance < draw_price then
        code, extra = 'points', balance
      end
    end
    if code == nil and prizes ~= nil then
      -- The candidates: prizes in stock now (their own stock, their option's cap and codes).
      if pity_after > 0 then
        streak = tonumber(redis.call('HGET', KEYS[14], user) or '0')
        owed = streak + 1 >= pity_after
      end
      local all, owed_list = {}, {}
      for _, p in ipairs(prizes) do
        if p[2] > 0 and (p[3] < 0 or taken_of_prize(p[1]) < p[3]) and known(p[4])
            and available(p[4]) then
          all[#all + 1] = p
          if pity_set[p[1]] then
            owed_list[#owed_list + 1] = p
          end
        end
      end
      local cands = all
      if owed and #owed_list > 0 then
        cands = owed_list
      else
        owed = false
      end
      if #cands == 0 then
        code = 'sold_out'
      else
        local total = 0
        local weights = {}
        for _, p in ipairs(cands) do
          total = total + p[2]
          weights[#weights + 1] = p[1] .. ':' .. p[2]
        end
        -- v < 2^48 and total < 2^53 / 2^48: v % total is exact in doubles
        local target = tonumber(value) % total
        local running = 0
        for _, p in ipairs(cands) do
          running = running + p[2]
          if target < running then
            prize = p
            break
          end
        end
        items[1] = {prize[4], nil, '', 0}
        option_id = prize[4]
        detail = table.concat(weights, ',')
        price = draw_price
      end
    end
    if code == nil then
      for _, item in ipairs(items) do
        local ok, field, expiry = available(item[1])
        if not ok then
          code, option_id = 'option_sold_out', item[1]
          break
        end
        item[2], item[3] = field, expiry
        if prize == nil then
          item[4] = option_price[item[1]]
          price = price + item[4]
        else
          item[4] = price
        end
      end
    end
    if code == nil and price > 0 then
      lots = parse_lots(redis.call('HGET', KEYS[12], user))
      local balance = points_of(lots)
      if balance < price then
        code, extra = 'points', balance
      end
    end
    if code == nil then
      taken = taken + 1
      left = left - 1
      redis.call('HINCRBY', KEYS[2], 'taken', 1)
      local seq = redis.call('HINCRBY', KEYS[2], 'accepted', 1)
      redis.call('HINCRBY', KEYS[3], user, 1)
      local draw_fields = nil
      if prize ~= nil then
        prize_taken[prize[1]] = taken_of_prize(prize[1]) + 1
        redis.call('HINCRBY', KEYS[2], 'prize:' .. prize[1], 1)
        if pity_set[prize[1]] then
          streak = 0
        else
          streak = streak + 1
        end
        if pity_after > 0 then
          redis.call('HSET', KEYS[14], user, streak)
        end
        draw_fields = {'dz', prize[1], 'dv', value, 'dn', 0, 'dw', detail,
          'dk', owed and 1 or 0, 'ds', streak, 'dq', seq}
        detail = prize[1] .. '|' .. detail .. '|' .. (owed and 1 or 0) .. '|' .. streak .. '|'
          .. seq
        option_id = prize[4] .. '/' .. prize[1]
      end
      local size = #items
      for k, item in ipairs(items) do
        local item_id = claim_id
        if k > 1 then
          item_id = string.sub(claim_id, 1, 30) .. string.format('%02x', k - 1)
        end
        local paid = ''
        if item[4] > 0 then
          paid = take_points(user, lots, item[4])
        end
        local code_expiry = ''
        if item[2] ~= nil then
          take_code(item[2], item[3])
          code_expiry = item[3]
        end
        option_taken[item[1]] = option_taken[item[1]] + 1
        redis.call('HINCRBY', KEYS[2], 'taken:' .. item[1], 1)
        local fields = {'c', item_id, 'r', request_id, 'u', user, 'b', benefit_id,
          'o', item[1], 'p', period, 't', tier, 'a', account, 'ts', now_ms, 'x', code_expiry}
        if item[4] > 0 then
          fields[#fields + 1] = 'pp'
          fields[#fields + 1] = item[4]
          fields[#fields + 1] = 'pl'
          fields[#fields + 1] = paid
        end
        if size > 1 then
          for _, f in ipairs({'g', claim_id, 'gi', k - 1, 'gn', size}) do
            fields[#fields + 1] = f
          end
        end
        if draw_fields ~= nil then
          for _, f in ipairs(draw_fields) do
            fields[#fields + 1] = f
          end
        end
        local entry = redis.call('XADD', KEYS[5], '*', unpack(fields))
        redis.call('HSET', KEYS[7], item_id, entry)
      end
      redis.call('HSET', KEYS[4], idem_field,
        claim_id .. '|' .. option_id .. '|' .. tier .. '|' .. now_ms)
      accepted = accepted + 1
      code, extra = 'ok', now_ms
    end
  end
  if code ~= 'ok' then
    detail = ''
  end
  if code ~= 'ok' and code ~= 'dup' then
    claim_id = ''
  end
  out[#out + 1] = code
  out[#out + 1] = claim_id
  out[#out + 1] = option_id
  out[#out + 1] = left
  out[#out + 1] = tier
  out[#out + 1] = extra
  out[#out + 1] = detail
end

if accepted > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
  if pity_after > 0 then
    redis.call('EXPIRE', KEYS[14], ttl)
  end
end
return out
