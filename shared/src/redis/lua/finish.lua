-- finish.lua: a worker ends a run (RedisStore::finish_claims, finish_user_claims).
-- Writes its last progress batch (once per sequence number), the jobs' new states
-- (each only while the run still holds that job's claim, and unless a newer pass
-- replaced the job meanwhile), its checkpoints (only while every claim is still this
-- run's: else another run owns the folders now), releases the claims and marks the
-- users for the coordinator's dispatcher. A run that lost a claim writes nothing over
-- the state of the run that took the folder over (or that finished it since); a state
-- left behind as queued or running is repaired by the coordinator's recheck, which
-- publishes the job again.
--
-- KEYS[1] P:intent:<batch>   KEYS[2] P:claims   KEYS[3] the run's sequence key
-- KEYS[4] P:dispatch   KEYS[5] P:jobs:<batch>   KEYS[6] P:progress:<batch>
-- KEYS[7..] the checkpoints to write
-- ARGV[1] a FinishRequest (JSON, redis/scripts.rs):
--   {holder, seq, users: [user], fields: [each job's claim field, by ARGV index],
--    per_user: [{member: dispatch member, states: [{id, field, state?}],
--                counts: [[name, delta]]}],     (in the users' order; no state: keep it)
--    checkpoints: [value, one per KEYS[7..]],
--    linger_ms, keep: [claim field held linger_ms longer: the jobs handed back]}
--   (a state's field and keep's are ARGV indexes too)
-- ARGV[2..] the claim fields (bytes: a folder's name need not be UTF-8)
-- Returns 1.
local req = cjson.decode(ARGV[1])
local users, holder = req.users, req.holder
for i, f in ipairs(req.fields) do req.fields[i] = ARGV[f] end
for i, f in ipairs(req.keep) do req.keep[i] = ARGV[f] end
for _, part in ipairs(req.per_user) do
  for _, s in ipairs(part.states) do s.field = ARGV[s.field] end
end
local ours, all_ours, mine = {}, true, {}
if #req.fields > 0 then
  local held = redis.call('HMGET', KEYS[2], unpack(req.fields))
  for f, field in ipairs(req.fields) do
    if holder_of(held[f]) == holder then
      table.insert(ours, field); mine[field] = true
    else
      all_ours = false
    end
  end
end
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local fresh = req.seq > last
if fresh then redis.call('SET', KEYS[3], int(req.seq), 'EX', 86400) end
local members, stored = {}, nil
local states_kv, counters_kv = {}, {}
local counted = false
for u, part in ipairs(req.per_user) do
  members[u] = part.member
  if #part.states > 0 then
    if not stored then stored = redis.call('HMGET', KEYS[5], unpack(users)) end
    local map = decode_states(stored[u])
    local changed = false
    for _, s in ipairs(part.states) do
      -- a job a newer pass replaced stays replaced; a claim lost is another's job now
      if map and map[s.id] and s.state and mine[s.field] then
        map[s.id] = s.state; changed = true
      end
    end
    if changed then
      table.insert(states_kv, users[u]); table.insert(states_kv, cjson.encode(map))
    end
  end
  if fresh and #part.counts > 0 then counted = true end
end
if #states_kv > 0 then redis.call('HSET', KEYS[5], unpack(states_kv)) end
if counted then
  local old = redis.call('HMGET', KEYS[6], unpack(users))
  for u, part in ipairs(req.per_user) do
    if #part.counts > 0 then
      table.insert(counters_kv, users[u]); table.insert(counters_kv, add_counts(old[u], part.counts))
    end
  end
  redis.call('HSET', KEYS[6], unpack(counters_kv))
end
local nc = #KEYS - 6
if nc > 0 and all_ours then
  local kv = {}
  for c = 1, nc do kv[2 * c - 1] = KEYS[6 + c]; kv[2 * c] = req.checkpoints[c] end
  redis.call('MSET', unpack(kv))
end
-- A job handed back keeps its folder a while: what its run had sent may still be on
-- its way to the target, and the next run must look after it has landed.
local keep = {}
for _, f in ipairs(req.keep) do keep[f] = true end
local release, hold = {}, {}
local until_ms = int(server_now() + req.linger_ms)
for _, f in ipairs(ours) do
  if keep[f] then
    table.insert(hold, f); table.insert(hold, holder .. ' ' .. until_ms)
  else
    table.insert(release, f)
  end
end
if #release > 0 then redis.call('HDEL', KEYS[2], unpack(release)) end
if #hold > 0 then redis.call('HSET', KEYS[2], unpack(hold)) end
redis.call('SADD', KEYS[4], unpack(members))
return 1
