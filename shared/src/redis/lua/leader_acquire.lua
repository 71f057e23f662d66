-- leader_acquire.lua: a coordinator takes the leadership if free, or keeps it
-- (RedisStore::acquire_leader).
--
-- KEYS[1] P:leader
-- ARGV[1] the holder; ARGV[2] the time to live in ms
-- Returns 1 when the holder leads now, else 0.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
