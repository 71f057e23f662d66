//! `mailferry api …`: the admin's workflow from a terminal, through the coordinator's
//! HTTP API (the same API as the web console): endpoints made and tested, batches made,
//! users imported, started, stopped, synced now and closed, a batch watched with live
//! progress bars, reports downloaded. The base URL and the token come from flags or
//! the environment; passwords never from a flag (other users can read those).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use mailferry_shared::secret::Secret;
use serde_json::{json, Value};

use super::args::{parse_duration_secs, read_secret};
use crate::client::ApiClient;
use crate::report::human_bytes;

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The API's base URL, e.g. https://mailferry.example.net.
    #[arg(long, env = "MAILFERRY_API_URL", value_name = "URL", global = true)]
    pub url: Option<String>,
    /// A file holding the API token; else $MAILFERRY_API_TOKEN.
    #[arg(long, value_name = "PATH", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print what the API answered, as JSON, instead of lines for people (endpoints,
    /// batches, status: the batch as GET /batches/{id} answers it, with its users).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ApiCommand,
}

/// Prints a value as indented JSON.
fn print_json(value: &Value) -> anyhow::Result<u8> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(0)
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// The tenant's endpoints.
    Endpoints,
    /// Make an endpoint (a source or target server) from a preset or custom settings.
    EndpointCreate(Box<EndpointCreate>),
    /// Test an endpoint with one account: log in and out, and say what went wrong if
    /// it did. The password comes from --password-file, $MAILFERRY_TEST_PASSWORD or a
    /// prompt; with an admin or master login it may be left out.
    EndpointTest {
        endpoint: String,
        #[arg(long)]
        login: String,
        #[arg(long, value_name = "PATH")]
        password_file: Option<PathBuf>,
    },
    /// The tenant's batches.
    Batches,
    /// Preview users before Start: each one's folder mapping with message counts and
    /// sizes, and the target's quota (who would not fit). Read-only on both servers.
    Preview {
        batch: String,
        /// Only this user (repeatable; default: the batch's first 20).
        #[arg(long = "user", value_name = "ADDRESS")]
        users: Vec<String>,
    },
    /// Make a batch from a source and a target endpoint; prints its id.
    BatchCreate {
        #[arg(long)]
        name: String,
        /// The source endpoint's id.
        #[arg(long)]
        source: String,
        /// The target endpoint's id.
        #[arg(long)]
        target: String,
        /// Time between passes of synced users: 90s, 30m, 6h, 1d.
        #[arg(long, value_name = "DURATION")]
        every: Option<String>,
    },
    /// Import users from a CSV (EmailAddress,UserName,Password; optional
    /// TargetUserName,TargetPassword). Bad rows are listed with their line.
    Import { batch: String, csv: PathBuf },
    /// Start users (all, or those named with --user).
    Start(Selection),
    /// Stop users: no more passes; jobs in progress stop.
    Stop(Selection),
    /// Sync started users now.
    SyncNow(Selection),
    /// Close users: a final pass, then their stored credentials are deleted.
    Close(Selection),
    /// Each user's status and counts, and the batch's totals.
    Status { batch: String },
    /// Live progress bars of a batch's users (from its event stream).
    Watch {
        batch: String,
        /// Exit once no user is starting, queued or syncing (exit code 1 if one failed).
        #[arg(long)]
        until_settled: bool,
    },
    /// The batch report, as CSV or JSON, to a file or standard output.
    Report {
        batch: String,
        #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
        format: String,
        #[arg(long, short, value_name = "PATH")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct EndpointCreate {
    #[arg(long)]
    name: String,
    #[arg(long, value_parser = ["source", "target"])]
    role: String,
    /// A preset (microsoft365, google-workspace, gmail, outlook, hotmail, yahoo), or
    /// custom (with --host).
    #[arg(long, default_value = "custom")]
    provider: String,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// tls, starttls or plain.
    #[arg(long)]
    security: Option<String>,
    /// password (the default), xoauth2, oauth2:GRANT (refresh-token, client-secret,
    /// certificate, service-account), admin:NAME or master:NAME. With admin or master,
    /// its password comes from --admin-password-file, $MAILFERRY_ADMIN_PASSWORD or a
    /// prompt; with OAuth2 the app's secret from --oauth-secret-file.
    #[arg(long, default_value = "password")]
    auth: String,
    #[arg(long, value_name = "PATH")]
    admin_password_file: Option<PathBuf>,
    /// OAuth2: the app's client id.
    #[arg(long, value_name = "ID", help_heading = "OAuth2")]
    oauth_client_id: Option<String>,
    /// OAuth2, Microsoft presets: the organisation's tenant.
    #[arg(long, value_name = "TENANT", help_heading = "OAuth2")]
    oauth_tenant: Option<String>,
    /// OAuth2: the token endpoint (default: the preset's).
    #[arg(long, value_name = "URL", help_heading = "OAuth2")]
    oauth_token_url: Option<String>,
    /// OAuth2: the scopes (default: the preset's for the grant).
    #[arg(long, value_name = "SCOPES", help_heading = "OAuth2")]
    oauth_scope: Option<String>,
    /// OAuth2: xoauth2 (default) or oauthbearer.
    #[arg(long, value_name = "MECH", help_heading = "OAuth2")]
    oauth_mechanism: Option<String>,
    /// OAuth2 certificate grant: the certificate (PEM).
    #[arg(long, value_name = "PATH", help_heading = "OAuth2")]
    oauth_certificate: Option<PathBuf>,
    /// OAuth2: the app's secret: the client secret (first line), the certificate's
    /// private key (PEM) or the service account's key (JSON).
    #[arg(long, value_name = "PATH", help_heading = "OAuth2")]
    oauth_secret_file: Option<PathBuf>,
    /// Accept any TLS certificate (a server with a self-signed one, on a trusted network).
    #[arg(long)]
    accept_invalid_certs: bool,
    /// Connections to one account at most, across all workers (default: the preset's,
    /// else the installation's; the lower applies).
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Connections to the server at most, every account together (a small server).
    #[arg(long, value_name = "N")]
    max_host_connections: Option<u32>,
}

