//! Migrations between two IMAP implementations: Cyrus ('.' delimiter, folders under
//! "INBOX.", no special-use attributes on plain folders) and Dovecot ('/', no prefix).

use mailferry_tests::cyrus::Cyrus;
use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair, TestMessage, FOLDERS};
use mailferry_tests::run::{text, Migrate};

/// Cyrus refuses bare line feeds and NUL bytes in messages.
fn cyrus_accepts(m: &TestMessage) -> bool {
    let bare_lf = m
        .bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || m.bytes[i - 1] != b'\r'));
    !bare_lf && !m.bytes.contains(&0)
}

#[tokio::test(flavor = "multi_thread")]
async fn cyrus_to_dovecot_maps_the_namespace_and_delimiter() {
    let src = Cyrus::start();
    let dst = Dovecot::start(DovecotConfig::default());
    // "v1.2 notes" cannot exist under Cyrus's '.' delimiter as one level.
    let folders: Vec<&str> = FOLDERS
        .iter()
        .copied()
        .filter(|f| !f.contains('.'))
        .collect();
    let messages: Vec<TestMessage> = corpus(61, 8)
        .into_iter()
        .filter(|m| folders.contains(&m.folder.as_str()) && cyrus_accepts(m))
        .collect();
    mail::load_in(
        src.port,
        "alice",
        "any",
        Cyrus::DELIMITER,
        Cyrus::PREFIX,
        &folders,
        &messages,
    )
    .await;
    let state = temp_dir("state");
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("any", "alice-secret")
        .arg("--fetch-batch")
        .arg("5")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair {
        source_port: src.port,
        target_port: dst.port,
        user: "alice",
        password: "alice-secret",
        source_delimiter: Cyrus::DELIMITER,
        target_delimiter: '/',
        source_prefix: Cyrus::PREFIX,
        target_prefix: "",
    };
    assert_same_mail(&pair, &messages, |p| p.to_string()).await;
    // and a second run has nothing to do
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("any", "alice-secret")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("copied 0 messages"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dovecot_to_cyrus_escapes_dots_and_nests_under_inbox() {
    let src = Dovecot::start(DovecotConfig::default());
    let dst = Cyrus::start();
    let messages = corpus(62, 8);
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .run();
    // Dovecot stores bare LFs as CRLF and NUL as 0x80, so Cyrus takes every message.
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair {
        source_port: src.port,
        target_port: dst.port,
        user: "alice",
        password: "alice-secret",
        source_delimiter: '/',
        target_delimiter: Cyrus::DELIMITER,
        source_prefix: "",
        target_prefix: Cyrus::PREFIX,
    };
    assert_same_mail(&pair, &messages, |p| p.replace('.', "\u{2024}")).await;
    let names = mail::folder_names(dst.port, "alice", "alice-secret").await;
    assert!(
        names.contains(&"INBOX.Проекты.Отчёты".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"INBOX.v1\u{2024}2 notes".to_string()),
        "{names:?}"
    );
}
