//! The Redis store against the machine's real Redis (127.0.0.1:6379, or
//! MAILFERRY_TEST_REDIS_URL), under a key prefix of its own that it removes afterwards:
//! checkpoints, and the control scripts (claims, progress, leadership).

use std::time::Duration;

use mailferry_shared::domain::job::{Checkpoint, CheckpointKey, FolderJob, InFlight, WireName};
use mailferry_shared::domain::progress::Counter;
use mailferry_shared::domain::status::{Intent, JobState};
use mailferry_shared::redis::control::{
    ClaimAnswer, Counts, PassRecord, Renewal, RunRenewal, HAND_BACK_SETTLE,
};
use mailferry_shared::redis::RedisStore;
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
        batch: "b1".into(),
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
    // and so is the same user in another batch (or another tenant's batch): it neither
    // reads nor overwrites this batch's checkpoint
    let other_batch = CheckpointKey {
        batch: "b2".into(),
        ..key.clone()
    };
    assert_eq!(store.load_checkpoint(&other_batch).await.unwrap(), None);
    store
        .save_checkpoint(&other_batch, &Checkpoint::default())
        .await
        .unwrap();
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(cp.clone()));
    assert_eq!(store.delete_all().await.unwrap(), 2);
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

/// A store under a key prefix of its own (the test deletes its keys at the end).
async fn fresh_store() -> RedisStore {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    RedisStore::connect(&redis_url(), &prefix).await.unwrap()
}

fn job(folder: &str, pass: u64) -> FolderJob {
    FolderJob {
        batch: "b1".into(),
        user: "alice".into(),
        source_folder: WireName(folder.to_string().into()),
        target_folder: WireName(folder.to_string().into()),
        uid_range: None,
        pass,
        group: None,
        archive: None,
    }
}

/// A pass of alice's with these jobs queued, alice started.
async fn begin(store: &RedisStore, jobs: &[FolderJob]) {
    store
        .set_intent("b1", &["alice".to_string()], Intent::Active, true)
        .await
        .unwrap();
    let states: Vec<(FolderJob, JobState)> =
        jobs.iter().map(|j| (j.clone(), JobState::Queued)).collect();
    let record = PassRecord {
        pass: jobs[0].pass,
        ..PassRecord::default()
    };
    store
        .begin_pass("b1", "alice", &record, &states, u64::MAX / 2)
        .await
        .unwrap();
}

async fn claim(store: &RedisStore, job: &FolderJob, holder: &str, ttl: Duration) -> ClaimAnswer {
    let (mut answers, _) = store
        .claim_jobs(std::slice::from_ref(job), holder, ttl)
        .await
        .unwrap();
    answers.remove(0)
}

async fn renew(
    store: &RedisStore,
    job: &FolderJob,
    holder: &str,
    ttl: Duration,
    seq: u64,
    counts: &Counts,
) -> Renewal {
    store
        .renew_claims(
            std::slice::from_ref(job),
            holder,
            ttl,
            seq,
            &[(job.user.clone(), counts.clone())],
            &[],
        )
        .await
        .unwrap()
}

async fn finish(
    store: &RedisStore,
    job: &FolderJob,
    holder: &str,
    state: Option<&JobState>,
    seq: u64,
    counts: &Counts,
) {
    store
        .finish_claims(
            &[(job.clone(), state.cloned())],
            holder,
            seq,
            &[(job.user.clone(), counts.clone())],
            &[],
        )
        .await
        .unwrap()
}

fn held_by_alice(intent: Intent) -> Renewal {
    Renewal::Held([("alice".to_string(), intent)].into_iter().collect())
}

#[tokio::test]
async fn progress_batches_count_once_even_when_replayed() {
    let store = fresh_store().await;
    let (inbox, sent) = (job("INBOX", 1), job("Sent", 1));
    begin(&store, &[inbox.clone(), sent.clone()]).await;
    let ttl = Duration::from_secs(30);
    assert_eq!(
        claim(&store, &inbox, "run-1", ttl).await,
        ClaimAnswer::Granted
    );
    let counts: Counts = vec![(Counter::Copied, 50), (Counter::CopiedBytes, 1_000_000)];
    let held = renew(&store, &inbox, "run-1", ttl, 1, &counts).await;
    assert_eq!(held, held_by_alice(Intent::Active));
    // the reply was lost and the worker sends the same batch again
    renew(&store, &inbox, "run-1", ttl, 1, &counts).await;
    renew(
        &store,
        &inbox,
        "run-1",
        ttl,
        2,
        &vec![(Counter::Copied, 7), (Counter::Skipped, 1)],
    )
    .await;
    // an older batch arriving late changes nothing either
    renew(&store, &inbox, "run-1", ttl, 1, &counts).await;
    let done = JobState::Done {
        verified: true,
        mismatch: None,
        counts: None,
    };
    finish(
        &store,
        &inbox,
        "run-1",
        Some(&done),
        3,
        &vec![(Counter::Copied, 3)],
    )
    .await;
    // the finish replayed (its reply lost): not counted twice
    finish(
        &store,
        &inbox,
        "run-1",
        Some(&done),
        3,
        &vec![(Counter::Copied, 3)],
    )
    .await;
    // another run of another job counts on its own sequence
    assert_eq!(
        claim(&store, &sent, "run-2", ttl).await,
        ClaimAnswer::Granted
    );
    finish(
        &store,
        &sent,
        "run-2",
        Some(&done),
        1,
        &vec![(Counter::Copied, 1)],
    )
    .await;
    let p = store.progress("b1", "alice").await.unwrap();
    assert_eq!(p.get("copied"), Some(&61));
    assert_eq!(p.get("copied_bytes"), Some(&1_000_000));
    assert_eq!(p.get("skipped"), Some(&1));
    assert_eq!(p.len(), 3, "{p:?}");
    let states = store.job_states("b1", "alice").await.unwrap();
    assert!(states.iter().all(|(_, s)| *s == done), "{states:?}");
    // both ends marked alice for the coordinator, once
    assert_eq!(
        store.take_dispatch(10).await.unwrap(),
        vec![("b1".to_string(), "alice".to_string())]
    );
    store.delete_all().await.unwrap();
}

