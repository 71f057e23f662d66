//! Connections to one account, capped and reused. Every job of the account draws from
//! the same pool, so "at most N connections per account" holds however many folders are
//! copied at once, and a job after the first pays no connect or login round trips.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::client::{connect, Limits, Session};
use crate::domain::endpoint::Endpoint;
use crate::domain::login::Credentials;
use crate::error::Error;

pub struct Pool {
    endpoint: Endpoint,
    credentials: Credentials,
    limits: Limits,
    /// Idle connections, each with the ticket that admitted it and when it went idle.
    idle: Mutex<Vec<(Session, Ticket, Instant)>>,
    slots: Arc<Semaphore>,
    max: usize,
    /// Admits each new connection against caps shared with other processes.
    gate: Option<Arc<dyn ConnectionGate>>,
    /// Without a gate: the UTC day and the bytes downloaded from the account that day,
    /// for the endpoint's daily budget.
    spent: Mutex<(u64, u64)>,
}

/// Admission of a new connection beyond this process: the cluster's connection caps
/// per account and per host, shared through Redis ([`crate::redis::slots`]).
pub trait ConnectionGate: Send + Sync + 'static {
    /// Waits until a connection to `login` at `endpoint` may be opened.
    fn admit<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Ticket, Error>> + Send + 'a>>;

    /// The server answered a connection of this account with throttling: pause the
    /// account (for `hint`, the server's suggested time, if it gave one).
    fn throttled<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
        hint: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// Counts `bytes` downloaded from the account today against its daily `budget`,
    /// across processes; at the budget, pauses the account until the day is over and
    /// answers [`Error::Paused`].
    fn spend<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
        bytes: u64,
        budget: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;
}

/// Held as long as its connection is open; gives the slot back when dropped.
pub struct Ticket(Option<Box<dyn FnOnce() + Send>>);

impl Ticket {
    pub fn new(give_back: impl FnOnce() + Send + 'static) -> Self {
        Ticket(Some(Box::new(give_back)))
    }

    /// For a connection no gate admitted.
    pub fn none() -> Self {
        Ticket(None)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(give_back) = self.0.take() {
            give_back();
        }
    }
}

/// A new connection, logged in. An OAuth2 login asks the account's token source for a
/// token; a token the server refuses is dropped and the login tried once more, on a new
/// connection, with a freshly fetched one (a token revoked, or expired early, before
/// its time). A second refusal is the answer.
pub async fn connect_and_log_in(
    endpoint: &Endpoint,
    limits: Limits,
    credentials: &Credentials,
) -> Result<Session, Error> {
    let mut session = connect(endpoint, limits).await?;
    let Some(tokens) = &credentials.tokens else {
        session.authenticate(credentials).await?;
        return Ok(session);
    };
    let token = tokens.token().await?;
    match session
        .authenticate_bearer(&credentials.login, &token, tokens.mechanism())
        .await
    {
        Err(Error::AuthRejected { .. }) => {
            tokens.refused(&token).await;
            let fresh = tokens.token().await?;
            drop(session);
            let mut session = connect(endpoint, limits).await?;
            session
                .authenticate_bearer(&credentials.login, &fresh, tokens.mechanism())
                .await
                .map_err(|e| match e {
                    Error::AuthRejected { server_says } => Error::AuthRejected {
                        server_says: format!(
                            "{server_says} (twice, the second time with a token fetched just \
                             before: the token endpoint grants tokens this server does not \
                             accept for {}; check the app's permissions on the mailbox)",
                            credentials.login
                        ),
                    },
                    e => e,
                })?;
            Ok(session)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(session),
    }
}

/// A session on loan from a pool. Give it back with [`release`](Self::release) when the
/// command stream is in a clean state; dropping it instead closes the connection (the
/// safe choice after any error).
pub struct PooledSession {
    session: Option<Session>,
    ticket: Option<Ticket>,
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
        Pool::gated(endpoint, credentials, limits, max, None)
    }

    /// A pool whose new connections `gate` admits too (the cluster's shared caps).
    pub fn gated(
        endpoint: Endpoint,
        credentials: Credentials,
        limits: Limits,
        max: usize,
        gate: Option<Arc<dyn ConnectionGate>>,
    ) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Pool {
            endpoint,
            credentials,
            limits,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max)),
            max,
            gate,
            spent: Mutex::new((0, 0)),
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
                Some((s, _, _)) if s.is_closed() => continue,
                Some((s, ticket, _)) => {
                    return Ok(PooledSession {
                        session: Some(s),
                        ticket: Some(ticket),
                        pool: self.clone(),
                        _slot: slot,
                    })
                }
                None => break,
            }
        }
        let ticket = match &self.gate {
            Some(gate) => gate.admit(&self.endpoint, &self.credentials.login).await?,
            None => Ticket::none(),
        };
        // (A failed connect or login drops the ticket: the slot goes back.)
        let session = connect_and_log_in(&self.endpoint, self.limits, &self.credentials).await?;
        Ok(PooledSession {
            session: Some(session),
            ticket: Some(ticket),
            pool: self.clone(),
            _slot: slot,
        })
    }

    /// Counts message bytes downloaded from the account against its endpoint's daily
    /// download budget (`Endpoint::daily_download_bytes`; a provider's allowance, as
    /// Gmail's 2.5 GB a day), through the gate across processes where there is one, in
    /// this pool otherwise. Call it with 0 before copying: at the budget it answers
    /// [`Error::Paused`] until the UTC day is over, and a job goes back to wait.
    pub async fn spend(&self, bytes: u64) -> Result<(), Error> {
        let Some(budget) = self.endpoint.daily_download_bytes else {
            return Ok(());
        };
        if let Some(gate) = &self.gate {
            return gate
                .spend(&self.endpoint, &self.credentials.login, bytes, budget)
                .await;
        }
        let (day, left) = crate::domain::budget::utc_day();
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        if spent.0 != day {
            *spent = (day, 0);
        }
        spent.1 = spent.1.saturating_add(bytes);
        if spent.1 < budget {
            return Ok(());
        }
        Err(crate::domain::budget::used_up(
            &self.endpoint,
            &self.credentials.login,
            budget,
            left,
        ))
    }

    /// Reports a throttling answer the account got (a refused login, a NO [UNAVAILABLE]
    /// to a command), so that no process connects to it until the pause is over.
    pub async fn report_throttled(&self, hint: Option<Duration>) {
        if let Some(gate) = &self.gate {
            gate.throttled(&self.endpoint, &self.credentials.login, hint)
                .await;
        }
    }

    /// Logs out every idle connection.
    pub async fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for (s, ticket, _) in idle {
            s.logout().await;
            drop(ticket);
        }
    }

    /// Logs out the connections idle for longer than `linger`.
    pub async fn close_idle_since(&self, linger: Duration) {
        let stale: Vec<(Session, Ticket, Instant)> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (stale, fresh) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|(_, _, since)| since.elapsed() >= linger);
            *idle = fresh;
            stale
        };
        for (s, ticket, _) in stale {
            s.logout().await;
            drop(ticket);
        }
    }

    /// Connections lent out now or idle: none means the pool can be dropped.
    pub fn is_unused(&self) -> bool {
        self.slots.available_permits() == self.max
            && self
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }
}

impl PooledSession {
    pub fn release(mut self) {
        if let (Some(s), Some(ticket)) = (self.session.take(), self.ticket.take()) {
            if !s.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((s, ticket, Instant::now()));
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
