//! The `mailferry` command line. Turns flags, environment and files into validated
//! [`UserSpec`]s and [`Options`]; every mistake is named before anything connects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mailferry_shared::domain::endpoint::{Endpoint, Security};
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::login::{AuthMethod, Credentials};
use mailferry_shared::domain::users::{parse_csv, RowError};
use mailferry_shared::imap::Limits;
use mailferry_shared::oauth::{self, Grant, Mechanism, OAuthClient};
use mailferry_shared::providers::{self, preset, PRESETS};
use mailferry_shared::secret::Secret;
use mailferry_worker::EngineSettings;
use mailferry_worker::RetryPolicy;

use crate::embedded::{Options, UserSpec};
use crate::report::ProgressMode;

pub mod api;
pub mod args;

pub use args::{parse_duration_secs, read_secret};

#[derive(Debug, Parser)]
#[command(
    name = "mailferry",
    version,
    about = "Moves mailboxes from one IMAP server to another"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v: debug, -vv: trace). Logs go to standard error.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate one user or a CSV of users on this machine (no RabbitMQ or Redis needed).
    /// Safe to re-run: a second run copies only what is new and updates flags.
    Migrate(Box<MigrateArgs>),
    /// Run a cluster worker: take folder jobs from RabbitMQ, credentials and checkpoints
    /// from Redis. SIGTERM finishes the jobs in progress and exits.
    Worker(WorkerArgs),
    /// Run the cluster coordinator: plans users into folder jobs, re-syncs them on the
    /// schedule, rolls their progress up. Run two or more for availability: one
    /// schedules (it holds the leader lease in Redis), the others stand by.
    Coordinator(WorkerArgs),
    /// Cluster batches: create one from endpoints and a CSV; start, stop, sync now or
    /// close its users; show their status. Needs Redis only: a running coordinator acts
    /// on what these commands record. (The operator's tool; admins use `api`.)
    Batch(BatchArgs),
    /// The admin's workflow through the coordinator's HTTP API (as the web console):
    /// endpoints, batches, CSV imports, start/stop/sync now/close, a live `watch`.
    Api(api::ApiArgs),
    /// Print a shell completion script, e.g. `mailferry completions bash >
    /// /etc/bash_completion.d/mailferry` (or `source <(mailferry completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// The settings file (TOML); `MAILFERRY__…` environment variables override it.
    #[arg(long, value_name = "PATH", env = "MAILFERRY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: BatchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Store a batch: endpoints, users, their secrets sealed. Bad CSV rows are reported.
    Create(Box<BatchCreateArgs>),
    /// Start every user (or those named): the coordinator plans and queues their
    /// folder jobs, then re-syncs them on the batch's schedule.
    Start(UserSelection),
    /// Stop users: no more passes, and their jobs in progress stop within seconds.
    Stop(UserSelection),
    /// Sync started users now instead of at their next scheduled time.
    SyncNow(UserSelection),
    /// Close users: one final pass, then the schedule ends and their stored
    /// credentials are deleted (status Completed).
    Close(UserSelection),
    /// Set the time between passes of the batch's synced users.
    SetInterval {
        #[arg(long)]
        batch: String,
        /// Seconds, or with a unit: 90s, 30m, 6h, 1d.
        #[arg(long, value_name = "DURATION")]
        every: String,
    },
    /// Each user's status and counts, and the batch's totals.
    Status {
        #[arg(long)]
        batch: String,
        /// As JSON, in the API's shapes: {batch, sync_interval_secs, summary, users}.
        #[arg(long)]
        json: bool,
    },
    /// Key rotation: seal every stored secret of every batch again with the newest
    /// sealing key (list the new key last, keep the old ones until this has run).
    Reseal,
}