/// Folder names on the wire need not be UTF-8 (a server may send raw 8-bit names). Two
/// such names that a lossy conversion would make one are two claims: the claim fields
/// travel to the scripts as bytes beside their JSON request, never inside it.
#[tokio::test]
async fn claims_on_folders_whose_names_are_not_utf8_stay_apart_and_are_released() {
    let store = fresh_store().await;
    let ttl = Duration::from_secs(30);
    let named = |bytes: &[u8]| FolderJob {
        source_folder: WireName(bytes.to_vec().into()),
        target_folder: WireName(bytes.to_vec().into()),
        ..job("x", 1)
    };
    let (a, b) = (named(b"Caf\xe9"), named(b"Caf\xe8"));
    begin(&store, &[a.clone(), b.clone()]).await;
    assert_eq!(claim(&store, &a, "run-1", ttl).await, ClaimAnswer::Granted);
    assert_eq!(claim(&store, &b, "run-2", ttl).await, ClaimAnswer::Granted);
    assert_eq!(claim(&store, &a, "run-3", ttl).await, ClaimAnswer::Busy);
    assert_eq!(
        renew(&store, &a, "run-1", ttl, 1, &vec![(Counter::Copied, 2)]).await,
        Renewal::Held(
            [("alice".to_string(), Intent::Active)]
                .into_iter()
                .collect()
        )
    );
    assert_eq!(
        store.progress("b1", "alice").await.unwrap().get("copied"),
        Some(&2)
    );
    let done = JobState::Done {
        verified: true,
        mismatch: None,
        counts: None,
    };
    finish(&store, &a, "run-1", Some(&done), 2, &vec![]).await;
    let states = store.job_states("b1", "alice").await.unwrap();
    assert_eq!(
        states.iter().filter(|(_, s)| *s == done).count(),
        1,
        "{states:?}"
    );
    // b is still run-2's; a is free again (and done).
    assert_eq!(claim(&store, &b, "run-3", ttl).await, ClaimAnswer::Busy);
    assert!(matches!(
        claim(&store, &a, "run-3", ttl).await,
        ClaimAnswer::Skip(_)
    ));
}

#[tokio::test]
async fn claims_keep_one_writer_per_folder_and_skip_what_is_not_wanted() {
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1500);
    let inbox = job("INBOX", 1);
    begin(&store, std::slice::from_ref(&inbox)).await;
    assert_eq!(claim(&store, &inbox, "a", ttl).await, ClaimAnswer::Granted);
    assert_eq!(
        store.job_states("b1", "alice").await.unwrap()[0].1,
        JobState::Running
    );
    // a second delivery of the same job (a redelivery, a republish) waits
    assert_eq!(claim(&store, &inbox, "b", ttl).await, ClaimAnswer::Busy);
    // the first holder pauses past its claim: the claim lapses, the other run takes it,
    // and the first holder's renewal (with its progress) is refused
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(claim(&store, &inbox, "b", ttl).await, ClaimAnswer::Granted);
    let late = renew(&store, &inbox, "a", ttl, 1, &vec![(Counter::Copied, 99)]).await;
    assert_eq!(late, Renewal::Lost);
    assert_eq!(
        store.progress("b1", "alice").await.unwrap().get("copied"),
        None
    );
    // the stale holder's finish does not release b's claim, nor write its state over
    // b's (issue 19, finding 13: it wrote "queued" over a running or finished job)
    finish(&store, &inbox, "a", Some(&JobState::Queued), 1, &vec![]).await;
    assert_eq!(claim(&store, &inbox, "c", ttl).await, ClaimAnswer::Busy);
    assert_eq!(
        store.job_states("b1", "alice").await.unwrap()[0].1,
        JobState::Running,
        "b's job, as b's claim left it"
    );
    let done = JobState::Done {
        verified: true,
        mismatch: None,
        counts: None,
    };
    finish(&store, &inbox, "b", Some(&done), 1, &vec![]).await;
    // done: a later copy of the job is skipped
    assert!(matches!(
        claim(&store, &inbox, "d", ttl).await,
        ClaimAnswer::Skip(why) if why.contains("done")
    ));
    // a job of an older pass is skipped; so is any job of a stopped user
    let newer = job("INBOX", 2);
    begin(&store, std::slice::from_ref(&newer)).await;
    assert!(matches!(
        claim(&store, &inbox, "e", ttl).await,
        ClaimAnswer::Skip(why) if why.contains("superseded")
    ));
    store
        .set_intent("b1", &["alice".to_string()], Intent::Stopped, false)
        .await
        .unwrap();
    assert!(matches!(
        claim(&store, &newer, "f", ttl).await,
        ClaimAnswer::Skip(why) if why.contains("stopped")
    ));
    // a running job learns of the stop at its next renewal
    store
        .set_intent("b1", &["alice".to_string()], Intent::Active, false)
        .await
        .unwrap();
    assert_eq!(claim(&store, &newer, "g", ttl).await, ClaimAnswer::Granted);
    store
        .set_intent("b1", &["alice".to_string()], Intent::Stopped, false)
        .await
        .unwrap();
    assert_eq!(
        renew(&store, &newer, "g", ttl, 1, &vec![]).await,
        held_by_alice(Intent::Stopped)
    );
    store.delete_all().await.unwrap();
}

