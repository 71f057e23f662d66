//! The statuses an admin sees per user (PRODUCT.md: Starting → Queued → Syncing →
//! Synced, plus Failed, Stopped and Completed) as a pure function of what the admin
//! asked for and where the user's folder jobs are. The coordinator stores the inputs and
//! calls [`roll_up`]; nothing else decides a status.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Intent {
    /// Imported, not started yet.
    #[default]
    Idle,
    /// Migrate, and keep re-syncing on the schedule.
    Active,
    /// The admin pressed Stop.
    Stopped,
    /// Close: one final pass, then the schedule ends and credentials are deleted.
    Closing,
    /// The final pass is done.
    Closed,
}

/// Where one folder job of the current pass is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JobState {
    /// Planned, held back by the per-user limit of jobs in flight (fairness): published
    /// once one of the user's other jobs ends.
    Waiting,
    /// Published to the queue.
    Queued,
    Running,
    /// Waiting for the server's suggested backoff.
    Throttled {
        server_says: String,
    },
    /// Finished; `verified` once source and target counts matched for the folder.
    Done {
        verified: bool,
        mismatch: Option<String>,
        /// The folder's counts as the job measured them at its end (a whole folder's
        /// job, or a folder's last UID range); absent for earlier ranges and for
        /// states written by earlier versions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<FolderCounts>,
    },
    /// Failed for good (dead-lettered).
    Failed {
        reason: String,
    },
}

/// A folder's messages at the end of its pass: at the source when the job opened it,
/// at the target when it ended (measured with STATUS, so mail that killed runs
/// appended is counted too), and skipped with a reason (this pass and earlier ones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderCounts {
    pub source: u32,
    pub target: u32,
    pub skipped: u32,
}

/// A user's messages summed over the folders of the current pass that have counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MessageCounts {
    /// At the source.
    pub source: u64,
    /// Of those, how many the target holds: per folder, the target's count up to the
    /// source's (a target folder may hold more: mail delivered there, or deleted at the
    /// source after it was copied).
    pub at_target: u64,
    /// Skipped with a reason (too large, refused by the target…).
    pub skipped: u64,
    /// Folders counted, of the pass's folder jobs.
    pub folders: u64,
}

impl MessageCounts {
    pub fn of(jobs: &[JobState]) -> Self {
        let mut sum = MessageCounts::default();
        for job in jobs {
            if let JobState::Done {
                counts: Some(c), ..
            } = job
            {
                sum.add(c);
            }
        }
        sum
    }

    pub fn add(&mut self, c: &FolderCounts) {
        self.source += u64::from(c.source);
        self.at_target += u64::from(c.target.min(c.source));
        self.skipped += u64::from(c.skipped);
        self.folders += 1;
    }

    pub fn merge(&mut self, other: &MessageCounts) {
        self.source += other.source;
        self.at_target += other.at_target;
        self.skipped += other.skipped;
        self.folders += other.folders;
    }

    /// Every message of the source is at the target or skipped with a reason.
    pub fn complete(&self) -> bool {
        self.at_target + self.skipped >= self.source
    }
}

impl std::fmt::Display for MessageCounts {
    /// `at target 980 of 1000, 20 skipped`: what the admin reads to know every message
    /// arrived.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at target {} of {}", self.at_target, self.source)?;
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum UserStatus {
    /// Imported; the admin has not started it.
    NotStarted,
    /// Accepted; the folders are being listed and planned.
    Starting,
    /// Planned; jobs wait for a worker.
    Queued,
    /// Jobs are running (or paused by the server's throttling, which is not a failure).
    Syncing {
        throttled: Option<String>,
    },
    /// Every folder copied and verified; re-synced on the schedule.
    Synced,
    Failed {
        reason: String,
    },
    Stopped,
    /// Closed after the final pass.
    Completed,
}

/// What [`roll_up`] needs to know about one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView<'a> {
    pub intent: Intent,
    /// The planner has published this pass's jobs (`false` while listing folders).
    pub planned: bool,
    /// Why planning failed (login rejected, server unreachable), if it did.
    pub plan_error: Option<&'a str>,
    pub jobs: &'a [JobState],
    /// The coordinator has recorded the pass's end. A pass whose jobs are all done and
    /// verified is Syncing until then: Synced comes with its time.
    pub ended: bool,
}

impl JobState {
    /// Not finished: waiting, queued, running or paused by the server.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            JobState::Waiting | JobState::Queued | JobState::Running | JobState::Throttled { .. }
        )
    }

    /// Published or running: counts against the user's limit of jobs in flight.
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Running | JobState::Throttled { .. }
        )
    }
}

impl UserStatus {
    /// The status's name as the CLI, the API and the metrics spell it.
    /// Every status's [`name`](Self::name).
    pub const NAMES: &'static [&'static str] = &[
        "notstarted",
        "starting",
        "queued",
        "syncing",
        "synced",
        "failed",
        "stopped",
        "completed",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            UserStatus::NotStarted => "notstarted",
            UserStatus::Starting => "starting",
            UserStatus::Queued => "queued",
            UserStatus::Syncing { .. } => "syncing",
            UserStatus::Synced => "synced",
            UserStatus::Failed { .. } => "failed",
            UserStatus::Stopped => "stopped",
            UserStatus::Completed => "completed",
        }
    }
}

