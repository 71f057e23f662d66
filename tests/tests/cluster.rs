//! The cluster path end to end: `mailferry batch` as the admin runs it, `mailferry
//! coordinator` and `mailferry worker` processes, the machine's real RabbitMQ and Redis
//! (unique prefixes), a Dovecot pair.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mailferry_coordinator::scheduler::bundles_in_flight;
use mailferry_shared::config::seal::Keyring;
use mailferry_shared::domain::status::JobState;
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::redis::RedisStore;
use mailferry_shared::secret::Secret;
use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, corpus, Pair, TestMessage};
use mailferry_tests::proxy::{Direction, SlowProxy};
use mailferry_tests::redis::RedisServer;

const CANARY: &str = "canary-5f0c9e1d-password";

/// A coordinator or worker process, killed if the test ends early.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Rig {
    src: Dovecot,
    dst: Dovecot,
    dir: PathBuf,
    config: PathBuf,
    keys: Secret,
    prefix: String,
    /// (IMAP login, password, the corpus loaded for it)
    users: Vec<(String, String, Vec<TestMessage>)>,
    /// See [`Setup::source_max_connections`].
    source_max_connections: Option<u32>,
    /// Between the batch's source endpoint and the source server, when slowed.
    _slow: Option<SlowProxy>,
    /// Between the batch's target endpoint and the target server, when slowed.
    slow_target: Option<SlowProxy>,
    /// The Redis of this rig: its own server for the destructive tests, else the
    /// machine's (under the rig's own key prefix).
    redis_url: String,
    own_redis: Option<RedisServer>,
    /// Set by [`Rig::clean_up`]; a rig dropped without it (a failed test) cleans up in
    /// its drop.
    cleaned: std::sync::atomic::AtomicBool,
}

impl Drop for Rig {
    fn drop(&mut self) {
        mailferry_tests::run::stop_processes_of(&self.config);
        if !self.cleaned.load(std::sync::atomic::Ordering::SeqCst) {
            mailferry_tests::run::remove_traces_blocking(&self.redis_url, &self.prefix);
        }
    }
}

/// How a rig is built.
#[derive(Default)]
struct Setup<'a> {
    per_folder: usize,
    /// TOML after the key prefix; `FAST` when empty.
    settings: &'a str,
    /// The source reached through a proxy that sends at most this many bytes a second.
    slow: Option<usize>,
    /// A Redis of the rig's own: `Some(true)` keeps its data across restarts.
    own_redis: Option<bool>,
    /// The source server's limit of connections per user and address.
    source_connections: Option<u32>,
    /// The batch's source endpoint's own cap (`--source-max-connections`).
    source_max_connections: Option<u32>,
    /// The target reached through a proxy that takes at most this many bytes a second.
    slow_target: Option<usize>,
    /// The processes' `redis_url`, when not the rig's own (the test reaches Redis
    /// directly all the same).
    config_redis_url: Option<String>,
}

/// Short leases, so that the tests of failures run in seconds.
const FAST: &str = "[worker]\njob_slots = 3\nconnections_per_account = 2\nclaim_secs = 6\n[coordinator]\nleader_lease_secs = 3\nrecheck_secs = 20\n";

/// Appended to `FAST`: bundles hold at most a tenth of `max_job_messages`, so with 6 or
/// more messages per folder every folder is a job of its own. For tests that need a
/// user's folders running at once on several workers, or a pass long enough to act
/// in the middle of.
const NO_BUNDLES: &str = "max_job_messages = 50\n";

/// `FAST` with claims renewed every second: for tests in which a job must outlive a
/// renewal (a slowed source) or a worker must lose its claims quickly.
fn short_claims() -> String {
    FAST.replace("claim_secs = 6", "claim_secs = 3")
}

impl Rig {
    /// Two users (alice's password is the canary) with `per_folder` messages per folder,
    /// a batch "b1" created through `mailferry batch create`.
    async fn new(per_folder: usize) -> Rig {
        Rig::with(per_folder, FAST).await
    }

    /// The same, with `settings` (TOML after the key prefix) as the settings file.
    async fn with(per_folder: usize, settings: &str) -> Rig {
        Rig::build(Setup {
            per_folder,
            settings,
            ..Setup::default()
        })
        .await
    }

    /// The source reached through a proxy that sends at most `bytes_per_sec`.
    async fn slow(per_folder: usize, settings: &str, bytes_per_sec: usize) -> Rig {
        Rig::build(Setup {
            per_folder,
            settings,
            slow: Some(bytes_per_sec),
            ..Setup::default()
        })
        .await
    }

    async fn build(setup: Setup<'_>) -> Rig {
        let Setup {
            per_folder,
            settings,
            slow,
            own_redis,
            source_connections,
            source_max_connections,
            slow_target,
            config_redis_url,
        } = setup;
        let settings = if settings.is_empty() { FAST } else { settings };
        let own_redis = own_redis.map(RedisServer::start);
        let redis_url = own_redis
            .as_ref()
            .map_or("redis://127.0.0.1:6379/0".to_string(), RedisServer::url);
        let logins = vec![
            ("alice".to_string(), CANARY.to_string()),
            ("bob".to_string(), "bob-secret".to_string()),
        ];
        let src = Dovecot::start(DovecotConfig {
            users: logins.clone(),
            max_user_connections: source_connections.unwrap_or(200),
            ..DovecotConfig::default()
        });
        let dst = Dovecot::start(DovecotConfig {
            users: logins.clone(),
            ..DovecotConfig::default()
        });
        let mut users = Vec::new();
        for (i, (login, password)) in logins.into_iter().enumerate() {
            let messages = corpus(80 + i as u64, per_folder);
            mail::load(src.port, &login, &password, '/', &messages).await;
            users.push((login, password, messages));
        }
        let prefix = format!("mft-{:016x}", fastrand::u64(..));
        let dir = temp_dir("cluster");
        let config = dir.join("mailferry.toml");
        std::fs::write(
            &config,
            format!(
                "key_prefix = \"{prefix}\"\nredis_url = \"{}\"\n{settings}",
                config_redis_url.as_deref().unwrap_or(&redis_url)
            ),
        )
        .unwrap();
        let slow = match slow {
            Some(rate) => Some(SlowProxy::start(src.port, rate).await),
            None => None,
        };
        let slow_target = match slow_target {
            Some(rate) => Some(SlowProxy::throttled(dst.port, rate, Direction::Upload).await),
            None => None,
        };
        let rig = Rig {
            _slow: slow,
            slow_target,
            redis_url,
            own_redis,
            cleaned: std::sync::atomic::AtomicBool::new(false),
            src,
            dst,
            dir,
            config,
            keys: Keyring::generate("k1").unwrap(),
            prefix,
            users,
            source_max_connections,
        };
        rig.create_batch();
        rig
    }

    /// `mailferry batch create` for batch "b1": the rig's users from a CSV that also has
    /// one bad row.
    fn create_batch(&self) {
        self.create_batch_named("b1");
    }

    /// `mailferry batch create` for a batch of the rig's users under `batch`.
    fn create_batch_named(&self, batch: &str) {
        let csv = self.dir.join("users.csv");
        let mut rows =
            String::from("EmailAddress,UserName,Password,TargetUserName,TargetPassword\n");
        for (login, password, _) in &self.users {
            rows.push_str(&format!(
                "{login}@example.com,{login},{password},{login},{password}\n"
            ));
        }
        rows.push_str("broken,carol,x,carol,x\n");
        std::fs::write(&csv, rows).unwrap();
        let source_port = self._slow.as_ref().map_or(self.src.port, |p| p.port);
        let cap = self.source_max_connections.map(|n| n.to_string());
        let cap_args = match &cap {
            Some(n) => vec!["--source-max-connections", n.as_str()],
            None => Vec::new(),
        };
        let (code, _, text) = self.admin(
            &[
                &[
                    "create",
                    "--batch",
                    batch,
                    "--source",
                    &format!("127.0.0.1:{source_port}"),
                    "--source-security",
                    "plain",
                    "--target",
                    &format!(
                        "127.0.0.1:{}",
                        self.slow_target.as_ref().map_or(self.dst.port, |p| p.port)
                    ),
                    "--target-security",
                    "plain",
                    "--csv",
                    csv.to_str().unwrap(),
                ],
                &cap_args[..],
            ]
            .concat(),
        );
        assert_eq!(code, Some(7), "one bad row: {text}");
        assert!(text.contains("line 4"), "{text}");
    }

