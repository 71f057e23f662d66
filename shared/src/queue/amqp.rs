//! The cluster's [`JobQueue`]: bundles of folder jobs on RabbitMQ (DESIGN.md invariant
//! 4). A message's body is the bundle's jobs as a JSON array (a lone JSON object, one
//! job, is read too).
//!
//! - `<prefix>.jobs` is a quorum queue with an explicit delivery limit; a job delivered
//!   more often than that (a worker that keeps dying on it) goes to `<prefix>.dead`
//!   by RabbitMQ's own dead-lettering.
//! - Messages are persistent, carry only ids and names (never credentials), have the
//!   bundle's deterministic id as message id, and are published with publisher confirms and
//!   `mandatory`: a nack or an unroutable message is retried, never dropped.
//! - A job that fails for good is published to `<prefix>.dead` with the reason in the
//!   `x-mailferry-reason` header (where the admin sees it), then acked.
//! - A job handed back for later (a retry's backoff, a throttled account's pause, a busy
//!   folder) is published to a delay queue, `<prefix>.delay.<N>s`, whose messages
//!   expire after N seconds into `<prefix>.jobs` (RabbitMQ's own dead-lettering,
//!   at-least-once): the worker's slot is free at once instead of sleeping out the
//!   delay. One queue per delay in [`DELAYS_SECS`] (a delay is rounded up to the next),
//!   because a queue expires messages only at its head: mixed delays in one queue
//!   would hold the short behind the long.
//! - Declarations are idempotent and work on RabbitMQ 3.10.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

use crate::domain::job::FolderJob;
use crate::error::Error;
use crate::queue::{Delivery, JobQueue};
use crate::secret::Secret;

/// How long connecting, opening the channels and declaring the queues may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a publish may wait for the broker's confirm (then the connection is
/// dropped and the publish retried on a new one: it is idempotent by job id).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

const ATTEMPT_HEADER: &str = "x-mailferry-attempt";

/// The delay queues' delays. A hand-back asking for more waits the longest.
pub const DELAYS_SECS: &[u64] = &[1, 2, 5, 10, 30, 60, 300];

/// The name of the delay queue of `secs`.
fn delay_queue(prefix: &str, secs: u64) -> String {
    format!("{prefix}.delay.{secs}s")
}

/// The delay queue for `delay`: the shortest at least as long, or the longest; `None`
/// for a delay too short to be worth a queue (published to the jobs queue at once).
fn delay_bucket(delay: Duration) -> Option<u64> {
    if delay < Duration::from_millis(250) {
        return None;
    }
    let secs = delay.as_secs_f64();
    Some(
        DELAYS_SECS
            .iter()
            .copied()
            .find(|&d| d as f64 >= secs)
            .unwrap_or(DELAYS_SECS[DELAYS_SECS.len() - 1]),
    )
}
const REASON_HEADER: &str = "x-mailferry-reason";

fn queue_error(what: &str, e: lapin::Error) -> Error {
    Error::Store(format!("rabbitmq {what}: {e}"))
}

pub struct AmqpQueue {
    connection: Connection,
    publisher: Channel,
    /// Set by [`start_consuming`](AmqpQueue::start_consuming): a publisher (the
    /// coordinator) never consumes, so RabbitMQ never parks a job with it.
    consumer: tokio::sync::Mutex<Option<Consumer>>,
    /// Ackers of deliveries handed out and not yet settled, by delivery id.
    open: Mutex<HashMap<u64, Acker>>,
    jobs: String,
    dead: String,
    prefix: String,
}

/// A bundle that was dead-lettered (the jobs of it that failed for good), with the
/// reason recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadJob {
    pub jobs: Vec<FolderJob>,
    /// Our reason, or `None` when RabbitMQ dead-lettered it (delivery limit reached).
    pub reason: Option<String>,
}

impl AmqpQueue {
    /// [`connect`](Self::connect) as the settings say: their URL (`amqps://` over TLS),
    /// CA file, key prefix and delivery limit.
    pub async fn from_settings(
        settings: &crate::config::settings::Settings,
    ) -> Result<Self, Error> {
        let ca = match &settings.amqp_ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("amqp_ca_file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        Self::connect_with(
            &settings.amqp_url,
            ca,
            &settings.key_prefix,
            settings.queue.delivery_limit,
        )
        .await
    }

    /// Connects and declares the queues (idempotently). Publishing works at once; call
    /// [`start_consuming`](Self::start_consuming) to take jobs.
    pub async fn connect(url: &Secret, prefix: &str, delivery_limit: u32) -> Result<Self, Error> {
        Self::connect_with(url, None, prefix, delivery_limit).await
    }

