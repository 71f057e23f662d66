//! One typed settings struct for the cluster processes: defaults, then a TOML file, then
//! the environment (`MAILFERRY__WORKER__JOB_SLOTS=8`: double underscores between levels,
//! so the embedded mode's `MAILFERRY_SOURCE_PASSWORD` is never mistaken for a setting).
//! Unknown keys are rejected and every error names its key; secrets are [`Secret`]s.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    Load(String),
    #[error("settings: {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

/// A byte count written as a number or with a unit: `48M`, `1G`, `512K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// `25M`, `1G`, `512K`, `1000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'B' => 1,
                _ => return Err(format!("unknown size unit in {s:?}: use K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (like 25M or 1G)"))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => parse_size(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// The shortest time between passes (per installation or per batch). Short intervals
/// are for tests and demonstrations; a production batch syncs every few hours.
pub const MIN_SYNC_INTERVAL_SECS: u64 = 5;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// RabbitMQ, e.g. `amqp://user:pass@rabbitmq:5672/%2f` or `amqps://…:5671/…` (a
    /// secret: it may hold a password).
    pub amqp_url: Secret,
    /// With `amqps://`: a PEM file of the CA certificates to trust instead of the public
    /// roots (a private CA).
    pub amqp_ca_file: Option<PathBuf>,
    /// Redis, e.g. `redis://:pass@redis:6379/0`, or `rediss://…` over TLS (the public
    /// roots are trusted, or the CAs of `redis_ca_file`).
    pub redis_url: Secret,
    /// With `rediss://`: a PEM file of the CA certificates to trust instead of the
    /// public roots (a private CA).
    pub redis_ca_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted, beside the public roots, for OAuth2 token
    /// endpoints (an identity provider of your own behind a private CA).
    pub oauth_ca_file: Option<PathBuf>,
    /// Prefix of every Redis key and RabbitMQ queue of this installation.
    pub key_prefix: String,
    pub worker: WorkerSettings,
    pub coordinator: CoordinatorSettings,
    pub queue: QueueSettings,
    pub sealing: SealingSettings,
    pub ops: OpsSettings,
    pub api: ApiSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Folder jobs at once, a user's one after another (and deliveries held: the
    /// consumer prefetch; a delivery's users share the slots).
    pub job_slots: u16,
    /// Connections per source or target account, across all workers.
    pub connections_per_account: u32,
    /// Connections per source host, across all workers.
    pub connections_per_host: u32,
    /// Message bytes in memory at once per worker.
    pub bytes_in_flight: ByteSize,
    /// Time a job in progress gets to finish after SIGTERM before it is handed back.
    pub shutdown_grace_secs: u64,
    /// Time to live of a job's claim on its target folder; renewed every third of it.
    /// A worker that cannot renew (paused, cut off from Redis) stops writing before it
    /// lapses, and another worker may take the folder over once it has.
    pub claim_secs: u64,
    /// How long an account is paused after a throttling answer that suggests no time
    /// of its own (one with "Suggested Backoff Time" is paused for that).
    pub throttle_pause_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// Default time between passes of a synced user (per batch it can differ).
    pub sync_interval_secs: u64,
    /// A folder above either limit is split into UID-range jobs; folders below a tenth
    /// of both travel together in bundles.
    pub max_job_messages: u32,
    pub max_job_bytes: ByteSize,
    /// Queue messages (a job, or a bundle of small folders' jobs) of one user queued or
    /// running at once (fairness between users).
    pub max_jobs_per_user: u32,
    /// Small users (a pass that travels as one bundle) planned within a moment of each
    /// other share a queue message, up to this many: their claims, connection leases
    /// and ends cost Redis one call for all of them. A worker runs the users at once,
    /// each in one of its job slots. 1 gives every user its own messages.
    pub users_per_delivery: u32,
    /// Time to live of the active coordinator's lease: a standby takes over this long
    /// after the active one stops renewing it.
    pub leader_lease_secs: u64,
    /// A pass still open after this long is checked again: jobs still queued are
    /// published again (a lost publish, a crash between planning and publishing).
    pub recheck_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Deliveries of one job before RabbitMQ dead-letters it (a poison job).
    pub delivery_limit: u32,
}

