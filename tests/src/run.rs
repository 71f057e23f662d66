//! Running the real `mailferry` binary as a user would.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The `mailferry` binary of this build (`cargo build --bins` puts it beside the tests).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join("mailferry");
    assert!(
        bin.is_file(),
        "{} not found: build it first with `cargo build --bins` (the README's test command does)",
        bin.display()
    );
    bin
}

/// A `mailferry migrate` invocation between two plain-IMAP test servers.
pub struct Migrate {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Migrate {
    pub fn new(
        source_port: u16,
        target_port: u16,
        user: &str,
        state_dir: &std::path::Path,
    ) -> Self {
        Migrate {
            args: vec![
                "migrate".into(),
                "--source".into(),
                format!("127.0.0.1:{source_port}"),
                "--source-security".into(),
                "plain".into(),
                "--target".into(),
                format!("127.0.0.1:{target_port}"),
                "--target-security".into(),
                "plain".into(),
                "--source-user".into(),
                user.into(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--progress".into(),
                "lines".into(),
            ],
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<const N: usize>(mut self, args: [&str; N]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn passwords(mut self, source: &str, target: &str) -> Self {
        self.env
            .push(("MAILFERRY_SOURCE_PASSWORD".into(), source.into()));
        self.env
            .push(("MAILFERRY_TARGET_PASSWORD".into(), target.into()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(binary());
        c.args(&self.args)
            .env_remove("MAILFERRY_SOURCE_PASSWORD")
            .env_remove("MAILFERRY_TARGET_PASSWORD")
            .env_remove("MAILFERRY_FAILPOINT")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion (bounded by `timeout`), returning the output.
    pub fn run(&self) -> Output {
        let child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mailferry");
        let id = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(300)) {
            Ok(out) => out.expect("waiting for mailferry"),
            Err(_) => {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(id.to_string())
                    .status();
                let said = rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .ok()
                    .and_then(Result::ok)
                    .map(|out| text(&out))
                    .unwrap_or_default();
                panic!("mailferry did not finish within 300 s; it said:\n{said}");
            }
        }
    }
}

/// Output as text, for assertions.
pub fn text(out: &Output) -> String {
    format!(
        "exit: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Kills (SIGKILL) every process started with `config` on its command line: a rig's
/// coordinators and workers, before its queues and keys are deleted (a worker whose
/// queue is deleted would declare it again).
pub fn stop_processes_of(config: &std::path::Path) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", "--"])
        .arg(format!("--config {}", config.display()))
        .status();
    std::thread::sleep(std::time::Duration::from_millis(100));
}

/// Runs `mailferry batch --config CONFIG ARGS` (the operator's commands, on Redis) with
/// the sealing `keys`, no standard input.
pub fn operator(config: &std::path::Path, keys: &str, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("batch")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("MAILFERRY_SEALING_KEYS", keys)
        .stdin(Stdio::null())
        .output()
        .expect("running mailferry batch")
}

/// Starts `mailferry -v COMMAND --config CONFIG` (a coordinator or a worker) with the
/// sealing `keys` and `env`, its log in `log`; `stop_processes_of(config)` ends it.
pub fn spawn_process(
    command: &str,
    config: &std::path::Path,
    keys: &str,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    Command::new(binary())
        .arg("-v")
        .arg(command)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .env("MAILFERRY_SEALING_KEYS", keys)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("creating the process's log"))
        .spawn()
        .expect("starting a mailferry process")
}

/// Deletes what a rig left in Redis (`redis_url`) and RabbitMQ under `prefix`. Errors
/// are ignored: this is the clean-up of a test that may have failed half-way.
pub async fn remove_traces(redis_url: &str, prefix: &str) {
    use mailferry_shared::secret::Secret;
    let redis = Secret::new(redis_url);
    if let Ok(store) = mailferry_shared::redis::RedisStore::connect(&redis, prefix).await {
        let _ = store.delete_all().await;
    }
    let amqp = Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f");
    if let Ok(queue) = mailferry_shared::queue::amqp::AmqpQueue::connect(&amqp, prefix, 5).await {
        let _ = queue.delete_queues().await;
    }
}

/// [`remove_traces`] from a destructor (a rig dropped by a failing test): inside the
/// test's runtime no other can be started, so on a thread of its own, within a minute.
pub fn remove_traces_blocking(redis_url: &str, prefix: &str) {
    let (redis_url, prefix) = (redis_url.to_string(), prefix.to_string());
    let _ = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(async {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(60),
                    remove_traces(&redis_url, &prefix),
                )
                .await;
            });
        }
    })
    .join();
}
