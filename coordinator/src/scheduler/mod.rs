//! The coordinator process: the one active coordinator (it holds the leader lease in
//! Redis; others stand by and take over when it stops renewing) plans users into folder
//! jobs when they are due, publishes them within each user's limit of jobs in flight,
//! and closes each pass when its jobs have ended.
//!
//! Everything it knows is in Redis, so a restart (or a standby taking over) resumes:
//! every open pass is looked at again and its queued jobs are published again. That is
//! harmless: job ids are deterministic, and a worker's claim skips a job that is done
//! or running elsewhere.
//!
//! - **Due** (`P:due:<batch>`): a user is due when started, closed (the final pass), on
//!   "sync now", when its interval has passed, or when an open pass is to be checked
//!   again (`recheck_secs` after it began; then its queued jobs are published again).
//! - **Dispatch** (`P:dispatch`): workers mark a user whenever one of its jobs ends; the
//!   coordinator then publishes the user's next waiting jobs (fairness: at most
//!   `max_jobs_per_user` queued or running per user, so a 50 GB mailbox does not hold
//!   every worker while others wait), or, when none is open, ends the pass: Synced is
//!   recorded, the next pass is scheduled, or a closing user is closed.
//! - **Cohorts**: a small user (its pass in one bundle) waits up to a second after its
//!   plan for other small users of the batch; then their passes begin together and their
//!   jobs travel in one queue message (`coordinator.users_per_delivery`).
//!
//! Due users and marked users are read, and their passes written, a group at a time:
//! the Redis cost of a user is what its own keys need, plus a share of the group calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailferry_shared::config::seal::Keyring;
use mailferry_shared::config::settings::Settings;
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::job::FolderJob;
use mailferry_shared::domain::status::{Intent, JobState, UserStatus};
use mailferry_shared::imap::Limits;
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::queue::JobQueue;
use mailferry_shared::redis::control::{now_ms, DispatchView, PassRecord, PassStart};
use mailferry_shared::redis::lease::{Fence, LeaseTiming};
use mailferry_shared::redis::RedisStore;
use mailferry_shared::telemetry;
use mailferry_shared::{Disposition, Error};
use mailferry_worker::JobError;
use mailferry_worker::{RedisAccounts, UserAccounts};
use tokio::sync::{watch, Mutex};

use crate::admin::user_status;
use crate::planner::{
    group_small_jobs, plan_user, PlanError, PlanRequest, SplitLimits, MAX_GROUP_JOBS,
};

/// How often the active coordinator reads the schedule at least (while planners are
/// free); it reads it at once when a quarter of its planners have come free since.
/// A read that finds nobody due doubles the wait, up to [`TICK_IDLE`].
const TICK: Duration = Duration::from_secs(1);
const TICK_IDLE: Duration = Duration::from_secs(4);
/// How often it reads the dispatch set (users whose jobs ended): the ends of half a
/// second are dispatched together. A read that finds none doubles the wait, up to
/// [`DISPATCH_IDLE`], so that an idle coordinator (or one whose workers are busy with
/// long deliveries) costs Redis a command every few seconds, not two a second.
const DISPATCH_EVERY: Duration = Duration::from_millis(500);
const DISPATCH_IDLE: Duration = Duration::from_secs(2);
/// How long a small user's bundle waits for others to share its queue message: until
/// none has joined for [`COHORT_QUIET`], or [`COHORT_LINGER`] at most. While a big
/// batch is planned (some fifteen users a second on the bench machine) users keep
/// joining and a delivery fills (`users_per_delivery`, 64); a small batch's last user
/// waits a second. (A fixed second filled a third of a delivery at 1,000 × 20.)
const COHORT_QUIET: Duration = Duration::from_secs(1);
const COHORT_LINGER: Duration = Duration::from_secs(5);
/// How long the loop sleeps when nothing wakes it.
const WAKE: Duration = Duration::from_millis(50);
/// Users planned at once (each planning logs in to both servers).
const PLANNERS: usize = 64;
/// A plan that failed for a passing reason (a server unreachable) is tried again after
/// this long, or the batch's interval if that is shorter.
const PLAN_RETRY: Duration = Duration::from_secs(60);
/// How long the list of batches is trusted between reads.
const BATCHES_TTL: Duration = Duration::from_secs(3);

struct Coordinator {
    settings: Settings,
    store: RedisStore,
    accounts: RedisAccounts,
    queue: Mutex<Option<AmqpQueue>>,
    /// Shut when leadership is lost: nothing more is written or published.
    fence: Arc<Fence>,
    batches: Mutex<Option<(Instant, Vec<String>)>>,
    /// Each batch's folder rules, read again at most every [`BATCHES_TTL`]: a rule the
    /// admin changes applies to the passes planned from then on, and a pass costs Redis
    /// no read of its batch.
    rules: Mutex<HashMap<String, (Instant, Arc<Rules>)>>,
    /// Small users' passes waiting to begin and share a queue message.
    cohorts: std::sync::Mutex<Cohorts>,
}

/// What a due user's new pass starts from, read with the other due users'.
struct PassBasis {
    intent: Intent,
    /// The last pass.
    record: PassRecord,
    /// The user's `copied` counter now.
    copied: i64,
}

/// A pass whose jobs have all ended, to be recorded.
struct PassEnd {
    user: String,
    intent: Intent,
    record: PassRecord,
    jobs: Vec<JobState>,
}

/// Runs until `shutdown` turns true: stands by, schedules while it holds the leader
/// lease, stands by again if it loses it.
/// Whether this process's coordinator holds the leader lease now (what
/// `mailferry_coordinator_leader` exports): the batch gauges come from the leader only.
static LEADING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn leading() -> bool {
    LEADING.load(std::sync::atomic::Ordering::SeqCst)
}

