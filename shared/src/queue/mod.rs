//! Where folder jobs wait for a worker. [`JobQueue`] is the interface; [`MemoryQueue`]
//! is the embedded implementation. The cluster implementation (RabbitMQ) fills the same
//! interface (`amqp.rs`). What is queued is a bundle: one job, or a user's small jobs that run
//! together (see [`crate::domain::job`]).

pub mod amqp;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::domain::job::FolderJob;

/// A bundle handed to a worker: its jobs (one or more, of one user and pass), which
/// attempt this is (1 = first), and the queue's own id for settling it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub jobs: Vec<FolderJob>,
    pub attempt: u32,
    pub id: u64,
}

impl Delivery {
    pub fn bundle_id(&self) -> String {
        FolderJob::bundle_id(&self.jobs)
    }

    /// The same delivery (same id, same attempt) carrying only `jobs`: what is handed
    /// back when some of a bundle's jobs are finished and others must run again.
    pub fn narrowed(&self, jobs: Vec<FolderJob>) -> Delivery {
        Delivery {
            jobs,
            attempt: self.attempt,
            id: self.id,
        }
    }
}

pub trait JobQueue: Send + Sync + 'static {
    /// Enqueues a bundle of jobs. Publishing a bundle whose id is already queued or
    /// running is harmless (a no-op here; on RabbitMQ the claims skip its copies).
    fn publish(
        &self,
        jobs: Vec<FolderJob>,
    ) -> impl Future<Output = Result<(), crate::Error>> + Send;
    /// The next job; `None` once the queue is closed and everything is settled.
    fn next(&self) -> impl Future<Output = Option<Delivery>> + Send;
    /// The job's work is at the target and its checkpoint written.
    fn ack(&self, delivery: &Delivery) -> impl Future<Output = ()> + Send;
    /// Hands the jobs back to run again after `delay`, as their next attempt; the
    /// delivery is settled (its jobs may be fewer than were delivered: see
    /// [`Delivery::narrowed`]).
    fn retry(&self, delivery: Delivery, delay: Duration) -> impl Future<Output = ()> + Send;
    /// Hands the job back after `delay` without counting an attempt: it did not fail,
    /// it could not run here (its folder was busy, or this worker lost its claim).
    fn requeue(&self, delivery: Delivery, delay: Duration) -> impl Future<Output = ()> + Send;
    /// Gives up on the job; `reason` is kept for the admin.
    fn dead_letter(&self, delivery: &Delivery, reason: String) -> impl Future<Output = ()> + Send;
}

#[derive(Default)]
struct Inner {
    ready: VecDeque<Delivery>,
    /// Deliveries handed in and not yet acked or dead-lettered, by delivery id, with
    /// their bundle ids (a narrowed bundle keeps its delivery id)…
    outstanding: HashMap<u64, String>,
    /// …and those bundle ids, to make publishing a bundle twice a no-op.
    bundles: HashSet<String>,
    next_id: u64,
    closed: bool,
    dead: Vec<(Vec<FolderJob>, String)>,
}

/// An in-process queue for the embedded mode.
#[derive(Default)]
pub struct MemoryQueue {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    /// Woken when a delivery is taken (see [`MemoryQueue::wait_ready_below`]).
    taken: Notify,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No more jobs will be published: `next` returns `None` once all are settled.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// Waits until fewer than `n` deliveries wait for a consumer: a publisher that
    /// keeps only a few ahead of the consumers (the embedded planner) plans a user
    /// shortly before its jobs run, while its connections are still open.
    pub async fn wait_ready_below(&self, n: usize) {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.lock().ready.len() < n.max(1) {
                return;
            }
            taken.await;
        }
    }

    pub fn dead_lettered(&self) -> Vec<(Vec<FolderJob>, String)> {
        self.lock().dead.clone()
    }

    /// Settles once: a delivery whose jobs were handed back meanwhile (the id now
    /// stands for the narrowed bundle) is not settled again.
    fn settle(&self, delivery: &Delivery) {
        let mut inner = self.lock();
        let bundle = delivery.bundle_id();
        if inner.outstanding.get(&delivery.id) == Some(&bundle) {
            inner.outstanding.remove(&delivery.id);
            inner.bundles.remove(&bundle);
        }
        drop(inner);
        self.changed.notify_waiters();
    }
}