/// The same user in two batches copies into one mailbox: a folder claimed by a run of
/// one batch is busy for a run of the other (issue 19, finding 5: claims were per
/// batch, so both wrote the folder at once), and free again once the first finishes.
#[tokio::test]
async fn a_folder_claimed_in_one_batch_is_busy_in_another() {
    let store = fresh_store().await;
    let ttl = Duration::from_millis(5000);
    let b1 = job("INBOX", 1);
    let b2 = FolderJob {
        batch: "b2".into(),
        ..b1.clone()
    };
    for job in [&b1, &b2] {
        store
            .set_intent(&job.batch, &["alice".to_string()], Intent::Active, true)
            .await
            .unwrap();
        let record = PassRecord {
            pass: 1,
            ..PassRecord::default()
        };
        store
            .begin_pass(
                &job.batch,
                "alice",
                &record,
                &[(job.clone(), JobState::Queued)],
                u64::MAX / 2,
            )
            .await
            .unwrap();
    }
    assert_eq!(
        claim(&store, &b1, "run-b1", ttl).await,
        ClaimAnswer::Granted
    );
    assert_eq!(claim(&store, &b2, "run-b2", ttl).await, ClaimAnswer::Busy);
    let done = JobState::Done {
        verified: true,
        mismatch: None,
        counts: None,
    };
    finish(&store, &b1, "run-b1", Some(&done), 1, &vec![]).await;
    assert_eq!(
        claim(&store, &b2, "run-b2", ttl).await,
        ClaimAnswer::Granted
    );
    store.delete_all().await.unwrap();
}

