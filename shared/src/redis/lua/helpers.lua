-- helpers.lua: prepended to every script of redis/scripts.rs. Functions only: nothing
-- here runs a command until a script calls it.

-- Redis's clock in milliseconds: one clock for every process, whichever machine it is on.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A whole number as text, without Lua's exponent (1.7e+12).
local function int(n) return string.format('%.0f', n) end

-- ---- claims: a field of P:claims, `<user>\t<target folder>` -> `<holder> <expiry ms>` ----

-- A claim's holder and expiry; nil, 0 for no claim.
local function holder_of(value)
  if not value then return nil, 0 end
  local sp = string.find(value, ' ', 1, true)
  return string.sub(value, 1, sp - 1), tonumber(string.sub(value, sp + 1))
end

-- A user's intent as stored (a field of P:intent:<batch>); none is 'idle'.
local function intent_of(v) if v then return v end return 'idle' end

-- A user's job states (a field of P:jobs:<batch>, a JSON object id -> state); nil for none.
local function decode_states(v) if v then return cjson.decode(v) end return nil end

-- A user's counters (`name value name value ...`, a field of P:progress:<batch>) plus
-- `deltas`, a list of {name, delta}: the new text. Kept as text, not JSON, because Lua's
-- JSON encoder keeps only 14 digits.
local function add_counts(text, deltas)
  local c, order = {}, {}
  for k, v in string.gmatch(text or '', '(%S+) (%S+)') do
    if not c[k] then table.insert(order, k) end
    c[k] = tonumber(v)
  end
  for _, d in ipairs(deltas) do
    local k = d[1]
    if not c[k] then c[k] = 0; table.insert(order, k) end
    c[k] = c[k] + d[2]
  end
  local out = {}
  for _, k in ipairs(order) do table.insert(out, k .. ' ' .. int(c[k])) end
  return table.concat(out, ' ')
end

-- ---- connection leases: a field of P:slots per account or host ----
-- A field holds `holder count expiry,holder count expiry,...`; the holder `!pause`
-- marks a paused account until its expiry.

-- A field's live entries at `now`: holder -> {count, expiry}.
local function leases_parse(v, now)
  local h = {}
  if v then
    for name, n, exp in string.gmatch(v, '([^ ,]+) (%d+) (%d+)') do
      if tonumber(exp) > now then h[name] = {tonumber(n), tonumber(exp)} end
    end
  end
  return h
end

-- Connections leased by every holder but `me`.
local function leases_others(h, me)
  local sum = 0
  for name, e in pairs(h) do
    if name ~= me and name ~= '!pause' then sum = sum + e[1] end
  end
  return sum
end

-- Reads `fields` of hash `key` once: field -> entries, and which fields exist.
local function leases_load(key, fields, now)
  local held, existed = {}, {}
  if #fields > 0 then
    local got = redis.call('HMGET', key, unpack(fields))
    for i, f in ipairs(fields) do
      held[f] = leases_parse(got[i] or nil, now)
      if got[i] then existed[f] = true end
    end
  end
  return held, existed
end

-- Writes them back once: a field left empty is deleted.
local function leases_store(key, held, existed)
  local set, del = {}, {}
  for f, h in pairs(held) do
    local out = {}
    for name, e in pairs(h) do
      table.insert(out, name .. ' ' .. e[1] .. ' ' .. int(e[2]))
    end
    if #out > 0 then
      table.sort(out)
      table.insert(set, f)
      table.insert(set, table.concat(out, ','))
    elseif existed[f] then
      table.insert(del, f)
    end
  end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if #del > 0 then redis.call('HDEL', key, unpack(del)) end
end