    /// [`connect`](Self::connect), trusting the CA certificates in `ca_pem` (for
    /// `amqps://` to a server with a private CA) instead of the public roots.
    pub async fn connect_with(
        url: &Secret,
        ca_pem: Option<String>,
        prefix: &str,
        delivery_limit: u32,
    ) -> Result<Self, Error> {
        // Bounded: a broker that takes the TCP connection and then never finishes the
        // handshake or a declaration (seen under load in the tests) must be reported
        // and retried, not waited for forever.
        tokio::time::timeout(
            SETUP_TIMEOUT,
            Self::connect_unbounded(url, ca_pem, prefix, delivery_limit),
        )
        .await
        .map_err(|_| {
            Error::Store(format!(
                "rabbitmq connect: no answer within {} s (connection, channels, declarations)",
                SETUP_TIMEOUT.as_secs()
            ))
        })?
    }

    async fn connect_unbounded(
        url: &Secret,
        ca_pem: Option<String>,
        prefix: &str,
        delivery_limit: u32,
    ) -> Result<Self, Error> {
        // Named, so an operator (or a test) can find this process's connection in
        // `rabbitmqctl list_connections client_properties`.
        let properties = ConnectionProperties::default().with_connection_name(
            format!("mailferry-{prefix}-{}", std::process::id())
                .as_str()
                .into(),
        );
        let runtime = lapin::runtime::default_runtime().map_err(|e| queue_error("runtime", e))?;
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: ca_pem,
        };
        let connection = Connection::connect_with_config(url.expose(), properties, tls, runtime)
            .await
            .map_err(|e| queue_error("connect", e))?;
        let jobs = format!("{prefix}.jobs");
        let dead = format!("{prefix}.dead");
        let setup = connection
            .create_channel()
            .await
            .map_err(|e| queue_error("channel", e))?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let declare = |name: String, args: Vec<(&'static str, AMQPValue)>| {
            let setup = &setup;
            async move {
                let mut table = FieldTable::default();
                table.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                for (key, value) in args {
                    table.insert(key.into(), value);
                }
                setup
                    .queue_declare(name.as_str().into(), durable, table)
                    .await
                    .map_err(|e| {
                        queue_error(
                            &format!("declaring {name} (an existing queue with other arguments must be deleted or migrated)"),
                            e,
                        )
                    })
            }
        };
        let text = |s: &str| AMQPValue::LongString(s.into());
        declare(dead.clone(), vec![]).await?;
        declare(
            jobs.clone(),
            vec![
                (
                    "x-delivery-limit",
                    AMQPValue::LongInt(delivery_limit as i32),
                ),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&dead)),
            ],
        )
        .await?;
        for secs in DELAYS_SECS {
            declare(
                delay_queue(prefix, *secs),
                vec![
                    (
                        "x-message-ttl",
                        AMQPValue::LongLongInt((*secs * 1000) as i64),
                    ),
                    ("x-dead-letter-exchange", text("")),
                    ("x-dead-letter-routing-key", text(&jobs)),
                    // Expired messages move to the jobs queue at least once, never
                    // dropped (RabbitMQ requires reject-publish overflow for that).
                    ("x-dead-letter-strategy", text("at-least-once")),
                    ("x-overflow", text("reject-publish")),
                ],
            )
            .await?;
        }

        let publisher = connection
            .create_channel()
            .await
            .map_err(|e| queue_error("channel", e))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| queue_error("confirm_select", e))?;
        Ok(AmqpQueue {
            connection,
            publisher,
            consumer: tokio::sync::Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            jobs,
            dead,
            prefix: prefix.to_string(),
        })
    }

    /// Starts taking jobs, at most `prefetch` (= the worker's job slots) unacked at once.
    pub async fn start_consuming(&self, prefetch: u16) -> Result<(), Error> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| queue_error("channel", e))?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(|e| queue_error("basic_qos", e))?;
        let consumer = channel
            .basic_consume(
                self.jobs.as_str().into(),
                format!("mailferry-{}", std::process::id()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| queue_error("basic_consume", e))?;
        *self.consumer.lock().await = Some(consumer);
        Ok(())
    }

    async fn publish_to(
        &self,
        queue: &str,
        jobs: &[FolderJob],
        headers: FieldTable,
    ) -> Result<(), Error> {
        let payload = serde_json::to_vec(jobs).map_err(|e| Error::Store(e.to_string()))?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(FolderJob::bundle_id(jobs).as_str()))
            .with_headers(headers);
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let confirm = self
                .publisher
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &payload,
                    properties.clone(),
                )
                .await;
            match confirm {
                Err(e) => return Err(queue_error("publish", e)),
                Ok(pending) => match tokio::time::timeout(CONFIRM_TIMEOUT, pending)
                    .await
                    .map_err(|_| {
                        Error::Store(format!(
                            "rabbitmq publish to {queue}: no confirm within {} s",
                            CONFIRM_TIMEOUT.as_secs()
                        ))
                    })? {
                    Ok(c) if c.is_ack() => match c.take_message() {
                        None => return Ok(()),
                        Some(_) => last = format!("{queue} does not exist (message returned)"),
                    },
                    Ok(_) => last = "the broker refused the message (nack)".into(),
                    Err(e) => return Err(queue_error("publisher confirm", e)),
                },
            }
        }
        Err(Error::Store(format!("rabbitmq publish to {queue}: {last}")))
    }

    /// Messages waiting in the jobs queue and in the dead-letter queue (passive
    /// declarations: nothing is created or changed).
    pub async fn depths(&self) -> Result<(u32, u32), Error> {
        let passive = QueueDeclareOptions {
            passive: true,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut counts = [0u32; 2];
        for (i, q) in [&self.jobs, &self.dead].into_iter().enumerate() {
            counts[i] = self
                .publisher
                .queue_declare(q.as_str().into(), passive, FieldTable::default())
                .await
                .map_err(|e| queue_error(&format!("inspecting {q}"), e))?
                .message_count();
        }
        Ok((counts[0], counts[1]))
    }

    /// Jobs in the dead-letter queue (taken off it), with their reasons.
    pub async fn drain_dead(&self) -> Result<Vec<DeadJob>, Error> {
        let mut out = Vec::new();
        while let Some(message) = self
            .publisher
            .basic_get(self.dead.as_str().into(), BasicGetOptions::default())
            .await
            .map_err(|e| queue_error("basic_get", e))?
        {
            let jobs = decode(&message.delivery.data).ok_or_else(|| {
                Error::Store("a malformed message in the dead-letter queue".into())
            })?;
            let reason =
                header(&message.delivery.properties, REASON_HEADER).and_then(|v| match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                });
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| queue_error("ack", e))?;
            out.push(DeadJob { jobs, reason });
        }
        Ok(out)
    }

    /// Deletes the installation's queues (tests, and removing an installation).
    pub async fn delete_queues(&self) -> Result<(), Error> {
        let delays = DELAYS_SECS.iter().map(|s| delay_queue(&self.prefix, *s));
        for q in [self.jobs.clone(), self.dead.clone()]
            .into_iter()
            .chain(delays)
        {
            self.delete_queue(&q).await?;
        }
        Ok(())
    }

    /// Deletes one queue (tests use it to make a publish fail).
    pub async fn delete_queue(&self, name: &str) -> Result<(), Error> {
        self.publisher
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .map_err(|e| queue_error("queue_delete", e))?;
        Ok(())
    }

    /// Hands a delivery back without acking it (as a worker that dies would): RabbitMQ
    /// redelivers it, counting towards the delivery limit.
    pub async fn abandon(&self, delivery: &Delivery) -> Result<(), Error> {
        let acker = self.take_acker(delivery);
        if let Some(acker) = acker {
            acker
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| queue_error("nack", e))?;
        }
        Ok(())
    }

    /// The acker of a delivery handed out and not yet settled (once).
    fn take_acker(&self, delivery: &Delivery) -> Option<Acker> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&delivery.id)
    }

    /// Publishes the delivery's jobs again (confirmed), to the delay queue for `delay`,
    /// then acks it. A crash in between redelivers the original too: at-least-once, and
    /// jobs are idempotent.
    async fn hand_back(&self, delivery: &Delivery, attempt: u32, delay: Duration) {
        let queue = match delay_bucket(delay) {
            Some(secs) => delay_queue(&self.prefix, secs),
            None => self.jobs.clone(),
        };
        match self
            .publish_to(&queue, &delivery.jobs, attempt_headers(attempt))
            .await
        {
            Ok(()) => self.settle(delivery).await,
            Err(e) => {
                tracing::error!(jobs = %delivery.bundle_id(), error = %e, "could not hand the jobs back; returning the delivery to RabbitMQ as it is");
                self.give_back(delivery).await;
            }
        }
    }

    /// After a publish that should have settled a delivery failed: the delivery goes
    /// back to RabbitMQ now (redelivered, counting towards the delivery limit) rather
    /// than staying unacked, holding a prefetch slot of this consumer until its
    /// channel dies. Nothing is lost either way; this only frees the slot at once.
    async fn give_back(&self, delivery: &Delivery) {
        if let Err(e) = self.abandon(delivery).await {
            // The channel is gone: RabbitMQ redelivers what it had not seen acked.
            tracing::warn!(jobs = %delivery.bundle_id(), error = %e, "nack failed; the jobs will be redelivered");
        }
    }

    async fn settle(&self, delivery: &Delivery) {
        let acker = self.take_acker(delivery);
        if let Some(acker) = acker {
            if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                // The channel died: RabbitMQ will redeliver, and the job is idempotent.
                tracing::warn!(jobs = %delivery.bundle_id(), error = %e, "ack failed; the jobs will be redelivered");
            }
        }
    }
}

