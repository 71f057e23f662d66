//! The cluster path end to end: folder jobs on the real RabbitMQ, sealed credentials and
//! checkpoints in the real Redis, two `mailferry worker` processes, a Dovecot pair.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailferry_shared::amqp_queue::AmqpQueue;
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::seal::Keyring;
use mailferry_shared::secret::Secret;
use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, corpus, Pair};

const CANARY: &str = "canary-5f0c9e1d-password";

/// A worker process that is killed if the test ends early.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(config: &std::path::Path, keys: &Secret, log: &std::path::Path) -> Child {
    Command::new(mailferry_tests::run::binary())
        .arg("worker")
        .arg("--config")
        .arg(config)
        .env("MAILFERRY_SEALING_KEYS", keys.expose())
        .env("RUST_LOG", "debug")
        .arg("-v")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting a worker")
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_migrate_a_batch_from_rabbitmq_and_redis() {
    let users = vec![
        ("alice".to_string(), CANARY.to_string()),
        ("bob".to_string(), "bob-secret".to_string()),
    ];
    let src = Dovecot::start(DovecotConfig {
        users: users.clone(),
        ..DovecotConfig::default()
    });
    let dst = Dovecot::start(DovecotConfig {
        users: users.clone(),
        ..DovecotConfig::default()
    });
    let alice = corpus(81, 12);
    let bob = corpus(82, 6);
    mail::load(src.port, "alice", CANARY, '/', &alice).await;
    mail::load(src.port, "bob", "bob-secret", '/', &bob).await;

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
    let keys = Keyring::generate("k1").unwrap();
    let store = RedisStore::connect(&Secret::new("redis://127.0.0.1:6379/0"), &prefix)
        .await
        .unwrap();
    let queue = AmqpQueue::connect(
        &Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
        &prefix,
        5,
    )
    .await
    .unwrap();
    let csv = dir.join("users.csv");
    std::fs::write(
        &csv,
        format!(
            "EmailAddress,UserName,Password,TargetUserName,TargetPassword\n\
             alice@example.com,alice,{CANARY},alice,{CANARY}\n\
             bob@example.com,bob,bob-secret,bob,bob-secret\n\
             broken,carol,x,carol,x\n"
        ),
    )
    .unwrap();
    let admin = |args: &[&str]| {
        let out = Command::new(mailferry_tests::run::binary())
            .arg("batch")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("MAILFERRY_SEALING_KEYS", keys.expose())
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
    };
    let src_addr = format!("127.0.0.1:{}", src.port);
    let dst_addr = format!("127.0.0.1:{}", dst.port);
    let (code, _, text) = admin(&[
        "create",
        "--batch",
        "b1",
        "--source",
        &src_addr,
        "--source-security",
        "plain",
        "--target",
        &dst_addr,
        "--target-security",
        "plain",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(7), "one bad row: {text}");
    assert!(text.contains("line 4"), "{text}");

    let logs = [dir.join("worker1.log"), dir.join("worker2.log")];
    let mut workers: Vec<Worker> = logs
        .iter()
        .map(|l| Worker(worker(&config, &keys, l)))
        .collect();

    let (code, stdout, text) = admin(&["start", "--batch", "b1"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        stdout.contains("alice@example.com: 12 folder jobs queued"),
        "{text}"
    );

    // Synced for both users, as `batch status` shows it.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, stdout, text) = admin(&["status", "--batch", "b1"]);
        assert_eq!(code, Some(0), "{text}");
        let synced = stdout
            .lines()
            .filter(|l| l.split('\t').nth(1) == Some("synced"))
            .count();
        if synced == 2 {
            assert!(
                stdout.contains(&format!(
                    "alice@example.com\tsynced\tcopied {}",
                    alice.len()
                )),
                "{stdout}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not synced after 90 s:\n{stdout}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    mail::assert_same_mail(&Pair::dovecots(&src, &dst, "alice", CANARY), &alice, |p| {
        p.to_string()
    })
    .await;
    mail::assert_same_mail(
        &Pair::dovecots(&src, &dst, "bob", "bob-secret"),
        &bob,
        |p| p.to_string(),
    )
    .await;

    // SIGTERM: each worker stops taking jobs and exits cleanly.
    for w in &mut workers {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(w.0.id().to_string())
            .status();
    }
    for w in &mut workers {
        let status = w.0.wait().unwrap();
        assert!(status.success(), "worker exit: {status:?}");
    }

    // The canary password is in no Redis value and no log line.
    let mut conn = redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys_in_redis: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys_in_redis.is_empty());
    for key in &keys_in_redis {
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
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.contains(CANARY),
            "{} shows the password",
            log.display()
        );
    }
    store.delete_all().await.unwrap();
    queue.delete_queues().await.unwrap();
}
