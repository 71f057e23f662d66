//! Coordinator features served inside the test's own process: the entry points take a
//! listener the caller bound (here on port 0), a cluster handle and a shutdown signal,
//! so a test needs no binary, no free-port guess and no log scraping. The process-level
//! tests (api.rs, cluster.rs) still run the real binary; these show the same code
//! answering when it is handed what it needs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use mailferry_coordinator::admin::Cluster;
use mailferry_coordinator::api::{self, Api};
use mailferry_coordinator::client::ApiClient;
use mailferry_coordinator::ops;
use mailferry_coordinator::scheduler;
use mailferry_shared::config::seal::Keyring;
use mailferry_shared::config::settings::Settings;
use mailferry_shared::redis::RedisStore;
use mailferry_shared::secret::Secret;
use mailferry_tests::dovecot::temp_dir;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

const TOKEN: &str = "in-process-token-0123456789";
const OTHER: &str = "another-tenant-token-98765";

/// A coordinator's settings for one test, in a directory of its own: its own key
/// prefix, two tenants, a sealing key in a file.
struct Fixture {
    dir: std::path::PathBuf,
    settings: Settings,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = temp_dir("in-process");
        let prefix = format!("mfi-{:016x}", fastrand::u64(..));
        let keys = dir.join("keys");
        std::fs::write(&keys, Keyring::generate("k1").unwrap().expose()).unwrap();
        let config = dir.join("mailferry.toml");
        std::fs::write(
            &config,
            format!(
                "key_prefix = \"{prefix}\"\n\
                 [sealing]\nkey_file = \"{}\"\n\
                 [coordinator]\nleader_lease_secs = 3\n\
                 [api]\nforbid_private_sources = false\n\
                 tokens = [{{ tenant = \"acme\", token = \"{TOKEN}\" }}, {{ tenant = \"globex\", token = \"{OTHER}\" }}]\n",
                keys.display()
            ),
        )
        .unwrap();
        let settings = Settings::load(Some(&config), std::iter::empty()).unwrap();
        Fixture { dir, settings }
    }

    /// Deletes the test's Redis keys and its directory.
    async fn clean_up(self) {
        let store = RedisStore::from_settings(&self.settings).await.unwrap();
        store.delete_all().await.unwrap();
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

fn json_of(answer: &mailferry_coordinator::client::Answer) -> Value {
    serde_json::from_slice(&answer.body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_in_process_on_a_listener_the_test_bound_and_stops_on_its_signal() {
    let fixture = Fixture::new();
    let cluster = Cluster::connect(fixture.settings.clone()).await.unwrap();
    let api = Api::new(cluster).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(api::serve(listener, api, stopped));

    let acme = ApiClient::new(&base, Secret::new(TOKEN)).unwrap();
    let globex = ApiClient::new(&base, Secret::new(OTHER)).unwrap();
    let nobody = ApiClient::new(&base, Secret::new("")).unwrap();
    assert_eq!(nobody.get("/api/v1/batches").await.unwrap().status, 401);

    let mut ids = Vec::new();
    for (name, role) in [("Old", "source"), ("New", "target")] {
        let made = acme
            .post_json(
                "/api/v1/endpoints",
                &json!({"name": name, "role": role, "provider": "custom",
                        "host": "127.0.0.1", "port": 1, "security": "plain"}),
            )
            .await
            .unwrap();
        assert_eq!(made.status, 201, "{}", String::from_utf8_lossy(&made.body));
        ids.push(json_of(&made)["id"].as_str().unwrap().to_string());
    }
    let batch = acme
        .post_json(
            "/api/v1/batches",
            &json!({"name": "Sales", "source_endpoint": ids[0], "target_endpoint": ids[1]}),
        )
        .await
        .unwrap();
    assert_eq!(
        batch.status,
        201,
        "{}",
        String::from_utf8_lossy(&batch.body)
    );
    let b = json_of(&batch)["id"].as_str().unwrap().to_string();
    let user = acme
        .post_json(
            &format!("/api/v1/batches/{b}/users"),
            &json!({"email": "carol@example.com", "source_password": "pw", "target_password": "pw2"}),
        )
        .await
        .unwrap();
    assert_eq!(user.status, 201, "{}", String::from_utf8_lossy(&user.body));
    let users = acme
        .get(&format!("/api/v1/batches/{b}/users"))
        .await
        .unwrap();
    assert_eq!(users.status, 200);
    let listed = json_of(&users).to_string();
    assert!(listed.contains("carol@example.com"), "{listed}");
    assert!(!listed.contains("\"pw\""), "a password came out: {listed}");
    // Another tenant sees none of it.
    assert_eq!(
        globex
            .get(&format!("/api/v1/batches/{b}"))
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        json_of(&globex.get("/api/v1/batches").await.unwrap()),
        json!([])
    );

    stop.send(true).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the API did not stop on its signal: {ended:?}"
    );
    assert!(
        acme.get("/api/v1/batches").await.is_err(),
        "still answering after the stop"
    );
    fixture.clean_up().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ops_endpoint_answers_in_process_and_readiness_follows_its_checks() {
    let metrics = ops::install_metrics("coordinator").unwrap();
    let mut readiness = ops::Readiness::default();
    let redis = readiness.check("redis unreachable");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    ops::serve(listener, metrics, readiness);
    let client = ApiClient::new(&base, Secret::new("")).unwrap();

    let health = client.get("/healthz").await.unwrap();
    assert_eq!((health.status, &health.body[..]), (200, &b"ok\n"[..]));
    let ready = client.get("/readyz").await.unwrap();
    assert_eq!(
        ready.status,
        503,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert!(String::from_utf8_lossy(&ready.body).contains("redis unreachable"));
    redis.store(true, Ordering::SeqCst);
    assert_eq!(client.get("/readyz").await.unwrap().status, 200);
    let scraped = client.get("/metrics").await.unwrap();
    assert_eq!(scraped.status, 200);
    assert!(
        String::from_utf8_lossy(&scraped.body).contains("mailferry_"),
        "no mailferry metric in the scrape"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_coordinators_in_one_process_share_the_lead_and_a_stopped_leader_hands_it_over() {
    let fixture = Fixture::new();
    let settings = &fixture.settings;
    let keys = std::sync::Arc::new(Keyring::parse(&settings.sealing_keys().unwrap()).unwrap());
    let store = RedisStore::from_settings(settings).await.unwrap();
    let start = |stopped| {
        let (settings, store, keys) = (settings.clone(), store.clone(), keys.clone());
        tokio::spawn(async move { scheduler::run(settings, store, keys, stopped).await })
    };
    let (stop_a, stopped_a) = watch::channel(false);
    let (stop_b, stopped_b) = watch::channel(false);
    let a = start(stopped_a);
    let leader = async |store: &RedisStore, not: Option<&str>| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(holder) = store.leader().await.unwrap() {
                if Some(holder.as_str()) != not {
                    return holder;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new leader within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let first = leader(&store, None).await;
    let b = start(stopped_b);
    // The second stands by: the lease stays the first's over several renewals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        store.leader().await.unwrap().as_deref(),
        Some(first.as_str())
    );

    // The leader stops (its task ends, the lease released) and the other takes over.
    stop_a.send(true).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), a).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the leader did not stop: {ended:?}"
    );
    let second = leader(&store, Some(&first)).await;
    assert_ne!(second, first);
    stop_b.send(true).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), b).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the standby did not stop: {ended:?}"
    );
    assert_eq!(
        store.leader().await.unwrap(),
        None,
        "the lease was not released"
    );
    fixture.clean_up().await;
}
