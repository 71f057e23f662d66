//! The worker loop: take a delivery (a bundle of one or more jobs), run its jobs, then
//! ack, retry later or dead-letter — each job's fate decided by [`decide`], a pure
//! function of the error's disposition and the attempt number.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mailferry_shared::domain::job::FolderJob;
use mailferry_shared::domain::status::FolderCounts;
use mailferry_shared::queue::{Delivery, JobQueue};
use mailferry_shared::store::StateStore;
use mailferry_shared::telemetry;
use mailferry_shared::Disposition;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use crate::claims::{Claim, Claims, JobEnd};
use crate::engine::Engine;
use crate::error::JobError;
use mailferry_shared::redis::control::ClaimAnswer;
use mailferry_shared::redis::lease::Fence;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Deliveries of one job before it is dead-lettered (the poison-job limit).
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// Pause after a throttling answer that suggested no time of its own.
    pub throttle_default: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            throttle_default: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Retry(Duration),
    DeadLetter(String),
}

/// Capped exponential backoff with full jitter (`jitter` in `[0, 1)`).
pub fn decide(
    disposition: Disposition,
    attempt: u32,
    policy: &RetryPolicy,
    jitter: f64,
    reason: &str,
) -> Decision {
    if attempt >= policy.max_attempts {
        return Decision::DeadLetter(format!("gave up after {attempt} attempts: {reason}"));
    }
    match disposition {
        Disposition::Fatal => Decision::DeadLetter(reason.to_string()),
        Disposition::Throttle(hint) => Decision::Retry(hint.unwrap_or(policy.throttle_default)),
        Disposition::Retry => {
            let exp = policy.base.saturating_mul(1u32 << attempt.min(16));
            let ceiling = exp.min(policy.cap);
            Decision::Retry(ceiling.mul_f64(0.5 + jitter / 2.0))
        }
    }
}

