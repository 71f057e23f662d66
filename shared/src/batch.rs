//! What the cluster stores about a migration: a batch (source and target endpoints and
//! how to log in) and its users (logins and *sealed* secrets). Plain data; the Redis
//! store reads and writes it.

use serde::{Deserialize, Serialize};

use crate::endpoint::{AuthMethod, Endpoint};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub source: Endpoint,
    pub source_auth: AuthMethod,
    pub target: Endpoint,
    pub target_auth: AuthMethod,
    /// Time between passes of a synced user; `None`: the installation's default.
    #[serde(default)]
    pub sync_interval_secs: Option<u64>,
}

impl BatchRecord {
    /// Seconds between passes of the batch's synced users: its own interval, else the
    /// installation's `default`.
    pub fn interval_secs(&self, default: u64) -> u64 {
        self.sync_interval_secs.unwrap_or(default)
    }
}

/// One user of a batch. The secrets are sealed for this batch and user
/// ([`crate::seal::Keyring`]); nothing here is a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub source_login: String,
    pub source_secret: String,
    pub target_login: String,
    pub target_secret: String,
}
