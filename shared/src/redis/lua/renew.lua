-- renew.lua: a worker renews the claims of several of its runs at once
-- (RedisStore::renew_runs; the worker's keepers tick together).
-- Applies each run's progress batch, once per sequence number (the last one applied
-- is the run's field of the worker's runs hash), and the checkpoints it saved since
-- its last call. A run that no longer holds every one of its claims has nothing
-- applied; the others go on. Checks every claim before writing anything, and reads and
-- writes each hash once whatever the number of runs.
--
-- KEYS[1..]: every key the call names, once each; the request refers to them by index
-- (the runs' P:claims, P:intent:<batch> and P:progress:<batch>, the worker's
-- P:runs:<worker>, the checkpoints).
-- ARGV[1] a RenewRequest (JSON, redis/scripts.rs):
--   {ttl_ms, runs_key, forget: [holder of a finished run],
--    runs: [{holder, claims, intent, progress, seq, fields: [claim field's ARGV index],
--            users: [{user, counts: [[name, delta]]}], checkpoints: [[key, value]]}]}
-- ARGV[2..] the claim fields (bytes: a folder's name need not be UTF-8)
-- Returns per run {'held', each user's intent} or {'lost'}.
local req = cjson.decode(ARGV[1])
local runs_key = KEYS[req.runs_key]
local now = server_now()
local runs = req.runs
-- Values of fields of each hash, read once per hash: `pick(run)` lists {key, field}.
local function read_grouped(pick)
  local groups = {}
  for _, run in ipairs(runs) do
    for _, item in ipairs(pick(run)) do
      local g = groups[item[1]]
      if not g then g = {fields = {}, index = {}}; groups[item[1]] = g end
      if not g.index[item[2]] then
        table.insert(g.fields, item[2]); g.index[item[2]] = #g.fields
      end
    end
  end
  for key, g in pairs(groups) do
    if #g.fields > 0 then g.got = redis.call('HMGET', key, unpack(g.fields)) end
  end
  return function(key, field) local g = groups[key]; return g.got[g.index[field]] end
end
for _, run in ipairs(runs) do
  run.claims, run.intent, run.progress = KEYS[run.claims], KEYS[run.intent], KEYS[run.progress]
  for i, f in ipairs(run.fields) do run.fields[i] = ARGV[f] end
end
-- 1. The claims: a run holds them all, or it is lost.
local claim_of = read_grouped(function(run)
  local items = {}
  for _, f in ipairs(run.fields) do table.insert(items, {run.claims, f}) end
  return items
end)
local renew = {}
for _, run in ipairs(runs) do
  run.ok = true
  for _, f in ipairs(run.fields) do
    local who, expiry = holder_of(claim_of(run.claims, f))
    if who ~= run.holder or expiry <= now then run.ok = false; break end
  end
  if run.ok and #run.fields > 0 then
    local kv = renew[run.claims] or {}
    renew[run.claims] = kv
    local value = run.holder .. ' ' .. int(now + req.ttl_ms)
    for _, f in ipairs(run.fields) do table.insert(kv, f); table.insert(kv, value) end
  end
end
for key, kv in pairs(renew) do redis.call('HSET', key, unpack(kv)) end
-- 2. Each held run's batch counts if its number is new.
local seen = {}
if #runs > 0 then
  local holders = {}
  for r, run in ipairs(runs) do holders[r] = run.holder end
  local last = redis.call('HMGET', runs_key, unpack(holders))
  for r, run in ipairs(runs) do
    run.fresh = run.ok and run.seq > tonumber(last[r] or '0')
    if run.fresh then table.insert(seen, run.holder); table.insert(seen, int(run.seq)) end
  end
end
if #seen > 0 then
  redis.call('HSET', runs_key, unpack(seen))
  redis.call('PEXPIRE', runs_key, 86400000)
end
if #req.forget > 0 then redis.call('HDEL', runs_key, unpack(req.forget)) end
-- 3. Counters: each user's value read and written once, whatever the runs adding to it.
local counters_of = read_grouped(function(run)
  local items = {}
  if run.fresh then
    for _, u in ipairs(run.users) do
      if #u.counts > 0 then table.insert(items, {run.progress, u.user}) end
    end
  end
  return items
end)
local counters = {}
for _, run in ipairs(runs) do
  if run.fresh then
    for _, u in ipairs(run.users) do
      if #u.counts > 0 then
        local by_user = counters[run.progress] or {}
        counters[run.progress] = by_user
        local text = by_user[u.user]
        if text == nil then text = counters_of(run.progress, u.user) end
        by_user[u.user] = add_counts(text, u.counts)
      end
    end
  end
end
for key, by_user in pairs(counters) do
  local kv = {}
  for name, text in pairs(by_user) do table.insert(kv, name); table.insert(kv, text) end
  redis.call('HSET', key, unpack(kv))
end
-- 4. The held runs' checkpoints.
local cps = {}
for _, run in ipairs(runs) do
  if run.ok then
    for _, c in ipairs(run.checkpoints) do table.insert(cps, KEYS[c[1]]); table.insert(cps, c[2]) end
  end
end
if #cps > 0 then redis.call('MSET', unpack(cps)) end
-- 5. The users' intents, for the held runs.
local intent_of_user = read_grouped(function(run)
  local items = {}
  if run.ok then
    for _, u in ipairs(run.users) do table.insert(items, {run.intent, u.user}) end
  end
  return items
end)
local out = {}
for r, run in ipairs(runs) do
  if run.ok then
    local o = {'held'}
    for u, entry in ipairs(run.users) do o[u + 1] = intent_of(intent_of_user(run.intent, entry.user)) end
    out[r] = o
  else
    out[r] = {'lost'}
  end
end
return out