/// Which users of a batch a command is for.
#[derive(Debug, Args)]
pub struct UserSelection {
    /// The batch.
    #[arg(long)]
    pub batch: String,
    /// Only this user (repeatable); without it, every user of the batch.
    #[arg(long = "user", value_name = "ID")]
    pub users: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BatchCreateArgs {
    /// The batch's name (letters, digits, '-' and '_').
    #[arg(long)]
    pub batch: String,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Users from a CSV in Exchange's format (see `migrate --help`).
    #[arg(long, value_name = "PATH")]
    pub csv: Option<PathBuf>,
    /// The batch's folder rules, as `migrate`'s. Giving any of them replaces the
    /// batch's rules; giving none keeps them.
    #[command(flatten)]
    pub rules: FolderRuleArgs,
}

impl BatchCreateArgs {
    /// The folder rules given, or `None` when none were (the batch keeps its own).
    pub fn folder_rules(&self) -> Result<Option<Rules>, UsageError> {
        let r = &self.rules;
        let none_given = r.include.is_empty()
            && r.exclude.is_empty()
            && r.rename.is_empty()
            && r.archive_folder.is_none();
        if none_given {
            return Ok(None);
        }
        r.rules().map(Some)
    }
}

/// Which folders are copied and where they land: `migrate`'s and `batch create`'s.
#[derive(Debug, Clone, Args)]
pub struct FolderRuleArgs {
    /// Copy only folders matching this pattern (`*` is a wildcard; `/` separates levels). Repeatable.
    #[arg(long, value_name = "PATTERN", help_heading = "Folder rules")]
    pub include: Vec<String>,
    /// Do not copy folders matching this pattern. Repeatable.
    #[arg(long, value_name = "PATTERN", help_heading = "Folder rules")]
    pub exclude: Vec<String>,
    /// Put a source folder elsewhere: FROM=TO, or FROM/*=TO/* for a subtree. Repeatable.
    #[arg(long, value_name = "FROM=TO", help_heading = "Folder rules")]
    pub rename: Vec<String>,
    /// The target folder for mail that is only in Gmail's All Mail (archived, no label).
    /// Default: the target's \Archive folder, else `Archive` (`All Mail` if a source
    /// folder is called `Archive`). `--exclude '[Gmail]/All Mail'` leaves it behind.
    #[arg(long, value_name = "FOLDER", help_heading = "Folder rules")]
    pub archive_folder: Option<String>,
}

impl FolderRuleArgs {
    /// The rules, checked (each `--rename` is `FROM=TO`, patterns are bounded).
    pub fn rules(&self) -> Result<Rules, UsageError> {
        let mut rules = Rules {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            rename: Vec::new(),
            archive: self.archive_folder.clone(),
        };
        for spec in &self.rename {
            rules.rename.push(Rules::parse_rename(spec).map_err(usage)?);
        }
        rules.validate().map_err(usage)?;
        Ok(rules)
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The settings file (TOML); `MAILFERRY__…` environment variables override it.
    #[arg(long, value_name = "PATH", env = "MAILFERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check the settings and the sealing keys, print them (secrets redacted) and exit.
    #[arg(long)]
    pub check_config: bool,
}

macro_rules! endpoint_args {
    ($name:ident, $side:literal, $env:literal) => {
        #[derive(Debug, Clone, Args)]
        pub struct $name {
            #[arg(id = concat!($side, "-host"), long = $side, value_name = "HOST[:PORT]", help = concat!("The ", $side, " server, HOST or HOST:PORT (default port: 993 with tls, 143 otherwise)"))]
            pub host: Option<String>,
            #[arg(id = concat!($side, "-preset"), long = concat!($side, "-preset"), value_name = "NAME", help = concat!("A provider preset for the ", $side, ": microsoft365, google-workspace, gmail, outlook, hotmail, yahoo"))]
            pub preset: Option<String>,
            #[doc = "tls (implicit TLS, the default), starttls (then mandatory) or plain (unencrypted: only when you mean it)"]
            #[arg(id = concat!($side, "-security"), long = concat!($side, "-security"), value_name = "MODE", default_value = "tls")]
            pub security: Security,
            #[doc = "Extra CA certificates (PEM) to trust for this server"]
            #[arg(id = concat!($side, "-ca-file"), long = concat!($side, "-ca-file"), value_name = "PATH")]
            pub ca_file: Option<PathBuf>,
            #[doc = "Accept any certificate from this server (no verification)"]
            #[arg(id = concat!($side, "-insecure-accept-any-certificate"), long = concat!($side, "-insecure-accept-any-certificate"))]
            pub accept_any_certificate: bool,
            #[arg(id = concat!($side, "-max-connections"), long = concat!($side, "-max-connections"), value_name = "N", help = concat!("Connections to one ", $side, " account at most, across all processes (default: the preset's; the lower of this and --connections, or worker.connections_per_account, applies)"))]
            pub max_connections: Option<u32>,
            #[arg(id = concat!($side, "-daily-download"), long = concat!($side, "-daily-download"), value_name = "SIZE", value_parser = parse_size, help = concat!("Bytes of mail downloaded from one ", $side, " account a day at most (e.g. 2G; default: the preset's); at it the account pauses until the next UTC day"))]
            pub daily_download: Option<u64>,
            #[doc = "password (or app password), xoauth2 (the secret is an access token), oauth2:GRANT (tokens from a token endpoint, renewed as they expire; GRANT: refresh-token, client-secret, certificate or service-account), admin:NAME (SASL PLAIN as NAME for the user) or master:NAME (Dovecot user*NAME)"]
            #[arg(id = concat!($side, "-auth"), long = concat!($side, "-auth"), value_name = "METHOD", default_value = "password")]
            pub auth: String,
            #[arg(id = concat!($side, "-user"), long = concat!($side, "-user"), value_name = "LOGIN", help = concat!("The ", $side, " login (single-user mode)"))]
            pub user: Option<String>,
            #[arg(id = concat!($side, "-password-file"), long = concat!($side, "-password-file"), value_name = "PATH", help = concat!("Read the ", $side, " password (or token) from this file; else from $", $env, "; else a prompt"))]
            pub password_file: Option<PathBuf>,
            #[doc = "OAuth2: the app's client id (application id)"]
            #[arg(id = concat!($side, "-oauth-client-id"), long = concat!($side, "-oauth-client-id"), value_name = "ID", help_heading = "OAuth2")]
            pub oauth_client_id: Option<String>,
            #[doc = "OAuth2, Microsoft: the tenant (directory id or domain) whose token endpoint to use"]
            #[arg(id = concat!($side, "-oauth-tenant"), long = concat!($side, "-oauth-tenant"), value_name = "TENANT", help_heading = "OAuth2")]
            pub oauth_tenant: Option<String>,
            #[doc = "OAuth2: the token endpoint (https://…; default: the preset's)"]
            #[arg(id = concat!($side, "-oauth-token-url"), long = concat!($side, "-oauth-token-url"), value_name = "URL", help_heading = "OAuth2")]
            pub oauth_token_url: Option<String>,
            #[doc = "OAuth2: the scopes to ask for (default: the preset's for the grant)"]
            #[arg(id = concat!($side, "-oauth-scope"), long = concat!($side, "-oauth-scope"), value_name = "SCOPES", help_heading = "OAuth2")]
            pub oauth_scope: Option<String>,
            #[doc = "OAuth2: the SASL mechanism, xoauth2 (default) or oauthbearer"]
            #[arg(id = concat!($side, "-oauth-mechanism"), long = concat!($side, "-oauth-mechanism"), value_name = "MECH", help_heading = "OAuth2")]
            pub oauth_mechanism: Option<String>,
            #[doc = "OAuth2 certificate grant: the certificate (PEM) uploaded to the app registration"]
            #[arg(id = concat!($side, "-oauth-certificate"), long = concat!($side, "-oauth-certificate"), value_name = "PATH", help_heading = "OAuth2")]
            pub oauth_certificate: Option<PathBuf>,
            #[doc = "OAuth2: the app's secret: the client secret (first line), the certificate's private key (PEM) or the service account's key (JSON)"]
            #[arg(id = concat!($side, "-oauth-secret-file"), long = concat!($side, "-oauth-secret-file"), value_name = "PATH", help_heading = "OAuth2")]
            pub oauth_secret_file: Option<PathBuf>,
        }

        impl<'a> From<&'a $name> for Side<'a> {
            fn from(a: &'a $name) -> Self {
                Side {
                    name: $side,
                    env: $env,
                    host: &a.host,
                    preset: &a.preset,
                    security: a.security,
                    ca_file: &a.ca_file,
                    accept_any: a.accept_any_certificate,
                    max_connections: a.max_connections,
                    daily_download: a.daily_download,
                    auth: &a.auth,
                    user: &a.user,
                    password_file: &a.password_file,
                    oauth: OAuthArgs {
                        client_id: &a.oauth_client_id,
                        tenant: &a.oauth_tenant,
                        token_url: &a.oauth_token_url,
                        scope: &a.oauth_scope,
                        mechanism: &a.oauth_mechanism,
                        certificate: &a.oauth_certificate,
                        secret_file: &a.oauth_secret_file,
                    },
                }
            }
        }
    };
}

endpoint_args!(SourceArgs, "source", "MAILFERRY_SOURCE_PASSWORD");
endpoint_args!(TargetArgs, "target", "MAILFERRY_TARGET_PASSWORD");

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Users from a CSV in Exchange's format: EmailAddress,UserName,Password (+ optional
    /// TargetUserName, TargetPassword). Bad rows are reported; good rows run.
    #[arg(long, value_name = "PATH", conflicts_with = "user")]
    pub csv: Option<PathBuf>,
    /// The user's id in state and reports (default: the source login).
    #[arg(long, value_name = "ID")]
    pub user: Option<String>,
    /// Where checkpoints live (default: $MAILFERRY_STATE_DIR, else $XDG_STATE_HOME/mailferry,
    /// else ~/.local/state/mailferry). Deleting it costs a slower re-run, never a duplicate.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Show the folder mapping and per-folder counts; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub rules: FolderRuleArgs,
    /// Skip messages larger than this (e.g. 25M, 1G); the target's APPENDLIMIT applies too.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_message_size: Option<u64>,
    /// Connections per account (each server), shared by all of a user's folder jobs.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: usize,
    /// Users planned at the same time (a no-op pass of many users is all planning: 8 kept
    /// both servers busy on 2 cores, 4 did not).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub parallel_users: usize,
    /// Folder jobs running at the same time (across all users).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub jobs: usize,
    /// Message bytes held in memory at once, across all jobs (e.g. 32M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32M")]
    pub memory: u64,
    /// Messages per source FETCH (tuning; larger batches mean fewer round trips).
    #[arg(long, value_name = "N", default_value_t = 250)]
    pub fetch_batch: usize,
    /// Batch name (keeps separate migrations' state apart).
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub batch: String,
    /// Progress display.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// A server silent this long while a command is open is given up on (e.g. 90, 3m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs, default_value = "3m")]
    pub read_timeout: u64,
    /// The longest one command may take, plus a second for each 64 KiB it moves: a
    /// server that answers a byte at a time cannot hold a job for ever.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs, default_value = "10m")]
    pub command_timeout: u64,
    /// Attempts per folder before it is reported failed (a transient error, such as a
    /// dropped connection, is retried with backoff up to this many times in all).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub attempts: u32,
}

