//! The HTTP API's records in Redis, beside the cluster's ([`crate::redis::control`]): each
//! tenant's endpoints and batches, and the bulk writes an import of many users needs.
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:endpoints:<tenant>` | hash id → [`EndpointRecord`] | the tenant's IMAP servers |
//! | `P:tenant-batches:<tenant>` | set | the tenant's batch ids |
//! | `P:tenants` | set | tenants that have made an endpoint (key rotation visits them) |
//!
//! A batch made through the API carries its [`crate::domain::batch::Owner`]; the API shows a
//! tenant only what it owns, and another tenant's object is as absent as a missing one.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::domain::batch::UserRecord;
use crate::domain::endpoint::Endpoint;
use crate::domain::login::AuthMethod;
use crate::error::Error;
use crate::redis::{store_error, RedisStore};

/// Which side of migrations an endpoint serves: the source servers are the tenants'
/// (and may be refused when they are internal), the targets the installation's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

impl Role {
    /// The side of a migration this endpoint's secrets are sealed for.
    pub fn side(self) -> crate::error::Side {
        match self {
            Role::Source => crate::error::Side::Source,
            Role::Target => crate::error::Side::Target,
        }
    }
}

/// An IMAP server a tenant migrates from or to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// A preset's name ([`crate::providers::PRESETS`]) or `custom`.
    pub provider: String,
    pub endpoint: Endpoint,
    pub auth: AuthMethod,
    /// With an admin or master login: its password, sealed for this tenant and
    /// endpoint ([`endpoint_seal_scope`]); it serves every user of the batches made
    /// from this endpoint.
    pub admin_secret: Option<String>,
    pub created_ms: u64,
}

/// The (batch, user) pair an endpoint's admin secret is sealed for: no batch is named
/// like this (batch ids are words), so it opens for nothing else.
pub fn endpoint_seal_scope(tenant: &str, id: &str) -> (String, String) {
    (format!("endpoint:{tenant}"), id.to_string())
}

/// Users written per pipeline by [`RedisStore::put_users`].
const WRITE_CHUNK: usize = 1000;

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::Store(e.to_string()))
}

impl RedisStore {
    pub async fn put_endpoint(&self, tenant: &str, record: &EndpointRecord) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(self.k(&["endpoints", tenant]), &record.id, json(record)?)
            .ignore()
            .sadd(self.k(&["tenants"]), tenant)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("MULTI", e))
    }

    /// Tenants that have made an endpoint.
    pub async fn tenants(&self) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let mut all: Vec<String> = conn
            .smembers(self.k(&["tenants"]))
            .await
            .map_err(|e| store_error("SMEMBERS", e))?;
        all.sort();
        Ok(all)
    }

    pub async fn endpoint(&self, tenant: &str, id: &str) -> Result<Option<EndpointRecord>, Error> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = conn
            .hget(self.k(&["endpoints", tenant]), id)
            .await
            .map_err(|e| store_error("HGET", e))?;
        value
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| Error::Store(format!("endpoint {id} is damaged: {e}")))
            })
            .transpose()
    }

    /// The tenant's endpoints, oldest first.
    pub async fn endpoints(&self, tenant: &str) -> Result<Vec<EndpointRecord>, Error> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = conn
            .hgetall(self.k(&["endpoints", tenant]))
            .await
            .map_err(|e| store_error("HGETALL", e))?;
        let mut out = all
            .into_iter()
            .map(|(id, v)| {
                serde_json::from_slice::<EndpointRecord>(&v)
                    .map_err(|e| Error::Store(format!("endpoint {id} is damaged: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(out)
    }

    /// Returns whether there was such an endpoint.
    pub async fn delete_endpoint(&self, tenant: &str, id: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let n: u64 = conn
            .hdel(self.k(&["endpoints", tenant]), id)
            .await
            .map_err(|e| store_error("HDEL", e))?;
        Ok(n > 0)
    }

    pub async fn add_tenant_batch(&self, tenant: &str, batch: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.sadd::<_, _, ()>(self.k(&["tenant-batches", tenant]), batch)
            .await
            .map_err(|e| store_error("SADD", e))
    }

    pub async fn tenant_batches(&self, tenant: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = conn
            .smembers(self.k(&["tenant-batches", tenant]))
            .await
            .map_err(|e| store_error("SMEMBERS", e))?;
        ids.sort();
        Ok(ids)
    }

    /// Stores many users at once (an import): records, the batch's user set and the
    /// intent Idle for those without one, [`WRITE_CHUNK`] users per round trip.
    pub async fn put_users(
        &self,
        batch: &str,
        users: &[(String, UserRecord)],
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        for chunk in users.chunks(WRITE_CHUNK) {
            let mut pipe = redis::pipe();
            let mut ids = Vec::with_capacity(chunk.len());
            for (id, record) in chunk {
                pipe.set(self.user_key(batch, id), json(record)?).ignore();
                pipe.hset_nx(self.k(&["intent", batch]), id, "idle")
                    .ignore();
                ids.push(id.as_str());
            }
            pipe.sadd(self.k(&["users", batch]), ids).ignore();
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| store_error("pipeline", e))?;
        }
        Ok(())
    }

    /// Whether `user` is one of the batch's users (a closed user still is, without its
    /// record).
    pub async fn has_user(&self, batch: &str, user: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        conn.sismember(self.k(&["users", batch]), user)
            .await
            .map_err(|e| store_error("SISMEMBER", e))
    }

    /// Many users' records at once (`None` for a missing one), in the order of `ids`.
    pub async fn user_records(
        &self,
        batch: &str,
        ids: &[String],
    ) -> Result<Vec<Option<UserRecord>>, Error> {
        let mut conn = self.conn.clone();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(WRITE_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|id| self.user_key(batch, id)).collect();
            let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| store_error("MGET", e))?;
            for (id, value) in chunk.iter().zip(values) {
                out.push(
                    value
                        .map(|v| {
                            serde_json::from_slice(&v)
                                .map_err(|e| Error::Store(format!("user {id} is damaged: {e}")))
                        })
                        .transpose()?,
                );
            }
        }
        Ok(out)
    }

    /// Forgets a user: record (and sealed secrets), intent, schedule, pass, jobs and
    /// counters. The caller makes sure nothing of the user runs (the API removes only
    /// users that are not started, stopped or closed).
    pub async fn remove_user(&self, batch: &str, user: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .srem(self.k(&["users", batch]), user)
            .ignore()
            .del(self.user_key(batch, user))
            .ignore()
            .hdel(self.k(&["intent", batch]), user)
            .ignore()
            .zrem(self.k(&["due", batch]), user)
            .ignore()
            .hdel(self.k(&["pass", batch]), user)
            .ignore()
            .hdel(self.jobs_key(batch), user)
            .ignore()
            .hdel(self.specs_key(batch), user)
            .ignore()
            .hdel(self.progress_key(batch), user)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("MULTI", e))
    }
}