    /// `mailferry batch start` for every user of "b1".
    fn start(&self) {
        let (code, _, text) = self.admin(&["start", "--batch", "b1"]);
        assert_eq!(code, Some(0), "{text}");
    }

    /// Runs `mailferry batch ARGS`; asserts the password shows nowhere in its output.
    fn admin(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = mailferry_tests::run::operator(&self.config, self.keys.expose(), args);
        let text = mailferry_tests::run::text(&out);
        assert!(!text.contains(CANARY), "the password was printed: {text}");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            text,
        )
    }

    fn worker(&self, name: &str) -> Worker {
        self.worker_with(name, &[])
    }

    fn worker_with(&self, name: &str, env: &[(&str, &str)]) -> Worker {
        self.process("worker", name, env)
    }

    fn coordinator(&self, name: &str) -> Worker {
        self.process("coordinator", name, &[])
    }

    /// `command` (worker or coordinator) in a container of `image` (Podman, the host's
    /// network, the rig's directory mounted read-only at its own path).
    fn container(&self, image: &str, command: &str, name: &str) -> Worker {
        let log = self.dir.join(format!("{name}.log"));
        let dir = self.dir.display().to_string();
        Worker(
            Command::new("podman")
                .args(["run", "--rm", "--network", "host", "--name"])
                .arg(format!("{}-{name}", self.prefix))
                .args(["--env", "MAILFERRY_SEALING_KEYS", "--volume"])
                .arg(format!("{dir}:{dir}:ro"))
                .arg(image)
                .args(["-v", command, "--config"])
                .arg(&self.config)
                .env("MAILFERRY_SEALING_KEYS", self.keys.expose())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .expect("podman run"),
        )
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn process(&self, command: &str, name: &str, env: &[(&str, &str)]) -> Worker {
        let log = self.dir.join(format!("{name}.log"));
        Worker(mailferry_tests::run::spawn_process(
            command,
            &self.config,
            self.keys.expose(),
            &log,
            env,
        ))
    }

    /// `batch status` as (user, status, the whole line) per user.
    fn statuses(&self) -> Vec<(String, String, String)> {
        let (code, stdout, text) = self.admin(&["status", "--batch", "b1"]);
        assert_eq!(code, Some(0), "{text}");
        stdout
            .lines()
            .filter_map(|l| {
                let mut cols = l.split('\t');
                let user = cols.next()?.to_string();
                let status = cols.next()?.split(' ').next()?.to_string();
                Some((user, status, l.to_string()))
            })
            .collect()
    }

    /// Polls `batch status` until `done` holds for it; returns its output.
    async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[(String, String, String)]) -> bool,
    ) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.statuses();
            if done(&now) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not in time:\n{now:#?}\ncoordinator log:\n{}",
                self.log("coordinator")
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Polls `batch status` until every user is synced.
    async fn wait_synced(&self, within: Duration) -> String {
        let lines = self
            .wait_until("every user synced", within, |lines| {
                lines.len() == self.users.len() && lines.iter().all(|l| l.1 == "synced")
            })
            .await;
        lines.iter().map(|l| format!("{}\n", l.2)).collect()
    }

    /// The status of the user with IMAP login `login`.
    fn status_of(lines: &[(String, String, String)], login: &str) -> String {
        lines
            .iter()
            .find(|l| l.0 == format!("{login}@example.com"))
            .map(|l| l.1.clone())
            .unwrap_or_default()
    }

    async fn store(&self) -> RedisStore {
        RedisStore::connect(&Secret::new(&self.redis_url), &self.prefix)
            .await
            .unwrap()
    }

    /// Every message of the rig's users at the target, all folders together.
    async fn at_target(&self) -> u32 {
        let mut n = 0;
        for (login, password, _) in &self.users {
            n += mail::message_count(self.dst.port, login, password).await;
        }
        n
    }

    /// Every message of the rig's users at the source.
    fn total(&self) -> u32 {
        self.users.iter().map(|u| u.2.len() as u32).sum()
    }

    async fn assert_target_equals_source(&self) {
        for (login, password, messages) in &self.users {
            let pair = Pair::dovecots(&self.src, &self.dst, login, password);
            mail::assert_same_mail(&pair, messages, |p| p.to_string()).await;
        }
    }

    /// The canary password is in no Redis value and no worker log.
    async fn assert_no_password_at_rest(&self) {
        mailferry_tests::redis::assert_absent(&self.redis_url, &self.prefix, CANARY).await;
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    !text.contains(CANARY),
                    "{} shows the password",
                    path.display()
                );
            }
        }
    }

    async fn clean_up(&self) {
        // The rig's processes first: a worker whose queue is deleted reconnects and
        // declares it again.
        mailferry_tests::run::stop_processes_of(&self.config);
        mailferry_tests::run::remove_traces(&self.redis_url, &self.prefix).await;
        self.cleaned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn stop(worker: &mut Worker) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.0.id().to_string())
        .status();
    worker.0.wait().unwrap()
}