pub use mailferry_shared::config::settings::parse_size;

/// A configuration mistake, named.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

struct Side<'a> {
    name: &'static str,
    env: &'static str,
    host: &'a Option<String>,
    preset: &'a Option<String>,
    security: Security,
    ca_file: &'a Option<PathBuf>,
    accept_any: bool,
    max_connections: Option<u32>,
    daily_download: Option<u64>,
    auth: &'a str,
    user: &'a Option<String>,
    password_file: &'a Option<PathBuf>,
    oauth: OAuthArgs<'a>,
}

struct OAuthArgs<'a> {
    client_id: &'a Option<String>,
    tenant: &'a Option<String>,
    token_url: &'a Option<String>,
    scope: &'a Option<String>,
    mechanism: &'a Option<String>,
    certificate: &'a Option<PathBuf>,
    secret_file: &'a Option<PathBuf>,
}

impl Side<'_> {
    fn endpoint(&self, notes: &mut Vec<String>) -> Result<Endpoint, UsageError> {
        let mut endpoint = match (self.host, self.preset) {
            (Some(_), Some(_)) => {
                return Err(usage(format!(
                    "give --{0} or --{0}-preset, not both",
                    self.name
                )))
            }
            (None, None) => {
                return Err(usage(format!(
                    "no {0} server: give --{0} HOST[:PORT] or --{0}-preset NAME",
                    self.name
                )))
            }
            (None, Some(name)) => {
                let p = preset(name).ok_or_else(|| {
                    let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
                    usage(format!(
                        "unknown {} preset {name:?}: choose one of {}",
                        self.name,
                        names.join(", ")
                    ))
                })?;
                notes.push(format!("{} ({}): {}", self.name, p.name, p.note));
                if self.security != Security::Tls {
                    return Err(usage(format!(
                        "the {} preset {} uses implicit TLS on port 993",
                        self.name, p.name
                    )));
                }
                p.endpoint()
            }
            (Some(spec), None) => {
                let (host, port) = split_host_port(spec, self.security)
                    .map_err(|e| usage(format!("--{}: {e}", self.name)))?;
                Endpoint::new(host, port, self.security)
            }
        };
        endpoint.max_connections = self.max_connections.or(endpoint.max_connections);
        endpoint.daily_download_bytes = self.daily_download.or(endpoint.daily_download_bytes);
        if endpoint.max_connections == Some(0) {
            return Err(usage(format!(
                "--{}-max-connections: at least 1",
                self.name
            )));
        }
        endpoint.ca_file = self.ca_file.clone();
        endpoint.accept_invalid_certs = self.accept_any;
        if let Some(ca) = &endpoint.ca_file {
            if !ca.is_file() {
                return Err(usage(format!(
                    "--{}-ca-file {}: no such file",
                    self.name,
                    ca.display()
                )));
            }
        }
        Ok(endpoint)
    }

    fn method(&self) -> Result<AuthMethod, UsageError> {
        let bad = || {
            usage(format!(
                "--{}-auth {:?}: expected password, xoauth2, oauth2:GRANT, admin:NAME or master:NAME",
                self.name, self.auth
            ))
        };
        let oauth_given = [
            self.oauth.client_id.is_some(),
            self.oauth.tenant.is_some(),
            self.oauth.token_url.is_some(),
            self.oauth.scope.is_some(),
            self.oauth.mechanism.is_some(),
            self.oauth.certificate.is_some(),
            self.oauth.secret_file.is_some(),
        ]
        .contains(&true);
        if oauth_given && !self.auth.starts_with("oauth2:") {
            return Err(usage(format!(
                "the --{}-oauth-… options need --{0}-auth oauth2:GRANT",
                self.name
            )));
        }
        Ok(match self.auth.split_once(':') {
            None if self.auth == "password" => AuthMethod::Password,
            None if self.auth == "xoauth2" => AuthMethod::XOAuth2,
            Some(("oauth2", grant)) => AuthMethod::OAuth2(self.oauth_client(grant)?),
            Some(("admin", name)) if !name.is_empty() => {
                AuthMethod::AdminPlain { admin: name.into() }
            }
            Some(("master", name)) if !name.is_empty() => AuthMethod::DovecotMaster {
                master: name.into(),
            },
            _ => return Err(bad()),
        })
    }

    /// The OAuth2 client of `--SIDE-auth oauth2:GRANT`, the preset's token endpoint and
    /// scope filled in where not given.
    fn oauth_client(&self, grant: &str) -> Result<OAuthClient, UsageError> {
        let o = &self.oauth;
        let flag = |what: &str| format!("--{}-oauth-{what}", self.name);
        let grant = match grant {
            "refresh-token" | "refresh_token" => Grant::RefreshToken,
            "client-secret" | "client_secret" => Grant::ClientSecret,
            "certificate" | "client-certificate" | "client_certificate" => {
                let path = o.certificate.as_ref().ok_or_else(|| {
                    usage(format!(
                        "the certificate grant needs {}",
                        flag("certificate")
                    ))
                })?;
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    usage(format!("{} {}: {e}", flag("certificate"), path.display()))
                })?;
                let thumbprint = mailferry_shared::oauth::jwt::certificate_thumbprint(&pem)
                    .map_err(|e| {
                        usage(format!("{} {}: {e}", flag("certificate"), path.display()))
                    })?;
                Grant::ClientCertificate { thumbprint }
            }
            "service-account" | "service_account" => {
                let key = self.service_account_key()?;
                Grant::ServiceAccount {
                    client_email: key.client_email.clone(),
                    key_id: key.private_key_id.clone(),
                }
            }
            other => {
                return Err(usage(format!(
                    "--{}-auth oauth2:{other}: the grant is refresh-token, client-secret, \
                     certificate or service-account",
                    self.name
                )))
            }
        };
        let provider = self
            .preset
            .as_deref()
            .and_then(preset)
            .and_then(|p| p.oauth);
        let token_url = match (o.token_url, o.tenant, provider) {
            (Some(url), _, _) => url.clone(),
            // A service account's key file names its token endpoint.
            (None, None, _) if matches!(grant, Grant::ServiceAccount { .. }) => self
                .service_account_key()?
                .token_uri
                .unwrap_or_else(|| providers::GOOGLE_TOKEN_URL.into()),
            (None, tenant, Some(p)) => p.token_url(tenant.as_deref()),
            (None, Some(tenant), None) => providers::microsoft_token_url(tenant),
            (None, None, None) => {
                return Err(usage(format!(
                    "OAuth2 needs a token endpoint: give {} (Microsoft), {} or a --{}-preset",
                    flag("tenant"),
                    flag("token-url"),
                    self.name
                )))
            }
        };
        let scope = match (o.scope, provider) {
            (Some(scope), _) => scope.clone(),
            (None, Some(p)) => p.scope(&grant).to_string(),
            (None, None) if o.tenant.is_some() => match grant {
                Grant::RefreshToken => providers::MICROSOFT_USER_SCOPE.into(),
                _ => providers::MICROSOFT_APP_SCOPE.into(),
            },
            (None, None) if matches!(grant, Grant::ServiceAccount { .. }) => {
                providers::GOOGLE_SCOPE.into()
            }
            (None, None) => return Err(usage(format!("OAuth2 needs {}", flag("scope")))),
        };
        let mechanism = match o.mechanism.as_deref() {
            None | Some("xoauth2") => Mechanism::Xoauth2,
            Some("oauthbearer") => Mechanism::Oauthbearer,
            Some(other) => {
                return Err(usage(format!(
                    "{} {other:?}: expected xoauth2 or oauthbearer",
                    flag("mechanism")
                )))
            }
        };
        let client = OAuthClient {
            token_url,
            client_id: o.client_id.clone().unwrap_or_default(),
            scope,
            grant,
            mechanism,
        };
        client
            .validate()
            .map_err(|e| usage(format!("--{}-auth {}: {e}", self.name, self.auth)))?;
        Ok(client)
    }

    /// The app's secret of an OAuth2 grant, from `--SIDE-oauth-secret-file`: the client
    /// secret's first line, a private key or a service account key whole. `None` where
    /// the grant needs none and none was given.
    fn oauth_app_secret(&self, client: &OAuthClient) -> Result<Option<Secret>, UsageError> {
        let flag = format!("--{}-oauth-secret-file", self.name);
        let Some(path) = self.oauth.secret_file else {
            if client.grant.needs_app_secret() {
                return Err(usage(format!(
                    "the OAuth2 {} grant needs the app's secret: give {flag}",
                    client.grant.name()
                )));
            }
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("{flag} {}: {e}", path.display())))?;
        let secret = match &client.grant {
            Grant::RefreshToken | Grant::ClientSecret => {
                text.lines().next().unwrap_or("").trim().to_string()
            }
            Grant::ClientCertificate { .. } => {
                mailferry_shared::oauth::jwt::rsa_key_from_pem(&text)
                    .map_err(|e| usage(format!("{flag} {}: {e}", path.display())))?;
                text
            }
            Grant::ServiceAccount { .. } => self.service_account_key()?.private_key,
        };
        if secret.is_empty() {
            return Err(usage(format!("{flag} {} is empty", path.display())));
        }
        Ok(Some(Secret::new(secret)))
    }

    fn service_account_key(&self) -> Result<oauth::ServiceAccountKey, UsageError> {
        let flag = format!("--{}-oauth-secret-file", self.name);
        let path = self.oauth.secret_file.as_ref().ok_or_else(|| {
            usage(format!(
                "the service-account grant needs the key file: give {flag} KEY.json"
            ))
        })?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("{flag} {}: {e}", path.display())))?;
        oauth::ServiceAccountKey::parse(&text)
            .map_err(|e| usage(format!("{flag} {}: {e}", path.display())))
    }

    /// The secret of one user of this side ([`AuthMethod::user_secret`]): `read` is
    /// asked only where the method takes a secret of the user's own.
    fn user_secret(
        &self,
        method: &AuthMethod,
        app_secret: Option<&Secret>,
        read: impl FnOnce() -> Result<Secret, UsageError>,
    ) -> Result<Secret, UsageError> {
        let given = if method.needs_user_secret() {
            Some(read()?)
        } else {
            None
        };
        method
            .user_secret(given.as_ref(), app_secret)
            .ok_or_else(|| usage(format!("no secret to log in to the {} with", self.name)))
    }

    /// The secret from the file, the environment, or a prompt — never from the command line.
    fn secret(&self, for_whom: &str) -> Result<Secret, UsageError> {
        read_secret(
            &format!("--{}-password-file", self.name),
            self.password_file.as_deref(),
            self.env,
            &format!("{} password for {for_whom}", self.name),
        )
        .map_err(usage)
    }
}

