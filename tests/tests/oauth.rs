//! OAuth2 end to end: `mailferry migrate` against Dovecots that validate JWT access
//! tokens themselves (the `oauth2` passdb, local validation), with tokens from the
//! harness's token endpoint that live two seconds. Each grant mailferry offers is used
//! as its provider uses it: a user's refresh token (Outlook.com, Gmail), an app's client
//! secret or certificate (Microsoft 365 app-only), a service account's signed assertion
//! (Google Workspace domain-wide delegation). Then the same in the cluster, through
//! the API, with a scheduled re-sync and the rotated refresh tokens stored back.

use std::path::Path;
use std::time::{Duration, Instant};

use mailferry_coordinator::client::ApiClient;
use mailferry_tests::api::{checked, ApiRig, RigOptions, ACME, APP_SECRET, CANARY};
use mailferry_tests::dovecot::{temp_dir, Dovecot, DovecotConfig, OAuth2Validation};
use mailferry_tests::mail::{self, assert_same_mail, corpus, Pair};
use mailferry_tests::oauth::{App, AppKey, ServiceAccount, TokenEndpoint};
use mailferry_tests::proxy::{Cut, CuttingProxy, Direction, SlowProxy};
use mailferry_tests::run::{text, Migrate};
use serde_json::{json, Value};

const DOMAIN: &str = "example.org";
/// How long the endpoint's access tokens live, in seconds: short, so that a migration
/// outlives several, and long enough that a loaded machine never hands a server a
/// token older than its lifetime (mailferry renews a quarter of a lifetime early).
const LIFETIME: u64 = 6;

fn users(n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| (format!("user{i}@{DOMAIN}"), format!("pw-{i}")))
        .collect()
}

/// A Dovecot that takes the endpoint's tokens: for one user (`%u`), or for every
/// mailbox of the token's domain (`%d`, an app's token).
fn server(idp: &TokenEndpoint, users: &[(String, String)], username_format: &str) -> Dovecot {
    Dovecot::start(DovecotConfig {
        users: users.to_vec(),
        oauth2: Some(OAuth2Validation {
            key_base64: idp.key_base64(),
            username_format: username_format.into(),
        }),
        ..DovecotConfig::default()
    })
}

