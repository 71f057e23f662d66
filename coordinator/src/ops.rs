//! The operator's endpoint of the cluster processes (`ops.listen`):
//!
//! - `/metrics`: Prometheus text format, the metrics of [`telemetry::CATALOGUE`];
//! - `/healthz`: 200 while the process runs (liveness);
//! - `/readyz`: 200 when the process can serve — Redis answers, and a worker consumes
//!   jobs — else 503 naming what is missing (readiness: the probe the chart uses). A
//!   coordinator serves the API with Redis alone, so a RabbitMQ outage does not take the
//!   console down;
//! - `/readyz/all`: the same, and everything the process's background work needs too
//!   (the coordinator's planning and publishing: RabbitMQ).
//!
//! Readiness is a set of named flags kept current by the process and by [`watch_redis`]
//! and [`watch_coordinator`]; the probe only reads them, so a scrape never waits on a
//! dead dependency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use mailferry_shared::config::settings::Settings;
use mailferry_shared::domain::status::UserStatus;
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::redis::RedisStore;
use mailferry_shared::telemetry;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::admin::{summarize, Cluster};

/// Named conditions for `/readyz` (those the process needs to serve) and
/// `/readyz/all` (those and the ones its background work needs).
#[derive(Clone, Default)]
pub struct Readiness {
    /// (what is missing when false, its flag, needed to serve)
    checks: Vec<(&'static str, Arc<AtomicBool>, bool)>,
}

impl Readiness {
    /// Adds a condition needed to serve (false until set) and returns its flag.
    pub fn check(&mut self, what: &'static str) -> Arc<AtomicBool> {
        self.add(what, true)
    }

    /// Adds a condition only the background work needs (`/readyz/all`).
    pub fn check_work(&mut self, what: &'static str) -> Arc<AtomicBool> {
        self.add(what, false)
    }

    fn add(&mut self, what: &'static str, serving: bool) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.checks.push((what, flag.clone(), serving));
        flag
    }

    /// The conditions that do not hold now: those needed to serve, or `all`.
    pub fn missing(&self, all: bool) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|(_, f, serving)| (all || *serving) && !f.load(Ordering::SeqCst))
            .map(|(w, _, _)| *w)
            .collect()
    }
}

/// 200 `ready`, or 503 naming what is missing.
fn readiness_answer(missing: Vec<&'static str>) -> axum::response::Response {
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_string()).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
            .into_response()
    }
}

/// Installs the Prometheus recorder for this process (`process`: coordinator or
/// worker) and records the build info.
pub fn install_metrics(
    process: &'static str,
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    const SECONDS: &[f64] = &[
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    ];
    const COMMAND_SECONDS: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
    ];
    const BYTES: &[f64] = &[
        1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(telemetry::JOB_DURATION.into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Full(telemetry::MESSAGE_SIZE.into()), BYTES)?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::IMAP_COMMAND_SECONDS.into()),
            COMMAND_SECONDS,
        )?
        .install_recorder()?;
    telemetry::describe();
    metrics::gauge!(telemetry::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "process" => process)
        .set(1.0);
    Ok(handle)
}

/// How often the metrics' upkeep runs (draining histogram samples into their buckets).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Serves the three paths on `listener` (bound by the caller: the process on
/// `ops.listen`, a test on port 0) until the process ends.
pub fn serve(listener: tokio::net::TcpListener, metrics: PrometheusHandle, readiness: Readiness) {
    // Histogram samples are drained by a render or by upkeep: without it, a process
    // nobody scrapes (the ServiceMonitor is off by default) keeps every sample.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            telemetry::record_process();
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                telemetry::record_process();
                let body = metrics.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", {
            let readiness = readiness.clone();
            get(move || {
                let answer = readiness_answer(readiness.missing(false));
                async move { answer }
            })
        })
        .route(
            "/readyz/all",
            get(move || {
                let answer = readiness_answer(readiness.missing(true));
                async move { answer }
            }),
        );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /readyz/all");
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the ops endpoint stopped");
        }
    });
}