/// A job handed back (a drain at a rolling update, a stop) keeps its folder for
/// `HAND_BACK_SETTLE` after its run ends: the run may have been cut off in the middle
/// of an APPEND group whose bytes are still on their way to the target, and the next
/// run must read the folder after they land. A job that ends done lets it go at once.
#[tokio::test]
async fn a_job_handed_back_keeps_its_folder_until_its_writes_have_landed() {
    let store = fresh_store().await;
    let ttl = Duration::from_millis(5000);
    let (inbox, sent) = (job("INBOX", 1), job("Sent", 1));
    begin(&store, &[inbox.clone(), sent.clone()]).await;
    let (answers, _) = store
        .claim_jobs(&[inbox.clone(), sent.clone()], "drained", ttl)
        .await
        .unwrap();
    assert_eq!(answers, [ClaimAnswer::Granted, ClaimAnswer::Granted]);
    let done = JobState::Done {
        verified: true,
        mismatch: None,
        counts: None,
    };
    store
        .finish_claims(
            &[
                (inbox.clone(), Some(JobState::Queued)),
                (sent.clone(), Some(done)),
            ],
            "drained",
            1,
            &[],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(claim(&store, &inbox, "next", ttl).await, ClaimAnswer::Busy);
    let settled = std::time::Instant::now() + HAND_BACK_SETTLE + Duration::from_secs(2);
    loop {
        match claim(&store, &inbox, "next", ttl).await {
            ClaimAnswer::Granted => break,
            other => assert_eq!(other, ClaimAnswer::Busy),
        }
        assert!(
            std::time::Instant::now() < settled,
            "the folder stayed held"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    store.delete_all().await.unwrap();
}

/// A delivery's jobs are claimed in one call, each with its own answer and its stored
/// checkpoint; a run's checkpoints are written only while it holds every claim.
#[tokio::test]
async fn a_delivery_is_claimed_at_once_and_writes_checkpoints_only_while_it_holds_them() {
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1500);
    let (inbox, sent, drafts) = (job("INBOX", 1), job("Sent", 1), job("Drafts", 1));
    // Drafts is not in the pass (a delivery of an older plan)
    begin(&store, &[inbox.clone(), sent.clone()]).await;
    let stored = Checkpoint {
        source_uidvalidity: 7,
        target_uidvalidity: 8,
        source_uid_done: 5,
        target_uidnext: Some(6),
        ..Checkpoint::default()
    };
    store
        .save_checkpoint(&inbox.checkpoint_key(), &stored)
        .await
        .unwrap();
    assert_eq!(
        claim(&store, &sent, "other", ttl).await,
        ClaimAnswer::Granted
    );
    let (answers, found) = store
        .claim_jobs(&[inbox.clone(), sent.clone(), drafts.clone()], "run", ttl)
        .await
        .unwrap();
    assert_eq!(answers[0], ClaimAnswer::Granted);
    assert_eq!(answers[1], ClaimAnswer::Busy);
    assert!(
        matches!(&answers[2], ClaimAnswer::Skip(why) if why.contains("superseded")),
        "{answers:?}"
    );
    assert_eq!(found, vec![Some(stored.clone()), None, None]);
    let done = JobState::Done {
        verified: true,
        mismatch: None,
        counts: None,
    };
    let newer = Checkpoint {
        source_uid_done: 9,
        target_uidnext: Some(10),
        ..stored.clone()
    };
    store
        .finish_claims(
            &[(inbox.clone(), Some(done.clone()))],
            "run",
            1,
            &[],
            &[(inbox.checkpoint_key(), newer.clone())],
        )
        .await
        .unwrap();
    let key = inbox.checkpoint_key();
    assert_eq!(
        store.load_checkpoint(&key).await.unwrap(),
        Some(newer.clone())
    );
    // the finish released INBOX and left Sent to its holder
    let next = job("INBOX", 2);
    begin(&store, std::slice::from_ref(&next)).await;
    assert_eq!(claim(&store, &next, "a", ttl).await, ClaimAnswer::Granted);
    // a pauses past its claim and b takes the folder over: a's renewal and finish
    // write none of a's checkpoints
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(claim(&store, &next, "b", ttl).await, ClaimAnswer::Granted);
    let stale = Checkpoint {
        source_uid_done: 1,
        ..newer.clone()
    };
    let renewed = store
        .renew_claims(
            std::slice::from_ref(&next),
            "a",
            ttl,
            1,
            &[],
            &[(key.clone(), stale.clone())],
        )
        .await
        .unwrap();
    assert_eq!(renewed, Renewal::Lost);
    store
        .finish_claims(
            &[(next.clone(), None)],
            "a",
            2,
            &[],
            &[(key.clone(), stale)],
        )
        .await
        .unwrap();
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(newer));
    assert_eq!(
        claim(&store, &next, "c", ttl).await,
        ClaimAnswer::Busy,
        "a's finish let b's claim go"
    );
    store.delete_all().await.unwrap();
}

/// Users who share a delivery share the per-batch hashes of job states, specs and
/// counters, a field each: one claim, renewal and finish for two users keep each
/// user's states and counts apart, counters stay exact past what Lua's JSON keeps (14
/// digits), and a folder name with a slash and 8-bit text survives the scripts' decode
/// and re-encode.
#[tokio::test]
async fn users_sharing_a_delivery_keep_their_states_and_counts_apart() {
    let store = fresh_store().await;
    let ttl = Duration::from_secs(30);
    let users = ["alice".to_string(), "bob".to_string()];
    store
        .set_intent("b1", &users, Intent::Active, true)
        .await
        .unwrap();
    let of = |user: &str, folder: &str| FolderJob {
        user: user.into(),
        ..job(folder, 1)
    };
    let (a_inbox, b_inbox, b_drafts, b_later) = (
        of("alice", "INBOX"),
        of("bob", "INBOX"),
        of("bob", "Entwürfe/2024 \"q\""),
        of("bob", "Archive"),
    );
    let record = PassRecord {
        pass: 1,
        ..PassRecord::default()
    };
    let a_states = vec![(a_inbox.clone(), JobState::Queued)];
    let b_states = vec![
        (b_inbox.clone(), JobState::Queued),
        (b_drafts.clone(), JobState::Queued),
        (b_later.clone(), JobState::Waiting),
    ];
    store
        .begin_passes(
            "b1",
            &[("alice", &record, &a_states), ("bob", &record, &b_states)],
            u64::MAX / 2,
        )
        .await
        .unwrap();
    let delivery = [a_inbox.clone(), b_inbox.clone(), b_drafts.clone()];
    let (answers, _) = store.claim_jobs(&delivery, "run", ttl).await.unwrap();
    assert_eq!(answers, vec![ClaimAnswer::Granted; 3]);
    let big = (1i64 << 52) + 1; // beyond 14 digits, exact as a double
    let held = store
        .renew_claims(
            &delivery,
            "run",
            ttl,
            1,
            &[
                (
                    "alice".into(),
                    vec![(Counter::Copied, 5), (Counter::CopiedBytes, big)],
                ),
                ("bob".into(), vec![(Counter::Copied, 7)]),
            ],
            &[],
        )
        .await
        .unwrap();
    assert!(matches!(held, Renewal::Held(_)), "{held:?}");
    let done = JobState::Done {
        verified: false,
        mismatch: Some("source 3, target 2 — 1 missing".into()),
        counts: None,
    };
    store
        .finish_claims(
            &[
                (a_inbox.clone(), Some(done.clone())),
                (b_inbox.clone(), Some(done.clone())),
                (b_drafts.clone(), None), // handed back: stays running
            ],
            "run",
            2,
            &[
                ("alice".into(), vec![(Counter::CopiedBytes, 2)]),
                ("bob".into(), vec![(Counter::Skipped, 1)]),
            ],
            &[],
        )
        .await
        .unwrap();
    // the coordinator queues bob's waiting job; an id the pass lacks is left out
    store
        .set_job_states(
            "b1",
            "bob",
            &[
                (b_later.id(), JobState::Queued),
                (of("bob", "Gone").id(), JobState::Queued),
            ],
        )
        .await
        .unwrap();
    let states = store.user_states("b1", &users).await.unwrap();
    assert_eq!(states[0].jobs, vec![(a_inbox.id(), done.clone())]);
    let mut bob = vec![
        (b_inbox.id(), done),
        (b_drafts.id(), JobState::Running),
        (b_later.id(), JobState::Queued),
    ];
    bob.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(states[1].jobs, bob);
    let counts = |pairs: &[(Counter, i64)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.name().to_string(), *v))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        states[0].progress,
        counts(&[(Counter::Copied, 5), (Counter::CopiedBytes, big + 2)])
    );
    assert_eq!(
        states[1].progress,
        counts(&[(Counter::Copied, 7), (Counter::Skipped, 1)])
    );
    assert_eq!(
        store
            .job_specs("b1", "bob", &[b_drafts.id(), b_inbox.id()])
            .await
            .unwrap(),
        vec![b_drafts, b_inbox]
    );
    store.delete_all().await.unwrap();
}