impl JobQueue for MemoryQueue {
    async fn publish(&self, jobs: Vec<FolderJob>) -> Result<(), crate::Error> {
        let mut inner = self.lock();
        let bundle = FolderJob::bundle_id(&jobs);
        if inner.bundles.insert(bundle.clone()) {
            inner.next_id += 1;
            let id = inner.next_id;
            inner.outstanding.insert(id, bundle);
            inner.ready.push_back(Delivery {
                jobs,
                attempt: 1,
                id,
            });
            drop(inner);
            self.changed.notify_waiters();
        }
        Ok(())
    }

    async fn next(&self) -> Option<Delivery> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                if let Some(d) = inner.ready.pop_front() {
                    drop(inner);
                    self.taken.notify_waiters();
                    return Some(d);
                }
                if inner.closed && inner.outstanding.is_empty() {
                    return None;
                }
            }
            notified.await;
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        self.settle(delivery);
    }

    async fn retry(&self, delivery: Delivery, delay: Duration) {
        let attempt = delivery.attempt + 1;
        self.requeue(
            Delivery {
                attempt,
                ..delivery
            },
            delay,
        )
        .await;
    }

    /// The delivery stays outstanding while it waits (the queue does not end under it),
    /// but the waiting is a timer's, not the caller's: a job slot that hands back a
    /// job paused for hours (a used-up daily budget) is free at once, and a run stopped
    /// meanwhile stops without waiting for it.
    async fn requeue(&self, delivery: Delivery, delay: Duration) {
        // Narrowed, the bundle has a new id: it is what is outstanding now.
        let bundle = delivery.bundle_id();
        {
            let mut inner = self.lock();
            if let Some(old) = inner.outstanding.insert(delivery.id, bundle.clone()) {
                inner.bundles.remove(&old);
            }
            inner.bundles.insert(bundle);
        }
        let (inner, changed) = (self.inner.clone(), self.changed.clone());
        let put_back = move || {
            inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ready
                .push_back(delivery);
            changed.notify_waiters();
        };
        if delay.is_zero() {
            put_back();
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                put_back();
            });
        }
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: String) {
        self.lock().dead.push((delivery.jobs.clone(), reason));
        self.settle(delivery);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::WireName;

    fn job(folder: &str) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(folder.to_string().into()),
            target_folder: WireName(folder.to_string().into()),
            uid_range: None,
            pass: 1,
            group: None,
            archive: None,
        }
    }

    #[tokio::test]
    async fn republishing_is_harmless_and_close_ends_consumers_once_settled() {
        let q = std::sync::Arc::new(MemoryQueue::new());
        q.publish(vec![job("A")]).await.unwrap();
        q.publish(vec![job("A")]).await.unwrap();
        q.publish(vec![job("B"), job("C")]).await.unwrap();
        q.close();
        let a = q.next().await.unwrap();
        let b = q.next().await.unwrap();
        assert_eq!(a.bundle_id(), job("A").id());
        assert_eq!(b.jobs.len(), 2);
        // B is retried: the consumer must keep waiting instead of seeing the end.
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await.map(|d| d.attempt) });
        q.ack(&a).await;
        // C is done; B goes back alone.
        q.retry(b.narrowed(vec![job("B")]), Duration::from_millis(10))
            .await;
        let again = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again, Some(2));
        let b = Delivery {
            jobs: vec![job("B")],
            attempt: 2,
            id: b.id,
        };
        q.dead_letter(&b, "bad".into()).await;
        assert!(tokio::time::timeout(Duration::from_secs(2), q.next())
            .await
            .unwrap()
            .is_none());
        assert_eq!(q.dead_lettered().len(), 1);
    }

    #[tokio::test]
    async fn a_publisher_waiting_for_room_goes_on_once_a_consumer_takes_one() {
        let q = std::sync::Arc::new(MemoryQueue::new());
        q.wait_ready_below(2).await;
        q.publish(vec![job("A")]).await.unwrap();
        q.publish(vec![job("B")]).await.unwrap();
        let q2 = q.clone();
        let publisher = tokio::spawn(async move { q2.wait_ready_below(2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!publisher.is_finished(), "two ready: no room below two");
        let taken = q.next().await.unwrap();
        assert_eq!(taken.bundle_id(), job("A").id());
        tokio::time::timeout(Duration::from_secs(2), publisher)
            .await
            .expect("a taken delivery makes room")
            .unwrap();
    }
}
