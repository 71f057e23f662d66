//! The RabbitMQ job queue against the machine's real broker (guest@127.0.0.1:5672, or
//! MAILFERRY_TEST_AMQP_URL), under a queue prefix of its own, deleted afterwards.

use std::time::Duration;

use mailferry_shared::domain::job::{FolderJob, WireName};
use mailferry_shared::queue::amqp::AmqpQueue;
use mailferry_shared::queue::{Delivery, JobQueue};
use mailferry_shared::secret::Secret;

fn url() -> Secret {
    Secret::new(
        std::env::var("MAILFERRY_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    )
}

fn job(folder: &str) -> FolderJob {
    FolderJob {
        batch: "b1".into(),
        user: "alice@example.com".into(),
        source_folder: WireName(folder.to_string().into()),
        target_folder: WireName(folder.to_string().into()),
        uid_range: None,
        pass: 1,
        group: None,
        archive: None,
    }
}

async fn next(q: &AmqpQueue) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), q.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer is alive")
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_are_acked_retried_narrowed_and_dead_lettered_with_their_reason() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let q = AmqpQueue::connect(&url(), &prefix, 5)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    q.start_consuming(4).await.unwrap();
    // declaring again (another worker starting) is harmless
    let again = AmqpQueue::connect(&url(), &prefix, 5).await.unwrap();
    drop(again);
    // A and B alone, C and D as one bundle
    for bundle in [vec![job("A")], vec![job("B")], vec![job("C"), job("D")]] {
        q.publish(bundle).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&q).await);
    }
    let by = |f: &str| {
        got.iter()
            .find(|d| d.jobs[0].source_folder.as_bytes() == f.as_bytes())
            .unwrap()
            .clone()
    };
    assert!(got.iter().all(|d| d.attempt == 1));
    assert_eq!(by("C").jobs, [job("C"), job("D")]);
    q.ack(&by("A")).await;
    q.retry(by("B"), Duration::from_millis(10)).await;
    // of the bundle, D runs again and C failed for good: what a worker does
    let cd = by("C");
    q.retry(cd.narrowed(vec![job("D")]), Duration::from_millis(10))
        .await;
    q.dead_letter(
        &cd.narrowed(vec![job("C")]),
        "source: authentication rejected".into(),
    )
    .await;

    let mut again = vec![next(&q).await, next(&q).await];
    again.sort_by_key(|d| d.bundle_id());
    assert_eq!(again[0].jobs, [job("B")]);
    assert_eq!(again[1].jobs, [job("D")]);
    assert!(again.iter().all(|d| d.attempt == 2));
    for d in &again {
        q.ack(d).await;
    }
    let dead = q.drain_dead().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].jobs, [job("C")]);
    assert_eq!(
        dead[0].reason.as_deref(),
        Some("source: authentication rejected")
    );
    // nothing else is left
    assert!(tokio::time::timeout(Duration::from_millis(500), q.next())
        .await
        .is_err());
    q.delete_queues().await.unwrap();
}

/// A job whose worker keeps dying without acking (here: handing it back) is
/// dead-lettered by RabbitMQ once it reaches the delivery limit; it does not loop.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_job_stops_at_the_delivery_limit() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let q = AmqpQueue::connect(&url(), &prefix, 2).await.unwrap();
    q.start_consuming(1).await.unwrap();
    q.publish(vec![job("poison")]).await.unwrap();
    let mut deliveries = 0;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), q.next()).await {
        deliveries += 1;
        assert!(deliveries <= 5, "delivered again and again");
        q.abandon(&d).await.unwrap();
    }
    assert!(
        (2..=3).contains(&deliveries),
        "delivered {deliveries} times with a limit of 2"
    );
    let dead = q.drain_dead().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].jobs, [job("poison")]);
    assert_eq!(
        dead[0].reason, None,
        "dead-lettered by the broker, not by us"
    );
    q.delete_queues().await.unwrap();
}

/// A job handed back for later does not hold the worker: `retry` returns at once, the
/// job waits in a delay queue (1.5 s asked: the 2 s queue) and comes back to the jobs
/// queue by itself, as its next attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_hand_back_waits_in_rabbitmq_not_in_the_worker() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let q = AmqpQueue::connect(&url(), &prefix, 5).await.unwrap();
    q.start_consuming(2).await.unwrap();
    q.publish(vec![job("later")]).await.unwrap();
    let first = next(&q).await;
    let handed = std::time::Instant::now();
    q.retry(first, Duration::from_millis(1500)).await;
    assert!(
        handed.elapsed() < Duration::from_millis(500),
        "retry held the caller for {:?}",
        handed.elapsed()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1200), q.next())
            .await
            .is_err(),
        "delivered again before its delay"
    );
    let again = next(&q).await;
    let waited = handed.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    assert_eq!(again.jobs, [job("later")]);
    assert_eq!(again.attempt, 2);
    q.ack(&again).await;
    q.delete_queues().await.unwrap();
}

/// A hand-back whose publish fails (here: its delay queue is deleted under it) gives
/// the delivery back to RabbitMQ at once (issue 19, finding 13). Before, it stayed
/// unacked, holding the consumer's only prefetch slot until the channel died, and
/// nothing more was delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_hand_back_returns_the_delivery_at_once() {
    let prefix = format!("mft-{:016x}", fastrand::u64(..));
    let q = AmqpQueue::connect(&url(), &prefix, 5).await.unwrap();
    q.start_consuming(1).await.unwrap();
    q.publish(vec![job("A")]).await.unwrap();
    let first = next(&q).await;
    q.delete_queue(&format!("{prefix}.delay.2s")).await.unwrap();
    // publishing to a missing queue is retried for a few seconds, then given up
    q.retry(first, Duration::from_millis(1500)).await;
    let again = tokio::time::timeout(Duration::from_secs(5), q.next())
        .await
        .expect("the delivery is back at once, not held unacked")
        .unwrap();
    assert_eq!(again.jobs, [job("A")]);
    q.ack(&again).await;
    q.delete_queues().await.unwrap();
}
