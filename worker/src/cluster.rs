//! The cluster worker process: jobs from RabbitMQ, checkpoints and sealed credentials
//! from Redis, the same engine and consumer loop as the embedded mode.

use std::sync::Arc;

use mailferry_shared::amqp_queue::AmqpQueue;
use mailferry_shared::imap::Limits;
use mailferry_shared::job::{FolderJob, SkippedMessage};
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::seal::Keyring;
use mailferry_shared::settings::Settings;
use mailferry_shared::Error;
use tokio::sync::watch;

use crate::accounts::RedisAccounts;
use crate::consumer::{consume, RetryPolicy};
use crate::{Engine, EngineSettings, JobError, JobReport, ProgressSink};

/// Reports each finished job's counts to Redis (once per job id: a redelivered job's
/// second report is not counted twice).
struct RedisProgress {
    store: RedisStore,
}

impl ProgressSink for RedisProgress {
    fn job_started(&self, _: &FolderJob, _: u64, _: u64) {}
    fn copied(&self, _: &FolderJob, _: u64, _: u64) {}
    fn skipped(&self, job: &FolderJob, m: &SkippedMessage) {
        tracing::warn!(job = %job.id(), uid = m.uid, size = m.size, reason = %m.reason, "message skipped");
    }
    fn job_finished(&self, job: &FolderJob, report: &JobReport) {
        let store = self.store.clone();
        let (job, report) = (job.clone(), report.clone());
        tokio::spawn(async move {
            let counts = [
                ("copied", report.copied as i64),
                ("copied_bytes", report.copied_bytes as i64),
                ("matched", report.matched as i64),
                ("skipped", report.skipped.len() as i64),
                ("flags_updated", report.flags_updated as i64),
            ];
            if let Err(e) = store
                .record_progress(&job.batch, &job.user, &job.id(), 1, &counts)
                .await
            {
                tracing::warn!(job = %job.id(), error = %e, "could not record progress");
            }
        });
    }
    fn job_failed(&self, job: &FolderJob, _: &JobError, reason: &str, will_retry: bool) {
        tracing::warn!(job = %job.id(), will_retry, reason, "job failed");
    }
}

/// Runs until `shutdown` turns true (then finishes the jobs in progress) or the broker
/// connection ends.
pub async fn run(settings: &Settings, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let keys = settings
        .sealing_keys()
        .map_err(|e| Error::Config(e.to_string()))
        .and_then(|k| Keyring::parse(&k).map_err(|e| Error::Config(e.to_string())))?;
    let store = RedisStore::connect(&settings.redis_url, &settings.key_prefix).await?;
    let queue = Arc::new(
        AmqpQueue::connect(
            &settings.amqp_url,
            &settings.key_prefix,
            settings.queue.delivery_limit,
        )
        .await?,
    );
    queue.start_consuming(settings.worker.job_slots).await?;
    let accounts = Arc::new(RedisAccounts::new(
        store.clone(),
        keys,
        Limits::default(),
        settings.worker.connections_per_account as usize,
    ));
    let engine = Arc::new(Engine::new(
        Arc::new(store.clone()),
        accounts,
        Arc::new(RedisProgress { store }),
        EngineSettings {
            bytes_in_flight: settings.worker.bytes_in_flight.0,
            ..EngineSettings::default()
        },
    ));
    tracing::info!(slots = settings.worker.job_slots, "worker consuming");
    consume(
        queue,
        engine,
        settings.worker.job_slots as usize,
        RetryPolicy::default(),
        shutdown,
    )
    .await;
    Ok(())
}
