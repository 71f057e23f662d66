//! Claims: before a delivery's jobs run, its worker claims their target folders (DESIGN.md
//! invariant 5: one writer per target folder) and learns which jobs are still wanted, in
//! one call for the whole delivery. While they run, a keeper renews the claims, carries
//! the jobs' progress counts and the checkpoints they saved to Redis in batches, and
//! shuts the run's [`Fence`] when the claims are lost or the admin stops the user. The
//! delivery's end is recorded in one call too; the consumer loop then settles the
//! delivery by what it found.
//!
//! The embedded mode has one process and one writer per folder by construction: its
//! [`Unclaimed`] grants every job with a fence that never shuts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailferry_shared::control::{ClaimAnswer, Counts, Renewal};
use mailferry_shared::job::{Checkpoint, CheckpointKey, FolderJob};
use mailferry_shared::lease::{Fence, LeaseTiming};
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::status::{Intent, JobState};
use mailferry_shared::store::StateStore;
use mailferry_shared::Error as SharedError;

/// A run's hold on a delivery's jobs.
pub struct Claim {
    /// One answer per job of the delivery, in order.
    pub answers: Vec<ClaimAnswer>,
    /// Shuts when the claims lapse or the admin stops the user.
    pub fence: Arc<Fence>,
    /// The admin stopped (or closed) the user while the jobs ran: the delivery is
    /// settled, not handed back.
    pub user_stopped: Arc<AtomicBool>,
    run: Option<Run>,
}

/// A cluster run: its holder token (unique per run), the jobs granted to it, the keeper.
struct Run {
    holder: String,
    granted: Vec<FolderJob>,
    keeper: tokio::task::JoinHandle<Batcher>,
    stop_keeper: Arc<tokio::sync::Notify>,
}

/// How a job's run ended, for its state.
#[derive(Debug, Clone)]
pub enum JobEnd {
    Done {
        matched: u64,
        flags_updated: u64,
        /// The folder's counts disagree after the pass (see `JobReport::mismatch`).
        mismatch: Option<String>,
    },
    Failed(String),
    /// The server throttles the account: the job waits for the pause to end.
    Throttled(String),
    /// Not finished and not failed: handed back to the queue (or stopped by the admin).
    HandedBack,
}

pub trait Claims: Send + Sync + 'static {
    /// Claims a delivery's jobs (one round trip in the cluster).
    fn claim(&self, jobs: &[FolderJob]) -> impl Future<Output = Result<Claim, SharedError>> + Send;
    /// Records how the granted jobs ended (`ends`: by job id; a granted job without an
    /// end keeps its state) and lets the claims go.
    fn finish(
        &self,
        claim: Claim,
        ends: &[(FolderJob, JobEnd)],
    ) -> impl Future<Output = Result<(), SharedError>> + Send;
    /// How long to wait before a busy job is offered again.
    fn busy_delay(&self) -> Duration;
}

/// The embedded mode: every job runs, nothing is recorded here.
pub struct Unclaimed;

impl Claims for Unclaimed {
    async fn claim(&self, jobs: &[FolderJob]) -> Result<Claim, SharedError> {
        Ok(Claim {
            answers: vec![ClaimAnswer::Granted; jobs.len()],
            fence: Arc::new(Fence::open_ended()),
            user_stopped: Arc::new(AtomicBool::new(false)),
            run: None,
        })
    }
    async fn finish(&self, _: Claim, _: &[(FolderJob, JobEnd)]) -> Result<(), SharedError> {
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

    /// What the jobs have counted since the last take, summed per user.
    fn take(&self, jobs: &[FolderJob]) -> Vec<(String, Counts)> {
        let mut all = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        let mut per_user: HashMap<&str, HashMap<&'static str, i64>> = HashMap::new();
        for job in jobs {
            if let Some(counts) = all.remove(&job.id()) {
                let user = per_user.entry(job.user.as_str()).or_default();
                for (field, delta) in counts {
                    *user.entry(field).or_default() += delta;
                }
            }
        }
        let mut out: Vec<(String, Counts)> = per_user
            .into_iter()
            .map(|(user, counts)| {
                let mut counts: Counts = counts.into_iter().collect();
                counts.sort();
                (user.to_string(), counts)
            })
            .collect();
        out.sort();
        out
    }
}

/// The cluster worker's checkpoint store: what a claim read comes first, what the
/// engine saves waits in memory until the run's keeper or its end writes it, in the
/// claim's own script (so a run that lost its claim writes none). Nothing is written
/// ahead of a copy: a checkpoint that never reaches Redis costs the next run a search
/// above its bound (`Checkpoint::target_uidnext`), never a duplicate.
pub struct BufferedCheckpoints {
    store: RedisStore,
    /// Read by a claim, for the jobs it granted; taken by the engine's first load.
    claimed: Mutex<HashMap<CheckpointKey, Option<Checkpoint>>>,
    /// The engine's latest save of each folder the delivery holds, and whether it is
    /// still to be written (a later job of the delivery loads it from here).
    saved: Mutex<HashMap<CheckpointKey, (Checkpoint, bool)>>,
}

impl BufferedCheckpoints {
    pub fn new(store: RedisStore) -> Self {
        BufferedCheckpoints {
            store,
            claimed: Mutex::default(),
            saved: Mutex::default(),
        }
    }

