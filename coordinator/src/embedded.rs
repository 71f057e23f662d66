//! The one-command mode: the cluster's code path on one machine. The planner publishes
//! folder jobs to an in-process [`MemoryQueue`]; the worker's consumer loop runs them
//! with the same engine; checkpoints go to a [`DirStore`] in the state directory.

use std::path::PathBuf;
use std::sync::Arc;

use mailferry_shared::domain::endpoint::Endpoint;
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::login::Credentials;
use mailferry_shared::imap::pool::Pool;
use mailferry_shared::imap::Limits;
use mailferry_shared::queue::{JobQueue, MemoryQueue};
use mailferry_shared::store::DirStore;
use mailferry_worker::Unclaimed;
use mailferry_worker::{consume, decide, Decision, RetryPolicy};
use mailferry_worker::{Engine, EngineSettings};
use mailferry_worker::{StaticAccounts, UserAccounts};
use tokio::sync::{watch, Semaphore};

use crate::planner::{
    group_small_jobs, plan_user, PlanError, PlanRequest, PlannedFolder, SplitLimits,
};
use crate::report::{classify, FailureKind, Reporter};
use mailferry_shared::domain::job::FolderJob;

/// How long an idle connection waits for its user's next folder before it is closed.
const IDLE_LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a run waits before it looks at any target when the run before it on the
/// same state directory died (`kill -9`, a power cut).
///
/// A killed run's last APPENDs may already be on their way or in the target's socket
/// buffer: the target stores them after the process is gone, and by then the next run
/// may have read the folder, copied the same messages again and written a checkpoint
/// whose bound lies above them, so no later run looks at them. (Seen: runs of 50 and
/// 100 duplicates, one or two MULTIAPPEND groups, after three or more kills in a row.)
/// Waiting lets those writes land first; the recovery then finds them like any other
/// copy of the dead run. The bytes were sent when the process died, so this covers a
/// few megabytes on a slow link; a clean end says so and costs nothing next time.
pub const SETTLE_AFTER_CRASH: std::time::Duration = std::time::Duration::from_secs(5);

/// One user to migrate: where from, where to, and as whom.
pub struct UserSpec {
    /// The user's id in jobs, state and reports (the mailbox address).
    pub id: String,
    pub source: Endpoint,
    pub source_credentials: Credentials,
    pub target: Endpoint,
    pub target_credentials: Credentials,
}

pub struct Options {
    pub batch: String,
    pub state_dir: PathBuf,
    pub dry_run: bool,
    pub rules: Rules,
    pub connections_per_account: usize,
    pub parallel_users: usize,
    pub job_slots: usize,
    pub engine: EngineSettings,
    pub limits: Limits,
    pub retry: RetryPolicy,
}

/// What a dry run found, per user.
pub type DryRun = Vec<(String, Result<Vec<PlannedFolder>, String>)>;

/// Runs a migration pass for all users. Failures are per user and per folder and end up
/// in the reporter; only a failure to set up (the state directory) is an error here.
pub async fn run(
    users: Vec<UserSpec>,
    opts: Options,
    reporter: Arc<Reporter>,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<DryRun>, mailferry_shared::Error> {
    let store = if opts.dry_run {
        None
    } else {
        Some(Arc::new(DirStore::open(&opts.state_dir)?))
    };
    if store.as_ref().is_some_and(|s| s.predecessor_died()) {
        reporter.line(&format!(
            "the last run on this state directory did not finish: waiting {} s for its last writes to land before looking at the targets",
            SETTLE_AFTER_CRASH.as_secs()
        ));
        tokio::time::sleep(SETTLE_AFTER_CRASH).await;
    }
    let (accounts, pools) = open_pools(&users, &opts)?;
    let pass = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let Some(store) = store else {
        return Ok(Some(dry_run(&pools, &opts, pass).await));
    };

    let reaper = reap_idle(pools.clone());
    let queue = Arc::new(MemoryQueue::new());
    let engine = Arc::new(Engine::new(
        store.clone(),
        accounts,
        reporter.clone(),
        opts.engine.clone(),
    ));
    let consumers = tokio::spawn(consume(
        queue.clone(),
        engine,
        Arc::new(Unclaimed),
        opts.job_slots,
        opts.retry,
        shutdown.clone(),
        // Ctrl-C lets the folders in progress finish; a second one exits at once.
        Arc::new(mailferry_shared::redis::lease::Fence::open_ended()),
    ));

    // Plan users a few at a time; each user's jobs are queued as soon as it is planned,
    // largest folders first so the longest job does not start last. Planning keeps only
    // a few bundles ahead of the job slots: a user planned long before its jobs run
    // would find its connections closed as idle, and log in again.
    let planning = Arc::new(Semaphore::new(opts.parallel_users.max(1)));
    let mut planners = tokio::task::JoinSet::new();
    for (id, source, target) in pools.clone() {
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = queue.wait_ready_below(opts.job_slots.max(1) * 2) => {}
            // A dropped sender is no signal: that branch is then disabled.
            Ok(_) = stop.wait_for(|stopped| *stopped) => break,
        }
        let permit = planning
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        if *shutdown.borrow() {
            break;
        }
        let planner = Planner {
            batch: opts.batch.clone(),
            rules: opts.rules.clone(),
            policy: opts.retry,
            pass,
            store: store.clone(),
            queue: queue.clone(),
            reporter: reporter.clone(),
        };
        let stop = shutdown.clone();
        planners.spawn(async move {
            let _permit = permit;
            planner.plan_and_queue(&id, &source, &target, stop).await;
        });
    }
    while planners.join_next().await.is_some() {}
    queue.close();
    let _ = consumers.await;
    reaper.abort();
    close_idle(&pools, None).await;
    // A run stopped early may have left writes in flight: only a whole run says so.
    if !*shutdown.borrow() {
        store.mark_finished()?;
    }
    Ok(None)
}

