//! The cluster path end to end: `mailferry batch` as the admin runs it, `mailferry
//! worker` processes, the machine's real RabbitMQ and Redis (unique prefixes), a Dovecot
//! pair.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailferry_shared::amqp_queue::AmqpQueue;
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::seal::Keyring;
use mailferry_shared::secret::Secret;
use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, corpus, Pair, TestMessage};

const CANARY: &str = "canary-5f0c9e1d-password";

/// A worker process, killed if the test ends early.
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
}

impl Rig {
    /// Two users (alice's password is the canary) with `per_folder` messages per folder,
    /// a batch "b1" created through `mailferry batch create`.
    async fn new(per_folder: usize) -> Rig {
        let logins = vec![
            ("alice".to_string(), CANARY.to_string()),
            ("bob".to_string(), "bob-secret".to_string()),
        ];
        let src = Dovecot::start(DovecotConfig {
            users: logins.clone(),
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
                "key_prefix = \"{prefix}\"\n[worker]\njob_slots = 3\nconnections_per_account = 2\n"
            ),
        )
        .unwrap();
        let rig = Rig {
            src,
            dst,
            dir,
            config,
            keys: Keyring::generate("k1").unwrap(),
            prefix,
            users,
        };
        let csv = rig.dir.join("users.csv");
        let mut rows =
            String::from("EmailAddress,UserName,Password,TargetUserName,TargetPassword\n");
        for (login, password, _) in &rig.users {
            rows.push_str(&format!(
                "{login}@example.com,{login},{password},{login},{password}\n"
            ));
        }
        rows.push_str("broken,carol,x,carol,x\n");
        std::fs::write(&csv, rows).unwrap();
        let (code, _, text) = rig.admin(&[
            "create",
            "--batch",
            "b1",
            "--source",
            &format!("127.0.0.1:{}", rig.src.port),
            "--source-security",
            "plain",
            "--target",
            &format!("127.0.0.1:{}", rig.dst.port),
            "--target-security",
            "plain",
            "--csv",
            csv.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(7), "one bad row: {text}");
        assert!(text.contains("line 4"), "{text}");
        rig
    }

    /// Runs `mailferry batch ARGS`; asserts the password shows nowhere in its output.
    fn admin(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(mailferry_tests::run::binary())
            .arg("batch")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("MAILFERRY_SEALING_KEYS", self.keys.expose())
            .stdin(Stdio::null())
            .output()
            .expect("running mailferry batch");
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
        let log = self.dir.join(format!("{name}.log"));
        Worker(
            Command::new(mailferry_tests::run::binary())
                .arg("-v")
                .arg("worker")
                .arg("--config")
                .arg(&self.config)
                .envs(env.iter().copied())
                .env("MAILFERRY_SEALING_KEYS", self.keys.expose())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .expect("starting a worker"),
        )
    }

    /// Polls `batch status` until every user is synced.
    async fn wait_synced(&self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (code, stdout, text) = self.admin(&["status", "--batch", "b1"]);
            assert_eq!(code, Some(0), "{text}");
            let synced = stdout
                .lines()
                .filter(|l| l.split('\t').nth(1) == Some("synced"))
                .count();
            if synced == self.users.len() {
                return stdout;
            }
            assert!(Instant::now() < deadline, "not synced in time:\n{stdout}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn assert_target_equals_source(&self) {
        for (login, password, messages) in &self.users {
            let pair = Pair::dovecots(&self.src, &self.dst, login, password);
            mail::assert_same_mail(&pair, messages, |p| p.to_string()).await;
        }
    }

    /// The canary password is in no Redis value and no worker log.
    async fn assert_no_password_at_rest(&self) {
        let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        for key in &keys {
            let dump: Vec<u8> = redis::cmd("DUMP")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&dump).contains(CANARY),
                "{key} holds the password"
            );
        }
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
        let redis = Secret::new("redis://127.0.0.1:6379/0");
        RedisStore::connect(&redis, &self.prefix)
            .await
            .unwrap()
            .delete_all()
            .await
            .unwrap();
        let amqp = Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f");
        AmqpQueue::connect(&amqp, &self.prefix, 5)
            .await
            .unwrap()
            .delete_queues()
            .await
            .unwrap();
    }
}

fn stop(worker: &mut Worker) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(worker.0.id().to_string())
        .status();
    worker.0.wait().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_migrate_a_batch_from_rabbitmq_and_redis() {
    let rig = Rig::new(12).await;
    let mut workers = [rig.worker("worker1"), rig.worker("worker2")];
    let (code, stdout, text) = rig.admin(&["start", "--batch", "b1"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        stdout.contains("alice@example.com: 12 folder jobs queued"),
        "{text}"
    );

    let status = rig.wait_synced(Duration::from_secs(90)).await;
    let alice = rig.users[0].2.len();
    assert!(
        status.contains(&format!("alice@example.com\tsynced\tcopied {alice}")),
        "{status}"
    );
    rig.assert_target_equals_source().await;

    // SIGTERM: each worker stops taking jobs and exits cleanly.
    for w in &mut workers {
        let status = stop(w);
        assert!(status.success(), "worker exit: {status:?}");
    }
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
    let mut doomed = rig.worker_with("doomed", &[("MAILFERRY_FAILPOINT", "after-append:5")]);
    let (code, _, text) = rig.admin(&["start", "--batch", "b1"]);
    assert_eq!(code, Some(0), "{text}");
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

    let (code, _, text) = rig.admin(&["start", "--batch", "b1"]);
    assert_eq!(code, Some(0), "{text}");
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
