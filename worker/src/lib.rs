//! The worker: the copy engine ([`engine`], [`copy`], [`recover`], [`archive`]) and the
//! consumer loop that feeds it jobs from a queue ([`consumer`]). The embedded mode and the
//! cluster workers run this same code.
//!
//! The coordinator uses the worker through what this file exports, never its modules:
//! the engine and its settings, the consumer loop and its retry policy, the accounts
//! that open a user's connection pools, the claims of the embedded mode, the cluster
//! worker process, and what a job reports.

mod accounts;
mod archive;
mod claims;
mod cluster;
mod consumer;
mod copy;
mod engine;
mod error;
mod progress;
mod recover;

pub use accounts::{AccountDirectory, RedisAccounts, StaticAccounts, UserAccounts};
pub use claims::Unclaimed;
pub use cluster::{run as run_cluster_worker, shared_slots};
pub use consumer::{consume, decide, Decision, RetryPolicy};
pub use engine::{Engine, EngineSettings};
pub use error::JobError;
pub use progress::{JobReport, NoProgress, ProgressSink};
