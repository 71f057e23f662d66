-- claim.lua: a worker claims a delivery's jobs (RedisStore::claim_jobs).
-- Grants each job's target folder to this run unless the job is finished, superseded
-- by a newer pass, or its user stopped; or another run holds the folder. Then reads
-- the jobs' checkpoints.
--
-- KEYS[1] P:intent:<batch>   KEYS[2] P:claims   KEYS[3] P:jobs:<batch>
-- KEYS[4..] each job's checkpoint, in the jobs' order
-- ARGV[1] a ClaimRequest (JSON, redis/scripts.rs):
--   {holder, ttl_ms, users: [user], running: <the running JobState>,
--    jobs: [{user: index into users, id, field: its claim field's index into ARGV}]}
-- ARGV[2..] the claim fields (bytes: a folder's name need not be UTF-8)
-- Returns {answers, checkpoints}: per job 'granted', 'busy' or 'skip:<why>', and the
-- checkpoints' values (MGET, in the jobs' order).
local req = cjson.decode(ARGV[1])
local users, holder = req.users, req.holder
local now = server_now()
local fields = {}
for j, job in ipairs(req.jobs) do fields[j] = ARGV[job.field] end
local intents = redis.call('HMGET', KEYS[1], unpack(users))
local held = redis.call('HMGET', KEYS[2], unpack(fields))
local stored = redis.call('HMGET', KEYS[3], unpack(users))
local maps = {}
for u = 1, #users do maps[u] = decode_states(stored[u]) end
local answers, grant, changed = {}, {}, {}
local value = holder .. ' ' .. int(now + req.ttl_ms)
for j, job in ipairs(req.jobs) do
  local u = job.user
  local intent = intents[u]
  local state = maps[u] and maps[u][job.id]
  if not state then
    answers[j] = 'skip:superseded by a newer pass'
  else
    local s = state['state']
    local who, expiry = holder_of(held[j])
    if s == 'done' or s == 'failed' then
      answers[j] = 'skip:already ' .. s
    elseif intent == 'stopped' or intent == 'closed' or intent == 'idle' then
      answers[j] = 'skip:the user is ' .. intent
    elseif who and who ~= holder and expiry > now then
      answers[j] = 'busy'
    else
      answers[j] = 'granted'
      table.insert(grant, fields[j])
      table.insert(grant, value)
      maps[u][job.id] = req.running
      changed[u] = true
    end
  end
end
if #grant > 0 then redis.call('HSET', KEYS[2], unpack(grant)) end
local kv = {}
for u = 1, #users do
  if changed[u] then table.insert(kv, users[u]); table.insert(kv, cjson.encode(maps[u])) end
end
if #kv > 0 then redis.call('HSET', KEYS[3], unpack(kv)) end
local cps = {}
if #KEYS > 3 then cps = redis.call('MGET', unpack(KEYS, 4)) end
return {answers, cps}
