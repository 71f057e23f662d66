//! Hostile servers (DESIGN.md invariants 10 and 6): a source or target that sends what no
//! honest server would, played by [`HostileServer`] in front of a real Dovecot at an exact
//! point of a real `mailferry migrate`.
//!
//! Every script holds mailferry to the same four promises:
//! - no panic and no abort: the process exits with one of its own exit codes;
//! - bounded memory: peak RSS under [`RSS_BOUND_KIB`];
//! - bounded time: done within [`DEADLINE`], with a named error where the script never
//!   relents (short timeouts are set: `--read-timeout 3s --command-timeout 5s`);
//! - nothing reaches the target that the source did not send: every message there is a
//!   source message, none twice, with no flag the source did not have.
//!
//! And every test checks that its script played, so none passes because the hostile
//! bytes never arrived. A script that plays only once shows more: the migration then
//! recovers and the target equals the source.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::hostile::{first_line, script, HostileServer, Moment, Play, Script};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair, TestMessage};
use mailferry_tests::run::{text, Migrate};

/// The peak RSS any script may cause (the corpus is small: what is measured is what the
/// server makes mailferry hold).
const RSS_BOUND_KIB: u64 = 150 * 1024;
/// The longest any script may take, retries included. The slowest scripts stall every
/// folder's FETCH: each folder then waits out the command timeout (5 s) on each of its
/// 2 attempts, one folder after another, because a small mailbox's folders run as one
/// bundle on one connection a side: 120 s for the corpus's 12 folders, plus backoff.
const DEADLINE: Duration = Duration::from_secs(150);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

struct Rig {
    source: Dovecot,
    target: Dovecot,
    messages: Vec<TestMessage>,
}

impl Rig {
    async fn start(target_config: DovecotConfig) -> Rig {
        Rig::start_with(target_config, 2).await
    }

    /// `per_folder` messages in each corpus folder.
    async fn start_with(target_config: DovecotConfig, per_folder: usize) -> Rig {
        let source = Dovecot::start(DovecotConfig::default());
        let target = Dovecot::start(target_config);
        let messages = corpus(77, per_folder);
        mail::load(source.port, "alice", "alice-secret", '/', &messages).await;
        Rig {
            source,
            target,
            messages,
        }
    }

    fn pair(&self) -> Pair<'_> {
        Pair::dovecots(&self.source, &self.target, "alice", "alice-secret")
    }
}

struct Run {
    out: Output,
    peak_rss_kib: u64,
    took: Duration,
}

impl Run {
    fn text(&self) -> String {
        text(&self.out)
    }

    /// One of mailferry's own exit codes: not killed by a signal, no panic, no abort.
    fn assert_no_crash(&self) {
        eprintln!(
            "peak RSS {} KiB, {:.1} s, exit {:?}",
            self.peak_rss_kib,
            self.took.as_secs_f64(),
            self.out.status.code()
        );
        let code = self.out.status.code();
        assert!(
            matches!(code, Some(0..=9)),
            "crashed or killed ({code:?}):\n{}",
            self.text()
        );
        assert!(!self.text().contains("panicked"), "{}", self.text());
        assert!(
            self.peak_rss_kib < RSS_BOUND_KIB,
            "peak RSS {} KiB",
            self.peak_rss_kib
        );
        assert!(self.took < DEADLINE, "took {:?}", self.took);
    }

    fn assert_failed_with(&self, named: &str) {
        self.assert_no_crash();
        assert_ne!(self.out.status.code(), Some(0), "{}", self.text());
        assert!(
            self.text().contains(named),
            "expected {named:?}:\n{}",
            self.text()
        );
    }

    fn assert_ok(&self) {
        self.assert_no_crash();
        assert_eq!(self.out.status.code(), Some(0), "{}", self.text());
    }
}

/// Runs `mailferry migrate` with the relay on `side`, sampling its peak RSS.
async fn migrate_through(rig: &Rig, side: Side, relay: &HostileServer, extra: &[&str]) -> Run {
    let (source, target) = match side {
        Side::Source => (relay.port, rig.target.port),
        Side::Target => (rig.source.port, relay.port),
    };
    migrate(source, target, extra).await
}