/// The server the lease tests ask slots of (no connection is made).
fn lease_test_endpoint() -> mailferry_shared::domain::endpoint::Endpoint {
    use mailferry_shared::domain::endpoint::{Endpoint, Security};
    Endpoint {
        host: "imap.example".into(),
        port: 993,
        security: Security::Tls,
        ca_file: None,
        accept_invalid_certs: false,
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        public_only: false,
        max_connections: None,
        max_host_connections: None,
        daily_download_bytes: None,
    }
}

/// A daily download budget is shared by the processes: what one downloaded counts for
/// the other, and at the budget the account is paused for every process until the
/// UTC day is over.
#[tokio::test]
async fn a_daily_download_budget_is_shared_and_pauses_the_account_for_everyone() {
    use mailferry_shared::redis::slots::SharedSlots;
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1500);
    let a = SharedSlots::new(store.clone(), 4, 8, ttl, Duration::from_secs(1));
    let b = SharedSlots::new(store.clone(), 4, 8, ttl, Duration::from_secs(1));
    let (ga, gb) = (a.gate(true), b.gate(true));
    let ep = lease_test_endpoint();
    ga.spend(&ep, "alice", 600, 1000).await.unwrap();
    gb.spend(&ep, "bob", 600, 1000).await.unwrap();
    let used_up = gb.spend(&ep, "alice", 600, 1000).await;
    let Err(e @ mailferry_shared::Error::Paused { .. }) = used_up else {
        panic!("alice's budget: {used_up:?}");
    };
    assert!(e.to_string().contains("daily download budget"), "{e}");
    let left = match e {
        mailferry_shared::Error::Paused { left, .. } => left,
        _ => unreachable!(),
    };
    assert!(left <= Duration::from_secs(86_400));
    // No process connects to alice any more today; bob goes on.
    let admitted = ga.admit(&ep, "alice").await;
    assert!(
        matches!(admitted, Err(mailferry_shared::Error::Paused { .. })),
        "{:?}",
        admitted.map(|_| ())
    );
    let bob = ga.admit(&ep, "bob").await.unwrap();
    drop(bob);
    drop((ga, gb, a, b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.delete_all().await.unwrap();
}

/// An endpoint's own caps (a provider's limit, a small server) hold across processes
/// where they are lower than the installation's, and never raise it.
#[tokio::test]
async fn an_endpoints_own_caps_hold_across_processes_and_never_raise_the_installations() {
    use mailferry_shared::redis::slots::SharedSlots;
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1500);
    let a = SharedSlots::new(store.clone(), 8, 8, ttl, Duration::from_secs(1));
    let b = SharedSlots::new(store.clone(), 8, 8, ttl, Duration::from_secs(1));
    let (ga, gb) = (a.gate(true), b.gate(true));
    let small = mailferry_shared::domain::endpoint::Endpoint {
        max_connections: Some(1),
        max_host_connections: Some(2),
        ..lease_test_endpoint()
    };
    let waits = |gate: &std::sync::Arc<dyn mailferry_shared::imap::pool::ConnectionGate>,
                 ep: &mailferry_shared::domain::endpoint::Endpoint,
                 login: &'static str| {
        let (gate, ep) = (gate.clone(), ep.clone());
        async move {
            tokio::time::timeout(Duration::from_millis(400), gate.admit(&ep, login))
                .await
                .is_err()
        }
    };
    let alice = ga.admit(&small, "alice").await.unwrap();
    assert!(
        waits(&gb, &small, "alice").await,
        "a second connection to alice"
    );
    let bob = gb.admit(&small, "bob").await.unwrap();
    assert!(
        waits(&ga, &small, "carol").await,
        "a third connection to the host"
    );
    drop((alice, bob));

    // A cap above the installation's: the installation's (8) holds.
    let generous = mailferry_shared::domain::endpoint::Endpoint {
        host: "imap2.example".into(),
        max_connections: Some(50),
        ..lease_test_endpoint()
    };
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(ga.admit(&generous, "dave").await.unwrap());
    }
    assert!(
        waits(&gb, &generous, "dave").await,
        "a ninth connection to dave"
    );
    drop(held);
    drop((ga, gb, a, b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.delete_all().await.unwrap();
}

/// Two processes share an account's cap (2) and a host's (3) through their leases; a
/// closed connection's lease is given back at the next renewal, a dead process's lapses,
/// and a paused account admits nobody.
#[tokio::test]
async fn connection_leases_hold_the_caps_across_processes_and_lapse_with_them() {
    use mailferry_shared::redis::slots::SharedSlots;
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1500);
    let a = SharedSlots::new(store.clone(), 2, 3, ttl, Duration::from_secs(1));
    let b = SharedSlots::new(store.clone(), 2, 3, ttl, Duration::from_secs(1));
    let (ga, gb) = (a.gate(true), b.gate(true));
    let ep = lease_test_endpoint();
    let waits = |gate: &std::sync::Arc<dyn mailferry_shared::imap::pool::ConnectionGate>,
                 login: &'static str| {
        let gate = gate.clone();
        let ep = ep.clone();
        async move {
            tokio::time::timeout(Duration::from_millis(400), gate.admit(&ep, login))
                .await
                .is_err()
        }
    };
    let alice_a = ga.admit(&ep, "alice").await.unwrap();
    let alice_b = gb.admit(&ep, "alice").await.unwrap();
    assert!(waits(&ga, "alice").await, "a third connection to alice");
    let bob_b = gb.admit(&ep, "bob").await.unwrap();
    assert!(waits(&ga, "carol").await, "a fourth connection to the host");
    // bob's connection closes: b gives the host's slot back at its next renewal
    drop(bob_b);
    let carol = tokio::time::timeout(Duration::from_secs(3), ga.admit(&ep, "carol"))
        .await
        .expect("the host's slot came back")
        .unwrap();
    // b dies holding alice's second connection: its lease lapses with it
    std::mem::forget(alice_b);
    drop((gb, b));
    let alice_again = tokio::time::timeout(Duration::from_secs(4), ga.admit(&ep, "alice"))
        .await
        .expect("the dead process's lease lapsed")
        .unwrap();
    // a throttling answer pauses alice for every process
    ga.throttled(&ep, "alice", Some(Duration::from_secs(5)))
        .await;
    drop((alice_a, alice_again));
    let c = SharedSlots::new(store.clone(), 2, 3, ttl, Duration::from_secs(1));
    let paused = c.gate(true).admit(&ep, "alice").await;
    assert!(
        matches!(paused, Err(mailferry_shared::Error::Paused { .. })),
        "{:?}",
        paused.map(|_| ())
    );
    drop(carol);
    // (The processes go first: a renewal after the delete would leave their hash.)
    drop((ga, a, c));
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.delete_all().await.unwrap();
}

