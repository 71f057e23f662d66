//! The schedule: when each user's next pass is due (`P:due:<batch>`, a sorted set), and
//! the rechecks of open passes.

use std::collections::HashMap;

use redis::AsyncCommands;

use crate::error::Error;
use crate::redis::scripts::{self};
use crate::redis::{store_error, RedisStore};

use super::control::*;

impl RedisStore {
    /// Puts the look at the user's open pass at `at_ms` ([`recheck_score`]).
    pub async fn schedule_recheck(&self, batch: &str, user: &str, at_ms: u64) -> Result<(), Error> {
        self.schedule_rechecks(batch, &[user], at_ms).await
    }

    /// Puts the look at each user's open pass at `at_ms` (one ZADD).
    pub async fn schedule_rechecks(
        &self,
        batch: &str,
        users: &[&str],
        at_ms: u64,
    ) -> Result<(), Error> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let score = recheck_score(at_ms);
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.k(&["due", batch]));
        for user in users {
            cmd.arg(&score).arg(*user);
        }
        cmd.query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("ZADD", e))
    }

    /// Puts the user's next pass at `at_ms`.
    pub async fn schedule(&self, batch: &str, user: &str, at_ms: u64) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.zadd::<_, _, _, ()>(self.k(&["due", batch]), user, at_ms)
            .await
            .map_err(|e| store_error("ZADD", e))
    }

    /// After a pass: each user's next one at `next_ms`, unless one is due already (the
    /// admin pressed "sync now" while the pass ran): one call per 500 users.
    pub async fn schedule_next_many(
        &self,
        batch: &str,
        users: &[&str],
        now_ms: u64,
        next_ms: u64,
    ) -> Result<(), Error> {
        for chunk in users.chunks(STATUS_CHUNK) {
            let mut conn = self.conn.clone();
            let mut call = scripts::SCHEDULE_NEXT.key(self.k(&["due", batch]));
            call.arg(now_ms).arg(next_ms).arg(chunk);
            call.invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| store_error("schedule script", e))?;
        }
        Ok(())
    }

    /// Puts each user's next pass at `at_ms` (one ZADD), or takes it off the schedule
    /// (`None`: one ZREM).
    pub async fn schedule_many(
        &self,
        batch: &str,
        users: &[&str],
        at_ms: Option<u64>,
    ) -> Result<(), Error> {
        if users.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let key = self.k(&["due", batch]);
        match at_ms {
            Some(at) => {
                let members: Vec<(u64, &str)> = users.iter().map(|u| (at, *u)).collect();
                conn.zadd_multiple::<_, _, _, ()>(key, &members)
                    .await
                    .map_err(|e| store_error("ZADD", e))
            }
            None => conn
                .zrem::<_, _, ()>(key, users)
                .await
                .map_err(|e| store_error("ZREM", e)),
        }
    }

    pub async fn unschedule(&self, batch: &str, user: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.zrem::<_, _, ()>(self.k(&["due", batch]), user)
            .await
            .map_err(|e| store_error("ZREM", e))
    }

    /// Users due at `now_ms`, earliest first, at most `limit`.
    pub async fn due_users(
        &self,
        batch: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.k(&["due", batch]))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| store_error("ZRANGEBYSCORE", e))
    }

    /// When each scheduled user is due next.
    pub async fn due_times(&self, batch: &str) -> Result<HashMap<String, u64>, Error> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, f64)> = conn
            .zrange_withscores(self.k(&["due", batch]), 0, -1)
            .await
            .map_err(|e| store_error("ZRANGE", e))?;
        Ok(all.into_iter().map(|(u, s)| (u, s as u64)).collect())
    }
}
