//! `mailferry`: the command line entry point.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mailferry_coordinator::cli::{prepare, Cli, Command, MigrateArgs};
use mailferry_coordinator::embedded::{self, DryRun};
use mailferry_coordinator::ops;
use mailferry_coordinator::report::{
    exit_for, human_bytes, mapping_table, render_summary, Exit, Reporter,
};
use mailferry_shared::config::settings::{LogFormat, Settings};
use mailferry_shared::domain::progress::Counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

fn main() -> ExitCode {
    // Before any password is read: this process's memory stays out of core dumps.
    let dumps = mailferry_shared::secret::keep_out_of_core_dumps();
    let cli = Cli::parse();
    // The long-running processes log as their settings say (text or JSON): they start
    // logging once those are read.
    if !matches!(cli.command, Command::Coordinator(_) | Command::Worker(_)) {
        if let Err(e) = init_logging(cli.verbose, "warn", LogFormat::Text) {
            eprintln!("mailferry: {e:#}");
            return ExitCode::from(Exit::Usage as u8);
        }
    }
    if let Err(why) = dumps {
        // Logged once logging is up (the long-running processes: as they start).
        tracing::warn!("a core dump of this process could hold passwords: {why}");
    }
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            // Into a buffer first: the generator panics on a write error, and a closed
            // pipe (`| head`) is not one worth a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mailferry", &mut script);
            let _ = std::io::stdout().write_all(&script);
            ExitCode::SUCCESS
        }
        Command::Migrate(args) => match migrate(&args) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                eprintln!("mailferry: {e:#}");
                ExitCode::from(Exit::Usage as u8)
            }
        },
        Command::Batch(args) => match batch(&args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("mailferry batch: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Api(args) => match mailferry_coordinator::cli::api::run(&args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("mailferry api: {e:#}");
                ExitCode::from(Exit::Usage as u8)
            }
        },
        Command::Coordinator(args) => match coordinator(&args, cli.verbose) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailferry coordinator: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Worker(args) => match worker(&args, cli.verbose) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailferry worker: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs to stderr at the level `RUST_LOG` says if set, else `-v` (debug; `-vv` trace),
/// else `configured` (the settings' `ops.log_level` for the long-running processes,
/// `warn` for the commands a person runs).
fn init_logging(verbose: u8, configured: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (text, from) = match (rust_log, verbose) {
        (Some(v), _) => (v, "RUST_LOG"),
        (None, 0) => (configured.to_string(), "ops.log_level"),
        (None, 1) => ("debug".to_string(), "-v"),
        (None, _) => ("trace".to_string(), "-vv"),
    };
    mailferry_shared::config::settings::check_log_filter(&text)
        .map_err(|problem| anyhow::anyhow!("{from}: {problem}"))?;
    let filter: Targets = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{from}: {text:?}: {e}"))?;
    let logs = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        // One JSON object per line, with the job's span (batch, user, folder) in it.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .finish()
            .with(filter)
            .init(),
        // Colours only for a person at a terminal: log files get plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(filter)
            .init(),
    }
    Ok(())
}

