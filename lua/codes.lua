-- codes.lua: free redemption codes of a benefit's card-key options, by expiry bucket.
--
-- KEYS[1] codes  hash  <option_id> = codes that never expire, <option_id>|<expiry_ms> = codes
--                      expiring then
-- KEYS[2] codexp zset  <option_id>|<expiry_ms> scored by expiry_ms
-- KEYS[3] live   run id of the server whose counters recovery verified
-- ARGV[1] mode: "add" (codes loaded: add to the counts, only while the benefit is live, else
--         recovery will count them) or "replace" (recovery: the whole pool state)
-- then field, count, expiry_ms (0: never) triples
-- Returns the number of codes counted, or -1 when not live (add mode; nothing changed).
local mode = ARGV[1]
if mode == 'add' then
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  if redis.call('GET', KEYS[3]) ~= run_id then
    return -1
  end
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local counted = 0
for i = 2, #ARGV, 3 do
  local field, count, expiry = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if count > 0 and (expiry == 0 or expiry > now_ms) then
    redis.call('HINCRBY', KEYS[1], field, count)
    if expiry > 0 then
      redis.call('ZADD', KEYS[2], expiry, field)
    end
    counted = counted + count
  end
end
return counted
