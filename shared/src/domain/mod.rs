//! The domain: plain data and pure rules, unit-tested without a server.
//!
//! - `endpoint.rs`: where an IMAP server is and how to reach it safely ([`endpoint::Endpoint`]).
//! - `login.rs`: how an account logs in ([`login::AuthMethod`]) and its unsealed [`login::Credentials`].
//! - `users.rs`: the user list (the migration CSV).
//! - `batch.rs`: what the cluster stores about a migration and its users.
//! - `job.rs`: the unit of work ([`job::FolderJob`]) and what is remembered about it ([`job::Checkpoint`]).
//! - `status.rs`: the statuses an admin sees, as a pure function of intents and job states.
//! - `folders.rs`: folder mapping, source folder → target folder.
//! - `mutf7.rs`: modified UTF-7, the encoding of folder names.
//! - `date.rs`: INTERNALDATE to an instant.
//! - `budget.rs`: daily download budgets per account.
//! - `progress.rs`: the counters of a user's progress.

pub mod batch;
pub mod budget;
pub mod date;
pub mod endpoint;
pub mod folders;
pub mod job;
pub mod login;
pub mod mutf7;
pub mod progress;
pub mod status;
pub mod users;
