//! The cluster's control plane in Redis. Every key lives under the installation's prefix
//! `P`; `control.rs` has the table of keys and who writes each.
//!
//! - `mod.rs`: [`RedisStore`], the connection and prefix every part shares, and the
//!   cluster's [`StateStore`]: checkpoints, one value per folder. Redis is an
//!   accelerator (DESIGN.md invariant 1): a lost or damaged checkpoint costs a
//!   reconciliation of the folder, never a duplicate.
//! - `control.rs`: the table of keys, the records the control plane keeps (pass records,
//!   claims' answers, users' states) and how a user's fields are encoded; its
//!   `RedisStore` methods are one file per role:
//!   - `intents.rs`: batches and the admin's intents;
//!   - `schedule.rs`: when each user's next pass is due;
//!   - `passes.rs`: pass records, job states and specs, users' states, the dispatch set;
//!   - `claims.rs`: a worker's claim, renewal and finish of a delivery's jobs;
//!   - `leader.rs`: the coordinator's leadership.
//! - `slots.rs`: connection leases per account and per host, and throttling pauses.
//! - `directory.rs`: the HTTP API's records (tenants, endpoints, batch owners).
//! - `lease.rs`: leases and the fence that guards their holder.
//! - `scripts.rs` and `lua/`: the Lua scripts, one file each with `helpers.lua` shared,
//!   and the typed requests of those that take more than a few scalars.

mod claims;
pub mod control;
pub mod directory;
mod intents;
mod leader;
pub mod lease;
mod passes;
mod schedule;
mod scripts;
pub mod slots;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::domain::job::{Checkpoint, CheckpointKey};
use crate::error::Error;
use crate::secret::Secret;
use crate::store::StateStore;

#[derive(Clone)]
pub struct RedisStore {
    pub(crate) conn: ConnectionManager,
    pub(crate) prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

pub(crate) fn store_error(what: &str, e: redis::RedisError) -> Error {
    metrics::counter!(crate::telemetry::REDIS_ERRORS).increment(1);
    Error::Store(format!("redis {what}: {e}"))
}

impl RedisStore {
    /// One PING: is Redis answering?
    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| store_error("PING", e))
    }

    /// [`connect_with`](Self::connect_with) as the settings say: their URL
    /// (`rediss://` over TLS), CA file and key prefix.
    pub async fn from_settings(
        settings: &crate::config::settings::Settings,
    ) -> Result<Self, Error> {
        let ca = match &settings.redis_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| Error::Config(format!("redis_ca_file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        Self::connect_with(&settings.redis_url, ca, &settings.key_prefix).await
    }

    /// Connects (and reconnects by itself later: the connection manager re-establishes a
    /// lost connection on the next command).
    pub async fn connect(url: &Secret, prefix: &str) -> Result<Self, Error> {
        Self::connect_with(url, None, prefix).await
    }

    /// [`connect`](Self::connect); a `rediss://` URL connects over TLS (rustls with
    /// ring, as for IMAP and RabbitMQ), trusting the public roots or, with `ca_pem`, the
    /// CA certificates in it instead.
    pub async fn connect_with(
        url: &Secret,
        ca_pem: Option<Vec<u8>>,
        prefix: &str,
    ) -> Result<Self, Error> {
        // the URL may hold a password: do not echo it
        let bad_url = |e: redis::RedisError| {
            Error::Config(format!(
                "redis_url is not a valid Redis URL ({:?})",
                e.kind()
            ))
        };
        let client = match ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                url.expose(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            ),
            None => redis::Client::open(url.expose()),
        }
        .map_err(bad_url)?;
        // Bounded: a Redis that is down must be reported, not waited for in silence.
        // (A command on a lost connection fails; the next one reconnects.)
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(5))
            .set_response_timeout(std::time::Duration::from_secs(10))
            .set_number_of_retries(2)
            .set_max_delay(2_000);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| store_error("connect", e))?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
        })
    }

    /// `<prefix>:cp:<batch>:<user>:<folder wire name>` (Redis keys are binary-safe; a
    /// batch name has no `:`).
    pub(crate) fn checkpoint_key(&self, key: &CheckpointKey) -> Vec<u8> {
        let mut k = format!("{}:cp:{}:{}:", self.prefix, key.batch, key.user).into_bytes();
        k.extend_from_slice(key.source_folder.as_bytes());
        k
    }

    /// Deletes every key under this store's prefix (tests, and closing an installation).
    pub async fn delete_all(&self) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}:*", self.prefix);
        let keys: Vec<Vec<u8>> = {
            let mut iter = conn
                .scan_match::<_, Vec<u8>>(pattern)
                .await
                .map_err(|e| store_error("SCAN", e))?;
            let mut keys = Vec::new();
            while let Some(k) = iter.next_item().await {
                keys.push(k);
            }
            keys
        };
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            deleted += conn
                .del::<_, u64>(chunk)
                .await
                .map_err(|e| store_error("DEL", e))?;
        }
        Ok(deleted)
    }
}

