//! Planning a due user's pass: the planners (at most PLANNERS at once), a pass's plan
//! (folders listed, jobs made), and the recheck of an open pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mailferry_shared::domain::job::FolderJob;
use mailferry_shared::domain::status::{Intent, JobState};
use mailferry_shared::redis::control::{now_ms, PassRecord};
use mailferry_shared::{Disposition, Error};
use mailferry_worker::JobError;
use mailferry_worker::UserAccounts;

use crate::planner::{group_small_jobs, plan_user, PlanError, PlanRequest, SplitLimits, UserPlan};

use super::*;

impl Coordinator {
    /// Starts due users' plans, a batch's users read together: their intents and pass
    /// records (one round trip), the logins and connection leases of those that begin
    /// a pass (one MGET, one lease call). A user no longer active leaves the schedule;
    /// an open pass is looked at again ([`recheck`](Self::recheck)).
    pub(super) async fn start_plans(
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

    /// A due user's new pass: planned with the pools [`start_plans`](Self::start_plans)
    /// loaded (or the reason it could not), recorded, its first jobs published.
    pub(super) async fn plan_pass(
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
                let throttled = Duration::from_secs(self.settings.worker.throttle_pause_secs);
                let again = replan_after(disposition, interval, throttled);
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
        let limits = SplitLimits {
            max_messages: self.settings.coordinator.max_job_messages,
            max_bytes: self.settings.coordinator.max_job_bytes.0,
        };
        let cap = self.settings.coordinator.max_jobs_per_user as usize;
        let (states, first) = first_states(&plan, &limits, cap);
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
    pub(super) async fn recheck(
        &self,
        batch: &str,
        user: &str,
        record: PassRecord,
    ) -> Result<(), Error> {
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
}

/// When a user whose planning failed is planned again (ms from now): a refusal (a
/// wrong password) at the batch's interval, a throttled server after its hint or the
/// worker's throttle pause, anything else within a minute (or the interval, if sooner).
fn replan_after(disposition: Disposition, interval_ms: u64, throttled: Duration) -> u64 {
    match disposition {
        Disposition::Fatal => interval_ms,
        Disposition::Throttle(hint) => hint.unwrap_or(throttled).as_millis() as u64,
        Disposition::Retry => interval_ms.min(PLAN_RETRY.as_millis() as u64),
    }
}

/// A planned pass's jobs in the order they go out and with their first states: largest
/// first, so the longest job does not start last, with the small folders that follow
/// grouped into bundles; the first bundles within the user's cap are Queued (and
/// returned, to publish), the rest Waiting.
fn first_states(
    plan: &UserPlan,
    limits: &SplitLimits,
    cap: usize,
) -> (Vec<(FolderJob, JobState)>, Vec<Vec<FolderJob>>) {
    let size = |job: &FolderJob| {
        plan.folders
            .iter()
            .find(|f| f.mapping.source_wire == job.source_folder.0)
            .map(|f| (f.size.unwrap_or(0), f.messages.unwrap_or(0)))
            .unwrap_or((0, 0))
    };
    let mut jobs = plan.jobs.clone();
    jobs.sort_by_key(|j| std::cmp::Reverse(size(j)));
    group_small_jobs(&mut jobs, |j| (size(j).1 as u64, size(j).0), limits);
    let mut states: Vec<(FolderJob, JobState)> =
        jobs.into_iter().map(|j| (j, JobState::Waiting)).collect();
    let first = next_to_publish(&states, cap);
    let queued: HashSet<String> = first.iter().flatten().map(FolderJob::id).collect();
    for (job, state) in &mut states {
        if queued.contains(&job.id()) {
            *state = JobState::Queued;
        }
    }
    (states, first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::PlannedFolder;
    use mailferry_shared::domain::folders::{Action, FolderMapping};
    use mailferry_shared::domain::job::WireName;

    fn folder(name: &str, messages: u32, size: u64) -> (PlannedFolder, FolderJob) {
        let planned = PlannedFolder {
            mapping: FolderMapping {
                source_wire: name.as_bytes().to_vec().into(),
                source_path: name.into(),
                target_path: name.into(),
                target_wire: name.as_bytes().to_vec().into(),
                target_levels: vec![name.into()],
                special_use: None,
                archive_only: false,
                target_exists: false,
                action: Action::Copy,
            },
            messages: Some(messages),
            size: Some(size),
            job: true,
            problem: None,
        };
        let job = FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(name.as_bytes().to_vec().into()),
            target_folder: WireName(name.as_bytes().to_vec().into()),
            uid_range: None,
            pass: 1,
            group: None,
            archive: None,
        };
        (planned, job)
    }

    #[test]
    fn a_failed_plan_is_tried_again_by_what_the_failure_was() {
        let pause = Duration::from_secs(30);
        let day = 86_400_000;
        assert_eq!(replan_after(Disposition::Fatal, day, pause), day);
        assert_eq!(
            replan_after(Disposition::Throttle(None), day, pause),
            30_000
        );
        assert_eq!(
            replan_after(
                Disposition::Throttle(Some(Duration::from_secs(5))),
                day,
                pause
            ),
            5_000
        );
        assert_eq!(replan_after(Disposition::Retry, day, pause), 60_000);
        assert_eq!(replan_after(Disposition::Retry, 10_000, pause), 10_000);
    }

    #[test]
    fn a_pass_goes_out_largest_first_and_queues_only_what_the_cap_allows() {
        let (big, big_job) = folder("Archive", 50_000, 900 << 20);
        let (mid, mid_job) = folder("INBOX", 40_000, 500 << 20);
        let (small, small_job) = folder("Sent", 30_000, 100 << 20);
        let plan = UserPlan {
            folders: vec![small, big, mid],
            jobs: vec![small_job, big_job, mid_job],
        };
        let limits = SplitLimits {
            max_messages: 10_000,
            max_bytes: 1 << 30,
        };
        let (states, first) = first_states(&plan, &limits, 2);
        let order: Vec<String> = states
            .iter()
            .map(|(j, _)| j.source_folder.display())
            .collect();
        assert_eq!(order, ["Archive", "INBOX", "Sent"]);
        let kinds: Vec<bool> = states.iter().map(|(_, s)| *s == JobState::Queued).collect();
        assert_eq!(kinds, [true, true, false], "two bundles in flight at most");
        assert_eq!(first.len(), 2);
    }
}
