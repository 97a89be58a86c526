-- push_config.lua: replace a benefit's configuration hash unless Redis already holds a
-- newer (or the same) version, so racing pushes can never roll the configuration back.
-- (The catalogue set, which lives outside the benefit's hash slot, is added to by the
-- caller afterwards: on a cluster one script touches one slot.)
--
-- KEYS[1] cfg hash
-- ARGV[1] version    ARGV[2] benefit_id    then field, value pairs
-- Returns 1 when written, 0 when Redis already had this version or a newer one.
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
