//! The admin's HTTP API against a real coordinator (and workers), RabbitMQ, Redis and
//! a Dovecot pair: the whole workflow, tenants kept apart, errors a person can act on,
//! CSV imports and connection tests that name what went wrong.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mailferry_coordinator::client::{Answer, ApiClient};
use mailferry_tests::api::{checked, ApiRig, RigOptions, ACME, CANARY, GLOBEX, MASTER};
use mailferry_tests::dovecot::{free_port, Dovecot, DovecotConfig, ARCHIVED};
use mailferry_tests::mail::{self, corpus, Pair};
use serde_json::{json, Value};

/// The JSON of a successful answer with the expected status (and no password in it).
fn expect(answer: Answer, status: u16) -> Value {
    let text = checked(&answer);
    assert_eq!(answer.status, status, "{text}");
    if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }
}

/// An error answer: its status and its stable code, returning the message.
fn expect_error(answer: Answer, status: u16, code: &str) -> String {
    let body = expect(answer, status);
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap().to_string();
    assert!(!message.is_empty());
    message
}

async fn post(client: &ApiClient, path: &str, body: Value) -> Answer {
    client.post_json(path, &body).await.unwrap()
}

async fn get(client: &ApiClient, path: &str) -> Answer {
    client.get(path).await.unwrap()
}

/// Makes the rig's two endpoints and a batch of them; returns (source, target, batch).
/// Imports a CSV of users into batch `b`; the answer (added, errors) of a 200.
async fn import_csv(client: &ApiClient, b: &str, csv: String) -> Value {
    expect(
        client
            .call(
                "POST",
                &format!("/api/v1/batches/{b}/users/import"),
                Some(("text/csv", csv.into_bytes())),
            )
            .await
            .unwrap(),
        200,
    )
}

async fn batch_of(rig: &ApiRig, client: &ApiClient) -> (String, String, String) {
    let source = expect(
        post(client, "/api/v1/endpoints", rig.source_endpoint()).await,
        201,
    );
    let target = expect(
        post(client, "/api/v1/endpoints", rig.target_endpoint()).await,
        201,
    );
    let batch = expect(
        post(
            client,
            "/api/v1/batches",
            json!({"name": "Sales", "source_endpoint": source["id"], "target_endpoint": target["id"], "sync_interval_secs": 3600}),
        )
        .await,
        201,
    );
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    (id(&source), id(&target), id(&batch))
}

/// The admin's whole workflow through the API: endpoints made and tested (a wrong
/// password named as such), users imported from a CSV with a bad row and one without a
/// password (refused at start until it is given), both migrated by a worker, the live
/// event stream showing them synced, the user's detail and the reports telling the
/// counts, the mail at the target equal to the source — and alice's password in no
/// answer, event, log line or Redis value.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_migrates_a_batch_through_the_api_and_no_password_comes_out() {
    let rig = ApiRig::start(RigOptions {
        per_folder: 3,
        workers: 1,
        ..RigOptions::default()
    })
    .await;
    let acme = rig.client(ACME);

    let source = expect(
        post(&acme, "/api/v1/endpoints", rig.source_endpoint()).await,
        201,
    );
    let sid = source["id"].as_str().unwrap();
    let ok = expect(
        post(
            &acme,
            &format!("/api/v1/endpoints/{sid}/test"),
            json!({"login": "alice@example.com", "password": CANARY}),
        )
        .await,
        200,
    );
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(
        ok["capabilities"].as_array().unwrap().iter().any(|c| c
            .as_str()
            .is_some_and(|c| c.eq_ignore_ascii_case("IMAP4rev1"))),
        "{ok}"
    );
    let wrong = expect(
        post(
            &acme,
            &format!("/api/v1/endpoints/{sid}/test"),
            json!({"login": "alice@example.com", "password": "not-it"}),
        )
        .await,
        200,
    );
    assert_eq!(wrong["ok"], false);
    assert_eq!(
        wrong["failure"]["code"], "authentication_rejected",
        "{wrong}"
    );
    assert!(
        wrong["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("Authentication failed"),
        "the server's own words: {wrong}"
    );

    let target = expect(
        post(&acme, "/api/v1/endpoints", rig.target_endpoint()).await,
        201,
    );
    assert_eq!(target["has_admin_password"], true);
    assert!(
        !target.to_string().contains(MASTER.1),
        "the master password came back"
    );
    let tid = target["id"].as_str().unwrap();
    let ok = expect(
        post(
            &acme,
            &format!("/api/v1/endpoints/{tid}/test"),
            json!({"login": "bob@example.com"}),
        )
        .await,
        200,
    );
    assert_eq!(ok["ok"], true, "the master user logs in for bob: {ok}");

    let batch = expect(
        post(
            &acme,
            "/api/v1/batches",
            json!({"name": "Sales", "source_endpoint": sid, "target_endpoint": tid}),
        )
        .await,
        201,
    );
    let b = batch["id"].as_str().unwrap().to_string();
    let csv = format!(
        "EmailAddress,UserName,Password\nalice@example.com,alice@example.com,{CANARY}\nbroken,x,y\nbob@example.com,bob@example.com,\n"
    );
    let import = import_csv(&acme, &b, csv).await;
    assert_eq!(import["added"], 2, "{import}");
    assert_eq!(import["errors"][0]["line"], 3, "{import}");
    assert!(import["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("not an email address"));

    // Live events from here on, until both users are synced.
    let watcher = {
        let client = rig.client(ACME);
        let path = format!("/api/v1/batches/{b}/events");
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut synced = BTreeSet::new();
            let outcome = tokio::time::timeout(
                Duration::from_secs(180),
                client.events(&path, |event, data| {
                    seen.push((event.to_string(), data.to_string()));
                    if event == "user" {
                        let user: Value = serde_json::from_str(data).unwrap();
                        if user["status"] == "synced" {
                            synced.insert(user["id"].as_str().unwrap().to_string());
                        }
                    }
                    synced.len() < 2
                }),
            )
            .await;
            (outcome.is_ok(), seen)
        })
    };

    let started = expect(
        post(&acme, &format!("/api/v1/batches/{b}/start"), json!({})).await,
        200,
    );
    assert_eq!(
        started["applied"],
        json!(["alice@example.com"]),
        "{started}"
    );
    assert_eq!(started["refused"][0]["user"], "bob@example.com");
    assert!(started["refused"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("no source password"));
    let started = expect(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/start"),
            json!({"users": ["bob@example.com"], "source_passwords": {"bob@example.com": "bob-source-pw"}}),
        )
        .await,
        200,
    );
    assert_eq!(started["applied"], json!(["bob@example.com"]), "{started}");

    let (finished, events) = watcher.await.unwrap();
    assert!(
        finished,
        "the event stream did not show both users synced: {events:?}\n{}",
        rig.log("coordinator")
    );
    for (_, data) in &events {
        assert!(!data.contains(CANARY), "an event shows the password");
    }
    let statuses: Vec<Value> = events
        .iter()
        .filter(|(e, _)| e == "user")
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        statuses.iter().any(|u| u["status"] == "notstarted"
            || u["status"] == "starting"
            || u["status"] == "queued"
            || u["status"] == "syncing"),
        "the stream showed the way to synced, not only the end: {statuses:?}"
    );
    assert!(events.iter().any(|(e, _)| e == "summary"));

    let page = expect(get(&acme, &format!("/api/v1/batches/{b}/users")).await, 200);
    assert_eq!(page["total"], 2);
    for user in page["users"].as_array().unwrap() {
        assert_eq!(user["status"], "synced", "{user}");
    }
    let alice_messages = rig.users[0].2.len() as u64;
    let detail = expect(
        get(
            &acme,
            &format!("/api/v1/batches/{b}/users/alice@example.com"),
        )
        .await,
        200,
    );
    assert_eq!(detail["copied"], alice_messages, "{detail}");
    assert_eq!(detail["has_source_password"], true);
    let folders = detail["folders"].as_array().unwrap();
    let corpus_folders: BTreeSet<&str> = rig.users[0].2.iter().map(|m| m.folder.as_str()).collect();
    for name in &corpus_folders {
        assert!(
            folders.iter().any(|f| f["source"] == *name),
            "{name} missing: {detail}"
        );
    }
    let at_target: u64 = folders
        .iter()
        .map(|f| f["at_target"].as_u64().unwrap())
        .sum();
    assert_eq!(at_target, alice_messages, "{detail}");
    assert!(
        folders
            .iter()
            .all(|f| f["state"] == "done" && f["verified"] == true),
        "{detail}"
    );
    assert!(detail["last_synced_ms"].as_u64().is_some());

    let summary = expect(get(&acme, &format!("/api/v1/batches/{b}")).await, 200);
    assert_eq!(
        summary["summary"]["users_by_status"]["synced"], 2,
        "{summary}"
    );
    let total: u64 = rig.users.iter().map(|u| u.2.len() as u64).sum();
    assert_eq!(summary["summary"]["copied"], total);
    let report = get(&acme, &format!("/api/v1/batches/{b}/report.csv")).await;
    assert_eq!(report.status, 200);
    assert!(report.content_type.starts_with("text/csv"));
    let csv = checked(&report);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].starts_with("user,status,reason,copied"));
    assert!(
        rows[1].starts_with(&format!("alice@example.com,synced,,{alice_messages},")),
        "{csv}"
    );
    let report = expect(
        get(&acme, &format!("/api/v1/batches/{b}/report.json")).await,
        200,
    );
    assert_eq!(report["summary"]["users"], 2);

    for (login, password, messages) in &rig.users {
        let pair = Pair::dovecots(&rig.src, &rig.dst, login, password);
        mail::assert_same_mail(&pair, messages, |p| p.to_string()).await;
    }
    rig.assert_no_canary_at_rest().await;
    rig.clean_up().await;
}

