//! The cluster worker process: jobs from RabbitMQ, checkpoints and sealed credentials
//! from Redis, the same engine and consumer loop as the embedded mode.

use std::sync::Arc;

use mailferry_shared::config::seal::Keyring;
use mailferry_shared::config::settings::Settings;
use mailferry_shared::domain::job::{FolderJob, SkippedMessage};
use mailferry_shared::domain::progress::Counter;
use mailferry_shared::imap::Limits;
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::redis::lease::Fence;
use mailferry_shared::redis::slots::SharedSlots;
use mailferry_shared::redis::RedisStore;
use mailferry_shared::telemetry;
use mailferry_shared::Error;
use tokio::sync::watch;

use crate::accounts::RedisAccounts;
use crate::claims::{BufferedCheckpoints, PendingCounts, RedisClaims};
use crate::consumer::{consume, RetryPolicy};
use crate::{Engine, EngineSettings, JobError, JobReport, ProgressSink};

/// Collects each running job's counts for its claims' keeper, which carries them to
/// Redis with every renewal and the delivery's end: a few round trips per delivery,
/// never one per message.
struct CountingProgress {
    pending: Arc<PendingCounts>,
}

impl ProgressSink for CountingProgress {
    fn job_started(&self, _: &FolderJob, _: u64, _: u64) {}
    fn copied(&self, job: &FolderJob, messages: u64, bytes: u64) {
        metrics::counter!(telemetry::MESSAGES_COPIED).increment(messages);
        metrics::counter!(telemetry::BYTES_COPIED).increment(bytes);
        self.pending.add(job, Counter::Copied, messages as i64);
        self.pending.add(job, Counter::CopiedBytes, bytes as i64);
    }
    fn skipped(&self, job: &FolderJob, m: &SkippedMessage) {
        tracing::warn!(job = %job.id(), uid = m.uid, size = m.size, reason = %m.reason, "message skipped");
        metrics::counter!(telemetry::MESSAGES_SKIPPED, "reason" => m.kind.label()).increment(1);
        self.pending.add(job, Counter::Skipped, 1);
    }
    fn job_finished(&self, _: &FolderJob, _: &JobReport) {}
    fn job_failed(&self, job: &FolderJob, _: &JobError, reason: &str, will_retry: bool) {
        tracing::warn!(job = %job.id(), will_retry, reason, "job failed");
    }
}

/// How long an idle connection waits for its user's next job before it is logged out.
const IDLE_LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// The installation's connection caps, shared through Redis by the workers and the
/// coordinator; slots of a process that dies lapse after `worker.claim_secs`.
pub fn shared_slots(settings: &Settings, store: &RedisStore) -> Arc<SharedSlots> {
    SharedSlots::new(
        store.clone(),
        settings.worker.connections_per_account,
        settings.worker.connections_per_host,
        std::time::Duration::from_secs(settings.worker.claim_secs),
        std::time::Duration::from_secs(settings.worker.throttle_pause_secs),
    )
}

/// Connects to RabbitMQ and starts consuming, retrying for about half a minute: the
/// broker may still be starting, and RabbitMQ 3.10 can answer INTERNAL_ERROR to one of
/// several workers declaring a new quorum queue at the same moment (seen in the tests).
async fn consuming_queue(settings: &Settings) -> Result<AmqpQueue, Error> {
    let mut attempt = 0u32;
    loop {
        let result = async {
            let queue = AmqpQueue::from_settings(settings).await?;
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
/// `consuming` is true while jobs are taken from RabbitMQ (the readiness probe's).
pub async fn run(
    settings: &Settings,
    shutdown: watch::Receiver<bool>,
    consuming: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), Error> {
    let keys = settings
        .sealing_keys()
        .map_err(|e| Error::Config(e.to_string()))
        .and_then(|k| Keyring::parse(&k).map_err(|e| Error::Config(e.to_string())))?;
    let store = RedisStore::from_settings(settings).await?;
    let accounts = Arc::new(
        RedisAccounts::new(
            store.clone(),
            Arc::new(keys),
            Limits::default(),
            settings.worker.connections_per_account as usize,
        )
        .with_shared_slots(shared_slots(settings, &store)),
    );
    accounts.start_reaper(IDLE_LINGER);
    accounts.evict_idle_when_host_full();
    let pending = Arc::new(PendingCounts::default());
    let checkpoints = Arc::new(BufferedCheckpoints::new(store.clone()));
    let claims = Arc::new(RedisClaims::new(
        store.clone(),
        std::time::Duration::from_secs(settings.worker.claim_secs),
        pending.clone(),
        checkpoints.clone(),
    ));
    let engine = Arc::new(Engine::new(
        checkpoints,
        accounts,
        Arc::new(CountingProgress { pending }),
        EngineSettings {
            bytes_in_flight: settings.worker.bytes_in_flight.0,
            ..EngineSettings::default()
        },
    ));
    // SIGTERM: no new jobs; those in progress get `shutdown_grace_secs` to finish,
    // then they are handed back, so the process ends within the pod's grace period.
    let drain = Arc::new(Fence::open_ended());
    tokio::spawn({
        let (drain, mut shutdown) = (drain.clone(), shutdown.clone());
        let grace = std::time::Duration::from_secs(settings.worker.shutdown_grace_secs);
        async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(grace).await;
            drain.revoke(format!(
                "the worker is stopping and its {} s grace is over",
                grace.as_secs()
            ));
        }
    });
    let result = loop {
        let queue = match consuming_queue(settings).await {
            Ok(q) => Arc::new(q),
            Err(e) => break Err(e),
        };
        tracing::info!(slots = settings.worker.job_slots, "worker consuming");
        metrics::gauge!(telemetry::JOB_SLOTS).set(settings.worker.job_slots as f64);
        consuming.store(true, std::sync::atomic::Ordering::SeqCst);
        consume(
            queue,
            engine.clone(),
            claims.clone(),
            settings.worker.job_slots as usize,
            RetryPolicy {
                throttle_default: std::time::Duration::from_secs(
                    settings.worker.throttle_pause_secs,
                ),
                ..RetryPolicy::default()
            },
            shutdown.clone(),
            drain.clone(),
        )
        .await;
        if *shutdown.borrow() {
            break Ok(());
        }
        // The consumer ended without a shutdown: the broker connection is gone. Jobs in
        // progress could not be acked and will be redelivered (they are idempotent).
        consuming.store(false, std::sync::atomic::Ordering::SeqCst);
        metrics::counter!(telemetry::RECONNECTS, "service" => "amqp").increment(1);
        tracing::warn!("lost the RabbitMQ connection; reconnecting");
    };
    consuming.store(false, std::sync::atomic::Ordering::SeqCst);
    // Every job in progress has finished (and recorded its end) or been handed back.
    result
}
