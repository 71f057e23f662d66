//! Cohorts: small users (a pass in one bundle) wait up to a second for others of the
//! batch, then their passes begin together and their jobs travel in one queue message.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use mailferry_shared::domain::job::FolderJob;
use mailferry_shared::domain::status::JobState;
use mailferry_shared::redis::control::{now_ms, PassRecord, PassStart};
use mailferry_shared::Error;

use crate::planner::MAX_GROUP_JOBS;

use super::*;

impl Coordinator {
    /// A small user's planned pass (one bundle) waits to begin and be published with the
    /// batch's next small users: once `users_per_delivery` users or [`MAX_GROUP_JOBS`]
    /// jobs are in, [`COHORT_QUIET`] after the last came or [`COHORT_LINGER`] after the
    /// first. Until then the user stays
    /// due in Redis (a coordinator that dies meanwhile leaves it to be planned again)
    /// and [`cohort_members`](Self::cohort_members) keeps it from being planned twice.
    pub(super) async fn join_cohort(
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
    pub(super) fn cohort_members(&self) -> Vec<(String, String)> {
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
    pub(super) async fn flush_cohorts(&self, all: bool) {
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
    pub(super) async fn publish_cohort(&self, batch: &str, cohort: Cohort) -> Result<(), Error> {
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

    pub(super) async fn begin_and_publish(&self, batch: &str, cohort: Cohort) -> Result<(), Error> {
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
pub(super) struct Planned {
    pub(super) user: String,
    pub(super) record: PassRecord,
    pub(super) states: Vec<(FolderJob, JobState)>,
}

/// The coordinator's cohorts.
#[derive(Default)]
pub(super) struct Cohorts {
    /// Filling, by batch.
    pub(super) waiting: HashMap<String, Cohort>,
    /// The users of cohorts being begun and published now: until their passes are
    /// recorded they are still due in Redis, and must not be planned again meanwhile.
    pub(super) beginning: HashSet<(String, String)>,
}

impl Cohorts {
    pub(super) fn beginning(&mut self, batch: &str, cohort: &Cohort) {
        self.beginning.extend(
            cohort
                .passes
                .iter()
                .map(|p| (batch.to_string(), p.user.clone())),
        );
    }
}

/// Small users' passes waiting to begin and travel in one queue message.
pub(super) struct Cohort {
    pub(super) passes: Vec<Planned>,
    pub(super) jobs: Vec<FolderJob>,
    /// When it was started, and when its last user joined.
    pub(super) since: Instant,
    pub(super) last: Instant,
}

impl Cohort {
    pub(super) fn new() -> Self {
        Cohort {
            passes: Vec::new(),
            jobs: Vec::new(),
            since: Instant::now(),
            last: Instant::now(),
        }
    }
}
