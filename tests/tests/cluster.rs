//! The cluster path end to end: folder jobs on the real RabbitMQ, sealed credentials and
//! checkpoints in the real Redis, two `mailferry worker` processes, a Dovecot pair.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailferry_coordinator::planner::{plan_user, PlanRequest};
use mailferry_shared::amqp_queue::AmqpQueue;
use mailferry_shared::batch::{BatchRecord, UserRecord};
use mailferry_shared::endpoint::{AuthMethod, Credentials, Endpoint, Security};
use mailferry_shared::folders::Rules;
use mailferry_shared::imap::pool::Pool;
use mailferry_shared::imap::Limits;
use mailferry_shared::queue::JobQueue;
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
    let keyring = Keyring::parse(&keys).unwrap();
    let store = RedisStore::connect(&Secret::new("redis://127.0.0.1:6379/0"), &prefix)
        .await
        .unwrap();
    // Publishing only, as the coordinator does: this connection never takes a job.
    let queue = AmqpQueue::connect(
        &Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
        &prefix,
        5,
    )
    .await
    .unwrap();

    // The batch, as the coordinator will store it: endpoints, logins, sealed secrets.
    let endpoint = |port| Endpoint::new("127.0.0.1", port, Security::Plain);
    store
        .put_batch(
            "b1",
            &BatchRecord {
                source: endpoint(src.port),
                source_auth: AuthMethod::Password,
                target: endpoint(dst.port),
                target_auth: AuthMethod::Password,
            },
        )
        .await
        .unwrap();
    for (user, password) in &users {
        let sealed = keyring
            .seal(&Secret::new(password.clone()), "b1", user)
            .unwrap();
        let record = UserRecord {
            source_login: user.clone(),
            source_secret: sealed.clone(),
            target_login: user.clone(),
            target_secret: sealed,
        };
        store.put_user("b1", user, &record).await.unwrap();
    }

    let logs = [dir.join("worker1.log"), dir.join("worker2.log")];
    let mut workers: Vec<Worker> = logs
        .iter()
        .map(|l| Worker(worker(&config, &keys, l)))
        .collect();

    // Plan each user and publish its jobs, as the coordinator will.
    for (user, password) in &users {
        let creds = |login: &str| Credentials {
            login: login.to_string(),
            secret: Secret::new(password.clone()),
            method: AuthMethod::Password,
        };
        let source = Pool::new(endpoint(src.port), creds(user), Limits::default(), 2);
        let target = Pool::new(endpoint(dst.port), creds(user), Limits::default(), 2);
        let plan = plan_user(PlanRequest {
            batch: "b1",
            user,
            pass: 1,
            source: &source,
            target: &target,
            rules: &Rules::default(),
            store: Some(&store),
        })
        .await
        .unwrap();
        assert!(plan.jobs.len() > 5);
        for job in plan.jobs {
            queue.publish(job).await.unwrap();
        }
    }

    // Done when the workers have recorded every message of both users.
    let want = (alice.len() + bob.len()) as i64;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut copied = 0;
        for (user, _) in &users {
            copied += store
                .progress("b1", user)
                .await
                .unwrap()
                .get("copied")
                .copied()
                .unwrap_or(0);
        }
        if copied >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {copied} of {want} messages copied after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
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