fn migrate(args: &MigrateArgs) -> anyhow::Result<Exit> {
    let plan = prepare(args)?;
    for note in &plan.notes {
        eprintln!("note: {note}");
    }
    for row in &plan.bad_rows {
        eprintln!("mailferry: CSV {row}");
    }
    if plan.users.is_empty() {
        eprintln!("mailferry: no user to migrate");
        return Ok(if plan.bad_rows.is_empty() {
            Exit::Usage
        } else {
            Exit::BadRows
        });
    }
    let reporter = Arc::new(Reporter::new(args.progress));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let bad_rows = plan.bad_rows.len();
    let dry_run = runtime.block_on(async {
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            eprintln!("mailferry: stopping: finishing the folders in progress (again to stop at once; re-running is safe)");
            let _ = stop.send(true);
            wait_for_signal().await;
            std::process::exit(130);
        });
        embedded::run(plan.users, plan.options, reporter.clone(), shutdown).await
    })?;
    if let Some(dry) = dry_run {
        print_dry_run(&dry);
        let failed = dry.iter().any(|(_, r)| r.is_err());
        return Ok(if failed { Exit::FolderFailed } else { Exit::Ok });
    }
    let summaries = reporter.finish();
    print!("{}", render_summary(&summaries));
    if let Some(path) = &args.summary_json {
        let json = serde_json::json!(summaries
            .iter()
            .map(|(user, s)| serde_json::json!({
                "user": user,
                "folders": s.folders_planned,
                "folders_done": s.folders_done,
                "copied": s.copied,
                "copied_bytes": s.copied_bytes,
                "already_at_target": s.matched,
                "flags_updated": s.flags_updated,
                "skipped": s.skipped.iter().map(|(f, m)| serde_json::json!({
                    "folder": f, "uid": m.uid, "size": m.size, "date": m.internal_date, "reason": m.reason
                })).collect::<Vec<_>>(),
                "failed": s.failed.iter().map(|(f, r, _)| serde_json::json!({"folder": f, "reason": r})).collect::<Vec<_>>(),
                "seconds": s.elapsed.as_secs_f64(),
            }))
            .collect::<Vec<_>>());
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(exit_for(&summaries, bad_rows))
}

/// The settings (file, then environment) and a runtime, for the cluster commands.
/// `--check-config`: the settings load and validate, and the sealing keys parse.
/// The coordinator (`serves_api`) also reads its API tokens.
fn check_config(
    args: &mailferry_coordinator::cli::WorkerArgs,
    serves_api: bool,
) -> anyhow::Result<()> {
    let settings = Settings::load(args.config.as_deref(), std::env::vars())?;
    let keys = settings.sealing_keys()?;
    mailferry_shared::config::seal::Keyring::parse(&keys).context("the sealing keys")?;
    if serves_api && settings.api.listen.is_some() {
        let tokens = settings.api.all_tokens()?;
        println!("API tokens OK: {} (secrets redacted)", tokens.len());
    }
    println!("settings OK: {settings:?}");
    Ok(())
}

