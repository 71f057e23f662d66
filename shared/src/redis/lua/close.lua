-- close.lua: a closing user becomes closed (RedisStore::mark_closed), only if the admin
-- has not changed the intent meanwhile.
--
-- KEYS[1] P:intent:<batch>
-- ARGV[1] the user
-- Returns 1 when closed, 0 when the intent was no longer 'closing'.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'closing' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'closed')
return 1