/// A checkpoint value, or `None` (with a warning) when it is damaged: without it the
/// folder is reconciled against the target, which costs time but never duplicates.
pub(crate) fn decode_checkpoint(key: &CheckpointKey, bytes: &[u8]) -> Option<Checkpoint> {
    match serde_json::from_slice(bytes) {
        Ok(cp) => Some(cp),
        Err(e) => {
            tracing::warn!(user = %key.user, error = %e, "ignoring damaged checkpoint in Redis");
            None
        }
    }
}

impl StateStore for RedisStore {
    async fn load_checkpoint(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, Error> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = conn
            .get(self.checkpoint_key(key))
            .await
            .map_err(|e| store_error("GET", e))?;
        Ok(value.and_then(|bytes| decode_checkpoint(key, &bytes)))
    }

    async fn load_checkpoints(
        &self,
        keys: &[CheckpointKey],
    ) -> Result<Vec<Option<Checkpoint>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let names: Vec<Vec<u8>> = keys.iter().map(|k| self.checkpoint_key(k)).collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(&mut conn)
            .await
            .map_err(|e| store_error("MGET", e))?;
        Ok(keys
            .iter()
            .zip(values)
            .map(|(k, v)| v.and_then(|bytes| decode_checkpoint(k, &bytes)))
            .collect())
    }

    async fn save_checkpoint(
        &self,
        key: &CheckpointKey,
        checkpoint: &Checkpoint,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_vec(checkpoint).map_err(|e| Error::Store(e.to_string()))?;
        conn.set::<_, _, ()>(self.checkpoint_key(key), json)
            .await
            .map_err(|e| store_error("SET", e))
    }
}

impl RedisStore {
    /// Every user's counters in the batch, a field per user.
    pub(crate) fn progress_key(&self, batch: &str) -> String {
        format!("{}:progress:{batch}", self.prefix)
    }
}

/// A record stored as JSON under `key`, or an error naming the damaged key.
fn decode_json<T: serde::de::DeserializeOwned>(
    key: &str,
    value: Option<Vec<u8>>,
) -> Result<Option<T>, Error> {
    value
        .map(|v| {
            serde_json::from_slice(&v).map_err(|e| Error::Store(format!("{key} is damaged: {e}")))
        })
        .transpose()
}

impl RedisStore {
    fn batch_key(&self, batch: &str) -> String {
        format!("{}:batch:{batch}", self.prefix)
    }

    pub(crate) fn user_key(&self, batch: &str, user: &str) -> String {
        format!("{}:user:{batch}:{user}", self.prefix)
    }

