//! `mailferry migrate` end to end between real Dovecot servers: fidelity, re-runs,
//! flag propagation, lost state, delimiters, rules and dry runs.

use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair, TestMessage};
use mailferry_tests::run::{text, Migrate};

fn pair(target_separator: char) -> (Dovecot, Dovecot) {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig {
        separator: target_separator,
        ..DovecotConfig::default()
    });
    (src, dst)
}

fn same_path(p: &str) -> String {
    p.to_string()
}

/// Loads `messages` for alice at `src`, migrates her to `dst` (exit 0 expected) and
/// checks every folder, `target_path` giving where a folder should have landed.
async fn load_migrate_verify(
    src: &Dovecot,
    dst: &Dovecot,
    messages: &[TestMessage],
    target_path: impl Fn(&str) -> String,
) {
    mail::load(src.port, "alice", "alice-secret", '/', messages).await;
    let state = temp_dir("state");
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(src, dst, "alice", "alice-secret");
    assert_same_mail(&pair, messages, target_path).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_every_message_byte_for_byte_and_reruns_are_incremental() {
    let (src, dst) = pair('/');
    let messages = corpus(7, 12);
    mail::load(src.port, "alice", &src.password("alice"), '/', &messages).await;
    let state = temp_dir("state");
    // Tiny FETCH batches: many UID FETCHes pipelined per folder, which Dovecot runs in
    // parallel, so one batch's messages arrive before the previous batch completes.
    let run = || {
        Migrate::new(src.port, dst.port, "alice", &state)
            .passwords("alice-secret", "alice-secret")
            .arg("--fetch-batch")
            .arg("3")
    };
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");

    let out = run().run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same_mail(&pair, &messages, same_path).await;

    // A second run finds nothing to do and changes nothing.
    let out = run().run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("copied 0 messages"),
        "{}",
        text(&out)
    );
    assert_same_mail(&pair, &messages, same_path).await;

    // New mail and flag changes at the source reach the target; nothing is duplicated.
    let newer = mail::change_at_source(src.port, "alice", "alice-secret", "INBOX").await;
    let mut expected = messages.clone();
    expected.push(newer);
    let out = run().run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("copied 1 messages"),
        "{}",
        text(&out)
    );
    assert_same_mail(&pair, &expected, same_path).await;

    // Losing the state directory costs a reconciliation, never a duplicate.
    std::fs::remove_dir_all(&state).unwrap();
    let out = run().run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("copied 0 messages"),
        "{}",
        text(&out)
    );
    assert_same_mail(&pair, &expected, same_path).await;
}

/// A target with '.' as delimiter: levels translate, and a name containing '.' is
/// escaped to a look-alike instead of being split into two levels.
#[tokio::test(flavor = "multi_thread")]
async fn delimiters_translate_and_a_dot_in_a_name_is_escaped_not_split() {
    let (src, dst) = pair('.');
    load_migrate_verify(&src, &dst, &corpus(11, 3), |p| p.replace('.', "\u{2024}")).await;
    let names = mail::folder_names(dst.port, "alice", "alice-secret").await;
    assert!(names.contains(&"Archive.2024".to_string()), "{names:?}");
    assert!(names.contains(&"Проекты.Отчёты".to_string()), "{names:?}");
    assert!(
        names.contains(&"v1\u{2024}2 notes".to_string()),
        "{names:?}"
    );
}

