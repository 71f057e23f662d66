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

use mailferry_shared::domain::job::{Checkpoint, CheckpointKey, FolderJob};
use mailferry_shared::domain::progress::Counter;
use mailferry_shared::domain::status::{FolderCounts, Intent, JobState};
use mailferry_shared::redis::control::{ClaimAnswer, Counts, Renewal, RunRenewal};
use mailferry_shared::redis::lease::{Fence, LeaseTiming};
use mailferry_shared::redis::RedisStore;
use mailferry_shared::store::StateStore;
use mailferry_shared::Error as SharedError;

/// A run's hold on a delivery's jobs.
pub struct Claim {
    /// One answer per job of the delivery, in order.
    pub answers: Vec<ClaimAnswer>,
    /// Per user of the delivery (a delivery may carry several small users' jobs).
    fences: HashMap<String, UserFence>,
    run: Option<Run>,
}

/// What stops a user's jobs of a run.
#[derive(Clone)]
pub struct UserFence {
    /// Shuts when the claims lapse (every user's) or the admin stops this user.
    pub fence: Arc<Fence>,
    /// The admin stopped (or closed) the user while its jobs ran: they are settled,
    /// not handed back.
    pub stopped: Arc<AtomicBool>,
}

impl Claim {
    /// The fence of `user`'s jobs (a user the claim does not know gets one that is shut).
    pub fn fence(&self, user: &str) -> UserFence {
        self.fences.get(user).cloned().unwrap_or_else(|| {
            let fence = Arc::new(Fence::open_ended());
            fence.revoke("the claim does not cover this user");
            UserFence {
                fence,
                stopped: Arc::new(AtomicBool::new(false)),
            }
        })
    }
}

impl Claim {
    /// Says that `job` runs now (`running`) or has returned: a stopped user's other jobs
    /// are recorded at once, a running one when it returns. (A delivery's users run at
    /// once, each its jobs one after another.)
    pub fn running(&self, job: &FolderJob, running: bool) {
        if let Some(run) = &self.run {
            let mut now = run.state.running.lock().unwrap_or_else(|e| e.into_inner());
            if running {
                now.insert(job.id());
            } else {
                now.remove(&job.id());
            }
        }
    }
}

/// One fence per user of `jobs`, each until `deadline` (`None`: open-ended).
fn fences_for(jobs: &[FolderJob], deadline: Option<Instant>) -> HashMap<String, UserFence> {
    let mut out = HashMap::new();
    for job in jobs {
        out.entry(job.user.clone()).or_insert_with(|| UserFence {
            fence: Arc::new(deadline.map_or_else(Fence::open_ended, Fence::until)),
            stopped: Arc::new(AtomicBool::new(false)),
        });
    }
    out
}

/// A cluster run: its holder token (unique per run), the jobs granted to it and not
/// released yet (shared with the keeper, which holds the lock while it renews), the
/// keeper.
struct Run {
    holder: String,
    granted: Arc<tokio::sync::Mutex<Vec<FolderJob>>>,
    keeper: tokio::task::JoinHandle<Batcher>,
    stop_keeper: Arc<tokio::sync::Notify>,
    state: Arc<RunState>,
}

/// What a run's claim, keeper and consumer share, and how one user's ends are recorded
/// while the run goes on with other users' jobs (the admin stopped that user): by the
/// keeper for the user's jobs not started, by the consumer for the one that was
/// running. Each such call is numbered (`P:run:<holder>:released`), so a replay applies
/// its counts once.
struct RunState {
    store: RedisStore,
    renewals: Renewals,
    pending: Arc<PendingCounts>,
    checkpoints: Arc<BufferedCheckpoints>,
    holder: String,
    granted: Arc<tokio::sync::Mutex<Vec<FolderJob>>>,
    /// The jobs the consumer runs now, one per user at most (the keeper leaves them to
    /// the consumer).
    running: Mutex<std::collections::HashSet<String>>,
    seq: std::sync::atomic::AtomicU64,
}

