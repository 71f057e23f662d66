-- slots_set.lua: a process sets its connection leases (renewals and releases, slots.rs).
--
-- KEYS[1] P:slots
-- ARGV[1] the process; ARGV[2] the time to live in ms; ARGV[3..] field, count pairs
-- (a count of 0 gives the lease back)
-- Returns 1.
local me, ttl = ARGV[1], tonumber(ARGV[2])
local now = server_now()
local fields = {}
for i = 3, #ARGV, 2 do table.insert(fields, ARGV[i]) end
local held, existed = leases_load(KEYS[1], fields, now)
for i = 3, #ARGV, 2 do
  local n = tonumber(ARGV[i + 1])
  if n > 0 then held[ARGV[i]][me] = {n, now + ttl} else held[ARGV[i]][me] = nil end
end
leases_store(KEYS[1], held, existed)
return 1
