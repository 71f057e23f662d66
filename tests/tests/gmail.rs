//! Gmail's archive, against a Dovecot that behaves as Gmail does (`DovecotConfig::gmail`):
//! `[Gmail]/All Mail` is a virtual folder over every folder plus archived mail that is in
//! no listed folder. Every archived-only message must arrive exactly once, in the archive
//! folder; labelled mail only in its labels' folders — through re-runs and crashes.

use mailferry_shared::imap::mailbox::StatusItems;
use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig, ARCHIVED};
use mailferry_tests::mail::{self, corpus, session, wire_name, Seen, TestMessage};
use mailferry_tests::run::{text, Migrate};

const USER: &str = "alice";
const PASSWORD: &str = "alice-secret";

/// The label folders of the test mailbox. "Archive" is a label of its own, so the
/// archived mail must go elsewhere (`All Mail`, the default's fallback).
const LABELS: &[&str] = &["INBOX", "Work", "Work/Projects", "Archive"];
const ARCHIVE_AT_TARGET: &str = "All Mail";

struct Gmail {
    src: Dovecot,
    dst: Dovecot,
}

/// 78 messages: 15 archived (in no label), the rest in the labels, 5 of those in two
/// labels at once (Work and Archive). (Each label's copy is a message of its own here,
/// and in All Mail; on Gmail it is one message. The count by content copes with both.)
fn mailbox(seed: u64) -> Vec<TestMessage> {
    let mut messages: Vec<TestMessage> = corpus(seed, 7).into_iter().take(78).collect();
    for (i, m) in messages.iter_mut().enumerate() {
        m.folder = match i {
            0..=14 => ARCHIVED,
            15..=39 => "INBOX",
            40..=54 => "Work",
            55..=64 => "Work/Projects",
            _ => "Archive",
        }
        .to_string();
    }
    let twice: Vec<TestMessage> = messages[40..45]
        .iter()
        .map(|m| TestMessage {
            folder: "Archive".into(),
            ..m.clone()
        })
        .collect();
    messages.extend(twice);
    messages
}

async fn start(seed: u64) -> Gmail {
    let src = Dovecot::start(DovecotConfig {
        gmail: true,
        ..DovecotConfig::default()
    });
    let dst = Dovecot::start(DovecotConfig::default());
    let folders: Vec<&str> = LABELS.iter().copied().chain([ARCHIVED]).collect();
    mail::load_in(src.port, USER, PASSWORD, '/', "", &folders, &mailbox(seed)).await;
    Gmail { src, dst }
}

impl Gmail {
    fn migrate(&self, state: &std::path::Path) -> Migrate {
        Migrate::new(self.src.port, self.dst.port, USER, state).passwords(PASSWORD, PASSWORD)
    }

    fn run(&self, state: &std::path::Path) -> String {
        let out = self.migrate(state).run();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        text(&out)
    }