/// A user's planned jobs as they are queued: largest folders first, so the longest job
/// does not start last, and the small folders that follow grouped into bundles as the
/// cluster groups them, each run one folder after another on one connection per side
/// (a mailbox of twenty small folders logs in once, not once per job slot).
fn bundles_of(plan: &crate::planner::UserPlan) -> Vec<Vec<FolderJob>> {
    let size = |job: &FolderJob| {
        plan.folders
            .iter()
            .find(|f| f.mapping.source_wire == job.source_folder.0)
            .map(|f| (u64::from(f.messages.unwrap_or(0)), f.size.unwrap_or(0)))
            .unwrap_or((0, 0))
    };
    let mut jobs = plan.jobs.clone();
    jobs.sort_by_key(|j| std::cmp::Reverse(size(j)));
    let defaults = mailferry_shared::config::settings::Settings::default().coordinator;
    let limits = SplitLimits {
        max_messages: defaults.max_job_messages,
        max_bytes: defaults.max_job_bytes.0,
    };
    group_small_jobs(&mut jobs, size, &limits);
    crate::scheduler::bundles(jobs)
}

/// A user's id and its source and target connection pools.
type UserPools = (String, Arc<Pool>, Arc<Pool>);

/// Each user's two connection pools, and the accounts the engine looks them up in. An
/// OAuth2 login gets its token source (none for a password); a refresh token the
/// provider rotates is kept for this run only: the next run starts from the one it is
/// given.
fn open_pools(
    users: &[UserSpec],
    opts: &Options,
) -> Result<(Arc<StaticAccounts>, Vec<UserPools>), mailferry_shared::Error> {
    let accounts = Arc::new(StaticAccounts::default());
    let mut pools = Vec::new();
    let with_tokens = |credentials: &Credentials, server: &Endpoint| {
        let mut credentials = credentials.clone();
        credentials.tokens =
            mailferry_shared::domain::login::tokens_for(&credentials, server, None)?;
        Ok::<_, mailferry_shared::Error>(credentials)
    };
    for u in users {
        let source = Pool::new(
            u.source.clone(),
            with_tokens(&u.source_credentials, &u.source)?,
            opts.limits,
            u.source.connection_cap(opts.connections_per_account),
        );
        let target = Pool::new(
            u.target.clone(),
            with_tokens(&u.target_credentials, &u.target)?,
            opts.limits,
            u.target.connection_cap(opts.connections_per_account),
        );
        accounts.insert(
            &opts.batch,
            &u.id,
            UserAccounts::new(source.clone(), target.clone()),
        );
        pools.push((u.id.clone(), source, target));
    }
    Ok((accounts, pools))
}

/// `--dry-run`: each user's plan, read from the servers, nothing written.
async fn dry_run(pools: &[UserPools], opts: &Options, pass: u64) -> DryRun {
    let mut out = Vec::new();
    for (id, source, target) in pools {
        let plan = plan_user::<DirStore>(PlanRequest {
            batch: &opts.batch,
            user: id,
            pass,
            source,
            target,
            rules: &opts.rules,
            store: None,
            first_pass: false,
            split: None,
        })
        .await;
        out.push((
            id.clone(),
            plan.map(|p| p.folders).map_err(|e| e.to_string()),
        ));
        source.close_idle().await;
        target.close_idle().await;
    }
    out
}

