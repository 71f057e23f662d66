//! A cluster served through its HTTP API, for the API's and the console's tests: a
//! Dovecot pair (the target with a master user), a `mailferry coordinator` serving
//! `api.listen` with two tenants' tokens, optional workers, the machine's RabbitMQ and
//! Redis under a key prefix of the rig's own.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mailferry_coordinator::client::{Answer, ApiClient};
use mailferry_shared::config::seal::Keyring;
use mailferry_shared::secret::Secret;

use crate::dovecot::{free_port, temp_dir, Dovecot, DovecotConfig};
use crate::mail::{self, corpus, TestMessage};

/// alice's source password: it must show up in no response, event, log or Redis value.
pub const CANARY: &str = "canary-7d41b2aa-api-password";
pub const ACME: &str = "acme-token-4f1e2d3c4b5a6978";
pub const GLOBEX: &str = "globex-token-0a9b8c7d6e5f4321";
/// The target's master user, with whose password the workers log in as each user.
pub const MASTER: (&str, &str) = ("admin", "master-secret-31337");

/// A mailferry process, killed when the rig goes.
pub struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct ApiRig {
    pub src: Dovecot,
    pub dst: Dovecot,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub keys: Secret,
    pub prefix: String,
    pub api_port: u16,
    /// (login = address, source password, the corpus loaded for it)
    pub users: Vec<(String, String, Vec<TestMessage>)>,
    processes: Vec<Process>,
    slow: Option<crate::proxy::SlowProxy>,
    /// The token endpoint of an OAuth2 rig.
    pub idp: Option<crate::oauth::TokenEndpoint>,
    /// Set by [`ApiRig::clean_up`].
    cleaned: std::sync::atomic::AtomicBool,
}

/// How a rig is built.
#[derive(Debug, Clone, Copy, Default)]
pub struct RigOptions {
    /// Messages per folder of each user's corpus (0: empty mailboxes).
    pub per_folder: usize,
    /// Worker processes.
    pub workers: usize,
    /// `api.forbid_private_sources`.
    pub forbid_private_sources: bool,
    /// The target refuses messages larger than this (bytes).
    pub target_max_mail_size: Option<u64>,
    /// Each user's storage quota at the target (KiB).
    pub target_quota_kib: Option<u64>,
    /// The source endpoint reaches the source through a proxy sending at most this
    /// many bytes a second.
    pub slow_source: Option<usize>,
    /// Lines of `[api.limits]`.
    pub limits: &'static str,
    /// The items of `api.target_hosts` (TOML, e.g. `"127.0.0.1"`).
    pub target_hosts: &'static str,
    /// Both servers also take OAuth2 tokens of the rig's token endpoint
    /// ([`ApiRig::idp`], tokens living [`OAUTH_LIFETIME`] seconds): the source a user's
    /// own (`%u`), the target an app's for the whole domain (`%d`). The endpoint knows
    /// the public client `mail-client`, whose refresh token for alice is the canary,
    /// and the app `m365-app` with the client secret [`APP_SECRET`].
    pub oauth: bool,
    /// The source plays Gmail ([`DovecotConfig::gmail`]): `[Gmail]/All Mail` over every
    /// folder and the archived mail.
    pub gmail_source: bool,
}

/// How long the OAuth2 rig's access tokens live, in seconds.
pub const OAUTH_LIFETIME: u64 = 6;
/// The client secret of the OAuth2 rig's app.
pub const APP_SECRET: &str = "m365-app-secret";

