//! The cluster's control records in Redis: what the admin asked for, when each user is
//! due, each user's current pass and its jobs, the workers' claims on target folders
//! and the coordinator's leadership. All keys live under the installation's prefix `P`:
//!
//! | key | type | written by | what |
//! |---|---|---|---|
//! | `P:batches` | set | CLI | batch names |
//! | `P:intent:<batch>` | hash user → intent | CLI, coordinator (closing → closed) | Idle, Active, Stopped, Closing, Closed |
//! | `P:due:<batch>` | sorted set user → ms | CLI (start, sync now), coordinator | when the user's next pass is due (an open pass's recheck at ms + 0.5: [`recheck_score`]) |
//! | `P:pass:<batch>` | hash user → [`PassRecord`] | coordinator | the current pass and the last sync |
//! | `P:jobs:<batch>` | hash user → JSON object job id → [`JobState`] | coordinator, workers | the current pass's jobs |
//! | `P:specs:<batch>` | hash user → JSON object job id → [`FolderJob`] | coordinator | what to publish |
//! | `P:progress:<batch>` | hash user → counters (`name value name value …`, [`parse_counts`]) | workers | what was copied, summed over all passes |
//! | `P:dispatch` | set of `batch\tuser` | workers | users whose jobs ended since the coordinator looked |
//! | `P:claims` | hash `user\ttarget folder` → `holder expiry-ms` | workers | one writer per target folder, whichever batch the run is of: the same user in two batches writes one mailbox (a dead run's field stays until the folder is claimed again) |
//! | `P:run:<token>` | string, expires | workers | a run's finish, applied (its progress batch number) |
//! | `P:runs:<worker>` | hash run token → number, expires | workers | the last renewal batch applied for each of a worker's runs |
//! | `P:run:<token>:released` | string, expires | workers | the same, for the stopped users' jobs a run recorded early |
//! | `P:slots` | hash account or host → leases | every process | connection leases and pauses ([`crate::redis::slots`]) |
//! | `P:spent:<UTC day>:<account field>` | integer, expires in 2 days | workers | bytes downloaded from the account that day, against its endpoint's daily budget ([`crate::domain::budget`]) |
//! | `P:leader` | string, expires | coordinators | which coordinator schedules |
//!
//! The workers' three calls per delivery (claim, renew with progress and checkpoints,
//! finish) are Lua scripts that take all of a delivery's jobs at once, of one user or
//! several: each is atomic and one round trip, and progress carries a sequence number
//! per run so a replayed batch is never counted twice. The renewal takes all of a
//! worker's runs at once: its keepers tick together. A user's job states, specs and
//! counters are one field of a per-batch hash, not keys of their own, so that a call
//! for a delivery of sixteen small users reads and writes each hash once (an HMGET and
//! an HSET), not sixteen times; the scripts decode and re-encode a user's value. The
//! coordinator's reads and writes take a group of users at once too (`intents_and_records`, `dispatch_views`,
//! `begin_passes`, `put_pass_records`, `schedule_next_many`).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::domain::job::{Checkpoint, CheckpointKey, FolderJob};
use crate::domain::status::{Intent, JobState};
use crate::error::Error;
use crate::redis::{store_error, RedisStore};

/// Milliseconds since the Unix epoch: the schedule's clock (shared by all processes, so
/// wall time, not monotonic).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The coordinator's record of a user's passes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassRecord {
    /// The current (or last) pass; job ids carry it. 0: never planned.
    pub pass: u64,
    pub planned_ms: u64,
    /// When the current pass ended; `None` while it runs.
    pub finished_ms: Option<u64>,
    /// When a pass last ended with every folder copied and verified.
    pub synced_ms: Option<u64>,
    /// Why the current pass could not be planned.
    pub plan_error: Option<String>,
    /// Planned after the admin pressed Close: when it ends, the user is closed.
    #[serde(default)]
    pub final_pass: bool,
    /// Messages at the source when the pass was planned (for the admin's ETA).
    #[serde(default)]
    pub source_messages: Option<u64>,
    /// The user's `copied` counter when the pass was planned: what the pass has copied
    /// since is the difference (its rate, for the admin).
    #[serde(default)]
    pub copied_at_plan: Option<i64>,
}

/// What a worker's claim on a job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// The job is ours to run until the claim lapses.
    Granted,
    /// Nothing to do: acknowledge the delivery (the reason is logged).
    Skip(String),
    /// Another job writes to the same target folder now: hand this one back for later.
    Busy,
}

/// What renewing a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours; each user's intent as the admin last set it.
    Held(HashMap<String, Intent>),
    /// The claim lapsed and may be someone else's now.
    Lost,
}

/// One run's part of a worker's renewal ([`RedisStore::renew_runs`]).
#[derive(Debug, Clone, Copy)]
pub struct RunRenewal<'a> {
    /// The jobs the run holds (all of one batch).
    pub jobs: &'a [FolderJob],
    pub holder: &'a str,
    /// The progress batch's number (per run, from 1).
    pub seq: u64,
    pub counts: &'a [(String, Counts)],
    pub checkpoints: &'a [(CheckpointKey, Checkpoint)],
}

/// The keys of a script call, each once, by its 1-based index.
#[derive(Default)]
struct Keys {
    names: Vec<Vec<u8>>,
    index: HashMap<Vec<u8>, usize>,
}

impl Keys {
    fn index(&mut self, key: impl Into<Vec<u8>>) -> usize {
        let key = key.into();
        if let Some(i) = self.index.get(&key) {
            return *i;
        }
        self.names.push(key.clone());
        self.index.insert(key, self.names.len());
        self.names.len()
    }
}

/// A user's field of `P:jobs:<batch>` (a JSON object, job id → state), parsed and
/// sorted by id; no field: no jobs.
fn parse_job_states(user: &str, value: Option<&str>) -> Result<Vec<(String, JobState)>, Error> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let all: std::collections::BTreeMap<String, JobState> = serde_json::from_str(value)
        .map_err(|e| Error::Store(format!("job states of {user} are damaged: {e}")))?;
    Ok(all.into_iter().collect())
}

/// A user's field of `P:progress:<batch>`: counter names and values, separated by
/// spaces (`copied 20 copied_bytes 1020630`), which the scripts add to without a JSON
/// round trip (Lua's JSON encoder keeps only 14 digits); no field: no counters.
pub fn parse_counts(
    user: &str,
    value: Option<&str>,
) -> Result<std::collections::BTreeMap<String, i64>, Error> {
    let mut out = std::collections::BTreeMap::new();
    let Some(value) = value else { return Ok(out) };
    let damaged = || Error::Store(format!("counters of {user} are damaged: {value:?}"));
    let mut words = value.split_ascii_whitespace();
    while let Some(name) = words.next() {
        let n: i64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(damaged)?;
        out.insert(name.to_string(), n);
    }
    Ok(out)
}