async fn migrate(source: u16, target: u16, extra: &[&str]) -> Run {
    let state = temp_dir("state");
    let mut m = Migrate::new(source, target, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .arg("--read-timeout")
        .arg("3s")
        .arg("--command-timeout")
        .arg("5s")
        .arg("--attempts")
        .arg("2");
    for a in extra {
        m = m.arg(*a);
    }
    let command = m.command();
    tokio::task::spawn_blocking(move || run_sampled(command, state))
        .await
        .expect("runner")
}

fn run_sampled(mut command: std::process::Command, state: std::path::PathBuf) -> Run {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mailferry");
    let status_file = format!("/proc/{}/status", child.id());
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let (out_t, err_t) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let mut peak = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            {
                peak = peak.max(kib);
            }
        }
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if started.elapsed() > DEADLINE * 2 {
            let _ = child.kill();
            break child.wait().expect("waiting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_dir_all(state);
    Run {
        out: Output {
            status,
            stdout: out_t.join().expect("stdout"),
            stderr: err_t.join().expect("stderr"),
        },
        peak_rss_kib: peak,
        took: started.elapsed(),
    }
}

/// Nothing at the target that the source did not send: every target message (in any
/// folder) is a source message, no source message is there more often than at the
/// source, and no flag is there that the source does not have.
async fn assert_target_within_source(rig: &Rig) {
    let all = |port| async move {
        let mut s = mail::session(port, "alice", "alice-secret").await;
        let mut seen = Vec::new();
        for entry in s.list_all().await.expect("LIST") {
            if entry.selectable() {
                seen.extend(mail::contents(&mut s, &entry.wire_name).await);
            }
        }
        s.logout().await;
        seen
    };
    let source = all(rig.source.port).await;
    let target = all(rig.target.port).await;
    assert_eq!(
        source.len(),
        rig.messages.len(),
        "the source is not as loaded"
    );
    let source_flags: std::collections::BTreeSet<&String> =
        source.iter().flat_map(|m| &m.flags).collect();
    for m in &target {
        let at_source = source.iter().filter(|s| s.sha256 == m.sha256).count();
        let at_target = target.iter().filter(|t| t.sha256 == m.sha256).count();
        assert!(
            at_target <= at_source,
            "a message ({} bytes) is {at_target} times at the target, {at_source} at the source",
            m.size
        );
        for f in &m.flags {
            assert!(source_flags.contains(f), "flag {f:?} at the target only");
        }
    }
}

/// A script, the side it plays on, and what a hostile run must end with.
async fn case(side: Side, script: Script, expect: Expect) -> (Rig, Run) {
    case_with(side, DovecotConfig::default(), script, expect, &[]).await
}

enum Expect {
    /// The run fails, saying this.
    Fails(&'static str),
    /// The run succeeds and the target equals the source.
    Recovers,
    /// No claim on the outcome beyond the four promises.
    Survives,
}

async fn case_with(
    side: Side,
    target_config: DovecotConfig,
    script: Script,
    expect: Expect,
    extra: &[&str],
) -> (Rig, Run) {
    let rig = Rig::start(target_config).await;
    let upstream = match side {
        Side::Source => rig.source.port,
        Side::Target => rig.target.port,
    };
    let relay = HostileServer::start(upstream, script).await;
    let run = migrate_through(&rig, side, &relay, extra).await;
    assert!(
        relay.played() > 0,
        "the script never played:\n{}",
        run.text()
    );
    match expect {
        Expect::Fails(named) => run.assert_failed_with(named),
        Expect::Recovers => {
            run.assert_ok();
            assert_same_mail(&rig.pair(), &rig.messages, |p| p.to_string()).await;
        }
        Expect::Survives => run.assert_no_crash(),
    }
    assert_target_within_source(&rig).await;
    (rig, run)
}

fn is_greeting(m: &Moment<'_>) -> bool {
    m.command.is_empty() && m.response.starts_with(b"* OK")
}

/// A FETCH response carrying a message body, from the copy's FETCH.
fn is_body_fetch(m: &Moment<'_>) -> bool {
    m.command.starts_with("UID FETCH")
        && m.command.contains("BODY.PEEK[]")
        && m.response.starts_with(b"* ")
        && first_line(m.response).contains("FETCH")
}

/// A FETCH response to the metadata FETCH (sizes, flags, dates).
fn is_meta_fetch(m: &Moment<'_>) -> bool {
    m.command.starts_with("UID FETCH")
        && m.command.contains("RFC822.SIZE")
        && m.response.starts_with(b"* ")
}

fn nested(prefix: &str, depth: usize, suffix: &str) -> Vec<u8> {
    let mut v = prefix.as_bytes().to_vec();
    v.extend(std::iter::repeat_n(b'(', depth));
    v.extend(std::iter::repeat_n(b')', depth));
    v.extend_from_slice(suffix.as_bytes());
    v
}

/// `response` with `insert` placed right after the first `FLAGS (`.
fn with_flag(response: &[u8], insert: &[u8]) -> Option<Vec<u8>> {
    let at = response.windows(7).position(|w| w == b"FLAGS (")? + 7;
    let mut v = response[..at].to_vec();
    v.extend_from_slice(insert);
    v.push(b' ');
    v.extend_from_slice(&response[at..]);
    Some(v)
}

/// A greeting 300,000 `(` deep in its response code.
fn nested_greeting() -> Script {
    script(|m| is_greeting(m).then(|| vec![Play::Send(nested("* OK [X ", 300_000, "] hi\r\n"))]))
}

/// A greeting dripped a byte a second.
fn dripped_greeting() -> Script {
    script(|m| {
        is_greeting(m).then(|| {
            vec![Play::Drip {
                bytes: b"* OK a greeting at the speed of a dripping tap\r\n".to_vec(),
                every: Duration::from_secs(1),
            }]
        })
    })
}

/// `start`, then `unit` again and again (64 MiB in all).
fn endless(start: &[u8], unit: Vec<u8>) -> Vec<Play> {
    vec![
        Play::Send(start.to_vec()),
        Play::Flood {
            unit,
            max_bytes: 64 << 20,
        },
    ]
}

/// The source's greeting is 300,000 `(` deep in its response code (it took the
/// process down with a stack overflow): the greeting's code is set aside, the rest of
/// the greeting stands, and the migration completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_greeting_nested_300000_deep() {
    case(Side::Source, nested_greeting(), Expect::Recovers).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_greeting_nested_300000_deep() {
    case(Side::Target, nested_greeting(), Expect::Recovers).await;
}

/// A FETCH response nested past the bound, every time: each folder fails by name.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_response_nested_too_deep() {
    let s = script(|m| {
        is_body_fetch(m).then(|| vec![Play::Send(nested("* 1 FETCH (X ", 5_000, ")\r\n"))])
    });
    case(
        Side::Source,
        s,
        Expect::Fails("nested deeper than 100 levels"),
    )
    .await;
}

/// Once only: the connection is lost, the job is retried and the migration completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_response_nested_too_deep_once() {
    let s = script(|m| {
        (is_body_fetch(m) && m.played == 0)
            .then(|| vec![Play::Send(nested("* 1 FETCH (X ", 300_000, ")\r\n"))])
    });
    case(Side::Source, s, Expect::Recovers).await;
}

/// A greeting that never ends (no line feed): refused at the line bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_greeting_that_never_ends() {
    let s = script(|m| is_greeting(m).then(|| endless(b"* OK ", vec![b'x'; 64 * 1024])));
    case(Side::Source, s, Expect::Fails("response text longer than")).await;
}

