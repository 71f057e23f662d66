//! The coordinator's leadership: a lease in `P:leader`, taken, renewed and released by
//! scripts that act only for its holder.

use std::time::Duration;

use redis::AsyncCommands;

use crate::error::Error;
use crate::redis::scripts::{self};
use crate::redis::{store_error, RedisStore};

impl RedisStore {
    /// Takes (or keeps) the coordinator lease. True when `holder` holds it now.
    pub async fn acquire_leader(&self, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let got: i64 = scripts::LEADER_ACQUIRE
            .key(self.k(&["leader"]))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("leader script", e))?;
        Ok(got == 1)
    }

    /// Renews the coordinator lease; false when it is no longer `holder`'s.
    pub async fn renew_leader(&self, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let kept: i64 = scripts::LEADER_RENEW
            .key(self.k(&["leader"]))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("leader script", e))?;
        Ok(kept == 1)
    }

    pub async fn release_leader(&self, holder: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        scripts::LEADER_RELEASE
            .key(self.k(&["leader"]))
            .arg(holder)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("leader script", e))?;
        Ok(())
    }

    /// Who holds the coordinator lease now.
    pub async fn leader(&self) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        conn.get(self.k(&["leader"]))
            .await
            .map_err(|e| store_error("GET", e))
    }
}
