-- replace_secret.lua: a rotated refresh token replaces the sealed secret it came from
-- (RedisStore::replace_user_secret), only if that secret is still the stored one.
--
-- KEYS[1] P:user:<batch>:<user> (a JSON record)
-- ARGV[1] the record's field; ARGV[2] the old sealed value; ARGV[3] the new one
-- Returns 1 when replaced, 0 when the record is gone or holds another value.
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if record[ARGV[1]] ~= ARGV[2] then return 0 end
record[ARGV[1]] = ARGV[3]
redis.call('SET', KEYS[1], cjson.encode(record))
return 1