/// A greeting dripped a byte a second: each read is in time, the greeting as a whole
/// is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_greeting_dripped_a_byte_a_second() {
    case(
        Side::Source,
        dripped_greeting(),
        Expect::Fails("not done within 5 s"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_greeting_dripped_a_byte_a_second() {
    case(
        Side::Target,
        dripped_greeting(),
        Expect::Fails("not done within 5 s"),
    )
    .await;
}

/// A FETCH response that is one endless line.
#[tokio::test(flavor = "multi_thread")]
async fn an_endless_line_in_a_fetch() {
    let s = script(|m| {
        is_body_fetch(m).then(|| endless(b"* 1 FETCH (UID 1 X ", vec![b'9'; 64 * 1024]))
    });
    case(Side::Source, s, Expect::Fails("response text longer than")).await;
}

/// A FETCH response of endless empty literals: the line bound counts the whole
/// response (it used to start again after each literal, so this never ended).
#[tokio::test(flavor = "multi_thread")]
async fn endless_empty_literals() {
    let s =
        script(|m| is_body_fetch(m).then(|| endless(b"* 1 FETCH (X ", b"{0}\r\n".repeat(10_000))));
    case(Side::Source, s, Expect::Fails("response text longer than")).await;
}

/// A literal announced at 100 GB.
#[tokio::test(flavor = "multi_thread")]
async fn a_literal_announced_at_100_gb() {
    let s = script(|m| {
        is_body_fetch(m).then(|| {
            vec![Play::Send(
                b"* 1 FETCH (UID 1 BODY[] {100000000000}\r\n".to_vec(),
            )]
        })
    });
    case(Side::Source, s, Expect::Fails("exceed the limit")).await;
}

/// Bodies far larger than their declared RFC822.SIZE (40 MiB where a few KiB were
/// declared): refused at the announcement, never buffered, whatever the byte budget.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_larger_than_their_declared_size() {
    let s = script(|m| {
        if !is_body_fetch(m) {
            return None;
        }
        let line = first_line(m.response);
        let uid = line.split("UID ").nth(1)?.split(' ').next()?.to_string();
        let size = 40usize << 20;
        let mut body = format!("* 1 FETCH (UID {uid} BODY[] {{{size}}}\r\n").into_bytes();
        body.extend(std::iter::repeat_n(b'a', size));
        body.extend_from_slice(b")\r\n");
        Some(vec![Play::Send(body)])
    });
    case(Side::Source, s, Expect::Fails("exceed the limit")).await;
}

/// A flag sent as a literal carrying CRLF and commands (it deleted a target folder
/// through the flag sync's UID STORE): dropped, on the copy's APPEND and on the flag
/// sync of a second run; the target's other folder survives.
#[tokio::test(flavor = "multi_thread")]
async fn flags_as_literals_with_commands_inside() {
    let payload = b"x)\r\nZ1 DELETE \"Archive/2021\"\r\nZ2 NOOP (y";
    let inject = move |m: &Moment<'_>| {
        if !m.command.starts_with("UID FETCH") || !m.response.starts_with(b"* ") {
            return None;
        }
        let mut literal = format!("{{{}}}\r\n", payload.len()).into_bytes();
        literal.extend_from_slice(payload);
        with_flag(m.response, &literal).map(|r| vec![Play::Send(r)])
    };
    // (change_at_source changes the first four messages of INBOX)
    let mut rig = Rig::start_with(DovecotConfig::default(), 4).await;
    // A folder at the target that the injected command would delete.
    let keep = TestMessage {
        folder: "Archive/2021".into(),
        bytes: b"From: a@example.org\r\nSubject: keep me\r\n\r\nkeep\r\n".to_vec(),
        flags: vec![],
        date: "01-Jan-2021 10:00:00 +0000".into(),
    };
    mail::load_in(
        rig.target.port,
        "alice",
        "alice-secret",
        '/',
        "",
        &["Archive/2021"],
        std::slice::from_ref(&keep),
    )
    .await;
    let relay = HostileServer::start(rig.source.port, script(inject)).await;
    let first = migrate_through(&rig, Side::Source, &relay, &[]).await;
    first.assert_ok();
    let copied = relay.played();
    assert!(copied > 0, "the script never played");
    // A flag changed at the source makes the second run's flag sync send a UID STORE.
    let newer = mail::change_at_source(rig.source.port, "alice", "alice-secret", "INBOX").await;
    rig.messages.push(newer);
    let second = migrate_through(&rig, Side::Source, &relay, &[]).await;
    second.assert_ok();
    assert!(
        relay.played() > copied,
        "the second run's FETCH was not played"
    );
    // The real flags arrived, the injected one did not (the verifier compares flags);
    // the target's own folder is checked below.
    assert_same_mail(&rig.pair(), &rig.messages, |p| p.to_string()).await;
    let names = mail::folder_names(rig.target.port, "alice", "alice-secret").await;
    assert!(
        names.iter().any(|n| n == "Archive/2021"),
        "deleted: {names:?}"
    );
    let mut s = mail::session(rig.target.port, "alice", "alice-secret").await;
    let kept = mail::contents(&mut s, &mail::wire_name("Archive/2021", '/')).await;
    assert_eq!(kept.len(), 1);
    s.logout().await;
}

