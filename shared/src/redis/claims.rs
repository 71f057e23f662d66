//! A worker's claims on a delivery's jobs: claim, renew (with progress and checkpoints)
//! and finish, each one Lua script for a whole delivery (`lua/claim.lua`,
//! `lua/renew.lua`, `lua/finish.lua`).

use std::time::Duration;

use crate::domain::job::{Checkpoint, CheckpointKey, FolderJob};
use crate::domain::status::JobState;
use crate::error::Error;
use crate::redis::scripts::{self, Table};
use crate::redis::{store_error, RedisStore};

use super::control::*;

impl RedisStore {
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
        call.arg(json(&req)?).arg(fields.names);
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
        call.arg(json(&req)?).arg(fields.names);
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
        call.arg(json(&req)?).arg(fields.names);
        call.invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("finish script", e))?;
        Ok(())
    }
}
