-- schedule_next.lua: the coordinator schedules users' next passes
-- (RedisStore::schedule_next_many) unless the admin asked for one meanwhile (a sync now
-- or start during the pass left the user due already): the sooner time wins. An open
-- pass's recheck time is not the admin's ask, overdue or not: its score ends in .5
-- (recheck_score in control.rs); the admin's and the schedule's are whole
-- milliseconds. Two commands, whatever the number of users.
--
-- KEYS[1] P:due:<batch>
-- ARGV[1] now ms; ARGV[2] the next pass's ms; ARGV[3..] the users
-- Returns the number of users scheduled.
local users = {unpack(ARGV, 3)}
local at = redis.call('ZMSCORE', KEYS[1], unpack(users))
local kv = {}
for i, user in ipairs(users) do
  local t = at[i] and tonumber(at[i])
  if not (t and t <= tonumber(ARGV[1]) and math.floor(t) == t) then
    table.insert(kv, ARGV[2])
    table.insert(kv, user)
  end
end
if #kv > 0 then redis.call('ZADD', KEYS[1], unpack(kv)) end
return #kv / 2