/// Flags as quoted strings (not atoms, so not flags): dropped; every message arrives
/// with its real flags.
#[tokio::test(flavor = "multi_thread")]
async fn flags_as_quoted_strings() {
    let s = script(|m| {
        if !m.command.starts_with("UID FETCH") || !m.response.starts_with(b"* ") {
            return None;
        }
        with_flag(m.response, b"\"a) b\"").map(|r| vec![Play::Send(r)])
    });
    case(Side::Source, s, Expect::Recovers).await;
}

/// A FETCH answered a byte a second: every read is in time, the command is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_dripped_a_byte_a_second() {
    let s = script(|m| {
        is_body_fetch(m).then(|| {
            vec![Play::Drip {
                bytes: m.response.to_vec(),
                every: Duration::from_secs(1),
            }]
        })
    });
    case(
        Side::Source,
        s,
        Expect::Fails("did not complete a command within"),
    )
    .await;
}

/// The source's UIDVALIDITY alternates between EXAMINEs of the same folder: nothing is
/// duplicated or lost, and a clean run afterwards completes the target.
#[tokio::test(flavor = "multi_thread")]
async fn uidvalidity_changing_between_examines() {
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let s = script(move |m| {
        if !m.command.starts_with("EXAMINE") {
            return None;
        }
        let line = first_line(m.response);
        let value: u64 = line
            .strip_prefix("* OK [UIDVALIDITY ")?
            .split(']')
            .next()?
            .parse()
            .ok()?;
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        n.is_multiple_of(2).then(|| {
            vec![Play::Send(
                format!("* OK [UIDVALIDITY {}] changed\r\n", value + 1).into_bytes(),
            )]
        })
    });
    let (rig, _) = case(Side::Source, s, Expect::Survives).await;
    let clean = migrate(rig.source.port, rig.target.port, &[]).await;
    clean.assert_ok();
    assert_same_mail(&rig.pair(), &rig.messages, |p| p.to_string()).await;
}

