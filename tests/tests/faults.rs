//! Crash safety and dropped connections: whatever happens mid-run, a re-run leaves the
//! target equal to the source — nothing lost, nothing duplicated, no marker header.

use std::time::{Duration, Instant};

use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair, TestMessage};
use mailferry_tests::proxy::{Cut, CuttingProxy, Direction};
use mailferry_tests::run::{text, Migrate};

struct Setup {
    src: Dovecot,
    dst: Dovecot,
    messages: Vec<TestMessage>,
}

async fn setup(seed: u64, per_folder: usize) -> Setup {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig::default());
    let messages = corpus(seed, per_folder);
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    Setup { src, dst, messages }
}

impl Setup {
    fn migrate(&self, state: &std::path::Path) -> Migrate {
        Migrate::new(self.src.port, self.dst.port, "alice", state)
            .passwords("alice-secret", "alice-secret")
    }

    async fn assert_equal(&self) {
        let pair = Pair::dovecots(&self.src, &self.dst, "alice", "alice-secret");
        assert_same_mail(&pair, &self.messages, |p| p.to_string()).await;
    }
}

/// Aborts the engine at each named point, then re-runs: the copies above the last
/// checkpoint's bound are found and the target ends equal to the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_point_is_repaired_by_the_next_run() {
    for point in [
        "before-chunk:2",
        "mid-fetch:40",
        "after-append:2",
        "mid-checkpoint:3",
    ] {
        let s = setup(51, 25).await;
        let state = temp_dir("state");
        // small groups, so several APPENDs and windows are in flight when it dies
        let crash = s
            .migrate(&state)
            .arg("--jobs")
            .arg("3")
            .env("MAILFERRY_FAILPOINT", point)
            .run();
        assert_eq!(
            crash.status.code(),
            None,
            "{point}: the process should have aborted\n{}",
            text(&crash)
        );
        assert!(
            text(&crash).contains("failpoint"),
            "{point}: {}",
            text(&crash)
        );
        let out = s.migrate(&state).run();
        assert_eq!(out.status.code(), Some(0), "{point}: {}", text(&out));
        s.assert_equal().await;
        // and one more run finds nothing left to do
        let out = s.migrate(&state).run();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("copied 0 messages"),
            "{point}: {}",
            text(&out)
        );
    }
}

/// An incremental pass that dies after its APPENDs and before its checkpoint: the next
/// run finds those copies above the bound the first pass recorded (the checkpoint
/// exists, so nothing reconciles the whole folder) and copies nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_in_an_incremental_pass_duplicates_nothing() {
    let mut s = setup(54, 6).await;
    let state = temp_dir("state");
    let out = s.migrate(&state).run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let newer = corpus(540, 4);
    mail::load(s.src.port, "alice", "alice-secret", '/', &newer).await;
    s.messages.extend(newer);
    let crash = s
        .migrate(&state)
        .env("MAILFERRY_FAILPOINT", "after-append:5")
        .run();
    assert_eq!(
        crash.status.code(),
        None,
        "should have aborted\n{}",
        text(&crash)
    );
    let out = s.migrate(&state).run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    s.assert_equal().await;
}

/// A job that panics (a bug) fails that job alone: it is retried, the other folders go
/// on, and the run ends with the target complete (a panic used to end the job's task
/// and leave the run waiting for it for ever).
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_job_fails_alone_and_is_retried() {
    let s = setup(55, 6).await;
    let state = temp_dir("state");
    let out = s
        .migrate(&state)
        .env("MAILFERRY_FAILPOINT", "mid-fetch:3:panic")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("internal error (a bug, please report it): failpoint mid-fetch:3"),
        "the panic did not happen or was not reported:\n{}",
        text(&out)
    );
    s.assert_equal().await;
}

