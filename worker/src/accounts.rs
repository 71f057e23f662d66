//! Which connection pools serve a user's jobs. Jobs carry a batch and user id only; the
//! worker looks the accounts up here: from memory in the embedded mode (filled from the
//! command line or the CSV), from sealed credentials in Redis in the cluster mode.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use mailferry_shared::endpoint::Credentials;
use mailferry_shared::imap::pool::Pool;
use mailferry_shared::imap::Limits;
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::seal::Keyring;
use mailferry_shared::slots::SharedSlots;
use mailferry_shared::{Disposition, Error as SharedError, Side};

use crate::error::JobError;

#[derive(Clone)]
pub struct UserAccounts {
    pub source: Arc<Pool>,
    pub target: Arc<Pool>,
}

impl UserAccounts {
    /// A throttling answer on `side` pauses that account for every process (where the
    /// pools share caps; the embedded mode just waits its turn). A refusal because the
    /// account is paused already does not extend the pause.
    pub async fn report_throttling(&self, side: Side, error: &SharedError) {
        if matches!(error, SharedError::Paused { .. }) {
            return;
        }
        if let Disposition::Throttle(hint) = error.disposition() {
            let pool = match side {
                Side::Source => &self.source,
                Side::Target => &self.target,
            };
            pool.report_throttled(hint).await;
        }
    }
}

pub type Lookup<'a> = Pin<Box<dyn Future<Output = Result<UserAccounts, JobError>> + Send + 'a>>;

pub trait AccountDirectory: Send + Sync + 'static {
    /// The pools of `user` in `batch`. The same pools for every job of the user, so the
    /// per-account connection cap holds across them.
    fn accounts<'a>(&'a self, batch: &'a str, user: &'a str) -> Lookup<'a>;
}

/// Accounts held in memory (the embedded mode).
#[derive(Default)]
pub struct StaticAccounts {
    users: RwLock<HashMap<(String, String), UserAccounts>>,
}

impl StaticAccounts {
    pub fn insert(&self, batch: &str, user: &str, accounts: UserAccounts) {
        self.users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((batch.to_string(), user.to_string()), accounts);
    }
}

impl AccountDirectory for StaticAccounts {
    fn accounts<'a>(&'a self, batch: &'a str, user: &'a str) -> Lookup<'a> {
        let found = self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(batch.to_string(), user.to_string()))
            .cloned();
        Box::pin(async move { found.ok_or_else(|| JobError::UnknownUser(user.to_string())) })
    }
}

/// Accounts from the batch and user records in Redis, credentials unsealed on first
/// use and kept only inside the pools (as [`Secret`](mailferry_shared::secret::Secret)s).
pub struct RedisAccounts {
    store: RedisStore,
    keys: Arc<Keyring>,
    limits: Limits,
    connections_per_account: usize,
    /// Connection caps shared with every other process of the installation.
    slots: Option<Arc<SharedSlots>>,
    cache: Mutex<HashMap<(String, String), UserAccounts>>,
}

impl RedisAccounts {
    pub fn new(
        store: RedisStore,
        keys: Arc<Keyring>,
        limits: Limits,
        connections_per_account: usize,
    ) -> Self {
        RedisAccounts {
            store,
            keys,
            limits,
            connections_per_account,
            slots: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps the cache small: every few seconds, connections idle for longer than
    /// `linger` are logged out (a user's next folder job usually comes sooner, and
    /// reuses them), and users whose pools are unused leave the cache. Without this a
    /// worker that has served thousands of users would hold a connection to each.
    pub fn start_reaper(self: &Arc<Self>, linger: std::time::Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(linger / 2).await;
                let Some(me) = weak.upgrade() else { return };
                let pools: Vec<UserAccounts> = me
                    .cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for p in &pools {
                    p.source.close_idle_since(linger).await;
                    p.target.close_idle_since(linger).await;
                }
                me.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, p| !(p.source.is_unused() && p.target.is_unused()));
            }
        });
    }

    /// New connections also take a slot of the caps shared through Redis: per account
    /// on both sides, and per host on the source.
    pub fn with_shared_slots(mut self, slots: Arc<SharedSlots>) -> Self {
        self.slots = Some(slots);
        self
    }

    /// Lets the shared slots close this directory's idle connections to a host whose
    /// cap is full (call once the directory is in its `Arc`).
    pub fn evict_idle_when_host_full(self: &Arc<Self>) {
        let Some(slots) = &self.slots else { return };
        let weak = Arc::downgrade(self);
        slots.on_host_full(Box::new(move |host: &str| {
            let Some(me) = weak.upgrade() else { return };
            let pools: Vec<Arc<Pool>> = me
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .flat_map(|p| [p.source.clone(), p.target.clone()])
                .filter(|p| p.endpoint().host == host)
                .collect();
            if pools.is_empty() {
                return;
            }
            tokio::spawn(async move {
                for pool in pools {
                    pool.close_idle_since(std::time::Duration::ZERO).await;
                }
            });
        }));
    }

    /// The user's pools, fresh from Redis (not cached: the coordinator plans a user
    /// once per pass and closes the pools after).
    pub async fn load(&self, batch: &str, user: &str) -> Result<UserAccounts, JobError> {
        let (batch_record, record) = self
            .store
            .batch_and_user(batch, user)
            .await
            .map_err(JobError::Store)?;
        let batch_record = batch_record.ok_or_else(|| {
            JobError::UnknownUser(format!("{user} (batch {batch} does not exist)"))
        })?;
        let record = record.ok_or_else(|| JobError::UnknownUser(user.to_string()))?;
        // Without a stored secret there is nothing to log in with: the user fails with
        // the reason, as a rejected login would (the API refuses to start such a user).
        let unseal = |sealed: &Option<String>, side: Side| {
            let sealed = sealed.as_deref().ok_or_else(|| JobError::Imap {
                side,
                source: mailferry_shared::Error::AuthRejected {
                    server_says: format!(
                        "no password is stored for {user}: enter it and start the user again"
                    ),
                },
            })?;
            self.keys.open(sealed, batch, user).map_err(|e| {
                JobError::Store(mailferry_shared::Error::Config(format!(
                    "credentials of {user}: {e}"
                )))
            })
        };
        let gate = |host_cap| self.slots.as_ref().map(|s| s.gate(host_cap));
        let source = Pool::gated(
            batch_record.source,
            Credentials {
                login: record.source_login.clone(),
                secret: unseal(&record.source_secret, Side::Source)?,
                method: batch_record.source_auth,
            },
            self.limits,
            self.connections_per_account,
            gate(true),
        );
        let target = Pool::gated(
            batch_record.target,
            Credentials {
                login: record.target_login.clone(),
                secret: unseal(&record.target_secret, Side::Target)?,
                method: batch_record.target_auth,
            },
            self.limits,
            self.connections_per_account,
            gate(false),
        );
        if let Some(slots) = &self.slots {
            // Both sides' leases in one call, before the first connection of either.
            slots
                .prefetch(&[
                    (source.endpoint(), &record.source_login, true),
                    (target.endpoint(), &record.target_login, false),
                ])
                .await;
        }
        Ok(UserAccounts { source, target })
    }
}

impl AccountDirectory for RedisAccounts {
    fn accounts<'a>(&'a self, batch: &'a str, user: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            let key = (batch.to_string(), user.to_string());
            if let Some(found) = self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
            {
                return Ok(found.clone());
            }
            let loaded = self.load(batch, user).await?;
            // Two jobs of one user may load at once: keep the first pools, so both share them.
            Ok(self
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_insert(loaded)
                .clone())
        })
    }
}