/// An unsolicited EXPUNGE before every body.
#[tokio::test(flavor = "multi_thread")]
async fn unsolicited_expunges_during_the_copy() {
    let s = script(|m| {
        is_body_fetch(m).then(|| vec![Play::Send(b"* 1 EXPUNGE\r\n".to_vec()), Play::Pass])
    });
    case(Side::Source, s, Expect::Recovers).await;
}

/// An unsolicited FETCH with a body for a UID nobody asked for, before every body: it
/// must not reach the target.
#[tokio::test(flavor = "multi_thread")]
async fn unsolicited_bodies_never_reach_the_target() {
    let s = script(|m| {
        is_body_fetch(m).then(|| {
            let planted = b"Subject: planted\r\n\r\nhi\r\n";
            let mut r = format!(
                "* 77 FETCH (UID 999999 FLAGS (\\Seen) BODY[] {{{}}}\r\n",
                planted.len()
            )
            .into_bytes();
            r.extend_from_slice(planted);
            r.extend_from_slice(b")\r\n");
            vec![Play::Send(r), Play::Pass]
        })
    });
    case(Side::Source, s, Expect::Recovers).await;
}

/// Every body sent twice: one copy at the target.
#[tokio::test(flavor = "multi_thread")]
async fn every_body_sent_twice() {
    let s = script(|m| is_body_fetch(m).then(|| vec![Play::Pass, Play::Pass]));
    case(Side::Source, s, Expect::Recovers).await;
}