impl ApiRig {
    pub async fn start(options: RigOptions) -> ApiRig {
        let logins = vec![
            ("alice@example.com".to_string(), CANARY.to_string()),
            ("bob@example.com".to_string(), "bob-source-pw".to_string()),
        ];
        let idp = match options.oauth {
            true => Some(crate::oauth::TokenEndpoint::start(OAUTH_LIFETIME).await),
            false => None,
        };
        let validation = |format: &str| {
            idp.as_ref().map(|idp| crate::dovecot::OAuth2Validation {
                key_base64: idp.key_base64(),
                username_format: format.into(),
            })
        };
        if let Some(idp) = &idp {
            idp.register_app(crate::oauth::App {
                client_id: "mail-client".into(),
                ..Default::default()
            });
            idp.register_app(crate::oauth::App {
                client_id: "m365-app".into(),
                secret: Some(APP_SECRET.into()),
                principal: "mailferry-app@example.com".into(),
                ..Default::default()
            });
            idp.set_rotation(true);
            idp.grant_refresh_token_as(&logins[0].0, "mail-client", CANARY);
        }
        let src = Dovecot::start(DovecotConfig {
            users: logins.clone(),
            oauth2: validation("%u"),
            gmail: options.gmail_source,
            ..DovecotConfig::default()
        });
        // The target has the same passwords (so the verifier can log in), but the API is
        // never told them: the master user logs in for each user.
        let dst = Dovecot::start(DovecotConfig {
            users: logins.clone(),
            master: Some((MASTER.0.into(), MASTER.1.into())),
            max_mail_size: options.target_max_mail_size,
            quota_kib: options.target_quota_kib,
            oauth2: validation("%d"),
            ..DovecotConfig::default()
        });
        let mut users = Vec::new();
        for (i, (login, password)) in logins.into_iter().enumerate() {
            let messages = if options.per_folder > 0 {
                corpus(300 + i as u64, options.per_folder)
            } else {
                Vec::new()
            };
            if !messages.is_empty() {
                mail::load(src.port, &login, &password, '/', &messages).await;
            }
            users.push((login, password, messages));
        }
        let prefix = format!("mfa-{:016x}", fastrand::u64(..));
        let dir = temp_dir("api");
        let config = dir.join("mailferry.toml");
        let api_port = free_port();
        std::fs::write(
            &config,
            format!(
                "key_prefix = \"{prefix}\"\n{}\
                 [worker]\njob_slots = 3\nclaim_secs = 6\n\
                 [coordinator]\nleader_lease_secs = 3\nrecheck_secs = 20\n\
                 [api]\nlisten = \"127.0.0.1:{api_port}\"\nforbid_private_sources = {}\n\
                 target_hosts = [{}]\n\
                 tokens = [{{ tenant = \"acme\", token = \"{ACME}\" }}, {{ tenant = \"globex\", token = \"{GLOBEX}\" }}]\n\
                 [api.limits]\n{}\n",
                idp.as_ref()
                    .map(|idp| format!("oauth_ca_file = \"{}\"\n", idp.ca.ca_cert.display()))
                    .unwrap_or_default(),
                options.forbid_private_sources,
                options.target_hosts,
                options.limits,
            ),
        )
        .unwrap();
        let mut rig = ApiRig {
            src,
            dst,
            dir,
            config,
            keys: Keyring::generate("k1").unwrap(),
            prefix,
            api_port,
            users,
            processes: Vec::new(),
            slow: None,
            idp,
            cleaned: std::sync::atomic::AtomicBool::new(false),
        };
        if let Some(rate) = options.slow_source {
            rig.slow = Some(crate::proxy::SlowProxy::start(rig.src.port, rate).await);
        }
        let coordinator = rig.process("coordinator", "coordinator");
        rig.processes.push(coordinator);
        for i in 0..options.workers {
            let worker = rig.process("worker", &format!("worker{i}"));
            rig.processes.push(worker);
        }
        rig.wait_for_api().await;
        rig
    }

    /// Stops every process, then starts the coordinator again with `keys` (key
    /// rotation), waiting for its API.
    pub async fn restart_coordinator(&mut self, keys: Secret) {
        self.processes.clear();
        self.keys = keys;
        let coordinator = self.process("coordinator", "coordinator-again");
        self.processes.push(coordinator);
        self.wait_for_api().await;
    }

