//! What the coordinator and the workers agree on: the domain (endpoints, users, folder
//! jobs, checkpoints), the IMAP session layer, folder-name mapping, and the queue and
//! store interfaces with their embedded implementations.

pub mod amqp_queue;
pub mod batch;
pub mod budget;
pub mod control;
pub mod date;
pub mod directory;
pub mod endpoint;
pub mod error;
pub mod failpoint;
pub mod folders;
pub mod imap;
pub mod job;
pub mod lease;
pub mod mutf7;
pub mod oauth;
pub mod queue;
pub mod redis_store;
pub mod seal;
pub mod secret;
pub mod settings;
pub mod slots;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod users;

pub use error::{Disposition, Error, Side};