/// Tokens name tenants and tenants see only their own: another tenant's batch,
/// endpoint, users, events and actions answer 404 as if they did not exist; and every
/// mistake is a JSON error with a stable code.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_are_kept_apart_and_mistakes_are_json_errors() {
    let rig = ApiRig::start(RigOptions::default()).await;
    let acme = rig.client(ACME);
    let globex = rig.client(GLOBEX);

    let nobody =
        ApiClient::new(&rig.base_url(), mailferry_shared::secret::Secret::new("")).unwrap();
    let answer = get(&nobody, "/api/v1/batches").await;
    expect_error(answer, 401, "unauthorized");
    let guess = rig.client(&ACME.replace('4', "5"));
    expect_error(get(&guess, "/api/v1/batches").await, 401, "unauthorized");

    let (source, target, b) = batch_of(&rig, &acme).await;
    let user = expect(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": "carol@example.com", "source_password": "pw"}),
        )
        .await,
        201,
    );
    assert_eq!(user["has_source_password"], true);
    assert_eq!(
        user["has_target_password"], true,
        "the master password serves carol"
    );

    assert_eq!(
        expect(get(&globex, "/api/v1/batches").await, 200),
        json!([])
    );
    assert_eq!(
        expect(get(&globex, "/api/v1/endpoints").await, 200),
        json!([])
    );
    for path in [
        format!("/api/v1/batches/{b}"),
        format!("/api/v1/batches/{b}/users"),
        format!("/api/v1/batches/{b}/users/carol@example.com"),
        format!("/api/v1/batches/{b}/report.csv"),
        format!("/api/v1/batches/{b}/events"),
        format!("/api/v1/endpoints/{source}"),
    ] {
        expect_error(get(&globex, &path).await, 404, "not_found");
    }
    for verb in ["start", "stop", "sync-now", "close"] {
        expect_error(
            post(&globex, &format!("/api/v1/batches/{b}/{verb}"), json!({})).await,
            404,
            "not_found",
        );
    }
    expect_error(
        post(
            &globex,
            &format!("/api/v1/endpoints/{source}/test"),
            json!({"login": "x", "password": "y"}),
        )
        .await,
        404,
        "not_found",
    );
    expect_error(
        globex
            .call("DELETE", &format!("/api/v1/endpoints/{target}"), None)
            .await
            .unwrap(),
        404,
        "not_found",
    );
    expect_error(
        globex
            .call(
                "DELETE",
                &format!("/api/v1/batches/{b}/users/carol@example.com"),
                None,
            )
            .await
            .unwrap(),
        404,
        "not_found",
    );
    let theft = post(
        &globex,
        "/api/v1/batches",
        json!({"name": "x", "source_endpoint": source, "target_endpoint": target}),
    )
    .await;
    expect_error(theft, 422, "invalid");
    // acme still has everything
    expect(
        get(
            &acme,
            &format!("/api/v1/batches/{b}/users/carol@example.com"),
        )
        .await,
        200,
    );
    expect(
        get(&acme, &format!("/api/v1/endpoints/{source}")).await,
        200,
    );

    // Mistakes, each with its code.
    let bad_json = acme
        .call(
            "POST",
            "/api/v1/batches",
            Some(("application/json", b"{\"name\":".to_vec())),
        )
        .await
        .unwrap();
    expect_error(bad_json, 400, "bad_json");
    let no_type = acme
        .call(
            "POST",
            "/api/v1/batches",
            Some(("text/plain", b"{}".to_vec())),
        )
        .await
        .unwrap();
    expect_error(no_type, 415, "unsupported_media_type");
    let unknown = post(
        &acme,
        "/api/v1/batches",
        json!({"name": "x", "source_endpoint": source, "target_endpoint": target, "colour": "red"}),
    )
    .await;
    assert!(expect_error(unknown, 422, "invalid").contains("colour"));
    let swapped = post(
        &acme,
        "/api/v1/batches",
        json!({"name": "x", "source_endpoint": target, "target_endpoint": source}),
    )
    .await;
    assert!(expect_error(swapped, 422, "invalid").contains("target endpoint"));
    expect_error(get(&acme, "/api/v1/no-such-thing").await, 404, "not_found");
    expect_error(
        acme.call("PUT", "/api/v1/batches", None).await.unwrap(),
        405,
        "method_not_allowed",
    );
    let batch_path = format!("/api/v1/batches/{b}");
    let edit = |body: Value| {
        acme.call(
            "PATCH",
            &batch_path,
            Some(("application/json", body.to_string().into_bytes())),
        )
    };
    expect_error(
        edit(json!({"sync_interval_secs": 1})).await.unwrap(),
        422,
        "invalid",
    );
    let edited = expect(
        edit(json!({"sync_interval_secs": 7200, "name": "Sales, March"}))
            .await
            .unwrap(),
        200,
    );
    assert_eq!(edited["sync_interval_secs"], 7200);
    assert_eq!(edited["name"], "Sales, March");
    expect_error(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": "carol@example.com"}),
        )
        .await,
        409,
        "conflict",
    );
    expect_error(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/start"),
            json!({"users": ["dave@example.com"]}),
        )
        .await,
        422,
        "invalid",
    );
    expect_error(
        get(&acme, &format!("/api/v1/batches/{b}/users?limit=0")).await,
        422,
        "invalid",
    );
    expect_error(
        get(&acme, &format!("/api/v1/batches/{b}/users?limit=x")).await,
        400,
        "bad_query",
    );
    let preset = expect(
        post(
            &acme,
            "/api/v1/endpoints",
            json!({"name": "Gmail", "role": "source", "provider": "gmail"}),
        )
        .await,
        201,
    );
    assert_eq!(preset["host"], "imap.gmail.com");
    assert!(preset["note"].as_str().unwrap().contains("app password"));
    assert_eq!(preset["max_connections"], 10, "the preset's cap: {preset}");
    let changed = expect(
        post(
            &acme,
            "/api/v1/endpoints",
            json!({"name": "Gmail, gently", "role": "source", "provider": "gmail",
                   "max_connections": 3, "max_host_connections": 40}),
        )
        .await,
        201,
    );
    assert_eq!(changed["max_connections"], 3, "{changed}");
    assert_eq!(changed["max_host_connections"], 40, "{changed}");
    let zero = post(
        &acme,
        "/api/v1/endpoints",
        json!({"name": "x", "role": "source", "provider": "gmail", "max_connections": 0}),
    )
    .await;
    assert!(expect_error(zero, 422, "invalid").contains("max_connections"));
    let bad_preset = post(
        &acme,
        "/api/v1/endpoints",
        json!({"name": "x", "role": "source", "provider": "aol"}),
    )
    .await;
    assert!(expect_error(bad_preset, 422, "invalid").contains("gmail"));
    let no_admin_password = post(&acme, "/api/v1/endpoints", json!({"name": "x", "role": "target", "host": "h", "auth": {"method": "dovecot_master", "master": "m"}})).await;
    expect_error(no_admin_password, 422, "invalid");

    // Removing: a user that is not migrating, an endpoint.
    assert_eq!(
        acme.call(
            "DELETE",
            &format!("/api/v1/batches/{b}/users/carol@example.com"),
            None
        )
        .await
        .unwrap()
        .status,
        204
    );
    expect_error(
        get(
            &acme,
            &format!("/api/v1/batches/{b}/users/carol@example.com"),
        )
        .await,
        404,
        "not_found",
    );
    assert_eq!(
        acme.call(
            "DELETE",
            &format!("/api/v1/endpoints/{}", preset["id"].as_str().unwrap()),
            None
        )
        .await
        .unwrap()
        .status,
        204
    );

    // The OpenAPI document is served without a token and names every path.
    let doc = expect(get(&nobody, "/api/v1/openapi.json").await, 200);
    assert!(doc["paths"]["/batches/{batch}/users/import"]["post"].is_object());
    // The console's page and its files.
    let page = get(&nobody, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("console.js"));
    rig.clean_up().await;
}

