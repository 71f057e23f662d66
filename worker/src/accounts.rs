//! Which connection pools serve a user's jobs. Jobs carry a batch and user id only; the
//! worker looks the accounts up here: from memory in the embedded mode (filled from the
//! command line or the CSV), from sealed credentials in Redis in the cluster mode.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use mailferry_shared::config::seal::{Binding, Keyring, SealError};
use mailferry_shared::domain::batch::{BatchRecord, UserRecord};
use mailferry_shared::domain::login::{AuthMethod, Credentials};
use mailferry_shared::imap::pool::Pool;
use mailferry_shared::imap::Limits;
use mailferry_shared::redis::slots::{Pinned, SharedSlots};
use mailferry_shared::redis::RedisStore;
use mailferry_shared::{Disposition, Error as SharedError, Side};

use crate::error::JobError;

#[derive(Clone)]
pub struct UserAccounts {
    pub source: Arc<Pool>,
    pub target: Arc<Pool>,
    /// The two accounts' shared leases, kept while these pools are ([`load_many`]).
    ///
    /// [`load_many`]: RedisAccounts::load_many
    pins: Arc<Vec<Pinned>>,
}

impl UserAccounts {
    /// Pools whose leases, if any, are taken when their connections open.
    pub fn new(source: Arc<Pool>, target: Arc<Pool>) -> Self {
        UserAccounts {
            source,
            target,
            pins: Arc::default(),
        }
    }

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

