//! Passes and their jobs, the coordinator's side: pass records, job states and specs,
//! users' states for the status, and the dispatch set the workers mark.

use std::collections::HashMap;

use redis::AsyncCommands;

use crate::domain::job::FolderJob;
use crate::domain::status::{Intent, JobState};
use crate::error::Error;
use crate::redis::scripts;
use crate::redis::{store_error, RedisStore};

use super::control::*;

impl RedisStore {
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
                    .get(crate::domain::progress::Counter::Copied.name())
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
            .arg(json(&req)?)
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
}
