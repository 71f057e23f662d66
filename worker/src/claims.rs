//! Claims: before a job runs, its worker claims the job's target folder (DESIGN.md
//! invariant 5: one writer per target folder) and learns whether the job is still
//! wanted. While it runs, a keeper renews the claim, carries the job's progress counts
//! to Redis in batches, and shuts the run's [`Fence`] when the claim is lost or the
//! admin stops the user. The consumer loop settles the delivery by what it finds.
//!
//! The embedded mode has one process and one writer per folder by construction: its
//! [`Unclaimed`] grants every job with a fence that never shuts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailferry_shared::control::{ClaimAnswer, Counts, Renewal};
use mailferry_shared::job::FolderJob;
use mailferry_shared::lease::{Fence, LeaseTiming};
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::status::{Intent, JobState};
use mailferry_shared::Error as SharedError;

use crate::progress::JobReport;

/// A run's hold on its job.
pub struct Claim {
    pub fence: Arc<Fence>,
    /// The admin stopped (or closed) the user while the job ran: the delivery is
    /// settled, not handed back.
    pub user_stopped: Arc<AtomicBool>,
    run: Option<Run>,
}

impl Claim {
    fn unbounded() -> Self {
        Claim {
            fence: Arc::new(Fence::open_ended()),
            user_stopped: Arc::new(AtomicBool::new(false)),
            run: None,
        }
    }
}

/// A cluster run: its holder token (unique per run) and the keeper task.
struct Run {
    holder: String,
    keeper: tokio::task::JoinHandle<Batcher>,
    stop_keeper: Arc<tokio::sync::Notify>,
}

pub enum Claimed {
    Run(Claim),
    /// Nothing to do (finished already, superseded by a newer pass, the user stopped).
    Skip(String),
    /// Another run writes to the same target folder now.
    Busy,
}