/// What an operator's tooling talks to: the HTTP endpoint for Prometheus and probes,
/// and the log format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz` (e.g. `0.0.0.0:9464`); unset:
    /// not served (several processes on one machine would need a port each). The Helm
    /// chart sets it.
    pub listen: Option<String>,
    /// `text` (for people) or `json` (one object per line, for collectors).
    pub log_format: LogFormat,
    /// What is logged: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`), or
    /// `target=level` pairs and a default level, comma-separated
    /// (`info,lapin=warn`). `RUST_LOG` replaces it, and `-v` makes it `debug`.
    pub log_level: String,
}

/// Checks a log filter as [`OpsSettings::log_level`] and `RUST_LOG` are written:
/// `level` or `target=level`, comma-separated. `Err` says what is wrong.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    for part in filter.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ok = match part.split_once('=') {
            Some((target, l)) => !target.trim().is_empty() && level(l),
            None => level(part),
        };
        if !ok {
            return Err(format!(
                "{part:?}: write a level (off, error, warn, info, debug, trace) or target=level"
            ));
        }
    }
    Ok(())
}

/// The admin's HTTP API and web console, served by the coordinator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Address of the API and the console (e.g. `0.0.0.0:8080`); unset: not served.
    pub listen: Option<String>,
    /// A file of bearer tokens, one `tenant:token` per line (`#` starts a comment), e.g.
    /// a mounted Kubernetes secret. Read at start-up.
    pub tokens_file: Option<PathBuf>,
    /// Tokens written in the settings themselves (tests and demonstrations).
    pub tokens: Vec<ApiToken>,
    /// Refuse source servers whose names resolve to loopback, private, link-local or
    /// otherwise internal addresses: a tenant cannot point mailferry at the
    /// installation's own network. The Helm chart turns it on.
    pub forbid_private_sources: bool,
    /// The installation's own target servers (host names or addresses, as endpoints
    /// name them): with a list, tenants may make target endpoints of these hosts only,
    /// internal or not. Without one, a target is refused when internal, like a source,
    /// if `forbid_private_sources` is on.
    pub target_hosts: Vec<String>,
    /// What one tenant may hold and ask at once (`[api.limits]`).
    pub limits: ApiLimits,
}

/// What one tenant may hold and ask of the API at once, and the largest request
/// bodies. Beyond a count the API answers 409 `limit_reached`; beyond its streams, 429
/// `too_many_streams`; a body too large, 413 `body_too_large`: each naming the limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiLimits {
    pub endpoints_per_tenant: usize,
    pub batches_per_tenant: usize,
    /// Users over all of a tenant's batches.
    pub users_per_tenant: usize,
    /// Live event streams of one tenant on one coordinator (of its 32).
    pub streams_per_tenant: usize,
    /// A JSON body: an endpoint, a batch, a user, an edit.
    pub json_body_bytes: usize,
    /// An action's body (start, stop, sync-now, close): a selection of users, and at
    /// start their passwords.
    pub action_body_bytes: usize,
    /// A CSV import.
    pub import_bytes: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            endpoints_per_tenant: 100,
            batches_per_tenant: 1_000,
            users_per_tenant: 1_000_000,
            streams_per_tenant: 8,
            json_body_bytes: 1 << 20,
            action_body_bytes: 32 << 20,
            import_bytes: 64 << 20,
        }
    }
}

/// One API token and the tenant it acts for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub tenant: String,
    pub token: Secret,
}

/// The shortest token accepted: a guessable token is no authentication.
pub const MIN_TOKEN_LEN: usize = 16;