#[tokio::test]
async fn one_coordinator_leads_and_another_takes_over_when_it_lapses() {
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1000);
    assert!(store.acquire_leader("one", ttl).await.unwrap());
    assert!(!store.acquire_leader("two", ttl).await.unwrap());
    assert!(store.renew_leader("one", ttl).await.unwrap());
    assert!(!store.renew_leader("two", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(store.acquire_leader("two", ttl).await.unwrap());
    assert!(
        !store.renew_leader("one", ttl).await.unwrap(),
        "one's lease lapsed"
    );
    // a release by a former holder does not remove the new one's lease
    store.release_leader("one").await.unwrap();
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("two"));
    store.release_leader("two").await.unwrap();
    assert_eq!(store.leader().await.unwrap(), None);
    store.delete_all().await.unwrap();
}

/// Status reads for a batch go in pipelines of 500 users: 1,201 users (three pipelines)
/// come back in order, each with its own intent, pass, due time, job states and
/// counters, and users without any come back empty (not started).
#[tokio::test]
async fn many_users_states_are_read_in_pipelines_in_order() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let store = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let users: Vec<String> = (0..1201).map(|i| format!("user{i:04}")).collect();
    let client = redis::Client::open(redis_url().expose()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for (i, user) in users.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        pipe.hset(
            format!("{prefix}:jobs:b1"),
            user,
            format!(r#"{{"job-{i}":{{"state":"queued"}}}}"#),
        )
        .hset(format!("{prefix}:progress:b1"), user, format!("copied {i}"))
        .hset(format!("{prefix}:intent:b1"), user, "active")
        .hset(
            format!("{prefix}:pass:b1"),
            user,
            format!(r#"{{"pass":{i},"planned_ms":1}}"#),
        )
        .zadd(format!("{prefix}:due:b1"), user, 1000 + i);
    }
    pipe.query_async::<()>(&mut conn).await.unwrap();
    let states = store.user_states("b1", &users).await.unwrap();
    assert_eq!(states.len(), users.len());
    for (i, state) in states.iter().enumerate() {
        if i % 3 == 0 {
            assert!(
                state.jobs.is_empty() && state.progress.is_empty(),
                "user {i}"
            );
            assert_eq!(
                (state.intent, state.pass.pass, state.due_ms),
                (Intent::Idle, 0, None),
                "user {i}"
            );
        } else {
            assert_eq!(
                state.jobs,
                [(format!("job-{i}"), JobState::Queued)],
                "user {i}"
            );
            assert_eq!(state.progress.get("copied"), Some(&(i as i64)), "user {i}");
            assert_eq!(
                (state.intent, state.pass.pass, state.due_ms),
                (Intent::Active, i as u64, Some(1000 + i as u64)),
                "user {i}"
            );
        }
    }
    store.delete_all().await.unwrap();
}

/// Asks that come in together go to Redis together, and still count one by one: seven
/// connections asked at once, three to each of two accounts and one to a third, with
/// two allowed per account and five per host, admit two, two and one; another process
/// then finds the host full, and gets its slot when one closes. A lease prefetched
/// ahead of a connection holds its slot.
#[tokio::test]
async fn connection_asks_sent_together_each_count_against_the_caps() {
    use mailferry_shared::redis::slots::SharedSlots;
    let store = fresh_store().await;
    let ttl = Duration::from_millis(1500);
    let a = SharedSlots::new(store.clone(), 2, 5, ttl, Duration::from_secs(1));
    let b = SharedSlots::new(store.clone(), 2, 5, ttl, Duration::from_secs(1));
    let ep = lease_test_endpoint();
    let gate = a.gate(true);
    let mut asks = tokio::task::JoinSet::new();
    for login in ["dave", "erin", "dave", "erin", "dave", "erin", "gina"] {
        let (gate, ep) = (gate.clone(), ep.clone());
        asks.spawn(async move {
            let admitted = tokio::time::timeout(Duration::from_millis(600), gate.admit(&ep, login))
                .await
                .ok()
                .map(Result::unwrap);
            (login, admitted)
        });
    }
    let mut tickets = Vec::new();
    let mut per_login = std::collections::HashMap::new();
    while let Some(done) = asks.join_next().await {
        let (login, admitted) = done.unwrap();
        if let Some(ticket) = admitted {
            *per_login.entry(login).or_insert(0) += 1;
            tickets.push(ticket);
        }
    }
    assert_eq!(per_login.get("dave"), Some(&2), "{per_login:?}");
    assert_eq!(per_login.get("erin"), Some(&2), "{per_login:?}");
    assert_eq!(per_login.get("gina"), Some(&1), "{per_login:?}");
    let gb = b.gate(true);
    let frank = tokio::time::timeout(Duration::from_millis(400), gb.admit(&ep, "frank")).await;
    assert!(frank.is_err(), "the host is full");
    drop(tickets.pop());
    let frank = tokio::time::timeout(Duration::from_secs(3), gb.admit(&ep, "frank"))
        .await
        .expect("a closed connection's host slot came back")
        .unwrap();
    drop((frank, tickets));
    // a prefetched lease holds its slot (c renews every 10 s: not during this test)
    let c = SharedSlots::new(
        store.clone(),
        2,
        5,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    c.prefetch(&[(&ep, "hank", false)]).await;
    let target_side = b.gate(false);
    let first = target_side.admit(&ep, "hank").await.unwrap();
    let second =
        tokio::time::timeout(Duration::from_millis(400), target_side.admit(&ep, "hank")).await;
    assert!(
        second.is_err(),
        "c's prefetched lease holds hank's second slot"
    );
    drop(first);
    // (The processes go first: a renewal after the delete would leave their hash.)
    drop((gate, gb, target_side, a, b, c));
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.delete_all().await.unwrap();
}

/// A delivery's users wait their turn without a connection: the account leases
/// prefetched for them outlive the renewals while pinned, and go back at the first
/// renewal after the pins are dropped.
#[tokio::test]
async fn a_pinned_prefetched_lease_outlives_renewals_until_unpinned() {
    use mailferry_shared::redis::slots::SharedSlots;
    let store = fresh_store().await;
    // renewals every 300 ms
    let c = SharedSlots::new(
        store.clone(),
        2,
        5,
        Duration::from_millis(900),
        Duration::from_secs(1),
    );
    let b = SharedSlots::new(
        store.clone(),
        2,
        5,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    let ep = lease_test_endpoint();
    let pins = c.prefetch(&[(&ep, "ivan", false)]).await;
    assert_eq!(pins.len(), 1);
    tokio::time::sleep(Duration::from_millis(1300)).await; // four renewals
    let gate = b.gate(false);
    let first = gate.admit(&ep, "ivan").await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(300), gate.admit(&ep, "ivan")).await;
    assert!(
        second.is_err(),
        "the pinned lease still holds ivan's second slot"
    );
    drop(pins);
    let second = tokio::time::timeout(Duration::from_secs(3), gate.admit(&ep, "ivan"))
        .await
        .expect("the unpinned lease went back at the next renewal")
        .unwrap();
    drop((first, second, gate, b, c));
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.delete_all().await.unwrap();
}

/// A pass's end schedules the next pass at the interval, except where the admin asked
/// for one during the pass (a sync now, overdue by the end: it stays). An overdue
/// recheck of the open pass is not such an ask: it used to start a needless pass.
#[tokio::test]
async fn a_pass_end_keeps_the_admins_sync_now_but_not_an_overdue_recheck() {
    let store = fresh_store().await;
    let now = mailferry_shared::redis::control::now_ms();
    store.schedule("b1", "asked", now - 10).await.unwrap();
    store
        .schedule_recheck("b1", "overdue", now - 10)
        .await
        .unwrap();
    store
        .schedule_recheck("b1", "later", now + 100_000)
        .await
        .unwrap();
    store
        .schedule_next_many(
            "b1",
            &["asked", "overdue", "later", "new"],
            now,
            now + 5_000,
        )
        .await
        .unwrap();
    let due = store.due_times("b1").await.unwrap();
    assert_eq!(due["asked"], now - 10);
    for user in ["overdue", "later", "new"] {
        assert_eq!(due[user], now + 5_000, "{user}");
    }
    store.delete_all().await.unwrap();
}

/// A worker renews all its runs in one call: each run is checked and counted on its
/// own (a run that lost a claim has nothing applied, its checkpoints included, while
/// the others go on), a replayed call counts nothing twice, two runs adding to one
/// user's counters in one call both count, and a finished run's number is forgotten.
#[tokio::test]
async fn one_renewal_call_keeps_each_run_of_a_worker_apart() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let store = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let (inbox, sent, drafts) = (job("INBOX", 1), job("Sent", 1), job("Drafts", 1));
    begin(&store, &[inbox.clone(), sent.clone(), drafts.clone()]).await;
    let (long, short) = (Duration::from_secs(30), Duration::from_millis(1500));
    assert_eq!(claim(&store, &inbox, "a", long).await, ClaimAnswer::Granted);
    assert_eq!(claim(&store, &sent, "c", long).await, ClaimAnswer::Granted);
    assert_eq!(
        claim(&store, &drafts, "b", short).await,
        ClaimAnswer::Granted
    );
    // b pauses past its claim and another worker's run takes Drafts over
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(
        claim(&store, &drafts, "x", long).await,
        ClaimAnswer::Granted
    );
    let cp = |done| Checkpoint {
        source_uidvalidity: 7,
        source_uid_done: done,
        ..Checkpoint::default()
    };
    let user = |c: Counts| vec![("alice".to_string(), c)];
    let (a1, b1) = (
        user(vec![(Counter::Copied, 5)]),
        user(vec![(Counter::Copied, 100)]),
    );
    let (a_cps, b_cps) = (
        vec![(inbox.checkpoint_key(), cp(5))],
        vec![(drafts.checkpoint_key(), cp(100))],
    );
    let first = [
        RunRenewal {
            jobs: std::slice::from_ref(&inbox),
            holder: "a",
            seq: 1,
            counts: &a1,
            checkpoints: &a_cps,
        },
        RunRenewal {
            jobs: std::slice::from_ref(&drafts),
            holder: "b",
            seq: 1,
            counts: &b1,
            checkpoints: &b_cps,
        },
    ];
    for _replay in 0..2 {
        let renewed = store.renew_runs("w", long, &first, &[]).await.unwrap();
        assert_eq!(renewed, vec![held_by_alice(Intent::Active), Renewal::Lost]);
    }
    let copied = || async {
        store
            .progress("b1", "alice")
            .await
            .unwrap()
            .get("copied")
            .copied()
    };
    assert_eq!(
        copied().await,
        Some(5),
        "a's batch counted once, b's not at all"
    );
    assert_eq!(
        store
            .load_checkpoint(&inbox.checkpoint_key())
            .await
            .unwrap(),
        Some(cp(5))
    );
    assert_eq!(
        store
            .load_checkpoint(&drafts.checkpoint_key())
            .await
            .unwrap(),
        None,
        "the run that lost Drafts wrote no checkpoint of it"
    );
    // a's claim was renewed: still a's
    assert_eq!(claim(&store, &inbox, "y", long).await, ClaimAnswer::Busy);
    // two runs add to alice's counters in one call
    let (a2, c1) = (
        user(vec![(Counter::Copied, 1)]),
        user(vec![(Counter::Copied, 2), (Counter::Skipped, 3)]),
    );
    let second = [
        RunRenewal {
            jobs: std::slice::from_ref(&inbox),
            holder: "a",
            seq: 2,
            counts: &a2,
            checkpoints: &[],
        },
        RunRenewal {
            jobs: std::slice::from_ref(&sent),
            holder: "c",
            seq: 1,
            counts: &c1,
            checkpoints: &[],
        },
    ];
    let renewed = store.renew_runs("w", long, &second, &[]).await.unwrap();
    assert_eq!(renewed, vec![held_by_alice(Intent::Active); 2]);
    assert_eq!(copied().await, Some(8));
    assert_eq!(
        store.progress("b1", "alice").await.unwrap().get("skipped"),
        Some(&3)
    );
    // the worker's runs hash holds each run's last number until the run is forgotten
    let client = redis::Client::open(redis_url().expose()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let runs_key = format!("{prefix}:runs:w");
    let numbers: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(&runs_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        numbers,
        [("a".into(), 2), ("c".into(), 1)].into_iter().collect()
    );
    store
        .renew_runs("w", long, &[], &["a".to_string()])
        .await
        .unwrap();
    let left: Vec<String> = redis::cmd("HKEYS")
        .arg(&runs_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, vec!["c".to_string()]);
    store.delete_all().await.unwrap();
}

/// A rotated refresh token is stored in place of the one it replaces only: a secret an
/// admin changed meanwhile (or another worker's rotation) is kept.
#[tokio::test]
async fn a_rotated_secret_replaces_only_the_one_it_rotated() {
    use mailferry_shared::domain::batch::UserRecord;
    use mailferry_shared::Side;
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let store = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let record = UserRecord {
        source_login: "alice".into(),
        source_secret: Some("sealed-1".into()),
        target_login: "alice".into(),
        target_secret: None,
    };
    store.put_user("b", "alice", &record).await.unwrap();
    assert!(store
        .replace_user_secret("b", "alice", Side::Source, "sealed-1", "sealed-2")
        .await
        .unwrap());
    assert!(
        !store
            .replace_user_secret("b", "alice", Side::Source, "sealed-1", "sealed-3")
            .await
            .unwrap(),
        "a stale rotation does not overwrite the newer secret"
    );
    assert!(!store
        .replace_user_secret("b", "nobody", Side::Source, "x", "y")
        .await
        .unwrap());
    let now = store.user("b", "alice").await.unwrap().unwrap();
    assert_eq!(now.source_secret.as_deref(), Some("sealed-2"));
    assert_eq!(
        now.target_secret, None,
        "the other side and the nulls are kept"
    );
    assert_eq!(now.source_login, "alice");
    mailferry_tests::run::remove_traces(redis_url().expose(), &prefix).await;
}