/// Dovecot's Maildir++ layout refuses '.' in a name even with '/' as delimiter: the
/// planner falls back to the strict escaping, predictably, and copies the folder.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_the_target_refuses_is_escaped_and_copied() {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig {
        layout_fs: false,
        ..DovecotConfig::default()
    });
    load_migrate_verify(&src, &dst, &corpus(12, 2), |p| p.replace('.', "\u{2024}")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_shows_the_mapping_and_changes_nothing() {
    let (src, dst) = pair('/');
    mail::load(src.port, "alice", "alice-secret", '/', &corpus(3, 2)).await;
    let state = temp_dir("state").join("never-created");
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .arg("--dry-run")
        .arg("--exclude")
        .arg("Junk")
        .arg("--rename")
        .arg("Archive/*=Old/*")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Проекты/Отчёты"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("Archive/2024") && l.contains("Old/2024")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("Junk") && l.contains("skip: matched an exclude rule")),
        "{stdout}"
    );
    assert!(
        !state.exists(),
        "a dry run must not create the state directory"
    );
    let mut s = mail::session(dst.port, "alice", "alice-secret").await;
    let folders = s.list_all().await.unwrap();
    assert_eq!(
        folders.len(),
        1,
        "only INBOX may exist at the target: {folders:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_passwords_fail_fast_with_the_side_named() {
    let (src, dst) = pair('/');
    let state = temp_dir("state");
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("wrong", "alice-secret")
        .run();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("source") && all.contains("authentication rejected"),
        "{all}"
    );
    assert!(
        !all.contains("wrong"),
        "the password must never be printed: {all}"
    );

    let started = std::time::Instant::now();
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "also-wrong")
        .run();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("target"), "{}", text(&out));
    // An authentication failure is not retried in a loop.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_is_never_taken_from_the_command_line_or_guessed() {
    let (src, dst) = pair('/');
    let state = temp_dir("state");
    // no password anywhere and no terminal to prompt on: a clear usage error
    let out = Migrate::new(src.port, dst.port, "alice", &state).run();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("MAILFERRY_SOURCE_PASSWORD"),
        "{}",
        text(&out)
    );
    // from a file
    let file = state.join("pw");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(&file, "alice-secret\n").unwrap();
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .arg("--source-password-file")
        .arg(file.display().to_string())
        .arg("--target-password-file")
        .arg(file.display().to_string())
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_with_bad_rows_reports_them_and_migrates_the_good_ones() {
    let users = vec![
        ("alice".to_string(), "alice-secret".to_string()),
        ("bob".to_string(), "bob-secret".to_string()),
    ];
    let src = Dovecot::start(DovecotConfig {
        users: users.clone(),
        ..DovecotConfig::default()
    });
    let dst = Dovecot::start(DovecotConfig {
        users,
        ..DovecotConfig::default()
    });
    let alice = corpus(21, 2);
    let bob = corpus(22, 1);
    mail::load(src.port, "alice", "alice-secret", '/', &alice).await;
    mail::load(src.port, "bob", "bob-secret", '/', &bob).await;
    let dir = temp_dir("csv");
    let csv = dir.join("users.csv");
    std::fs::write(
        &csv,
        "\u{feff}EmailAddress,UserName,Password,TargetUserName,TargetPassword\r\n\
         alice@example.com,alice,alice-secret,alice,alice-secret\r\n\
         broken-address,carol,pw,carol,pw\r\n\
         bob@example.com,bob,bob-secret,bob,bob-secret\r\n\
         dave@example.com,dave,,dave,pw\r\n",
    )
    .unwrap();
    let mut m = Migrate::new(src.port, dst.port, "unused", &dir.join("state"));
    let at = m.args.iter().position(|a| a == "--source-user").unwrap();
    m.args.drain(at..at + 2);
    let out = m.arg("--csv").arg(csv.display().to_string()).run();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("line 3") && all.contains("not an email address"),
        "{all}"
    );
    assert!(
        all.contains("line 5") && all.contains("Password is empty"),
        "{all}"
    );
    assert!(
        !all.contains("alice-secret") && !all.contains("bob-secret"),
        "passwords leaked: {all}"
    );
    assert_same_mail(
        &Pair::dovecots(&src, &dst, "alice", "alice-secret"),
        &alice,
        same_path,
    )
    .await;
    assert_same_mail(
        &Pair::dovecots(&src, &dst, "bob", "bob-secret"),
        &bob,
        same_path,
    )
    .await;
}

/// Too large for the target: skipped with a reason, counted, and the folder goes on.
/// Once by our own limit, once by the target's APPENDLIMIT.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_too_large_is_skipped_with_its_reason_and_the_rest_is_copied() {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig {
        max_mail_size: Some(200_000),
        ..DovecotConfig::default()
    });
    let mut messages = corpus(31, 3);
    let big = TestMessage {
        folder: "INBOX".into(),
        bytes: format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(300_000)).into_bytes(),
        flags: vec![],
        date: "01-Jan-2024 00:00:00 +0000".into(),
    };
    let medium = TestMessage {
        folder: "Sent".into(),
        bytes: format!("Subject: medium\r\n\r\n{}\r\n", "z".repeat(120_000)).into_bytes(),
        flags: vec![],
        date: "02-Jan-2024 00:00:00 +0000".into(),
    };
    messages.push(big.clone());
    messages.push(medium.clone());
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .arg("--max-message-size")
        .arg("100K")
        .run();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("skipped: INBOX UID")
            && stdout.contains("larger than the configured maximum"),
        "{stdout}"
    );
    assert!(stdout.contains("skipped: Sent UID"), "{stdout}");
    // Everything else arrived: each folder holds the source's count, less the skipped.
    let mut src_s = mail::session(src.port, "alice", "alice-secret").await;
    let mut dst_s = mail::session(dst.port, "alice", "alice-secret").await;
    for (folder, skipped) in [("INBOX", 1), ("Sent", 1), ("Drafts", 0)] {
        let source = mail::contents(&mut src_s, folder.as_bytes()).await;
        let target = mail::contents(&mut dst_s, folder.as_bytes()).await;
        assert_eq!(target.len() + skipped, source.len(), "{folder}");
        assert!(
            target.iter().all(|m| source.contains(m)),
            "{folder}: a message changed on the way"
        );
    }
    // The target's own limit (200 000 bytes) applies without --max-message-size: the
    // refused message is skipped with the server's words, and nothing is retried.
    let state2 = temp_dir("state");
    let dst2 = Dovecot::start(DovecotConfig {
        max_mail_size: Some(200_000),
        ..DovecotConfig::default()
    });
    let out = Migrate::new(src.port, dst2.port, "alice", &state2)
        .passwords("alice-secret", "alice-secret")
        .run();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("skipped: ").count(),
        1,
        "only the 300 kB message: {stdout}"
    );
    assert!(stdout.contains("skipped: INBOX"), "{stdout}");
    assert!(!text(&out).contains("will retry"), "{}", text(&out));
}