impl ApiSettings {
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_deref().and_then(|a| a.parse().ok())
    }

    /// Every token (inline and from the file), each checked: a tenant is a word of
    /// letters, digits, '-' and '_'; a token has at least [`MIN_TOKEN_LEN`] characters;
    /// and there is at least one. (Checked by the coordinator, which serves the API: the
    /// workers share the settings file but not the token file.)
    pub fn all_tokens(&self) -> Result<Vec<ApiToken>, SettingsError> {
        let invalid = |key, problem: String| SettingsError::Invalid { key, problem };
        let mut all = self.tokens.clone();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("api.tokens_file", format!("{}: {e}", path.display())))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (tenant, token) = line.split_once(':').ok_or_else(|| {
                    invalid(
                        "api.tokens_file",
                        format!("{} line {}: expected tenant:token", path.display(), n + 1),
                    )
                })?;
                all.push(ApiToken {
                    tenant: tenant.trim().to_string(),
                    token: Secret::new(token.trim()),
                });
            }
        }
        if all.is_empty() {
            return Err(invalid(
                "api.tokens",
                "the API is served (api.listen) but no token is set: add api.tokens or api.tokens_file".into(),
            ));
        }
        for t in &all {
            let word = !t.tenant.is_empty()
                && t.tenant.len() <= 64
                && t.tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !word {
                return Err(invalid(
                    "api.tokens",
                    format!(
                        "tenant {:?}: use up to 64 letters, digits, '-' and '_'",
                        t.tenant
                    ),
                ));
            }
            if t.token.expose().len() < MIN_TOKEN_LEN {
                return Err(invalid(
                    "api.tokens",
                    format!(
                        "the token of tenant {} is shorter than {MIN_TOKEN_LEN} characters",
                        t.tenant
                    ),
                ));
            }
        }
        Ok(all)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl OpsSettings {
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_deref().and_then(|a| a.parse().ok())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SealingSettings {
    /// A file with the sealing keys (`id:base64` per line, newest last), e.g. a mounted
    /// Kubernetes secret. Without it, the keys come from `key_env`.
    pub key_file: Option<PathBuf>,
    pub key_env: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            amqp_url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            amqp_ca_file: None,
            redis_ca_file: None,
            oauth_ca_file: None,
            redis_url: Secret::new("redis://127.0.0.1:6379/0"),
            key_prefix: "mailferry".into(),
            worker: WorkerSettings::default(),
            coordinator: CoordinatorSettings::default(),
            queue: QueueSettings::default(),
            sealing: SealingSettings::default(),
            ops: OpsSettings::default(),
            api: ApiSettings::default(),
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            job_slots: 8,
            connections_per_account: 4,
            connections_per_host: 200,
            bytes_in_flight: ByteSize(32 << 20),
            shutdown_grace_secs: 60,
            claim_secs: 60,
            throttle_pause_secs: 30,
        }
    }
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            sync_interval_secs: 24 * 3600,
            max_job_messages: 10_000,
            max_job_bytes: ByteSize(1 << 30),
            max_jobs_per_user: 4,
            users_per_delivery: 64,
            leader_lease_secs: 15,
            recheck_secs: 900,
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings { delivery_limit: 5 }
    }
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            listen: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

impl Default for SealingSettings {
    fn default() -> Self {
        SealingSettings {
            key_file: None,
            key_env: "MAILFERRY_SEALING_KEYS".into(),
        }
    }
}

