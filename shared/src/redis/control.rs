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
use crate::redis::scripts::{self, request, Delta, Table};
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

pub(crate) fn intent_name(intent: Intent) -> &'static str {
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

/// A user's counters with a delta, as the scripts take them (no zero deltas).
fn user_deltas<'a>(user: &str, counts: &'a [(String, Counts)]) -> Vec<Delta<'a>> {
    counts
        .iter()
        .filter(|(u, _)| u == user)
        .flat_map(|(_, c)| c.iter())
        .filter(|(_, d)| *d != 0)
        .map(|(name, d)| (*name, *d))
        .collect()
}

/// The due score of an open pass's recheck at `ms`: half a millisecond later, so that
/// the pass's end can tell it from the admin's sync now (`lua/schedule_next.lua`).
pub fn recheck_score(ms: u64) -> String {
    format!("{ms}.5")
}

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
        let done: i64 = scripts::CLOSE
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
            let mut call = scripts::SCHEDULE_NEXT.key(self.k(&["due", batch]));
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
        let users = passes
            .iter()
            .map(|(user, record, jobs)| {
                let states: std::collections::BTreeMap<String, &JobState> =
                    jobs.iter().map(|(j, s)| (j.id(), s)).collect();
                let specs: std::collections::BTreeMap<String, &FolderJob> =
                    jobs.iter().map(|(j, _)| (j.id(), j)).collect();
                Ok(scripts::BeginPassUser {
                    user,
                    record: json(record)?,
                    states: json(&states)?,
                    specs: json(&specs)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let req = scripts::BeginPassRequest {
            recheck: recheck_score(recheck_ms),
            users,
        };
        scripts::BEGIN_PASS
            .key(self.k(&["pass", batch]))
            .key(self.k(&["due", batch]))
            .key(self.jobs_key(batch))
            .key(self.specs_key(batch))
            .arg(request(&req)?)
            .invoke_async::<i64>(&mut conn)
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
        let mut call = scripts::SET_STATES.key(self.jobs_key(batch));
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
        let mut fields = Table::args();
        let req = scripts::ClaimRequest {
            holder,
            ttl_ms: ttl.as_millis() as u64,
            users: &users,
            running: JobState::Running,
            jobs: jobs
                .iter()
                .map(|job| scripts::ClaimJob {
                    user: users.iter().position(|u| *u == job.user).unwrap_or(0) + 1,
                    id: job.id(),
                    field: fields.index(claim_field(job)),
                })
                .collect(),
        };
        let mut call = scripts::CLAIM.key(self.k(&["intent", batch]));
        call.key(self.k(&["claims"])).key(self.jobs_key(batch));
        for job in jobs {
            call.key(self.checkpoint_key(&job.checkpoint_key()));
        }
        call.arg(request(&req)?).arg(fields.names);
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
        let mut keys = Table::keys();
        let mut fields = Table::args();
        let mut req = scripts::RenewRequest {
            ttl_ms: ttl.as_millis() as u64,
            runs_key: keys.index(self.k(&["runs", worker])),
            forget,
            runs: Vec::with_capacity(runs.len()),
        };
        let mut users_per_run = Vec::with_capacity(runs.len());
        for run in runs {
            let batch = one_batch(run.jobs.iter())?;
            let users = users_of(run.jobs.iter());
            req.runs.push(scripts::RenewRun {
                holder: run.holder,
                claims: keys.index(self.k(&["claims"])),
                intent: keys.index(self.k(&["intent", batch])),
                progress: keys.index(self.progress_key(batch)),
                seq: run.seq,
                fields: run
                    .jobs
                    .iter()
                    .map(|j| fields.index(claim_field(j)))
                    .collect(),
                users: users
                    .iter()
                    .map(|user| scripts::UserCounts {
                        user,
                        counts: user_deltas(user, run.counts),
                    })
                    .collect(),
                checkpoints: run
                    .checkpoints
                    .iter()
                    .map(|(key, cp)| Ok((keys.index(self.checkpoint_key(key)), json(cp)?)))
                    .collect::<Result<_, Error>>()?,
            });
            users_per_run.push(users);
        }
        let mut call = scripts::RENEW.prepare_invoke();
        for key in keys.names {
            call.key(key);
        }
        call.arg(request(&req)?).arg(fields.names);
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
        let mut fields = Table::args();
        let job_fields: Vec<usize> = jobs
            .iter()
            .map(|(j, _)| fields.index(claim_field(j)))
            .collect();
        let per_user = users
            .iter()
            .map(|user| scripts::FinishUser {
                member: Self::dispatch_member(batch, user),
                states: jobs
                    .iter()
                    .zip(&job_fields)
                    .filter(|((j, _), _)| j.user == *user)
                    .map(|((j, s), field)| scripts::FinishState {
                        id: j.id(),
                        field: *field,
                        state: s.as_ref(),
                    })
                    .collect(),
                counts: user_deltas(user, counts),
            })
            .collect();
        let req = scripts::FinishRequest {
            holder,
            seq,
            users: &users,
            fields: job_fields.clone(),
            per_user,
            checkpoints: checkpoints
                .iter()
                .map(|(_, cp)| json(cp))
                .collect::<Result<_, Error>>()?,
            linger_ms: HAND_BACK_SETTLE.as_millis() as u64,
            keep: jobs
                .iter()
                .zip(&job_fields)
                .filter(|((_, state), _)| *state == Some(JobState::Queued))
                .map(|(_, field)| *field)
                .collect(),
        };
        let mut call = scripts::FINISH.key(self.k(&["intent", batch]));
        call.key(self.k(&["claims"]))
            .key(run)
            .key(self.k(&["dispatch"]))
            .key(self.jobs_key(batch))
            .key(self.progress_key(batch));
        for (key, _) in checkpoints {
            call.key(self.checkpoint_key(key));
        }
        call.arg(request(&req)?).arg(fields.names);
        call.invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("finish script", e))?;
        Ok(())
    }

    // ---- leadership ----

    /// Takes (or keeps) the coordinator lease. True when `holder` holds it now.
    pub async fn acquire_leader(&self, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let got: i64 = scripts::LEADER_ACQUIRE
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
        let kept: i64 = scripts::LEADER_RENEW
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
        scripts::LEADER_RELEASE
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