/// Runs `slots` jobs at a time until the queue ends or `shutdown` turns true: it holds
/// `slots` deliveries, and their users take turns in `slots` job slots (a user keeps
/// its slot for its jobs of the delivery, which run one after another). On shutdown no
/// new job is taken; jobs in progress finish, unless `drain` shuts first:
/// then they stop where they are (as safe as a crash), their claims are released and
/// their deliveries left unsettled, for the broker to hand to another worker.
pub async fn consume<Q: JobQueue, S: StateStore, C: Claims>(
    queue: Arc<Q>,
    engine: Arc<Engine<S>>,
    claims: Arc<C>,
    slots: usize,
    policy: RetryPolicy,
    shutdown: watch::Receiver<bool>,
    drain: Arc<Fence>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let job_slots = Arc::new(Semaphore::new(slots.max(1)));
    for _ in 0..slots.max(1) {
        let job_slots = job_slots.clone();
        let queue = queue.clone();
        let engine = engine.clone();
        let claims = claims.clone();
        let drain = drain.clone();
        let mut shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                if *shutdown.borrow() {
                    return;
                }
                let delivery = tokio::select! {
                    d = queue.next() => d,
                    _ = shutdown.changed() => return,
                };
                let Some(delivery) = delivery else { return };
                run_one(
                    &*queue, &engine, &*claims, delivery, &policy, &drain, &job_slots,
                )
                .await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// What became of one job of a bundle.
enum Outcome {
    /// Nothing more to do here: done, skipped (finished already, superseded, the user
    /// stopped), or stopped by the admin mid-run.
    Settled,
    /// Failed for good (recorded in its job state): to the dead-letter queue with this
    /// reason. `account`: the failure is the account's, not the folder's (a login
    /// refused, the user unknown), so the bundle's other jobs would fail the same way.
    DeadLetter { why: String, account: bool },
    /// To run again after `delay`. `attempt`: it failed and the next run counts towards
    /// the delivery limit; else it could not run here (its folder busy, its claim lost,
    /// the store unreachable).
    Again { delay: Duration, attempt: bool },
    /// The server throttles the account: this job and the rest of its user's jobs in
    /// the bundle wait out the pause, no attempt spent.
    Throttled(Duration),
    /// The worker is draining: the delivery is left unsettled for the broker to hand to
    /// another worker (the bundle's finished jobs are skipped there).
    Drained,
}

/// What an earlier job's end decides for the granted jobs after it: of its user (the
/// account's failure or pause), or of the whole delivery (the drain).
enum Rest {
    Run,
    /// The account failed for good: the user's rest fail with this reason, unrun.
    AccountFailed(String),
    /// The server throttles the account: the user's rest wait out the pause with it.
    Throttled(Duration),
    /// The admin stopped the user: its rest are settled unrun (their ends recorded
    /// already).
    Stopped,
    /// The worker is draining: the rest go back unrun, the delivery unsettled.
    Drained,
}

/// Claims a delivery's jobs (one call), runs the granted ones (each user's one after
/// another, as they share its connections; a delivery may carry many small users, whose
/// logins and connection leases are loaded together first, and who run at once, each
/// in a job slot of `slots`), records their ends (one call), then settles the delivery:
/// what must run again goes back as one narrowed bundle, what failed for good to the
/// dead-letter queue, and the delivery is acked.
async fn run_one<Q: JobQueue, S: StateStore, C: Claims>(
    queue: &Q,
    engine: &Engine<S>,
    claims: &C,
    delivery: Delivery,
    policy: &RetryPolicy,
    drain: &Fence,
    slots: &Semaphore,
) {
    let jobs = &delivery.jobs;
    let bundle = delivery.bundle_id();
    if jobs.len() > 1 {
        tracing::debug!(%bundle, jobs = jobs.len(), "running a bundle of small folders");
    }
    let claim = match claims.claim(jobs).await {
        Ok(claim) => claim,
        Err(e) => {
            // The store is unreachable: nothing ran, so no attempt is spent.
            tracing::warn!(%bundle, error = %e, "cannot claim the jobs; handing them back");
            let delay = match decide(
                Disposition::Retry,
                delivery.attempt,
                policy,
                fastrand::f64(),
                "",
            ) {
                Decision::Retry(d) => d,
                Decision::DeadLetter(_) => policy.cap,
            };
            queue.requeue(delivery.narrowed(jobs.clone()), delay).await;
            return;
        }
    };
    let _held = engine.preload_accounts(jobs).await;
    // A user's jobs run one after another (they share its connections); the delivery's
    // users run at once, each in one of the worker's job slots.
    let drained = AtomicBool::new(false);
    let mut users: Vec<&str> = Vec::new();
    for job in jobs {
        if !users.contains(&job.user.as_str()) {
            users.push(&job.user);
        }
    }
    let several_users = users.len() > 1;
    let runs = users.iter().map(|user| {
        let user_run = UserRun {
            engine,
            claims,
            claim: &claim,
            delivery: &delivery,
            policy,
            drain,
            drained: &drained,
            slots,
            several_users,
        };
        user_run.run(user)
    });
    let mut ends: Vec<(FolderJob, JobEnd)> = Vec::new();
    let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
    for (e, o) in join_all(runs.collect()).await {
        ends.extend(e);
        outcomes.extend(o);
    }
    outcomes.sort_by_key(|(i, _)| *i);
    let drained = drained.load(Ordering::SeqCst);
    if let Err(e) = claims.finish(claim, &ends).await {
        // The ends are not recorded: what is done runs again (its re-run finds the
        // target complete and costs a search, not a copy), and records its end then.
        tracing::error!(%bundle, error = %e, "could not record the jobs' end; they will run again");
        let done: std::collections::HashSet<String> = ends
            .iter()
            .filter(|(_, end)| matches!(end, JobEnd::Done { .. }))
            .map(|(j, _)| j.id())
            .collect();
        for (i, outcome) in &mut outcomes {
            if done.contains(&jobs[*i].id()) {
                *outcome = Outcome::Again {
                    delay: claims.busy_delay(),
                    attempt: false,
                };
            }
        }
    }
    if drained {
        return;
    }

    let mut again = Vec::new();
    let mut delay = Duration::ZERO;
    let mut counts_attempt = false;
    let mut dead = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    // (A delivery of several users names the user in each reason.)
    for (i, outcome) in outcomes {
        let job = &jobs[i];
        match outcome {
            Outcome::Settled | Outcome::Drained => {}
            Outcome::DeadLetter { why, account } => {
                let why = if several_users {
                    format!("{}: {why}", job.user)
                } else {
                    why
                };
                if account && reasons.contains(&why) {
                    // one reason for the whole account
                } else if jobs.len() > 1 && !account {
                    reasons.push(format!("{}: {why}", job.source_folder.display()));
                } else {
                    reasons.push(why);
                }
                dead.push(job.clone());
            }
            Outcome::Again { delay: d, attempt } => {
                again.push(job.clone());
                delay = delay.max(d);
                counts_attempt |= attempt;
            }
            Outcome::Throttled(d) => {
                again.push(job.clone());
                delay = delay.max(d);
            }
        }
    }
    let settled_by_hand_back = !again.is_empty();
    if settled_by_hand_back {
        // Published again (confirmed) before the delivery is acked.
        let back = delivery.narrowed(again);
        if counts_attempt {
            queue.retry(back, delay).await;
        } else {
            queue.requeue(back, delay).await;
        }
    }
    if !dead.is_empty() {
        queue
            .dead_letter(&delivery.narrowed(dead), reasons.join("; "))
            .await;
    } else if !settled_by_hand_back {
        queue.ack(&delivery).await;
    }
}

/// One user's part of a delivery.
struct UserRun<'a, S: StateStore, C: Claims> {
    engine: &'a Engine<S>,
    claims: &'a C,
    claim: &'a Claim,
    delivery: &'a Delivery,
    policy: &'a RetryPolicy,
    drain: &'a Fence,
    /// Set when a job returned because the worker drains: every user's rest go back.
    drained: &'a AtomicBool,
    slots: &'a Semaphore,
    several_users: bool,
}

impl<S: StateStore, C: Claims> UserRun<'_, S, C> {
    /// Runs `user`'s granted jobs of the delivery one after another, in a job slot
    /// taken at its first job to run: their ends (to record) and outcomes (by index in
    /// the delivery).
    async fn run(self, user: &str) -> (Vec<(FolderJob, JobEnd)>, Vec<(usize, Outcome)>) {
        let (claim, jobs) = (self.claim, &self.delivery.jobs);
        let mut ends: Vec<(FolderJob, JobEnd)> = Vec::new();
        let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
        // What an earlier job of the user decided for its rest.
        let mut rest = Rest::Run;
        let mut slot = None;
        for (i, job) in jobs.iter().enumerate().filter(|(_, j)| j.user == user) {
            match &claim.answers[i] {
                ClaimAnswer::Skip(why) => {
                    tracing::debug!(job = %job.id(), why, "nothing to do");
                    finished("skipped");
                    outcomes.push((i, Outcome::Settled));
                    continue;
                }
                ClaimAnswer::Busy => {
                    tracing::debug!(job = %job.id(), "the target folder is busy; offering the job again later");
                    outcomes.push((
                        i,
                        Outcome::Again {
                            delay: self.claims.busy_delay(),
                            attempt: false,
                        },
                    ));
                    continue;
                }
                ClaimAnswer::Granted => {}
            }
            if slot.is_none() && matches!(rest, Rest::Run) {
                slot = Some(self.slots.acquire().await.expect("never closed"));
            }
            // (The worker may have begun to drain while this user waited for a slot.)
            if self.drained.load(Ordering::SeqCst) || self.drain.check().is_err() {
                self.drained.store(true, Ordering::SeqCst);
                rest = Rest::Drained;
            }
            match &rest {
                Rest::Run => {}
                Rest::Drained => {
                    ends.push((job.clone(), JobEnd::HandedBack));
                    continue;
                }
                // Logging in again for every folder would only repeat the refusal (and
                // can lock the account): the rest fail with the same reason.
                Rest::AccountFailed(why) => {
                    finished("failed_unrun");
                    ends.push((job.clone(), JobEnd::Failed(why.clone())));
                    outcomes.push((
                        i,
                        Outcome::DeadLetter {
                            why: why.clone(),
                            account: true,
                        },
                    ));
                    continue;
                }
                Rest::Throttled(d) => {
                    ends.push((job.clone(), JobEnd::HandedBack));
                    outcomes.push((i, Outcome::Throttled(*d)));
                    continue;
                }
                Rest::Stopped => {
                    outcomes.push((i, Outcome::Settled));
                    continue;
                }
            }
            if claim.fence(user).stopped.load(Ordering::SeqCst) {
                // Stopped while other jobs ran: recorded by the keeper already (or,
                // should that have failed, by this end at the finish).
                ends.push((job.clone(), JobEnd::HandedBack));
                outcomes.push((i, Outcome::Settled));
                continue;
            }
            claim.running(job, true);
            let (end, outcome) = run_job(
                self.engine,
                job,
                claim,
                self.delivery.attempt,
                self.policy,
                self.drain,
            )
            .await;
            ends.push((job.clone(), end));
            match &outcome {
                Outcome::DeadLetter { why, account: true } => {
                    rest = Rest::AccountFailed(why.clone());
                }
                Outcome::Throttled(d) => rest = Rest::Throttled(*d),
                Outcome::Drained => {
                    self.drained.store(true, Ordering::SeqCst);
                    rest = Rest::Drained;
                }
                Outcome::Settled if claim.fence(user).stopped.load(Ordering::SeqCst) => {
                    // The admin stopped the user: its jobs not run yet are handed back
                    // unrun, and, while the delivery goes on with other users, their
                    // ends are recorded now.
                    for (k, later) in jobs.iter().enumerate().skip(i + 1) {
                        if later.user == user && claim.answers[k] == ClaimAnswer::Granted {
                            ends.push((later.clone(), JobEnd::HandedBack));
                        }
                    }
                    if self.several_users {
                        let mine: Vec<(FolderJob, JobEnd)> = ends.clone();
                        self.claims.release_user(claim, user, &mine).await;
                    }
                    rest = Rest::Stopped;
                }
                _ => {}
            }
            // (Cleared only now: a keeper that finds the user stopped meanwhile leaves
            // this job, whose end is in `ends`, to the consumer.)
            claim.running(job, false);
            outcomes.push((i, outcome));
        }
        // The users of a delivery of several are small: their pass was all here.
        if slot.is_some() && self.several_users {
            self.engine.close_idle(&jobs[0].batch, user).await;
        }
        drop(slot);
        (ends, outcomes)
    }
}

