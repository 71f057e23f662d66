-- set_states.lua: the coordinator sets some of a user's job states, waiting -> queued
-- (RedisStore::set_job_states), leaving out a job its pass no longer has.
--
-- KEYS[1] P:jobs:<batch>
-- ARGV[1] the user; ARGV[2..] job id, state (JSON) pairs
-- Returns the number of states set.
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local map, n = cjson.decode(v), 0
for i = 2, #ARGV, 2 do
  if map[ARGV[i]] then map[ARGV[i]] = cjson.decode(ARGV[i + 1]); n = n + 1 end
end
if n > 0 then redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(map)) end
return n
