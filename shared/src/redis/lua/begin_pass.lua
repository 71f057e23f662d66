-- begin_pass.lua: the coordinator begins users' passes (RedisStore::begin_passes).
-- Each user's pass record, job states and specs replace the old ones (a field of each
-- hash per user), and the user's recheck time is set. Four commands, whatever the
-- number of users.
--
-- KEYS[1] P:pass:<batch>   KEYS[2] P:due:<batch>   KEYS[3] P:jobs:<batch>   KEYS[4] P:specs:<batch>
-- ARGV[1] a BeginPassRequest (JSON, redis/scripts.rs):
--   {recheck: due score text, users: [{user, record, states, specs}]} (the three values
--   are the JSON texts stored)
-- Returns the number of users.
local req = cjson.decode(ARGV[1])
local records, states, specs, due = {}, {}, {}, {}
for _, u in ipairs(req.users) do
  table.insert(records, u.user); table.insert(records, u.record)
  table.insert(states, u.user); table.insert(states, u.states)
  table.insert(specs, u.user); table.insert(specs, u.specs)
  table.insert(due, req.recheck); table.insert(due, u.user)
end
redis.call('HSET', KEYS[1], unpack(records))
redis.call('HSET', KEYS[3], unpack(states))
redis.call('HSET', KEYS[4], unpack(specs))
redis.call('ZADD', KEYS[2], unpack(due))
return #due / 2
