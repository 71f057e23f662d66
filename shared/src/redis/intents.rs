//! The admin's side: batches and each user's intent (idle, active, stopped, closing,
//! closed), recorded by the CLI and the API and acted on by the coordinator.

use std::collections::HashMap;

use redis::AsyncCommands;

use crate::domain::status::Intent;
use crate::error::Error;
use crate::redis::scripts::{self};
use crate::redis::{store_error, RedisStore};

use super::control::*;

impl RedisStore {
    pub async fn batches(&self) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn
            .smembers(self.k(&["batches"]))
            .await
            .map_err(|e| store_error("SMEMBERS", e))?;
        names.sort();
        Ok(names)
    }

    /// The user's counters, summed over all passes.
    pub async fn progress(
        &self,
        batch: &str,
        user: &str,
    ) -> Result<std::collections::BTreeMap<String, i64>, Error> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .hget(self.progress_key(batch), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        parse_counts(user, value.as_deref())
    }

    pub(crate) fn batches_key(&self) -> String {
        self.k(&["batches"])
    }

    /// Records users as imported (intent Idle) unless they have an intent already.
    pub async fn import_users(&self, batch: &str, users: &[String]) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for user in users {
            pipe.hset_nx(self.k(&["intent", batch]), user, "idle")
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("HSETNX", e))
    }

    pub async fn intents(&self, batch: &str) -> Result<HashMap<String, Intent>, Error> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn
            .hgetall(self.k(&["intent", batch]))
            .await
            .map_err(|e| store_error("HGETALL", e))?;
        Ok(all
            .into_iter()
            .map(|(u, i)| (u, parse_intent(&i)))
            .collect())
    }

    pub async fn intent(&self, batch: &str, user: &str) -> Result<Intent, Error> {
        let mut conn = self.conn.clone();
        let intent: Option<String> = conn
            .hget(self.k(&["intent", batch]), user)
            .await
            .map_err(|e| store_error("HGET", e))?;
        Ok(intent.as_deref().map_or(Intent::Idle, parse_intent))
    }

    /// Sets the users' intent; `due` schedules a pass now (start, close), Stopped takes
    /// them off the schedule.
    pub async fn set_intent(
        &self,
        batch: &str,
        users: &[String],
        intent: Intent,
        due: bool,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        // One multi-field HSET and one ZADD (or ZREM) per chunk, not a command per user.
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let fields: Vec<(&str, &str)> = chunk
                .iter()
                .map(|u| (u.as_str(), intent_name(intent)))
                .collect();
            pipe.hset_multiple(self.k(&["intent", batch]), &fields)
                .ignore();
            if due {
                let members: Vec<(u64, &str)> = chunk.iter().map(|u| (now, u.as_str())).collect();
                pipe.zadd_multiple(self.k(&["due", batch]), &members)
                    .ignore();
            } else if matches!(intent, Intent::Stopped | Intent::Closed) {
                pipe.zrem(self.k(&["due", batch]), chunk).ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| store_error("MULTI", e))?;
        }
        Ok(())
    }

    /// Closing → Closed, unless the admin changed the intent meanwhile.
    pub async fn mark_closed(&self, batch: &str, user: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let done: i64 = scripts::CLOSE
            .key(self.k(&["intent", batch]))
            .arg(user)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("close script", e))?;
        Ok(done == 1)
    }

    /// Deletes a user's stored logins and sealed secrets (Close).
    pub async fn delete_credentials(&self, batch: &str, user: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.user_key(batch, user))
            .await
            .map_err(|e| store_error("DEL", e))
    }
}