/// Servers that advertise nothing beyond IMAP4rev1: synchronizing literals (a round trip
/// per APPEND), no MULTIAPPEND, no APPENDUID, no CONDSTORE, no special-use, no NAMESPACE.
/// A crash mid-copy, a re-run, flag changes and new mail must all still come out exact.
#[tokio::test(flavor = "multi_thread")]
async fn servers_with_only_imap4rev1_get_the_same_result() {
    let minimal = || DovecotConfig {
        capabilities: Some("IMAP4rev1 AUTH=PLAIN".into()),
        ..DovecotConfig::default()
    };
    let src = Dovecot::start(minimal());
    let dst = Dovecot::start(minimal());
    let messages = corpus(71, 10);
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    let run = || {
        Migrate::new(src.port, dst.port, "alice", &state)
            .passwords("alice-secret", "alice-secret")
            .arg("--fetch-batch")
            .arg("4")
    };
    let crash = run().env("MAILFERRY_FAILPOINT", "after-append:15").run();
    assert_eq!(crash.status.code(), None, "{}", text(&crash));
    let out = run().run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");
    assert_same_mail(&pair, &messages, same_path).await;

    let s = mail::session(src.port, "alice", "alice-secret").await;
    assert!(
        !s.capabilities().has("CONDSTORE"),
        "the test server must hide CONDSTORE"
    );
    s.logout().await;
    let newer = mail::change_at_source(src.port, "alice", "alice-secret", "Sent").await;
    let mut expected = messages.clone();
    expected.push(newer);
    let out = run().run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same_mail(&pair, &expected, same_path).await;
}

/// The log filter: `RUST_LOG` replaces the default, and a filter that cannot be read
/// stops the command at once with a message naming where it came from.
#[test]
fn rust_log_is_read_and_a_bad_one_is_named() {
    let state = temp_dir("state");
    let out = Migrate::new(1, 1, "alice", &state)
        .passwords("x", "x")
        .env("RUST_LOG", "chatty")
        .run();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("RUST_LOG") && text(&out).contains("chatty"),
        "{}",
        text(&out)
    );
    // A good one is taken: the run goes on to fail where it should (nothing listens).
    // (That the level acts is shown on the cluster's processes, whose INFO lines are
    // many: cluster::log_levels_reach_the_long_running_processes.)
    let out = Migrate::new(1, 1, "alice", &state)
        .passwords("x", "x")
        .arg("--attempts")
        .arg("1")
        .env("RUST_LOG", "debug,lapin=warn")
        .run();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("connection to 127.0.0.1:1 refused"));
}

/// A mistyped command gets the one it was probably meant to be.
#[test]
fn a_mistyped_command_is_answered_with_the_likely_one() {
    let out = std::process::Command::new(mailferry_tests::run::binary())
        .arg("migrat")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("similar subcommand exists: 'migrate'"),
        "{said}"
    );
}

/// Shell completions: a bash script that bash loads, which completes the commands.
#[test]
fn completions_are_printed_for_bash_and_bash_loads_them() {
    let out = std::process::Command::new(mailferry_tests::run::binary())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for word in ["migrate", "batch", "coordinator", "--source-user"] {
        assert!(script.contains(word), "{word} not completed");
    }
    let file = temp_dir("completions").join("mailferry.bash");
    std::fs::write(&file, &script).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p mailferry",
            file.display()
        ))
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
}

/// A daily download budget (Gmail's preset stops at 2 GB a day): at the budget the
/// account pauses until the next UTC day, saying so, with what was copied kept; the
/// next day's run (here: one without the budget) goes on and ends exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_used_up_daily_download_budget_pauses_the_account_until_the_next_day() {
    let (src, dst) = pair('/');
    let messages = corpus(77, 4);
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    let log = state.join("run.log");
    let mut run = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .args(["--source-daily-download", "20K", "--jobs", "1"])
        .command();
    let file = std::fs::File::create(&log).unwrap();
    let mut child = run
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let said = loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains("daily download budget used up") {
            break said;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pause within a minute:\n{said}"
        );
        assert!(child.try_wait().unwrap().is_none(), "it ended:\n{said}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(said.contains("is paused until"), "{said}");
    // It waits for the next day: stopped here, as an admin would.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let copied = mail::message_count(dst.port, "alice", "alice-secret").await;
    assert!(
        copied > 0 && (copied as usize) < messages.len(),
        "{copied} of {} copied under a 20 KiB budget",
        messages.len()
    );
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");
    assert_same_mail(&pair, &messages, same_path).await;
}