    fn remember(&self, jobs: &[FolderJob], found: Vec<Option<Checkpoint>>) {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        for (job, cp) in jobs.iter().zip(found) {
            claimed.insert(job.checkpoint_key(), cp);
        }
    }

    /// The delivery ended: what it read and saved is Redis's business again.
    fn forget(&self, jobs: &[FolderJob]) {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        for job in jobs {
            claimed.remove(&job.checkpoint_key());
            saved.remove(&job.checkpoint_key());
        }
    }

    /// The checkpoints the jobs saved since the last take.
    fn take(&self, jobs: &[FolderJob]) -> Vec<(CheckpointKey, Checkpoint)> {
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for job in jobs {
            let key = job.checkpoint_key();
            if let Some((cp, unwritten)) = saved.get_mut(&key) {
                if std::mem::take(unwritten) && !out.iter().any(|(k, _)| *k == key) {
                    out.push((key, cp.clone()));
                }
            }
        }
        out
    }
}

impl StateStore for BufferedCheckpoints {
    async fn load_checkpoint(
        &self,
        key: &CheckpointKey,
    ) -> Result<Option<Checkpoint>, SharedError> {
        if let Some((cp, _)) = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return Ok(Some(cp.clone()));
        }
        let claimed = self
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        match claimed {
            Some(cp) => Ok(cp),
            None => self.store.load_checkpoint(key).await,
        }
    }

    async fn save_checkpoint(
        &self,
        key: &CheckpointKey,
        checkpoint: &Checkpoint,
    ) -> Result<(), SharedError> {
        self.saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), (checkpoint.clone(), true));
        Ok(())
    }
}

/// A numbered batch of a run's progress and checkpoints.
type Sent = (u64, Vec<(String, Counts)>, Vec<(CheckpointKey, Checkpoint)>);

/// A run's batches: numbered, and a batch whose reply was lost is sent again with the
/// same number (Redis applies each number's counts once), never merged into the next.
struct Batcher {
    seq: u64,
    unconfirmed: Option<Sent>,
}

impl Batcher {
    /// The unconfirmed batch again, or a new one of what `take` collects.
    fn next(
        &mut self,
        take: impl FnOnce() -> (Vec<(String, Counts)>, Vec<(CheckpointKey, Checkpoint)>),
    ) -> Sent {
        if let Some(batch) = &self.unconfirmed {
            return batch.clone();
        }
        self.seq += 1;
        let (counts, cps) = take();
        let batch = (self.seq, counts, cps);
        self.unconfirmed = Some(batch.clone());
        batch
    }
}

/// Claims in Redis, for the cluster workers.
pub struct RedisClaims {
    store: RedisStore,
    timing: LeaseTiming,
    pending: Arc<PendingCounts>,
    checkpoints: Arc<BufferedCheckpoints>,
    worker: String,
}

impl RedisClaims {
    pub fn new(
        store: RedisStore,
        claim_ttl: Duration,
        pending: Arc<PendingCounts>,
        checkpoints: Arc<BufferedCheckpoints>,
    ) -> Self {
        RedisClaims {
            store,
            timing: LeaseTiming { ttl: claim_ttl },
            pending,
            checkpoints,
            worker: format!("{}-{}", std::process::id(), fastrand::u64(..) & 0xffff_ffff),
        }
    }
}