/// Two runs on one state directory at once (an overlapping cron job): the second is
/// refused by name while the first holds the directory, and the first completes with
/// nothing duplicated. (Both used to run, each trusting checkpoints the other rewrote:
/// 11,294 of 12,000 messages arrived twice.)
#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_on_the_same_state_directory_is_refused() {
    use mailferry_tests::hostile::{script, HostileServer, Play};
    let s = setup(56, 4).await;
    let state = temp_dir("state");
    // The first run's source greets three seconds late, so the runs overlap for sure.
    let slow = HostileServer::start(
        s.src.port,
        script(|m| {
            (m.command.is_empty() && m.played == 0)
                .then(|| vec![Play::Pause(Duration::from_secs(3)), Play::Pass])
        }),
    )
    .await;
    let first = Migrate::new(slow.port, s.dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .command()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first run has the directory once its lock file names it.
    let lock = state.join("lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let holder = || std::fs::read_to_string(&lock).unwrap_or_default();
    while holder() != format!("{} running\n", first.id()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never locked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = s.migrate(&state).run();
    assert_ne!(second.status.code(), Some(0), "{}", text(&second));
    assert!(
        text(&second).contains(&format!(
            "is in use by another mailferry run (process {})",
            first.id()
        )),
        "{}",
        text(&second)
    );
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert!(slow.played() > 0);
    s.assert_equal().await;
    // And once it is over, the directory is free again.
    let after = s.migrate(&state).run();
    assert_eq!(after.status.code(), Some(0), "{}", text(&after));
}

/// Every message at the target, all folders together.
async fn target_count(port: u16) -> u32 {
    mail::message_count(port, "alice", "alice-secret").await
}

/// `kill -9` mid-copy, five times in a row, on a mailbox of 10,200 messages, then a run
/// to the end: nothing lost, nothing duplicated. Each kill must land while messages are
/// being copied (the target grows, and is still partial before the last run), or the
/// test fails: kills that land before or after the copy prove nothing. (Three or more
/// kills in a row used to leave a MULTIAPPEND group or two duplicated: the dead run's
/// last APPENDs landed after the next run had looked at the target.)
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_copy_again_and_again_loses_and_duplicates_nothing() {
    let s = setup(52, 850).await;
    let total = s.messages.len() as u32;
    assert!(total >= 10_000);
    let state = temp_dir("state");
    let mut rng = fastrand::Rng::with_seed(52);
    let mut counts = vec![0];
    for _ in 0..5 {
        let mut child = s
            .migrate(&state)
            .command()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed once the target has grown by a random step: mid-copy by construction,
        // at a different point each time (a run after a killed one first waits
        // SETTLE_AFTER_CRASH for the dead run's writes, then copies).
        let before = *counts.last().unwrap();
        let step = rng.u32(100..1500);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before it was killed: target after each kill {counts:?}"
            );
            assert!(Instant::now() < deadline, "the run copied nothing for 60 s");
            if target_count(s.dst.port).await >= before + step {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
        counts.push(target_count(s.dst.port).await);
    }
    let last = *counts.last().unwrap();
    assert!(
        last < total,
        "the target was complete before the last run: {counts:?}"
    );
    let out = s.migrate(&state).run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("the last run on this state directory did not finish"),
        "{}",
        text(&out)
    );
    s.assert_equal().await;
    eprintln!("target after each kill: {counts:?} of {total}; then complete and equal");
}

/// The source drops the connection in the middle of a FETCH; the target in the middle
/// of APPENDs. Jobs retry with backoff and the result is exact.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_connections_mid_fetch_and_mid_append_are_retried() {
    for direction in [Direction::Download, Direction::Upload] {
        let s = setup(53, 20).await;
        let upstream = match direction {
            Direction::Download => s.src.port,
            Direction::Upload => s.dst.port,
        };
        let proxy = CuttingProxy::start(
            upstream,
            Cut {
                direction,
                after_bytes: 150_000,
                times: 3,
            },
        )
        .await;
        let state = temp_dir("state");
        let mut m = s.migrate(&state);
        let flag = if direction == Direction::Download {
            "--source"
        } else {
            "--target"
        };
        let at = m.args.iter().position(|a| a == flag).unwrap();
        m.args[at + 1] = format!("127.0.0.1:{}", proxy.port);
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || m.run()).await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{direction:?}: {}", text(&out));
        assert!(
            proxy.cuts_done.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "{direction:?}: the proxy never cut"
        );
        assert!(
            text(&out).contains("will retry"),
            "{direction:?}: {}",
            text(&out)
        );
        assert!(started.elapsed() < Duration::from_secs(120));
        s.assert_equal().await;
    }
}

/// The source's UIDVALIDITY changes (the folder was recreated): the stale checkpoint is
/// discarded and the folder reconciled, so nothing already copied is copied again.
#[tokio::test(flavor = "multi_thread")]
async fn a_uidvalidity_change_reconciles_instead_of_duplicating() {
    let mut s = setup(54, 6).await;
    let state = temp_dir("state");
    let out = s.migrate(&state).run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let mut c = mail::session(s.src.port, "alice", "alice-secret").await;
    let wire = mail::wire_name("Archive/2024", '/');
    let before = mail::contents(&mut c, &wire).await.len();
    c.examine(b"INBOX").await.unwrap(); // Dovecot drops a session whose folder is deleted
    c.run(mailferry_shared::imap::Command::new("DELETE").arg(&wire))
        .await
        .unwrap();
    c.run(mailferry_shared::imap::Command::new("CREATE").arg(&wire))
        .await
        .unwrap();
    let mut again: Vec<TestMessage> = s
        .messages
        .iter()
        .filter(|m| m.folder == "Archive/2024")
        .cloned()
        .collect();
    again.push(TestMessage {
        folder: "Archive/2024".into(),
        bytes: b"Subject: after the move\r\n\r\nnew\r\n".to_vec(),
        flags: vec![],
        date: "03-Mar-2026 03:03:03 +0000".into(),
    });
    mail::append_all(&mut c, '/', &again).await;
    assert_eq!(mail::contents(&mut c, &wire).await.len(), before + 1);
    c.logout().await;
    s.messages.push(again.pop().unwrap());

    let out = s.migrate(&state).run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("copied 1 messages"),
        "{}",
        text(&out)
    );
    s.assert_equal().await;
}

/// A 50 MB message: copied intact while the process stays far below 50 MB × slots.
#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_message_is_copied_with_bounded_memory() {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig::default());
    let mut rng = fastrand::Rng::with_seed(55);
    let mut body = String::with_capacity(52 << 20);
    body.push_str("Subject: huge\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    while body.len() < 50 << 20 {
        let line: String = (0..76).map(|_| (b'A' + rng.u8(..26)) as char).collect();
        body.push_str(&line);
        body.push_str("\r\n");
    }
    let mut messages = corpus(55, 2);
    messages.push(TestMessage {
        folder: "INBOX".into(),
        bytes: body.into_bytes(),
        flags: vec!["\\Seen".into()],
        date: "05-May-2025 05:05:05 +0000".into(),
    });
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    let m =
        Migrate::new(src.port, dst.port, "alice", &state).passwords("alice-secret", "alice-secret");
    let mut child = m
        .command()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_kib = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(v) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                peak_kib =
                    peak_kib.max(v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "mailferry did not finish");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");
    assert_same_mail(&pair, &messages, |p| p.to_string()).await;
    eprintln!("peak RSS with a 50 MB message: {} MiB", peak_kib / 1024);
    assert!(peak_kib < 200 * 1024, "peak RSS {} MiB", peak_kib / 1024);
}
