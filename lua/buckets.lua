-- buckets.lua: move stock between the buckets of a sharded benefit (domain/shards.py).
--
-- Each bucket's period stock hash (KEYS[2]) counts, besides claim.lua's fields, the units it
-- lent to each other bucket (out:<j>) and received from each (in:<j>), both cumulative, and
-- their balance (moved = sum of in - sum of out) which claim.lua adds to what is left:
-- left = cfg stock + added + moved - taken.
-- A move is two calls on two slots: "lend" on the donor raises out:<r> and returns it; then
-- "credit" on the receiver raises in:<j> to that cumulative figure (never lowering it), so a
-- credit repeated, reordered or made late by anyone (the borrower, a later borrower that sees
-- the gap, recovery) counts each unit once. Units lent and not yet credited are "in flight":
-- out:<r> on the donor above in:<j> on the receiver.
--
-- KEYS[1] the bucket's cfg hash   KEYS[2] its stock hash for the period   KEYS[3] its live marker
-- ARGV[1] "lend" or "credit"   ARGV[2] K, the benefit's buckets   ARGV[3] ttl of the stock hash
-- ARGV[4] hold: ms a bucket keeps units it was just credited (it lends none meanwhile), so
--         that the claims that borrowed them take them rather than see them borrowed away
-- lend:   ARGV[5] the receiving bucket r   ARGV[6] units wanted   ARGV[7] step: the most lent
--         beyond the units wanted. Lends min(left, max(wanted, min(step, left / K))).
-- credit: then pairs (donor j, cumulative units j has lent to this bucket).
-- Returns {"unverified"} while recovery has not verified the bucket on this server,
-- {"missing"} without a configuration, else {"ok", lent, left, held, out:0..out:K-1,
-- in:0..in:K-1} where held is 1 when the bucket kept units it could otherwise have lent.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[3]) ~= run_id then
  return {'unverified'}
end
local stock = redis.call('HGET', KEYS[1], 'stock')
if not stock then
  return {'missing'}
end
local k = tonumber(ARGV[2])
local counters = redis.call('HMGET', KEYS[2], 'added', 'taken', 'moved')
local moved = tonumber(counters[3] or '0')
local left = tonumber(stock) + tonumber(counters[1] or '0') + moved - tonumber(counters[2] or '0')
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lent, held = 0, 0
if ARGV[1] == 'lend' then
  if left > 0 and now_ms < tonumber(redis.call('HGET', KEYS[2], 'held') or '0') then
    held = 1
  elseif left > 0 then
    local step = math.min(tonumber(ARGV[7]), math.floor(left / k))
    lent = math.min(left, math.max(tonumber(ARGV[6]), step))
    redis.call('HINCRBY', KEYS[2], 'out:' .. ARGV[5], lent)
    redis.call('HINCRBY', KEYS[2], 'moved', -lent)
    left = left - lent
  end
else
  for i = 5, #ARGV, 2 do
    local field = 'in:' .. ARGV[i]
    local had = tonumber(redis.call('HGET', KEYS[2], field) or '0')
    local now = tonumber(ARGV[i + 1])
    if now > had then
      redis.call('HSET', KEYS[2], field, now)
      redis.call('HINCRBY', KEYS[2], 'moved', now - had)
      left = left + now - had
      redis.call('HSET', KEYS[2], 'held', now_ms + tonumber(ARGV[4]))
    end
  end
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
local out = {'ok', lent, left, held}
for _, side in ipairs({'out:', 'in:'}) do
  for j = 0, k - 1 do
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[2], side .. j) or '0')
  end
end
return out
