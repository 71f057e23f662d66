-- slots_take.lua: a process asks for connection leases (SharedSlots' writer, slots.rs).
-- Asks, in order, each for this process's lease on an account to grow to `want`
-- connections (and, when `host_min` is not 0, on the host to between `host_min` and
-- `host_max`) if the other processes' leases leave room under the caps and the account
-- is not paused. The caps are the endpoint's (SharedSlots::caps).
--
-- KEYS[1] P:slots
-- ARGV[1] a TakeRequest (JSON, redis/scripts.rs):
--   {process, ttl_ms, asks: [{account, want, account_cap, host ('' for none), host_min,
--    host_max, host_cap}]}
-- Returns per ask two values: 'ok' and the host lease, 'paused' and the ms left, or
-- which cap is full ('account', 'host') and 0.
local req = cjson.decode(ARGV[1])
local me = req.process
local now = server_now()
local fields, seen = {}, {}
for _, ask in ipairs(req.asks) do
  for _, f in ipairs({ask.account, ask.host}) do
    if f ~= '' and not seen[f] then
      seen[f] = true
      table.insert(fields, f)
    end
  end
end
local held, existed = leases_load(KEYS[1], fields, now)
local expiry = now + req.ttl_ms
local out = {}
for _, ask in ipairs(req.asks) do
  local account = held[ask.account]
  local verdict, number = 'ok', 0
  if account['!pause'] then
    verdict, number = 'paused', account['!pause'][2] - now
  elseif leases_others(account, me) + ask.want > ask.account_cap then
    verdict = 'account'
  elseif ask.host_min > 0 then
    local host = held[ask.host]
    local room = ask.host_cap - leases_others(host, me)
    if room < ask.host_min then
      verdict = 'host'
    else
      number = math.min(room, ask.host_max)
      host[me] = {number, expiry}
    end
  end
  if verdict == 'ok' then account[me] = {ask.want, expiry} end
  table.insert(out, verdict)
  table.insert(out, int(number))
end
leases_store(KEYS[1], held, existed)
return out
