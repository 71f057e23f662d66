//! The Redis checkpoint store against the machine's real Redis (127.0.0.1:6379, or
//! MAILFERRY_TEST_REDIS_URL), under a key prefix of its own that it removes afterwards.

use mailferry_shared::job::{Checkpoint, CheckpointKey, InFlight, WireName};
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::secret::Secret;
use mailferry_shared::store::StateStore;

fn redis_url() -> Secret {
    Secret::new(
        std::env::var("MAILFERRY_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
    )
}

#[tokio::test]
async fn checkpoints_round_trip_in_redis_with_binary_folder_names() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let store = RedisStore::connect(&redis_url(), &prefix)
        .await
        .expect("Redis must be running on 127.0.0.1:6379 (tests/run-all.sh checks)");
    let key = CheckpointKey {
        user: "alice@example.com".into(),
        source_folder: WireName(bytes::Bytes::from_static(b"Entw&APw-rfe\xff")),
    };
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), None);
    let mut cp = Checkpoint {
        source_uidvalidity: 7,
        source_uid_done: 120,
        in_flight: Some(InFlight {
            source_uids: vec![120, 121],
            target_uidnext: 44,
        }),
        ..Checkpoint::default()
    };
    cp.uid_map.insert(1, 10);
    store.save_checkpoint(&key, &cp).await.unwrap();
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(cp.clone()));
    // another user with the same folder is a different key
    let other = CheckpointKey {
        user: "bob@example.com".into(),
        ..key.clone()
    };
    assert_eq!(store.load_checkpoint(&other).await.unwrap(), None);
    assert_eq!(store.delete_all().await.unwrap(), 1);
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), None);
}

#[tokio::test]
async fn a_wrong_url_is_a_named_error_without_the_password() {
    let err = RedisStore::connect(&Secret::new("redis://:s3cret@127.0.0.1:1/0"), "x")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis connect"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test]
async fn progress_batches_count_once_even_when_replayed() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let store = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let counts = [("copied", 50), ("copied_bytes", 1_000_000)];
    assert!(store
        .record_progress("b1", "alice", "job-1", 1, &counts)
        .await
        .unwrap());
    // the reply was lost and the worker sends the same batch again
    assert!(!store
        .record_progress("b1", "alice", "job-1", 1, &counts)
        .await
        .unwrap());
    assert!(store
        .record_progress("b1", "alice", "job-1", 2, &[("copied", 7), ("skipped", 1)])
        .await
        .unwrap());
    // an older batch arriving late changes nothing either
    assert!(!store
        .record_progress("b1", "alice", "job-1", 1, &counts)
        .await
        .unwrap());
    // another job of the same user counts on its own sequence
    assert!(store
        .record_progress("b1", "alice", "job-2", 1, &[("copied", 3)])
        .await
        .unwrap());
    let p = store.progress("b1", "alice").await.unwrap();
    assert_eq!(p.get("copied"), Some(&60));
    assert_eq!(p.get("copied_bytes"), Some(&1_000_000));
    assert_eq!(p.get("skipped"), Some(&1));
    assert_eq!(p.len(), 3, "{p:?}");
    store.delete_all().await.unwrap();
}