/// What the coordinator reads to dispatch a user: [`RedisStore::dispatch_views`].
#[derive(Debug, Clone, Default)]
pub struct DispatchView {
    pub record: PassRecord,
    pub intent: Intent,
    pub jobs: Vec<(String, JobState)>,
}

/// A pass to begin ([`RedisStore::begin_passes`]): the user, its pass record, its jobs
/// with their first states.
pub type PassStart<'a> = (&'a str, &'a PassRecord, &'a [(FolderJob, JobState)]);

/// One HMGET's answer: a value or nothing per field asked.
type Column = Vec<Option<String>>;

/// Users read per pipeline by [`RedisStore::user_states`].
const STATUS_CHUNK: usize = 500;

/// What a user's status is made of: the admin's intent, the pass record, when the next
/// pass is due, the current pass's job states and the progress counters.
#[derive(Debug, Clone, Default)]
pub struct UserState {
    pub intent: Intent,
    pub pass: PassRecord,
    pub due_ms: Option<u64>,
    pub jobs: Vec<(String, JobState)>,
    pub progress: std::collections::BTreeMap<String, i64>,
}

/// Counters a job run adds to its user's progress.
pub type Counts = Vec<(&'static str, i64)>;

fn intent_name(intent: Intent) -> &'static str {
    match intent {
        Intent::Idle => "idle",
        Intent::Active => "active",
        Intent::Stopped => "stopped",
        Intent::Closing => "closing",
        Intent::Closed => "closed",
    }
}

fn parse_intent(text: &str) -> Intent {
    match text {
        "active" => Intent::Active,
        "stopped" => Intent::Stopped,
        "closing" => Intent::Closing,
        "closed" => Intent::Closed,
        _ => Intent::Idle,
    }
}

fn json<T: Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|e| Error::Store(e.to_string()))
}

static CLAIM_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{HELPERS}{PROLOGUE}{CLAIM}")));
static RENEW_MANY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{HELPERS}{RENEW_MANY}")));
static FINISH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{HELPERS}{PROLOGUE}{FINISH}")));
static BEGIN_PASS_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(BEGIN_PASS));
static SET_STATES_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SET_STATES));
static SCHEDULE_NEXT_MANY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SCHEDULE_NEXT_MANY));

/// How long a job handed back keeps its folder claimed after its run ends. Its run
/// may have been cut off in the middle of an APPEND group (a drain at a rolling
/// update, the admin's stop): what it had written is in its socket's buffers and the
/// target's, and lands after the run has gone. The next run of the folder must read the
/// target after that, or it copies those messages again (the embedded mode's
/// `SETTLE_AFTER_CRASH` for the same reason). A run that dies leaves its claim to lapse
/// on its own, which takes longer.
pub const HAND_BACK_SETTLE: Duration = Duration::from_secs(10);

/// A job's field in `P:claims`: its user and target folder. Not its batch: two batches
/// of one user copy into one mailbox, and only one run may write a folder of it.
fn claim_field(job: &FolderJob) -> Vec<u8> {
    let mut field = job.user.as_bytes().to_vec();
    field.push(b'\t');
    field.extend_from_slice(job.target_folder.as_bytes());
    field
}

/// The distinct users of some jobs, in order of first appearance.
fn users_of<'a>(jobs: impl Iterator<Item = &'a FolderJob>) -> Vec<&'a str> {
    let mut users: Vec<&str> = Vec::new();
    for job in jobs {
        if !users.contains(&job.user.as_str()) {
            users.push(&job.user);
        }
    }
    users
}

/// The batch of a delivery's jobs, which are all of one batch.
fn one_batch<'a>(mut jobs: impl Iterator<Item = &'a FolderJob>) -> Result<&'a str, Error> {
    let batch = jobs.next().map_or("", |j| j.batch.as_str());
    if jobs.any(|j| j.batch != batch) {
        return Err(Error::Store("a delivery's jobs are of one batch".into()));
    }
    Ok(batch)
}

