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
//!
//! Files: `mod.rs` (leadership, the main loop and what it reads), `plan.rs` (planning a
//! due user's pass), `dispatch.rs` (publishing jobs, ending passes), `cohorts.rs` (small
//! users travelling together), `fairness.rs` (which jobs go out now: pure).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailferry_shared::config::seal::Keyring;
use mailferry_shared::config::settings::Settings;
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::status::{Intent, JobState};
use mailferry_shared::imap::Limits;
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::redis::control::{now_ms, PassRecord};
use mailferry_shared::redis::lease::{Fence, LeaseTiming};
use mailferry_shared::redis::RedisStore;
use mailferry_shared::telemetry;
use mailferry_shared::Error;
use mailferry_worker::RedisAccounts;
use tokio::sync::{watch, Mutex};

mod cohorts;
mod dispatch;
mod fairness;
mod plan;

use cohorts::{Cohorts, Planned};
pub use fairness::{bundles, bundles_in_flight, next_to_publish};

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

/// Runs a coordinator until `shutdown` turns true: it leads while it holds the leader
/// lease in `store` and stands by otherwise. `keys` open the users' sealed secrets for
/// planning. (The process makes the store and the keys from its settings; a test hands
/// in its own.)
pub async fn run(
    settings: Settings,
    store: RedisStore,
    keys: Arc<Keyring>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let me = format!(
        "coordinator-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    );
    let timing = LeaseTiming {
        ttl: Duration::from_secs(settings.coordinator.leader_lease_secs),
    };
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
}