    fn users_key(&self, batch: &str) -> String {
        format!("{}:users:{batch}", self.prefix)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
    ) -> Result<Option<T>, Error> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = conn.get(&key).await.map_err(|e| store_error("GET", e))?;
        decode_json(&key, value)
    }

    pub async fn put_batch(
        &self,
        batch: &str,
        record: &crate::domain::batch::BatchRecord,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))?;
        redis::pipe()
            .atomic()
            .set(self.batch_key(batch), json)
            .sadd(self.batches_key(), batch)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("MULTI", e))
    }

    pub async fn batch(
        &self,
        batch: &str,
    ) -> Result<Option<crate::domain::batch::BatchRecord>, Error> {
        self.get_json(self.batch_key(batch)).await
    }

    /// Stores a user (sealed secrets only) and adds it to the batch's user list.
    pub async fn put_user(
        &self,
        batch: &str,
        user: &str,
        record: &crate::domain::batch::UserRecord,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))?;
        redis::pipe()
            .atomic()
            .set(self.user_key(batch, user), json)
            .sadd(self.users_key(batch), user)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("MULTI", e))
    }

    /// Replaces one side's sealed secret of a user if it is still `old` (a refresh token
    /// the provider rotated, stored back). False when the user is gone or its secret
    /// changed meanwhile (an admin gave a new one, or another worker stored its rotation
    /// first): the newer value stays.
    pub async fn replace_user_secret(
        &self,
        batch: &str,
        user: &str,
        side: crate::error::Side,
        old: &str,
        new: &str,
    ) -> Result<bool, Error> {
        let field = match side {
            crate::error::Side::Source => "source_secret",
            crate::error::Side::Target => "target_secret",
        };
        let mut conn = self.conn.clone();
        let replaced: i64 = scripts::REPLACE_SECRET
            .key(self.user_key(batch, user))
            .arg(field)
            .arg(old)
            .arg(new)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("EVALSHA", e))?;
        Ok(replaced == 1)
    }

    pub async fn user(
        &self,
        batch: &str,
        user: &str,
    ) -> Result<Option<crate::domain::batch::UserRecord>, Error> {
        self.get_json(self.user_key(batch, user)).await
    }

    /// The batch's record and each user's, in one MGET (the logins of many plans); a
    /// user's record that cannot be read is that user's error alone.
    pub async fn batch_and_users(
        &self,
        batch: &str,
        users: &[String],
    ) -> Result<
        (
            Option<crate::domain::batch::BatchRecord>,
            Vec<Result<Option<crate::domain::batch::UserRecord>, Error>>,
        ),
        Error,
    > {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = users.iter().map(|u| self.user_key(batch, u)).collect();
        let mut values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(self.batch_key(batch))
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| store_error("MGET", e))?;
        if values.len() != users.len() + 1 {
            return Err(Error::Store(format!(
                "MGET answered {} values for {} keys",
                values.len(),
                users.len() + 1
            )));
        }
        let records = values
            .split_off(1)
            .into_iter()
            .zip(&keys)
            .map(|(v, key)| decode_json(key, v))
            .collect();
        let batch_record = decode_json(&self.batch_key(batch), values.pop().flatten())?;
        Ok((batch_record, records))
    }

    pub async fn users(&self, batch: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let mut users: Vec<String> = conn
            .smembers(self.users_key(batch))
            .await
            .map_err(|e| store_error("SMEMBERS", e))?;
        users.sort();
        Ok(users)
    }

    /// How many users each batch holds (one pipeline).
    pub async fn user_counts(&self, batches: &[String]) -> Result<Vec<usize>, Error> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for batch in batches {
            pipe.scard(self.users_key(batch));
        }
        pipe.query_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("SCARD", e))
    }
}

impl RedisStore {
    /// Every user's job states of its current pass, a field per user.
    pub(crate) fn jobs_key(&self, batch: &str) -> String {
        format!("{}:jobs:{batch}", self.prefix)
    }

    /// Every user's job specs of its current pass, a field per user.
    pub(crate) fn specs_key(&self, batch: &str) -> String {
        format!("{}:specs:{batch}", self.prefix)
    }
}
