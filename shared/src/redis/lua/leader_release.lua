-- leader_release.lua: the leader lets the lease go if it is still its own
-- (RedisStore::release_leader).
--
-- KEYS[1] P:leader
-- ARGV[1] the holder
-- Returns 1.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
