//! The worker's error type. Each variant knows what the consumer does with the job:
//! retry later, pause for the server, or give up and report — so ack/nack is a pure
//! function of the error ([`JobError::disposition`]).

use mailferry_shared::{Disposition, Error as SharedError, Side};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{side}: {source}")]
    Imap {
        side: Side,
        #[source]
        source: SharedError,
    },
    #[error("target over quota: {server_says}")]
    TargetOverQuota { server_says: String },
    #[error("no accounts known for user {0}")]
    UnknownUser(String),
    #[error("{0}")]
    Store(SharedError),
    /// This run may no longer write (its claim on the folder lapsed, or the user was
    /// stopped). Not a failure of the job: it is handed back or settled as it is.
    #[error("stopped writing: {0}")]
    Fenced(String),
    /// The job's code panicked: a bug of ours, whatever a server sent. The job fails
    /// (and is retried) like any other; the process and the other jobs go on.
    #[error("internal error (a bug, please report it): {0}")]
    Panicked(String),
}

impl JobError {
    /// (side, kind) for a metric label: `side` is source, target or none.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            JobError::Imap { side, source } => (
                match side {
                    Side::Source => "source",
                    Side::Target => "target",
                },
                source.kind(),
            ),
            JobError::TargetOverQuota { .. } => ("target", "over_quota"),
            JobError::UnknownUser(_) => ("none", "unknown_user"),
            JobError::Store(_) => ("none", "store"),
            JobError::Fenced(_) => ("none", "fenced"),
            JobError::Panicked(_) => ("none", "panicked"),
        }
    }

    pub fn source_side(e: SharedError) -> Self {
        JobError::Imap {
            side: Side::Source,
            source: e,
        }
    }

    pub fn target_side(e: SharedError) -> Self {
        JobError::Imap {
            side: Side::Target,
            source: e,
        }
    }

    pub fn disposition(&self) -> Disposition {
        match self {
            JobError::Imap { source, .. } => source.disposition(),
            // A full mailbox stays full until an admin acts.
            JobError::TargetOverQuota { .. } | JobError::UnknownUser(_) => Disposition::Fatal,
            // The local store failing (disk full) may pass; retry.
            JobError::Store(_) | JobError::Fenced(_) | JobError::Panicked(_) => Disposition::Retry,
        }
    }

    /// The side at fault, if one is.
    pub fn side(&self) -> Option<Side> {
        match self {
            JobError::Imap { side, .. } => Some(*side),
            JobError::TargetOverQuota { .. } => Some(Side::Target),
            _ => None,
        }
    }
}
