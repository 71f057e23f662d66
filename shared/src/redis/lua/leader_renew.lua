-- leader_renew.lua: the leader renews its lease if it is still its own
-- (RedisStore::renew_leader).
--
-- KEYS[1] P:leader
-- ARGV[1] the holder; ARGV[2] the time to live in ms
-- Returns 1 when renewed, 0 when another holds it (or nobody).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