/// Runs `futures` at once on this task: their outputs, in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// What a panic said, for the job's error.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

/// Runs one granted job; says how it ended (for its state) and what the delivery must
/// do about it.
async fn run_job<S: StateStore>(
    engine: &Engine<S>,
    job: &FolderJob,
    claim: &Claim,
    attempt: u32,
    policy: &RetryPolicy,
    drain: &Fence,
) -> (JobEnd, Outcome) {
    let span = tracing::info_span!("job", batch = %job.batch, user = %job.user, folder = %job.source_folder.display());
    async {
        let user = claim.fence(&job.user);
        let fence = user.fence.clone();
        let _in_flight = InFlight::enter();
        let started = std::time::Instant::now();
        // The run stops at the fence at once (dropping the engine's future is as safe
        // as a crash, which every step allows for); the engine checks it too, before
        // each APPEND group, so a run woken from a long pause sends nothing more.
        // A panic in the job (a bug) fails this job, not the process: left to unwind,
        // it would end the delivery's task and leave the job unreported for ever.
        let guarded = futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
            engine.run_job(job, &fence),
        ));
        let result = tokio::select! {
            r = guarded => r.unwrap_or_else(|panic| Err(JobError::Panicked(panic_text(&*panic)))),
            why = fence.shut() => Err(JobError::Fenced(why)),
            why = drain.shut() => {
                tracing::warn!(job = %job.id(), why, "handing the job back unfinished");
                finished("handed_back");
                return (JobEnd::HandedBack, Outcome::Drained);
            }
        };
        if result.is_ok() {
            metrics::histogram!(telemetry::JOB_DURATION).record(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(report) => {
                let mismatch = report.mismatch(&job.source_folder.display());
                finished(if mismatch.is_some() {
                    "mismatch"
                } else if report.unchanged {
                    "unchanged"
                } else {
                    "done"
                });
                (
                    JobEnd::Done {
                        matched: report.matched,
                        flags_updated: report.flags_updated,
                        mismatch,
                        counts: report.whole_folder.then_some(FolderCounts {
                            source: report.source_messages,
                            target: report.target_messages,
                            skipped: report.skipped_total,
                        }),
                    },
                    Outcome::Settled,
                )
            }
            Err(JobError::Fenced(why)) => {
                if user.stopped.load(Ordering::SeqCst) {
                    tracing::info!(job = %job.id(), "stopped by the admin");
                    finished("stopped");
                    (JobEnd::HandedBack, Outcome::Settled)
                } else {
                    finished("handed_back");
                    tracing::warn!(job = %job.id(), why, "stopped writing; handing the job back");
                    (
                        JobEnd::HandedBack,
                        Outcome::Again {
                            delay: Duration::from_secs(1),
                            attempt: false,
                        },
                    )
                }
            }
            Err(e) if matches!(e.disposition(), Disposition::Throttle(_)) && attempt < policy.max_attempts => {
                // Throttling is the server's to end, not a failure: the user shows it,
                // and the job waits out the pause (in a delay queue, not in this slot)
                // without spending an attempt.
                let reason = e.to_string();
                let delay = match e.disposition() {
                    Disposition::Throttle(Some(hint)) => hint,
                    _ => policy.throttle_default,
                };
                tracing::warn!(delay_ms = delay.as_millis() as u64, error = %reason, "throttled; the job waits");
                engine.progress().job_failed(job, &e, &reason, true);
                failed(&e, "throttled");
                (JobEnd::Throttled(reason), Outcome::Throttled(delay))
            }
            Err(e) => {
                let reason = e.to_string();
                match decide(e.disposition(), attempt, policy, fastrand::f64(), &reason) {
                    Decision::Retry(delay) => {
                        tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %reason, "job failed, will retry");
                        engine.progress().job_failed(job, &e, &reason, true);
                        failed(&e, "retry");
                        (
                            JobEnd::HandedBack,
                            Outcome::Again {
                                delay,
                                attempt: true,
                            },
                        )
                    }
                    Decision::DeadLetter(why) => {
                        tracing::error!(error = %why, "job failed for good");
                        let described = describe(&e, &why);
                        engine.progress().job_failed(job, &e, &described, false);
                        failed(&e, "dead_letter");
                        let account = matches!(
                            &e,
                            JobError::UnknownUser(_)
                                | JobError::Imap {
                                    source: mailferry_shared::Error::AuthRejected { .. },
                                    ..
                                }
                        );
                        (
                            JobEnd::Failed(described.clone()),
                            Outcome::DeadLetter {
                                why: described,
                                account,
                            },
                        )
                    }
                }
            }
        }
    }
    // `instrument`, not `enter`: a guard held across .await tags other tasks' events.
    .instrument(span)
    .await
}