/// A user's counters, as the scripts read them: a count, then field/delta pairs.
fn push_user_counts(
    call: &mut redis::ScriptInvocation<'_>,
    user: &str,
    counts: &[(String, Counts)],
) {
    let mine: Vec<&(&'static str, i64)> = counts
        .iter()
        .filter(|(u, _)| u == user)
        .flat_map(|(_, c)| c.iter())
        .filter(|(_, d)| *d != 0)
        .collect();
    call.arg(mine.len());
    for (field, delta) in mine {
        call.arg(*field).arg(*delta);
    }
}

// The claim scripts take a delivery's jobs at once (one round trip and a handful of
// commands for a bundle, not a claim per folder). A claim is a field of
// `P:claims`, `<user>\t<target folder>` → `<holder> <expiry ms>`, expiry on
// Redis's clock. They share these helpers: Redis's time, a claim's holder, a user's
// intent, job states and counters.
const HELPERS: &str = r#"
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function holder_of(value)
  if not value then return nil, 0 end
  local sp = string.find(value, ' ', 1, true)
  return string.sub(value, 1, sp - 1), tonumber(string.sub(value, sp + 1))
end
local function intent_of(v) if v then return v end return 'idle' end
-- A user's job states (a field of the jobs hash): decoded, changed, encoded again.
local function decode_states(v) if v then return cjson.decode(v) end return nil end
-- A user's counters (`name value ...`) plus ARGV's n name/delta pairs after `at`.
local function add_counts(text, at, n)
  local c, order = {}, {}
  for k, v in string.gmatch(text or '', '(%S+) (%S+)') do
    if not c[k] then table.insert(order, k) end
    c[k] = tonumber(v)
  end
  for i = 1, n do
    local k, d = ARGV[at + 2 * i], tonumber(ARGV[at + 2 * i + 1])
    if not c[k] then c[k] = 0; table.insert(order, k) end
    c[k] = c[k] + d
  end
  local out = {}
  for _, k in ipairs(order) do table.insert(out, k .. ' ' .. string.format('%.0f', c[k])) end
  return table.concat(out, ' ')
end
"#;

// The claim and finish scripts' prologue: the delivery's users.
// KEYS[1] intent hash, KEYS[2] claims hash, KEYS[3..] per script.
// ARGV[1] holder, ARGV[2] ttl ms, ARGV[3] number of users U, ARGV[4..3+U] the users.
const PROLOGUE: &str = r#"
local holder, ttl, nu = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local users = {}
for u = 1, nu do users[u] = ARGV[3 + u] end
-- Adds each counted user's pairs (counted[u] = {at, n}) to its counters in hash `key`.
local function apply_counts(key, counted)
  if not next(counted) then return end
  local old = redis.call('HMGET', key, unpack(users))
  local kv = {}
  for u, c in pairs(counted) do
    table.insert(kv, users[u]); table.insert(kv, add_counts(old[u], c[1], c[2]))
  end
  redis.call('HSET', key, unpack(kv))
end
"#;

/// Grants each job's target folder to this run unless the job is finished, superseded
/// by a newer pass, or its user stopped; or another run holds the folder. Then reads the
/// jobs' checkpoints.
/// KEYS: intent hash, claims hash, jobs hash, each job's checkpoint (J).
/// ARGV: prologue, running state json, then per job: user index, job id, claim field.
/// Returns {answers, checkpoints}: answers 'granted', 'busy' or 'skip:<why>'.
const CLAIM: &str = r#"
local now = server_now()
local running = ARGV[4 + nu]
local base = 4 + nu
local nj = (#ARGV - base) / 3
local fields = {}
for j = 1, nj do fields[j] = ARGV[base + 3 * j] end
local intents = redis.call('HMGET', KEYS[1], unpack(users))
local held = redis.call('HMGET', KEYS[2], unpack(fields))
local stored = redis.call('HMGET', KEYS[3], unpack(users))
local maps = {}
for u = 1, nu do maps[u] = decode_states(stored[u]) end
local answers, grant, changed = {}, {}, {}
local value = holder .. ' ' .. string.format('%.0f', now + ttl)
for j = 1, nj do
  local u = tonumber(ARGV[base + 3 * j - 2])
  local id = ARGV[base + 3 * j - 1]
  local intent = intents[u]
  local state = maps[u] and maps[u][id]
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
      maps[u][id] = cjson.decode(running)
      changed[u] = true
    end
  end
end
if #grant > 0 then redis.call('HSET', KEYS[2], unpack(grant)) end
local kv = {}
for u = 1, nu do
  if changed[u] then table.insert(kv, users[u]); table.insert(kv, cjson.encode(maps[u])) end
end
if #kv > 0 then redis.call('HSET', KEYS[3], unpack(kv)) end
local cps = {}
if #KEYS > 3 then cps = redis.call('MGET', unpack(KEYS, 4)) end
return {answers, cps}
"#;

/// Renews the claims of several runs of one worker at once (the worker's keepers tick
/// together) and applies each run's progress batch (once per sequence number: the
/// last one applied is the run's field of the worker's runs hash) and the checkpoints
/// it saved since its last call. A run that no longer holds every one of its claims
/// has nothing applied; the others go on. A handful of commands per call, whatever the
/// number of runs: each hash is read and written once.
/// KEYS: every key the call names, by index (the runs' claims, intent and progress
/// hashes, the worker's runs hash, the checkpoints).
/// ARGV: ttl ms, runs hash index, number of runs to forget G, their holders, number of
/// runs R, then per run: holder, claims, intent and progress hash indexes, seq, number
/// of claim fields F, the fields, number of users U, per user: the user, number of
/// counters N, N name/delta pairs; then number of checkpoints C, per checkpoint: key
/// index, value.
/// Returns per run {'held', each user's intent} or {'lost'}.
const RENEW_MANY: &str = r#"
local ttl, runs_key = tonumber(ARGV[1]), KEYS[tonumber(ARGV[2])]
local now = server_now()
local at = 3
local forget = {}
for i = 1, tonumber(ARGV[at]) do forget[i] = ARGV[at + i] end
at = at + #forget + 1
local runs = {}
for r = 1, tonumber(ARGV[at]) do
  local run = {holder = ARGV[at + 1], claims = KEYS[tonumber(ARGV[at + 2])],
    intent = KEYS[tonumber(ARGV[at + 3])], progress = KEYS[tonumber(ARGV[at + 4])],
    seq = ARGV[at + 5], fields = {}, users = {}, counts = {}, cps = {}}
  at = at + 6
  for f = 1, tonumber(ARGV[at]) do run.fields[f] = ARGV[at + f] end
  at = at + #run.fields + 1
  for u = 1, tonumber(ARGV[at]) do
    local p = at + 1
    local n = tonumber(ARGV[p + 1])
    run.users[u] = ARGV[p]
    run.counts[u] = {p, n}
    at = p + 1 + 2 * n
  end
  at = at + 1
  for c = 1, tonumber(ARGV[at]) do run.cps[c] = {tonumber(ARGV[at + 2 * c - 1]), at + 2 * c} end
  at = at + 2 * #run.cps
  runs[r] = run
end
-- Values of `fields` of each hash, read once per hash: groups[key] = {fields, got}.
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
    local value = run.holder .. ' ' .. string.format('%.0f', now + ttl)
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
    run.fresh = run.ok and tonumber(run.seq) > tonumber(last[r] or '0')
    if run.fresh then table.insert(seen, run.holder); table.insert(seen, run.seq) end
  end
end
if #seen > 0 then
  redis.call('HSET', runs_key, unpack(seen))
  redis.call('PEXPIRE', runs_key, 86400000)
end
if #forget > 0 then redis.call('HDEL', runs_key, unpack(forget)) end
-- 3. Counters: each user's value read and written once, whatever the runs adding to it.
local counters_of = read_grouped(function(run)
  local items = {}
  if run.fresh then
    for u, c in ipairs(run.counts) do
      if c[2] > 0 then table.insert(items, {run.progress, run.users[u]}) end
    end
  end
  return items
end)
local counters = {}
for _, run in ipairs(runs) do
  if run.fresh then
    for u, c in ipairs(run.counts) do
      if c[2] > 0 then
        local by_user = counters[run.progress] or {}
        counters[run.progress] = by_user
        local name = run.users[u]
        local text = by_user[name]
        if text == nil then text = counters_of(run.progress, name) end
        by_user[name] = add_counts(text, c[1], c[2])
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
    for _, c in ipairs(run.cps) do table.insert(cps, KEYS[c[1]]); table.insert(cps, ARGV[c[2]]) end
  end
end
if #cps > 0 then redis.call('MSET', unpack(cps)) end
-- 5. The users' intents, for the held runs.
local intent_of_user = read_grouped(function(run)
  local items = {}
  if run.ok then
    for _, u in ipairs(run.users) do table.insert(items, {run.intent, u}) end
  end
  return items
end)
local out = {}
for r, run in ipairs(runs) do
  if run.ok then
    local o = {'held'}
    for u, name in ipairs(run.users) do o[u + 1] = intent_of(intent_of_user(run.intent, name)) end
    out[r] = o
  else
    out[r] = {'lost'}
  end
end
return out
"#;

/// Ends a run: its last progress batch, the jobs' new states (each only while the run
/// still holds that job's claim, and unless a newer pass replaced the job meanwhile),
/// its checkpoints (only while every claim is still this run's: else another run owns
/// the folders now), the claims released, the users marked for the coordinator's
/// dispatcher. A run that lost a claim writes nothing over the state of the run that
/// took the folder over (or that finished it since); a state left behind as queued or
/// running is repaired by the coordinator's recheck, which publishes the job again.
/// KEYS: intent hash, claims hash, run key, dispatch set, jobs hash, progress hash,
/// then the checkpoints to write (C).
/// ARGV: prologue, seq, number of claim fields F, the fields, then per user: its
/// dispatch member, number of states, id/claim field/json triples ('' keeps the
/// state), number of counters, field/delta pairs; then the C checkpoint values; then
/// the linger in ms and the number L of claim fields to keep that long (the jobs
/// handed back), and those fields.
const FINISH: &str = r#"
local seq = tonumber(ARGV[4 + nu])
local nf = tonumber(ARGV[5 + nu])
local at = 5 + nu
local ours, all_ours, mine = {}, true, {}
if nf > 0 then
  local fields = {}
  for f = 1, nf do fields[f] = ARGV[at + f] end
  local held = redis.call('HMGET', KEYS[2], unpack(fields))
  for f = 1, nf do
    if holder_of(held[f]) == holder then
      table.insert(ours, fields[f]); mine[fields[f]] = true
    else
      all_ours = false
    end
  end
end
at = at + nf
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local fresh = seq > last
if fresh then redis.call('SET', KEYS[3], ARGV[4 + nu], 'EX', 86400) end
local members, stored, maps = {}, nil, {}
local states_kv, counted = {}, {}
for u = 1, nu do
  members[u] = ARGV[at + 1]
  local ns = tonumber(ARGV[at + 2])
  at = at + 2
  if ns > 0 then
    if not stored then
      stored = redis.call('HMGET', KEYS[5], unpack(users))
    end
    local map = decode_states(stored[u])
    local changed = false
    for i = 1, ns do
      local id, field, val = ARGV[at + 3 * i - 2], ARGV[at + 3 * i - 1], ARGV[at + 3 * i]
      -- a job a newer pass replaced stays replaced; a claim lost is another's job now
      if map and map[id] and val ~= '' and mine[field] then
        map[id] = cjson.decode(val); changed = true
      end
    end
    if changed then
      table.insert(states_kv, users[u]); table.insert(states_kv, cjson.encode(map))
    end
  end
  at = at + 3 * ns
  local n = tonumber(ARGV[at + 1])
  if fresh and n > 0 then counted[u] = {at, n} end
  at = at + 1 + 2 * n
end
if #states_kv > 0 then redis.call('HSET', KEYS[5], unpack(states_kv)) end
apply_counts(KEYS[6], counted)
local nc = #KEYS - 6
if nc > 0 and all_ours then
  local kv = {}
  for c = 1, nc do kv[2 * c - 1] = KEYS[6 + c]; kv[2 * c] = ARGV[at + c] end
  redis.call('MSET', unpack(kv))
end
-- A job handed back keeps its folder a while: what its run had sent may still be on
-- its way to the target, and the next run must look after it has landed.
local after = at + nc
local linger_ms, nl = tonumber(ARGV[after + 1]), tonumber(ARGV[after + 2])
local keep = {}
for l = 1, nl do keep[ARGV[after + 2 + l]] = true end
local release, hold = {}, {}
local until_ms = string.format('%.0f', server_now() + linger_ms)
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
"#;

/// Takes a lease if free. KEYS: lease. ARGV: holder, ttl ms.
const ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Renews a lease that is still ours. KEYS: lease. ARGV: holder, ttl ms.
const RENEW_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Lets a lease go if it is still ours. KEYS: lease. ARGV: holder.
const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// Passes begin: each user's pass record, job states and specs replace the old ones
/// (a field of each hash per user), and the recheck time is set. Four commands,
/// whatever the number of users.
/// KEYS: the pass records, the due zset, the jobs hash, the specs hash.
/// ARGV: recheck ms, then per user: user, pass record, job states, job specs.
const BEGIN_PASS: &str = r#"
local records, states, specs, due = {}, {}, {}, {}
for at = 2, #ARGV, 4 do
  local user = ARGV[at]
  table.insert(records, user); table.insert(records, ARGV[at + 1])
  table.insert(states, user); table.insert(states, ARGV[at + 2])
  table.insert(specs, user); table.insert(specs, ARGV[at + 3])
  table.insert(due, ARGV[1]); table.insert(due, user)
end
redis.call('HSET', KEYS[1], unpack(records))
redis.call('HSET', KEYS[3], unpack(states))
redis.call('HSET', KEYS[4], unpack(specs))
redis.call('ZADD', KEYS[2], unpack(due))
return #due / 2
"#;

/// Sets some of a user's job states (waiting → queued), leaving out a job its pass no
/// longer has. KEYS: the jobs hash. ARGV: the user, then id/state pairs.
const SET_STATES: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local map, n = cjson.decode(v), 0
for i = 2, #ARGV, 2 do
  if map[ARGV[i]] then map[ARGV[i]] = cjson.decode(ARGV[i + 1]); n = n + 1 end
end
if n > 0 then redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(map)) end
return n
"#;

/// The due score of an open pass's recheck at `ms`: half a millisecond later, so that
/// the pass's end can tell it from the admin's sync now ([`SCHEDULE_NEXT_MANY`]).
pub fn recheck_score(ms: u64) -> String {
    format!("{ms}.5")
}

/// Schedules users' next passes unless the admin asked for one meanwhile (a sync now or
/// start during the pass left the user due already): the sooner time wins. An open
/// pass's recheck time is not the admin's ask, overdue or not: its score ends in .5
/// ([`recheck_score`]), the admin's and the schedule's are whole milliseconds. Two
/// commands, whatever the number of users.
/// KEYS: due zset. ARGV: now ms, next ms, then the users.
const SCHEDULE_NEXT_MANY: &str = r#"
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
"#;

/// Closing → closed, only if the admin has not changed the intent meanwhile.
/// KEYS: intent hash. ARGV: user.
const CLOSE: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'closing' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'closed')
return 1
"#;