#[derive(Debug, Args)]
pub struct Selection {
    batch: String,
    /// Only this user (repeatable).
    #[arg(long = "user", value_name = "ADDRESS")]
    users: Vec<String>,
    /// Start only: read the source password of the --user given from this file (else
    /// from $MAILFERRY_SOURCE_PASSWORD, if set).
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,
}

fn client(args: &ApiArgs) -> anyhow::Result<ApiClient> {
    let url = args
        .url
        .as_deref()
        .context("no API URL: give --url or set MAILFERRY_API_URL")?;
    let token = read_secret(
        "--token-file",
        args.token_file.as_deref(),
        "MAILFERRY_API_TOKEN",
        "API token",
    )
    .map_err(anyhow::Error::msg)?;
    Ok(ApiClient::new(url, token)?)
}

/// The `auth` of an OAuth2 endpoint, and its secret and certificate into `body`: what
/// is not given, the API fills from the provider's preset.
fn oauth2_body(
    e: &EndpointCreate,
    grant: &str,
    body: &mut serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let kind = match grant {
        "refresh-token" | "refresh_token" => "refresh_token",
        "client-secret" | "client_secret" => "client_secret",
        "certificate" | "client-certificate" | "client_certificate" => "client_certificate",
        "service-account" | "service_account" => "service_account",
        other => anyhow::bail!(
            "--auth oauth2:{other}: the grant is refresh-token, client-secret, certificate or service-account"
        ),
    };
    let mut auth = json!({"method": "oauth2", "grant": {"kind": kind}});
    let fields = [
        ("client_id", &e.oauth_client_id),
        ("token_url", &e.oauth_token_url),
        ("scope", &e.oauth_scope),
        ("mechanism", &e.oauth_mechanism),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            auth[key] = json!(v);
        }
    }
    if let Some(tenant) = &e.oauth_tenant {
        body["tenant"] = json!(tenant);
    }
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
    };
    if let Some(path) = &e.oauth_certificate {
        body["certificate"] = json!(read("--oauth-certificate", path)?);
    }
    if let Some(path) = &e.oauth_secret_file {
        let text = read("--oauth-secret-file", path)?;
        let secret = match kind {
            // A client secret is its file's first line; keys and key files are whole.
            "refresh_token" | "client_secret" => {
                text.lines().next().unwrap_or("").trim().to_string()
            }
            _ => text,
        };
        body["app_secret"] = json!(secret);
    }
    Ok(auth)
}

