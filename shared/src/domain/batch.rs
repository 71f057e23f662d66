//! What the cluster stores about a migration: a batch (source and target endpoints and
//! how to log in) and its users (logins and *sealed* secrets). Plain data; the Redis
//! store reads and writes it.

use serde::{Deserialize, Serialize};

use crate::domain::endpoint::Endpoint;
use crate::domain::login::AuthMethod;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub source: Endpoint,
    pub source_auth: AuthMethod,
    pub target: Endpoint,
    pub target_auth: AuthMethod,
    /// Time between passes of a synced user; `None`: the installation's default.
    #[serde(default)]
    pub sync_interval_secs: Option<u64>,
    /// Who owns the batch when it was made through the HTTP API (`None`: made by the
    /// `mailferry batch` command, which the API does not show).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Which folders the batch's users copy and where they land (include, exclude,
    /// rename), as `migrate --include …` does for one run.
    #[serde(
        default,
        skip_serializing_if = "crate::domain::folders::Rules::is_empty"
    )]
    pub folder_rules: crate::domain::folders::Rules,
}

/// A batch made through the API: its tenant, the name its admin gave it, and the
/// endpoints it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub tenant: String,
    pub name: String,
    pub source_endpoint: String,
    pub target_endpoint: String,
    pub created_ms: u64,
    /// The endpoints' admin or master passwords when they have one, sealed for their
    /// endpoint ([`crate::redis::directory::endpoint_seal_scope`]): a user imported without
    /// its own password logs in with these.
    #[serde(default)]
    pub source_admin_secret: Option<String>,
    #[serde(default)]
    pub target_admin_secret: Option<String>,
}

impl BatchRecord {
    /// Seconds between passes of the batch's synced users: its own interval, else the
    /// installation's `default`.
    pub fn interval_secs(&self, default: u64) -> u64 {
        self.sync_interval_secs.unwrap_or(default)
    }
}

/// One user of a batch. The secrets are sealed for this batch and user
/// ([`crate::config::seal::Keyring`]); nothing here is a password. A user imported through the
/// API may have no secret yet (the admin types it when starting the user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub source_login: String,
    pub source_secret: Option<String>,
    pub target_login: String,
    pub target_secret: Option<String>,
}