fn split_host_port(spec: &str, security: Security) -> Result<(String, u16), String> {
    let default_port = if security == Security::Tls { 993 } else { 143 };
    // [v6]:port, host:port, host
    if let Some(rest) = spec.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("unclosed [ in an IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None => default_port,
        };
        return Ok((host.to_string(), port));
    }
    match spec.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
            if host.is_empty() {
                return Err("empty host".into());
            }
            Ok((host.to_string(), port))
        }
        _ if spec.is_empty() => Err("empty host".into()),
        _ => Ok((spec.to_string(), default_port)),
    }
}

/// Everything `migrate` needs, validated.
pub struct MigratePlan {
    pub users: Vec<UserSpec>,
    pub bad_rows: Vec<RowError>,
    pub options: Options,
    pub notes: Vec<String>,
}

pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MAILFERRY_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return Path::new(&dir).join("mailferry");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return Path::new(&home).join(".local/state/mailferry");
    }
    PathBuf::from("mailferry-state")
}

/// What [`users_from`] found.
pub struct Users {
    pub users: Vec<UserSpec>,
    pub bad_rows: Vec<RowError>,
    /// The presets' notes for the admin.
    pub notes: Vec<String>,
}

/// The users to migrate, from the endpoint flags and either a single login or a CSV;
/// with the CSV's bad rows (and logins without a usable target secret) and the presets'
/// notes for the admin.
pub fn users_from(
    source: &SourceArgs,
    target: &TargetArgs,
    csv: Option<&Path>,
    user_id: Option<&str>,
) -> Result<Users, UsageError> {
    let src: Side = source.into();
    let dst: Side = target.into();
    let mut notes = Vec::new();
    let source = src.endpoint(&mut notes)?;
    let target = dst.endpoint(&mut notes)?;
    let source_method = src.method()?;
    let target_method = dst.method()?;
    let app_secret = |side: &Side, method: &AuthMethod| match method {
        AuthMethod::OAuth2(client) => side.oauth_app_secret(client),
        _ => Ok(None),
    };
    let source_app = app_secret(&src, &source_method)?;
    let target_app = app_secret(&dst, &target_method)?;
    let mut users = Vec::new();
    let mut bad_rows = Vec::new();
    match csv {
        None => {
            let login = src.user.clone().ok_or_else(|| {
                usage("no user: give --source-user LOGIN (and --target-user if it differs), or --csv PATH")
            })?;
            let target_login = dst.user.clone().unwrap_or_else(|| login.clone());
            let source_secret =
                src.user_secret(&source_method, source_app.as_ref(), || src.secret(&login))?;
            let target_secret = dst.user_secret(&target_method, target_app.as_ref(), || {
                dst.secret(&target_login)
            })?;
            users.push(UserSpec {
                id: user_id.map(str::to_string).unwrap_or_else(|| login.clone()),
                source: source.clone(),
                source_credentials: Credentials::new(login, source_secret, source_method),
                target: target.clone(),
                target_credentials: Credentials::new(target_login, target_secret, target_method),
            });
        }
        Some(path) => {
            if src.user.is_some() || dst.user.is_some() {
                return Err(usage(
                    "--csv gives the logins: drop --source-user / --target-user",
                ));
            }
            let bytes =
                std::fs::read(path).map_err(|e| usage(format!("--csv {}: {e}", path.display())))?;
            let parsed =
                parse_csv(&bytes).map_err(|e| usage(format!("--csv {}: {e}", path.display())))?;
            bad_rows = parsed.errors;
            // With an admin or master login at the target, one secret serves every user.
            let admin_target = matches!(
                target_method,
                AuthMethod::AdminPlain { .. } | AuthMethod::DovecotMaster { .. }
            );
            let shared_target_secret =
                if admin_target && parsed.users.iter().any(|u| u.target_password.is_none()) {
                    Some(dst.secret("the target admin")?)
                } else {
                    None
                };
            // What stands in for a user's own secret: the target admin's password, or
            // an OAuth2 app's secret (an app-wide grant logs every user in with it and
            // needs no password column; a refresh token grant reads the column as each
            // user's refresh token).
            let target_fallback = target_app.or(shared_target_secret);
            for row in parsed.users {
                let source_given =
                    source_method.user_secret(row.source_password.as_ref(), source_app.as_ref());
                let Some(source_secret) = source_given else {
                    bad_rows.push(RowError {
                        line: row.line,
                        reason: format!("Password is empty for {}", row.email),
                    });
                    continue;
                };
                let target_given = target_method
                    .user_secret(row.target_password.as_ref(), target_fallback.as_ref());
                let target_secret = match target_given {
                    Some(p) => p,
                    None => {
                        bad_rows.push(RowError {
                            line: row.line,
                            reason: format!(
                                "no target password for {}: add a TargetPassword column or use --target-auth master:NAME",
                                row.email
                            ),
                        });
                        continue;
                    }
                };
                users.push(UserSpec {
                    id: row.email.clone(),
                    source: source.clone(),
                    source_credentials: Credentials::new(
                        row.source_login,
                        source_secret,
                        source_method.clone(),
                    ),
                    target: target.clone(),
                    target_credentials: Credentials::new(
                        row.target_login,
                        target_secret,
                        target_method.clone(),
                    ),
                });
            }
            bad_rows.sort_by_key(|r| r.line);
        }
    }

    Ok(Users {
        users,
        bad_rows,
        notes,
    })
}

