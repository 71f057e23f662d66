//! Where folder jobs wait for a worker. [`JobQueue`] is the interface; [`MemoryQueue`]
//! is the embedded implementation. The cluster implementation (RabbitMQ) fills the same
//! interface.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::job::FolderJob;

/// A job handed to a worker: which attempt this is (1 = first), and the queue's own id
/// for settling it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub job: FolderJob,
    pub attempt: u32,
    pub id: u64,
}

pub trait JobQueue: Send + Sync + 'static {
    /// Enqueues a job. Publishing a job whose id is already queued or running is a no-op.
    fn publish(&self, job: FolderJob) -> impl Future<Output = Result<(), crate::Error>> + Send;
    /// The next job; `None` once the queue is closed and everything is settled.
    fn next(&self) -> impl Future<Output = Option<Delivery>> + Send;
    /// The job's work is at the target and its checkpoint written.
    fn ack(&self, delivery: &Delivery) -> impl Future<Output = ()> + Send;
    /// Hands the job back to run again after `delay`, as its next attempt.
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
    /// Ids published and not yet acked or dead-lettered.
    outstanding: HashSet<String>,
    closed: bool,
    dead: Vec<(FolderJob, String)>,
}

/// An in-process queue for the embedded mode.
#[derive(Default)]
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    changed: Notify,
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

    pub fn dead_lettered(&self) -> Vec<(FolderJob, String)> {
        self.lock().dead.clone()
    }

    fn settle(&self, id: &str) {
        self.lock().outstanding.remove(id);
        self.changed.notify_waiters();
    }
}

impl JobQueue for MemoryQueue {
    async fn publish(&self, job: FolderJob) -> Result<(), crate::Error> {
        let mut inner = self.lock();
        if inner.outstanding.insert(job.id()) {
            inner.ready.push_back(Delivery {
                job,
                attempt: 1,
                id: 0,
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
        self.settle(&delivery.job.id());
    }

    async fn retry(&self, delivery: Delivery, delay: Duration) {
        tokio::time::sleep(delay).await;
        let again = Delivery {
            attempt: delivery.attempt + 1,
            ..delivery
        };
        self.lock().ready.push_back(again);
        self.changed.notify_waiters();
    }

    async fn requeue(&self, delivery: Delivery, delay: Duration) {
        tokio::time::sleep(delay).await;
        self.lock().ready.push_back(delivery);
        self.changed.notify_waiters();
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: String) {
        self.lock().dead.push((delivery.job.clone(), reason));
        self.settle(&delivery.job.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::WireName;

    fn job(folder: &str) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(folder.to_string().into()),
            target_folder: WireName(folder.to_string().into()),
            uid_range: None,
            pass: 1,
        }
    }

    #[tokio::test]
    async fn republishing_is_harmless_and_close_ends_consumers_once_settled() {
        let q = std::sync::Arc::new(MemoryQueue::new());
        q.publish(job("A")).await.unwrap();
        q.publish(job("A")).await.unwrap();
        q.publish(job("B")).await.unwrap();
        q.close();
        let a = q.next().await.unwrap();
        let b = q.next().await.unwrap();
        assert_ne!(a.job.id(), b.job.id());
        // B is retried: the consumer must keep waiting instead of seeing the end.
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await.map(|d| d.attempt) });
        q.ack(&a).await;
        q.retry(b, Duration::from_millis(10)).await;
        let again = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again, Some(2));
        q.dead_letter(
            &Delivery {
                job: job("B"),
                attempt: 2,
                id: 0,
            },
            "bad".into(),
        )
        .await;
        assert!(tokio::time::timeout(Duration::from_secs(2), q.next())
            .await
            .unwrap()
            .is_none());
        assert_eq!(q.dead_lettered().len(), 1);
    }
}