fn set_leading(now: bool) {
    LEADING.store(now, std::sync::atomic::Ordering::SeqCst);
    metrics::gauge!(telemetry::LEADER).set(if now { 1.0 } else { 0.0 });
}

pub async fn run(settings: Settings, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let keys = settings
        .sealing_keys()
        .map_err(|e| Error::Config(e.to_string()))
        .and_then(|k| Keyring::parse(&k).map_err(|e| Error::Config(e.to_string())))?;
    let store = RedisStore::from_settings(&settings).await?;
    let me = format!(
        "coordinator-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    let timing = LeaseTiming {
        ttl: Duration::from_secs(settings.coordinator.leader_lease_secs),
    };
    let keys = Arc::new(keys);
    let slots = mailferry_worker::shared_slots(&settings, &store);
    let mut shutdown = shutdown;
    let mut announced_standby = false;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let sent = Instant::now();
        match store.acquire_leader(&me, timing.ttl).await {
            Ok(true) => {
                tracing::info!(holder = %me, "leading: this coordinator schedules");
                set_leading(true);
                announced_standby = false;
                let fence = Arc::new(Fence::until(timing.fence_deadline(sent)));
                let coordinator = Arc::new(Coordinator {
                    // Planning logs in too: its connections count against the caps.
                    accounts: RedisAccounts::new(
                        store.clone(),
                        keys.clone(),
                        Limits::default(),
                        settings.worker.connections_per_account as usize,
                    )
                    .with_shared_slots(slots.clone()),
                    settings: settings.clone(),
                    store: store.clone(),
                    queue: Mutex::new(None),
                    cohorts: std::sync::Mutex::new(Cohorts::default()),
                    fence: fence.clone(),
                    batches: Mutex::new(None),
                    rules: Mutex::new(HashMap::new()),
                });
                let keeper = tokio::spawn(keep_leadership(
                    store.clone(),
                    me.clone(),
                    timing,
                    fence.clone(),
                ));
                let why = coordinator.lead(shutdown.clone()).await;
                keeper.abort();
                set_leading(false);
                if *shutdown.borrow() {
                    let _ = store.release_leader(&me).await;
                    tracing::info!("stopped; the leader lease is released");
                    return Ok(());
                }
                tracing::warn!(why, "no longer leading; standing by");
            }
            Ok(false) => {
                if !announced_standby {
                    tracing::info!("standing by: another coordinator schedules");
                    announced_standby = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach Redis for the leader lease"),
        }
        tokio::select! {
            _ = tokio::time::sleep(timing.renew_every()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn keep_leadership(store: RedisStore, me: String, timing: LeaseTiming, fence: Arc<Fence>) {
    loop {
        tokio::time::sleep(timing.renew_every()).await;
        let sent = Instant::now();
        match store.renew_leader(&me, timing.ttl).await {
            Ok(true) => fence.extend(timing.fence_deadline(sent)),
            Ok(false) => {
                fence.revoke("the leader lease is no longer ours (it lapsed, or another coordinator holds it)");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the leader lease"),
        }
    }
}

impl Coordinator {
    /// Schedules until the fence shuts or `shutdown` turns true; returns why it stopped.
    async fn lead(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> String {
        if let Err(e) = self.resume().await {
            tracing::warn!(error = %e, "could not look at the open passes; the recheck will");
        }
        // Users being planned, by the planner task's id (so that a task that panics
        // still frees its user).
        let mut planning: HashMap<tokio::task::Id, (String, String)> = HashMap::new();
        let mut planners = tokio::task::JoinSet::new();
        let mut last_dispatch: Option<Instant> = None;
        let mut last_due: Option<Instant> = None;
        let (mut dispatch_every, mut due_every) = (DISPATCH_EVERY, TICK);
        // Planners that came free since the schedule was last read.
        let mut freed = PLANNERS;
        let since = |at: Option<Instant>| at.map_or(Duration::MAX, |at| at.elapsed());
        loop {
            if let Err(why) = self.fence.check() {
                planners.abort_all();
                return why;
            }
            if *shutdown.borrow() {
                // Plans in progress finish; what they did not publish is republished by
                // the next coordinator's resume.
                while planners.join_next().await.is_some() {}
                self.flush_cohorts(true).await;
                return "shutting down".into();
            }
            while let Some(done) = planners.try_join_next_with_id() {
                let id = done.map_or_else(|e| e.id(), |(id, ())| id);
                planning.remove(&id);
                freed += 1;
            }
            self.flush_cohorts(false).await;
            if since(last_dispatch) >= dispatch_every {
                last_dispatch = Some(Instant::now());
                match self.dispatch().await {
                    Ok(0) => dispatch_every = (dispatch_every * 2).min(DISPATCH_IDLE),
                    Ok(_) => dispatch_every = DISPATCH_EVERY,
                    Err(e) => tracing::warn!(error = %e, "dispatch failed; trying again"),
                }
            }
            // The schedule is read when a quarter of the planners have come free, or at
            // the tick: due users are read, and their logins loaded, a group at a time.
            // (Groups of half the planners made planning slower, the cohorts smaller and
            // the deliveries more: more Redis commands in all at 1,000 × 20.)
            let free = PLANNERS - planners.len();
            if free > 0 && (freed >= PLANNERS / 4 || since(last_due) >= due_every) {
                last_due = Some(Instant::now());
                freed = 0;
                let mut busy: HashSet<(String, String)> = planning.values().cloned().collect();
                busy.extend(self.cohort_members());
                match self.due(free, &busy).await {
                    Ok(due) => {
                        due_every = if due.is_empty() {
                            (due_every * 2).min(TICK_IDLE)
                        } else {
                            TICK
                        };
                        self.start_plans(due, &mut planners, &mut planning).await
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the schedule"),
                }
            }
            // A finished plan makes room for the next at once, not at the next tick.
            tokio::select! {
                _ = tokio::time::sleep(WAKE) => {}
                _ = shutdown.changed() => {}
                Some(done) = planners.join_next_with_id(), if !planners.is_empty() => {
                    let id = done.map_or_else(|e| e.id(), |(id, ())| id);
                    planning.remove(&id);
                    freed += 1;
                }
            }
        }
    }

    /// Starts due users' plans, a batch's users read together: their intents and pass
    /// records (one round trip), the logins and connection leases of those that begin
    /// a pass (one MGET, one lease call). A user no longer active leaves the schedule;
    /// an open pass is looked at again ([`recheck`](Self::recheck)).
    async fn start_plans(
        self: &Arc<Self>,
        due: Vec<(String, String)>,
        planners: &mut tokio::task::JoinSet<()>,
        planning: &mut HashMap<tokio::task::Id, (String, String)>,
    ) {
        let mut by_batch: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (batch, user) in due {
            by_batch.entry(batch).or_default().push(user);
        }
        for (batch, users) in by_batch {
            let views = match self.store.intents_and_records(&batch, &users).await {
                Ok(views) => views,
                Err(e) => {
                    // They stay due: the next read of the schedule tries again.
                    tracing::warn!(batch, error = %e, "cannot read the due users' passes");
                    continue;
                }
            };
            let (mut off, mut fresh) = (Vec::new(), Vec::new());
            for (user, (intent, record, copied)) in users.into_iter().zip(views) {
                if !matches!(intent, Intent::Active | Intent::Closing) {
                    off.push(user);
                } else if record.pass > 0 && record.finished_ms.is_none() {
                    let me = self.clone();
                    let key = (batch.clone(), user.clone());
                    let task = planners.spawn(async move {
                        let (batch, user) = (key.0.as_str(), key.1.as_str());
                        if let Err(e) = me.recheck(batch, user, record).await {
                            tracing::warn!(batch, user, error = %e, "could not look at the open pass; trying again shortly");
                            let _ = me.store.schedule_recheck(batch, user, now_ms() + 5_000).await;
                        }
                    });
                    planning.insert(task.id(), (batch.clone(), user));
                } else {
                    fresh.push((user, intent, record, copied));
                }
            }
            if !off.is_empty() {
                let off: Vec<&str> = off.iter().map(String::as_str).collect();
                let unscheduled = match self.write_allowed() {
                    Ok(()) => self.store.schedule_many(&batch, &off, None).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = unscheduled {
                    tracing::warn!(batch, error = %e, "could not take stopped users off the schedule");
                }
            }
            if fresh.is_empty() {
                continue;
            }
            let names: Vec<String> = fresh.iter().map(|(u, ..)| u.clone()).collect();
            let loaded = self.accounts.load_many(&batch, &names).await;
            for ((user, intent, record, copied), pools) in fresh.into_iter().zip(loaded) {
                let me = self.clone();
                let (b, u) = (batch.clone(), user.clone());
                let task = planners.spawn(async move {
                    let start = PassBasis {
                        intent,
                        record,
                        copied,
                    };
                    if let Err(e) = me.plan_pass(&b, &u, start, pools).await {
                        tracing::warn!(batch = b, user = u, error = %e, "could not plan the user; trying again shortly");
                        let _ = me.store.schedule(&b, &u, now_ms() + 5_000).await;
                    }
                });
                planning.insert(task.id(), (batch.clone(), user));
            }
        }
    }

    /// After taking over: every open pass is due now, so its queued jobs are published
    /// again and a pass whose jobs all ended meanwhile is closed.
    async fn resume(&self) -> Result<(), Error> {
        let now = now_ms();
        for batch in self.store.batches().await? {
            for (user, record) in self.store.pass_records(&batch).await? {
                if record.pass > 0 && record.finished_ms.is_none() {
                    self.store.schedule_recheck(&batch, &user, now).await?;
                }
            }
        }
        Ok(())
    }

    /// Due users not being planned already, at most `limit`.
    async fn due(
        &self,
        limit: usize,
        planning: &HashSet<(String, String)>,
    ) -> Result<Vec<(String, String)>, Error> {
        let now = now_ms();
        let mut out = Vec::new();
        for batch in self.batches().await? {
            for user in self
                .store
                .due_users(&batch, now, limit + planning.len())
                .await?
            {
                let key = (batch.clone(), user);
                if !planning.contains(&key) && out.len() < limit {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    /// The batch names, read again at most every few seconds: a new batch waits that
    /// long for its first plan, and an idle coordinator costs Redis little.
    async fn batches(&self) -> Result<Vec<String>, Error> {
        let mut cache = self.batches.lock().await;
        if let Some((at, names)) = &*cache {
            if at.elapsed() < BATCHES_TTL {
                return Ok(names.clone());
            }
        }
        let names = self.store.batches().await?;
        *cache = Some((Instant::now(), names.clone()));
        Ok(names)
    }

    fn write_allowed(&self) -> Result<(), Error> {
        self.fence
            .check()
            .map_err(|why| Error::Store(format!("not leading any more: {why}")))
    }

    /// The batch's folder rules (none for a batch that is gone).
    async fn rules(&self, batch: &str) -> Result<Arc<Rules>, Error> {
        let mut cache = self.rules.lock().await;
        if let Some((at, rules)) = cache.get(batch) {
            if at.elapsed() < BATCHES_TTL {
                return Ok(rules.clone());
            }
        }
        let rules = Arc::new(
            self.store
                .batch(batch)
                .await?
                .map(|b| b.folder_rules)
                .unwrap_or_default(),
        );
        cache.insert(batch.to_string(), (Instant::now(), rules.clone()));
        Ok(rules)
    }

    /// The batch's sync interval, read fresh: an interval the admin just set applies to
    /// the pass that ends next.
    async fn interval_ms(&self, batch: &str) -> Result<u64, Error> {
        let record = self.store.batch(batch).await?;
        let default = self.settings.coordinator.sync_interval_secs;
        let secs = record.map_or(default, |r| r.interval_secs(default));
        Ok(secs * 1000)
    }

    /// A due user's new pass: planned with the pools [`start_plans`](Self::start_plans)
    /// loaded (or the reason it could not), recorded, its first jobs published.
    async fn plan_pass(
        &self,
        batch: &str,
        user: &str,
        basis: PassBasis,
        loaded: Result<UserAccounts, JobError>,
    ) -> Result<(), Error> {
        let PassBasis {
            intent,
            record,
            copied,
        } = basis;
        let pass = record.pass + 1;
        let planned_ms = now_ms();
        let rules = self.rules(batch).await?;
        let planned = match loaded {
            Err(e) => Err((e.to_string(), e.disposition())),
            Ok(pools) => {
                let plan = plan_user(PlanRequest {
                    batch,
                    user,
                    pass,
                    source: &pools.source,
                    target: &pools.target,
                    rules: &rules,
                    store: Some(&self.store),
                    // Nothing of a user never planned was copied: no checkpoint to read.
                    first_pass: record.pass == 0,
                    split: Some(SplitLimits {
                        max_messages: self.settings.coordinator.max_job_messages,
                        max_bytes: self.settings.coordinator.max_job_bytes.0,
                    }),
                })
                .await;
                if let Err(PlanError::Imap { side, source }) = &plan {
                    pools.report_throttling(*side, source).await;
                }
                pools.source.close_idle().await;
                pools.target.close_idle().await;
                plan.map_err(|e| {
                    let disposition = match &e {
                        PlanError::Imap { source, .. } => source.disposition(),
                        _ => Disposition::Retry,
                    };
                    (e.to_string(), disposition)
                })
            }
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err((reason, disposition)) => {
                tracing::warn!(batch, user, reason, "planning failed");
                let failed = PassRecord {
                    pass,
                    planned_ms,
                    finished_ms: Some(now_ms()),
                    synced_ms: record.synced_ms,
                    plan_error: Some(reason),
                    final_pass: intent == Intent::Closing,
                    ..PassRecord::default()
                };
                let interval = self.interval_ms(batch).await?;
                let again = match disposition {
                    Disposition::Fatal => interval,
                    Disposition::Throttle(hint) => hint
                        .unwrap_or(Duration::from_secs(
                            self.settings.worker.throttle_pause_secs,
                        ))
                        .as_millis() as u64,
                    Disposition::Retry => interval.min(PLAN_RETRY.as_millis() as u64),
                };
                self.write_allowed()?;
                self.store
                    .begin_pass(batch, user, &failed, &[], now_ms() + again)
                    .await?;
                if intent == Intent::Closing {
                    // The admin asked to end it: a final pass that cannot even be
                    // planned (the password changed) closes all the same; its reason
                    // stays in the pass record.
                    self.close(batch, user).await?;
                }
                return Ok(());
            }
        };
        let size = |job: &FolderJob| {
            plan.folders
                .iter()
                .find(|f| f.mapping.source_wire == job.source_folder.0)
                .map(|f| (f.size.unwrap_or(0), f.messages.unwrap_or(0)))
                .unwrap_or((0, 0))
        };
        let limits = SplitLimits {
            max_messages: self.settings.coordinator.max_job_messages,
            max_bytes: self.settings.coordinator.max_job_bytes.0,
        };
        let mut jobs = plan.jobs.clone();
        // Largest first, so the longest job does not start last; the small folders
        // that follow travel in bundles.
        jobs.sort_by_key(|j| std::cmp::Reverse(size(j)));
        group_small_jobs(&mut jobs, |j| (size(j).1 as u64, size(j).0), &limits);
        let cap = self.settings.coordinator.max_jobs_per_user as usize;
        let mut states: Vec<(FolderJob, JobState)> =
            jobs.into_iter().map(|j| (j, JobState::Waiting)).collect();
        let first = next_to_publish(&states, cap);
        let queued: HashSet<String> = first.iter().flatten().map(FolderJob::id).collect();
        for (job, state) in &mut states {
            if queued.contains(&job.id()) {
                *state = JobState::Queued;
            }
        }
        let begun = PassRecord {
            pass,
            planned_ms,
            finished_ms: None,
            synced_ms: record.synced_ms,
            plan_error: None,
            final_pass: intent == Intent::Closing,
            // An archive-only folder (All Mail) holds the other folders' messages too;
            // how many of its own it has is known only once its job has compared them.
            source_messages: Some(
                plan.folders
                    .iter()
                    .filter(|f| !f.mapping.archive_only)
                    .map(|f| u64::from(f.messages.unwrap_or(0)))
                    .sum(),
            ),
            copied_at_plan: Some(copied),
        };
        // A pass that travels as one bundle is a small user's: it begins and is
        // published a moment later, together with other small users' (their records,
        // claims, leases and ends then cost Redis one call for all).
        if self.settings.coordinator.users_per_delivery > 1
            && first.len() == 1
            && first[0].len() == states.len()
        {
            tracing::info!(batch, user, pass, jobs = states.len(), "pass planned");
            let bundle = first.into_iter().next().expect("one bundle");
            return self
                .join_cohort(
                    batch,
                    Planned {
                        user: user.to_string(),
                        record: begun,
                        states,
                    },
                    bundle,
                )
                .await;
        }
        let recheck = now_ms() + self.settings.coordinator.recheck_secs * 1000;
        self.write_allowed()?;
        self.store
            .begin_pass(batch, user, &begun, &states, recheck)
            .await?;
        tracing::info!(batch, user, pass, jobs = states.len(), "pass planned");
        if states.is_empty() {
            return self.end_pass(batch, user, intent, begun, &[]).await;
        }
        self.publish(batch, user, first).await
    }

    /// An open pass came due again (sync now, a restart, the recheck): its jobs in flight
    /// are published again, or the pass ends if none is open. Publishing a job that is
    /// still queued or running elsewhere is harmless: the copy's claim finds it done or
    /// busy. It repairs a publish lost to a crash and a running job whose delivery was
    /// lost with its broker.
    async fn recheck(&self, batch: &str, user: &str, record: PassRecord) -> Result<(), Error> {
        let jobs = self.store.job_states(batch, user).await?;
        if !jobs.iter().any(|(_, s)| s.is_open()) {
            let intent = self.store.intent(batch, user).await?;
            let states: Vec<JobState> = jobs.into_iter().map(|(_, s)| s).collect();
            return self.end_pass(batch, user, intent, record, &states).await;
        }
        let queued: Vec<String> = jobs
            .iter()
            .filter(|(_, s)| s.in_flight())
            .map(|(id, _)| id.clone())
            .collect();
        let specs = self.store.job_specs(batch, user, &queued).await?;
        self.write_allowed()?;
        self.store
            .schedule_recheck(
                batch,
                user,
                now_ms() + self.settings.coordinator.recheck_secs * 1000,
            )
            .await?;
        if !specs.is_empty() {
            tracing::info!(
                batch,
                user,
                jobs = specs.len(),
                "publishing the open pass's jobs again"
            );
        }
        self.publish(batch, user, bundles(specs)).await?;
        // Waiting jobs may be due a slot (their dispatch mark may have been lost).
        self.dispatch_users(batch, &[user.to_string()]).await
    }

    /// Users whose jobs ended: publish their next waiting jobs or end their pass. A
    /// batch's marked users are read together and their ends written together. Says
    /// how many users were marked.
    async fn dispatch(&self) -> Result<usize, Error> {
        let marked = self.store.take_dispatch(500).await?;
        let taken = marked.len();
        let mut by_batch: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (batch, user) in marked {
            by_batch.entry(batch).or_default().push(user);
        }
        for (batch, users) in by_batch {
            if let Err(e) = self.dispatch_users(&batch, &users).await {
                // The recheck of the open passes repairs what is left undone here.
                tracing::warn!(batch, users = users.len(), error = %e, "could not dispatch the users' jobs");
            }
        }
        Ok(taken)
    }

    async fn dispatch_users(&self, batch: &str, users: &[String]) -> Result<(), Error> {
        let views = self.store.dispatch_views(batch, users).await?;
        let mut ended = Vec::new();
        for (user, view) in users.iter().zip(views) {
            let DispatchView {
                record,
                intent,
                jobs,
            } = view;
            if record.pass == 0 || record.finished_ms.is_some() {
                continue;
            }
            if !jobs.iter().any(|(_, s)| s.is_open()) {
                ended.push(PassEnd {
                    user: user.clone(),
                    intent,
                    record,
                    jobs: jobs.into_iter().map(|(_, s)| s).collect(),
                });
                continue;
            }
            if let Err(e) = self.publish_next(batch, user, intent, jobs).await {
                tracing::warn!(batch, user, error = %e, "could not dispatch the user's jobs");
            }
        }
        self.end_passes(batch, ended).await
    }

    /// A user's next waiting jobs, as many as its cap allows.
    async fn publish_next(
        &self,
        batch: &str,
        user: &str,
        intent: Intent,
        jobs: Vec<(String, JobState)>,
    ) -> Result<(), Error> {
        if !matches!(intent, Intent::Active | Intent::Closing) {
            return Ok(());
        }
        if !jobs.iter().any(|(_, s)| *s == JobState::Waiting) {
            return Ok(());
        }
        let cap = self.settings.coordinator.max_jobs_per_user as usize;
        let open: Vec<(String, JobState)> = jobs.into_iter().filter(|(_, s)| s.is_open()).collect();
        let states = self.store.with_specs(batch, user, &open).await?;
        let next = next_to_publish(&states, cap);
        if next.is_empty() {
            return Ok(());
        }
        self.write_allowed()?;
        let queued: Vec<(String, JobState)> = next
            .iter()
            .flatten()
            .map(|j| (j.id(), JobState::Queued))
            .collect();
        self.store.set_job_states(batch, user, &queued).await?;
        self.publish(batch, user, next).await
    }

    /// Records a pass's end and what comes next: [`end_passes`](Self::end_passes).
    async fn end_pass(
        &self,
        batch: &str,
        user: &str,
        intent: Intent,
        record: PassRecord,
        jobs: &[JobState],
    ) -> Result<(), Error> {
        let end = PassEnd {
            user: user.to_string(),
            intent,
            record,
            jobs: jobs.to_vec(),
        };
        self.end_passes(batch, vec![end]).await
    }

    /// Records the passes' ends (one write) and what comes next for each: the next
    /// pass at the interval (one call for all), or, for a closing user, the final pass
    /// or the close.
    async fn end_passes(&self, batch: &str, mut ends: Vec<PassEnd>) -> Result<(), Error> {
        if ends.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        for end in &mut ends {
            end.record.finished_ms = Some(now);
            let status = user_status(Intent::Active, &end.record, &end.jobs);
            if status == UserStatus::Synced {
                end.record.synced_ms = Some(now);
            }
            tracing::info!(
                batch,
                user = end.user,
                pass = end.record.pass,
                status = status.name(),
                "pass ended"
            );
        }
        self.write_allowed()?;
        let records: Vec<(&str, &PassRecord)> =
            ends.iter().map(|e| (e.user.as_str(), &e.record)).collect();
        self.store.put_pass_records(batch, &records).await?;
        let (mut active, mut again_now, mut off) = (Vec::new(), Vec::new(), Vec::new());
        for end in &ends {
            match end.intent {
                Intent::Closing if end.record.final_pass => {
                    if let Err(e) = self.close(batch, &end.user).await {
                        tracing::warn!(batch, user = end.user, error = %e, "could not close the user; the recheck will");
                    }
                }
                // Close was pressed during this pass: the final pass follows at once, so
                // mail that arrived meanwhile is copied too.
                Intent::Closing => again_now.push(end.user.as_str()),
                Intent::Active => active.push(end.user.as_str()),
                _ => off.push(end.user.as_str()),
            }
        }
        if !active.is_empty() {
            let interval = self.interval_ms(batch).await?;
            self.store
                .schedule_next_many(batch, &active, now, now + interval)
                .await?;
        }
        self.store
            .schedule_many(batch, &again_now, Some(now))
            .await?;
        self.store.schedule_many(batch, &off, None).await
    }

    /// The final pass has ended: the schedule ends and the credentials are deleted.
    async fn close(&self, batch: &str, user: &str) -> Result<(), Error> {
        self.write_allowed()?;
        if self.store.mark_closed(batch, user).await? {
            self.store.delete_credentials(batch, user).await?;
            self.store.unschedule(batch, user).await?;
            tracing::info!(batch, user, "closed: schedule ended, credentials deleted");
        }
        Ok(())
    }

    /// Publishes a user's bundles: [`publish_for`](Self::publish_for).
    async fn publish(
        &self,
        batch: &str,
        user: &str,
        bundles: Vec<Vec<FolderJob>>,
    ) -> Result<(), Error> {
        self.publish_for(batch, &[user], bundles).await
    }

    /// Publishes with confirms; a failure drops the connection (the next publish
    /// reconnects) and makes the bundles' users due again shortly, so nothing waits for
    /// the recheck (theirs republishes what is still queued).
    async fn publish_for(
        &self,
        batch: &str,
        users: &[&str],
        bundles: Vec<Vec<FolderJob>>,
    ) -> Result<(), Error> {
        if bundles.is_empty() {
            return Ok(());
        }
        let mut queue = self.queue.lock().await;
        let result = async {
            if queue.is_none() {
                *queue = Some(AmqpQueue::from_settings(&self.settings).await?);
            }
            let q = queue.as_ref().expect("just connected");
            for jobs in bundles {
                self.write_allowed()?;
                q.publish(jobs).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = &result {
            tracing::warn!(batch, users = users.len(), error = %e, "publishing failed; reconnecting to RabbitMQ");
            metrics::counter!(telemetry::RECONNECTS, "service" => "amqp").increment(1);
            *queue = None;
            let _ = self
                .store
                .schedule_rechecks(batch, users, now_ms() + 2_000)
                .await;
        }
        result
    }

    /// A small user's planned pass (one bundle) waits to begin and be published with the
    /// batch's next small users: once `users_per_delivery` users or [`MAX_GROUP_JOBS`]
    /// jobs are in, [`COHORT_QUIET`] after the last came or [`COHORT_LINGER`] after the
    /// first. Until then the user stays
    /// due in Redis (a coordinator that dies meanwhile leaves it to be planned again)
    /// and [`cohort_members`](Self::cohort_members) keeps it from being planned twice.
    async fn join_cohort(
        &self,
        batch: &str,
        planned: Planned,
        jobs: Vec<FolderJob>,
    ) -> Result<(), Error> {
        let cap = self.settings.coordinator.users_per_delivery as usize;
        let mut full = Vec::new();
        {
            let mut cohorts = self.cohorts.lock().unwrap_or_else(|e| e.into_inner());
            let cohort = cohorts
                .waiting
                .entry(batch.to_string())
                .or_insert_with(Cohort::new);
            if cohort.jobs.len() + jobs.len() > MAX_GROUP_JOBS && !cohort.passes.is_empty() {
                full.push(std::mem::replace(cohort, Cohort::new()));
            }
            cohort.passes.push(planned);
            cohort.jobs.extend(jobs);
            cohort.last = Instant::now();
            if cohort.passes.len() >= cap || cohort.jobs.len() >= MAX_GROUP_JOBS {
                full.push(cohorts.waiting.remove(batch).expect("just filled"));
            }
            for cohort in &full {
                cohorts.beginning(batch, cohort);
            }
        }
        let mut result = Ok(());
        for cohort in full {
            let published = self.publish_cohort(batch, cohort).await;
            result = result.and(published);
        }
        result
    }

    /// The users in cohorts: planned, their passes not begun yet (waiting, or being
    /// begun and published now).
    fn cohort_members(&self) -> Vec<(String, String)> {
        let cohorts = self.cohorts.lock().unwrap_or_else(|e| e.into_inner());
        cohorts
            .waiting
            .iter()
            .flat_map(|(batch, c)| c.passes.iter().map(|p| (batch.clone(), p.user.clone())))
            .chain(cohorts.beginning.iter().cloned())
            .collect()
    }

    /// Publishes the cohorts that have waited long enough (all of them, with `all`: the
    /// coordinator is stopping).
    async fn flush_cohorts(&self, all: bool) {
        let due: Vec<(String, Cohort)> = {
            let mut cohorts = self.cohorts.lock().unwrap_or_else(|e| e.into_inner());
            let batches: Vec<String> = cohorts
                .waiting
                .iter()
                .filter(|(_, c)| {
                    all || c.last.elapsed() >= COHORT_QUIET || c.since.elapsed() >= COHORT_LINGER
                })
                .map(|(b, _)| b.clone())
                .collect();
            let due: Vec<(String, Cohort)> = batches
                .into_iter()
                .filter_map(|b| cohorts.waiting.remove(&b).map(|c| (b, c)))
                .collect();
            for (batch, cohort) in &due {
                cohorts.beginning(batch, cohort);
            }
            due
        };
        for (batch, cohort) in due {
            // A failure makes the users due again shortly (publish_for).
            let _ = self.publish_cohort(&batch, cohort).await;
        }
    }

    /// Begins the cohort's passes (one call) and publishes its jobs as one message. If
    /// the passes cannot begin, the users are planned again shortly. Its users leave
    /// [`Cohorts::beginning`] when it is done.
    async fn publish_cohort(&self, batch: &str, cohort: Cohort) -> Result<(), Error> {
        let users: Vec<(String, String)> = cohort
            .passes
            .iter()
            .map(|p| (batch.to_string(), p.user.clone()))
            .collect();
        let result = self.begin_and_publish(batch, cohort).await;
        let mut cohorts = self.cohorts.lock().unwrap_or_else(|e| e.into_inner());
        for user in &users {
            cohorts.beginning.remove(user);
        }
        result
    }

    async fn begin_and_publish(&self, batch: &str, cohort: Cohort) -> Result<(), Error> {
        let users: Vec<&str> = cohort.passes.iter().map(|p| p.user.as_str()).collect();
        let passes: Vec<PassStart> = cohort
            .passes
            .iter()
            .map(|p| (p.user.as_str(), &p.record, p.states.as_slice()))
            .collect();
        let recheck = now_ms() + self.settings.coordinator.recheck_secs * 1000;
        self.write_allowed()?;
        if let Err(e) = self.store.begin_passes(batch, &passes, recheck).await {
            tracing::warn!(batch, users = users.len(), error = %e, "could not begin the passes; planning them again shortly");
            let _ = self
                .store
                .schedule_many(batch, &users, Some(now_ms() + 5_000))
                .await;
            return Err(e);
        }
        if users.len() > 1 {
            tracing::debug!(
                batch,
                users = users.len(),
                jobs = cohort.jobs.len(),
                "publishing small users together"
            );
        }
        self.publish_for(batch, &users, vec![cohort.jobs]).await
    }
}

/// A small user's planned pass, waiting in a cohort to begin.
struct Planned {
    user: String,
    record: PassRecord,
    states: Vec<(FolderJob, JobState)>,
}

/// The coordinator's cohorts.
#[derive(Default)]
struct Cohorts {
    /// Filling, by batch.
    waiting: HashMap<String, Cohort>,
    /// The users of cohorts being begun and published now: until their passes are
    /// recorded they are still due in Redis, and must not be planned again meanwhile.
    beginning: HashSet<(String, String)>,
}

impl Cohorts {
    fn beginning(&mut self, batch: &str, cohort: &Cohort) {
        self.beginning.extend(
            cohort
                .passes
                .iter()
                .map(|p| (batch.to_string(), p.user.clone())),
        );
    }
}

/// Small users' passes waiting to begin and travel in one queue message.
struct Cohort {
    passes: Vec<Planned>,
    jobs: Vec<FolderJob>,
    /// When it was started, and when its last user joined.
    since: Instant,
    last: Instant,
}

impl Cohort {
    fn new() -> Self {
        Cohort {
            passes: Vec::new(),
            jobs: Vec::new(),
            since: Instant::now(),
            last: Instant::now(),
        }
    }
}

/// Which of a user's waiting jobs to publish now, as bundles (one queue message each):
/// at most `cap` bundles in flight per user — a group of small folders counts once, as
/// it travels and runs as one — and one job at a time per target folder, a folder's UID
/// ranges in order (they share the folder's checkpoint and its claim; see
/// docs/design.md). `jobs` are the pass's open jobs in planned order (largest folders
/// first).
pub fn next_to_publish(jobs: &[(FolderJob, JobState)], cap: usize) -> Vec<Vec<FolderJob>> {
    let flying = units_in_flight(jobs);
    let in_flight = flying.len();
    let mut busy: HashSet<&[u8]> = jobs
        .iter()
        .filter(|(_, s)| s.in_flight())
        .map(|(j, _)| j.target_folder.as_bytes())
        .collect();
    let lowest = |folder: &[u8]| {
        jobs.iter()
            .filter(|(j, s)| *s == JobState::Waiting && j.target_folder.as_bytes() == folder)
            .map(|(j, _)| j.uid_range.map_or(0, |r| r.0))
            .min()
    };
    let mut taken: HashSet<u32> = HashSet::new();
    let mut out = Vec::new();
    for (job, state) in jobs {
        if out.len() + in_flight >= cap {
            break;
        }
        if *state != JobState::Waiting {
            continue;
        }
        match job.group {
            None => {
                let folder = job.target_folder.as_bytes();
                if busy.contains(folder) || lowest(folder) != Some(job.uid_range.map_or(0, |r| r.0))
                {
                    continue;
                }
                busy.insert(folder);
                out.push(vec![job.clone()]);
            }
            Some(g) => {
                if flying.contains(&Unit::Group(g)) || !taken.insert(g) {
                    continue;
                }
                let members: Vec<&FolderJob> = jobs
                    .iter()
                    .filter(|(j, s)| j.group == Some(g) && *s == JobState::Waiting)
                    .map(|(j, _)| j)
                    .collect();
                // Its jobs run one after another in one worker, so two of them may
                // share a target folder; none may share one with a job in flight.
                if members
                    .iter()
                    .any(|j| busy.contains(j.target_folder.as_bytes()))
                {
                    continue;
                }
                busy.extend(members.iter().map(|j| j.target_folder.as_bytes()));
                out.push(members.into_iter().cloned().collect());
            }
        }
    }
    out
}

/// What travels as one: a group, or a job alone (by its index in the pass's jobs).
#[derive(PartialEq, Eq, Hash)]
enum Unit {
    Group(u32),
    Alone(usize),
}

fn units_in_flight(jobs: &[(FolderJob, JobState)]) -> HashSet<Unit> {
    jobs.iter()
        .enumerate()
        .filter(|(_, (_, s))| s.in_flight())
        .map(|(i, (j, _))| j.group.map_or(Unit::Alone(i), Unit::Group))
        .collect()
}

/// How many bundles of a user's pass are queued or running: what `max_jobs_per_user`
/// bounds.
pub fn bundles_in_flight(jobs: &[(FolderJob, JobState)]) -> usize {
    units_in_flight(jobs).len()
}

/// Jobs (of one user and pass) as the bundles they travel in: a group's jobs together,
/// each other job alone, in the order given.
pub fn bundles(jobs: Vec<FolderJob>) -> Vec<Vec<FolderJob>> {
    let mut out: Vec<Vec<FolderJob>> = Vec::new();
    let mut at: HashMap<u32, usize> = HashMap::new();
    for job in jobs {
        match job.group {
            Some(g) if at.contains_key(&g) => out[at[&g]].push(job),
            Some(g) => {
                at.insert(g, out.len());
                out.push(vec![job]);
            }
            None => out.push(vec![job]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::domain::job::WireName;

    fn job(folder: &str, range: Option<(u32, u32)>) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(folder.to_string().into()),
            target_folder: WireName(folder.to_string().into()),
            uid_range: range,
            pass: 1,
            group: None,
            archive: None,
        }
    }

    fn names(bundles: &[Vec<FolderJob>]) -> Vec<String> {
        bundles
            .iter()
            .flatten()
            .map(|j| {
                format!(
                    "{} {:?}",
                    j.source_folder.display(),
                    j.uid_range.map(|r| r.0)
                )
            })
            .collect()
    }

    #[test]
    fn ranges_of_a_folder_go_one_at_a_time_in_order_within_the_cap() {
        let w = JobState::Waiting;
        let plan = vec![
            (job("INBOX", Some((1, 100))), w.clone()),
            (job("INBOX", Some((101, 200))), w.clone()),
            (job("INBOX", Some((201, u32::MAX))), w.clone()),
            (job("Sent", None), w.clone()),
            (job("Drafts", None), w.clone()),
        ];
        assert_eq!(
            names(&next_to_publish(&plan, 4)),
            ["INBOX Some(1)", "Sent None", "Drafts None"]
        );
        assert_eq!(
            names(&next_to_publish(&plan, 2)),
            ["INBOX Some(1)", "Sent None"]
        );
        // INBOX's first range is done, Sent runs: INBOX's second range is next
        let mut later = plan.clone();
        later.remove(0);
        later[2].1 = JobState::Running;
        assert_eq!(names(&next_to_publish(&later, 2)), ["INBOX Some(101)"]);
        // the cap counts jobs in flight
        later[0].1 = JobState::Queued;
        assert!(next_to_publish(&later, 2).is_empty());
        // a range is never published while its folder has a job in flight, even if
        // an earlier range was handed back and waits again
        let handed_back = vec![
            (job("INBOX", Some((1, 100))), JobState::Running),
            (job("INBOX", Some((101, 200))), w.clone()),
        ];
        assert!(next_to_publish(&handed_back, 4).is_empty());
    }

    fn grouped(folder: &str, group: u32) -> FolderJob {
        FolderJob {
            group: Some(group),
            archive: None,
            ..job(folder, None)
        }
    }

    #[test]
    fn a_group_travels_as_one_bundle_and_counts_once_against_the_cap() {
        let w = JobState::Waiting;
        let plan = vec![
            (job("INBOX", None), w.clone()),
            (grouped("Sent", 1), w.clone()),
            (grouped("Drafts", 1), w.clone()),
            (grouped("Junk", 2), w.clone()),
            (grouped("Trash", 2), w.clone()),
        ];
        let first = next_to_publish(&plan, 2);
        assert_eq!(first.len(), 2);
        assert_eq!(names(&first), ["INBOX None", "Sent None", "Drafts None"]);
        // group 1 runs: with a cap of 2 one more bundle fits, group 2 whole
        let mut later = plan.clone();
        later[1].1 = JobState::Running;
        later[2].1 = JobState::Queued;
        let next = next_to_publish(&later, 2);
        assert_eq!(names(&next), ["INBOX None"]);
        later[0].1 = JobState::Queued;
        assert!(
            next_to_publish(&later, 2).is_empty(),
            "INBOX and group 1 fly"
        );
        later[0].1 = JobState::Done {
            verified: true,
            mismatch: None,
            counts: None,
        };
        assert_eq!(
            names(&next_to_publish(&later, 2)),
            ["Junk None", "Trash None"]
        );
        // a group waits while one of its folders has a job in flight
        let blocked = vec![
            (job("Junk", Some((1, 10))), JobState::Running),
            (grouped("Junk", 3), w.clone()),
            (grouped("Trash", 3), w.clone()),
        ];
        assert!(next_to_publish(&blocked, 4).is_empty());
        // republishing what flies keeps the bundles
        let flying: Vec<FolderJob> = plan.iter().map(|(j, _)| j.clone()).collect();
        let b = bundles(flying);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 2]);
    }
}