/// CSV imports: a wrong header fails the file and names what it found; in a file with
/// a BOM, CRLF endings and quoting, each bad row is reported with its line and the
/// good rows import (an empty password too: it is asked for at start); a second import
/// updates; and 100,000 rows import in seconds.
#[tokio::test(flavor = "multi_thread")]
async fn csv_imports_report_each_bad_row_and_take_100k_rows() {
    let rig = ApiRig::start(RigOptions::default()).await;
    let acme = rig.client(ACME);
    let (_, _, b) = batch_of(&rig, &acme).await;
    let import_path = format!("/api/v1/batches/{b}/users/import");
    let import = |body: Vec<u8>| acme.call("POST", &import_path, Some(("text/csv", body)));

    let wrong = import(b"Mail,Login,Secret\na@example.com,a,b\n".to_vec())
        .await
        .unwrap();
    assert!(expect_error(wrong, 422, "bad_csv_header").contains("Mail,Login,Secret"));
    let empty = import(Vec::new()).await.unwrap();
    expect_error(empty, 422, "bad_csv_header");

    let csv = "\u{feff}EmailAddress,UserName,Password,TargetUserName\r\n\
               ann@example.com,ann,\"pa,ss\"\"word\",\r\n\
               ben@example.com,,pw,\r\n\
               cat@example.com,cat,,\r\n\
               ANN@example.com,ann2,pw,\r\n\
               dan@example.com,dan,pw,dan.target\r\n\
               \"eve@example.com\",\"eve\",\"multi\r\nline\",\r\n";
    let r = expect(import(csv.as_bytes().to_vec()).await.unwrap(), 200);
    assert_eq!(r["added"], 4, "{r}");
    let lines: Vec<u64> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [3, 5], "{r}");
    assert!(r["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("UserName is empty"));
    assert!(r["errors"][1]["reason"]
        .as_str()
        .unwrap()
        .contains("more than once"));
    let user = |id: &str| {
        let acme = &acme;
        let path = format!("/api/v1/batches/{b}/users/{id}");
        async move { expect(get(acme, &path).await, 200) }
    };
    assert_eq!(user("cat@example.com").await["has_source_password"], false);
    assert_eq!(user("ann@example.com").await["has_source_password"], true);
    assert_eq!(user("dan@example.com").await["target_login"], "dan.target");
    assert_eq!(user("eve@example.com").await["source_login"], "eve");

    // LF endings; ann again, without a password: updated, and her password kept.
    let again = expect(
        import(b"EmailAddress,UserName,Password\nann@example.com,ann.new,\n".to_vec())
            .await
            .unwrap(),
        200,
    );
    assert_eq!(
        (again["added"].as_u64(), again["updated"].as_u64()),
        (Some(0), Some(1)),
        "{again}"
    );
    let ann = user("ann@example.com").await;
    assert_eq!(ann["source_login"], "ann.new");
    assert_eq!(ann["has_source_password"], true);

    let mut big = String::from("EmailAddress,UserName,Password\n");
    for i in 0..100_000 {
        big.push_str(&format!(
            "user{i:06}@big.example,user{i:06},secret-{i:06}\n"
        ));
    }
    let size = big.len();
    let before = rig.coordinator_peak_rss_kib();
    let at = Instant::now();
    let r = expect(import(big.into_bytes()).await.unwrap(), 200);
    let took = at.elapsed();
    assert_eq!(r["added"], 100_000);
    assert_eq!(r["errors"], json!([]));
    let peak = rig.coordinator_peak_rss_kib();
    println!(
        "100,000 rows ({size} bytes) imported in {took:?}; coordinator peak RSS {before} KiB before, {peak} KiB after"
    );
    assert!(took < Duration::from_secs(30), "100,000 rows took {took:?}");
    assert!(
        peak < 256 * 1024,
        "the coordinator peaked at {peak} KiB importing 100,000 rows"
    );
    let page = expect(
        get(
            &acme,
            &format!("/api/v1/batches/{b}/users?offset=99998&limit=5"),
        )
        .await,
        200,
    );
    assert_eq!(page["total"], 100_004, "the 4 users before and the 100,000");
    assert_eq!(page["users"].as_array().unwrap().len(), 5);
    rig.clean_up().await;
}

/// A connection test names what went wrong: nothing listening, a certificate nobody
/// trusts, no STARTTLS, a name that does not resolve, TLS to a plaintext port, a server
/// that never greets (within the test's 10 s), a server refusing one more connection. With `forbid_private_sources`,
/// a source on an internal address is refused with its own code, and so is a target
/// (the connection test would otherwise probe the installation's network); with
/// `target_hosts`, targets are those hosts and no others.
#[tokio::test(flavor = "multi_thread")]
async fn connection_tests_name_the_failure_and_internal_sources_can_be_forbidden() {
    let rig = ApiRig::start(RigOptions {
        target_hosts: "\"127.0.0.1\"",
        ..RigOptions::default()
    })
    .await;
    let acme = rig.client(ACME);
    let tls = Dovecot::start(DovecotConfig {
        tls: true,
        ..DovecotConfig::default()
    });
    // One connection per user and address: alice holds it, so the test's login is
    // refused with Dovecot's [UNAVAILABLE] "Maximum number of connections".
    let busy = Dovecot::start(DovecotConfig {
        max_user_connections: 1,
        ..DovecotConfig::default()
    });
    let _held = mail::session(busy.port, "alice", "alice-secret").await;
    // Takes connections (the kernel does, from the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let cases = [
        (
            json!({"host": "127.0.0.1", "port": free_port(), "security": "plain"}),
            "connection_refused",
        ),
        (
            json!({"host": "127.0.0.1", "port": tls.imaps_port.unwrap(), "security": "tls"}),
            "tls_certificate",
        ),
        (
            json!({"host": "127.0.0.1", "port": rig.src.port, "security": "starttls"}),
            "starttls_not_offered",
        ),
        (
            json!({"host": "no-such-host.invalid", "port": 993, "security": "tls"}),
            "dns",
        ),
        (
            json!({"host": "127.0.0.1", "port": rig.src.port, "security": "tls"}),
            "tls_handshake",
        ),
        (
            json!({"host": "127.0.0.1", "port": silent_port, "security": "plain"}),
            "timeout",
        ),
        (
            json!({"host": "127.0.0.1", "port": busy.port, "security": "plain"}),
            "throttled",
        ),
    ];
    for (settings, code) in cases {
        let mut body = json!({"name": code, "role": "source", "provider": "custom"});
        body.as_object_mut()
            .unwrap()
            .extend(settings.as_object().unwrap().clone());
        let e = expect(post(&acme, "/api/v1/endpoints", body).await, 201);
        let verdict = expect(
            post(
                &acme,
                &format!("/api/v1/endpoints/{}/test", e["id"].as_str().unwrap()),
                json!({"login": "alice", "password": "alice-secret"}),
            )
            .await,
            200,
        );
        assert_eq!(verdict["ok"], false, "{verdict}");
        assert_eq!(verdict["failure"]["code"], code, "{verdict}");
    }
    // The operator's list of targets: a target elsewhere is refused, even one that
    // resolves to the same address under another name.
    for host in ["10.0.0.8", "localhost", "imap.example.com"] {
        let refused = post(
            &acme,
            "/api/v1/endpoints",
            json!({"name": "x", "role": "target", "host": host, "port": 143}),
        )
        .await;
        let message = expect_error(refused, 422, "forbidden_host");
        assert!(message.contains("api.target_hosts: 127.0.0.1"), "{message}");
    }
    expect(
        post(&acme, "/api/v1/endpoints", rig.target_endpoint()).await,
        201,
    );
    rig.clean_up().await;
    drop(rig);

    let strict = ApiRig::start(RigOptions {
        forbid_private_sources: true,
        ..RigOptions::default()
    })
    .await;
    let acme = strict.client(ACME);
    for host in [
        "127.0.0.1",
        "localhost",
        "10.0.0.8",
        "169.254.169.254",
        "[::1]",
    ] {
        let refused = post(
            &acme,
            "/api/v1/endpoints",
            json!({"name": "x", "role": "source", "host": host, "port": 143}),
        )
        .await;
        let message = expect_error(refused, 422, "forbidden_host");
        assert!(message.contains("internal address"), "{message}");
    }
    // No list of targets: an internal target is refused like a source.
    let message = expect_error(
        post(&acme, "/api/v1/endpoints", strict.target_endpoint()).await,
        422,
        "forbidden_host",
    );
    assert!(message.contains("api.target_hosts"), "{message}");
    strict.clean_up().await;
    drop(strict);

    // A listed (trusted) target may be internal, but the token endpoint a tenant names
    // for it may not: with forbid_private_sources, token URLs must be public too.
    let listed = ApiRig::start(RigOptions {
        forbid_private_sources: true,
        target_hosts: "\"127.0.0.1\"",
        ..RigOptions::default()
    })
    .await;
    let acme = listed.client(ACME);
    let made = expect(
        post(
            &acme,
            "/api/v1/endpoints",
            json!({"name": "OAuth target", "role": "target", "host": "127.0.0.1",
                   "port": listed.dst.port, "security": "plain",
                   "auth": {"method": "oauth2", "token_url": format!("https://127.0.0.1:{}/token", free_port()),
                            "client_id": "app", "scope": "https://outlook.office365.com/.default",
                            "grant": {"kind": "client_secret"}},
                   "app_secret": "s3cret"}),
        )
        .await,
        201,
    );
    let verdict = expect(
        post(
            &acme,
            &format!("/api/v1/endpoints/{}/test", made["id"].as_str().unwrap()),
            json!({"login": "alice@example.com"}),
        )
        .await,
        200,
    );
    assert_eq!(verdict["ok"], false, "{verdict}");
    assert!(
        verdict["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("internal address"),
        "{verdict}"
    );
    listed.clean_up().await;
}

/// The `mailferry api` commands drive the same API: endpoints made (the master's
/// password from the environment) and tested, a batch, a CSV import with a bad row,
/// start, `watch --until-settled` ending when both users are synced, a CSV report;
/// and a missing token or URL is named.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_drives_the_api_from_endpoints_to_the_report() {
    let rig = ApiRig::start(RigOptions {
        per_folder: 2,
        workers: 1,
        ..RigOptions::default()
    })
    .await;
    let port = |d: &Dovecot| d.port.to_string();
    let (code, source, text) = rig.cli(
        &[
            "endpoint-create",
            "--name",
            "old",
            "--role",
            "source",
            "--host",
            "127.0.0.1",
            "--port",
            &port(&rig.src),
            "--security",
            "plain",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{text}");
    let source = source.trim().to_string();
    let (code, out, text) = rig.cli(
        &["endpoint-test", &source, "--login", "alice@example.com"],
        &[("MAILFERRY_TEST_PASSWORD", "wrong")],
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(out.contains("failed (authentication_rejected)"), "{out}");
    let (code, target, text) = rig.cli(
        &[
            "endpoint-create",
            "--name",
            "new",
            "--role",
            "target",
            "--host",
            "127.0.0.1",
            "--port",
            &port(&rig.dst),
            "--security",
            "plain",
            "--auth",
            &format!("master:{}", MASTER.0),
        ],
        &[("MAILFERRY_ADMIN_PASSWORD", MASTER.1)],
    );
    assert_eq!(code, Some(0), "{text}");
    let target = target.trim().to_string();
    let (code, out, text) = rig.cli(
        &["endpoint-test", &target, "--login", "alice@example.com"],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (Some(0), "ok: alice@example.com logged in"),
        "{text}"
    );
    let (code, batch, text) = rig.cli(
        &[
            "batch-create",
            "--name",
            "Ops",
            "--source",
            &source,
            "--target",
            &target,
            "--every",
            "6h",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{text}");
    let batch = batch.trim().to_string();
    let csv = rig.dir.join("users.csv");
    let mut rows = String::from("EmailAddress,UserName,Password\n");
    for (login, password, _) in &rig.users {
        rows.push_str(&format!("{login},{login},{password}\n"));
    }
    rows.push_str("nobody,x,y\n");
    std::fs::write(&csv, rows).unwrap();
    let (code, out, text) = rig.cli(&["import", &batch, csv.to_str().unwrap()], &[]);
    assert_eq!(code, Some(7), "one bad row: {text}");
    assert!(out.contains("2 added, 0 updated, 1 rows refused"), "{out}");
    assert!(text.contains("line 4"), "{text}");
    let (code, out, text) = rig.cli(&["start", &batch], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        out.contains("alice@example.com: started") && out.contains("bob@example.com: started"),
        "{out}"
    );
    let (code, out, text) = rig.cli(&["watch", &batch, "--until-settled"], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        out.contains("alice@example.com\tsynced") && out.contains("bob@example.com\tsynced"),
        "{out}"
    );
    let (code, out, _) = rig.cli(&["status", &batch], &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("2 users (2 synced)"), "{out}");
    let (code, out, text) = rig.cli(&["status", &batch, "--json"], &[]);
    assert_eq!(code, Some(0), "{text}");
    let status: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(
        status["summary"]["users_by_status"]["synced"], 2,
        "{status}"
    );
    assert_eq!(
        status["users"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    assert_eq!(status["id"], batch.as_str(), "{status}");
    let (code, out, _) = rig.cli(&["batches", "--json"], &[]);
    assert_eq!(code, Some(0));
    let batches: Value = serde_json::from_str(&out).expect(&out);
    assert!(batches
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["id"] == batch.as_str()));
    let report = rig.dir.join("report.csv");
    let (code, _, text) = rig.cli(
        &["report", &batch, "--output", report.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, Some(0), "{text}");
    let report = std::fs::read_to_string(report).unwrap();
    assert_eq!(report.lines().count(), 3, "{report}");

    let (code, _, text) = rig.cli(&["batches"], &[("MAILFERRY_API_TOKEN", "")]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("MAILFERRY_API_TOKEN"), "{text}");
    let (code, _, text) = rig.cli(
        &["batches"],
        &[("MAILFERRY_API_TOKEN", "wrong-token-of-enough-length")],
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("not known here (unauthorized, HTTP 401)"),
        "{text}"
    );
    for (login, password, messages) in &rig.users {
        let pair = Pair::dovecots(&rig.src, &rig.dst, login, password);
        mail::assert_same_mail(&pair, messages, |p| p.to_string()).await;
    }
    rig.clean_up().await;
}

/// Key rotation reaches what the API stores: an endpoint's master password and the
/// batch's copy of it are resealed with the new key beside the users' passwords, and
/// with the old key gone the stored master password still logs in and still serves a
/// user added afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_reseals_the_endpoints_admin_passwords_too() {
    let mut rig = ApiRig::start(RigOptions::default()).await;
    let acme = rig.client(ACME);
    let (_, target, b) = batch_of(&rig, &acme).await;
    expect(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": "carol@example.com", "source_password": "pw"}),
        )
        .await,
        201,
    );

    let k1 = rig.keys.clone();
    let k2 = mailferry_shared::config::seal::Keyring::generate("k2").unwrap();
    rig.restart_coordinator(mailferry_shared::secret::Secret::new(format!(
        "{}\n{}",
        k1.expose(),
        k2.expose()
    )))
    .await;
    let (code, text) = rig.operator(&["reseal"]);
    assert_eq!(code, Some(0), "{text}");
    // the endpoint's, the batch's copy, carol's two
    assert!(
        text.contains("4 secrets sealed again with the newest key; 0 were already"),
        "{text}"
    );

    rig.restart_coordinator(k2).await;
    let acme = rig.client(ACME);
    let verdict = expect(
        post(
            &acme,
            &format!("/api/v1/endpoints/{target}/test"),
            json!({"login": "alice@example.com"}),
        )
        .await,
        200,
    );
    assert_eq!(
        verdict["ok"], true,
        "the resealed master password logs in: {verdict}"
    );
    let dave = expect(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": "dave@example.com", "source_password": "pw"}),
        )
        .await,
        201,
    );
    assert_eq!(dave["has_target_password"], true, "{dave}");
    rig.clean_up().await;
}

/// A message the target refuses is skipped, and the user's detail lists it with its
/// folder, size, date and the server's reason, never its subject; the folder is still
/// verified (the skipped message is accounted for) and the user synced.
#[tokio::test(flavor = "multi_thread")]
async fn a_skipped_message_is_listed_in_the_users_detail_without_its_subject() {
    let rig = ApiRig::start(RigOptions {
        per_folder: 1,
        workers: 1,
        target_max_mail_size: Some(200_000),
        ..RigOptions::default()
    })
    .await;
    let (alice, password, _) = &rig.users[0];
    let big = mail::TestMessage {
        folder: "INBOX".into(),
        bytes: format!(
            "Subject: quarterly-secret-plans\r\n\r\n{}\r\n",
            "y".repeat(300_000)
        )
        .into_bytes(),
        flags: vec![],
        date: "01-Jan-2024 00:00:00 +0000".into(),
    };
    mail::load(
        rig.src.port,
        alice,
        password,
        '/',
        std::slice::from_ref(&big),
    )
    .await;
    let acme = rig.client(ACME);
    let (_, _, b) = batch_of(&rig, &acme).await;
    expect(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": alice, "source_password": password}),
        )
        .await,
        201,
    );
    expect(
        post(&acme, &format!("/api/v1/batches/{b}/start"), json!({})).await,
        200,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let detail = loop {
        let detail = expect(
            get(&acme, &format!("/api/v1/batches/{b}/users/{alice}")).await,
            200,
        );
        if detail["status"] == "synced" || detail["status"] == "failed" {
            break detail;
        }
        assert!(Instant::now() < deadline, "not synced in time: {detail}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(detail["status"], "synced", "{detail}");
    assert_eq!(detail["skipped"], 1, "{detail}");
    let skipped = &detail["skipped_messages"][0];
    assert_eq!(skipped["folder"], "INBOX", "{detail}");
    assert!(skipped["size"].as_u64().unwrap() > 300_000, "{detail}");
    assert!(
        skipped["date"].as_str().unwrap().contains("2024"),
        "{detail}"
    );
    assert!(!skipped["reason"].as_str().unwrap().is_empty(), "{detail}");
    let inbox = detail["folders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["source"] == "INBOX")
        .unwrap();
    assert_eq!(
        (inbox["skipped"].as_u64(), inbox["verified"].as_bool()),
        (Some(1), Some(true)),
        "{detail}"
    );
    assert!(
        !detail.to_string().contains("quarterly-secret-plans"),
        "a subject in the detail: {detail}"
    );
    let report = checked(&get(&acme, &format!("/api/v1/batches/{b}/report.csv")).await);
    assert!(!report.contains("quarterly-secret-plans"));
    rig.clean_up().await;
}

/// While a pass runs, a user's detail tells its rate and the time left; once synced,
/// neither (nothing is running).
#[tokio::test(flavor = "multi_thread")]
async fn a_running_users_detail_tells_its_rate_and_time_left() {
    let rig = ApiRig::start(RigOptions {
        per_folder: 6,
        workers: 1,
        slow_source: Some(60_000),
        ..RigOptions::default()
    })
    .await;
    let acme = rig.client(ACME);
    let (_, _, b) = batch_of(&rig, &acme).await;
    let (alice, password, messages) = &rig.users[0];
    expect(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": alice, "source_password": password}),
        )
        .await,
        201,
    );
    expect(
        post(&acme, &format!("/api/v1/batches/{b}/start"), json!({})).await,
        200,
    );
    let path = format!("/api/v1/batches/{b}/users/{alice}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen_running = None;
    let last = loop {
        let detail = expect(get(&acme, &path).await, 200);
        if detail["status"] == "syncing"
            && detail["copied"].as_u64() > Some(0)
            && seen_running.is_none()
        {
            seen_running = Some(detail.clone());
        }
        if detail["status"] == "synced" {
            break detail;
        }
        assert!(Instant::now() < deadline, "not synced in time: {detail}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let running = seen_running.expect("the pass was never seen running with copies made");
    let rate = running["rate_messages_per_sec"].as_f64().unwrap_or(0.0);
    assert!(rate > 0.0, "no rate while running: {running}");
    let eta = running["eta_secs"]
        .as_u64()
        .expect("no time left while running");
    println!(
        "mid-pass: {rate} messages/s, {eta} s left, {} of {} copied",
        running["copied"],
        messages.len()
    );
    assert!(eta < 600, "{running}");
    assert_eq!(last["rate_messages_per_sec"], Value::Null, "{last}");
    assert_eq!(last["eta_secs"], Value::Null, "{last}");
    rig.clean_up().await;
}

/// Per-tenant limits (issue 19, finding 11): endpoints, batches, users, event streams
/// and body sizes per route, each refused with a stable code and a message naming the
/// limit; one tenant at its limits leaves another untouched; an import that would pass
/// the user limit imports nothing.
#[tokio::test(flavor = "multi_thread")]
async fn each_tenant_is_held_to_its_limits_with_a_stable_code() {
    let rig = ApiRig::start(RigOptions {
        limits: "endpoints_per_tenant = 2\nbatches_per_tenant = 1\nusers_per_tenant = 3\n\
                 streams_per_tenant = 1\njson_body_bytes = 4096\naction_body_bytes = 8192",
        ..RigOptions::default()
    })
    .await;
    let acme = rig.client(ACME);
    let (source, target, b) = batch_of(&rig, &acme).await;

    let why = expect_error(
        post(&acme, "/api/v1/endpoints", rig.source_endpoint()).await,
        409,
        "limit_reached",
    );
    assert!(
        why.contains("endpoints_per_tenant") && why.contains('2'),
        "{why}"
    );
    let second = json!({"name": "Two", "source_endpoint": source, "target_endpoint": target});
    let why = expect_error(
        post(&acme, "/api/v1/batches", second).await,
        409,
        "limit_reached",
    );
    assert!(why.contains("batches_per_tenant"), "{why}");

    // Users: two added, an import of two more refused whole, one more fits, then none.
    for email in ["u1@example.com", "u2@example.com"] {
        expect(
            post(
                &acme,
                &format!("/api/v1/batches/{b}/users"),
                json!({"email": email}),
            )
            .await,
            201,
        );
    }
    let import = |csv: &str| {
        let acme = rig.client(ACME);
        let path = format!("/api/v1/batches/{b}/users/import");
        let csv = csv.to_string();
        async move {
            acme.call("POST", &path, Some(("text/csv", csv.into_bytes())))
                .await
                .unwrap()
        }
    };
    let why = expect_error(
        import("EmailAddress,UserName,Password\nu3@example.com,u3,\nu4@example.com,u4,\n").await,
        409,
        "limit_reached",
    );
    assert!(
        why.contains("nothing was imported") && why.contains("room for 1"),
        "{why}"
    );
    let users = expect(get(&acme, &format!("/api/v1/batches/{b}/users")).await, 200);
    assert_eq!(users["total"], 2, "{users}");
    // An import takes more than a JSON body's 4 KiB: its own limit applies.
    let padded = format!(
        "EmailAddress,UserName,Password\nu3@example.com,u3,{}\n",
        "p".repeat(6000)
    );
    assert_eq!(import(&padded).await.status, 200);
    let why = expect_error(
        post(
            &acme,
            &format!("/api/v1/batches/{b}/users"),
            json!({"email": "u5@example.com"}),
        )
        .await,
        409,
        "limit_reached",
    );
    assert!(why.contains("users_per_tenant"), "{why}");

    // Bodies: a JSON object over 4 KiB is refused before it is parsed; an action takes
    // up to its own 8 KiB.
    let big = json!({"name": "x".repeat(5000), "role": "source", "host": "imap.example.com"});
    expect_error(
        post(&acme, "/api/v1/endpoints", big).await,
        413,
        "body_too_large",
    );
    let names: Vec<String> = (0..200).map(|i| format!("nobody{i}@example.com")).collect();
    let stop = post(
        &acme,
        &format!("/api/v1/batches/{b}/stop"),
        json!({"users": names}),
    )
    .await;
    assert_ne!(stop.status, 413, "{}", checked(&stop));
    let names: Vec<String> = (0..400).map(|i| format!("nobody{i}@example.com")).collect();
    let stop = post(
        &acme,
        &format!("/api/v1/batches/{b}/stop"),
        json!({"users": names}),
    )
    .await;
    expect_error(stop, 413, "body_too_large");

    // Streams: acme's one is open; a second of acme's is refused, globex's is not.
    let path = format!("/api/v1/batches/{b}/events");
    let held = open_stream(rig.client(ACME), path.clone())
        .await
        .expect("acme's first stream opens");
    let again = tokio::time::timeout(Duration::from_secs(10), get(&acme, &path))
        .await
        .expect("a second stream of acme's is answered at once");
    let why = expect_error(again, 429, "too_many_streams");
    assert!(why.contains("streams_per_tenant"), "{why}");
    let globex = rig.client(GLOBEX);
    let (_, _, gb) = batch_of(&rig, &globex).await;
    let theirs = open_stream(globex, format!("/api/v1/batches/{gb}/events"))
        .await
        .expect("globex's stream opens while acme is at its limit");
    theirs.abort();
    // Once acme's stream ends, its place is free again.
    held.abort();
    let _ = held.await;
    let mut freed = false;
    for _ in 0..50 {
        let answer = tokio::time::timeout(Duration::from_millis(500), get(&acme, &path)).await;
        // A stream that opened does not answer within the timeout: it is being served.
        if answer.is_err() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "acme's stream place was not given back");
    rig.clean_up().await;
}

/// Opens an event stream and waits (10 s at most) for its first event; the stream is
/// then held open by the returned task until it is aborted. `None` if no event came.
async fn open_stream(
    client: mailferry_coordinator::client::ApiClient,
    path: String,
) -> Option<tokio::task::JoinHandle<()>> {
    let (opened, open) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut opened = Some(opened);
        let _ = client
            .events(&path, |_, _| {
                if let Some(tx) = opened.take() {
                    let _ = tx.send(());
                }
                true
            })
            .await;
    });
    match tokio::time::timeout(Duration::from_secs(10), open).await {
        Ok(Ok(())) => Some(task),
        _ => {
            task.abort();
            None
        }
    }
}

/// A batch's folder rules, set through the API, apply to its users' passes: an excluded
/// folder stays behind, a renamed subtree lands under its new name, the rest is copied
/// as it is; and bad rules are refused with the rule named.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_preview_shows_the_mapping_the_counts_and_who_would_not_fit() {
    let rig = ApiRig::start(RigOptions {
        per_folder: 2,
        target_quota_kib: Some(64),
        ..RigOptions::default()
    })
    .await;
    let acme = rig.client(ACME);
    let (_, _, b) = batch_of(&rig, &acme).await;
    let csv = rig.users.iter().fold(
        String::from("EmailAddress,UserName,Password\n"),
        |mut csv, (l, p, _)| {
            csv.push_str(&format!("{l},{l},{p}\n"));
            csv
        },
    );
    import_csv(&acme, &b, csv).await;
    let preview = |body: Value| {
        let acme = &acme;
        let path = format!("/api/v1/batches/{b}/preview");
        async move { expect(post(acme, &path, body).await, 200) }
    };
    let all = preview(json!({})).await;
    assert_eq!(
        all["users"].as_array().unwrap().len(),
        rig.users.len(),
        "{all}"
    );
    assert_eq!(all["more"], 0);
    let (login, password, messages) = &rig.users[0];
    let alice = &all["users"][0];
    assert_eq!(alice["user"], login.as_str(), "{alice}");
    assert_eq!(alice["problem"], Value::Null, "{alice}");
    assert_eq!(alice["messages"], messages.len(), "{alice}");
    let inbox = alice["folders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["source_path"] == "INBOX")
        .expect("INBOX in the mapping");
    assert_eq!(inbox["target_path"], "INBOX");
    assert_eq!(inbox["messages"], 2);
    assert_eq!(alice["quota"]["limit_bytes"], 64 * 1024, "{alice}");
    assert!(alice["bytes"].as_u64().unwrap() > 64 * 1024, "{alice}");
    assert_eq!(alice["fits"], false, "{alice}");
    let (code, out, text) = rig.cli(&["preview", &b, "--user", login], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(out.contains("WOULD NOT FIT"), "{out}");
    assert!(
        out.contains("Archive/2024"),
        "the mapping is printed: {out}"
    );
    // The batch's folder rules apply: only the empty folder fits anyone's quota.
    expect(
        acme.call(
            "PATCH",
            &format!("/api/v1/batches/{b}"),
            Some((
                "application/json",
                json!({"folder_rules": {"include": ["Empty"]}})
                    .to_string()
                    .into_bytes(),
            )),
        )
        .await
        .unwrap(),
        200,
    );
    let one = preview(json!({"users": [login]})).await;
    assert_eq!(one["more"], rig.users.len() - 1);
    let alice = &one["users"][0];
    assert_eq!(alice["messages"], 0, "{alice}");
    assert_eq!(alice["fits"], true, "{alice}");
    let stranger = post(
        &acme,
        &format!("/api/v1/batches/{b}/preview"),
        json!({"users": ["mallory@example.com"]}),
    )
    .await;
    assert!(expect_error(stranger, 422, "invalid").contains("mallory"));
    // Read-only: the target got no folder.
    let at_target = mail::folder_names(rig.dst.port, login, password).await;
    assert_eq!(at_target, ["INBOX"], "the preview created folders");
    rig.clean_up().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batchs_folder_rules_exclude_and_rename_folders() {
    let rig = ApiRig::start(RigOptions {
        per_folder: 2,
        workers: 1,
        gmail_source: true,
        ..RigOptions::default()
    })
    .await;
    // Archived mail, seen only in the source's [Gmail]/All Mail.
    let (login, password, _) = &rig.users[0];
    let mut archived = corpus(1394, 1);
    for m in &mut archived {
        m.folder = ARCHIVED.into();
    }
    let mut s = mail::session(rig.src.port, login, password).await;
    for r in s
        .create_all(&[mail::wire_name(ARCHIVED, '/')])
        .await
        .unwrap()
    {
        r.unwrap();
    }
    mail::append_all(&mut s, '/', &archived).await;
    s.logout().await;
    let acme = rig.client(ACME);
    let (_, _, b) = batch_of(&rig, &acme).await;
    let message = expect_error(
        acme.call(
            "PATCH",
            &format!("/api/v1/batches/{b}"),
            Some((
                "application/json",
                br#"{"folder_rules": {"rename": ["Archive"]}}"#.to_vec(),
            )),
        )
        .await
        .unwrap(),
        422,
        "invalid",
    );
    assert!(message.contains("FROM=TO"), "{message}");
    let rules =
        json!({"exclude": ["Junk"], "rename": ["Archive/*=Old/*"], "archive": "Archived Mail"});
    let edited = expect(
        acme.call(
            "PATCH",
            &format!("/api/v1/batches/{b}"),
            Some((
                "application/json",
                json!({"folder_rules": rules}).to_string().into_bytes(),
            )),
        )
        .await
        .unwrap(),
        200,
    );
    assert_eq!(
        edited["folder_rules"]["exclude"],
        json!(["Junk"]),
        "{edited}"
    );
    assert_eq!(
        edited["folder_rules"]["rename"],
        json!(["Archive/*=Old/*"]),
        "{edited}"
    );
    assert_eq!(
        edited["folder_rules"]["archive"], "Archived Mail",
        "{edited}"
    );
    let (login, password, messages) = &rig.users[0];
    let csv = format!("EmailAddress,UserName,Password\n{login},{login},{password}\n");
    import_csv(&acme, &b, csv).await;
    expect(
        post(&acme, &format!("/api/v1/batches/{b}/start"), json!({})).await,
        200,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let page = expect(get(&acme, &format!("/api/v1/batches/{b}/users")).await, 200);
        if page["users"][0]["status"] == "synced" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not synced: {page}\n{}",
            rig.log("worker0")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let at_target = mail::folder_names(rig.dst.port, login, password).await;
    assert!(
        !at_target.iter().any(|f| f == "Junk"),
        "the excluded folder was copied: {at_target:?}"
    );
    assert!(at_target.iter().any(|f| f == "Old/2024"), "{at_target:?}");
    assert!(
        !at_target
            .iter()
            .any(|f| f == "Archive" || f.starts_with("Archive/")),
        "{at_target:?}"
    );
    let kept: Vec<_> = messages
        .iter()
        .filter(|m| m.folder != "Junk")
        .cloned()
        .collect();
    assert!(
        kept.len() < messages.len(),
        "the corpus has mail in Junk, or the test proves nothing"
    );
    let pair = Pair::dovecots(&rig.src, &rig.dst, login, password);
    mail::assert_same_mail(&pair, &kept, |p| p.replace("Archive/", "Old/")).await;
    // All Mail's archived-only messages, once, in the batch's archive folder ("synced"
    // above says All Mail's other messages counted as accounted for).
    let mut src = mail::session(rig.src.port, login, password).await;
    let mut dst = mail::session(rig.dst.port, login, password).await;
    let want = mail::contents(&mut src, &mail::wire_name(ARCHIVED, '/')).await;
    let got = mail::contents(&mut dst, &mail::wire_name("Archived Mail", '/')).await;
    assert_eq!(got.len(), archived.len());
    assert_eq!(got, want);
    src.logout().await;
    dst.logout().await;
    rig.clean_up().await;
}
