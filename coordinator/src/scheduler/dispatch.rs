//! Dispatching: the users whose jobs ended are read a group at a time; each gets its
//! next waiting jobs published (within its limit of jobs in flight), or its pass ends
//! (Synced recorded, the next pass scheduled, a closing user closed).

use std::collections::BTreeMap;

use mailferry_shared::domain::job::FolderJob;
use mailferry_shared::domain::status::{Intent, JobState, UserStatus};
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::queue::JobQueue;
use mailferry_shared::redis::control::{now_ms, DispatchView, PassRecord};
use mailferry_shared::telemetry;
use mailferry_shared::Error;

use crate::admin::user_status;

use super::*;

impl Coordinator {
    /// Users whose jobs ended: publish their next waiting jobs or end their pass. A
    /// batch's marked users are read together and their ends written together. Says
    /// how many users were marked.
    pub(super) async fn dispatch(&self) -> Result<usize, Error> {
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

    pub(super) async fn dispatch_users(&self, batch: &str, users: &[String]) -> Result<(), Error> {
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
    pub(super) async fn publish_next(
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
    pub(super) async fn end_pass(
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
    pub(super) async fn end_passes(
        &self,
        batch: &str,
        mut ends: Vec<PassEnd>,
    ) -> Result<(), Error> {
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
    pub(super) async fn close(&self, batch: &str, user: &str) -> Result<(), Error> {
        self.write_allowed()?;
        if self.store.mark_closed(batch, user).await? {
            self.store.delete_credentials(batch, user).await?;
            self.store.unschedule(batch, user).await?;
            tracing::info!(batch, user, "closed: schedule ended, credentials deleted");
        }
        Ok(())
    }

    /// Publishes a user's bundles: [`publish_for`](Self::publish_for).
    pub(super) async fn publish(
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
    pub(super) async fn publish_for(
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
}