/// `migrate --csv` between `source_port` and `target_port` (plain IMAP; the token
/// endpoint is trusted through the test CA given as each side's CA file).
fn migrate_csv(source_port: u16, target_port: u16, csv: &Path, dir: &Path, ca: &Path) -> Migrate {
    let mut m = Migrate::new(source_port, target_port, "unused", &dir.join("state"));
    let at = m.args.iter().position(|a| a == "--source-user").unwrap();
    m.args.drain(at..at + 2);
    m.arg("--csv")
        .arg(csv.display().to_string())
        .arg("--source-ca-file")
        .arg(ca.display().to_string())
        .arg("--target-ca-file")
        .arg(ca.display().to_string())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The lines of a Dovecot's log where its oauth2 passdb refused a token, and why.
fn oauth_refusals(server: &Dovecot) -> String {
    server
        .log()
        .lines()
        .filter(|l| l.contains("oauth2") && l.contains("failed"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A corpus for each user at `src` (seeds from `seed` on); the corpora, in order.
async fn load_each(
    src: &Dovecot,
    people: &[(String, String)],
    seed: u64,
    per_folder: usize,
) -> Vec<Vec<mail::TestMessage>> {
    let mut loaded = Vec::new();
    for (i, (user, password)) in people.iter().enumerate() {
        let messages = corpus(seed + i as u64, per_folder);
        mail::load(src.port, user, password, '/', &messages).await;
        loaded.push(messages);
    }
    loaded
}

/// Refusals in a Dovecot's log because a token had expired: none, if mailferry renews
/// its tokens before they expire rather than after a server refuses them.
fn expired_refusals(server: &Dovecot) -> usize {
    server.log().matches("Token has expired").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_many_token_lifetimes_long_renews_its_tokens_and_verifies() {
    let idp = TokenEndpoint::start(LIFETIME).await;
    idp.register_app(App {
        client_id: "mail-client".into(),
        ..App::default()
    });
    idp.register_app(App {
        client_id: "m365-app".into(),
        secret: Some("app-secret-1".into()),
        principal: format!("mailferry-app@{DOMAIN}"),
        ..App::default()
    });
    idp.set_rotation(true);
    let people = users(5);
    let src = server(&idp, &people, "%u");
    let dst = server(&idp, &people, "%d");
    let loaded = load_each(&src, &people, 700, 2).await;
    // The source at 90 KB/s, so that the users follow each other for many token
    // lifetimes, and its connections cut now and then as the mail flows: each new
    // connection logs in again, by then with a token older than its lifetime.
    let slow = SlowProxy::start(src.port, 90_000).await;
    let cutting = CuttingProxy::start(
        slow.port,
        Cut {
            direction: Direction::Download,
            after_bytes: 100_000,
            times: 6,
        },
    )
    .await;
    let dir = temp_dir("oauth-long");
    // Each user's refresh token in the CSV's password column.
    let mut rows = String::from("EmailAddress,UserName,Password\r\n");
    for (user, _) in &people {
        let refresh = idp.grant_refresh_token(user, "mail-client");
        rows.push_str(&format!("{user},{user},{refresh}\r\n"));
    }
    let csv = dir.join("users.csv");
    std::fs::write(&csv, rows).unwrap();
    let app_secret = write(&dir, "app-secret", "app-secret-1\n");
    let started = Instant::now();
    let out = migrate_csv(cutting.port, dst.port, &csv, &dir, &idp.ca.ca_cert)
        .arg("--source-auth")
        .arg("oauth2:refresh-token")
        .arg("--source-oauth-token-url")
        .arg(idp.url())
        .arg("--source-oauth-client-id")
        .arg("mail-client")
        .arg("--source-oauth-scope")
        .arg("https://outlook.office.com/IMAP.AccessAsUser.All offline_access")
        .arg("--target-auth")
        .arg("oauth2:client-secret")
        .arg("--target-oauth-token-url")
        .arg(idp.url())
        .arg("--target-oauth-client-id")
        .arg("m365-app")
        .arg("--target-oauth-scope")
        .arg("https://outlook.office365.com/.default")
        .arg("--target-oauth-mechanism")
        .arg("oauthbearer")
        .arg("--target-oauth-secret-file")
        .arg(app_secret)
        .arg("--parallel-users")
        .arg("1")
        .arg("--jobs")
        .arg("2")
        .arg("--connections")
        .arg("1")
        .run();
    let elapsed = started.elapsed();
    let all = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{all}\nthe source's OAuth2 refusals:\n{}",
        oauth_refusals(&src)
    );
    assert!(
        elapsed > Duration::from_secs(2 * LIFETIME),
        "the migration took {elapsed:?}: too short to outlive its tokens, the test proves nothing"
    );
    for ((user, password), messages) in people.iter().zip(&loaded) {
        assert_same_mail(&Pair::dovecots(&src, &dst, user, password), messages, |p| {
            p.to_string()
        })
        .await;
    }
    let log = idp.log();
    let app_tokens = log
        .iter()
        .filter(|l| l.grant_type == "client_credentials" && l.outcome == "200")
        .count();
    assert!(
        app_tokens as u64 <= elapsed.as_secs() / (LIFETIME / 2).max(1) + 3,
        "{app_tokens} app tokens in {elapsed:?}: one token serves every mailbox, not one each"
    );
    // Every user got a token; some users logged in again after theirs had lived its
    // time, and then presented the refresh token the endpoint had rotated.
    let mut renewed = 0;
    for (user, _) in &people {
        let grants: Vec<_> = log
            .iter()
            .filter(|l| l.grant_type == "refresh_token" && l.sub.as_deref() == Some(user.as_str()))
            .collect();
        assert!(
            !grants.is_empty(),
            "no token was fetched for {user}: {log:?}"
        );
        if grants.len() >= 2 {
            renewed += 1;
            assert_ne!(
                grants[0].refresh_token, grants[1].refresh_token,
                "{user}'s renewal presented the first refresh token, not the rotated one"
            );
        }
    }
    assert!(
        cutting.cuts_done.load(std::sync::atomic::Ordering::SeqCst) > 0 && renewed > 0,
        "no user logged in again after a token lifetime: the renewal went untested: {log:?}"
    );
    assert_eq!(expired_refusals(&src), 0, "{}", src.log());
    assert_eq!(expired_refusals(&dst), 0, "{}", dst.log());
    for secret in ["app-secret-1", "rt-"] {
        assert!(!all.contains(secret), "a secret in the output: {all}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn service_accounts_and_certificates_sign_their_assertions_and_an_outage_is_waited_out() {
    let idp = TokenEndpoint::start(30).await;
    let dir = temp_dir("oauth-keys");
    let google = AppKey::create(&dir.join("google"));
    let microsoft = AppKey::create(&dir.join("microsoft"));
    let sa_email = "migrator@mailferry-test.iam.gserviceaccount.com";
    idp.register_service_account(ServiceAccount {
        client_email: sa_email.into(),
        public_key: google.public_key.clone(),
    });
    idp.register_app(App {
        client_id: "m365-cert-app".into(),
        certificate: Some((microsoft.x5t.clone(), microsoft.public_key.clone())),
        principal: format!("mailferry-app@{DOMAIN}"),
        ..App::default()
    });
    // The first request meets an endpoint that is down.
    idp.fail_next(1, 503);
    let people = users(2);
    let src = server(&idp, &people, "%u");
    let dst = server(&idp, &people, "%d");
    let loaded = load_each(&src, &people, 800, 1).await;
    let key_file = write(
        &dir,
        "sa.json",
        &google.service_account_json(sa_email, &idp.url()),
    );
    let csv = dir.join("users.csv");
    let mut rows = String::from("EmailAddress,UserName,Password\r\n");
    for (user, _) in &people {
        rows.push_str(&format!("{user},{user},\r\n"));
    }
    std::fs::write(&csv, rows).unwrap();
    let out = migrate_csv(src.port, dst.port, &csv, &dir, &idp.ca.ca_cert)
        .arg("--source-auth")
        .arg("oauth2:service-account")
        .arg("--source-oauth-secret-file")
        .arg(key_file)
        .arg("--source-oauth-scope")
        .arg("https://mail.google.com/")
        .arg("--target-auth")
        .arg("oauth2:certificate")
        .arg("--target-oauth-token-url")
        .arg(idp.url())
        .arg("--target-oauth-client-id")
        .arg("m365-cert-app")
        .arg("--target-oauth-scope")
        .arg("https://outlook.office365.com/.default")
        .arg("--target-oauth-certificate")
        .arg(microsoft.cert_pem.display().to_string())
        .arg("--target-oauth-secret-file")
        .arg(microsoft.key_pem.display().to_string())
        .run();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    for ((user, password), messages) in people.iter().zip(&loaded) {
        assert_same_mail(&Pair::dovecots(&src, &dst, user, password), messages, |p| {
            p.to_string()
        })
        .await;
    }
    let log = idp.log();
    assert_eq!(log[0].outcome, "temporarily_unavailable", "{log:?}");
    for (user, _) in &people {
        assert!(
            log.iter().any(|l| l.grant_type.ends_with("jwt-bearer")
                && l.outcome == "200"
                && l.sub.as_deref() == Some(user.as_str())),
            "no service-account token for {user}: {log:?}"
        );
    }
    let app = log
        .iter()
        .filter(|l| l.grant_type == "client_credentials" && l.outcome == "200")
        .count();
    assert_eq!(
        app, 1,
        "one certificate token serves both mailboxes: {log:?}"
    );
    assert!(!all.contains("PRIVATE KEY"), "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_grant_fails_the_users_at_once_with_its_name() {
    let idp = TokenEndpoint::start(30).await;
    idp.register_app(App {
        client_id: "m365-app".into(),
        secret: Some("the-right-secret".into()),
        principal: format!("mailferry-app@{DOMAIN}"),
        ..App::default()
    });
    let people = users(2);
    let src = server(&idp, &people, "%d");
    let dst = Dovecot::start(DovecotConfig {
        users: people.clone(),
        ..DovecotConfig::default()
    });
    for (user, password) in &people {
        mail::load(src.port, user, password, '/', &corpus(5, 1)).await;
    }
    let dir = temp_dir("oauth-refused");
    let csv = dir.join("users.csv");
    let mut rows = String::from("EmailAddress,UserName,Password,TargetUserName,TargetPassword\r\n");
    for (user, password) in &people {
        rows.push_str(&format!("{user},{user},,{user},{password}\r\n"));
    }
    std::fs::write(&csv, rows).unwrap();
    let wrong = write(&dir, "app-secret", "a-wrong-secret\n");
    let started = Instant::now();
    let out = migrate_csv(src.port, dst.port, &csv, &dir, &idp.ca.ca_cert)
        .arg("--source-auth")
        .arg("oauth2:client-secret")
        .arg("--source-oauth-tenant")
        .arg("contoso")
        .arg("--source-oauth-token-url")
        .arg(idp.url())
        .arg("--source-oauth-client-id")
        .arg("m365-app")
        .arg("--source-oauth-secret-file")
        .arg(wrong)
        .run();
    let all = text(&out);
    assert_ne!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("invalid_client") && all.contains("client secret or certificate is wrong"),
        "the refusal is named, with what to do: {all}"
    );
    assert!(!all.contains("a-wrong-secret"), "{all}");
    let asked = idp.log().len();
    assert!(
        asked <= people.len() * 2,
        "a refused grant is not retried ({asked} requests): {:?}",
        idp.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed in {:?}: a refusal is an answer, not a reason to wait",
        started.elapsed()
    );
}

/// Polls the batch's users until each is synced; their pages when not.
async fn wait_synced(acme: &ApiClient, batch: &str, rig: &ApiRig) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let page = acme
            .get(&format!("/api/v1/batches/{batch}/users"))
            .await
            .unwrap();
        let page: Value = serde_json::from_str(&checked(&page)).unwrap();
        let users = page["users"].as_array().unwrap();
        if !users.is_empty() && users.iter().all(|u| u["status"] == "synced") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not synced: {page}\n{}",
            rig.log("worker0")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn post(client: &ApiClient, path: &str, body: Value) -> Value {
    let answer = client.post_json(path, &body).await.unwrap();
    let text = checked(&answer);
    assert!(answer.status < 300, "{path}: {} {text}", answer.status);
    serde_json::from_str(&text).unwrap()
}

/// The whole OAuth2 workflow in the cluster, through the API: an endpoint taking each
/// user's refresh token (alice's is the canary), another with an app's client secret
/// (tested: the right one logs in, a wrong one is named `invalid_client`), users
/// imported with their refresh tokens, migrated, then a scheduled pass after the
/// tokens of the first have expired and their refresh tokens were rotated — the
/// rotated ones stored back, sealed — and no refresh token in any answer, log or
/// Redis value.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_oauth2_on_both_sides_syncs_resyncs_and_keeps_its_tokens_sealed() {
    let rig = ApiRig::start(RigOptions {
        // change_at_source changes four messages of a folder
        per_folder: 4,
        workers: 1,
        oauth: true,
        ..RigOptions::default()
    })
    .await;
    let idp = rig.idp.as_ref().unwrap();
    let acme = rig.client(ACME);
    let src_port = rig.src.port;
    let source = post(
        &acme,
        "/api/v1/endpoints",
        json!({
            "name": "Outlook.com-like", "role": "source", "provider": "custom",
            "host": "127.0.0.1", "port": src_port, "security": "plain",
            "auth": {"method": "oauth2", "token_url": idp.url(), "client_id": "mail-client",
                     "scope": "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
                     "grant": {"kind": "refresh_token"}}
        }),
    )
    .await;
    let sid = source["id"].as_str().unwrap();
    let verdict = post(
        &acme,
        &format!("/api/v1/endpoints/{sid}/test"),
        json!({"login": "alice@example.com", "password": CANARY}),
    )
    .await;
    assert_eq!(
        verdict["ok"], true,
        "a refresh token, from token to login: {verdict}"
    );

    let target_with = |secret: &str| {
        json!({
            "name": "Microsoft 365-like", "role": "target", "provider": "custom",
            "host": "127.0.0.1", "port": rig.dst.port, "security": "plain",
            "auth": {"method": "oauth2", "token_url": idp.url(), "client_id": "m365-app",
                     "scope": "https://outlook.office365.com/.default",
                     "grant": {"kind": "client_secret"}, "mechanism": "oauthbearer"},
            "app_secret": secret
        })
    };
    // A wrong client secret, through `mailferry api`: named at the endpoint test.
    let secret_file = rig.dir.join("wrong-app-secret");
    std::fs::write(&secret_file, "not-the-secret\n").unwrap();
    let dst_port = rig.dst.port.to_string();
    let url = idp.url();
    let (code, wrong_id, all) = rig.cli(
        &[
            "endpoint-create",
            "--name",
            "Wrong secret",
            "--role",
            "target",
            "--provider",
            "custom",
            "--host",
            "127.0.0.1",
            "--port",
            &dst_port,
            "--security",
            "plain",
            "--auth",
            "oauth2:client-secret",
            "--oauth-token-url",
            &url,
            "--oauth-client-id",
            "m365-app",
            "--oauth-scope",
            "https://outlook.office365.com/.default",
            "--oauth-secret-file",
            secret_file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{all}");
    let (code, _, all) = rig.cli(
        &[
            "endpoint-test",
            wrong_id.trim(),
            "--login",
            "bob@example.com",
        ],
        &[],
    );
    assert_ne!(code, Some(0), "{all}");
    assert!(
        all.contains("invalid_client") && all.contains("client secret or certificate is wrong"),
        "the grant's refusal, named: {all}"
    );
    assert!(!all.contains("not-the-secret"), "{all}");

    let target = post(&acme, "/api/v1/endpoints", target_with(APP_SECRET)).await;
    assert!(!target.to_string().contains(APP_SECRET), "{target}");
    let tid = target["id"].as_str().unwrap();
    let verdict = post(
        &acme,
        &format!("/api/v1/endpoints/{tid}/test"),
        json!({"login": "bob@example.com"}),
    )
    .await;
    assert_eq!(
        verdict["ok"], true,
        "the app's token logs in as bob: {verdict}"
    );

    let batch = post(
        &acme,
        "/api/v1/batches",
        json!({"name": "OAuth", "source_endpoint": sid, "target_endpoint": tid,
               "sync_interval_secs": 8}),
    )
    .await;
    let b = batch["id"].as_str().unwrap().to_string();
    let bob_token = idp.grant_refresh_token("bob@example.com", "mail-client");
    let csv = format!(
        "EmailAddress,UserName,Password\nalice@example.com,alice@example.com,{CANARY}\n\
         bob@example.com,bob@example.com,{bob_token}\n"
    );
    let import = acme
        .call(
            "POST",
            &format!("/api/v1/batches/{b}/users/import"),
            Some(("text/csv", csv.into_bytes())),
        )
        .await
        .unwrap();
    assert_eq!(import.status, 200, "{}", checked(&import));
    let sealed_at_import = sealed_source_secret(&rig, &b, "alice@example.com").await;
    let started = post(&acme, &format!("/api/v1/batches/{b}/start"), json!({})).await;
    assert_eq!(started["applied"].as_array().unwrap().len(), 2, "{started}");
    wait_synced(&acme, &b, &rig).await;
    for (login, password, messages) in &rig.users {
        let pair = Pair::dovecots(&rig.src, &rig.dst, login, password);
        mail::assert_same_mail(&pair, messages, |p| p.to_string()).await;
    }

    // The next pass, on its schedule, long after the first tokens expired: new mail
    // arrives at the target.
    let added = mail::change_at_source(rig.src.port, "alice@example.com", CANARY, "INBOX").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while mail::message_count(rig.dst.port, "alice@example.com", CANARY).await
        < rig.users[0].2.len() as u32 + 1
    {
        assert!(
            Instant::now() < deadline,
            "the scheduled pass did not copy the new message:\n{}",
            rig.log("worker0")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut expected = rig.users[0].2.clone();
    expected.push(added);
    let pair = Pair::dovecots(&rig.src, &rig.dst, "alice@example.com", CANARY);
    mail::assert_same_mail(&pair, &expected, |p| p.to_string()).await;

    // The endpoint rotated alice's refresh token: the new one is stored, sealed.
    let log = idp.log();
    assert!(
        log.iter()
            .filter(|l| l.grant_type == "refresh_token" && l.outcome == "200")
            .count()
            >= 2,
        "{log:?}"
    );
    assert_ne!(
        sealed_source_secret(&rig, &b, "alice@example.com").await,
        sealed_at_import,
        "the rotated refresh token was not stored back"
    );
    assert_eq!(expired_refusals(&rig.src), 0, "{}", rig.src.log());
    assert_eq!(expired_refusals(&rig.dst), 0, "{}", rig.dst.log());
    assert!(
        !rig.all_logs().contains(APP_SECRET),
        "a log shows the app secret"
    );

    // Whoever can write to Redis points the batch's token endpoint at their own: the
    // sealed refresh tokens are bound to the real one, and the trap hears nothing.
    let trap = TokenEndpoint::start(60).await;
    let store = mailferry_shared::redis::RedisStore::connect(
        &mailferry_shared::secret::Secret::new("redis://127.0.0.1:6379/0"),
        &rig.prefix,
    )
    .await
    .unwrap();
    let mut record = store.batch(&b).await.unwrap().unwrap();
    let mailferry_shared::domain::login::AuthMethod::OAuth2(client) = &mut record.source_auth
    else {
        panic!("the source logs in with OAuth2");
    };
    client.token_url = trap.url();
    store.put_batch(&b, &record).await.unwrap();
    post(&acme, &format!("/api/v1/batches/{b}/sync-now"), json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = acme
            .get(&format!("/api/v1/batches/{b}/users"))
            .await
            .unwrap();
        let page: Value = serde_json::from_str(&checked(&page)).unwrap();
        let users = page["users"].as_array().unwrap();
        if users.iter().all(|u| u["status"] == "failed") {
            for u in users {
                let reason = u["reason"].as_str().unwrap_or("");
                assert!(reason.contains("does not open"), "{u}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "the users did not fail: {page}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        trap.log().is_empty(),
        "the trap was sent a grant: {:?}",
        trap.log()
    );
    rig.assert_no_canary_at_rest().await;
    rig.clean_up().await;
}

/// The sealed source secret Redis holds for a user (the test reads the store as an
/// attacker with Redis would).
async fn sealed_source_secret(rig: &ApiRig, batch: &str, user: &str) -> String {
    let client = redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw: String = redis::cmd("GET")
        .arg(format!("{}:user:{batch}:{user}", rig.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let record: Value = serde_json::from_str(&raw).unwrap();
    record["source_secret"].as_str().unwrap().to_string()
}
