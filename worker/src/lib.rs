//! The worker: the copy engine ([`engine`], [`copy`], [`recover`]) and the consumer loop
//! that feeds it jobs from a queue ([`consumer`]). The embedded mode and the cluster
//! workers run this same code.

pub mod accounts;
pub mod archive;
pub mod claims;
pub mod cluster;
pub mod consumer;
pub mod copy;
pub mod engine;
pub mod error;
pub mod message;
pub mod progress;
pub mod recover;

pub use engine::{Engine, EngineSettings};
pub use error::JobError;
pub use progress::{JobReport, NoProgress, ProgressSink};
