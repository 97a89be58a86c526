-- restore.lua: write counters rebuilt from PostgreSQL (and the stream) into a hash.
--
-- KEYS[1] a per-period hash (stock, used or idem)
-- ARGV[1] mode: "replace" deletes the hash first (when ARGV[3] is "1": the first chunk)
--               and writes every field; "setnx" writes a field only when it is absent;
--               "max" writes a field only when the given number is larger
-- ARGV[2] ttl in seconds (0: leave the ttl alone)
-- ARGV[3] "1" to delete the hash before writing (replace mode)
-- ARGV[4] comma-separated fields that keep the larger of the stored and the given value
--         (stock top-ups: a top-up recorded meanwhile must not be undone)
-- then field, value pairs
-- Returns the number of fields written.
local mode = ARGV[1]
local ttl = tonumber(ARGV[2])
local keep_max = {}
for name in string.gmatch(ARGV[4], '[^,]+') do
  keep_max[name] = tonumber(redis.call('HGET', KEYS[1], name) or '0')
end
if mode == 'replace' and ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
end
local written = 0
for i = 5, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if keep_max[field] ~= nil and keep_max[field] > tonumber(value) then
    value = keep_max[field]
  end
  if mode == 'replace' then
    redis.call('HSET', KEYS[1], field, value)
    written = written + 1
  elseif mode == 'max' then
    if tonumber(value) > tonumber(redis.call('HGET', KEYS[1], field) or '-1') then
      redis.call('HSET', KEYS[1], field, value)
      written = written + 1
    end
  else
    written = written + redis.call('HSETNX', KEYS[1], field, value)
  end
end
if ttl > 0 and written > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return written
