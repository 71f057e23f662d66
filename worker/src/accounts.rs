//! Which connection pools serve a user's jobs. Jobs carry a user id only; the worker
//! looks the accounts up here (the embedded mode fills this from the command line or the
//! CSV; the cluster mode from sealed credentials in Redis).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use mailferry_shared::imap::pool::Pool;

#[derive(Clone)]
pub struct UserAccounts {
    pub source: Arc<Pool>,
    pub target: Arc<Pool>,
}

pub trait AccountDirectory: Send + Sync + 'static {
    fn accounts(&self, user: &str) -> Option<UserAccounts>;
}

/// Accounts held in memory.
#[derive(Default)]
pub struct StaticAccounts {
    users: RwLock<HashMap<String, UserAccounts>>,
}

impl StaticAccounts {
    pub fn insert(&self, user: impl Into<String>, accounts: UserAccounts) {
        self.users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user.into(), accounts);
    }
}

impl AccountDirectory for StaticAccounts {
    fn accounts(&self, user: &str) -> Option<UserAccounts> {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
    }
}