/// A path segment, percent-encoded (user ids are addresses).
fn seg(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn run(args: &ApiArgs) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &ApiArgs) -> anyhow::Result<u8> {
    let api = client(args)?;
    match &args.command {
        ApiCommand::Endpoints => endpoints(&api, args.json).await,
        ApiCommand::EndpointCreate(e) => endpoint_create(&api, e).await,
        ApiCommand::EndpointTest {
            endpoint,
            login,
            password_file,
        } => endpoint_test(&api, endpoint, login, password_file).await,
        ApiCommand::Batches => batches(&api, args.json).await,
        ApiCommand::Preview { batch, users } => preview(&api, batch, users, args.json).await,
        ApiCommand::BatchCreate {
            name,
            source,
            target,
            every,
        } => batch_create(&api, name, source, target, every).await,
        ApiCommand::Import { batch, csv } => import(&api, batch, csv).await,
        ApiCommand::Start(sel)
        | ApiCommand::Stop(sel)
        | ApiCommand::SyncNow(sel)
        | ApiCommand::Close(sel) => act(&api, &args.command, sel).await,
        ApiCommand::Status { batch } => status(&api, batch, args.json).await,
        ApiCommand::Watch {
            batch,
            until_settled,
        } => watch(&api, batch, *until_settled).await,
        ApiCommand::Report {
            batch,
            format,
            output,
        } => report(&api, batch, format, output).await,
    }
}

/// `api endpoints`: the tenant's endpoints, one line each (or JSON).
async fn endpoints(api: &ApiClient, as_json: bool) -> anyhow::Result<u8> {
    let all = api.get("/api/v1/endpoints").await?.ok()?;
    if as_json {
        return print_json(&all);
    }
    for e in all.as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}\t{}:{} ({})\t{}",
            e["id"].as_str().unwrap_or(""),
            e["role"].as_str().unwrap_or(""),
            e["name"].as_str().unwrap_or(""),
            e["host"].as_str().unwrap_or(""),
            e["port"],
            e["security"].as_str().unwrap_or(""),
            e["provider"].as_str().unwrap_or(""),
        );
    }
    Ok(0)
}

/// `api endpoint-create`: makes an endpoint; prints its id.
async fn endpoint_create(api: &ApiClient, e: &EndpointCreate) -> anyhow::Result<u8> {
    let mut body = json!({
        "name": e.name, "role": e.role, "provider": e.provider,
        "accept_invalid_certs": e.accept_invalid_certs,
    });
    if let Some(host) = &e.host {
        body["host"] = json!(host);
    }
    if let Some(port) = e.port {
        body["port"] = json!(port);
    }
    if let Some(security) = &e.security {
        body["security"] = json!(security);
    }
    if let Some(n) = e.max_connections {
        body["max_connections"] = json!(n);
    }
    if let Some(n) = e.max_host_connections {
        body["max_host_connections"] = json!(n);
    }
    let auth = match e.auth.split_once(':') {
        None if e.auth == "password" || e.auth == "xoauth2" => json!({"method": e.auth}),
        Some(("oauth2", grant)) => oauth2_body(e, grant, &mut body)?,
        Some(("admin", who)) => json!({"method": "admin_plain", "admin": who}),
        Some(("master", who)) => json!({"method": "dovecot_master", "master": who}),
        _ => anyhow::bail!(
            "--auth {}: expected password, xoauth2, oauth2:GRANT, admin:NAME or master:NAME",
            e.auth
        ),
    };
    if auth["method"] == "admin_plain" || auth["method"] == "dovecot_master" {
        let secret = read_secret(
            "--admin-password-file",
            e.admin_password_file.as_deref(),
            "MAILFERRY_ADMIN_PASSWORD",
            "admin password",
        )
        .map_err(anyhow::Error::msg)?;
        body["admin_password"] = json!(secret.expose());
    }
    body["auth"] = auth;
    let made = api.post_json("/api/v1/endpoints", &body).await?.ok()?;
    if let Some(note) = made["note"].as_str() {
        eprintln!("note: {note}");
    }
    println!("{}", made["id"].as_str().unwrap_or(""));
    Ok(0)
}

