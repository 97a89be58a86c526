-- room.lua: a benefit's waiting room for one period, on the Redis server's clock.
--
-- KEYS[1] cfg hash      (stock per period, paused)
-- KEYS[2] stock hash    (added, taken: the period's counters claim.lua keeps)
-- KEYS[3] room hash     a = members admitted so far (a real number), at = when a was last
--                       advanced (unix ms), seq = late arrivals so far
-- KEYS[4] queue zset    ticket id scored by place: a pre-queue ticket by its shuffle key
--                       (below 2^48), a late one by 2^48 + its arrival number
-- KEYS[5] tickets hash  member id -> ticket id
-- ARGV[1] op: "join" (a ticket for the member, the one they hold if any) or "look" (their
--         ticket if any; "" for none)
-- ARGV[2] member id        ARGV[3] a new ticket id (used when the member has none)
-- ARGV[4] the new ticket's shuffle key   ARGV[5] opens_ms   ARGV[6] pre-queue opens (ms)
-- ARGV[7] closes_ms (0: none)   ARGV[8] admit per second   ARGV[9] key TTL (s)
--
-- The admission frontier moves at ARGV[8] a second from the opening, computed lazily from
-- the time elapsed at each call; it stands still while no stock is left (the room is closed)
-- or the benefit is paused, and moves again after a top-up or the resume. It never runs more than one second's worth of admissions
-- past the end of the queue, so an empty room does not bank admissions for a later crowd.
--
-- Returns {phase, ticket id or "", rank (0-based, -1: none), queue size, admitted (whole),
--          stock left, now_ms, new (1 when this call made the ticket)}
-- phase: "early" (before the pre-queue), "prequeue", "open", "paused", "sold_out", "closed"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opens = tonumber(ARGV[5])
local prequeue = tonumber(ARGV[6])
local closes = tonumber(ARGV[7])
local rate = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])

local cfg = redis.call('HMGET', KEYS[1], 'stock', 'paused')
local stock = tonumber(cfg[1] or '0')
local counters = redis.call('HMGET', KEYS[2], 'added', 'taken')
local left = stock + tonumber(counters[1] or '0') - tonumber(counters[2] or '0')

local room = redis.call('HMGET', KEYS[3], 'a', 'at')
local admitted = tonumber(room[1] or '0')
local at = tonumber(room[2] or '0')
local size = redis.call('ZCARD', KEYS[4])

local phase
if closes > 0 and now >= closes then
  phase = 'closed'
elseif now < prequeue then
  phase = 'early'
elseif now < opens then
  phase = 'prequeue'
elseif left <= 0 then
  phase = 'sold_out'
elseif cfg[2] == '1' then
  phase = 'paused'
else
  phase = 'open'
end

if now >= opens then
  local from = math.max(at, opens)
  if phase == 'open' and now > from then
    admitted = math.min(admitted + rate * (now - from) / 1000, size + rate)
    admitted = math.max(admitted, tonumber(room[1] or '0'))  -- never backwards
  end
  if now > at then
    redis.call('HSET', KEYS[3], 'a', tostring(admitted), 'at', now)
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end

local user = ARGV[2]
local ticket = ''
local made = 0
if user ~= '' then
  ticket = redis.call('HGET', KEYS[5], user) or ''
  local giving = phase == 'prequeue' or phase == 'open' or phase == 'paused'
  if ticket == '' and ARGV[1] == 'join' and giving then
    ticket = ARGV[3]
    local score
    if phase == 'prequeue' then
      score = ARGV[4]
    else
      score = 281474976710656 + redis.call('HINCRBY', KEYS[3], 'seq', 1)
      redis.call('EXPIRE', KEYS[3], ttl)
    end
    redis.call('ZADD', KEYS[4], score, ticket)
    redis.call('HSET', KEYS[5], user, ticket)
    redis.call('EXPIRE', KEYS[4], ttl)
    redis.call('EXPIRE', KEYS[5], ttl)
    size = size + 1
    made = 1
  end
end

local rank = -1
if ticket ~= '' then
  rank = redis.call('ZRANK', KEYS[4], ticket) or -1
end
return {phase, ticket, rank, size, math.floor(admitted), left, now, made}