/// The metadata FETCH with each message's UID replaced by `rewrite(uid)`.
fn meta_uids(rewrite: fn(u64) -> u64) -> Script {
    script(move |m| {
        if !is_meta_fetch(m) {
            return None;
        }
        let text = String::from_utf8_lossy(m.response).to_string();
        let at = text.find("UID ")? + 4;
        let end = at + text[at..].find([' ', ')'])?;
        let uid: u64 = text[at..end].parse().ok()?;
        let rewritten = format!("{}{}{}", &text[..at], rewrite(uid), &text[end..]);
        Some(vec![Play::Send(rewritten.into_bytes())])
    })
}

/// UIDs past 32 bits in the metadata: survived. (That they are not taken for a UID,
/// where 4294967297 wrapped to 1, is the unit test `a_uid_past_32_bits_or_zero_is_no_uid`:
/// here `uid + 2^32` would wrap to the same UID and prove nothing about it.)
#[tokio::test(flavor = "multi_thread")]
async fn uids_past_32_bits() {
    case(
        Side::Source,
        meta_uids(|uid| uid + (1 << 32)),
        Expect::Survives,
    )
    .await;
}

/// UID 0 in the metadata: not a UID.
#[tokio::test(flavor = "multi_thread")]
async fn uid_zero() {
    case(Side::Source, meta_uids(|_| 0), Expect::Survives).await;
}

/// EXISTS, UIDNEXT and UIDVALIDITY past 32 bits in EXAMINE's answer.
#[tokio::test(flavor = "multi_thread")]
async fn numbers_past_32_bits_in_examine() {
    let s = script(|m| {
        if !m.command.starts_with("EXAMINE") || !m.response.starts_with(b"* ") {
            return None;
        }
        let line = first_line(m.response);
        let replaced = if line.ends_with(" EXISTS") {
            "* 99999999999 EXISTS\r\n".to_string()
        } else if line.starts_with("* OK [UIDNEXT ") {
            "* OK [UIDNEXT 99999999999] x\r\n".to_string()
        } else if line.starts_with("* OK [UIDVALIDITY ") {
            "* OK [UIDVALIDITY 18446744073709551615] x\r\n".to_string()
        } else {
            return None;
        };
        Some(vec![Play::Send(replaced.into_bytes())])
    });
    case(Side::Source, s, Expect::Survives).await;
}

/// Data injected after STARTTLS's OK, before the handshake (CVE-2011-0411's kind):
/// refused by name.
#[tokio::test(flavor = "multi_thread")]
async fn data_injected_after_starttls() {
    let source = Dovecot::start(DovecotConfig {
        tls: true,
        ..DovecotConfig::default()
    });
    let target = Dovecot::start(DovecotConfig::default());
    let messages = corpus(78, 1);
    mail::load(source.port, "alice", "alice-secret", '/', &messages).await;
    let s = script(|m| {
        (m.command == "STARTTLS" && !m.response.starts_with(b"* ")).then(|| {
            let mut r = m.response.to_vec();
            r.extend_from_slice(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN LOGIN] injected\r\n");
            vec![Play::Send(r)]
        })
    });
    let relay = HostileServer::start(source.port, s).await;
    let ca = source.ca.as_ref().unwrap().ca_cert.display().to_string();
    let rig = Rig {
        source,
        target,
        messages,
    };
    let state = temp_dir("state");
    let mut m = Migrate::new(relay.port, rig.target.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .arg("--attempts")
        .arg("1");
    let at = m
        .args
        .iter()
        .position(|a| a == "--source-security")
        .unwrap();
    m.args[at + 1] = "starttls".into();
    m = m.arg("--source-ca-file").arg(ca);
    let run = tokio::task::spawn_blocking(move || run_sampled(m.command(), state))
        .await
        .unwrap();
    assert!(relay.played() > 0, "{}", run.text());
    run.assert_failed_with("server sent data after STARTTLS");
    assert_target_within_source(&rig).await;
}

/// The target answers APPEND with an APPENDUID that is garbage: the copy does not
/// trust it, and everything arrives once.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_appenduid_that_is_garbage() {
    let s = script(|m| {
        if !m.command.starts_with("APPEND")
            || m.response.starts_with(b"* ")
            || m.response.starts_with(b"+")
        {
            return None;
        }
        let line = first_line(m.response);
        let tag = line.split(' ').next()?;
        Some(vec![Play::Send(
            format!("{tag} OK [APPENDUID 4294967296 0:99999999999,x] done\r\n").into_bytes(),
        )])
    });
    case(Side::Target, s, Expect::Recovers).await;
}

