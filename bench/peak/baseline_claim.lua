-- Baseline (c) of `./run bench peak`: one claim decided per EVALSHA, no coalescing.
-- A member's retry (same request key) gets its claim back; otherwise one unit is taken
-- while any is left, and the claim is recorded.
-- KEYS[1]: stock hash (field `left`); KEYS[2]: claims hash (request key -> claim id)
-- ARGV[1]: request key (member and request_id); ARGV[2]: the new claim's id
-- Returns {code, claim id, units left}: code 1 accepted, 2 replayed, 0 sold out.
local seen = redis.call('HGET', KEYS[2], ARGV[1])
if seen then
  return {2, seen, tonumber(redis.call('HGET', KEYS[1], 'left') or '0')}
end
local left = tonumber(redis.call('HGET', KEYS[1], 'left') or '0')
if left <= 0 then
  return {0, '', 0}
end
left = redis.call('HINCRBY', KEYS[1], 'left', -1)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, ARGV[2], left}