/// `api endpoint-test`: logs in as `login` through the API; 1 when refused.
async fn endpoint_test(
    api: &ApiClient,
    endpoint: &str,
    login: &str,
    password_file: &Option<PathBuf>,
) -> anyhow::Result<u8> {
    let record = api
        .get(&format!("/api/v1/endpoints/{}", seg(endpoint)))
        .await?
        .ok()?;
    let password = if record["has_admin_password"] == true
        && password_file.is_none()
        && std::env::var_os("MAILFERRY_TEST_PASSWORD").is_none()
    {
        None
    } else {
        Some(
            read_secret(
                "--password-file",
                password_file.as_deref(),
                "MAILFERRY_TEST_PASSWORD",
                &format!("password of {login}"),
            )
            .map_err(anyhow::Error::msg)?,
        )
    };
    let verdict = api
        .post_json(
            &format!("/api/v1/endpoints/{}/test", seg(endpoint)),
            &json!({"login": login, "password": password.as_ref().map(Secret::expose)}),
        )
        .await?
        .ok()?;
    if verdict["ok"] == true {
        println!("ok: {login} logged in");
        Ok(0)
    } else {
        println!(
            "failed ({}): {}",
            verdict["failure"]["code"].as_str().unwrap_or("?"),
            verdict["failure"]["message"].as_str().unwrap_or("")
        );
        Ok(1)
    }
}

/// `api batches`: the tenant's batches, one line each (or JSON).
async fn batches(api: &ApiClient, as_json: bool) -> anyhow::Result<u8> {
    let all = api.get("/api/v1/batches").await?.ok()?;
    if as_json {
        return print_json(&all);
    }
    for b in all.as_array().into_iter().flatten() {
        println!(
            "{}\t{}\tsource {}\ttarget {}",
            b["id"].as_str().unwrap_or(""),
            b["name"].as_str().unwrap_or(""),
            b["source_endpoint"].as_str().unwrap_or(""),
            b["target_endpoint"].as_str().unwrap_or(""),
        );
    }
    Ok(0)
}

/// `api preview`: each user's folder mapping, sizes and whether the target has room.
async fn preview(
    api: &ApiClient,
    batch: &str,
    users: &[String],
    as_json: bool,
) -> anyhow::Result<u8> {
    let body = if users.is_empty() {
        json!({})
    } else {
        json!({ "users": users })
    };
    let preview = api
        .post_json(&format!("/api/v1/batches/{}/preview", seg(batch)), &body)
        .await?
        .ok()?;
    if as_json {
        return print_json(&preview);
    }
    print_preview(&preview)?;
    Ok(0)
}

/// `api batch-create`: makes a batch; prints its id.
async fn batch_create(
    api: &ApiClient,
    name: &str,
    source: &str,
    target: &str,
    every: &Option<String>,
) -> anyhow::Result<u8> {
    let mut body = json!({"name": name, "source_endpoint": source, "target_endpoint": target});
    if let Some(every) = every {
        body["sync_interval_secs"] = json!(parse_duration_secs(every).map_err(anyhow::Error::msg)?);
    }
    let made = api.post_json("/api/v1/batches", &body).await?.ok()?;
    println!("{}", made["id"].as_str().unwrap_or(""));
    Ok(0)
}

/// `api import`: users from a CSV; each refused row named, the bad-rows exit code when any.
async fn import(api: &ApiClient, batch: &str, csv: &std::path::Path) -> anyhow::Result<u8> {
    let bytes = std::fs::read(csv).with_context(|| format!("reading {}", csv.display()))?;
    let report = api
        .call(
            "POST",
            &format!("/api/v1/batches/{}/users/import", seg(batch)),
            Some(("text/csv", bytes)),
        )
        .await?
        .ok()?;
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    for e in &errors {
        eprintln!(
            "{}: line {}: {}",
            csv.display(),
            e["line"],
            e["reason"].as_str().unwrap_or("")
        );
    }
    println!(
        "{} added, {} updated, {} rows refused",
        report["added"],
        report["updated"],
        errors.len()
    );
    Ok(if errors.is_empty() {
        0
    } else {
        crate::report::Exit::BadRows as u8
    })
}

