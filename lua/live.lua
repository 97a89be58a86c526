-- live.lua: the marker saying a benefit's counters (or a period's tiers) are complete on
-- this very server process. Its value is the server's run id, which a restarted, replaced or
-- promoted server does not share, so a copy of the marker (an RDB, a replica's full sync)
-- never vouches for another server's data.
--
-- KEYS[1] the marker
-- ARGV[1] "mark" (set it to this server's run id), "check" (1 when it names this server,
--         else 0) or "clear"
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local mode = ARGV[1]
if mode == 'mark' then
  redis.call('SET', KEYS[1], run_id)
  return 1
elseif mode == 'clear' then
  return redis.call('DEL', KEYS[1])
end
if redis.call('GET', KEYS[1]) == run_id then
  return 1
end
return 0
