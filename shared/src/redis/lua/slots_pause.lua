-- slots_pause.lua: an account is paused for every process (a server's throttling,
-- slots.rs); a longer pause already set stays.
--
-- KEYS[1] P:slots
-- ARGV[1] the account's field; ARGV[2] the pause in ms
-- Returns 1.
local now = server_now()
local held, existed = leases_load(KEYS[1], {ARGV[1]}, now)
local h = held[ARGV[1]]
local until_ = now + tonumber(ARGV[2])
if not h['!pause'] or h['!pause'][2] < until_ then h['!pause'] = {0, until_} end
leases_store(KEYS[1], held, existed)
return 1
