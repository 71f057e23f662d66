//! Every IMAP command one small user's migration sends, counted on the wire.
//!
//! A relay in front of each real Dovecot records the client's commands. The first pass
//! and the no-op pass of one user are held to a budget per command, in terms of the
//! mailbox's folders: a change that adds a command per folder or per user fails here,
//! and the table it prints shows where. docs/design.md ("IMAP commands per user") says
//! why each command is sent.

use std::collections::{BTreeMap, BTreeSet};

use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::hostile::{HostileServer, Sent};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair, FOLDERS};
use mailferry_tests::run::{text, Migrate};

/// Command name → how many times it was sent.
fn tally(sent: &[Sent]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in sent {
        *out.entry(s.name()).or_insert(0) += 1;
    }
    out
}

/// Fails, with the whole conversation, where a command was sent more often than its
/// budget allows or one outside the budget was sent at all; and where `seen` (a
/// command and its count) was not sent exactly so often, which proves the relay saw the
/// pass (a relay that recorded nothing would be within any budget).
fn assert_within(side: &str, sent: &[Sent], budget: &[(&str, usize)], seen: (&str, usize)) {
    let counted = tally(sent);
    let budget: BTreeMap<&str, usize> = budget.iter().copied().collect();
    let mut table = format!("{side}: command, sent, budget\n");
    let mut over = Vec::new();
    for (name, &n) in &counted {
        let allowed = budget.get(name.as_str()).copied().unwrap_or(0);
        table.push_str(&format!("  {name:<14} {n:>4} {allowed:>6}\n"));
        if n > allowed {
            over.push(format!("{name}: {n} > {allowed}"));
        }
    }
    eprintln!("{table}");
    let conversation: String = sent
        .iter()
        .map(|c| {
            format!(
                "  [{}] {}\n",
                c.connection,
                &c.line[..c.line.len().min(120)]
            )
        })
        .collect();
    assert!(
        over.is_empty(),
        "{side} over budget: {over:?}\n{table}{conversation}"
    );
    assert_eq!(
        counted.get(seen.0).copied().unwrap_or(0),
        seen.1,
        "{side}: {} not seen as often as the pass needs\n{table}{conversation}",
        seen.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_small_users_first_and_no_op_passes_send_only_the_commands_accounted_for() {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig::default());
    let messages = corpus(31, 2);
    mail::load(src.port, "alice", &src.password("alice"), '/', &messages).await;
    // What the budget is counted in: folders holding mail (each one job), and folders
    // the target lacks (each one CREATE and one SUBSCRIBE, parents included).
    let with_mail: BTreeSet<&str> = messages.iter().map(|m| m.folder.as_str()).collect();
    let mut to_create: BTreeSet<String> = BTreeSet::new();
    for folder in FOLDERS.iter().filter(|f| **f != "INBOX") {
        let levels: Vec<&str> = folder.split('/').collect();
        for depth in 1..=levels.len() {
            to_create.insert(levels[..depth].join("/"));
        }
    }
    to_create.remove("INBOX");
    let (jobs, created) = (with_mail.len(), to_create.len());
    assert!(
        jobs >= 10 && created > jobs,
        "the corpus changed: {jobs} {created}"
    );

    let (src_relay, dst_relay) = (
        HostileServer::recording(src.port).await,
        HostileServer::recording(dst.port).await,
    );
    let state = temp_dir("state");
    let run = || {
        Migrate::new(src_relay.port, dst_relay.port, "alice", &state)
            .passwords("alice-secret", "alice-secret")
            .run()
    };
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");
    assert_same_mail(&pair, &messages, |p| p.to_string()).await;
    let (src_first, dst_first) = (src_relay.sent(), dst_relay.sent());

    // A first pass: one login a side (the small folders run as one bundle, on one
    // connection), one LIST that brings every folder's STATUS along (LIST-STATUS), and
    // per folder what the copy itself needs.
    assert_within(
        "source, first pass",
        &src_first,
        &[
            ("AUTHENTICATE", 1),
            ("LIST", 1),
            ("NAMESPACE", 1),
            ("EXAMINE", jobs),
            ("UID FETCH", 2 * jobs),
            ("LOGOUT", 1),
        ],
        ("EXAMINE", jobs),
    );
    assert_within(
        "target, first pass",
        &dst_first,
        &[
            ("AUTHENTICATE", 1),
            ("LIST", 1),
            ("NAMESPACE", 1),
            ("CREATE", created),
            ("SUBSCRIBE", created),
            ("SELECT", jobs),
            ("APPEND", jobs),
            // The count at the end is the EXISTS Dovecot announces after an APPEND.
            ("STATUS", 0),
            ("LOGOUT", 1),
        ],
        ("APPEND", jobs),
    );

    // A pass with nothing to do: the listing alone shows every folder is current.
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let no_op = [
        ("AUTHENTICATE", 1),
        ("LIST", 1),
        ("NAMESPACE", 1),
        ("LOGOUT", 1),
    ];
    let src_no_op = &src_relay.sent()[src_first.len()..];
    let dst_no_op = &dst_relay.sent()[dst_first.len()..];
    assert_within("source, no-op pass", src_no_op, &no_op, ("LIST", 1));
    assert_within("target, no-op pass", dst_no_op, &no_op, ("LIST", 1));
    assert_same_mail(&pair, &messages, |p| p.to_string()).await;
}