pub fn roll_up(user: &UserView<'_>) -> UserStatus {
    match user.intent {
        Intent::Idle => return UserStatus::NotStarted,
        Intent::Closed => return UserStatus::Completed,
        Intent::Stopped => return UserStatus::Stopped,
        Intent::Active | Intent::Closing => {}
    }
    if let Some(reason) = user.plan_error {
        return UserStatus::Failed {
            reason: reason.to_string(),
        };
    }
    if !user.planned {
        return UserStatus::Starting;
    }
    if let Some(reason) = user.jobs.iter().find_map(|j| match j {
        JobState::Failed { reason } => Some(reason.clone()),
        _ => None,
    }) {
        return UserStatus::Failed { reason };
    }
    let throttled = user.jobs.iter().find_map(|j| match j {
        JobState::Throttled { server_says } => Some(server_says.clone()),
        _ => None,
    });
    let started = user
        .jobs
        .iter()
        .any(|j| !matches!(j, JobState::Queued | JobState::Waiting));
    let open = user.jobs.iter().any(JobState::is_open);
    if open {
        return if started {
            UserStatus::Syncing { throttled }
        } else {
            UserStatus::Queued
        };
    }
    // Every job is done: Synced means verified.
    match user.jobs.iter().find_map(|j| match j {
        JobState::Done {
            verified: false,
            mismatch,
            ..
        } => Some(
            mismatch
                .clone()
                .unwrap_or_else(|| "folder counts not verified".into()),
        ),
        _ => None,
    }) {
        Some(mismatch) => UserStatus::Failed { reason: mismatch },
        None if user.ended => UserStatus::Synced,
        None => UserStatus::Syncing { throttled: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(jobs: &[JobState]) -> UserView<'_> {
        UserView {
            intent: Intent::Active,
            planned: true,
            plan_error: None,
            jobs,
            ended: true,
        }
    }

    fn done() -> JobState {
        JobState::Done {
            verified: true,
            mismatch: None,
            counts: None,
        }
    }

    #[test]
    fn the_admins_path_through_the_statuses() {
        let unplanned = UserView {
            planned: false,
            ..view(&[])
        };
        assert_eq!(roll_up(&unplanned), UserStatus::Starting);
        assert_eq!(
            roll_up(&view(&[JobState::Queued, JobState::Queued])),
            UserStatus::Queued
        );
        assert_eq!(
            roll_up(&view(&[done(), JobState::Queued])),
            UserStatus::Syncing { throttled: None }
        );
        // held back by the per-user limit: still queued, not syncing
        assert_eq!(
            roll_up(&view(&[JobState::Waiting, JobState::Queued])),
            UserStatus::Queued
        );
        assert_eq!(
            roll_up(&view(&[done(), JobState::Waiting])),
            UserStatus::Syncing { throttled: None }
        );
        assert_eq!(roll_up(&view(&[done(), done()])), UserStatus::Synced);
        let idle = UserView {
            intent: Intent::Idle,
            ..view(&[])
        };
        assert_eq!(roll_up(&idle), UserStatus::NotStarted);
        // nothing to copy is synced too
        assert_eq!(roll_up(&view(&[])), UserStatus::Synced);
    }

    #[test]
    fn throttling_is_syncing_and_failures_carry_their_reason() {
        let throttled = [JobState::Throttled {
            server_says: "NO [UNAVAILABLE] Suggested Backoff Time: 500 ms".into(),
        }];
        assert!(matches!(
            roll_up(&view(&throttled)),
            UserStatus::Syncing { throttled: Some(_) }
        ));
        let failed = [
            done(),
            JobState::Failed {
                reason: "target over quota".into(),
            },
            JobState::Running,
        ];
        assert_eq!(
            roll_up(&view(&failed)),
            UserStatus::Failed {
                reason: "target over quota".into()
            }
        );
        let planning_failed = UserView {
            plan_error: Some("source: authentication rejected"),
            planned: false,
            ..view(&[])
        };
        assert!(matches!(
            roll_up(&planning_failed),
            UserStatus::Failed { .. }
        ));
        let unverified = [JobState::Done {
            verified: false,
            mismatch: Some("INBOX: 120 at the source, 119 at the target".into()),
            counts: None,
        }];
        assert_eq!(
            roll_up(&view(&unverified)),
            UserStatus::Failed {
                reason: "INBOX: 120 at the source, 119 at the target".into()
            }
        );
    }

    #[test]
    fn the_admins_intent_wins() {
        let running = [JobState::Running];
        let stopped = UserView {
            intent: Intent::Stopped,
            ..view(&running)
        };
        assert_eq!(roll_up(&stopped), UserStatus::Stopped);
        let closed = UserView {
            intent: Intent::Closed,
            ..view(&running)
        };
        assert_eq!(roll_up(&closed), UserStatus::Completed);
        let closing = UserView {
            intent: Intent::Closing,
            ..view(&running)
        };
        assert_eq!(roll_up(&closing), UserStatus::Syncing { throttled: None });
    }

    #[test]
    fn a_pass_is_synced_only_once_its_end_is_recorded() {
        let done = [done()];
        let running = UserView {
            ended: false,
            ..view(&done)
        };
        assert_eq!(roll_up(&running), UserStatus::Syncing { throttled: None });
        assert_eq!(roll_up(&view(&done)), UserStatus::Synced);
        // A failure does not wait for the end to be recorded.
        let unverified = [JobState::Done {
            verified: false,
            mismatch: Some("3 at the source, 2 at the target".into()),
            counts: None,
        }];
        let failed = UserView {
            ended: false,
            ..view(&unverified)
        };
        assert!(matches!(roll_up(&failed), UserStatus::Failed { .. }));
    }
}
