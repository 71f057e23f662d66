//! Leases and the fence that guards their holder.
//!
//! A lease is a Redis key that one holder owns for a time to live: a worker's claim on a
//! target folder (DESIGN.md invariant 5: one writer per target folder), or the active
//! coordinator's leadership. The holder renews it well before it expires.
//!
//! A [`Fence`] tells the holder, without a round trip, whether it may still act: its
//! deadline is the moment the last successful renewal was *sent* plus the time to live,
//! less a margin. After a pause longer than that (a stopped process, a stalled VM, a
//! Redis it cannot reach) the fence is shut before the holder sends another command,
//! whereas the lease in Redis may already belong to someone else. The engine checks the
//! fence before every APPEND group and every checkpoint write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The process's monotonic clock, in milliseconds since its first use.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn to_ms(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64
}

const NEVER: u64 = u64::MAX;

#[derive(Debug)]
pub struct Fence {
    /// Milliseconds on the monotonic clock after which the holder must stop; `NEVER`
    /// for work that holds no lease (the embedded mode).
    deadline_ms: AtomicU64,
    revoked: Mutex<Option<String>>,
    changed: Notify,
}

impl Fence {
    /// A fence that never shuts by itself (only [`revoke`](Self::revoke) shuts it).
    pub fn open_ended() -> Self {
        Fence {
            deadline_ms: AtomicU64::new(NEVER),
            revoked: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// A fence that shuts at `deadline` unless extended.
    pub fn until(deadline: Instant) -> Self {
        let fence = Fence::open_ended();
        fence.deadline_ms.store(to_ms(deadline), Ordering::SeqCst);
        fence
    }

    /// Moves the deadline later (never earlier: a slow renewal reply must not shorten it
    /// below what a faster one already granted).
    pub fn extend(&self, deadline: Instant) {
        self.deadline_ms
            .fetch_max(to_ms(deadline), Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Shuts the fence for good, with the reason the holder will report.
    pub fn revoke(&self, reason: impl Into<String>) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        if revoked.is_none() {
            *revoked = Some(reason.into());
        }
        drop(revoked);
        self.changed.notify_waiters();
    }

    /// `Err(reason)` once the holder must stop.
    pub fn check(&self) -> Result<(), String> {
        if let Some(reason) = self
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(reason);
        }
        let deadline = self.deadline_ms.load(Ordering::SeqCst);
        if deadline != NEVER && to_ms(Instant::now()) >= deadline {
            return Err("the lease expired before it could be renewed".into());
        }
        Ok(())
    }

    /// Resolves, with the reason, once the fence shuts.
    pub async fn shut(&self) -> String {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Err(reason) = self.check() {
                return reason;
            }
            let deadline = self.deadline_ms.load(Ordering::SeqCst);
            if deadline == NEVER {
                notified.await;
            } else {
                let at = epoch() + Duration::from_millis(deadline);
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
            }
        }
    }
}

/// How long a lease lives and how much safety margin its fence keeps.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
}

impl LeaseTiming {
    /// Renew three times per time to live: two renewals may fail before the lease lapses.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The fence deadline for a renewal sent at `sent`: the lease's expiry less a fifth
    /// of the time to live, so clock drift between us and Redis cannot let the holder
    /// act after Redis has let the lease go.
    pub fn fence_deadline(&self, sent: Instant) -> Instant {
        sent + self.ttl - self.ttl / 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_shuts_at_its_deadline_unless_extended() {
        let timing = LeaseTiming {
            ttl: Duration::from_millis(250),
        };
        let fence = Fence::until(timing.fence_deadline(Instant::now()));
        assert!(fence.check().is_ok());
        fence.extend(Instant::now() + Duration::from_millis(400));
        // an older, shorter grant does not take the extension back
        fence.extend(Instant::now());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(fence.check().is_ok(), "extended");
        let started = Instant::now();
        let reason = tokio::time::timeout(Duration::from_secs(2), fence.shut())
            .await
            .expect("the fence shuts by itself");
        assert!(reason.contains("expired"), "{reason}");
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(fence.check().is_err());
    }

    #[tokio::test]
    async fn revoking_wakes_the_waiter_and_keeps_the_first_reason() {
        let fence = std::sync::Arc::new(Fence::open_ended());
        let waiter = tokio::spawn({
            let fence = fence.clone();
            async move { fence.shut().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(fence.check().is_ok());
        fence.revoke("the user was stopped");
        fence.revoke("something later");
        let reason = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reason, "the user was stopped");
        assert_eq!(fence.check(), Err("the user was stopped".into()));
    }
}
