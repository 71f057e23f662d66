//! What the engine tells the world while it works. The embedded mode draws progress bars
//! from these events; the cluster mode batches them into Redis.

use mailferry_shared::domain::job::{FolderJob, SkippedMessage};

use crate::error::JobError;

/// The outcome of one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobReport {
    pub copied: u64,
    pub copied_bytes: u64,
    /// Found already at the target (crash recovery or reconciliation), not copied again.
    pub matched: u64,
    pub skipped: Vec<SkippedMessage>,
    pub flags_updated: u64,
    /// Asked for but not returned by the source this pass (retried next pass).
    pub missed: u64,
    /// Nothing had changed since the last pass.
    pub unchanged: bool,
    /// Messages in the source folder when the job opened it, and in the target folder
    /// when it ended.
    pub source_messages: u32,
    pub target_messages: u32,
    /// Source messages of the folder skipped in this and earlier passes.
    pub skipped_total: u32,
    /// The job ended its folder's pass (a whole-folder job, or a folder's last UID
    /// range): the folder's counts can be reconciled.
    pub whole_folder: bool,
}

impl JobReport {
    /// The per-folder reconciliation behind "Synced": every message the source held when
    /// the job looked is at the target or was skipped with a reason, and none was left
    /// unanswered. `None` when the counts agree; else what an admin is told. (The
    /// target may hold more: mail delivered there, or deleted at the source after it was
    /// copied, is never deleted at the target.)
    pub fn mismatch(&self, folder: &str) -> Option<String> {
        if self.missed > 0 {
            return Some(format!(
                "{folder}: {} messages listed by the source were not returned (asked for again next pass)",
                self.missed
            ));
        }
        let accounted = u64::from(self.target_messages) + u64::from(self.skipped_total);
        (self.whole_folder && accounted < u64::from(self.source_messages)).then(|| {
            format!(
                "{folder}: {} messages at the source ({} skipped), {} at the target",
                self.source_messages, self.skipped_total, self.target_messages
            )
        })
    }
}

pub trait ProgressSink: Send + Sync + 'static {
    /// The job knows how much it has to copy.
    fn job_started(&self, job: &FolderJob, messages: u64, bytes: u64);
    /// More messages reached the target.
    fn copied(&self, job: &FolderJob, messages: u64, bytes: u64);
    fn skipped(&self, job: &FolderJob, message: &SkippedMessage);
    fn job_finished(&self, job: &FolderJob, report: &JobReport);
    /// The job failed; `will_retry` says whether it goes back to the queue, `reason` is
    /// what the admin is told.
    fn job_failed(&self, job: &FolderJob, error: &JobError, reason: &str, will_retry: bool);
}

/// A sink that discards everything (benchmarks, tests that only check the target).
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn job_started(&self, _: &FolderJob, _: u64, _: u64) {}
    fn copied(&self, _: &FolderJob, _: u64, _: u64) {}
    fn skipped(&self, _: &FolderJob, _: &SkippedMessage) {}
    fn job_finished(&self, _: &FolderJob, _: &JobReport) {}
    fn job_failed(&self, _: &FolderJob, _: &JobError, _: &str, _: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciliation_accounts_for_skips_and_reports_the_numbers() {
        let ok = JobReport {
            source_messages: 120,
            target_messages: 119,
            skipped_total: 1,
            whole_folder: true,
            ..JobReport::default()
        };
        assert_eq!(ok.mismatch("INBOX"), None);
        let more_at_target = JobReport {
            target_messages: 130,
            ..ok.clone()
        };
        assert_eq!(more_at_target.mismatch("INBOX"), None);
        let lost = JobReport {
            target_messages: 118,
            ..ok.clone()
        };
        assert_eq!(
            lost.mismatch("INBOX").as_deref(),
            Some("INBOX: 120 messages at the source (1 skipped), 118 at the target")
        );
        let missed = JobReport { missed: 2, ..ok };
        assert!(missed
            .mismatch("Sent")
            .unwrap()
            .contains("2 messages listed"));
    }
}
