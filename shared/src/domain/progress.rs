//! What a user's progress counts: the counters a job run adds to (summed over all
//! passes in `P:progress:<batch>`, or the embedded run's summary). One enum, so a
//! counter is named in one place; its name is what Redis stores.

/// A progress counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Messages appended to the target.
    Copied,
    /// Their bytes.
    CopiedBytes,
    /// Messages not copied (too large, refused by the target).
    Skipped,
    /// Messages found at the target already (a reconciliation matched them).
    Matched,
    /// Messages whose flags were brought up to date at the target.
    FlagsUpdated,
    /// Folder jobs that failed for good.
    FailedJobs,
}

impl Counter {
    /// The counter's name as stored and as the API shows it.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Copied => "copied",
            Counter::CopiedBytes => "copied_bytes",
            Counter::Skipped => "skipped",
            Counter::Matched => "matched",
            Counter::FlagsUpdated => "flags_updated",
            Counter::FailedJobs => "failed_jobs",
        }
    }
}