    /// Loads several users' pools ahead of their jobs, together where that is cheaper
    /// (a delivery of several small users), and returns them: while the caller holds
    /// them, they stay loaded. A failure is left for [`accounts`](Self::accounts) to
    /// report.
    fn preload<'a>(
        &'a self,
        _batch: &'a str,
        _users: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Vec<UserAccounts>> + Send + 'a>> {
        Box::pin(async { Vec::new() })
    }
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
    /// Pools held outside the cache stay: a delivery's preloaded users wait their turn
    /// without a connection, and evicting them would load each again on its own.
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
                drop(pools); // its clones would count as held below
                me.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, p| {
                        let held =
                            Arc::strong_count(&p.source) > 1 || Arc::strong_count(&p.target) > 1;
                        held || !(p.source.is_unused() && p.target.is_unused())
                    });
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
        let mut loaded = self.load_many(batch, &[user.to_string()]).await;
        loaded
            .pop()
            .unwrap_or_else(|| Err(JobError::UnknownUser(user.to_string())))
    }

    /// Many users' pools, fresh from Redis: their logins in one MGET, and their
    /// connection leases (both sides of every user) in one call. One answer per user,
    /// in order; a user's bad record is that user's error alone.
    pub async fn load_many(
        &self,
        batch: &str,
        users: &[String],
    ) -> Vec<Result<UserAccounts, JobError>> {
        let (batch_record, records) = match self.store.batch_and_users(batch, users).await {
            Ok(found) => found,
            Err(e) => {
                let why = e.to_string();
                return users
                    .iter()
                    .map(|_| Err(JobError::Store(mailferry_shared::Error::Store(why.clone()))))
                    .collect();
            }
        };
        let Some(batch_record) = batch_record else {
            return users
                .iter()
                .map(|user| {
                    Err(JobError::UnknownUser(format!(
                        "{user} (batch {batch} does not exist)"
                    )))
                })
                .collect();
        };
        let mut out: Vec<Result<UserAccounts, JobError>> = users
            .iter()
            .zip(records)
            .map(|(user, record)| {
                let record = record
                    .map_err(JobError::Store)?
                    .ok_or_else(|| JobError::UnknownUser(user.to_string()))?;
                self.pools(batch, user, &batch_record, &record)
            })
            .collect();
        if let Some(slots) = &self.slots {
            // Both sides' leases of every user in one call, before the first
            // connection of any.
            // The leases stay while the pools are held (`UserAccounts::pins`). A
            // source-host slot for the first user only; the host lease grows a block at
            // a time as the others connect (a delivery's users one after another, a
            // planner group's at once). A slot for each user at once made the workers'
            // prefetches outgrow the host cap (1,000 x 20: 5,093 -> 4,416 commands).
            let mut ask = Vec::new();
            for (i, pools) in out.iter().flatten().enumerate() {
                ask.push((pools.source.endpoint(), pools.source.login(), i == 0));
                ask.push((pools.target.endpoint(), pools.target.login(), false));
            }
            let mut pins = slots.prefetch(&ask).await.into_iter();
            for pools in out.iter_mut().flatten() {
                pools.pins = Arc::new(pins.by_ref().take(2).collect());
            }
        }
        out
    }

    /// A user's two pools, from the batch's record and the user's.
    fn pools(
        &self,
        batch: &str,
        user: &str,
        batch_record: &BatchRecord,
        record: &UserRecord,
    ) -> Result<UserAccounts, JobError> {
        // Without a stored secret there is nothing to log in with: the user fails with
        // the reason, as a rejected login would (the API refuses to start such a user).
        let unseal = |sealed: &Option<String>, side: Side, server, method| {
            let sealed = sealed.as_deref().ok_or_else(|| JobError::Imap {
                side,
                source: mailferry_shared::Error::AuthRejected {
                    server_says: format!(
                        "no password is stored for {user}: enter it and start the user again"
                    ),
                },
            })?;
            // Bound to this side's server as stored beside it: a server changed in Redis
            // since the password was sealed does not get it.
            let to = Binding::new(batch, user, side, server).logging_in_with(method);
            self.keys.open(sealed, to).map_err(|e| {
                let error = mailferry_shared::Error::Config(format!("credentials of {user}: {e}"));
                match e {
                    // This process lacks a key the others have (a rotation half rolled
                    // out): another try, perhaps on another worker, may open it.
                    SealError::UnknownKey(_) => JobError::Store(error),
                    // Sealed for another user, side or server, or not bound at all: no
                    // retry opens it; the user fails until the password is given again.
                    _ => JobError::Imap {
                        side,
                        source: error,
                    },
                }
            })
        };
        let credentials = |side: Side| {
            let (login, sealed, server, method) = match side {
                Side::Source => (
                    &record.source_login,
                    &record.source_secret,
                    &batch_record.source,
                    &batch_record.source_auth,
                ),
                Side::Target => (
                    &record.target_login,
                    &record.target_secret,
                    &batch_record.target,
                    &batch_record.target_auth,
                ),
            };
            let mut credentials = Credentials::new(
                login.clone(),
                unseal(sealed, side, server, method)?,
                method.clone(),
            );
            // Only a refresh token rotates.
            let rotates = matches!(method, AuthMethod::OAuth2(c) if c.grant.needs_user_secret());
            let rotated = sealed
                .as_ref()
                .filter(|_| rotates)
                .map(|sealed| self.store_rotation(batch, user, side, server, sealed, &credentials));
            credentials.tokens =
                mailferry_shared::domain::login::tokens_for(&credentials, server, rotated)
                    .map_err(|source| JobError::Imap { side, source })?;
            Ok::<_, JobError>(credentials)
        };
        let gate = |host_cap| self.slots.as_ref().map(|s| s.gate(host_cap));
        let source = Pool::gated(
            batch_record.source.clone(),
            credentials(Side::Source)?,
            self.limits,
            batch_record
                .source
                .connection_cap(self.connections_per_account),
            gate(true),
        );
        let target = Pool::gated(
            batch_record.target.clone(),
            credentials(Side::Target)?,
            self.limits,
            batch_record
                .target
                .connection_cap(self.connections_per_account),
            gate(false),
        );
        Ok(UserAccounts::new(source, target))
    }

    /// What to do with a refresh token the provider rotated: seal it for the same user,
    /// side and server, beside the same app secret, and store it in place of the one it
    /// replaces, so that the next pass (on any worker) starts from it. A failure to store
    /// is logged: this run goes on with the new token, and a provider that keeps the old
    /// one valid (Microsoft, Google) accepts it next time.
    fn store_rotation(
        &self,
        batch: &str,
        user: &str,
        side: Side,
        server: &mailferry_shared::domain::endpoint::Endpoint,
        sealed: &str,
        credentials: &Credentials,
    ) -> mailferry_shared::oauth::Rotated {
        let store = self.store.clone();
        let keys = self.keys.clone();
        let (batch, user, server) = (batch.to_string(), user.to_string(), server.clone());
        let method = credentials.method.clone();
        let app_secret = mailferry_shared::oauth::GrantSecrets::unpack(&credentials.secret)
            .ok()
            .and_then(|(_, app)| app);
        let current = Arc::new(tokio::sync::Mutex::new(sealed.to_string()));
        Arc::new(move |refresh| {
            let (store, keys, current) = (store.clone(), keys.clone(), current.clone());
            let (batch, user, server) = (batch.clone(), user.clone(), server.clone());
            let method = method.clone();
            let packed =
                mailferry_shared::oauth::GrantSecrets::pack(Some(&refresh), app_secret.as_ref());
            Box::pin(async move {
                let to = Binding::new(&batch, &user, side, &server).logging_in_with(&method);
                let resealed = match keys.seal(&packed, to) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%batch, %user, %side, error = %e, "cannot seal a rotated refresh token");
                        return;
                    }
                };
                let mut current = current.lock().await;
                match store
                    .replace_user_secret(&batch, &user, side, &current, &resealed)
                    .await
                {
                    Ok(true) => *current = resealed,
                    Ok(false) => tracing::info!(%batch, %user, %side,
                        "a rotated refresh token was not stored: the user's secret changed meanwhile"),
                    Err(e) => tracing::warn!(%batch, %user, %side, error = %e,
                        "cannot store a rotated refresh token"),
                }
            })
        })
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

    /// The users not cached yet, in one MGET and one lease call ([`load_many`]); then
    /// every user's pools, cached or new, for the caller to hold.
    ///
    /// [`load_many`]: RedisAccounts::load_many
    fn preload<'a>(
        &'a self,
        batch: &'a str,
        users: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Vec<UserAccounts>> + Send + 'a>> {
        Box::pin(async move {
            let key = |u: &str| (batch.to_string(), u.to_string());
            let missing: Vec<String> = {
                let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                users
                    .iter()
                    .filter(|u| !cache.contains_key(&key(u)))
                    .cloned()
                    .collect()
            };
            // One user loads as cheaply on its first job.
            let loaded = if missing.len() < 2 {
                Vec::new()
            } else {
                self.load_many(batch, &missing).await
            };
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            for (user, pools) in missing.iter().zip(loaded) {
                if let Ok(pools) = pools {
                    cache.entry(key(user)).or_insert(pools);
                }
            }
            users
                .iter()
                .filter_map(|u| cache.get(&key(u)).cloned())
                .collect()
        })
    }
}