impl Settings {
    /// Defaults, then `file` (TOML) if given, then `MAILFERRY__…` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::Load(format!(
                    "{}: no such file",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("MAILFERRY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError::Load(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, problem: &str| {
            Err(SettingsError::Invalid {
                key,
                problem: problem.to_string(),
            })
        };
        let scheme = |url: &Secret| url.expose().split("://").next().unwrap_or("").to_string();
        if !matches!(scheme(&self.amqp_url).as_str(), "amqp" | "amqps") {
            return invalid("amqp_url", "must start with amqp:// or amqps://");
        }
        let ca_files = [
            ("amqp_ca_file", &self.amqp_ca_file, &self.amqp_url, "amqps"),
            (
                "redis_ca_file",
                &self.redis_ca_file,
                &self.redis_url,
                "rediss",
            ),
        ];
        for (key, file, url, tls) in ca_files {
            let Some(path) = file else { continue };
            if scheme(url) != tls {
                return invalid(key, &format!("is for {tls}:// URLs only"));
            }
            match std::fs::read_to_string(path) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => {
                    return invalid(
                        key,
                        &format!("{}: no PEM certificate in it", path.display()),
                    )
                }
                Err(e) => return invalid(key, &format!("{}: {e}", path.display())),
            }
        }
        if let Some(path) = &self.oauth_ca_file {
            match std::fs::read_to_string(path) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => {
                    return invalid(
                        "oauth_ca_file",
                        &format!("{}: no PEM certificate in it", path.display()),
                    )
                }
                Err(e) => return invalid("oauth_ca_file", &format!("{}: {e}", path.display())),
            }
        }
        if !matches!(scheme(&self.redis_url).as_str(), "redis" | "rediss") {
            return invalid("redis_url", "must start with redis:// or rediss://");
        }
        if let Err(problem) = check_log_filter(&self.ops.log_level) {
            return invalid("ops.log_level", &problem);
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return invalid("key_prefix", "must be a non-empty word");
        }
        if self.worker.job_slots == 0 {
            return invalid("worker.job_slots", "must be at least 1");
        }
        if self.worker.connections_per_account == 0 || self.worker.connections_per_host == 0 {
            return invalid(
                "worker.connections_per_account",
                "connection caps must be at least 1",
            );
        }
        if self.worker.bytes_in_flight.0 < 8 << 20 {
            return invalid("worker.bytes_in_flight", "must be at least 8M");
        }
        if self.coordinator.sync_interval_secs < MIN_SYNC_INTERVAL_SECS {
            return invalid("coordinator.sync_interval_secs", "must be at least 5");
        }
        if self.worker.throttle_pause_secs == 0 {
            return invalid("worker.throttle_pause_secs", "must be at least 1");
        }
        if self.worker.claim_secs < 3 {
            return invalid("worker.claim_secs", "must be at least 3");
        }
        if self.coordinator.leader_lease_secs < 3 {
            return invalid("coordinator.leader_lease_secs", "must be at least 3");
        }
        if self.coordinator.recheck_secs < 10 {
            return invalid("coordinator.recheck_secs", "must be at least 10");
        }
        if !(1..=64).contains(&self.coordinator.users_per_delivery) {
            return invalid("coordinator.users_per_delivery", "must be between 1 and 64");
        }
        if self.coordinator.max_job_messages == 0 || self.coordinator.max_jobs_per_user == 0 {
            return invalid(
                "coordinator.max_job_messages",
                "job limits must be at least 1",
            );
        }
        if let Some(listen) = &self.ops.listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return invalid(
                    "ops.listen",
                    "must be an address and port, e.g. 0.0.0.0:9464",
                );
            }
        }
        if let Some(listen) = &self.api.listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return invalid(
                    "api.listen",
                    "must be an address and port, e.g. 0.0.0.0:8080",
                );
            }
        }
        if self.queue.delivery_limit == 0 {
            return invalid("queue.delivery_limit", "must be at least 1");
        }
        Ok(())
    }

    /// The sealing keys, from the key file or the environment variable.
    pub fn sealing_keys(&self) -> Result<Secret, SettingsError> {
        let text = match &self.sealing.key_file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| SettingsError::Invalid {
                key: "sealing.key_file",
                problem: format!("{}: {e}", path.display()),
            })?,
            None => std::env::var(&self.sealing.key_env).map_err(|_| SettingsError::Invalid {
                key: "sealing.key_env",
                problem: format!("${} is not set", self.sealing.key_env),
            })?,
        };
        Ok(Secret::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("mf-settings-{}.toml", fastrand::u64(..)));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let defaults = Settings::load(None, []).unwrap();
        assert_eq!(defaults.worker.job_slots, 8);
        assert_eq!(defaults.coordinator.max_job_bytes, ByteSize(1 << 30));
        let file =
            write("key_prefix = \"mf-test\"\n[worker]\njob_slots = 3\nbytes_in_flight = \"32M\"\n");
        let env = [
            ("MAILFERRY__WORKER__JOB_SLOTS".to_string(), "5".to_string()),
            (
                "MAILFERRY_SOURCE_PASSWORD".to_string(),
                "not a setting".to_string(),
            ),
        ];
        let s = Settings::load(Some(&file), env).unwrap();
        assert_eq!(s.key_prefix, "mf-test");
        assert_eq!(s.worker.job_slots, 5, "the environment wins over the file");
        assert_eq!(s.worker.bytes_in_flight, ByteSize(32 << 20));
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn api_tokens_come_from_the_settings_and_a_file_and_are_checked() {
        let tokens = write(
            "# tenant:token\nacme: acme-0123456789abcdef \n\nglobex:globex-0123456789abcdef\n",
        );
        let file = write(&format!(
            "[api]\nlisten = \"127.0.0.1:8080\"\ntokens_file = \"{}\"\ntokens = [{{ tenant = \"initech\", token = \"initech-0123456789ab\" }}]\n",
            tokens.display()
        ));
        let s = Settings::load(Some(&file), []).unwrap();
        let all = s.api.all_tokens().unwrap();
        let tenants: Vec<&str> = all.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(tenants, ["initech", "acme", "globex"]);
        assert_eq!(all[1].token.expose(), "acme-0123456789abcdef");
        let check = |text: &str| {
            std::fs::write(&tokens, text).unwrap();
            s.api.all_tokens().unwrap_err().to_string()
        };
        assert!(check("acme-0123456789abcdef\n").contains("line 1: expected tenant:token"));
        assert!(check("acme:short\n").contains("shorter than 16"));
        assert!(check("ac me:acme-0123456789abcdef\n").contains("tenant \"ac me\""));
        let none = ApiSettings {
            listen: Some("127.0.0.1:8080".into()),
            ..ApiSettings::default()
        };
        assert!(none
            .all_tokens()
            .unwrap_err()
            .to_string()
            .contains("no token is set"));
        let err = Settings::load(None, [("MAILFERRY__API__LISTEN".into(), "8080".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.listen"), "{err}");
        std::fs::remove_file(file).unwrap();
        std::fs::remove_file(tokens).unwrap();
    }

    #[test]
    fn mistakes_name_their_key() {
        let file = write("[worker]\njob_slot = 3\n");
        let err = Settings::load(Some(&file), []).unwrap_err().to_string();
        assert!(err.contains("job_slot"), "{err}");
        std::fs::remove_file(file).unwrap();
        let err = Settings::load(None, [("MAILFERRY__WORKER__JOB_SLOTS".into(), "0".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.job_slots"), "{err}");
        let err = Settings::load(None, [("MAILFERRY__REDIS_URL".into(), "http://x".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis_url"), "{err}");
        let file = write("[worker]\nbytes_in_flight = \"12Q\"\n");
        let err = Settings::load(Some(&file), []).unwrap_err().to_string();
        assert!(err.contains("12Q"), "{err}");
        std::fs::remove_file(file).unwrap();
        let err = Settings::load(None, [("MAILFERRY__OPS__LISTEN".into(), "9464".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ops.listen"), "{err}");
        let file = write("[ops]\nlog_format = \"yaml\"\n");
        let err = Settings::load(Some(&file), []).unwrap_err().to_string();
        assert!(err.contains("yaml"), "{err}");
        std::fs::remove_file(file).unwrap();
        let err = Settings::load(
            None,
            [
                ("MAILFERRY__AMQP_URL".into(), "amqp://h/%2f".into()),
                ("MAILFERRY__AMQP_CA_FILE".into(), "/etc/hosts".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("amqp_ca_file") && err.contains("amqps"),
            "{err}"
        );
        let err = Settings::load(
            None,
            [
                ("MAILFERRY__AMQP_URL".into(), "amqps://h/%2f".into()),
                ("MAILFERRY__AMQP_CA_FILE".into(), "/etc/hosts".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let file = write("[ops]\nlisten = \"127.0.0.1:9464\"\nlog_format = \"json\"\n");
        let ok = Settings::load(Some(&file), []).unwrap();
        assert_eq!(ok.ops.log_format, LogFormat::Json);
        assert_eq!(ok.ops.listen_addr().unwrap().port(), 9464);
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn secrets_stay_redacted() {
        let s = Settings::load(
            None,
            [(
                "MAILFERRY__AMQP_URL".into(),
                "amqp://u:topsecret@h/%2f".into(),
            )],
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("topsecret"));
        assert_eq!(s.amqp_url.expose(), "amqp://u:topsecret@h/%2f");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("25M"), Ok(25 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn log_levels_are_checked_when_the_settings_load() {
        for good in [
            "info",
            "WARN",
            "info,lapin=warn",
            "mailferry_worker=debug, off",
        ] {
            assert_eq!(super::check_log_filter(good), Ok(()), "{good}");
        }
        for bad in ["verbose", "lapin=", "=info", "info;debug"] {
            assert!(super::check_log_filter(bad).is_err(), "{bad}");
        }
        let file = write("[ops]\nlog_level = \"chatty\"\n");
        let err = Settings::load(Some(&file), []).unwrap_err().to_string();
        assert!(
            err.contains("ops.log_level") && err.contains("chatty"),
            "{err}"
        );
        std::fs::remove_file(file).unwrap();
    }
}
