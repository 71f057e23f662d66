//! What the engine tells the world while it works. The embedded mode draws progress bars
//! from these events; the cluster mode batches them into Redis.

use mailferry_shared::job::{FolderJob, SkippedMessage};

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
    /// Source messages and target messages in the folder at the end of the job.
    pub source_messages: u32,
    pub target_messages: u32,
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
