//! The web console end to end: headless Chromium (Debian's) driven by playwright-core
//! (`tests/console/e2e.cjs`) through the admin's whole flow against a real coordinator,
//! a worker, RabbitMQ, Redis and a Dovecot pair; then the mail is verified at the
//! target. Screenshots are kept in `$MAILFERRY_ARTIFACTS/console` (default: the rig's
//! directory), as the test prints.
//!
//! Needs `chromium` and playwright-core: `tests/run-all.sh` installs both
//! (playwright-core into `$MAILFERRY_TOOLS/console/node_modules`).

use std::path::PathBuf;
use std::process::Command;

use mailferry_tests::api::{ApiRig, RigOptions, ACME, CANARY, MASTER};
use mailferry_tests::mail::{self, Pair};

fn node_modules() -> PathBuf {
    let tools =
        std::env::var("MAILFERRY_TOOLS").unwrap_or_else(|_| "/var/tmp/mailferry-tools".into());
    let dir = PathBuf::from(tools).join("console/node_modules");
    assert!(
        dir.join("playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
        "playwright-core ({}) or /usr/bin/chromium is missing: run tests/run-all.sh once",
        dir.display()
    );
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_clicks_through_the_whole_migration_in_the_console() {
    let modules = node_modules();
    let rig = ApiRig::start(RigOptions {
        per_folder: 3,
        workers: 1,
        ..RigOptions::default()
    })
    .await;
    let shots = match std::env::var_os("MAILFERRY_ARTIFACTS") {
        Some(dir) => PathBuf::from(dir).join("console"),
        None => rig.dir.join("screenshots"),
    };
    std::fs::create_dir_all(&shots).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("console/e2e.cjs");
    let out = Command::new("node")
        .arg(&script)
        .env("NODE_MODULES", &modules)
        .env("BASE_URL", rig.base_url())
        .env("TOKEN", ACME)
        .env("SOURCE_PORT", rig.src.port.to_string())
        .env("TARGET_PORT", rig.dst.port.to_string())
        .env("MASTER_USER", MASTER.0)
        .env("MASTER_PASSWORD", MASTER.1)
        .env("ALICE_PASSWORD", CANARY)
        .env("BOB_PASSWORD", &rig.users[1].1)
        .env("SHOTS", &shots)
        .output()
        .expect("running node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("screenshots: {}", shots.display());
    assert!(
        out.status.success(),
        "the console flow failed:\n{text}\ncoordinator log:\n{}",
        rig.log("coordinator")
    );
    assert!(text.contains("console e2e: ok"), "{text}");
    for (login, password, messages) in &rig.users {
        let pair = Pair::dovecots(&rig.src, &rig.dst, login, password);
        mail::assert_same_mail(&pair, messages, |p| p.to_string()).await;
    }
    // alice was closed: her stored credentials are gone, and her password is nowhere.
    let store = mailferry_shared::redis::RedisStore::connect(
        &mailferry_shared::secret::Secret::new("redis://127.0.0.1:6379/0"),
        &rig.prefix,
    )
    .await
    .unwrap();
    let batches = store.batches().await.unwrap();
    assert_eq!(batches.len(), 1);
    let alice = store.user(&batches[0], "alice@example.com").await.unwrap();
    assert!(
        alice.is_none_or(|r| r.source_secret.is_none()),
        "alice's credentials outlived Close"
    );
    rig.assert_no_canary_at_rest().await;
    rig.clean_up().await;
}