/// `api start|stop|sync-now|close`: the action for a selection; 1 when a user was refused.
async fn act(api: &ApiClient, command: &ApiCommand, sel: &Selection) -> anyhow::Result<u8> {
    let (verb, done) = match command {
        ApiCommand::Start(_) => ("start", "started"),
        ApiCommand::Stop(_) => ("stop", "stopped"),
        ApiCommand::SyncNow(_) => ("sync-now", "to sync now"),
        _ => (
            "close",
            "closing (a final pass, then its credentials are deleted)",
        ),
    };
    let mut body = json!({"users": sel.users});
    let typed =
        sel.password_file.is_some() || std::env::var_os("MAILFERRY_SOURCE_PASSWORD").is_some();
    if typed {
        if verb != "start" || sel.users.len() != 1 {
            anyhow::bail!("a source password is given when starting one --user");
        }
        let secret = read_secret(
            "--password-file",
            sel.password_file.as_deref(),
            "MAILFERRY_SOURCE_PASSWORD",
            "source password",
        )
        .map_err(anyhow::Error::msg)?;
        body["source_passwords"] = json!({ &sel.users[0]: secret.expose() });
    }
    let report = api
        .post_json(
            &format!("/api/v1/batches/{}/{verb}", seg(&sel.batch)),
            &body,
        )
        .await?
        .ok()?;
    for user in report["applied"].as_array().into_iter().flatten() {
        println!("{}: {done}", user.as_str().unwrap_or(""));
    }
    let refused = report["refused"].as_array().cloned().unwrap_or_default();
    for r in &refused {
        println!(
            "{}: not {done}: {}",
            r["user"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
    Ok(if refused.is_empty() { 0 } else { 1 })
}

/// `api status`: each user's line and the batch's summary (or JSON).
async fn status(api: &ApiClient, batch: &str, as_json: bool) -> anyhow::Result<u8> {
    let detail = api
        .get(&format!("/api/v1/batches/{}", seg(batch)))
        .await?
        .ok()?;
    let page = api
        .get(&format!("/api/v1/batches/{}/users?limit=10000", seg(batch)))
        .await?
        .ok()?;
    if as_json {
        // The batch as GET /batches/{id} answers it, and its users.
        let mut out = detail;
        out["users"] = page["users"].clone();
        return print_json(&out);
    }
    for u in page["users"].as_array().into_iter().flatten() {
        println!("{}", user_line(u));
    }
    println!("{}", summary_line(&detail["summary"]));
    Ok(0)
}

/// `api report`: the batch's report as CSV or JSON, to a file or standard output.
async fn report(
    api: &ApiClient,
    batch: &str,
    format: &str,
    output: &Option<PathBuf>,
) -> anyhow::Result<u8> {
    let answer = api
        .get(&format!("/api/v1/batches/{}/report.{format}", seg(batch)))
        .await?;
    if answer.status != 200 {
        let status = answer.status;
        return Err(match answer.ok() {
            Err(e) => e.into(),
            Ok(_) => anyhow::anyhow!("the API answered {status} without a report"),
        });
    }
    match output {
        Some(path) => std::fs::write(path, &answer.body)
            .with_context(|| format!("writing {}", path.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&answer.body)?;
        }
    }
    Ok(0)
}

fn user_line(u: &Value) -> String {
    let reason = u["reason"]
        .as_str()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "{}\t{}{reason}\tfolders {}/{}\t{}\tcopied {}\t{}\tskipped {}",
        u["id"].as_str().unwrap_or(""),
        u["status"].as_str().unwrap_or(""),
        u["jobs_done"],
        u["jobs"],
        messages(&u["messages"]),
        u["copied"],
        human_bytes(u["copied_bytes"].as_u64().unwrap_or(0)),
        u["skipped"],
    )
}

/// The API's `messages` object as `MessageCounts` prints it.
fn messages(m: &Value) -> String {
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    mailferry_shared::domain::status::MessageCounts {
        source: n("source"),
        at_target: n("at_target"),
        skipped: n("skipped"),
        folders: n("folders"),
    }
    .to_string()
}

fn summary_line(s: &Value) -> String {
    let by_status: Vec<String> = s["users_by_status"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    format!(
        "{} users ({}); messages {}; copied {} messages, {}; skipped {}",
        s["users"],
        by_status.join(", "),
        messages(&s["messages"]),
        s["copied"],
        human_bytes(s["copied_bytes"].as_u64().unwrap_or(0)),
        s["skipped"]
    )
}

/// A user is settled when nothing runs for it now.
fn settled(status: &str) -> bool {
    !matches!(status, "starting" | "queued" | "syncing")
}

/// Per-user bars drawn at most: a batch of thousands is summed up in the first bar.
const MAX_BARS: usize = 30;

/// Follows the batch's event stream: one bar for the batch (users settled of all) and
/// one per user (folders done of the pass) for the first users; without a terminal,
/// one line per change instead.
async fn watch(api: &ApiClient, batch: &str, until_settled: bool) -> anyhow::Result<u8> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let terminal = std::io::stderr().is_terminal();
    let bars = MultiProgress::with_draw_target(if terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:<32} [{bar:24}] {pos}/{len} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let total = bars.add(ProgressBar::new(0).with_style(style.clone()));
    total.set_prefix("batch (users settled)");
    let mut users: BTreeMap<String, Value> = BTreeMap::new();
    let mut user_bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let path = format!("/api/v1/batches/{}/events", seg(batch));
    let mut failed = false;
    api.events(&path, |event, data| {
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            return true;
        };
        match event {
            "user" => {
                let id = value["id"].as_str().unwrap_or("").to_string();
                if !terminal && users.get(&id).map(|u| &u["status"]) != Some(&value["status"]) {
                    println!("{}", user_line(&value));
                }
                if user_bars.len() < MAX_BARS || user_bars.contains_key(&id) {
                    let bar = user_bars.entry(id.clone()).or_insert_with(|| {
                        let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
                        bar.set_prefix(id.clone());
                        bar
                    });
                    bar.set_length(value["jobs"].as_u64().unwrap_or(0));
                    bar.set_position(value["jobs_done"].as_u64().unwrap_or(0));
                    bar.set_message(format!(
                        "{} · {} copied{}",
                        value["status"].as_str().unwrap_or(""),
                        value["copied"],
                        value["reason"]
                            .as_str()
                            .map(|r| format!(" · {r}"))
                            .unwrap_or_default()
                    ));
                }
                users.insert(id, value);
            }
            "summary" => {
                total.set_message(summary_line(&value));
                if !terminal {
                    println!("{}", summary_line(&value));
                }
            }
            "problem" => {
                let _ = bars.println(format!(
                    "problem: {}",
                    value["message"].as_str().unwrap_or("")
                ));
            }
            _ => {}
        }
        let done = users
            .values()
            .filter(|u| settled(u["status"].as_str().unwrap_or("")))
            .count();
        total.set_length(users.len() as u64);
        total.set_position(done as u64);
        failed = users.values().any(|u| u["status"] == "failed");
        !(until_settled && !users.is_empty() && done == users.len())
    })
    .await?;
    total.finish();
    for bar in user_bars.values() {
        bar.finish();
    }
    Ok(u8::from(failed))
}

/// `mailferry api preview`: per user, the totals and the quota, then the mapping (as
/// `migrate --dry-run` prints it).
fn print_preview(preview: &Value) -> anyhow::Result<()> {
    use crate::planner::PlannedFolder;
    use crate::report::{human_bytes, mapping_table};
    let bytes = |v: &Value| v.as_u64().map(human_bytes).unwrap_or_else(|| "?".into());
    for u in preview["users"].as_array().into_iter().flatten() {
        let user = u["user"].as_str().unwrap_or("");
        if let Some(problem) = u["problem"].as_str() {
            println!("{user}: cannot preview: {problem}");
            continue;
        }
        let quota = match (&u["quota"], u["fits"].as_bool()) {
            (q, Some(fits)) if q.is_object() => format!(
                "; target quota: {} of {} used, {}",
                bytes(&q["used_bytes"]),
                bytes(&q["limit_bytes"]),
                if fits { "fits" } else { "WOULD NOT FIT" }
            ),
            _ => String::new(),
        };
        println!(
            "{user}: {} messages, {}{quota}",
            u["messages"],
            bytes(&u["bytes"])
        );
        let folders: Vec<PlannedFolder> =
            serde_json::from_value(u["folders"].clone()).context("the preview's folders")?;
        print!("{}", mapping_table(&folders));
    }
    if let Some(more) = preview["more"].as_u64().filter(|&m| m > 0) {
        println!("({more} more users: name them with --user)");
    }
    Ok(())
}