    /// Every label folder equal at both ends; the archive folder holds exactly the
    /// archived messages; and the target has no other folder.
    async fn assert_exactly_once(&self) {
        let mut src = session(self.src.port, USER, PASSWORD).await;
        let mut dst = session(self.dst.port, USER, PASSWORD).await;
        let mut problems = Vec::new();
        let pairs = LABELS
            .iter()
            .map(|l| (*l, *l))
            .chain([(ARCHIVED, ARCHIVE_AT_TARGET)]);
        for (from, to) in pairs {
            let source = mail::contents(&mut src, &wire_name(from, '/')).await;
            let target = mail::contents(&mut dst, &wire_name(to, '/')).await;
            if source.is_empty() || source != target {
                problems.push(format!(
                    "{from} -> {to}: {} at the source, {} at the target; at the target only: {:?}",
                    source.len(),
                    target.len(),
                    target
                        .iter()
                        .filter(|m| !source.contains(m))
                        .map(|m: &Seen| m.size)
                        .collect::<Vec<_>>()
                ));
            }
        }
        let mut folders = mail::folder_names(self.dst.port, USER, PASSWORD).await;
        folders.sort();
        let mut expected: Vec<String> = LABELS
            .iter()
            .chain(&[ARCHIVE_AT_TARGET])
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        if folders != expected {
            problems.push(format!("target folders {folders:?}, expected {expected:?}"));
        }
        src.logout().await;
        dst.logout().await;
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// Messages at the target: in the archive folder, and in all the others.
    async fn at_target(&self) -> (u32, u32) {
        let all = mail::message_count(self.dst.port, USER, PASSWORD).await;
        let mut s = session(self.dst.port, USER, PASSWORD).await;
        let archive = s
            .status_many(&[wire_name(ARCHIVE_AT_TARGET, '/')], StatusItems::TARGET)
            .await
            .expect("STATUS")
            .pop()
            .and_then(|st| st.ok())
            .map_or(0, |st| st.messages);
        s.logout().await;
        (archive, all - archive)
    }

    /// A run with one job at a time that aborts at `point`, which must fall in the
    /// archive job (see [`a_crash_while_copying_the_archive_duplicates_nothing`]).
    async fn crash_in_the_archive(&self, state: &std::path::Path, point: &str) {
        let (archive, labels) = self.at_target().await;
        let crash = self
            .migrate(state)
            .args(["--jobs", "1"])
            .env("MAILFERRY_FAILPOINT", point)
            .run();
        assert_eq!(crash.status.code(), None, "{point}: {}", text(&crash));
        let (archive_now, labels_now) = self.at_target().await;
        assert_eq!(
            labels_now, labels,
            "{point}: a label's job ran before the crash"
        );
        if point.starts_with("after-append") {
            assert!(
                archive_now > archive,
                "{point}: the archive got nothing before the crash"
            );
        }
    }

    async fn add(&self, seed: u64, inbox: usize, archived: usize) {
        let mut more: Vec<TestMessage> =
            corpus(seed, 2).into_iter().take(inbox + archived).collect();
        for (i, m) in more.iter_mut().enumerate() {
            m.folder = if i < inbox { "INBOX" } else { ARCHIVED }.to_string();
        }
        let mut s = session(self.src.port, USER, PASSWORD).await;
        mail::append_all(&mut s, '/', &more).await;
        s.logout().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn archived_mail_arrives_once_and_labelled_mail_is_not_copied_again() {
    let g = start(81).await;
    let state = temp_dir("state");
    let dry = g.migrate(&state).arg("--dry-run").run();
    assert!(
        text(&dry).contains("only messages in no other folder"),
        "the plan says what happens to All Mail:\n{}",
        text(&dry)
    );
    let first = g.run(&state);
    // 63 labelled + 5 second labels + 15 archived; All Mail's 83 are accounted for.
    assert!(first.contains("copied 83 messages"), "{first}");
    g.assert_exactly_once().await;

    // New mail, in the inbox and archived: the next pass copies exactly those.
    g.add(810, 2, 3).await;
    let second = g.run(&state);
    assert!(second.contains("copied 5 messages"), "{second}");
    g.assert_exactly_once().await;
    let third = g.run(&state);
    assert!(third.contains("copied 0 messages"), "{third}");

    // No state (a new machine): the target is reconciled, nothing copied twice.
    let fresh = temp_dir("state");
    let again = g.run(&fresh);
    assert!(again.contains("copied 0 messages"), "{again}");
    g.assert_exactly_once().await;
}

/// The archive job is the user's largest, so it runs first with `--jobs 1`: each crash
/// lands in it, after its APPENDs and before its checkpoint, or amid its fetches — in
/// the first pass and in an incremental one. Each crash is shown to have happened there:
/// the labels' folders at the target are as before it, and after an APPEND the archive
/// folder has grown.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_copying_the_archive_duplicates_nothing() {
    for (seed, point) in [(82, "after-append:1"), (83, "mid-fetch:4")] {
        let g = start(seed).await;
        let state = temp_dir("state");
        g.crash_in_the_archive(&state, point).await;
        g.run(&state);
        g.assert_exactly_once().await;

        g.add(seed * 10, 2, 6).await;
        g.crash_in_the_archive(&state, point).await;
        g.run(&state);
        g.assert_exactly_once().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archive_folder_can_be_named_or_left_behind() {
    let g = start(84).await;
    let named = g
        .migrate(&temp_dir("state"))
        .args(["--archive-folder", "Old/Archived"])
        .run();
    assert_eq!(named.status.code(), Some(0), "{}", text(&named));
    let mut s = session(g.dst.port, USER, PASSWORD).await;
    let archived = mail::contents(&mut s, &wire_name("Old/Archived", '/')).await;
    assert_eq!(archived.len(), 15);
    s.logout().await;

    let g = start(85).await;
    let out = g
        .migrate(&temp_dir("state"))
        .args(["--exclude", "[Gmail]/All Mail"])
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let folders = mail::folder_names(g.dst.port, USER, PASSWORD).await;
    assert!(
        !folders.iter().any(|f| f == ARCHIVE_AT_TARGET),
        "{folders:?}"
    );
    assert_eq!(
        mail::message_count(g.dst.port, USER, PASSWORD).await,
        68,
        "the labels' 68 messages, none of the archive"
    );

    // An excluded label's mail is not archived mail: it stays behind, too.
    let g = start(86).await;
    let out = g
        .migrate(&temp_dir("state"))
        .args(["--exclude", "Work"])
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut s = session(g.dst.port, USER, PASSWORD).await;
    let archived = mail::contents(&mut s, &wire_name(ARCHIVE_AT_TARGET, '/')).await;
    assert_eq!(archived.len(), 15, "only the archived messages");
    s.logout().await;
    assert_eq!(
        mail::message_count(g.dst.port, USER, PASSWORD).await,
        83 - 15,
        "every message but Work's 15 (5 of which are in Archive too)"
    );
}

/// Gmail's own way, with `X-GM-EXT-1`: a message's labels say where it is, and the
/// other folders are not read. No server but Gmail has the extension, so a relay in
/// front of the Gmail-playing Dovecot (`tests/src/hostile.rs`) announces it and answers
/// `UID FETCH … (UID X-GM-LABELS)` with the labels each All Mail message has there (its
/// label folder by content; `\Inbox` for INBOX, `\Important` beside some, none for the
/// archived): what Gmail would say. Everything else is the real server.
#[tokio::test(flavor = "multi_thread")]
async fn with_gmail_labels_archived_mail_is_told_apart_by_its_labels() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use mailferry_tests::hostile::{script, HostileServer, Play};

    let g = start(87).await;
    // The labels of each All Mail message, as Gmail would give them.
    let mut s = session(g.src.port, USER, PASSWORD).await;
    let mut by_content: HashMap<(String, Option<i64>), Vec<&str>> = HashMap::new();
    for label in LABELS.iter().copied().chain([ARCHIVED]) {
        for m in mail::contents(&mut s, &wire_name(label, '/')).await {
            by_content
                .entry((m.sha256, m.date))
                .or_default()
                .push(label);
        }
    }
    let all_mail = mail::uids_and_contents(&mut s, &wire_name("[Gmail]/All Mail", '/')).await;
    s.logout().await;
    let mut labels: HashMap<u32, String> = HashMap::new();
    for (i, (uid, m)) in all_mail.into_iter().enumerate() {
        let folders = by_content.get_mut(&(m.sha256, m.date)).expect("its folder");
        let label = match folders.pop().expect("as many as in All Mail") {
            l if l == ARCHIVED => String::new(),
            "INBOX" => "\\Inbox".to_string(),
            l => format!("\"{l}\""),
        };
        let important = if i % 3 == 0 { "\\Important " } else { "" };
        labels.insert(uid, format!("{important}{label}").trim().to_string());
    }
    assert_eq!(
        labels
            .values()
            .filter(|l| l.is_empty() || *l == "\\Important")
            .count(),
        15
    );

    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let relay = HostileServer::start(
        g.src.port,
        script(move |m| {
            let text = String::from_utf8_lossy(m.response);
            if text.contains("CAPABILITY IMAP4rev1 ") {
                let announced = text.replacen("IMAP4rev1 ", "IMAP4rev1 X-GM-EXT-1 ", 1);
                return Some(vec![Play::Send(announced.into_bytes())]);
            }
            // Dovecot refuses the item it does not know; Gmail would answer it.
            let (tag, _) = text.split_once(' ')?;
            if tag == "*" || !m.command.contains("X-GM-LABELS") {
                return None;
            }
            let set = m.command.split_whitespace().nth(2)?;
            let uids = mailferry_shared::imap::uidset::parse(set)?;
            counter.fetch_add(1, Ordering::SeqCst);
            let mut answer = String::new();
            for (n, uid) in uids.iter().enumerate() {
                if let Some(l) = labels.get(uid) {
                    answer.push_str(&format!(
                        "* {} FETCH (UID {uid} X-GM-LABELS ({l}))\r\n",
                        n + 1
                    ));
                }
            }
            answer.push_str(&format!("{tag} OK Success\r\n"));
            Some(vec![Play::Send(answer.into_bytes())])
        }),
    )
    .await;
    let state = temp_dir("state");
    let out = Migrate::new(relay.port, g.dst.port, USER, &state)
        .passwords(PASSWORD, PASSWORD)
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        asked.load(Ordering::SeqCst) > 0,
        "the labels were never asked for"
    );
    g.assert_exactly_once().await;
}
