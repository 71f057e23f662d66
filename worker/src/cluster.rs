//! The cluster worker process: jobs from RabbitMQ, checkpoints and sealed credentials
//! from Redis, the same engine and consumer loop as the embedded mode.

use std::sync::Arc;

use mailferry_shared::amqp_queue::AmqpQueue;
use mailferry_shared::imap::Limits;
use mailferry_shared::job::{FolderJob, SkippedMessage};
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::seal::Keyring;
use mailferry_shared::settings::Settings;
use mailferry_shared::status::JobState;
use mailferry_shared::Error;
use tokio::sync::watch;

use crate::accounts::RedisAccounts;
use crate::consumer::{consume, RetryPolicy};
use crate::{Engine, EngineSettings, JobError, JobReport, ProgressSink};

/// Reports job states and each finished job's counts to Redis. Updates go through one
/// background writer, in order (a job's "running" never lands after its "done"), and
/// the engine never waits for Redis. Counts are recorded once per job id: a redelivered
/// job's second report is not counted twice.
struct RedisProgress {
    updates: tokio::sync::mpsc::UnboundedSender<(FolderJob, Update)>,
}

enum Update {
    State(JobState),
    Finished(JobReport),
}

impl RedisProgress {
    /// The sink, and the writer's task: it ends, with everything written, once the
    /// sink is dropped.
    fn start(store: RedisStore) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(FolderJob, Update)>();
        let writer = tokio::spawn(async move {
            while let Some((job, update)) = rx.recv().await {
                if let Err(e) = write(&store, &job, update).await {
                    tracing::warn!(job = %job.id(), error = %e, "could not record the job's progress");
                }
            }
        });
        (RedisProgress { updates: tx }, writer)
    }

    fn send(&self, job: &FolderJob, update: Update) {
        let _ = self.updates.send((job.clone(), update));
    }
}

async fn write(store: &RedisStore, job: &FolderJob, update: Update) -> Result<(), Error> {
    let state = match update {
        Update::State(state) => state,
        Update::Finished(report) => {
            let counts = [
                ("copied", report.copied as i64),
                ("copied_bytes", report.copied_bytes as i64),
                ("matched", report.matched as i64),
                ("skipped", report.skipped.len() as i64),
                ("flags_updated", report.flags_updated as i64),
            ];
            store
                .record_progress(&job.batch, &job.user, &job.id(), 1, &counts)
                .await?;
            // Not yet a reconciliation of the folders' counts: a job that skipped or
            // missed messages is reported as not verified.
            let verified = report.skipped.is_empty() && report.missed == 0;
            let mismatch = (!verified).then(|| {
                format!(
                    "{}: {} skipped, {} missed",
                    job.source_folder.display(),
                    report.skipped.len(),
                    report.missed
                )
            });
            JobState::Done { verified, mismatch }
        }
    };
    store
        .set_job_state(&job.batch, &job.user, &job.id(), &state)
        .await
}

impl ProgressSink for RedisProgress {
    fn job_started(&self, job: &FolderJob, _: u64, _: u64) {
        self.send(job, Update::State(JobState::Running));
    }
    fn copied(&self, _: &FolderJob, _: u64, _: u64) {}
    fn skipped(&self, job: &FolderJob, m: &SkippedMessage) {
        tracing::warn!(job = %job.id(), uid = m.uid, size = m.size, reason = %m.reason, "message skipped");
    }
    fn job_finished(&self, job: &FolderJob, report: &JobReport) {
        self.send(job, Update::Finished(report.clone()));
    }
    fn job_failed(&self, job: &FolderJob, _: &JobError, reason: &str, will_retry: bool) {
        tracing::warn!(job = %job.id(), will_retry, reason, "job failed");
        if !will_retry {
            let reason = reason.to_string();
            self.send(job, Update::State(JobState::Failed { reason }));
        }
    }
}

/// Connects to RabbitMQ and starts consuming, retrying for about half a minute: the
/// broker may still be starting, and RabbitMQ 3.10 can answer INTERNAL_ERROR to one of
/// several workers declaring a new quorum queue at the same moment (seen in the tests).
async fn consuming_queue(settings: &Settings) -> Result<AmqpQueue, Error> {
    let mut attempt = 0u32;
    loop {
        let result = async {
            let queue = AmqpQueue::connect(
                &settings.amqp_url,
                &settings.key_prefix,
                settings.queue.delivery_limit,
            )
            .await?;
            queue.start_consuming(settings.worker.job_slots).await?;
            Ok::<_, Error>(queue)
        }
        .await;
        match result {
            Ok(queue) => return Ok(queue),
            Err(e) if attempt < 6 => {
                attempt += 1;
                let delay = std::time::Duration::from_millis(250 << attempt);
                tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "RabbitMQ not ready; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs until `shutdown` turns true, then finishes the jobs in progress. A lost broker
/// connection is re-established; it is an error only if RabbitMQ stays unreachable.
pub async fn run(settings: &Settings, shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    let keys = settings
        .sealing_keys()
        .map_err(|e| Error::Config(e.to_string()))
        .and_then(|k| Keyring::parse(&k).map_err(|e| Error::Config(e.to_string())))?;
    let store = RedisStore::connect(&settings.redis_url, &settings.key_prefix).await?;
    let accounts = Arc::new(RedisAccounts::new(
        store.clone(),
        Arc::new(keys),
        Limits::default(),
        settings.worker.connections_per_account as usize,
    ));
    let (progress, writer) = RedisProgress::start(store.clone());
    let engine = Arc::new(Engine::new(
        Arc::new(store),
        accounts,
        Arc::new(progress),
        EngineSettings {
            bytes_in_flight: settings.worker.bytes_in_flight.0,
            ..EngineSettings::default()
        },
    ));
    let result = loop {
        let queue = match consuming_queue(settings).await {
            Ok(q) => Arc::new(q),
            Err(e) => break Err(e),
        };
        tracing::info!(slots = settings.worker.job_slots, "worker consuming");
        consume(
            queue,
            engine.clone(),
            settings.worker.job_slots as usize,
            RetryPolicy::default(),
            shutdown.clone(),
        )
        .await;
        if *shutdown.borrow() {
            break Ok(());
        }
        // The consumer ended without a shutdown: the broker connection is gone. Jobs in
        // progress could not be acked and will be redelivered (they are idempotent).
        tracing::warn!("lost the RabbitMQ connection; reconnecting");
    };
    // The consumers are done; dropping the engine closes the progress channel, and the
    // writer finishes what is queued before the process exits.
    drop(engine);
    let _ = writer.await;
    result
}