/// Counts the jobs this worker is running, for as long as it lives.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        metrics::gauge!(telemetry::JOBS_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::JOBS_IN_FLIGHT).decrement(1.0);
    }
}

fn finished(outcome: &'static str) {
    metrics::counter!(telemetry::JOBS_FINISHED, "outcome" => outcome).increment(1);
}

fn failed(e: &JobError, outcome: &'static str) {
    let (side, reason) = e.kind();
    metrics::counter!(telemetry::JOB_FAILURES, "side" => side, "reason" => reason, "outcome" => outcome)
        .increment(1);
}

fn describe(e: &JobError, why: &str) -> String {
    match e.side() {
        Some(side) if !why.starts_with(&side.to_string()) => format!("{side}: {why}"),
        _ => why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let p = RetryPolicy::default();
        assert_eq!(
            decide(Disposition::Fatal, 1, &p, 0.3, "bad password"),
            Decision::DeadLetter("bad password".into())
        );
        assert_eq!(
            decide(
                Disposition::Throttle(Some(Duration::from_millis(1500))),
                1,
                &p,
                0.3,
                "x"
            ),
            Decision::Retry(Duration::from_millis(1500))
        );
        // backoff grows, is capped, and jitter keeps it within [cap/2, cap]
        let Decision::Retry(d1) = decide(Disposition::Retry, 1, &p, 0.0, "x") else {
            panic!()
        };
        let Decision::Retry(d5) = decide(Disposition::Retry, 5, &p, 0.0, "x") else {
            panic!()
        };
        let Decision::Retry(d7) = decide(Disposition::Retry, 7, &p, 0.999, "x") else {
            panic!()
        };
        assert!(
            d1 < d5 && d7 <= p.cap && d7 >= p.cap / 2,
            "{d1:?} {d5:?} {d7:?}"
        );
        assert!(matches!(
            decide(Disposition::Retry, 8, &p, 0.0, "x"),
            Decision::DeadLetter(_)
        ));
    }
}