/// The image `tests/image/build.sh` built (`$MAILFERRY_IMAGE`, set by the suite's
/// script): a coordinator and a worker in containers, as the chart runs them, against
/// the machine's RabbitMQ and Redis, migrate the rig's users; SIGTERM stops both
/// cleanly. (Run by hand without the image, it says so and checks nothing; in CI a
/// missing image fails it.)
#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_a_coordinator_and_a_worker_that_migrate_the_users() {
    let Some(image) = std::env::var("MAILFERRY_IMAGE")
        .ok()
        .filter(|i| !i.is_empty())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "MAILFERRY_IMAGE is not set: tests/run-all.sh builds the image first"
        );
        eprintln!("not run: MAILFERRY_IMAGE is not set (bash tests/image/build.sh builds it)");
        return;
    };
    let rig = Rig::new(4).await;
    let mut coordinator = rig.container(&image, "coordinator", "c-coordinator");
    let mut worker = rig.container(&image, "worker", "c-worker");
    rig.start();
    rig.wait_synced(Duration::from_secs(180)).await;
    for (p, name) in [
        (&mut worker, "c-worker"),
        (&mut coordinator, "c-coordinator"),
    ] {
        assert!(
            stop(p).success(),
            "{name} did not stop cleanly:\n{}",
            rig.log(name)
        );
    }
    assert!(
        rig.log("c-worker").contains("worker"),
        "{}",
        rig.log("c-worker")
    );
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_migrate_a_batch_from_rabbitmq_and_redis() {
    let rig = Rig::new(12).await;
    let before = rig.statuses();
    assert!(before.iter().all(|l| l.1 == "notstarted"), "{before:?}");
    let mut coordinator = rig.coordinator("coordinator");
    let mut workers = [rig.worker("worker1"), rig.worker("worker2")];
    let (code, stdout, text) = rig.admin(&["start", "--batch", "b1"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(stdout.contains("alice@example.com: started"), "{text}");

    let status = rig.wait_synced(Duration::from_secs(90)).await;
    let alice = rig.users[0].2.len();
    assert!(
        status.contains(&format!(
            "alice@example.com\tsynced\tat target {alice} of {alice}\tcopied {alice}\t"
        )),
        "{status}"
    );
    // The same as JSON, in the API's shapes, for scripts.
    let (code, json, text) = rig.admin(&["status", "--batch", "b1", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let json: serde_json::Value = serde_json::from_str(&json).expect(&json);
    let total = rig.total();
    assert_eq!(json["summary"]["messages"]["at_target"], total, "{json}");
    assert_eq!(json["users"][0]["id"], "alice@example.com", "{json}");
    assert_eq!(json["users"][0]["status"], "synced", "{json}");
    assert_eq!(json["users"][0]["copied"], alice, "{json}");
    rig.assert_target_equals_source().await;
    // 12 messages a folder: a user's folders travel in bundles (one message, one login).
    let logs = format!("{}{}", rig.log("worker1"), rig.log("worker2"));
    assert!(
        logs.contains("running a bundle of small folders"),
        "no bundle ran:\n{logs}"
    );

    // SIGTERM: each worker stops taking jobs and exits cleanly; so does the
    // coordinator, releasing its lease.
    for w in &mut workers {
        let status = stop(w);
        assert!(status.success(), "worker exit: {status:?}");
    }
    assert!(stop(&mut coordinator).success());
    assert_eq!(rig.store().await.leader().await.unwrap(), None);
    rig.assert_no_password_at_rest().await;
    rig.clean_up().await;
}

/// A worker dies abruptly in the middle of a folder (the engine's failpoint aborts the
/// process right after its 5th APPEND completes, before the checkpoint: no cleanup, no
/// acks, as with SIGKILL). RabbitMQ hands its unacked jobs to the other workers, whose
/// engines resolve the dead worker's in-flight window. Nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_folder_loses_and_duplicates_nothing() {
    let rig = Rig::new(60).await;
    let _coordinator = rig.coordinator("coordinator");
    let mut doomed = rig.worker_with("doomed", &[("MAILFERRY_FAILPOINT", "after-append:5")]);
    rig.start();
    let status = tokio::task::spawn_blocking(move || doomed.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        None,
        "the worker should have died by its failpoint: {status:?}"
    );
    let (_, before, _) = rig.admin(&["status", "--batch", "b1"]);
    assert!(
        !before.lines().all(|l| l.contains("\tsynced\t")),
        "nothing left to take over:\n{before}"
    );

    let mut survivors = [rig.worker("survivor1"), rig.worker("survivor2")];
    rig.wait_synced(Duration::from_secs(120)).await;
    rig.assert_target_equals_source().await;
    // The status counts what is at the target, the dead worker's appends too (issue
    // 19, finding 12: it said only what surviving runs reported copying).
    let (_, after, _) = rig.admin(&["status", "--batch", "b1"]);
    let mut total = 0;
    for (login, _, messages) in &rig.users {
        let n = messages.len();
        total += n;
        let line = after
            .lines()
            .find(|l| l.starts_with(&format!("{login}@")))
            .unwrap();
        assert!(
            line.contains(&format!("\tat target {n} of {n}\t")),
            "{after}"
        );
    }
    assert!(
        after.contains(&format!("messages at target {total} of {total};")),
        "{after}"
    );
    for w in &mut survivors {
        assert!(stop(w).success());
    }
    rig.clean_up().await;
}

/// RabbitMQ closes a worker's connection (`rabbitmqctl close_connection`, which touches
/// that one connection only): the worker reconnects by itself and then does the work.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_reconnects_when_the_broker_drops_its_connection() {
    let rig = Rig::new(4).await;
    let _coordinator = rig.coordinator("coordinator");
    let mut worker = rig.worker("reconnecting");
    let name = format!("mailferry-{}-{}", rig.prefix, worker.0.id());
    let rabbitmqctl = |args: &[&str]| {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl (from rabbitmq-server) is needed for this test");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let find = || {
        rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"])
            .lines()
            .find(|l| l.contains(&name))
            .and_then(|l| l.split('\t').next())
            .map(str::to_string)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = find() {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's connection {name} never showed up"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    rabbitmqctl(&[
        "close_connection",
        &pid,
        "test: dropping the worker's connection",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while find().as_deref() == Some(pid.as_str()) {
        assert!(Instant::now() < deadline, "the connection was not closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker exited instead of reconnecting"
    );

    rig.start();
    rig.wait_synced(Duration::from_secs(60)).await;
    rig.assert_target_equals_source().await;
    let log = std::fs::read_to_string(rig.dir.join("reconnecting.log")).unwrap();
    assert!(
        log.contains("lost the RabbitMQ connection; reconnecting"),
        "{log}"
    );
    assert!(stop(&mut worker).success());
    rig.clean_up().await;
}

/// `copied N` of a `batch status` line.
fn copied(line: &str) -> u64 {
    line.split('\t')
        .find_map(|c| c.strip_prefix("copied "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `pass N` of a `batch status` line.
fn pass(line: &str) -> u64 {
    line.split('\t')
        .find_map(|c| c.strip_prefix("pass "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn line_of<'a>(lines: &'a [(String, String, String)], login: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.0 == format!("{login}@example.com"))
        .map(|l| l.2.as_str())
        .unwrap_or("")
}

/// A synced user is synced again: at once on "sync now", and by itself once the batch's
/// interval has passed. Each new pass copies only the new mail and the flag changes.
#[tokio::test(flavor = "multi_thread")]
async fn synced_users_are_synced_again_on_sync_now_and_on_the_schedule() {
    let mut rig = Rig::new(4).await;
    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker");
    rig.start();
    let first = rig.wait_synced(Duration::from_secs(60)).await;
    let alice_before = copied(&first);
    assert_eq!(alice_before, rig.users[0].2.len() as u64, "{first}");

    // New mail and flag changes at alice's source; "sync now" brings them over.
    let (login, password) = (rig.users[0].0.clone(), rig.users[0].1.clone());
    let newer = mail::change_at_source(rig.src.port, &login, &password, "INBOX").await;
    rig.users[0].2.push(newer);
    let (code, stdout, text) =
        rig.admin(&["sync-now", "--batch", "b1", "--user", "alice@example.com"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        stdout.contains("alice@example.com: to sync now"),
        "{stdout}"
    );
    let lines = rig
        .wait_until("alice's second pass", Duration::from_secs(60), |l| {
            pass(line_of(l, "alice")) == 2 && Rig::status_of(l, "alice") == "synced"
        })
        .await;
    assert_eq!(
        copied(line_of(&lines, "alice")),
        alice_before + 1,
        "{lines:?}"
    );
    assert_eq!(
        pass(line_of(&lines, "bob")),
        1,
        "bob was not asked: {lines:?}"
    );
    rig.assert_target_equals_source().await;

    // On the schedule: bob's new mail arrives by itself once the interval passes.
    let (code, _, text) = rig.admin(&["set-interval", "--batch", "b1", "--every", "5s"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, _, text) = rig.admin(&["set-interval", "--batch", "b1", "--every", "2s"]);
    assert_eq!(code, Some(1), "too short an interval is refused: {text}");
    assert!(text.contains("at least 5 seconds"), "{text}");
    let (login, password) = (rig.users[1].0.clone(), rig.users[1].1.clone());
    let newer = mail::change_at_source(rig.src.port, &login, &password, "Sent").await;
    rig.users[1].2.push(newer);
    let bob_before = rig.users[1].2.len() as u64 - 1;
    // (bob's next pass was scheduled 24 h out by the default; the new interval applies
    // from his next pass, so one "sync now" moves him onto it)
    rig.admin(&["sync-now", "--batch", "b1", "--user", "bob@example.com"]);
    let lines = rig
        .wait_until(
            "bob synced again by the schedule",
            Duration::from_secs(60),
            |l| pass(line_of(l, "bob")) >= 3 && Rig::status_of(l, "bob") == "synced",
        )
        .await;
    assert_eq!(copied(line_of(&lines, "bob")), bob_before + 1, "{lines:?}");
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// Stop halts the user's jobs in progress within a claim renewal while the other user
/// goes on; starting again finishes the copy exactly. Close runs a final pass, then
/// deletes the stored credentials and ends the schedule.
#[tokio::test(flavor = "multi_thread")]
async fn stop_halts_jobs_in_progress_and_close_deletes_the_credentials() {
    // Claims renewed every second, and a source slowed to 40 kB/s: a folder job takes
    // longer than a renewal, so the stop reaches jobs while they copy.
    let settings = short_claims();
    let rig = Rig::slow(10, &format!("{settings}max_jobs_per_user = 1\n"), 40_000).await;
    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker");
    let store = rig.store().await;
    rig.start();
    // Copying, not only claimed: started together, the two small users share a
    // delivery, whose users all show syncing from its claim while they copy (at once,
    // each in a job slot).
    rig.wait_until("alice copying", Duration::from_secs(60), |l| {
        Rig::status_of(l, "alice") == "syncing" && copied(line_of(l, "alice")) > 0
    })
    .await;
    let (code, _, text) = rig.admin(&["stop", "--batch", "b1", "--user", "alice@example.com"]);
    assert_eq!(code, Some(0), "{text}");
    let stopped_at = Instant::now();
    // Within a renewal (a third of claim_secs = 3) and a little: nothing of alice's runs.
    loop {
        let jobs = store.job_states("b1", "alice@example.com").await.unwrap();
        let running = jobs.iter().filter(|(_, s)| *s == JobState::Running).count();
        if running == 0 {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(5),
            "alice still has {running} jobs running after the stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = rig
        .wait_until("bob synced, alice stopped", Duration::from_secs(90), |l| {
            Rig::status_of(l, "bob") == "synced" && Rig::status_of(l, "alice") == "stopped"
        })
        .await;
    let alice_partial = copied(line_of(&lines, "alice"));
    assert!(
        alice_partial < rig.users[0].2.len() as u64,
        "the stop came too late to test anything: {lines:?}"
    );
    let log = rig.log("worker");
    assert!(
        log.contains("stopped by the admin"),
        "no job was halted mid-copy:\n{log}"
    );

    // Started again, alice's copy completes exactly: nothing lost, nothing twice.
    let (code, _, text) = rig.admin(&["start", "--batch", "b1", "--user", "alice@example.com"]);
    assert_eq!(code, Some(0), "{text}");
    rig.wait_synced(Duration::from_secs(90)).await;
    rig.assert_target_equals_source().await;

    // Close bob: a final pass, then Completed, credentials gone, off the schedule.
    let (code, _, text) = rig.admin(&["close", "--batch", "b1", "--user", "bob@example.com"]);
    assert_eq!(code, Some(0), "{text}");
    rig.wait_until("bob completed", Duration::from_secs(60), |l| {
        Rig::status_of(l, "bob") == "completed"
    })
    .await;
    assert_eq!(store.user("b1", "bob@example.com").await.unwrap(), None);
    assert!(store
        .user("b1", "alice@example.com")
        .await
        .unwrap()
        .is_some());
    assert!(!store
        .due_times("b1")
        .await
        .unwrap()
        .contains_key("bob@example.com"));
    let record = store.pass_record("b1", "bob@example.com").await.unwrap();
    let passes: Vec<String> = rig
        .log("coordinator")
        .lines()
        .filter(|l| l.contains("bob@example.com") && l.contains("pass "))
        .map(str::to_string)
        .collect();
    assert!(
        record.final_pass && record.pass == 2,
        "{record:?}\n{passes:#?}"
    );
    let (code, stdout, _) = rig.admin(&["sync-now", "--batch", "b1", "--user", "bob@example.com"]);
    assert_eq!(code, Some(2), "{stdout}");
    assert!(stdout.contains("closed already"), "{stdout}");
    rig.clean_up().await;
}

/// Fairness proper: while both users migrate with one bundle in flight each, sampled
/// job states never show a user with two.
#[tokio::test(flavor = "multi_thread")]
async fn each_user_has_at_most_its_limit_of_jobs_in_flight() {
    let rig = Rig::with(10, &format!("{FAST}{NO_BUNDLES}max_jobs_per_user = 1\n")).await;
    let _coordinator = rig.coordinator("coordinator");
    let _workers = [rig.worker("worker1"), rig.worker("worker2")];
    let store = rig.store().await;
    rig.start();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut samples = 0;
    let mut busiest = 0;
    loop {
        let mut all_done = true;
        for user in ["alice@example.com", "bob@example.com"] {
            let jobs = store.job_states("b1", user).await.unwrap();
            let with_specs = store.with_specs("b1", user, &jobs).await.unwrap();
            // A bundle of small folders (one queue message) counts once.
            let in_flight = bundles_in_flight(&with_specs);
            assert!(
                in_flight <= 1,
                "{user} has {in_flight} bundles in flight: {jobs:?}"
            );
            busiest = busiest.max(in_flight);
            all_done &= !jobs.is_empty() && jobs.iter().all(|(_, s)| !s.is_open());
        }
        samples += 1;
        if all_done {
            break;
        }
        assert!(Instant::now() < deadline, "not done in time");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        samples > 10 && busiest == 1,
        "{samples} samples, busiest {busiest}"
    );
    rig.wait_synced(Duration::from_secs(30)).await;
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// Two coordinators: one leads, the other stands by. The leader is killed (SIGKILL, no
/// cleanup) in the middle of the batch; the standby takes over once the lease lapses,
/// dispatches the waiting jobs and ends the passes. Nobody schedules twice: every user
/// is on its first pass, and the target equals the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_coordinator_takes_over_when_the_leader_dies() {
    let rig = Rig::with(30, &format!("{FAST}max_job_messages = 200\n")).await;
    let (first_ops, standby_ops) = (
        mailferry_tests::dovecot::free_port(),
        mailferry_tests::dovecot::free_port(),
    );
    let listen = |port: u16| format!("127.0.0.1:{port}");
    let mut first = rig.process(
        "coordinator",
        "coordinator",
        &[("MAILFERRY__OPS__LISTEN", &listen(first_ops))],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rig.log("coordinator").contains("leading") {
        assert!(Instant::now() < deadline, "the first coordinator never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _second = rig.process(
        "coordinator",
        "standby",
        &[("MAILFERRY__OPS__LISTEN", &listen(standby_ops))],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rig.log("standby").contains("standing by") {
        assert!(
            Instant::now() < deadline,
            "the second coordinator did not stand by"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _workers = [rig.worker("worker1"), rig.worker("worker2")];
    rig.start();
    rig.wait_until("syncing", Duration::from_secs(60), |l| {
        l.iter().any(|l| l.1 == "syncing")
    })
    .await;
    // The batch's gauges come from the leader alone: a sum over the pods counts each
    // user once.
    let users = |port: u16, status: &str| {
        let (_, scrape) = http_get(port, "/metrics").unwrap_or_default();
        sample(
            &scrape,
            &format!("mailferry_users{{batch=\"b1\",status=\"{status}\"}}"),
        )
    };
    wait_for("the leader's batch gauges", Duration::from_secs(30), || {
        users(first_ops, "syncing").is_some()
    });
    assert_eq!(
        users(standby_ops, "syncing"),
        None,
        "the standby exports users too"
    );
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let lines = rig.wait_synced(Duration::from_secs(120)).await;
    wait_for(
        "the new leader's batch gauges",
        Duration::from_secs(30),
        || users(standby_ops, "synced") == Some(2.0),
    );
    assert!(
        rig.log("standby").contains("leading"),
        "{}",
        rig.log("standby")
    );
    for line in lines.lines() {
        assert_eq!(pass(line), 1, "scheduled twice: {lines}");
    }
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// SIGTERM with jobs in progress: the worker takes no new job, gives its jobs
/// `shutdown_grace_secs` to finish, then hands them back and exits, well within a pod's
/// grace period. Another worker finishes the batch, nothing lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_worker_hands_its_jobs_back_after_the_grace_period() {
    let settings = FAST.replace("claim_secs = 6", "claim_secs = 3\nshutdown_grace_secs = 1");
    let rig = Rig::slow(10, &settings, 40_000).await;
    let _coordinator = rig.coordinator("coordinator");
    let mut leaving = rig.worker("leaving");
    rig.start();
    rig.wait_until("syncing", Duration::from_secs(60), |l| {
        l.iter().any(|l| l.1 == "syncing")
    })
    .await;
    let asked = Instant::now();
    let status = stop(&mut leaving);
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(6), "took {took:?} to stop");
    let log = rig.log("leaving");
    assert!(log.contains("handing the job back unfinished"), "{log}");
    let _finisher = rig.worker("finisher");
    rig.wait_synced(Duration::from_secs(120)).await;
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

fn signal(worker: &Worker, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(worker.0.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Redis (the rig's own, persistent) is killed mid-run and comes back 2 s later: the
/// coordinator and the workers reconnect, jobs whose claims could not be renewed are
/// handed back, and the batch ends synced with the target equal to the source.
#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_mid_run_loses_and_duplicates_nothing() {
    let settings = short_claims();
    let mut rig = Rig::build(Setup {
        per_folder: 10,
        settings: &settings,
        slow: Some(60_000),
        own_redis: Some(true),
        ..Setup::default()
    })
    .await;
    let _coordinator = rig.coordinator("coordinator");
    let _workers = [rig.worker("worker1"), rig.worker("worker2")];
    rig.start();
    rig.wait_until("syncing", Duration::from_secs(60), |l| {
        l.iter().any(|l| l.1 == "syncing")
    })
    .await;
    let redis = rig.own_redis.as_mut().unwrap();
    tokio::task::block_in_place(|| redis.restart(Duration::from_secs(2)));
    rig.wait_synced(Duration::from_secs(180)).await;
    rig.assert_target_equals_source().await;
    let logs = format!("{}{}", rig.log("worker1"), rig.log("worker2"));
    assert!(
        logs.contains("stopped writing") || logs.contains("state store"),
        "the restart went unnoticed: it did not test anything"
    );
    rig.clean_up().await;
}

/// Redis is wiped mid-run (FLUSHALL): the batch, its credentials, the schedule and every
/// checkpoint are gone. Workers drop the jobs they can no longer account for; the admin
/// creates the batch again and starts it; the folders are reconciled against the
/// target. Losing Redis costs a rescan, never a duplicate or a lost message.
#[tokio::test(flavor = "multi_thread")]
async fn redis_wiped_mid_run_ends_in_reconciliation_without_duplicates() {
    let settings = short_claims();
    let rig = Rig::build(Setup {
        per_folder: 10,
        settings: &settings,
        slow: Some(60_000),
        own_redis: Some(false),
        ..Setup::default()
    })
    .await;
    let _coordinator = rig.coordinator("coordinator");
    let _workers = [rig.worker("worker1"), rig.worker("worker2")];
    rig.start();
    rig.wait_until("some mail copied", Duration::from_secs(60), |l| {
        l.iter().any(|l| copied(&l.2) > 20)
    })
    .await;
    rig.own_redis.as_ref().unwrap().wipe();
    let (code, _, text) = rig.admin(&["status", "--batch", "b1"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no batch named"), "{text}");
    // Let the workers notice (a claim renewal) before the batch is back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.create_batch();
    rig.start();
    rig.wait_synced(Duration::from_secs(180)).await;
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// Workers are killed with SIGKILL again and again in the middle of the copy (the
/// source slowed so that kills land mid-folder); a last worker finishes. Each kill waits
/// until the target has grown since the last one, and the target must still be partial
/// before the finisher starts, or the test fails: a kill before or after the copy
/// proves nothing. Nothing is lost or doubled, and the status counts what the killed
/// workers appended.
#[tokio::test(flavor = "multi_thread")]
async fn workers_killed_again_and_again_lose_and_duplicate_nothing() {
    let settings = short_claims();
    let rig = Rig::slow(10, &settings, 60_000).await;
    let total = rig.total();
    let _coordinator = rig.coordinator("coordinator");
    rig.start();
    let mut seen = vec![0];
    for round in 0..5 {
        let mut victim = rig.worker(&format!("victim{round}"));
        let last = *seen.last().unwrap();
        let grown = Instant::now() + Duration::from_secs(60);
        while rig.at_target().await <= last {
            assert!(
                Instant::now() < grown,
                "kill {round}: the target did not grow in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(..600))).await;
        victim.0.kill().unwrap();
        victim.0.wait().unwrap();
        let now = rig.at_target().await;
        assert!(
            now < total,
            "kill {round}: the copy was over ({now} of {total}): nothing tested"
        );
        seen.push(now);
    }
    eprintln!("at the target after each kill: {seen:?} of {total}");
    let _finisher = rig.worker("finisher");
    rig.wait_synced(Duration::from_secs(180)).await;
    rig.assert_target_equals_source().await;
    let (_, after, _) = rig.admin(&["status", "--batch", "b1"]);
    assert!(
        after.contains(&format!("messages at target {total} of {total};")),
        "{after}"
    );
    rig.clean_up().await;
}

/// A worker frozen with SIGSTOP in the middle of writing an APPEND group (the target
/// takes uploads slowly, and the freeze waits until bytes are flowing to it), for
/// longer than its claims; another worker takes the folders over; then the frozen one
/// is resumed. What was already in the sockets reaches the target during the freeze;
/// what the frozen worker would write after waking is cut off by its fence. The
/// target equals the source: nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_while_writing_an_append_group_does_no_harm() {
    let settings = format!(
        "amqp_url = \"amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=2\"\n{}",
        short_claims()
    );
    let rig = Rig::build(Setup {
        per_folder: 10,
        settings: &settings,
        slow_target: Some(40_000),
        ..Setup::default()
    })
    .await;
    let total = rig.total();
    let uploaded = rig.slow_target.as_ref().unwrap().uploaded.clone();
    let _coordinator = rig.coordinator("coordinator");
    let frozen = rig.worker("frozen");
    rig.start();
    // Bytes flowing to the target for a while, and some messages there already: the
    // worker is writing APPENDs now.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no APPEND was ever being written"
        );
        let before = uploaded.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let flowing = uploaded.load(std::sync::atomic::Ordering::SeqCst) > before + 4_000;
        if flowing && rig.at_target().await > 0 {
            break;
        }
    }
    signal(&frozen, "STOP");
    let at_freeze = rig.at_target().await;
    assert!(at_freeze < total, "the copy was over before the freeze");
    take_over_then_wake(
        rig,
        &frozen,
        Duration::from_secs(10),
        Duration::from_secs(240),
    )
    .await;
}

/// The rest of a freeze test, `frozen` stopped already: another worker takes its
/// folders over while it stays frozen for `pause` (longer than its claims); then it is
/// woken. The batch must sync with the target equal to the source, and the frozen
/// worker's fences must have acted.
async fn take_over_then_wake(rig: Rig, frozen: &Worker, pause: Duration, within: Duration) {
    let _other = rig.worker("other");
    tokio::time::sleep(pause).await;
    signal(frozen, "CONT");
    rig.wait_synced(within).await;
    rig.assert_target_equals_source().await;
    let log = rig.log("frozen");
    assert!(
        log.contains("stopped writing") || log.contains("lapsed"),
        "the frozen worker's fences did not act:\n{log}"
    );
    rig.clean_up().await;
}

/// The same users in two batches started at once (an admin's second import of the same
/// CSV, say): both batches copy into the same target mailboxes. One run at a time may
/// write a target folder, whichever batch it belongs to, so nothing is doubled.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_users_in_two_batches_at_once_duplicate_nothing() {
    // A job per folder, so that the two batches' jobs of a folder meet on the workers
    // (that a claim of one batch holds against the other is proven in
    // redis_store::a_folder_claimed_in_one_batch_is_busy_in_another).
    // Each batch's pools keep their idle connections (and the account's connection
    // leases) a while: with two connections an account, one batch's idle ones starve
    // the other's jobs for half a minute at a time (slow, not wrong; see docs/design.md, Known limitations).
    let settings = FAST.replace("connections_per_account = 2", "connections_per_account = 8");
    let rig = Rig::with(20, &format!("{settings}{NO_BUNDLES}")).await;
    // "b2": b1 again, under another name.
    rig.create_batch_named("b2");
    let _coordinator = rig.coordinator("coordinator");
    let _workers = [rig.worker("w1"), rig.worker("w2"), rig.worker("w3")];
    for batch in ["b1", "b2"] {
        let (code, _, text) = rig.admin(&["start", "--batch", batch]);
        assert_eq!(code, Some(0), "{text}");
    }
    rig.wait_synced(Duration::from_secs(180)).await;
    let synced = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, status, _) = rig.admin(&["status", "--batch", "b2"]);
        if status.lines().filter(|l| l.contains("\tsynced\t")).count() == 2 {
            break;
        }
        assert!(Instant::now() < synced, "b2 did not sync:\n{status}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// A worker frozen with SIGSTOP for longer than its broker heartbeat and its claims
/// (RabbitMQ drops its connection; another worker takes the folders over), then
/// resumed: its fences are shut, so it writes nothing more to the folders it held; it
/// reconnects and works on. The target equals the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_beyond_its_heartbeat_and_claims_does_no_harm() {
    let settings = format!(
        "amqp_url = \"amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=2\"\n{}",
        short_claims()
    );
    let rig = Rig::slow(10, &settings, 60_000).await;
    let _coordinator = rig.coordinator("coordinator");
    let frozen = rig.worker("frozen");
    rig.start();
    rig.wait_until("syncing", Duration::from_secs(60), |l| {
        l.iter().any(|l| l.1 == "syncing")
    })
    .await;
    signal(&frozen, "STOP");
    take_over_then_wake(
        rig,
        &frozen,
        Duration::from_secs(9),
        Duration::from_secs(180),
    )
    .await;
}

/// Big folders are cut into UID-range jobs (here: more than 25 messages). The ranges of
/// a folder run one after another on whichever workers take them, and the copy is
/// exact; so is the next pass with new mail and flag changes; and so is a pass after
/// every checkpoint was lost (each range's job reconciles the whole folder).
#[tokio::test(flavor = "multi_thread")]
async fn big_folders_are_cut_into_uid_range_jobs() {
    let mut rig = Rig::with(60, &format!("{FAST}max_job_messages = 25\n")).await;
    let _coordinator = rig.coordinator("coordinator");
    let _workers = [rig.worker("worker1"), rig.worker("worker2")];
    let store = rig.store().await;
    rig.start();
    rig.wait_synced(Duration::from_secs(120)).await;
    let jobs = store.job_states("b1", "alice@example.com").await.unwrap();
    let inbox: Vec<&String> = jobs
        .iter()
        .map(|(id, _)| id)
        .filter(|id| id.contains(":INBOX:"))
        .collect();
    // 60 messages in ranges of 25: three jobs, the last one open-ended
    assert_eq!(inbox.len(), 3, "{inbox:?}");
    assert!(inbox.iter().any(|id| id.contains(":1-")), "{inbox:?}");
    assert!(
        inbox.iter().any(|id| id.ends_with("-4294967295:1")),
        "{inbox:?}"
    );
    rig.assert_target_equals_source().await;

    // New mail and flag changes: the second pass copies exactly them.
    let (login, password) = (rig.users[0].0.clone(), rig.users[0].1.clone());
    let newer = mail::change_at_source(rig.src.port, &login, &password, "INBOX").await;
    rig.users[0].2.push(newer);
    rig.admin(&["sync-now", "--batch", "b1"]);
    rig.wait_until("the second pass", Duration::from_secs(60), |l| {
        l.iter().all(|l| pass(&l.2) == 2 && l.1 == "synced")
    })
    .await;
    rig.assert_target_equals_source().await;

    // Every checkpoint lost: the third pass reconciles instead of copying again.
    let client = redis::Client::open(rig.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{}:cp:*", rig.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    rig.admin(&["sync-now", "--batch", "b1"]);
    let lines = rig
        .wait_until("the third pass", Duration::from_secs(90), |l| {
            l.iter().all(|l| pass(&l.2) == 3 && l.1 == "synced")
        })
        .await;
    rig.assert_target_equals_source().await;
    let alice = rig.users[0].2.len() as u64;
    assert_eq!(
        copied(line_of(&lines, "alice")),
        alice,
        "nothing copied twice: {lines:?}"
    );
    rig.clean_up().await;
}

/// A coordinator and two workers migrate the rig's batch, then (stopped first: their
/// idle connections hold the user's slots) the source's log shows it never had to
/// refuse a connection, and the target equals the source.
async fn migrate_without_a_refused_connection(rig: Rig) {
    let mut coordinator = rig.coordinator("coordinator");
    let mut workers = [rig.worker("worker1"), rig.worker("worker2")];
    rig.start();
    rig.wait_synced(Duration::from_secs(120)).await;
    for p in workers.iter_mut().chain([&mut coordinator]) {
        assert!(stop(p).success());
    }
    let refused = rig
        .src
        .log()
        .lines()
        .filter(|l| l.contains("Maximum number of connections"))
        .count();
    assert_eq!(
        refused,
        0,
        "the source refused connections:\n{}",
        rig.src.log()
    );
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// Connection caps hold across processes: the source allows each user two connections
/// (and refuses a third, as Gmail refuses a 16th); two workers with three job slots each
/// and the coordinator's planning share `connections_per_account = 2` through Redis, so
/// the source never has to refuse one, and the copy is exact.
#[tokio::test(flavor = "multi_thread")]
async fn connection_caps_hold_across_workers() {
    // FAST: job_slots = 3, connections_per_account = 2
    let rig = Rig::build(Setup {
        per_folder: 8,
        source_connections: Some(2),
        ..Setup::default()
    })
    .await;
    migrate_without_a_refused_connection(rig).await;
}

/// An endpoint's own cap, below the installation's: the source allows each user two
/// connections (as Gmail allows fifteen), the installation six, the batch's source
/// endpoint two (`--source-max-connections`, as the gmail preset says ten). Two workers
/// with three job slots each and folders that run one per job never make the source
/// refuse one.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoints_own_connection_cap_holds_below_the_installations() {
    let settings =
        FAST.replace("connections_per_account = 2", "connections_per_account = 6") + NO_BUNDLES;
    let rig = Rig::build(Setup {
        per_folder: 8,
        settings: &settings,
        source_connections: Some(2),
        source_max_connections: Some(2),
        ..Setup::default()
    })
    .await;
    migrate_without_a_refused_connection(rig).await;
}

/// A server that throttles: the source allows each user one connection, mailferry's cap
/// is two. The second connection is refused (`NO [LIMIT] Maximum number of
/// connections`): that account is paused for `throttle_pause_secs` across all processes,
/// the user shows "syncing (throttled: …)" meanwhile, never "failed", and the batch
/// ends exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttling_server_pauses_the_account_and_shows_throttled_not_failed() {
    let settings =
        FAST.replace("claim_secs = 6", "claim_secs = 6\nthrottle_pause_secs = 1") + NO_BUNDLES;
    let rig = Rig::build(Setup {
        per_folder: 6,
        settings: &settings,
        source_connections: Some(1),
        ..Setup::default()
    })
    .await;
    let mut coordinator = rig.coordinator("coordinator");
    let mut workers = [rig.worker("worker1"), rig.worker("worker2")];
    rig.start();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_throttled = false;
    loop {
        let lines = rig.statuses();
        seen_throttled |= lines.iter().any(|l| l.2.contains("throttled:"));
        assert!(
            lines.iter().all(|l| l.1 != "failed"),
            "throttling made a user fail: {lines:?}"
        );
        if lines.iter().all(|l| l.1 == "synced") {
            break;
        }
        assert!(Instant::now() < deadline, "not synced in time: {lines:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let logs = format!("{}{}", rig.log("worker1"), rig.log("worker2"));
    assert!(
        logs.contains("pausing it"),
        "no account was paused:\n{logs}"
    );
    assert!(seen_throttled, "no status ever showed the throttling");
    for p in workers.iter_mut().chain([&mut coordinator]) {
        assert!(stop(p).success());
    }
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// `GET path` on 127.0.0.1:`port`: (status code, body), or `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// The value of a series in a Prometheus scrape: `series` is the name with its labels as
/// rendered (e.g. `mailferry_users{batch="b1",status="synced"}`), or just the name.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The SRE's view, on a coordinator and a worker serving `ops.listen` and logging JSON:
/// liveness and readiness, then a migration, whose counts the metrics must tell exactly;
/// every exported series is one of the catalogue's and no label holds an address; job
/// log lines carry the job's span; and readiness turns to 503 while Redis is down.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_health_and_readiness_tell_what_happened() {
    let mut rig = Rig::build(Setup {
        per_folder: 10,
        settings: FAST,
        own_redis: Some(true),
        ..Setup::default()
    })
    .await;
    let (cport, wport) = (
        mailferry_tests::dovecot::free_port(),
        mailferry_tests::dovecot::free_port(),
    );
    let (clisten, wlisten) = (format!("127.0.0.1:{cport}"), format!("127.0.0.1:{wport}"));
    let json = ("MAILFERRY__OPS__LOG_FORMAT", "json");
    let _coordinator = rig.process(
        "coordinator",
        "coordinator",
        &[("MAILFERRY__OPS__LISTEN", &clisten), json],
    );
    let _worker = rig.worker_with("worker1", &[("MAILFERRY__OPS__LISTEN", &wlisten), json]);
    for port in [cport, wport] {
        wait_for("/healthz", Duration::from_secs(20), || {
            http_get(port, "/healthz").map(|r| r.0) == Some(200)
        });
        wait_for("/readyz", Duration::from_secs(30), || {
            http_get(port, "/readyz").map(|r| r.0) == Some(200)
        });
    }
    rig.start();
    rig.wait_synced(Duration::from_secs(90)).await;
    rig.assert_target_equals_source().await;

    let messages: usize = rig.users.iter().map(|u| u.2.len()).sum();
    let (_, worker) = http_get(wport, "/metrics").unwrap();
    assert_eq!(
        sample(&worker, "mailferry_messages_copied_total"),
        Some(messages as f64),
        "{worker}"
    );
    assert_eq!(sample(&worker, "mailferry_job_slots"), Some(3.0));
    // The process's own: memory, descriptors (its sockets among them), CPU used.
    let rss = sample(&worker, "process_resident_memory_bytes").unwrap_or(0.0);
    assert!(rss > 1e6 && rss < 1e9, "{worker}");
    assert!(
        sample(&worker, "process_open_fds").unwrap_or(0.0) > 5.0,
        "{worker}"
    );
    assert!(
        sample(&worker, "process_cpu_seconds_total").is_some(),
        "{worker}"
    );
    assert_eq!(sample(&worker, "mailferry_jobs_in_flight"), Some(0.0));
    // Every command timed, by command; the connections the worker holds counted.
    let appends = sample(
        &worker,
        r#"mailferry_imap_command_seconds_count{command="APPEND"}"#,
    )
    .unwrap_or(0.0);
    assert!(appends >= 1.0, "{worker}");
    assert!(
        sample(
            &worker,
            r#"mailferry_imap_command_seconds_bucket{command="UID FETCH",le="+Inf"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{worker}"
    );
    let open = sample(&worker, "mailferry_imap_connections").expect("the connection gauge");
    assert!((0.0..=8.0).contains(&open), "{open} connections: {worker}");
    let done = sample(&worker, r#"mailferry_jobs_finished_total{outcome="done"}"#).unwrap_or(0.0);
    let runs = sample(&worker, "mailferry_job_duration_seconds_count").unwrap_or(0.0);
    assert!(done >= 2.0 && runs >= done, "{worker}");
    assert_eq!(
        sample(&worker, "mailferry_message_size_bytes_count"),
        Some(messages as f64)
    );
    assert!(
        worker.contains(r#"mailferry_build_info{version=""#)
            && worker.contains(r#"process="worker""#)
    );
    // The coordinator exports what it sees every 10 s.
    let mut coordinator = String::new();
    wait_for(
        "the coordinator's users by status",
        Duration::from_secs(30),
        || {
            coordinator = http_get(cport, "/metrics").unwrap().1;
            sample(
                &coordinator,
                r#"mailferry_users{batch="b1",status="synced"}"#,
            ) == Some(2.0)
        },
    );
    assert_eq!(
        sample(&coordinator, "mailferry_coordinator_leader"),
        Some(1.0)
    );
    assert_eq!(
        sample(&coordinator, "mailferry_queue_ready_messages"),
        Some(0.0)
    );
    assert_eq!(
        sample(&coordinator, "mailferry_queue_dead_messages"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &coordinator,
            r#"mailferry_batch_pass_copied_messages{batch="b1"}"#
        ),
        Some(messages as f64)
    );
    for line in worker.lines().chain(coordinator.lines()) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            mailferry_shared::telemetry::family(name).is_some(),
            "{name} is not in the catalogue"
        );
        assert!(!line.contains('@'), "an address in a label: {line}");
    }
    // JSON logs, with the job's span (batch, user, folder) on the job's lines.
    let log = rig.log("worker1");
    let job_line = log
        .lines()
        .find(|l| l.contains(r#""name":"job""#))
        .unwrap_or_else(|| panic!("no job span in the logs:\n{log}"));
    assert!(
        job_line.starts_with('{') && job_line.contains(r#""batch":"b1""#),
        "{job_line}"
    );
    assert!(
        job_line.contains(r#""folder":"#) && job_line.contains(r#""user":"#),
        "{job_line}"
    );

    // Redis goes away for 6 s: both processes say not ready, naming it, then recover.
    let mut redis = rig.own_redis.take().unwrap();
    let outage = std::thread::spawn(move || {
        redis.restart(Duration::from_secs(6));
        redis
    });
    for port in [wport, cport] {
        wait_for(
            "/readyz 503 while Redis is down",
            Duration::from_secs(5),
            || http_get(port, "/readyz").is_some_and(|(c, b)| c == 503 && b.contains("redis")),
        );
        assert_eq!(
            http_get(port, "/healthz").map(|r| r.0),
            Some(200),
            "alive all the same"
        );
    }
    rig.own_redis = Some(outage.join().unwrap());
    for port in [wport, cport] {
        wait_for("/readyz 200 again", Duration::from_secs(20), || {
            http_get(port, "/readyz").map(|r| r.0) == Some(200)
        });
    }
    rig.clean_up().await;
}

/// A coordinator whose RabbitMQ is out of reach (here: a port nothing listens on) is
/// ready to serve — the API needs Redis alone, so a broker outage does not take the
/// console down — and `/readyz/all` says that planning waits for RabbitMQ.
#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_serves_without_rabbitmq_and_says_what_waits() {
    let rig = Rig::new(1).await;
    let port = mailferry_tests::dovecot::free_port();
    let listen = format!("127.0.0.1:{port}");
    let nowhere = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        mailferry_tests::dovecot::free_port()
    );
    let _coordinator = rig.process(
        "coordinator",
        "coordinator",
        &[
            ("MAILFERRY__OPS__LISTEN", &listen),
            ("MAILFERRY__AMQP_URL", &nowhere),
        ],
    );
    wait_for("/readyz", Duration::from_secs(30), || {
        http_get(port, "/readyz").map(|r| r.0) == Some(200)
    });
    let (status, body) = http_get(port, "/readyz/all").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("RabbitMQ unreachable"), "{body}");
    rig.clean_up().await;
}

/// The log level reaches the long-running processes: `RUST_LOG` (here) or
/// `ops.log_level` (the same filter) decides, over the tests' `-v`. A worker at `info`
/// says it is consuming; one at `warn` says nothing of the kind.
#[tokio::test(flavor = "multi_thread")]
async fn log_levels_reach_the_long_running_processes() {
    let rig = Rig::new(1).await;
    let _chatty = rig.worker_with("chatty", &[("RUST_LOG", "info")]);
    let _quiet = rig.worker_with("quiet", &[("RUST_LOG", "warn,mailferry_worker=error")]);
    wait_for(
        "the chatty worker's INFO line",
        Duration::from_secs(20),
        || rig.log("chatty").contains("worker consuming"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let quiet = rig.log("quiet");
    assert!(
        !quiet.contains("INFO") && !quiet.contains("DEBUG"),
        "the quiet worker logged below warn:\n{quiet}"
    );
    let chatty = rig.log("chatty");
    assert!(!chatty.contains("DEBUG"), "{chatty}");
    rig.clean_up().await;
}

/// Redis over TLS (managed Redis is TLS almost everywhere): `rediss://` through a
/// TLS-terminating proxy whose certificate a private CA signed. Without the CA the
/// connection is refused, naming the certificate; with `redis_ca_file` the admin's
/// commands, the coordinator and a worker all go through it and migrate the batch.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_runs_over_rediss_with_a_private_ca() {
    let dir = temp_dir("rediss");
    let ca = mailferry_tests::tls::TestCa::create(&dir);
    let proxy = mailferry_tests::tls_proxy::TlsProxy::start(&ca, 6379).await;
    let url = format!("rediss://localhost:{}/0", proxy.port);

    let refused = RedisStore::connect(&Secret::new(&url), "mft-untrusted")
        .await
        .expect_err("a certificate from an unknown CA must be refused");
    assert!(
        refused.to_string().to_lowercase().contains("certificate")
            || refused.to_string().contains("UnknownIssuer"),
        "{refused}"
    );
    let pem = std::fs::read(&ca.ca_cert).unwrap();
    let trusted = RedisStore::connect_with(&Secret::new(&url), Some(pem), "mft-trusted")
        .await
        .unwrap();
    trusted.ping().await.unwrap();

    let settings = format!("redis_ca_file = \"{}\"\n{FAST}", ca.ca_cert.display());
    let rig = Rig::build(Setup {
        per_folder: 5,
        settings: &settings,
        config_redis_url: Some(url),
        ..Setup::default()
    })
    .await;
    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker1");
    rig.start();
    rig.wait_synced(Duration::from_secs(90)).await;
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// Key rotation without losing stored credentials: the batch is sealed with k1; k2 is
/// added as the newest key and `batch reseal` seals every stored secret again with it;
/// then k1 is removed altogether, and the migration runs on k2 alone.
#[tokio::test(flavor = "multi_thread")]
async fn the_sealing_key_rotates_without_losing_stored_credentials() {
    let mut rig = Rig::new(5).await;
    let k1 = rig.keys.clone();
    let k2 = Keyring::generate("k2").unwrap();
    let stored = |rig: &Rig| {
        let store = rig.redis_url.clone();
        let prefix = rig.prefix.clone();
        async move {
            let client = redis::Client::open(store).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut sealed = Vec::new();
            for key in keys {
                let kind: String = redis::cmd("TYPE")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if kind == "string" {
                    let v: String = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    for part in v.split('"').filter(|p| p.starts_with("v2:")) {
                        sealed.push(part.to_string());
                    }
                }
            }
            sealed
        }
    };
    let before = stored(&rig).await;
    assert_eq!(before.len(), 4, "two users, two secrets each: {before:?}");
    assert!(before.iter().all(|s| s.starts_with("v2:k1:")));

    rig.keys = Secret::new(format!("{}\n{}", k1.expose(), k2.expose()));
    let (code, stdout, text) = rig.admin(&["reseal"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(stdout.contains("4 secrets sealed again"), "{stdout}");
    let after = stored(&rig).await;
    assert_eq!(after.len(), 4);
    assert!(after.iter().all(|s| s.starts_with("v2:k2:")), "{after:?}");
    // Running it again changes nothing.
    let (_, stdout, _) = rig.admin(&["reseal"]);
    assert!(
        stdout.starts_with("0 secrets sealed again") && stdout.contains("4 were already"),
        "{stdout}"
    );

    // The old key is gone for good: the migration runs on the new key alone.
    rig.keys = k2;
    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker1");
    rig.start();
    rig.wait_synced(Duration::from_secs(90)).await;
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}

/// A listener that greets like an IMAP server offering AUTH=PLAIN and LOGIN, refuses
/// every command, and keeps every byte it is sent.
fn password_trap() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = heard.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut out = conn.try_clone().unwrap();
                let _ = out.write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n");
                let mut lines = std::io::BufReader::new(conn);
                let mut line = Vec::new();
                while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    log.lock().unwrap().extend_from_slice(&line);
                    let tag = line.split(|&b| b == b' ').next().unwrap_or(b"*").to_vec();
                    let _ = out.write_all(&[&tag[..], b" NO no\r\n"].concat());
                    line.clear();
                }
            });
        }
    });
    (port, heard)
}

/// Whoever can write to Redis cannot send the users' passwords to a server of their
/// own (issue 19, finding 9): the batch's source server is changed in Redis, behind the
/// API's and the admin's back, to a listener that plays an IMAP server. The users fail,
/// saying why, and the listener never hears a login. (Before secrets were bound to
/// their server, the workers logged in to it with every user's password.)
#[tokio::test(flavor = "multi_thread")]
async fn a_server_changed_in_redis_never_receives_the_passwords() {
    let rig = Rig::new(5).await;
    let store = rig.store().await;
    let mut record = store.batch("b1").await.unwrap().unwrap();
    let (trap, heard) = password_trap();
    record.source.host = "127.0.0.1".into();
    record.source.port = trap;
    record.source.security = mailferry_shared::domain::endpoint::Security::Plain;
    store.put_batch("b1", &record).await.unwrap();

    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker1");
    rig.start();
    let lines = rig
        .wait_until("both users failed", Duration::from_secs(60), |l| {
            l.len() == 2 && l.iter().all(|l| l.1 == "failed")
        })
        .await;
    for (user, _, reason) in &lines {
        assert!(
            reason.contains("source") && reason.contains("does not open"),
            "{user}: {reason}"
        );
    }
    let heard = String::from_utf8_lossy(&heard.lock().unwrap()).to_ascii_uppercase();
    assert!(
        !heard.contains("LOGIN") && !heard.contains("AUTHENTICATE"),
        "the trap was sent a login: {heard}"
    );
    for (_, password, _) in &rig.users {
        assert!(!heard.contains(&password.to_ascii_uppercase()));
    }
    rig.clean_up().await;
}

/// Waits until alice is synced and bob failed; returns the status lines.
async fn alice_synced_bob_failed(rig: &Rig) -> Vec<(String, String, String)> {
    rig.wait_until(
        "alice synced, bob failed",
        Duration::from_secs(60),
        |lines| {
            let is = |user: &str, status: &str| lines.iter().any(|l| l.0 == user && l.1 == status);
            is("alice@example.com", "synced") && is("bob@example.com", "failed")
        },
    )
    .await
}

/// A wrong password: the user fails with the server's refusal named, the pass ends (it
/// is not left syncing), the other user migrates, and the password is in no output.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_fails_its_user_with_the_reason_and_nobody_else() {
    let mut rig = Rig::new(5).await;
    let bob = rig.users[1].clone();
    rig.users[1].1 = "not-bobs-password".into();
    rig.create_batch(); // stored again, with bob's wrong password
    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker1");
    rig.start();
    let lines = alice_synced_bob_failed(&rig).await;
    let bob_line = &lines.iter().find(|l| l.0 == "bob@example.com").unwrap().2;
    assert!(
        bob_line.contains("source") && bob_line.contains("authentication rejected"),
        "{bob_line}"
    );
    assert!(!bob_line.contains("not-bobs-password"), "{bob_line}");
    rig.users.truncate(1);
    rig.assert_target_equals_source().await;
    rig.users.push(bob);
    rig.clean_up().await;
}

/// The password changes after planning: the worker's first login for the user is
/// refused, and the rest of the user's bundle fails with that reason without logging in
/// again (one refusal at the server, not one per folder: repeated refusals can lock an
/// account). Every job of the user ends failed, so the pass ends and the user shows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_login_fails_the_whole_bundle_with_one_attempt() {
    let rig = Rig::new(5).await;
    let _coordinator = rig.coordinator("coordinator");
    rig.start();
    rig.wait_until("both users queued", Duration::from_secs(60), |l| {
        l.len() == 2 && l.iter().all(|l| l.1 == "queued")
    })
    .await;
    let store = rig.store().await;
    let jobs = store.job_states("b1", "bob@example.com").await.unwrap();
    assert!(jobs.len() >= 3, "bob's folders: {jobs:?}");
    // bob's source password changes.
    rig.src.change_password("bob", "changed");
    let refusals = || {
        rig.src
            .log()
            .lines()
            .filter(|l| l.contains("auth failed") && l.contains("user=<bob>"))
            .count()
    };
    assert_eq!(refusals(), 0);

    let _worker = rig.worker("worker1");
    let lines = alice_synced_bob_failed(&rig).await;
    let bob = &lines.iter().find(|l| l.0 == "bob@example.com").unwrap().2;
    assert!(bob.contains("authentication rejected"), "{bob}");
    let jobs = store.job_states("b1", "bob@example.com").await.unwrap();
    assert!(
        jobs.iter()
            .all(|(_, s)| matches!(s, JobState::Failed { .. })),
        "{jobs:?}"
    );
    assert_eq!(refusals(), 1, "{}", rig.src.log());
    rig.clean_up().await;
}

/// RabbitMQ over TLS: the coordinator and a worker reach the broker only through
/// `amqps://` (a TLS-terminating proxy in front of the machine's RabbitMQ, its
/// certificate from a private CA given as `amqp_ca_file`), and the migration runs.
/// Without the CA file the server's certificate is refused, naming the reason.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_runs_over_amqps_with_a_private_ca() {
    let dir = temp_dir("amqps");
    let ca = mailferry_tests::tls::TestCa::create(&dir);
    let proxy = mailferry_tests::tls_proxy::TlsProxy::start(&ca, 5672).await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.port);

    let refused = AmqpQueue::connect(&Secret::new(&url), "mft-untrusted", 5)
        .await
        .err()
        .expect("a certificate from an unknown CA must be refused");
    assert!(
        refused.to_string().to_lowercase().contains("certificate")
            || refused.to_string().contains("UnknownIssuer"),
        "{refused}"
    );

    let settings = format!(
        "amqp_url = \"{url}\"\namqp_ca_file = \"{}\"\n{FAST}",
        ca.ca_cert.display()
    );
    let rig = Rig::with(5, &settings).await;
    let _coordinator = rig.coordinator("coordinator");
    let _worker = rig.worker("worker1");
    rig.start();
    rig.wait_synced(Duration::from_secs(90)).await;
    rig.assert_target_equals_source().await;
    rig.clean_up().await;
}