/// A target without LITERAL+ that never sends the continuation an APPEND waits for.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_never_asks_for_the_literal() {
    let config = DovecotConfig {
        capabilities: Some("IMAP4rev1 AUTH=PLAIN UIDPLUS".into()),
        ..DovecotConfig::default()
    };
    let s = script(|m| {
        (m.command.starts_with("APPEND") && m.response.starts_with(b"+")).then(Vec::new)
    });
    // The silence bound (3 s) names it before the write's deadline (5 s) would.
    case_with(
        Side::Target,
        config,
        s,
        Expect::Fails("server sent nothing for 3 s"),
        &[],
    )
    .await;
}

/// BYE and a closed connection in the middle of the first body, once: the job is
/// retried and nothing is duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn bye_in_the_middle_of_a_body_once() {
    let s = script(|m| {
        (is_body_fetch(m) && m.played == 0).then(|| {
            let half = m.response.len() / 2;
            vec![
                Play::Send(m.response[..half].to_vec()),
                Play::Send(b"\r\n* BYE going away\r\n".to_vec()),
                Play::Close,
            ]
        })
    });
    case(Side::Source, s, Expect::Recovers).await;
}

/// The target closes the connection in the middle of an APPEND group's answers, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_drops_the_connection_after_an_append_once() {
    let s = script(|m| {
        (m.command.starts_with("APPEND") && !m.response.starts_with(b"* ") && m.played == 0)
            .then(|| vec![Play::Close])
    });
    case(Side::Target, s, Expect::Recovers).await;
}

/// Binary garbage where a response should be.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_a_response() {
    let s = script(|m| {
        is_body_fetch(m).then(|| vec![Play::Send(b"\x00\x01\xff garbage\r\n".to_vec())])
    });
    case(Side::Source, s, Expect::Fails("malformed response")).await;
}

/// The FETCH completes under a tag nobody sent: the command never completes, and its
/// deadline ends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_completion_under_a_foreign_tag() {
    let s = script(|m| {
        if !m.command.starts_with("UID FETCH") || m.response.starts_with(b"* ") {
            return None;
        }
        let line = first_line(m.response);
        let rest = line.split_once(' ')?.1;
        Some(vec![Play::Send(format!("zz9 {rest}\r\n").into_bytes())])
    });
    // Silence (3 s) or the command's deadline (5 s), whichever comes first.
    case(Side::Source, s, Expect::Fails("connection lost: server")).await;
}

/// A flood of unsolicited untagged data (64 MiB of `* OK` lines) before a FETCH
/// completes: bounded by the command's deadline, in constant memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unsolicited_responses() {
    let s = script(|m| {
        is_body_fetch(m).then(|| {
            vec![Play::Flood {
                unit: b"* OK flood flood flood flood flood flood flood flood\r\n".repeat(1000),
                max_bytes: 1 << 30,
            }]
        })
    });
    case(
        Side::Source,
        s,
        Expect::Fails("did not complete a command within"),
    )
    .await;
}