/// How a run ended, for its job's state.
pub enum JobEnd<'a> {
    Done(&'a JobReport),
    Failed(&'a str),
    /// The server throttles the account: the job waits for the pause to end.
    Throttled(&'a str),
    /// Not finished and not failed: handed back to the queue (or stopped by the admin).
    HandedBack,
}

pub trait Claims: Send + Sync + 'static {
    fn claim(&self, job: &FolderJob) -> impl Future<Output = Result<Claimed, SharedError>> + Send;
    fn finish(
        &self,
        claim: Claim,
        job: &FolderJob,
        end: JobEnd<'_>,
    ) -> impl Future<Output = Result<(), SharedError>> + Send;
    /// How long to wait before a busy job is offered again.
    fn busy_delay(&self) -> Duration;
}

/// The embedded mode: every job runs, nothing is recorded here.
pub struct Unclaimed;

impl Claims for Unclaimed {
    async fn claim(&self, _: &FolderJob) -> Result<Claimed, SharedError> {
        Ok(Claimed::Run(Claim::unbounded()))
    }
    async fn finish(&self, _: Claim, _: &FolderJob, _: JobEnd<'_>) -> Result<(), SharedError> {
        Ok(())
    }
    fn busy_delay(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// Progress counts of running jobs, by job id, waiting to be carried to Redis. The
/// progress sink adds; the keeper and the finish take.
#[derive(Default)]
pub struct PendingCounts {
    by_job: Mutex<HashMap<String, HashMap<&'static str, i64>>>,
}

impl PendingCounts {
    pub fn add(&self, job: &FolderJob, field: &'static str, delta: i64) {
        if delta == 0 {
            return;
        }
        let mut all = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        *all.entry(job.id()).or_default().entry(field).or_default() += delta;
    }

    fn take(&self, job_id: &str) -> Counts {
        let mut all = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts: Counts = all.remove(job_id).unwrap_or_default().into_iter().collect();
        counts.sort();
        counts
    }
}

/// A run's progress batches: numbered, and a batch whose reply was lost is sent again
/// with the same number (Redis applies each number once), never merged into the next.
struct Batcher {
    seq: u64,
    unconfirmed: Option<(u64, Counts)>,
}

impl Batcher {
    fn next(&mut self, pending: &PendingCounts, job_id: &str) -> (u64, Counts) {
        if let Some(batch) = &self.unconfirmed {
            return batch.clone();
        }
        self.seq += 1;
        let batch = (self.seq, pending.take(job_id));
        self.unconfirmed = Some(batch.clone());
        batch
    }
}

/// Claims in Redis, for the cluster workers.
pub struct RedisClaims {
    store: RedisStore,
    timing: LeaseTiming,
    pending: Arc<PendingCounts>,
    worker: String,
}

impl RedisClaims {
    pub fn new(store: RedisStore, claim_ttl: Duration, pending: Arc<PendingCounts>) -> Self {
        RedisClaims {
            store,
            timing: LeaseTiming { ttl: claim_ttl },
            pending,
            worker: format!("{}-{}", std::process::id(), fastrand::u64(..) & 0xffff_ffff),
        }
    }
}

impl Claims for RedisClaims {
    async fn claim(&self, job: &FolderJob) -> Result<Claimed, SharedError> {
        let holder = format!("{}-{:016x}", self.worker, fastrand::u64(..));
        let sent = Instant::now();
        match self.store.claim_job(job, &holder, self.timing.ttl).await? {
            ClaimAnswer::Skip(why) => return Ok(Claimed::Skip(why)),
            ClaimAnswer::Busy => return Ok(Claimed::Busy),
            ClaimAnswer::Granted => {}
        }
        let fence = Arc::new(Fence::until(self.timing.fence_deadline(sent)));
        let user_stopped = Arc::new(AtomicBool::new(false));
        let stop_keeper = Arc::new(tokio::sync::Notify::new());
        let keeper = tokio::spawn(keep(
            self.store.clone(),
            self.timing,
            self.pending.clone(),
            job.clone(),
            holder.clone(),
            fence.clone(),
            user_stopped.clone(),
            stop_keeper.clone(),
        ));
        Ok(Claimed::Run(Claim {
            fence,
            user_stopped,
            run: Some(Run {
                holder,
                keeper,
                stop_keeper,
            }),
        }))
    }

    async fn finish(
        &self,
        claim: Claim,
        job: &FolderJob,
        end: JobEnd<'_>,
    ) -> Result<(), SharedError> {
        let Some(run) = claim.run else {
            return Ok(());
        };
        run.stop_keeper.notify_one();
        // (The keeper only ends when told to; should it have panicked, numbering goes on
        // far above anything it can have sent, so nothing new is taken for a replay.)
        let mut batcher = run.keeper.await.unwrap_or(Batcher {
            seq: u64::MAX / 2,
            unconfirmed: None,
        });
        let state = match end {
            JobEnd::Done(report) => {
                for (field, n) in [
                    ("matched", report.matched),
                    ("flags_updated", report.flags_updated),
                ] {
                    self.pending.add(job, field, n as i64);
                }
                let mismatch = report.mismatch(&job.source_folder.display());
                Some(JobState::Done {
                    verified: mismatch.is_none(),
                    mismatch,
                })
            }
            JobEnd::Failed(reason) => {
                self.pending.add(job, "failed_jobs", 1);
                Some(JobState::Failed {
                    reason: reason.to_string(),
                })
            }
            JobEnd::Throttled(why) => Some(JobState::Throttled {
                server_says: why.to_string(),
            }),
            // Queued again: whoever runs it next (or the coordinator's recheck after a
            // restart of a stopped user) finds it open.
            JobEnd::HandedBack => Some(JobState::Queued),
        };
        // An unconfirmed batch goes first, under its own number; what is left goes
        // with the finish under the next.
        if let Some((seq, counts)) = batcher.unconfirmed.take() {
            let _ = self
                .store
                .renew_claim(job, &run.holder, self.timing.ttl, seq, &counts)
                .await;
        }
        let (seq, counts) = batcher.next(&self.pending, &job.id());
        let mut attempt = 0;
        loop {
            match self
                .store
                .finish_job(job, &run.holder, state.as_ref(), seq, &counts)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(job = %job.id(), error = %e, "could not record the job's end; retrying");
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn busy_delay(&self) -> Duration {
        let third = self.timing.renew_every();
        third
            .min(Duration::from_secs(10))
            .mul_f64(0.75 + fastrand::f64() / 2.0)
    }
}

/// Renews the claim every third of its time to live, carrying the run's progress, until
/// told to stop. Returns the progress batcher so the finish can go on numbering.
#[allow(clippy::too_many_arguments)]
async fn keep(
    store: RedisStore,
    timing: LeaseTiming,
    pending: Arc<PendingCounts>,
    job: FolderJob,
    holder: String,
    fence: Arc<Fence>,
    user_stopped: Arc<AtomicBool>,
    stop: Arc<tokio::sync::Notify>,
) -> Batcher {
    let job_id = job.id();
    let mut batcher = Batcher {
        seq: 0,
        unconfirmed: None,
    };
    loop {
        tokio::select! {
            _ = stop.notified() => return batcher,
            _ = tokio::time::sleep(timing.renew_every()) => {}
        }
        let (seq, counts) = batcher.next(&pending, &job_id);
        let sent = Instant::now();
        match store
            .renew_claim(&job, &holder, timing.ttl, seq, &counts)
            .await
        {
            Ok(Renewal::Held(intent)) => {
                batcher.unconfirmed = None;
                fence.extend(timing.fence_deadline(sent));
                if matches!(intent, Intent::Stopped | Intent::Closed | Intent::Idle) {
                    user_stopped.store(true, Ordering::SeqCst);
                    fence.revoke("the admin stopped the user");
                }
            }
            Ok(Renewal::Lost) => {
                // The numbered batch was not applied (the script checks the claim first).
                batcher.unconfirmed = None;
                fence.revoke("the claim on the folder lapsed and may be another worker's");
            }
            Err(e) => {
                // The fence shuts by itself if this goes on past the claim's lifetime.
                tracing::warn!(job = %job_id, error = %e, "could not renew the claim");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::job::WireName;

    #[test]
    fn an_unconfirmed_batch_is_resent_unchanged_and_new_counts_wait() {
        let job = FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName("INBOX".into()),
            target_folder: WireName("INBOX".into()),
            uid_range: None,
            pass: 1,
            group: None,
        };
        let pending = PendingCounts::default();
        let mut b = Batcher {
            seq: 0,
            unconfirmed: None,
        };
        pending.add(&job, "copied", 5);
        let first = b.next(&pending, &job.id());
        assert_eq!(first, (1, vec![("copied", 5)]));
        pending.add(&job, "copied", 2);
        // the reply was lost: the same batch again, the 2 wait for the next number
        assert_eq!(b.next(&pending, &job.id()), first);
        b.unconfirmed = None;
        assert_eq!(b.next(&pending, &job.id()), (2, vec![("copied", 2)]));
    }
}