fn cluster_setup(
    config: Option<&std::path::Path>,
) -> anyhow::Result<(
    mailferry_shared::config::settings::Settings,
    tokio::runtime::Runtime,
)> {
    let settings = mailferry_shared::config::settings::Settings::load(config, std::env::vars())?;
    if let Some(ca) = &settings.oauth_ca_file {
        mailferry_shared::oauth::http::trust_ca_file(ca.clone());
    }
    if settings.api.forbid_private_sources {
        mailferry_shared::oauth::http::require_public_token_endpoints();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok((settings, runtime))
}

/// Logging and metrics of a long-running process (`process`: coordinator or worker),
/// per its settings: metrics are recorded only when they are served (`ops.listen`).
fn start_ops(
    settings: &Settings,
    verbose: u8,
    process: &'static str,
) -> anyhow::Result<Option<PrometheusHandle>> {
    init_logging(verbose, &settings.ops.log_level, settings.ops.log_format)?;
    match settings.ops.listen_addr() {
        Some(_) => Ok(Some(ops::install_metrics(process)?)),
        None => Ok(None),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` when `ops.listen` is set; Redis
/// answering is added to the process's own readiness conditions.
async fn serve_ops(
    settings: &Settings,
    metrics: Option<PrometheusHandle>,
    mut readiness: ops::Readiness,
) -> anyhow::Result<()> {
    let (Some(addr), Some(metrics)) = (settings.ops.listen_addr(), metrics) else {
        return Ok(());
    };
    let store = mailferry_shared::redis::RedisStore::from_settings(settings).await?;
    ops::watch_redis(store, readiness.check("redis unreachable"));
    ops::serve(bind("ops.listen", addr).await?, metrics, readiness);
    Ok(())
}

/// Binds a listening socket, naming the setting that gave the address (so a port in use
/// is reported at start-up, with what to change).
async fn bind(
    setting: &str,
    addr: std::net::SocketAddr,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{setting} {addr}: {e}"))
}

fn worker(args: &mailferry_coordinator::cli::WorkerArgs, verbose: u8) -> anyhow::Result<()> {
    if args.check_config {
        return check_config(args, false);
    }
    let (settings, runtime) = cluster_setup(args.config.as_deref())?;
    let metrics = start_ops(&settings, verbose, "worker")?;
    runtime.block_on(async {
        let mut readiness = ops::Readiness::default();
        let consuming = readiness.check("not consuming jobs from RabbitMQ");
        serve_ops(&settings, metrics, readiness).await?;
        let shutdown = on_signal("stopping: finishing the jobs in progress");
        mailferry_worker::run_cluster_worker(&settings, shutdown, consuming).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

fn coordinator(args: &mailferry_coordinator::cli::WorkerArgs, verbose: u8) -> anyhow::Result<()> {
    if args.check_config {
        return check_config(args, true);
    }
    let (settings, runtime) = cluster_setup(args.config.as_deref())?;
    let metrics = start_ops(&settings, verbose, "coordinator")?;
    runtime.block_on(async {
        if metrics.is_some() {
            let mut readiness = ops::Readiness::default();
            // The API needs Redis alone: without RabbitMQ the console still serves, and
            // only /readyz/all says that planning waits.
            let amqp = readiness.check_work("RabbitMQ unreachable");
            ops::watch_coordinator(settings.clone(), amqp, OPS_EVERY);
            serve_ops(&settings, metrics, readiness).await?;
        }
        let shutdown =
            on_signal("stopping: plans in progress finish, the leader lease is released");
        if let Some(addr) = settings.api.listen_addr() {
            let cluster = mailferry_coordinator::admin::Cluster::connect(settings.clone()).await?;
            let api = mailferry_coordinator::api::Api::new(cluster).await?;
            let listener = bind("api.listen", addr).await?;
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = mailferry_coordinator::api::serve(listener, api, stop).await {
                    tracing::error!(error = %e, "the API stopped");
                    eprintln!("mailferry coordinator: the API stopped: {e:#}");
                    std::process::exit(1);
                }
            });
        }
        let keys = mailferry_shared::config::seal::Keyring::parse(&settings.sealing_keys()?)
            .context("the sealing keys")?;
        let store = mailferry_shared::redis::RedisStore::from_settings(&settings).await?;
        mailferry_coordinator::scheduler::run(settings, store, std::sync::Arc::new(keys), shutdown)
            .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

/// How often the coordinator exports the queue depths and the users by status.
const OPS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

fn batch(args: &mailferry_coordinator::cli::BatchArgs) -> anyhow::Result<u8> {
    use mailferry_coordinator::admin::{summarize, Action, Cluster};
    use mailferry_coordinator::cli::{parse_duration_secs, users_from, BatchCommand};
    use mailferry_shared::domain::status::UserStatus;
    let (settings, runtime) = cluster_setup(args.config.as_deref())?;
    runtime.block_on(async {
        let cluster = Cluster::connect(settings).await?;
        match &args.command {
            BatchCommand::Create(create) => {
                let mailferry_coordinator::cli::Users {
                    users,
                    bad_rows,
                    notes,
                } = users_from(&create.source, &create.target, create.csv.as_deref(), None)?;
                let rules = create.folder_rules()?;
                for note in notes {
                    eprintln!("note: {note}");
                }
                for row in &bad_rows {
                    eprintln!("mailferry: CSV {row}");
                }
                cluster.create_batch(&create.batch, &users, rules).await?;
                println!(
                    "batch {}: {} users stored, {} rows refused",
                    create.batch,
                    users.len(),
                    bad_rows.len()
                );
                Ok(if bad_rows.is_empty() {
                    0
                } else {
                    Exit::BadRows as u8
                })
            }
            BatchCommand::Start(sel)
            | BatchCommand::Stop(sel)
            | BatchCommand::SyncNow(sel)
            | BatchCommand::Close(sel) => {
                let (action, verb) = match &args.command {
                    BatchCommand::Start(_) => (Action::Start, "started"),
                    BatchCommand::Stop(_) => (Action::Stop, "stopped"),
                    BatchCommand::SyncNow(_) => (Action::SyncNow, "to sync now"),
                    _ => (Action::Close, "closing (final pass, then credentials deleted)"),
                };
                let (applied, refused) = cluster.act(&sel.batch, &sel.users, action).await?;
                for user in &applied {
                    println!("{user}: {verb}");
                }
                for (user, why) in &refused {
                    println!("{user}: not {verb}: {why}");
                }
                Ok(if refused.is_empty() { 0 } else { Exit::Usage as u8 })
            }
            BatchCommand::SetInterval { batch, every } => {
                let secs = parse_duration_secs(every).map_err(anyhow::Error::msg)?;
                cluster.set_interval(batch, secs).await?;
                println!("batch {batch}: synced users are synced again every {secs} s");
                Ok(0)
            }
            BatchCommand::Reseal => {
                let (resealed, current) = cluster.reseal_all().await?;
                println!(
                    "{resealed} secrets sealed again with the newest key; {current} were already"
                );
                Ok(0)
            }
            BatchCommand::Status { batch, json } => {
                let (lines, interval) = cluster.status(batch).await?;
                if *json {
                    use mailferry_coordinator::api::{summary_view, user_view};
                    let users: Vec<_> = lines.iter().map(user_view).collect();
                    let out = serde_json::json!({
                        "batch": batch,
                        "sync_interval_secs": interval,
                        "summary": summary_view(&lines),
                        "users": users,
                    });
                    println!("{}", serde_json::to_string_pretty(&out)?);
                    return Ok(0);
                }
                let now = mailferry_shared::redis::control::now_ms();
                for line in &lines {
                    let detail = match &line.status {
                        UserStatus::Failed { reason } => format!(" ({reason})"),
                        UserStatus::Syncing {
                            throttled: Some(why),
                        } => format!(" (throttled: {why})"),
                        _ => String::new(),
                    };
                    let count = |c: Counter| line.counters.get(c.name()).copied().unwrap_or(0);
                    let ago = |ms: Option<u64>| match ms {
                        Some(t) => format!("{} s ago", now.saturating_sub(t) / 1000),
                        None => "never".into(),
                    };
                    let next = match line.next_due_ms {
                        Some(t) if t > now => format!("in {} s", (t - now) / 1000),
                        Some(_) => "now".into(),
                        None => "-".into(),
                    };
                    println!(
                        "{}\t{}{detail}\t{}\tcopied {}\t{}\tskipped {}\tjobs {}/{}\tpass {}\tlast synced {}\tnext {next}",
                        line.user,
                        line.status.name(),
                        line.messages,
                        count(Counter::Copied),
                        human_bytes(count(Counter::CopiedBytes) as u64),
                        count(Counter::Skipped),
                        line.jobs_done,
                        line.jobs,
                        line.pass.pass,
                        ago(line.pass.synced_ms),
                    );
                }
                let sum = summarize(&lines);
                let by_status: Vec<String> = sum
                    .users_by_status
                    .iter()
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect();
                println!(
                    "batch {batch}: {} users ({}); messages {}; copied {} messages, {}; skipped {}; every {interval} s",
                    lines.len(),
                    by_status.join(", "),
                    sum.messages,
                    sum.copied,
                    human_bytes(sum.copied_bytes as u64),
                    sum.skipped
                );
                Ok(0)
            }
        }
    })
}

/// A shutdown flag that turns true at the first SIGTERM or Ctrl-C (with `what` logged).
fn on_signal(what: &'static str) -> watch::Receiver<bool> {
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("{what}");
        let _ = stop.send(true);
    });
    shutdown
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn print_dry_run(dry: &DryRun) {
    for (user, result) in dry {
        println!("{user}:");
        match result {
            Err(e) => println!("  cannot plan: {e}"),
            Ok(folders) => print!("{}", mapping_table(folders)),
        }
    }
}
