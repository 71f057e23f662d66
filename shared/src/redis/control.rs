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

use serde::{Deserialize, Serialize};

use crate::domain::job::{Checkpoint, CheckpointKey, FolderJob};
use crate::domain::progress::Counter;
use crate::domain::status::{Intent, JobState};
use crate::error::Error;
use crate::redis::scripts::Delta;
use crate::redis::RedisStore;

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
pub(super) fn parse_job_states(
    user: &str,
    value: Option<&str>,
) -> Result<Vec<(String, JobState)>, Error> {
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
pub(super) type Column = Vec<Option<String>>;

/// Users read per pipeline by [`RedisStore::user_states`].
pub(super) const STATUS_CHUNK: usize = 500;

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
pub type Counts = Vec<(Counter, i64)>;

pub(crate) fn intent_name(intent: Intent) -> &'static str {
    match intent {
        Intent::Idle => "idle",
        Intent::Active => "active",
        Intent::Stopped => "stopped",
        Intent::Closing => "closing",
        Intent::Closed => "closed",
    }
}

pub(super) fn parse_intent(text: &str) -> Intent {
    match text {
        "active" => Intent::Active,
        "stopped" => Intent::Stopped,
        "closing" => Intent::Closing,
        "closed" => Intent::Closed,
        _ => Intent::Idle,
    }
}

pub(super) fn json<T: Serialize>(value: &T) -> Result<String, Error> {
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
pub(super) fn claim_field(job: &FolderJob) -> Vec<u8> {
    let mut field = job.user.as_bytes().to_vec();
    field.push(b'\t');
    field.extend_from_slice(job.target_folder.as_bytes());
    field
}

/// The distinct users of some jobs, in order of first appearance.
pub(super) fn users_of<'a>(jobs: impl Iterator<Item = &'a FolderJob>) -> Vec<&'a str> {
    let mut users: Vec<&str> = Vec::new();
    for job in jobs {
        if !users.contains(&job.user.as_str()) {
            users.push(&job.user);
        }
    }
    users
}

/// The batch of a delivery's jobs, which are all of one batch.
pub(super) fn one_batch<'a>(
    mut jobs: impl Iterator<Item = &'a FolderJob>,
) -> Result<&'a str, Error> {
    let batch = jobs.next().map_or("", |j| j.batch.as_str());
    if jobs.any(|j| j.batch != batch) {
        return Err(Error::Store("a delivery's jobs are of one batch".into()));
    }
    Ok(batch)
}

/// A user's counters with a delta, as the scripts take them (no zero deltas).
pub(super) fn user_deltas<'a>(user: &str, counts: &'a [(String, Counts)]) -> Vec<Delta<'a>> {
    counts
        .iter()
        .filter(|(u, _)| u == user)
        .flat_map(|(_, c)| c.iter())
        .filter(|(_, d)| *d != 0)
        .map(|(counter, d)| (counter.name(), *d))
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

    pub(super) fn dispatch_member(batch: &str, user: &str) -> String {
        format!("{batch}\t{user}")
    }
}
