//! Connections to one account, capped and reused. Every job of the account draws from
//! the same pool, so "at most N connections per account" holds however many folders are
//! copied at once, and a job after the first pays no connect or login round trips.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::client::{connect, Limits, Session};
use crate::endpoint::{Credentials, Endpoint};
use crate::error::Error;

pub struct Pool {
    endpoint: Endpoint,
    credentials: Credentials,
    limits: Limits,
    idle: Mutex<Vec<Session>>,
    slots: Arc<Semaphore>,
    max: usize,
}

/// A session on loan from a pool. Give it back with [`release`](Self::release) when the
/// command stream is in a clean state; dropping it instead closes the connection (the
/// safe choice after any error).
pub struct PooledSession {
    session: Option<Session>,
    pool: Arc<Pool>,
    _slot: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(
        endpoint: Endpoint,
        credentials: Credentials,
        limits: Limits,
        max: usize,
    ) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Pool {
            endpoint,
            credentials,
            limits,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max)),
            max,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn login(&self) -> &str {
        &self.credentials.login
    }

    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// A logged-in session: an idle one if there is one, else a new connection. Waits
    /// while the account is at its connection cap.
    pub async fn get(self: &Arc<Self>) -> Result<PooledSession, Error> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Config("connection pool closed".into()))?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(s) if s.is_closed() => continue,
                Some(s) => {
                    return Ok(PooledSession {
                        session: Some(s),
                        pool: self.clone(),
                        _slot: slot,
                    })
                }
                None => break,
            }
        }
        let mut session = connect(&self.endpoint, self.limits).await?;
        session.authenticate(&self.credentials).await?;
        Ok(PooledSession {
            session: Some(session),
            pool: self.clone(),
            _slot: slot,
        })
    }

    /// Logs out every idle connection.
    pub async fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for s in idle {
            s.logout().await;
        }
    }
}

impl PooledSession {
    pub fn release(mut self) {
        if let Some(s) = self.session.take() {
            if !s.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(s);
            }
        }
    }
}

impl std::ops::Deref for PooledSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        self.session
            .as_ref()
            .expect("session present until release")
    }
}

impl std::ops::DerefMut for PooledSession {
    fn deref_mut(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("session present until release")
    }
}