/// A message body: a bundle (JSON array of jobs, not empty) or one job (JSON object).
fn decode(body: &[u8]) -> Option<Vec<FolderJob>> {
    let jobs = match serde_json::from_slice::<Vec<FolderJob>>(body) {
        Ok(jobs) => jobs,
        Err(_) => vec![serde_json::from_slice::<FolderJob>(body).ok()?],
    };
    (!jobs.is_empty()).then_some(jobs)
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn attempt_headers(attempt: u32) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongUInt(attempt));
    h
}

impl JobQueue for AmqpQueue {
    async fn publish(&self, jobs: Vec<FolderJob>) -> Result<(), Error> {
        let queue = self.jobs.clone();
        self.publish_to(&queue, &jobs, attempt_headers(1)).await
    }

    async fn next(&self) -> Option<Delivery> {
        let mut guard = self.consumer.lock().await;
        let Some(consumer) = guard.as_mut() else {
            tracing::error!("next() on a queue that is not consuming");
            return None;
        };
        loop {
            let message = match consumer.next().await {
                Some(Ok(m)) => m,
                failed => {
                    if let Some(Err(e)) = failed {
                        tracing::error!(error = %e, "RabbitMQ consumer failed");
                    }
                    // A failed consumer never yields again: drop it, so every caller
                    // waiting here sees the end (and the worker reconnects).
                    *guard = None;
                    return None;
                }
            };
            let Some(jobs) = decode(&message.data) else {
                // Not a job of ours: it cannot run, and it must not loop.
                tracing::error!("dropping a malformed job message to the dead-letter queue");
                let _ = message
                    .nack(lapin::options::BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
                continue;
            };
            let ours = header(&message.properties, ATTEMPT_HEADER)
                .and_then(|v| v.as_long_uint())
                .unwrap_or(1);
            // Redeliveries by RabbitMQ (a worker died holding it) count as attempts too.
            let redelivered = header(&message.properties, "x-delivery-count")
                .and_then(|v| {
                    v.as_long_long_int()
                        .map(|n| n as u32)
                        .or_else(|| v.as_long_int().map(|n| n as u32))
                })
                .unwrap_or(0);
            let id = message.delivery_tag;
            self.open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, message.acker.clone());
            return Some(Delivery {
                jobs,
                attempt: ours + redelivered,
                id,
            });
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        self.settle(delivery).await;
    }

    async fn retry(&self, delivery: Delivery, delay: Duration) {
        self.hand_back(&delivery, delivery.attempt + 1, delay).await
    }

    async fn requeue(&self, delivery: Delivery, delay: Duration) {
        self.hand_back(&delivery, delivery.attempt, delay).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: String) {
        let mut headers = attempt_headers(delivery.attempt);
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
        let dead = self.dead.clone();
        match self.publish_to(&dead, &delivery.jobs, headers).await {
            Ok(()) => self.settle(delivery).await,
            Err(e) => {
                // Settled already when the rest of its bundle was handed back: the jobs'
                // failure is in their recorded state (the user shows it); only the copy
                // for the dead-letter queue is lost.
                tracing::error!(jobs = %delivery.bundle_id(), error = %e, "could not dead-letter; returning the delivery to RabbitMQ if it is not settled yet");
                self.give_back(delivery).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::WireName;

    #[test]
    fn delays_go_to_the_next_longer_queue() {
        assert_eq!(delay_bucket(Duration::from_millis(100)), None);
        assert_eq!(delay_bucket(Duration::from_millis(600)), Some(1));
        assert_eq!(delay_bucket(Duration::from_secs(1)), Some(1));
        assert_eq!(delay_bucket(Duration::from_millis(1001)), Some(2));
        assert_eq!(delay_bucket(Duration::from_secs(45)), Some(60));
        assert_eq!(delay_bucket(Duration::from_secs(3600)), Some(300));
    }

    #[test]
    fn a_body_is_a_bundle_or_one_job_and_never_empty() {
        let job = FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName("INBOX".into()),
            target_folder: WireName("INBOX".into()),
            uid_range: None,
            pass: 1,
            group: Some(1),
            archive: None,
        };
        let bundle = serde_json::to_vec(&[job.clone(), job.clone()]).unwrap();
        assert_eq!(decode(&bundle), Some(vec![job.clone(), job.clone()]));
        let one = serde_json::to_vec(&job).unwrap();
        assert_eq!(decode(&one), Some(vec![job]));
        assert_eq!(decode(b"[]"), None);
        assert_eq!(decode(b"{\"batch\": 1}"), None);
    }
}