impl RedisStore {
    pub(crate) fn k(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for p in parts {
            key.push(':');
            key.push_str(p);
        }
        key
    }

    fn dispatch_member(batch: &str, user: &str) -> String {
        format!("{batch}\t{user}")
    }

    // ---- batches and intents (the admin's side) ----

    pub async fn batches(&self) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn
            .smembers(self.k(&["batches"]))
            .await
            .map_err(|e| store_error("SMEMBERS", e))?;
        names.sort();
        Ok(names)
    }

    /// The user's counters, summed over all passes.
    pub async fn progress(
        &self,
        batch: &str,
        user: &str,
    ) -> Result<std::collections::BTreeMap<String, i64>, Error> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .hget(self.progress_key(batch), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        parse_counts(user, value.as_deref())
    }

    pub(crate) fn batches_key(&self) -> String {
        self.k(&["batches"])
    }

    /// Records users as imported (intent Idle) unless they have an intent already.
    pub async fn import_users(&self, batch: &str, users: &[String]) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hset_nx(self.k(&["intent", batch]), user, "idle")
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("HSETNX", e))
    }

    pub async fn intents(&self, batch: &str) -> Result<HashMap<String, Intent>, Error> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn
            .hgetall(self.k(&["intent", batch]))
            .await
            .map_err(|e| store_error("HGETALL", e))?;
        Ok(all
            .into_iter()
            .map(|(u, i)| (u, parse_intent(&i)))
            .collect())
    }

    pub async fn intent(&self, batch: &str, user: &str) -> Result<Intent, Error> {
        let mut conn = self.conn.clone();
        let intent: Option<String> = conn
            .hget(self.k(&["intent", batch]), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        Ok(intent.as_deref().map_or(Intent::Idle, parse_intent))
    }

    /// Sets the users' intent; `due` schedules a pass now (start, close), Stopped takes
    /// them off the schedule.
    pub async fn set_intent(
        &self,
        batch: &str,
        users: &[String],
        intent: Intent,
        due: bool,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        // One multi-field HSET and one ZADD (or ZREM) per chunk, not a command per user.
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let fields: Vec<(&str, &str)> = chunk
                .iter()
                .map(|u| (u.as_str(), intent_name(intent)))
                .collect();
            pipe.hset_multiple(self.k(&["intent", batch]), &fields)
                .ignore();
            if due {
                let members: Vec<(u64, &str)> = chunk.iter().map(|u| (now, u.as_str())).collect();
                pipe.zadd_multiple(self.k(&["due", batch]), &members)
                    .ignore();
            } else if matches!(intent, Intent::Stopped | Intent::Closed) {
                pipe.zrem(self.k(&["due", batch]), chunk).ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| store_error("MULTI", e))?;
        }
        Ok(())
    }

    /// Closing → Closed, unless the admin changed the intent meanwhile.
    pub async fn mark_closed(&self, batch: &str, user: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let done: i64 = redis::Script::new(CLOSE)
            .key(self.k(&["intent", batch]))
            .arg(user)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("close script", e))?;
        Ok(done == 1)
    }

    /// Deletes a user's stored logins and sealed secrets (Close).
    pub async fn delete_credentials(&self, batch: &str, user: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.user_key(batch, user))
            .await
            .map_err(|e| store_error("DEL", e))
    }

    // ---- the schedule ----

    /// Puts the look at the user's open pass at `at_ms` ([`recheck_score`]).
    pub async fn schedule_recheck(&self, batch: &str, user: &str, at_ms: u64) -> Result<(), Error> {
        self.schedule_rechecks(batch, &[user], at_ms).await
    }

    /// Puts the look at each user's open pass at `at_ms` (one ZADD).
    pub async fn schedule_rechecks(
        &self,
        batch: &str,
        users: &[&str],
        at_ms: u64,
    ) -> Result<(), Error> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let score = recheck_score(at_ms);
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.k(&["due", batch]));
        for user in users {
            cmd.arg(&score).arg(*user);
        }
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("ZADD", e))
    }

    /// Puts the user's next pass at `at_ms`.
    pub async fn schedule(&self, batch: &str, user: &str, at_ms: u64) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.zadd::<_, _, _, ()>(self.k(&["due", batch]), user, at_ms)
            .await
            .map_err(|e| store_error("ZADD", e))
    }

    /// After a pass: each user's next one at `next_ms`, unless one is due already (the
    /// admin pressed "sync now" while the pass ran): one call per 500 users.
    pub async fn schedule_next_many(
        &self,
        batch: &str,
        users: &[&str],
        now_ms: u64,
        next_ms: u64,
    ) -> Result<(), Error> {
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut conn = self.conn.clone();
            let mut call = SCHEDULE_NEXT_MANY_SCRIPT.key(self.k(&["due", batch]));
            call.arg(now_ms).arg(next_ms).arg(chunk);
            call.invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| store_error("schedule script", e))?;
        }
        Ok(())
    }

    /// Puts each user's next pass at `at_ms` (one ZADD), or takes it off the schedule
    /// (`None`: one ZREM).
    pub async fn schedule_many(
        &self,
        batch: &str,
        users: &[&str],
        at_ms: Option<u64>,
    ) -> Result<(), Error> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let key = self.k(&["due", batch]);
        match at_ms {
            Some(at) => {
                let members: Vec<(u64, &str)> = users.iter().map(|u| (at, *u)).collect();
                conn.zadd_multiple::<_, _, _, ()>(key, &members)
                    .await
                    .map_err(|e| store_error("ZADD", e))
            }
            None => conn
                .zrem::<_, _, ()>(key, users)
                .await
                .map_err(|e| store_error("ZREM", e)),
        }
    }

    pub async fn unschedule(&self, batch: &str, user: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.zrem::<_, _, ()>(self.k(&["due", batch]), user)
            .await
            .map_err(|e| store_error("ZREM", e))
    }

    /// Users due at `now_ms`, earliest first, at most `limit`.
    pub async fn due_users(
        &self,
        batch: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.k(&["due", batch]))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| store_error("ZRANGEBYSCORE", e))
    }

    /// When each scheduled user is due next.
    pub async fn due_times(&self, batch: &str) -> Result<HashMap<String, u64>, Error> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, f64)> = conn
            .zrange_withscores(self.k(&["due", batch]), 0, -1)
            .await
            .map_err(|e| store_error("ZRANGE", e))?;
        Ok(all.into_iter().map(|(u, s)| (u, s as u64)).collect())
    }

    // ---- passes and jobs (the coordinator's side) ----

    pub async fn pass_records(&self, batch: &str) -> Result<HashMap<String, PassRecord>, Error> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn
            .hgetall(self.k(&["pass", batch]))
            .await
            .map_err(|e| store_error("HGETALL", e))?;
        all.into_iter()
            .map(|(u, v)| {
                serde_json::from_str(&v)
                    .map(|r| (u, r))
                    .map_err(|e| Error::Store(format!("pass record: {e}")))
            })
            .collect()
    }

    pub async fn pass_record(&self, batch: &str, user: &str) -> Result<PassRecord, Error> {
        let mut conn = self.conn.clone();
        let v: Option<String> = conn
            .hget(self.k(&["pass", batch]), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        v.map(|v| serde_json::from_str(&v).map_err(|e| Error::Store(format!("pass record: {e}"))))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Many users' pass records, intents and job states: three HMGETs in one round trip
    /// (what the coordinator needs to dispatch them).
    pub async fn dispatch_views(
        &self,
        batch: &str,
        users: &[String],
    ) -> Result<Vec<DispatchView>, Error> {
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET").arg(self.k(&["pass", batch])).arg(chunk);
            pipe.cmd("HMGET").arg(self.k(&["intent", batch])).arg(chunk);
            pipe.cmd("HMGET").arg(self.jobs_key(batch)).arg(chunk);
            let (records, intents, jobs): (Column, Column, Column) = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| store_error("pipeline", e))?;
            for (((user, record), intent), jobs) in chunk.iter().zip(records).zip(intents).zip(jobs)
            {
                let record = record
                    .map(|v| {
                        serde_json::from_str(&v)
                            .map_err(|e| Error::Store(format!("pass record: {e}")))
                    })
                    .transpose()?
                    .unwrap_or_default();
                out.push(DispatchView {
                    record,
                    intent: intent.as_deref().map_or(Intent::Idle, parse_intent),
                    jobs: parse_job_states(user, jobs.as_deref())?,
                });
            }
        }
        Ok(out)
    }

    /// Many users' intents, pass records and `copied` counters (what a pass to plan
    /// starts from): three HMGETs in one round trip.
    pub async fn intents_and_records(
        &self,
        batch: &str,
        users: &[String],
    ) -> Result<Vec<(Intent, PassRecord, i64)>, Error> {
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut conn = self.conn.clone();
            type Answer = (
                Vec<Option<String>>,
                Vec<Option<String>>,
                Vec<Option<String>>,
            );
            let (intents, records, counts): Answer = redis::pipe()
                .cmd("HMGET")
                .arg(self.k(&["intent", batch]))
                .arg(chunk)
                .cmd("HMGET")
                .arg(self.k(&["pass", batch]))
                .arg(chunk)
                .cmd("HMGET")
                .arg(self.progress_key(batch))
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(|e| store_error("HMGET (pipelined)", e))?;
            for (((user, intent), record), counts) in
                chunk.iter().zip(intents).zip(records).zip(counts)
            {
                let record = record
                    .map(|v| {
                        serde_json::from_str(&v)
                            .map_err(|e| Error::Store(format!("pass record: {e}")))
                    })
                    .transpose()?
                    .unwrap_or_default();
                let copied = parse_counts(user, counts.as_deref())?
                    .get("copied")
                    .copied()
                    .unwrap_or(0);
                out.push((
                    intent.as_deref().map_or(Intent::Idle, parse_intent),
                    record,
                    copied,
                ));
            }
        }
        Ok(out)
    }

    /// Writes many users' pass records in one HSET.
    pub async fn put_pass_records(
        &self,
        batch: &str,
        records: &[(&str, &PassRecord)],
    ) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        let mut fields = Vec::with_capacity(records.len());
        for (user, record) in records {
            fields.push((*user, json(record)?));
        }
        let mut conn = self.conn.clone();
        conn.hset_multiple::<_, _, _, ()>(self.k(&["pass", batch]), &fields)
            .await
            .map_err(|e| store_error("HSET", e))
    }

    /// Starts a pass: replaces the user's jobs with `jobs` (specs and first states),
    /// records the pass, and sets when the user is due again if the pass never ends
    /// (`recheck_ms`: the coordinator then republishes what is still queued).
    pub async fn begin_pass(
        &self,
        batch: &str,
        user: &str,
        record: &PassRecord,
        jobs: &[(FolderJob, JobState)],
        recheck_ms: u64,
    ) -> Result<(), Error> {
        self.begin_passes(batch, &[(user, record, jobs)], recheck_ms)
            .await
    }

    /// [`begin_pass`](Self::begin_pass) for several users of a batch, in one script
    /// (atomic): one HSET each of their records, job states and specs, one ZADD of the
    /// recheck times.
    pub async fn begin_passes(
        &self,
        batch: &str,
        passes: &[PassStart<'_>],
        recheck_ms: u64,
    ) -> Result<(), Error> {
        if passes.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut call = BEGIN_PASS_SCRIPT.prepare_invoke();
        call.key(self.k(&["pass", batch]))
            .key(self.k(&["due", batch]))
            .key(self.jobs_key(batch))
            .key(self.specs_key(batch));
        call.arg(recheck_score(recheck_ms));
        for (user, record, jobs) in passes {
            let states: std::collections::BTreeMap<String, &JobState> =
                jobs.iter().map(|(j, s)| (j.id(), s)).collect();
            let specs: std::collections::BTreeMap<String, &FolderJob> =
                jobs.iter().map(|(j, _)| (j.id(), j)).collect();
            call.arg(*user)
                .arg(json(record)?)
                .arg(json(&states)?)
                .arg(json(&specs)?);
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("begin-pass script", e))?;
        Ok(())
    }

    /// For many users at once: each one's intent, pass record, due time, job states
    /// (sorted by id) and progress counters, read `STATUS_CHUNK` users at a time (five
    /// commands in one round trip each), in the order of `users`.
    pub async fn user_states(
        &self,
        batch: &str,
        users: &[String],
    ) -> Result<Vec<UserState>, Error> {
        let mut out = Vec::with_capacity(users.len());
        let mut conn = self.conn.clone();
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET").arg(self.k(&["intent", batch])).arg(chunk);
            pipe.cmd("HMGET").arg(self.k(&["pass", batch])).arg(chunk);
            pipe.cmd("ZMSCORE").arg(self.k(&["due", batch])).arg(chunk);
            pipe.cmd("HMGET").arg(self.jobs_key(batch)).arg(chunk);
            pipe.cmd("HMGET").arg(self.progress_key(batch)).arg(chunk);
            type Answer = (Column, Column, Vec<Option<f64>>, Column, Column);
            let (intents, passes, dues, jobs, counts): Answer =
                pipe.query_async(&mut conn)
                    .await
                    .map_err(|e| store_error("status reads (pipelined)", e))?;
            let rows = chunk
                .iter()
                .zip(intents)
                .zip(passes)
                .zip(dues)
                .zip(jobs)
                .zip(counts);
            for (((((user, intent), pass), due), jobs), counts) in rows {
                let pass = pass
                    .map(|v| {
                        serde_json::from_str(&v)
                            .map_err(|e| Error::Store(format!("pass record: {e}")))
                    })
                    .transpose()?
                    .unwrap_or_default();
                out.push(UserState {
                    intent: intent.as_deref().map_or(Intent::Idle, parse_intent),
                    pass,
                    due_ms: due.map(|d| d as u64),
                    jobs: parse_job_states(user, jobs.as_deref())?,
                    progress: parse_counts(user, counts.as_deref())?,
                });
            }
        }
        Ok(out)
    }

    /// The current pass's jobs, by id.
    pub async fn job_states(
        &self,
        batch: &str,
        user: &str,
    ) -> Result<Vec<(String, JobState)>, Error> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .hget(self.jobs_key(batch), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        parse_job_states(user, value.as_deref())
    }

    /// The specs of the jobs in `states` paired with their states (in the order of the
    /// specs found; a state without a spec is left out).
    pub async fn with_specs(
        &self,
        batch: &str,
        user: &str,
        states: &[(String, JobState)],
    ) -> Result<Vec<(FolderJob, JobState)>, Error> {
        let ids: Vec<String> = states.iter().map(|(id, _)| id.clone()).collect();
        let specs = self.job_specs(batch, user, &ids).await?;
        let by_id: HashMap<&str, &JobState> =
            states.iter().map(|(id, s)| (id.as_str(), s)).collect();
        Ok(specs
            .into_iter()
            .filter_map(|job| {
                let state = (*by_id.get(job.id().as_str())?).clone();
                Some((job, state))
            })
            .collect())
    }

    /// The jobs behind `ids` (in that order, leaving out an id the pass does not
    /// have), as the coordinator planned them.
    pub async fn job_specs(
        &self,
        batch: &str,
        user: &str,
        ids: &[String],
    ) -> Result<Vec<FolderJob>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .hget(self.specs_key(batch), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        let mut specs: HashMap<String, FolderJob> = serde_json::from_str(&value)
            .map_err(|e| Error::Store(format!("job specs of {user} are damaged: {e}")))?;
        Ok(ids.iter().filter_map(|id| specs.remove(id)).collect())
    }

    /// Sets several of a user's job states at once (the coordinator: waiting →
    /// queued), in one script: the user's states are one value, which the workers'
    /// scripts change too. A job its pass no longer has is left out.
    pub async fn set_job_states(
        &self,
        batch: &str,
        user: &str,
        states: &[(String, JobState)],
    ) -> Result<(), Error> {
        if states.is_empty() {
            return Ok(());
        }
        let mut call = SET_STATES_SCRIPT.key(self.jobs_key(batch));
        call.arg(user);
        for (id, state) in states {
            call.arg(id).arg(json(state)?);
        }
        call.invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("set-states script", e))?;
        Ok(())
    }

    /// Users whose jobs ended since the last call, at most `limit` (taken off the set).
    pub async fn take_dispatch(&self, limit: usize) -> Result<Vec<(String, String)>, Error> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("SPOP")
            .arg(self.k(&["dispatch"]))
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| store_error("SPOP", e))?;
        Ok(members
            .into_iter()
            .filter_map(|m| {
                m.split_once('\t')
                    .map(|(b, u)| (b.to_string(), u.to_string()))
            })
            .collect())
    }

    // ---- a worker's claims on a delivery's jobs ----

    /// Claims a delivery's jobs (all of one batch) for `holder`: an answer per job, in
    /// order, and the jobs' checkpoints as stored (read in the same round trip).
    pub async fn claim_jobs(
        &self,
        jobs: &[FolderJob],
        holder: &str,
        ttl: Duration,
    ) -> Result<(Vec<ClaimAnswer>, Vec<Option<Checkpoint>>), Error> {
        if jobs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let batch = one_batch(jobs.iter())?;
        let users = users_of(jobs.iter());
        let mut call = self.claim_call(&CLAIM_SCRIPT, batch, holder, ttl, &users);
        call.key(self.jobs_key(batch));
        for job in jobs {
            call.key(self.checkpoint_key(&job.checkpoint_key()));
        }
        call.arg(json(&JobState::Running)?);
        for job in jobs {
            let u = users
                .iter()
                .position(|u| *u == job.user.as_str())
                .unwrap_or(0)
                + 1;
            call.arg(u).arg(job.id()).arg(claim_field(job));
        }
        let (answers, checkpoints): (Vec<String>, Vec<Option<Vec<u8>>>) = call
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("claim script", e))?;
        let answers = answers
            .into_iter()
            .map(|a| match a.as_str() {
                "granted" => ClaimAnswer::Granted,
                "busy" => ClaimAnswer::Busy,
                other => {
                    ClaimAnswer::Skip(other.strip_prefix("skip:").unwrap_or(other).to_string())
                }
            })
            .collect();
        let checkpoints = jobs
            .iter()
            .zip(checkpoints.into_iter().chain(std::iter::repeat(None)))
            .map(|(job, bytes)| {
                bytes.and_then(|b| crate::redis::decode_checkpoint(&job.checkpoint_key(), &b))
            })
            .collect();
        Ok((answers, checkpoints))
    }

    /// Renews one run's claims on its own: [`renew_runs`](Self::renew_runs) for a
    /// worker of one run (its runs hash is the holder's).
    pub async fn renew_claims(
        &self,
        jobs: &[FolderJob],
        holder: &str,
        ttl: Duration,
        seq: u64,
        counts: &[(String, Counts)],
        checkpoints: &[(CheckpointKey, Checkpoint)],
    ) -> Result<Renewal, Error> {
        let run = RunRenewal {
            jobs,
            holder,
            seq,
            counts,
            checkpoints,
        };
        let mut out = self.renew_runs(holder, ttl, &[run], &[]).await?;
        Ok(out.pop().unwrap_or(Renewal::Lost))
    }

    /// Renews the claims of a worker's runs in one call, each with its progress batch
    /// number `seq` (applied once: the last number applied is the run's field of
    /// `P:runs:<worker>`) and the checkpoints it saved since its last call; a renewal per
    /// run, in order. `forget`: runs of the worker that have finished, whose numbers are
    /// no longer needed.
    pub async fn renew_runs(
        &self,
        worker: &str,
        ttl: Duration,
        runs: &[RunRenewal<'_>],
        forget: &[String],
    ) -> Result<Vec<Renewal>, Error> {
        let mut keys = Keys::default();
        let mut call = RENEW_MANY_SCRIPT.prepare_invoke();
        call.arg(ttl.as_millis() as u64)
            .arg(keys.index(self.k(&["runs", worker])))
            .arg(forget.len());
        for holder in forget {
            call.arg(holder);
        }
        call.arg(runs.len());
        let mut users_per_run = Vec::with_capacity(runs.len());
        for run in runs {
            let batch = one_batch(run.jobs.iter())?;
            let users = users_of(run.jobs.iter());
            call.arg(run.holder)
                .arg(keys.index(self.k(&["claims"])))
                .arg(keys.index(self.k(&["intent", batch])))
                .arg(keys.index(self.progress_key(batch)))
                .arg(run.seq)
                .arg(run.jobs.len());
            for job in run.jobs {
                call.arg(claim_field(job));
            }
            call.arg(users.len());
            for user in &users {
                call.arg(*user);
                push_user_counts(&mut call, user, run.counts);
            }
            call.arg(run.checkpoints.len());
            for (key, cp) in run.checkpoints {
                call.arg(keys.index(self.checkpoint_key(key)))
                    .arg(serde_json::to_vec(cp).map_err(|e| Error::Store(e.to_string()))?);
            }
            users_per_run.push(users);
        }
        for key in keys.names {
            call.key(key);
        }
        let replies: Vec<Vec<String>> = call
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("renew script", e))?;
        if replies.len() != runs.len() {
            return Err(Error::Store(format!(
                "the renew script answered for {} runs of {}",
                replies.len(),
                runs.len()
            )));
        }
        Ok(replies
            .into_iter()
            .zip(users_per_run)
            .map(|(reply, users)| match reply.first().map(String::as_str) {
                Some("held") => Renewal::Held(
                    users
                        .iter()
                        .zip(&reply[1..])
                        .map(|(u, i)| (u.to_string(), parse_intent(i)))
                        .collect(),
                ),
                _ => Renewal::Lost,
            })
            .collect())
    }

    /// Ends a run of a delivery's granted jobs: each job's new state (None: leave it,
    /// e.g. handed back), the last progress batch `seq`, the checkpoints not yet written
    /// (only while every claim is still this run's), the claims released, the
    /// coordinator told.
    pub async fn finish_claims(
        &self,
        jobs: &[(FolderJob, Option<JobState>)],
        holder: &str,
        seq: u64,
        counts: &[(String, Counts)],
        checkpoints: &[(CheckpointKey, Checkpoint)],
    ) -> Result<(), Error> {
        self.finish_as(
            jobs,
            holder,
            &self.k(&["run", holder]),
            seq,
            counts,
            checkpoints,
        )
        .await
    }

    /// [`finish_claims`](Self::finish_claims) for one user's jobs of a run that goes on
    /// with other users' (the admin stopped this one): these calls are numbered apart
    /// from the run's (`P:run:<holder>:released`), so a replay applies its counts once.
    pub async fn finish_user_claims(
        &self,
        jobs: &[(FolderJob, Option<JobState>)],
        holder: &str,
        seq: u64,
        counts: &[(String, Counts)],
        checkpoints: &[(CheckpointKey, Checkpoint)],
    ) -> Result<(), Error> {
        let run = self.k(&["run", holder, "released"]);
        self.finish_as(jobs, holder, &run, seq, counts, checkpoints)
            .await
    }

    async fn finish_as(
        &self,
        jobs: &[(FolderJob, Option<JobState>)],
        holder: &str,
        run: &str,
        seq: u64,
        counts: &[(String, Counts)],
        checkpoints: &[(CheckpointKey, Checkpoint)],
    ) -> Result<(), Error> {
        if jobs.is_empty() {
            return Ok(());
        }
        let batch = one_batch(jobs.iter().map(|(j, _)| j))?;
        let users = users_of(jobs.iter().map(|(j, _)| j));
        let mut call = self.claim_call(&FINISH_SCRIPT, batch, holder, Duration::ZERO, &users);
        call.key(run)
            .key(self.k(&["dispatch"]))
            .key(self.jobs_key(batch))
            .key(self.progress_key(batch));
        for (key, _) in checkpoints {
            call.key(self.checkpoint_key(key));
        }
        call.arg(seq).arg(jobs.len());
        for (job, _) in jobs {
            call.arg(claim_field(job));
        }
        for user in &users {
            call.arg(Self::dispatch_member(batch, user));
            let states = jobs
                .iter()
                .filter(|(j, _)| j.user == *user)
                .map(|(j, s)| {
                    Ok((
                        j.id(),
                        claim_field(j),
                        s.as_ref().map(json).transpose()?.unwrap_or_default(),
                    ))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            call.arg(states.len());
            for (id, field, state) in states {
                call.arg(id).arg(field).arg(state);
            }
            push_user_counts(&mut call, user, counts);
        }
        for (_, cp) in checkpoints {
            call.arg(serde_json::to_vec(cp).map_err(|e| Error::Store(e.to_string()))?);
        }
        let handed_back: Vec<Vec<u8>> = jobs
            .iter()
            .filter(|(_, state)| *state == Some(JobState::Queued))
            .map(|(job, _)| claim_field(job))
            .collect();
        call.arg(HAND_BACK_SETTLE.as_millis() as u64)
            .arg(handed_back.len());
        for field in handed_back {
            call.arg(field);
        }
        call.invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("finish script", e))?;
        Ok(())
    }

    /// A claim script's call with the prologue's keys and arguments filled in.
    fn claim_call<'a>(
        &self,
        script: &'a std::sync::LazyLock<redis::Script>,
        batch: &str,
        holder: &str,
        ttl: Duration,
        users: &[&str],
    ) -> redis::ScriptInvocation<'a> {
        let mut call = script.key(self.k(&["intent", batch]));
        call.key(self.k(&["claims"]))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .arg(users.len());
        for user in users {
            call.arg(*user);
        }
        call
    }

    // ---- leadership ----

    /// Takes (or keeps) the coordinator lease. True when `holder` holds it now.
    pub async fn acquire_leader(&self, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let got: i64 = redis::Script::new(ACQUIRE)
            .key(self.k(&["leader"]))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("leader script", e))?;
        Ok(got == 1)
    }

    /// Renews the coordinator lease; false when it is no longer `holder`'s.
    pub async fn renew_leader(&self, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let kept: i64 = redis::Script::new(RENEW_LEASE)
            .key(self.k(&["leader"]))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("leader script", e))?;
        Ok(kept == 1)
    }

    pub async fn release_leader(&self, holder: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::Script::new(RELEASE_LEASE)
            .key(self.k(&["leader"]))
            .arg(holder)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("leader script", e))?;
        Ok(())
    }

    /// Who holds the coordinator lease now.
    pub async fn leader(&self) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        conn.get(self.k(&["leader"]))
            .await
            .map_err(|e| store_error("GET", e))
    }
}
