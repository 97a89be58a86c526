-- restore.lua: merge counters rebuilt from PostgreSQL into a hash without ever lowering them.
--
-- KEYS[1] a per-period hash (stock, used or idem)
-- ARGV[1] mode: "max" keeps the larger of the stored and the given number,
--               "setnx" writes a field only when it is absent
-- ARGV[2] ttl in seconds (0: leave the ttl alone)
-- then field, value pairs
-- Returns the number of fields written.
local mode = ARGV[1]
local ttl = tonumber(ARGV[2])
local written = 0
for i = 3, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if mode == 'max' then
    local current = tonumber(redis.call('HGET', KEYS[1], field) or '-1')
    if tonumber(value) > current then
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
