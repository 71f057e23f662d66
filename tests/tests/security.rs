//! Connection security and logins: certificates verified by default, a CA file to trust
//! a private CA, STARTTLS that is mandatory once chosen, and admin logins.

use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair};
use mailferry_tests::run::{text, Migrate};

fn tls_server() -> Dovecot {
    Dovecot::start(DovecotConfig {
        tls: true,
        ..DovecotConfig::default()
    })
}

/// Replaces the source's `--source-security plain` with other security flags.
fn with_source_security(mut m: Migrate, port: u16, flags: &[&str]) -> Migrate {
    let at = m.args.iter().position(|a| a == "--source").unwrap();
    m.args[at + 1] = format!("127.0.0.1:{port}");
    let at = m
        .args
        .iter()
        .position(|a| a == "--source-security")
        .unwrap();
    m.args.drain(at..at + 2);
    for f in flags {
        m.args.push(f.to_string());
    }
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_certificate_is_refused_unless_its_ca_is_given() {
    let src = tls_server();
    let dst = Dovecot::start(DovecotConfig::default());
    let messages = corpus(41, 2);
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    let imaps = src.imaps_port.unwrap();
    let base = || {
        Migrate::new(src.port, dst.port, "alice", &state).passwords("alice-secret", "alice-secret")
    };

    let out = with_source_security(base(), imaps, &["--source-security", "tls"]).run();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("TLS certificate of 127.0.0.1 rejected"),
        "{}",
        text(&out)
    );

    let ca = src.ca.as_ref().unwrap().ca_cert.display().to_string();
    let out = with_source_security(
        base(),
        imaps,
        &["--source-security", "tls", "--source-ca-file", &ca],
    )
    .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");
    assert_same_mail(&pair, &messages, |p| p.to_string()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_is_used_when_offered_and_an_error_when_not() {
    let with_tls = tls_server();
    let without = Dovecot::start(DovecotConfig::default());
    let dst = Dovecot::start(DovecotConfig::default());
    let state = temp_dir("state");
    let ca = with_tls.ca.as_ref().unwrap().ca_cert.display().to_string();

    let m = Migrate::new(with_tls.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret");
    let out = with_source_security(
        m,
        with_tls.port,
        &["--source-security", "starttls", "--source-ca-file", &ca],
    )
    .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let m = Migrate::new(without.port, dst.port, "alice", &state)
        .passwords("alice-secret", "alice-secret");
    let out = with_source_security(m, without.port, &["--source-security", "starttls"]).run();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("does not offer STARTTLS"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_logins_master_user_and_sasl_authorization_identity() {
    let admin = Some(("migrator".to_string(), "admin-secret".to_string()));
    let src = Dovecot::start(DovecotConfig {
        master: admin.clone(),
        ..DovecotConfig::default()
    });
    let dst = Dovecot::start(DovecotConfig {
        master: admin,
        ..DovecotConfig::default()
    });
    let messages = corpus(42, 2);
    mail::load(src.port, "alice", "alice-secret", '/', &messages).await;
    let state = temp_dir("state");
    // Dovecot-style user*master at the source, SASL PLAIN with an authorization identity
    // at the target: neither uses alice's own password.
    let out = Migrate::new(src.port, dst.port, "alice", &state)
        .passwords("admin-secret", "admin-secret")
        .arg("--source-auth")
        .arg("master:migrator")
        .arg("--target-auth")
        .arg("admin:migrator")
        .run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pair = Pair::dovecots(&src, &dst, "alice", "alice-secret");
    assert_same_mail(&pair, &messages, |p| p.to_string()).await;
}

/// A running mailferry keeps its memory — the passwords it holds — out of any core
/// dump it may leave (issue 19, finding 10): its coredump_filter is 0. Checked on a
/// `migrate` waiting for a source that accepts and never greets.
#[test]
fn a_running_mailferry_keeps_its_memory_out_of_core_dumps() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let state = temp_dir("state");
    let mut child = Migrate::new(port, port, "alice", &state)
        .passwords("alice-secret", "alice-secret")
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let filter = format!("/proc/{}/coredump_filter", child.id());
    let _conn = silent.accept().unwrap(); // it is running, and past its start
    let value = std::fs::read_to_string(&filter).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        u32::from_str_radix(value.trim(), 16),
        Ok(0),
        "{filter}: {value}"
    );
}