pub fn prepare(args: &MigrateArgs) -> Result<MigratePlan, UsageError> {
    let rules = args.rules.rules()?;
    for (what, n) in [
        ("--connections", args.connections),
        ("--jobs", args.jobs),
        ("--parallel-users", args.parallel_users),
        ("--fetch-batch", args.fetch_batch),
        ("--attempts", args.attempts as usize),
    ] {
        if n == 0 {
            return Err(usage(format!("{what} must be at least 1")));
        }
    }
    if args.memory < (8 << 20) {
        return Err(usage("--memory must be at least 8M"));
    }

    let Users {
        mut users,
        bad_rows,
        notes,
    } = users_from(
        &args.source,
        &args.target,
        args.csv.as_deref(),
        args.user.as_deref(),
    )?;
    if args.read_timeout == 0 || args.command_timeout == 0 {
        return Err(usage(
            "--read-timeout and --command-timeout must be at least 1s",
        ));
    }
    for user in &mut users {
        for endpoint in [&mut user.source, &mut user.target] {
            endpoint.read_timeout = Duration::from_secs(args.read_timeout);
            endpoint.command_timeout = Duration::from_secs(args.command_timeout);
        }
    }

    let mut engine = EngineSettings {
        max_message_size: args
            .max_message_size
            .or(EngineSettings::default().max_message_size),
        bytes_in_flight: args.memory,
        ..EngineSettings::default()
    };
    engine.copy.fetch_messages = args.fetch_batch;
    // A FETCH batch never needs more than a quarter of the budget.
    engine.copy.fetch_bytes = engine.copy.fetch_bytes.min(args.memory / 4);
    let limits = Limits {
        max_literal: args
            .max_message_size
            .map(|m| m.max(1 << 20) * 2)
            .unwrap_or(Limits::default().max_literal),
        ..Limits::default()
    };
    Ok(MigratePlan {
        users,
        bad_rows,
        notes,
        options: Options {
            batch: args.batch.clone(),
            state_dir: args.state_dir.clone().unwrap_or_else(default_state_dir),
            dry_run: args.dry_run,
            rules,
            connections_per_account: args.connections,
            parallel_users: args.parallel_users,
            job_slots: args.jobs,
            engine,
            limits,
            retry: RetryPolicy {
                cap: Duration::from_secs(30),
                max_attempts: args.attempts,
                ..RetryPolicy::default()
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_help_names_every_preset() {
        use clap::CommandFactory;
        let help = Cli::command()
            .find_subcommand_mut("migrate")
            .expect("migrate")
            .render_long_help()
            .to_string();
        for p in PRESETS {
            assert!(
                help.contains(p.name),
                "migrate --help does not name {}",
                p.name
            );
        }
    }

    #[test]
    fn batch_create_takes_any_folder_rule_and_keeps_the_batchs_without_one() {
        use clap::Parser;
        let rules_of = |extra: &[&str]| {
            let mut args = vec!["mailferry", "batch", "create", "--batch", "b1"];
            args.extend_from_slice(extra);
            match Cli::try_parse_from(args).expect("parses").command {
                Command::Batch(BatchArgs {
                    command: BatchCommand::Create(create),
                    ..
                }) => create.folder_rules().expect("valid rules"),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(rules_of(&[]), None);
        let archive = rules_of(&["--archive-folder", "Old/Archived"]).expect("given");
        assert_eq!(archive.archive.as_deref(), Some("Old/Archived"));
        let rename = rules_of(&["--rename", "A/*=B/*"]).expect("given");
        assert_eq!(rename.rename, [("A/*".to_string(), "B/*".to_string())]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("6h"), Ok(21_600));
        assert_eq!(parse_duration_secs("1D"), Ok(86_400));
        assert!(parse_duration_secs("6w").is_err());
        assert!(parse_duration_secs("h").is_err());
    }

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(
            split_host_port("mail.example.com", Security::Tls).unwrap(),
            ("mail.example.com".into(), 993)
        );
        assert_eq!(
            split_host_port("127.0.0.1:10143", Security::Plain).unwrap(),
            ("127.0.0.1".into(), 10143)
        );
        assert_eq!(
            split_host_port("[::1]:143", Security::Plain).unwrap(),
            ("::1".into(), 143)
        );
        assert_eq!(
            split_host_port("h", Security::StartTls).unwrap(),
            ("h".into(), 143)
        );
        assert!(split_host_port("h:x", Security::Tls).is_err());
    }
}