impl Claims for RedisClaims {
    async fn claim(&self, jobs: &[FolderJob]) -> Result<Claim, SharedError> {
        let holder = format!("{}-{:016x}", self.worker, fastrand::u64(..));
        let sent = Instant::now();
        let (answers, found) = self
            .store
            .claim_jobs(jobs, &holder, self.timing.ttl)
            .await?;
        let granted: Vec<FolderJob> = jobs
            .iter()
            .zip(&answers)
            .filter(|(_, a)| **a == ClaimAnswer::Granted)
            .map(|(j, _)| j.clone())
            .collect();
        let found = jobs
            .iter()
            .zip(&answers)
            .zip(found)
            .filter(|((_, a), _)| **a == ClaimAnswer::Granted)
            .map(|(_, cp)| cp)
            .collect();
        self.checkpoints.remember(&granted, found);
        let fence = Arc::new(Fence::until(self.timing.fence_deadline(sent)));
        let user_stopped = Arc::new(AtomicBool::new(false));
        let stop_keeper = Arc::new(tokio::sync::Notify::new());
        let keeper = tokio::spawn(keep(
            Keeper {
                store: self.store.clone(),
                timing: self.timing,
                pending: self.pending.clone(),
                checkpoints: self.checkpoints.clone(),
                jobs: granted.clone(),
                holder: holder.clone(),
            },
            fence.clone(),
            user_stopped.clone(),
            stop_keeper.clone(),
        ));
        Ok(Claim {
            answers,
            fence,
            user_stopped,
            run: Some(Run {
                holder,
                granted,
                keeper,
                stop_keeper,
            }),
        })
    }

