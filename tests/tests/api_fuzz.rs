//! Property-based fuzzing of the HTTP API against its own OpenAPI document, with
//! schemathesis (PyPI) and a real coordinator: no answer may be a 5xx, and every status,
//! content type and body must be the one the document describes; requests without a
//! token must be refused, deleted objects must be gone, created ones must be there.
//! The document's links (an endpoint made → tested, shown, deleted; a user added →
//! shown, edited, removed) and a batch made beforehand (batches cannot be deleted) let
//! the fuzzing reach objects that exist, not only 404s. The event stream, which never ends, is
//! left to `tests/tests/api.rs`.
//!
//! Needs schemathesis in `$MAILFERRY_TOOLS/st-venv`: `tests/run-all.sh` installs it.

use std::path::PathBuf;
use std::process::Command;

use mailferry_tests::api::{ApiRig, RigOptions, ACME};

fn schemathesis() -> PathBuf {
    let tools =
        std::env::var("MAILFERRY_TOOLS").unwrap_or_else(|_| "/var/tmp/mailferry-tools".into());
    let bin = PathBuf::from(tools).join("st-venv/bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} is missing: run tests/run-all.sh once",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzing_the_api_from_its_openapi_document_finds_no_server_error() {
    let st = schemathesis();
    let rig = ApiRig::start(RigOptions::default()).await;
    // One batch of the tenant's for the operations on a batch: fuzzed endpoint ids
    // rarely name an endpoint, so a fuzzed POST /batches rarely makes one.
    let acme = rig.client(ACME);
    let made = |answer: mailferry_coordinator::client::Answer| {
        assert_eq!(answer.status, 201, "{}", answer.text());
        answer.json().unwrap()["id"].as_str().unwrap().to_string()
    };
    let closed_port = mailferry_tests::dovecot::free_port();
    let source = made(
        acme.post_json(
            "/api/v1/endpoints",
            &serde_json::json!({"name": "closed", "role": "source", "host": "127.0.0.1", "port": closed_port, "security": "plain"}),
        )
        .await
        .unwrap(),
    );
    let target = made(
        acme.post_json("/api/v1/endpoints", &rig.target_endpoint())
            .await
            .unwrap(),
    );
    let batch = made(
        acme.post_json(
            "/api/v1/batches",
            &serde_json::json!({"name": "fuzz", "source_endpoint": source, "target_endpoint": target}),
        )
        .await
        .unwrap(),
    );
    let config = rig.dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!("headers = {{ Authorization = \"Bearer {ACME}\" }}\n[parameters]\nbatch = \"{batch}\"\n"),
    )
    .unwrap();
    let report = rig.dir.join("schemathesis");
    let out = Command::new(st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", rig.base_url()))
        .args(["--url", &format!("{}/api/v1", rig.base_url())])
        .args(["--checks", "all"])
        .args([
            "--exclude-checks",
            "positive_data_acceptance,object_level_authorization",
        ])
        .args(["--exclude-path", "/batches/{batch}/events"])
        .args([
            "--max-examples",
            "60",
            "--workers",
            "2",
            "--request-timeout",
            "30",
        ])
        .args(["--seed", "20261201"])
        .args(["--report", "junit", "--report-dir"])
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("running schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "schemathesis found problems (report in {}):\n{text}\ncoordinator log tail:\n{}",
        report.display(),
        rig.log("coordinator")
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = rig.log("coordinator");
    assert!(
        !log.contains("panicked"),
        "the coordinator panicked:\n{log}"
    );
    rig.clean_up().await;
}