/// Logs out connections idle for a while: a CSV of thousands of users must not keep a
/// connection to each one it has finished.
fn reap_idle(pools: Vec<UserPools>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDLE_LINGER / 2).await;
            close_idle(&pools, Some(IDLE_LINGER)).await;
        }
    })
}

/// LOGOUTs going out at once when idle connections are closed.
const LOGOUTS_AT_ONCE: usize = 64;

/// Logs out the pools' idle connections (those idle for `linger`, or all), up to
/// [`LOGOUTS_AT_ONCE`] at a time: one after another, the LOGOUTs of a thousand users'
/// two connections took seven seconds at the end of a run.
async fn close_idle(pools: &[UserPools], linger: Option<std::time::Duration>) {
    let at_once = Arc::new(Semaphore::new(LOGOUTS_AT_ONCE));
    let mut logouts = tokio::task::JoinSet::new();
    for pool in pools.iter().flat_map(|(_, s, t)| [s.clone(), t.clone()]) {
        let permit = at_once.clone().acquire_owned().await.expect("never closed");
        logouts.spawn(async move {
            let _permit = permit;
            match linger {
                Some(linger) => pool.close_idle_since(linger).await,
                None => pool.close_idle().await,
            }
        });
    }
    while logouts.join_next().await.is_some() {}
}

/// What planning one user needs: the run's batch, rules and retry policy, its store,
/// queue and reporter.
struct Planner {
    batch: String,
    rules: Rules,
    policy: RetryPolicy,
    pass: u64,
    store: Arc<DirStore>,
    queue: Arc<MemoryQueue>,
    reporter: Arc<Reporter>,
}

impl Planner {
    /// Plans the user (retrying what a folder job would retry) and queues its jobs,
    /// largest folders first; a user that cannot be planned is reported failed.
    async fn plan_and_queue(
        &self,
        id: &str,
        source: &Arc<Pool>,
        target: &Arc<Pool>,
        stop: watch::Receiver<bool>,
    ) {
        match self.plan(id, source, target, stop).await {
            Ok(plan) => {
                for (folder, problem) in plan
                    .folders
                    .iter()
                    .filter_map(|f| f.problem.as_ref().map(|p| (f, p)))
                {
                    self.reporter
                        .line(&format!("{id}: {}: {problem}", folder.mapping.source_path));
                }
                self.reporter
                    .user_planned(id, plan.folders.len(), plan.jobs.len());
                if plan.jobs.is_empty() {
                    // Nothing to copy: its connections are not needed again.
                    tokio::join!(source.close_idle(), target.close_idle());
                }
                for bundle in bundles_of(&plan) {
                    // The memory queue cannot refuse a job.
                    let _ = self.queue.publish(bundle).await;
                }
            }
            Err(e) => {
                let kind = match &e {
                    PlanError::Imap { side, source } => classify(Some(*side), source),
                    _ => FailureKind::Other,
                };
                self.reporter.user_failed(id, &e.to_string(), kind);
            }
        }
    }

    /// The user's plan. A dropped connection, a throttling answer or a token endpoint
    /// that is down is retried as a folder job's would be; a refusal is not.
    async fn plan(
        &self,
        id: &str,
        source: &Arc<Pool>,
        target: &Arc<Pool>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<crate::planner::UserPlan, PlanError> {
        let mut attempt = 1;
        loop {
            let plan = plan_user(PlanRequest {
                batch: &self.batch,
                user: id,
                pass: self.pass,
                source,
                target,
                rules: &self.rules,
                store: Some(&*self.store),
                // The state directory may hold an earlier run's checkpoints.
                first_pass: false,
                split: None,
            })
            .await;
            let Err(PlanError::Imap { side, source: e }) = &plan else {
                return plan;
            };
            let reason = e.to_string();
            let Decision::Retry(wait) = decide(
                e.disposition(),
                attempt,
                &self.policy,
                fastrand::f64(),
                &reason,
            ) else {
                return plan;
            };
            self.reporter.line(&format!(
                "{id}: planning: {side}: {reason}; trying again in {:.1} s",
                wait.as_secs_f64()
            ));
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return plan,
            }
        }
    }
}