impl RunState {
    /// Records how `user`'s granted jobs ended (by `ends`; one without an end is handed
    /// back) and lets their claims go, except the running job with `skip_running`.
    /// Held meanwhile, the lock on the granted jobs keeps any renewal from counting on
    /// the released claims. A call that fails puts the jobs back for the finish; its
    /// counts, which it may or may not have applied, are not sent again.
    async fn release_user(&self, user: &str, ends: &[(FolderJob, JobEnd)], skip_running: bool) {
        let running = if skip_running {
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            Default::default()
        };
        let mut granted = self.granted.lock().await;
        let (mine, others): (Vec<FolderJob>, Vec<FolderJob>) = granted
            .drain(..)
            .partition(|j| j.user == user && !running.contains(&j.id()));
        *granted = others;
        if mine.is_empty() {
            return;
        }
        let mut ends = ends.to_vec();
        for job in &mine {
            if !ends.iter().any(|(j, _)| j.id() == job.id()) {
                ends.push((job.clone(), JobEnd::HandedBack));
            }
        }
        let states = states_of(&self.pending, &mine, &ends);
        let counts = self.pending.take(&mine);
        let cps = self.checkpoints.take(&mine);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut attempt = 0;
        loop {
            match self
                .store
                .finish_user_claims(&states, &self.holder, seq, &counts, &cps)
                .await
            {
                Ok(()) => {
                    self.checkpoints.forget(&mine);
                    tracing::info!(user, jobs = mine.len(), "the stopped user's jobs are recorded; the delivery goes on with the others");
                    return;
                }
                Err(e) if attempt < 2 => {
                    attempt += 1;
                    tracing::warn!(holder = %self.holder, user, error = %e, "could not record the stopped user's jobs; retrying");
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
                Err(e) => {
                    tracing::warn!(holder = %self.holder, user, error = %e, "could not record the stopped user's jobs; the delivery's end will");
                    self.checkpoints.restore(cps);
                    granted.extend(mine);
                    return;
                }
            }
        }
    }
}

/// How a job's run ended, for its state.
#[derive(Debug, Clone)]
pub enum JobEnd {
    Done {
        matched: u64,
        flags_updated: u64,
        /// The folder's counts disagree after the pass (see `JobReport::mismatch`).
        mismatch: Option<String>,
        /// The folder's counts at its end, when this job ended the folder's pass.
        counts: Option<FolderCounts>,
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
    /// Records how one user's granted jobs ended and lets their claims go while the run
    /// goes on with other users' jobs (the admin stopped this user): its jobs show
    /// their ends at once, not when the delivery's last user is done. If that fails
    /// they are recorded with the rest at the finish.
    fn release_user(
        &self,
        _claim: &Claim,
        _user: &str,
        _ends: &[(FolderJob, JobEnd)],
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// How long to wait before a busy job is offered again.
    fn busy_delay(&self) -> Duration;
}

/// The embedded mode: every job runs, nothing is recorded here.
pub struct Unclaimed;

impl Claims for Unclaimed {
    async fn claim(&self, jobs: &[FolderJob]) -> Result<Claim, SharedError> {
        Ok(Claim {
            answers: vec![ClaimAnswer::Granted; jobs.len()],
            fences: fences_for(jobs, None),
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
    by_job: Mutex<HashMap<String, HashMap<Counter, i64>>>,
}

impl PendingCounts {
    pub fn add(&self, job: &FolderJob, field: Counter, delta: i64) {
        if delta == 0 {
            return;
        }
        let mut all = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        *all.entry(job.id()).or_default().entry(field).or_default() += delta;
    }

    /// What the jobs have counted since the last take, summed per user.
    fn take(&self, jobs: &[FolderJob]) -> Vec<(String, Counts)> {
        let mut all = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        let mut per_user: HashMap<&str, HashMap<Counter, i64>> = HashMap::new();
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

    /// Checkpoints taken for a write that failed: to be written with the next.
    fn restore(&self, cps: Vec<(CheckpointKey, Checkpoint)>) {
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        for (key, cp) in cps {
            saved.entry(key).or_insert((cp, true)).1 = true;
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

/// How long the renewal writer waits, after a keeper's ask, for the other keepers of
/// the same tick.
const RENEW_LINGER: Duration = Duration::from_millis(10);
/// Claim fields sent at most in one renewal call (well within what Lua unpacks).
const MAX_RENEW_FIELDS: usize = 2000;
/// Finished runs whose numbers are forgotten without waiting for a renewal to carry
/// them (a worker whose deliveries are all short renews nothing).
const MAX_FORGET: usize = 500;

/// A keeper's renewal, waiting in the writer.
struct RenewAsk {
    jobs: Vec<FolderJob>,
    holder: String,
    batch: Sent,
    reply: tokio::sync::oneshot::Sender<Result<Renewal, SharedError>>,
}

enum ToWriter {
    Renew(RenewAsk),
    /// A finished run: its last renewal number is no longer needed.
    Forget(String),
}

/// A worker's renewals: its keepers tick together (every third of the claims' time to
/// live, counted from one instant of the process), and one writer task sends what they
/// ask within [`RENEW_LINGER`] as one script call, so that a worker with eight
/// deliveries in flight renews them in a handful of Redis commands, not eight times as
/// many (issue 3's budget of Redis commands per message).
#[derive(Clone)]
struct Renewals {
    tx: tokio::sync::mpsc::UnboundedSender<ToWriter>,
    epoch: tokio::time::Instant,
}

impl Renewals {
    fn start(store: RedisStore, worker: String, ttl: Duration) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_renewals(store, worker, ttl, rx));
        Renewals {
            tx,
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The worker's next tick: within `every` from now.
    fn next_tick(&self, every: Duration) -> tokio::time::Instant {
        let every = every.as_nanos().max(1);
        let n = self.epoch.elapsed().as_nanos() / every + 1;
        self.epoch + Duration::from_nanos((n * every).min(u64::MAX as u128) as u64)
    }

    async fn renew(
        &self,
        jobs: Vec<FolderJob>,
        holder: String,
        batch: Sent,
    ) -> Result<Renewal, SharedError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = RenewAsk {
            jobs,
            holder,
            batch,
            reply,
        };
        if self.tx.send(ToWriter::Renew(ask)).is_err() {
            return Err(SharedError::Store("the renewal writer has stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(SharedError::Store("the renewal writer has stopped".into())))
    }

    fn forget(&self, holder: String) {
        let _ = self.tx.send(ToWriter::Forget(holder));
    }
}

/// The renewal writer: collects asks for [`RENEW_LINGER`] after the first, sends them
/// (in calls of at most [`MAX_RENEW_FIELDS`] claims, one ask per run each) and answers
/// each. An error answers every ask of its call: each keeper sends its batch again
/// under the same number.
async fn write_renewals(
    store: RedisStore,
    worker: String,
    ttl: Duration,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<ToWriter>,
) {
    let mut forget: Vec<String> = Vec::new();
    let mut asks: Vec<RenewAsk> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut take = |msg| match msg {
            ToWriter::Renew(ask) => asks.push(ask),
            ToWriter::Forget(holder) => forget.push(holder),
        };
        take(first);
        let until = tokio::time::Instant::now() + RENEW_LINGER;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => take(msg),
                    None => break,
                },
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        if asks.is_empty() && forget.len() < MAX_FORGET {
            continue; // forgotten runs ride with the next renewal
        }
        while !asks.is_empty() || !forget.is_empty() {
            // One call: asks up to the field limit (at least one), one per run.
            let mut call: Vec<RenewAsk> = Vec::new();
            let mut fields = 0;
            let mut rest = Vec::new();
            for ask in asks.drain(..) {
                let fits = call.is_empty() || fields + ask.jobs.len() <= MAX_RENEW_FIELDS;
                if fits && !call.iter().any(|a| a.holder == ask.holder) {
                    fields += ask.jobs.len();
                    call.push(ask);
                } else {
                    rest.push(ask);
                }
            }
            asks = rest;
            let runs: Vec<RunRenewal<'_>> = call
                .iter()
                .map(|a| RunRenewal {
                    jobs: &a.jobs,
                    holder: &a.holder,
                    seq: a.batch.0,
                    counts: &a.batch.1,
                    checkpoints: &a.batch.2,
                })
                .collect();
            let gone = std::mem::take(&mut forget);
            let result = store.renew_runs(&worker, ttl, &runs, &gone).await;
            match result {
                Ok(renewals) => {
                    for (ask, renewal) in call.into_iter().zip(renewals) {
                        let _ = ask.reply.send(Ok(renewal));
                    }
                }
                Err(e) => {
                    forget = gone;
                    for ask in call {
                        let _ = ask.reply.send(Err(SharedError::Store(e.to_string())));
                    }
                    if asks.is_empty() {
                        break; // the forgotten runs wait for the next call
                    }
                }
            }
        }
    }
}

/// Claims in Redis, for the cluster workers.
pub struct RedisClaims {
    store: RedisStore,
    renewals: Renewals,
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
        let worker = format!("{}-{}", std::process::id(), fastrand::u64(..) & 0xffff_ffff);
        RedisClaims {
            renewals: Renewals::start(store.clone(), worker.clone(), claim_ttl),
            store,
            timing: LeaseTiming { ttl: claim_ttl },
            pending,
            checkpoints,
            worker,
        }
    }
}

/// The states to record for `jobs` from their ends (a job without an end keeps its
/// state); their end counts are added to the pending counts.
fn states_of(
    pending: &PendingCounts,
    jobs: &[FolderJob],
    ends: &[(FolderJob, JobEnd)],
) -> Vec<(FolderJob, Option<JobState>)> {
    let end_of: HashMap<String, &JobEnd> = ends.iter().map(|(j, e)| (j.id(), e)).collect();
    let mut states = Vec::with_capacity(jobs.len());
    for job in jobs {
        let state = match end_of.get(&job.id()) {
            Some(JobEnd::Done {
                matched,
                flags_updated,
                mismatch,
                counts,
            }) => {
                pending.add(job, Counter::Matched, *matched as i64);
                pending.add(job, Counter::FlagsUpdated, *flags_updated as i64);
                Some(JobState::Done {
                    verified: mismatch.is_none(),
                    mismatch: mismatch.clone(),
                    counts: *counts,
                })
            }
            Some(JobEnd::Failed(reason)) => {
                pending.add(job, Counter::FailedJobs, 1);
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
    states
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
        let fences = fences_for(jobs, Some(self.timing.fence_deadline(sent)));
        let stop_keeper = Arc::new(tokio::sync::Notify::new());
        let granted = Arc::new(tokio::sync::Mutex::new(granted));
        let state = Arc::new(RunState {
            store: self.store.clone(),
            renewals: self.renewals.clone(),
            pending: self.pending.clone(),
            checkpoints: self.checkpoints.clone(),
            holder: holder.clone(),
            granted: granted.clone(),
            running: Mutex::default(),
            seq: std::sync::atomic::AtomicU64::new(0),
        });
        let keeper = tokio::spawn(keep(
            self.timing,
            state.clone(),
            fences.clone(),
            stop_keeper.clone(),
        ));
        Ok(Claim {
            answers,
            fences,
            run: Some(Run {
                holder,
                granted,
                keeper,
                stop_keeper,
                state,
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
        let granted = std::mem::take(&mut *run.granted.lock().await);
        let states = states_of(&self.pending, &granted, ends);
        // An unconfirmed batch goes first, under its own number; what is left goes
        // with the finish under the next.
        if let Some(batch) = batcher.unconfirmed.take() {
            if !granted.is_empty() {
                let _ = self
                    .renewals
                    .renew(granted.clone(), run.holder.clone(), batch)
                    .await;
            }
        }
        let (seq, counts, cps) =
            batcher.next(|| (self.pending.take(&granted), self.checkpoints.take(&granted)));
        self.checkpoints.forget(&granted);
        let mut attempt = 0;
        loop {
            match self
                .store
                .finish_claims(&states, &run.holder, seq, &counts, &cps)
                .await
            {
                Ok(()) => {
                    // Numbers before the finish's were renewals': the worker's runs
                    // hash holds the last, no longer needed.
                    if seq > 1 {
                        self.renewals.forget(run.holder);
                    }
                    return Ok(());
                }
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(holder = %run.holder, error = %e, "could not record the jobs' end; retrying");
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn release_user(&self, claim: &Claim, user: &str, ends: &[(FolderJob, JobEnd)]) {
        if let Some(run) = &claim.run {
            run.state.release_user(user, ends, false).await;
        }
    }

    fn busy_delay(&self) -> Duration {
        let third = self.timing.renew_every();
        third
            .min(Duration::from_secs(10))
            .mul_f64(0.75 + fastrand::f64() / 2.0)
    }
}

/// Renews the claims every third of their time to live (at the worker's common ticks,
/// through its [`Renewals`] writer), carrying the run's progress and checkpoints, until
/// told to stop: extends every user's fence while the claims hold,
/// shuts a user's when the admin stops it, and every one when the claims are lost.
/// Returns the batcher so the finish can go on numbering.
async fn keep(
    timing: LeaseTiming,
    run: Arc<RunState>,
    fences: HashMap<String, UserFence>,
    stop: Arc<tokio::sync::Notify>,
) -> Batcher {
    let mut batcher = Batcher {
        seq: 0,
        unconfirmed: None,
    };
    if run.granted.lock().await.is_empty() {
        stop.notified().await;
        return batcher;
    }
    loop {
        tokio::select! {
            _ = stop.notified() => return batcher,
            _ = tokio::time::sleep_until(run.renewals.next_tick(timing.renew_every())) => {}
        }
        let jobs = run.granted.lock().await;
        if jobs.is_empty() {
            continue; // every user's jobs were released; the finish comes
        }
        let batch = batcher.next(|| (run.pending.take(&jobs), run.checkpoints.take(&jobs)));
        let sent = Instant::now();
        let renewed = run
            .renewals
            .renew(jobs.clone(), run.holder.clone(), batch)
            .await;
        drop(jobs);
        match renewed {
            Ok(Renewal::Held(intents)) => {
                batcher.unconfirmed = None;
                let mut stopped = Vec::new();
                for (user, f) in &fences {
                    f.fence.extend(timing.fence_deadline(sent));
                    if intents.get(user).is_some_and(|i| {
                        matches!(i, Intent::Stopped | Intent::Closed | Intent::Idle)
                    }) && !f.stopped.swap(true, Ordering::SeqCst)
                    {
                        f.fence.revoke("the admin stopped the user");
                        stopped.push(user.clone());
                    }
                }
                // A stopped user's jobs not running are recorded now, if the run has
                // other users' to go on with (else its finish comes at once).
                for user in stopped {
                    if fences.len() > 1 {
                        run.release_user(&user, &[], true).await;
                    }
                }
            }
            Ok(Renewal::Lost) => {
                // Nothing of the batch was applied (the script checks the claims first),
                // and its checkpoints must not be: another run owns the folders now.
                batcher.unconfirmed = None;
                for f in fences.values() {
                    f.fence
                        .revoke("the claim on the folder lapsed and may be another worker's");
                }
            }
            Err(e) => {
                // The fence shuts by itself if this goes on past the claims' lifetime.
                tracing::warn!(holder = %run.holder, error = %e, "could not renew the claims");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::domain::job::WireName;

    fn job(user: &str, folder: &str) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: user.into(),
            source_folder: WireName(folder.to_string().into()),
            target_folder: WireName(folder.to_string().into()),
            uid_range: None,
            pass: 1,
            group: None,
            archive: None,
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
        pending.add(&a, Counter::Copied, 5);
        let jobs = [a.clone()];
        let take = || (pending.take(&jobs), Vec::new());
        let first = b.next(take);
        assert_eq!(first.0, 1);
        assert_eq!(first.1, vec![("u".to_string(), vec![(Counter::Copied, 5)])]);
        pending.add(&a, Counter::Copied, 2);
        // the reply was lost: the same batch again, the 2 wait for the next number
        let again = b.next(|| (pending.take(&jobs), Vec::new()));
        assert_eq!((again.0, &again.1), (1, &first.1));
        b.unconfirmed = None;
        let next = b.next(|| (pending.take(&jobs), Vec::new()));
        assert_eq!(
            (next.0, next.1),
            (2, vec![("u".to_string(), vec![(Counter::Copied, 2)])])
        );
    }

    #[test]
    fn counts_are_summed_per_user_and_taken_once() {
        let (a, b, c) = (job("u", "INBOX"), job("u", "Sent"), job("v", "INBOX"));
        let pending = PendingCounts::default();
        pending.add(&a, Counter::Copied, 5);
        pending.add(&b, Counter::Copied, 2);
        pending.add(&c, Counter::Skipped, 1);
        let jobs = [a.clone(), b.clone(), c.clone()];
        assert_eq!(
            pending.take(&jobs),
            vec![
                ("u".to_string(), vec![(Counter::Copied, 7)]),
                ("v".to_string(), vec![(Counter::Skipped, 1)])
            ]
        );
        assert!(pending.take(&jobs).is_empty());
        // a job not asked for keeps its counts
        pending.add(&a, Counter::Copied, 1);
        assert!(pending.take(&[b]).is_empty());
        assert_eq!(
            pending.take(&[a]),
            vec![("u".to_string(), vec![(Counter::Copied, 1)])]
        );
    }
}