    async fn finish(&self, claim: Claim, ends: &[(FolderJob, JobEnd)]) -> Result<(), SharedError> {
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
        let end_of: HashMap<String, &JobEnd> = ends.iter().map(|(j, e)| (j.id(), e)).collect();
        let mut states = Vec::with_capacity(run.granted.len());
        for job in &run.granted {
            let state = match end_of.get(&job.id()) {
                Some(JobEnd::Done {
                    matched,
                    flags_updated,
                    mismatch,
                }) => {
                    self.pending.add(job, "matched", *matched as i64);
                    self.pending
                        .add(job, "flags_updated", *flags_updated as i64);
                    Some(JobState::Done {
                        verified: mismatch.is_none(),
                        mismatch: mismatch.clone(),
                    })
                }
                Some(JobEnd::Failed(reason)) => {
                    self.pending.add(job, "failed_jobs", 1);
                    Some(JobState::Failed {
                        reason: reason.clone(),
                    })
                }
                Some(JobEnd::Throttled(why)) => Some(JobState::Throttled {
                    server_says: why.clone(),
                }),
                // Queued again: whoever runs it next (or the coordinator's recheck after
                // a restart of a stopped user) finds it open.
                Some(JobEnd::HandedBack) => Some(JobState::Queued),
                None => None,
            };
            states.push((job.clone(), state));
        }
        // An unconfirmed batch goes first, under its own number; what is left goes
        // with the finish under the next.
        if let Some((seq, counts, cps)) = batcher.unconfirmed.take() {
            let _ = self
                .store
                .renew_claims(
                    &run.granted,
                    &run.holder,
                    self.timing.ttl,
                    seq,
                    &counts,
                    &cps,
                )
                .await;
        }
        let (seq, counts, cps) = batcher.next(|| {
            (
                self.pending.take(&run.granted),
                self.checkpoints.take(&run.granted),
            )
        });
        self.checkpoints.forget(&run.granted);
        let mut attempt = 0;
        loop {
            match self
                .store
                .finish_claims(&states, &run.holder, seq, &counts, &cps)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(holder = %run.holder, error = %e, "could not record the jobs' end; retrying");
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

/// What a run's keeper needs.
struct Keeper {
    store: RedisStore,
    timing: LeaseTiming,
    pending: Arc<PendingCounts>,
    checkpoints: Arc<BufferedCheckpoints>,
    jobs: Vec<FolderJob>,
    holder: String,
}

/// Renews the claims every third of their time to live, carrying the run's progress and
/// checkpoints, until told to stop. Returns the batcher so the finish can go on
/// numbering.
async fn keep(
    k: Keeper,
    fence: Arc<Fence>,
    user_stopped: Arc<AtomicBool>,
    stop: Arc<tokio::sync::Notify>,
) -> Batcher {
    let mut batcher = Batcher {
        seq: 0,
        unconfirmed: None,
    };
    if k.jobs.is_empty() {
        stop.notified().await;
        return batcher;
    }
    loop {
        tokio::select! {
            _ = stop.notified() => return batcher,
            _ = tokio::time::sleep(k.timing.renew_every()) => {}
        }
        let (seq, counts, cps) =
            batcher.next(|| (k.pending.take(&k.jobs), k.checkpoints.take(&k.jobs)));
        let sent = Instant::now();
        match k
            .store
            .renew_claims(&k.jobs, &k.holder, k.timing.ttl, seq, &counts, &cps)
            .await
        {
            Ok(Renewal::Held(intents)) => {
                batcher.unconfirmed = None;
                fence.extend(k.timing.fence_deadline(sent));
                if intents
                    .values()
                    .any(|i| matches!(i, Intent::Stopped | Intent::Closed | Intent::Idle))
                {
                    user_stopped.store(true, Ordering::SeqCst);
                    fence.revoke("the admin stopped the user");
                }
            }
            Ok(Renewal::Lost) => {
                // Nothing of the batch was applied (the script checks the claims first),
                // and its checkpoints must not be: another run owns the folders now.
                batcher.unconfirmed = None;
                fence.revoke("the claim on the folder lapsed and may be another worker's");
            }
            Err(e) => {
                // The fence shuts by itself if this goes on past the claims' lifetime.
                tracing::warn!(holder = %k.holder, error = %e, "could not renew the claims");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::job::WireName;

    fn job(user: &str, folder: &str) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: user.into(),
            source_folder: WireName(folder.to_string().into()),
            target_folder: WireName(folder.to_string().into()),
            uid_range: None,
            pass: 1,
            group: None,
        }
    }

    #[test]
    fn an_unconfirmed_batch_is_resent_unchanged_and_new_counts_wait() {
        let a = job("u", "INBOX");
        let pending = PendingCounts::default();
        let mut b = Batcher {
            seq: 0,
            unconfirmed: None,
        };
        pending.add(&a, "copied", 5);
        let jobs = [a.clone()];
        let take = || (pending.take(&jobs), Vec::new());
        let first = b.next(take);
        assert_eq!(first.0, 1);
        assert_eq!(first.1, vec![("u".to_string(), vec![("copied", 5)])]);
        pending.add(&a, "copied", 2);
        // the reply was lost: the same batch again, the 2 wait for the next number
        let again = b.next(|| (pending.take(&jobs), Vec::new()));
        assert_eq!((again.0, &again.1), (1, &first.1));
        b.unconfirmed = None;
        let next = b.next(|| (pending.take(&jobs), Vec::new()));
        assert_eq!(
            (next.0, next.1),
            (2, vec![("u".to_string(), vec![("copied", 2)])])
        );
    }

    #[test]
    fn counts_are_summed_per_user_and_taken_once() {
        let (a, b, c) = (job("u", "INBOX"), job("u", "Sent"), job("v", "INBOX"));
        let pending = PendingCounts::default();
        pending.add(&a, "copied", 5);
        pending.add(&b, "copied", 2);
        pending.add(&c, "skipped", 1);
        let jobs = [a.clone(), b.clone(), c.clone()];
        assert_eq!(
            pending.take(&jobs),
            vec![
                ("u".to_string(), vec![("copied", 7)]),
                ("v".to_string(), vec![("skipped", 1)])
            ]
        );
        assert!(pending.take(&jobs).is_empty());
        // a job not asked for keeps its counts
        pending.add(&a, "copied", 1);
        assert!(pending.take(&[b]).is_empty());
        assert_eq!(
            pending.take(&[a]),
            vec![("u".to_string(), vec![("copied", 1)])]
        );
    }
}
