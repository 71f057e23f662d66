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

#[tokio::test(flavor = "multi_thread")]
async fn copies_every_message_byte_for_byte_and_reruns_are_incremental() {
    let (src, dst) = pair('/');
    let messages = corpus(7, 12);
    mail::load(src.port, "alice", &src.password("alice"), '/', &messages).await;
    let state = temp_dir("state");
    let run = || {
        Migrate::new(src.port, dst.port, "alice", &state).passwords("alice-secret", "alice-secret")
    };
    let pair = Pair {
        source_port: src.port,
        target_port: dst.port,
        user: "alice",
        password: "alice-secret",
        source_delimiter: '/',
        target_delimiter: '/',
    };

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
    let mut s = mail::session(src.port, "alice", "alice-secret").await;
    s.open(b"INBOX", false).await.unwrap();
    s.run(mailferry_shared::imap::Command::new("UID STORE").raw(" 1:3 +FLAGS (\\Flagged Work)"))
        .await
        .unwrap();
    s.run(
        mailferry_shared::imap::Command::new("UID STORE")
            .raw(" 4 -FLAGS (\\Seen \\Answered \\Flagged \\Draft $Forwarded NonJunk Work)"),
    )
    .await
    .unwrap();
    let newer = TestMessage {
        folder: "INBOX".into(),
        bytes: b"From: x@example.org\r\nSubject: later\r\n\r\nnew\r\n".to_vec(),
        flags: vec!["\\Seen".into()],
        date: "01-Feb-2026 10:00:00 +0000".into(),
    };
    mail::append_all(&mut s, '/', std::slice::from_ref(&newer)).await;
    s.logout().await;
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
