//! What the coordinator and the workers agree on. Each folder is one part of the design;
//! its `mod.rs` says what it holds and lists its files.
//!
//! | module | what | where to add … |
//! |---|---|---|
//! | [`domain`] | plain data and pure rules: endpoints, logins, users, batches, folder jobs and checkpoints, statuses, folder mapping, mUTF-7, dates, daily budgets | a status, an endpoint field, a folder rule |
//! | [`providers`] | the provider presets (Microsoft 365, Outlook.com, Gmail, Workspace …), their OAuth2 defaults and the quirks other parts must know (Gmail's system-folder container): the one list the CLI, the API, the console and the docs read | a preset, a provider's quirk |
//! | [`imap`] | the IMAP session layer: sans-I/O parser, pipelining client, flags, mailbox operations, TLS, connection pool | an IMAP command |
//! | [`oauth`] | OAuth2 access tokens (XOAUTH2, OAUTHBEARER) from a provider's token endpoint | a grant |
//! | [`queue`] | where folder jobs wait: the interface, the embedded (memory) queue and RabbitMQ | a queue |
//! | [`store`] | where checkpoints live: the interface and the embedded (state directory) store | — |
//! | [`redis`] | the cluster's control plane in Redis: keys, the checkpoint store, passes, claims, slots, leader, the API's directory; `lua/` holds its scripts | a Redis key or script |
//! | [`config`] | the cluster's settings and credential sealing | a setting |
//! | [`error`], [`secret`], [`telemetry`], [`failpoint`] | what every part uses: the error type and its disposition, secrets that wipe themselves, metric names, crash points for tests | a metric |
//!
//! Imports run one way. `domain`'s code uses other domain files, [`secret`] and
//! [`error`], and three types of other parts: the `imap` listing types (folder
//! mapping's input), `oauth`'s token source (in a login's credentials) and `providers`'
//! Gmail container. The adapters (`imap`, `oauth`, `queue`, `store`, `redis`) use
//! `domain`. No file imports one that imports it back: `tests/tests/layout.rs` checks
//! every crate.

pub mod config;
pub mod domain;
pub mod error;
pub mod failpoint;
pub mod imap;
pub mod oauth;
pub mod providers;
pub mod queue;
pub mod redis;
pub mod secret;
pub mod store;
pub mod telemetry;

pub use error::{Disposition, Error, Side};