    /// `mailferry batch ARGS` (the operator's commands, on Redis): (exit code, output).
    pub fn operator(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = crate::run::operator(&self.config, self.keys.expose(), args);
        (out.status.code(), crate::run::text(&out))
    }

    fn process(&self, command: &str, name: &str) -> Process {
        let log = self.dir.join(format!("{name}.log"));
        Process(crate::run::spawn_process(
            command,
            &self.config,
            self.keys.expose(),
            &log,
            &[],
        ))
    }

    /// Runs `mailferry api ARGS` against the rig with acme's token; (exit code, stdout,
    /// stdout and stderr), after checking the canary shows in neither.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
        let out = Command::new(crate::run::binary())
            .arg("api")
            .args(args)
            .env("MAILFERRY_API_URL", self.base_url())
            .env("MAILFERRY_API_TOKEN", ACME)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running mailferry api");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(!all.contains(CANARY), "the CLI printed the password: {all}");
        (out.status.code(), stdout, all)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn client(&self, token: &str) -> ApiClient {
        ApiClient::new(&self.base_url(), Secret::new(token)).unwrap()
    }

    async fn wait_for_api(&self) {
        let client = self.client(ACME);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = client.get("/api/v1/openapi.json").await {
                if a.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the API did not come up:\n{}",
                self.log("coordinator")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The coordinator's peak resident memory so far (VmHWM), in KiB.
    pub fn coordinator_peak_rss_kib(&self) -> u64 {
        let pid = self.processes[0].0.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The JSON to make this rig's source endpoint (plain IMAP on loopback, through
    /// the slow proxy when there is one).
    pub fn source_endpoint(&self) -> serde_json::Value {
        let port = self.slow.as_ref().map_or(self.src.port, |p| p.port);
        serde_json::json!({
            "name": "Old server", "role": "source", "provider": "custom",
            "host": "127.0.0.1", "port": port, "security": "plain"
        })
    }

    /// The JSON to make this rig's target endpoint (the master user logs in).
    pub fn target_endpoint(&self) -> serde_json::Value {
        serde_json::json!({
            "name": "New server", "role": "target", "provider": "custom",
            "host": "127.0.0.1", "port": self.dst.port, "security": "plain",
            "auth": {"method": "dovecot_master", "master": MASTER.0},
            "admin_password": MASTER.1
        })
    }

    /// Every log of the rig's processes, for a check that no password shows in any.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                all.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        all
    }

    /// The canary is in no Redis value of the rig and no log.
    pub async fn assert_no_canary_at_rest(&self) {
        crate::redis::assert_absent("redis://127.0.0.1:6379/0", &self.prefix, CANARY).await;
        assert!(
            !self.all_logs().contains(CANARY),
            "a log shows the password"
        );
    }

    /// Deletes the rig's Redis keys and RabbitMQ queues (the machine's shared
    /// instances). A rig dropped without it (a failed test) does it in its drop.
    pub async fn clean_up(&self) {
        // The rig's processes first: a worker whose queue is deleted reconnects and
        // declares it again.
        crate::run::stop_processes_of(&self.config);
        crate::run::remove_traces(MACHINE_REDIS, &self.prefix).await;
        self.cleaned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The machine's Redis, where the API rigs keep their keys.
const MACHINE_REDIS: &str = "redis://127.0.0.1:6379/0";

impl Drop for ApiRig {
    fn drop(&mut self) {
        self.processes.clear();
        crate::run::stop_processes_of(&self.config);
        if self.cleaned.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        crate::run::remove_traces_blocking(MACHINE_REDIS, &self.prefix);
    }
}

/// An answer's body as text, after checking the canary is not in it.
pub fn checked(answer: &Answer) -> String {
    let text = answer.text();
    assert!(
        !text.contains(CANARY),
        "an API answer shows the password: {text}"
    );
    text
}