/// Keeps `ok` telling whether Redis answers a PING (every 2 s, 1 s to answer).
pub fn watch_redis(store: RedisStore, ok: Arc<AtomicBool>) {
    tokio::spawn(async move {
        loop {
            let answered = tokio::time::timeout(Duration::from_secs(1), store.ping()).await;
            ok.store(matches!(answered, Ok(Ok(()))), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// What the coordinator sees, exported every `every`: the queue depths (which also
/// tell whether RabbitMQ answers, into `amqp_ok`) and each batch's users by status and
/// messages copied.
pub fn watch_coordinator(settings: Settings, amqp_ok: Arc<AtomicBool>, every: Duration) {
    tokio::spawn(async move {
        let mut queue: Option<AmqpQueue> = None;
        let mut cluster: Option<Cluster> = None;
        let mut exported = Exported::default();
        loop {
            if queue.is_none() {
                queue = AmqpQueue::from_settings(&settings)
                    .await
                    .map_err(|e| tracing::warn!(error = %e, "RabbitMQ unreachable"))
                    .ok();
            }
            let leading = crate::scheduler::leading();
            match &queue {
                Some(q) => match q.depths().await {
                    Ok((jobs, dead)) => {
                        // The same numbers on every replica: the leader's alone, so that
                        // a sum over the pods counts them once.
                        let (jobs, dead) = if leading { (jobs, dead) } else { (0, 0) };
                        metrics::gauge!(telemetry::QUEUE_JOBS).set(jobs as f64);
                        metrics::gauge!(telemetry::QUEUE_DEAD).set(dead as f64);
                        amqp_ok.store(true, Ordering::SeqCst);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the queue depths; reconnecting");
                        metrics::counter!(telemetry::RECONNECTS, "service" => "amqp").increment(1);
                        amqp_ok.store(false, Ordering::SeqCst);
                        queue = None;
                    }
                },
                None => amqp_ok.store(false, Ordering::SeqCst),
            }
            if cluster.is_none() {
                cluster = Cluster::connect(settings.clone()).await.ok();
            }
            if let Some(c) = &cluster {
                if let Err(e) = exported.refresh(c, leading).await {
                    tracing::warn!(error = %e, "cannot read the batches' statuses");
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// The batch gauges this process exports. Only the leader exports them: every replica
/// reads the same Redis, and a dashboard summing over the pods would count each user
/// once per replica. A batch whose users are all completed (closed) drops out, and so
/// does every batch when leadership moves away: its series are set to 0 once, so sums
/// stay right (the exporter cannot remove a series; they go at the next restart).
#[derive(Default)]
struct Exported {
    batches: std::collections::BTreeSet<String>,
}

impl Exported {
    async fn refresh(
        &mut self,
        cluster: &Cluster,
        leading: bool,
    ) -> Result<(), mailferry_shared::Error> {
        let mut now = std::collections::BTreeSet::new();
        if leading {
            for batch in cluster.batches().await? {
                let (lines, _) = cluster.status(&batch).await?;
                let finished = !lines.is_empty()
                    && lines
                        .iter()
                        .all(|l| matches!(l.status, UserStatus::Completed));
                if finished {
                    continue;
                }
                let sum = summarize(&lines);
                set_batch(&batch, |status| {
                    sum.users_by_status.get(status).copied().unwrap_or(0) as f64
                });
                metrics::gauge!(telemetry::BATCH_MESSAGES_COPIED, "batch" => batch.clone())
                    .set(sum.copied as f64);
                now.insert(batch);
            }
        }
        for gone in self.batches.difference(&now) {
            set_batch(gone, |_| 0.0);
            metrics::gauge!(telemetry::BATCH_MESSAGES_COPIED, "batch" => gone.clone()).set(0.0);
        }
        self.batches = now;
        Ok(())
    }
}

/// Every status of a batch's users gauge, so one that no user has any more reads 0, not
/// its last value.
fn set_batch(batch: &str, users: impl Fn(&str) -> f64) {
    for status in UserStatus::NAMES {
        metrics::gauge!(telemetry::USERS, "batch" => batch.to_string(), "status" => *status)
            .set(users(status));
    }
}
