//! Connection slots shared by every process of an installation (DESIGN.md invariant 6):
//! at most `per_account` connections to one account and `per_host` to one source host,
//! across all workers and the coordinator. Gmail allows 15 per account; a provider's
//! server may allow a few hundred per host.
//!
//! Each process holds a *lease* on an account or a host: an entry `<process> <count>
//! <expiry ms>` in that account's or host's field of one hash, `P:slots` (fields
//! `a:<host>:<port>:<login>` and `h:<host>`; the expiry is on Redis's clock). A process
//! counts its own connections against its leases without asking Redis; it asks only for
//! more than it holds (a host's lease grows by a block at a time, so that opening
//! connections to a thousand accounts on one host costs a lease per account, not two
//! Redis calls per connection). Once every third of the time to live, one call renews
//! what is still in use and gives back what is not, so the leases of a process that dies
//! lapse by themselves.
//!
//! The asks of a process go through one writer task that sends together what came in
//! within a few milliseconds: one script reads the fields it needs once and writes them
//! once, whatever the number of asks, so that a planner or a worker opening connections
//! to many accounts at once costs Redis a few commands, not a few per account (issue 3's
//! Redis budget).
//!
//! A throttling answer from a server pauses the account it came for (a `!pause` entry
//! in its field, until the server's suggested time or `worker.throttle_pause_secs`): no
//! process opens a connection to it meanwhile, and every other account goes on.
//!
//! A field holds only live entries: each script drops the lapsed ones of the fields it
//! touches, and deletes a field left empty. A dead process's entry stays in its field,
//! harmless (its expiry has passed), until some process touches that account again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::domain::endpoint::Endpoint;
use crate::error::Error;
use crate::imap::pool::{ConnectionGate, Ticket};
use crate::redis::{scripts, store_error, RedisStore};

/// How long the writer waits for more asks after the first before sending them.
const LINGER: Duration = Duration::from_millis(3);
/// Asks sent at most in one script call (one request: a call stays small and quick).
const MAX_ASKS: usize = 200;

/// A lease of this process's on an account or a host.
#[derive(Debug, Default)]
struct Lease {
    /// Connections it allows this process (as last written to Redis).
    leased: u32,
    /// Connections of this process open now under it, and those asked for in the call
    /// in flight.
    open: u32,
    /// When it was last written (a lease written within a third of the time to live
    /// needs no renewal yet).
    written: Option<Instant>,
    /// Unused connections a renewal keeps while some are open: part of a block for a
    /// host, none for an account.
    spare: u32,
    /// The most connections open at once since the last renewal. While some are open,
    /// a host lease keeps that many (and the spare): a worker's users come and go, and
    /// a lease cut to what is open at the moment of the renewal was asked to grow
    /// again a few seconds later (a fifth of the worker's lease calls at 1,000 × 20).
    peak: u32,
    /// Holders of a [`Pinned`]: while there are any, a renewal keeps one connection
    /// of the lease even when none is open.
    pinned: u32,
}

impl Lease {
    /// What a renewal keeps of the lease: what is open, and while some is, a host's
    /// spare over the most it had open since the last renewal; one connection of a
    /// pinned lease with none open; else nothing. The peak starts again from what is
    /// open.
    fn kept_at_renewal(&mut self) -> u32 {
        let peak = std::mem::replace(&mut self.peak, self.open);
        if self.open > 0 {
            let want = if self.spare > 0 {
                self.open.max(peak) + self.spare
            } else {
                self.open
            };
            self.leased.min(want)
        } else if self.pinned > 0 {
            self.leased.min(1)
        } else {
            0
        }
    }
}

/// What Redis said to a connection's ask.
enum Verdict {
    Admitted,
    Paused(Duration),
    /// The account's or the host's cap is full ("account", "host").
    Full(&'static str),
}

/// A connection's ask, waiting for the writer.
struct Ask {
    account: String,
    host: Option<String>,
    /// The account's and the host's caps (see [`SharedSlots::caps`]).
    caps: (u32, u32),
    /// A connection opens under it (else it only grows the leases ahead of the
    /// connections: [`SharedSlots::prefetch`]).
    open: bool,
    reply: oneshot::Sender<Result<Verdict, Error>>,
}

/// The slots this process holds, and how to take more.
pub struct SharedSlots {
    store: RedisStore,
    /// The hash of every lease.
    key: String,
    per_account: u32,
    per_host: u32,
    /// How many connections a host lease grows by at a time: a thirty-second of the
    /// cap, so that thirty-two processes' spare never keeps the host from another.
    host_block: u32,
    ttl: Duration,
    /// How long an account pauses after a throttling answer that suggests no time.
    default_pause: Duration,
    process: String,
    /// This process's leases, by field.
    leases: Mutex<HashMap<String, Lease>>,
    /// To the writer task, which alone writes this process's leases: its calls go in
    /// order, so Redis never keeps a smaller number than the one its connections count
    /// on.
    asks: mpsc::UnboundedSender<Ask>,
    /// Closes this process's idle connections to a host: called when a connection
    /// finds the host's cap full, so that connections idling for their own user's next
    /// job do not hold the slots other users wait for.
    evict_idle: Mutex<Option<Evictor>>,
}

/// See [`SharedSlots::on_host_full`].
pub type Evictor = Box<dyn Fn(&str) + Send + Sync>;

impl SharedSlots {
    /// Starts the writer of the slots it will hold (a task that ends with the last
    /// reference).
    pub fn new(
        store: RedisStore,
        per_account: u32,
        per_host: u32,
        ttl: Duration,
        default_pause: Duration,
    ) -> Arc<Self> {
        let (asks, inbox) = mpsc::unbounded_channel();
        let slots = Arc::new(SharedSlots {
            key: format!("{}:slots", store.prefix),
            store,
            per_account: per_account.max(1),
            per_host: per_host.max(1),
            host_block: (per_host / 32).max(1),
            ttl,
            default_pause,
            process: format!("{}-{:08x}", std::process::id(), fastrand::u32(..)),
            leases: Mutex::new(HashMap::new()),
            asks,
            evict_idle: Mutex::new(None),
        });
        tokio::spawn(writer(Arc::downgrade(&slots), inbox, ttl / 3));
        slots
    }

    /// What to do when a host's cap is full: close this process's idle connections to
    /// it (the account directory that owns the pools sets this).
    pub fn on_host_full(&self, evict: Evictor) {
        *self.evict_idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(evict);
    }

    /// A gate for an endpoint's pools: `host_cap` applies the per-host cap (the
    /// source side), else only the per-account one.
    pub fn gate(self: &Arc<Self>, host_cap: bool) -> Arc<dyn ConnectionGate> {
        Arc::new(SlotGate {
            slots: self.clone(),
            host_cap,
        })
    }

    /// The caps on one account and on the host of `endpoint`: the installation's, or the
    /// endpoint's own where it has lower ones (a provider's limit, a small server).
    fn caps(&self, endpoint: &Endpoint) -> (u32, u32) {
        let lower = |own: Option<u32>, installation: u32| {
            own.map_or(installation, |o| o.min(installation)).max(1)
        };
        (
            lower(endpoint.max_connections, self.per_account),
            lower(endpoint.max_host_connections, self.per_host),
        )
    }

    /// The account's lease field, and the host's when the host cap applies.
    fn fields(endpoint: &Endpoint, login: &str, host_cap: bool) -> (String, Option<String>) {
        let account = format!("a:{}:{}:{login}", endpoint.host, endpoint.port);
        let host = host_cap.then(|| format!("h:{}", endpoint.host));
        (account, host)
    }

    /// Counts a connection against this process's leases if they have room.
    fn open_locally(&self, account: &str, host: Option<&str>) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        open_within(&mut leases, account, host)
    }

    /// Asks the writer for a connection to the account (and the host).
    async fn take(
        &self,
        account: &str,
        host: Option<&str>,
        caps: (u32, u32),
    ) -> Result<Verdict, Error> {
        self.ask(account, host, caps, true).await
    }

    /// Hands an ask to the writer at once; the answer comes when awaited.
    fn ask(
        &self,
        account: &str,
        host: Option<&str>,
        caps: (u32, u32),
        open: bool,
    ) -> impl Future<Output = Result<Verdict, Error>> + 'static {
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            account: account.to_string(),
            host: host.map(str::to_string),
            caps,
            open,
            reply,
        };
        let sent = self.asks.send(ask).is_ok();
        async move {
            let stopped = || Error::Store("the connection-lease writer has stopped".into());
            if !sent {
                return Err(stopped());
            }
            answer.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// Grows this process's leases by a connection on each account (and its host, for
    /// `host_cap`) that has no room left, in one call, ahead of the connections about
    /// to open: a user's pools ask for both sides at once, not once per side, and a
    /// delivery's users all at once.
    ///
    /// Each account's lease stays while its [`Pinned`] (one per entry, in order) is
    /// held, even with no connection open: a delivery's users run one after another,
    /// and a lease given back at a renewal before its user's turn would be asked for
    /// again on its own. The host's lease is not pinned: the host cap counts open
    /// connections, and waiting users must not hold them from other processes. A host
    /// lease, or an account lease no longer pinned, that nobody opens under is given
    /// back at the next renewal; a lease the caps refuse is asked for again, and
    /// waited for, when its connection opens.
    pub async fn prefetch(self: &Arc<Self>, accounts: &[(&Endpoint, &str, bool)]) -> Vec<Pinned> {
        let mut pins = Vec::with_capacity(accounts.len());
        let mut asks = Vec::with_capacity(accounts.len());
        for (endpoint, login, host_cap) in accounts {
            let (account, host) = Self::fields(endpoint, login, *host_cap);
            // Pinned before asking: a renewal between the answer and the pin would
            // give the new lease back.
            pins.push(self.pin(&account));
            asks.push(self.ask(&account, host.as_deref(), self.caps(endpoint), false));
        }
        for ask in asks {
            let _ = ask.await;
        }
        pins
    }

    fn pin(self: &Arc<Self>, account: &str) -> Pinned {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        leases.entry(account.to_string()).or_default().pinned += 1;
        Pinned {
            slots: Arc::downgrade(self),
            account: account.to_string(),
        }
    }

    /// Sends asks in one call and answers each. An ask that the leases grown since can
    /// admit is admitted without asking; each other one is counted at once (so that no
    /// connection of the process takes the room it asks for meanwhile, and two asks for
    /// one account ask for one and two more) and uncounted if refused.
    async fn send(&self, asks: Vec<Ask>) {
        struct Asked {
            ask: Ask,
            want: u32,
            host_min: u32,
        }
        let mut asked = Vec::new();
        {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            for ask in asks {
                if open_within(&mut leases, &ask.account, ask.host.as_deref()) {
                    admit(&mut leases, ask);
                    continue;
                }
                let acc = leases.entry(ask.account.clone()).or_default();
                acc.open += 1;
                acc.peak = acc.peak.max(acc.open);
                let want = acc.open.max(acc.leased);
                let host_min = match &ask.host {
                    Some(h) => {
                        let lease = leases.entry(h.clone()).or_insert_with(|| Lease {
                            spare: self.host_block - 1,
                            ..Lease::default()
                        });
                        lease.open += 1;
                        lease.peak = lease.peak.max(lease.open);
                        if lease.open <= lease.leased {
                            0 // the host's lease has room: not asked for
                        } else {
                            lease.open
                        }
                    }
                    None => 0,
                };
                asked.push(Asked {
                    ask,
                    want,
                    host_min,
                });
            }
        }
        if asked.is_empty() {
            return;
        }
        let req = scripts::TakeRequest {
            process: &self.process,
            ttl_ms: self.ttl.as_millis() as u64,
            asks: asked
                .iter()
                .map(|a| {
                    let host = a.ask.host.as_deref().filter(|_| a.host_min > 0);
                    let (account_cap, host_cap) = a.ask.caps;
                    scripts::TakeAsk {
                        account: &a.ask.account,
                        want: a.want,
                        account_cap,
                        host: host.unwrap_or(""),
                        host_min: a.host_min,
                        host_max: a.host_min.saturating_sub(1) + self.host_block,
                        host_cap,
                    }
                })
                .collect(),
        };
        let mut call = scripts::SLOTS_TAKE.key(&self.key);
        match super::control::json(&req) {
            Ok(text) => call.arg(text),
            Err(e) => {
                let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
                for a in asked {
                    uncount(&mut leases, &a.ask.account, a.ask.host.as_deref());
                    let _ = a.ask.reply.send(Err(Error::Store(e.to_string())));
                }
                return;
            }
        };
        let answers: Result<Vec<String>, Error> = call
            .invoke_async(&mut self.store.conn.clone())
            .await
            .map_err(|e| store_error("slot script", e));
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let answers = match answers {
            Ok(a) if a.len() == 2 * asked.len() => a,
            other => {
                // Every ask shares the failure (the error's text: an Error is not Clone).
                let why = match other {
                    Err(Error::Store(why)) => why,
                    Err(e) => e.to_string(),
                    Ok(_) => "the slot script answered a different number of asks".into(),
                };
                for a in asked {
                    uncount(&mut leases, &a.ask.account, a.ask.host.as_deref());
                    let _ = a.ask.reply.send(Err(Error::Store(why.clone())));
                }
                return;
            }
        };
        for (a, pair) in asked.into_iter().zip(answers.chunks(2)) {
            let number: u64 = pair[1].parse().unwrap_or(0);
            let verdict = match pair[0].as_str() {
                "ok" => Verdict::Admitted,
                "paused" => Verdict::Paused(Duration::from_millis(number)),
                "host" => Verdict::Full("host"),
                _ => Verdict::Full("account"),
            };
            if matches!(verdict, Verdict::Admitted) {
                let acc = leases.entry(a.ask.account.clone()).or_default();
                acc.leased = acc.leased.max(a.want);
                acc.written = Some(now);
                if let (Some(h), true) = (&a.ask.host, a.host_min > 0) {
                    let lease = leases.entry(h.clone()).or_default();
                    lease.leased = lease.leased.max(number as u32);
                    lease.written = Some(now);
                }
                admit(&mut leases, a.ask);
            } else {
                uncount(&mut leases, &a.ask.account, a.ask.host.as_deref());
                let _ = a.ask.reply.send(Ok(verdict));
            }
        }
    }

    /// Pauses the account for `pause` (the server's hint) or the default.
    async fn pause(&self, account: &str, pause: Option<Duration>) -> Result<Duration, Error> {
        metrics::counter!(crate::telemetry::THROTTLE_PAUSES).increment(1);
        let pause = pause
            .unwrap_or(self.default_pause)
            .max(Duration::from_millis(100));
        let mut conn = self.store.conn.clone();
        scripts::SLOTS_PAUSE
            .key(&self.key)
            .arg(account)
            .arg(pause.as_millis() as u64)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("pause script", e))?;
        Ok(pause)
    }

    /// Renews the leases in use that were written a third of their time to live ago,
    /// and gives back what no connection uses (a host keeps a block spare over the
    /// most connections it had open since the last renewal): one call.
    async fn renew(&self) -> Result<(), Error> {
        let due: Vec<(String, u32)> = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let mut due = Vec::new();
            for (key, lease) in leases.iter_mut() {
                let keep = lease.kept_at_renewal();
                // (Renewed every third of the time to live, a lease written a sixth ago
                // is renewed now: none reaches half its life without a renewal.)
                let old = lease
                    .written
                    .is_none_or(|w| now.duration_since(w) >= self.ttl / 6);
                if keep != lease.leased || (keep > 0 && old) {
                    lease.leased = keep;
                    lease.written = Some(now);
                    due.push((key.clone(), keep));
                }
            }
            leases.retain(|_, l| l.leased > 0 || l.open > 0 || l.pinned > 0);
            due
        };
        if due.is_empty() {
            return Ok(());
        }
        let mut conn = self.store.conn.clone();
        let mut call = scripts::SLOTS_SET.key(&self.key);
        call.arg(&self.process).arg(self.ttl.as_millis() as u64);
        for (field, n) in &due {
            call.arg(field).arg(*n);
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("slot script", e))?;
        Ok(())
    }

    /// A connection closed: its count goes; the lease waits for the next renewal, which
    /// gives back what is unused (another connection may take it meanwhile).
    fn close(&self, account: &str, host: Option<&str>) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        for key in std::iter::once(account).chain(host) {
            if let Some(l) = leases.get_mut(key) {
                l.open = l.open.saturating_sub(1);
            }
        }
    }
}

/// Keeps an account's lease of this process's while held ([`SharedSlots::prefetch`]).
pub struct Pinned {
    slots: Weak<SharedSlots>,
    account: String,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        let mut leases = slots.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = leases.get_mut(&self.account) {
            l.pinned = l.pinned.saturating_sub(1);
        }
    }
}

/// Counts a connection against the leases if both have room.
fn open_within(leases: &mut HashMap<String, Lease>, account: &str, host: Option<&str>) -> bool {
    let fits = |key: &str, leases: &HashMap<String, Lease>| {
        leases.get(key).is_some_and(|l| l.open < l.leased)
    };
    if !fits(account, leases) || host.is_some_and(|h| !fits(h, leases)) {
        return false;
    }
    for key in std::iter::once(account).chain(host) {
        if let Some(l) = leases.get_mut(key) {
            l.open += 1;
            l.peak = l.peak.max(l.open);
        }
    }
    true
}

/// Takes back an ask's count.
fn uncount(leases: &mut HashMap<String, Lease>, account: &str, host: Option<&str>) {
    for key in std::iter::once(account).chain(host) {
        if let Some(l) = leases.get_mut(key) {
            l.open = l.open.saturating_sub(1);
        }
    }
}

/// Answers an admitted ask; if no connection opens under it (a prefetch, or a
/// connection that gave up waiting meanwhile), its count goes back and the lease stays.
fn admit(leases: &mut HashMap<String, Lease>, ask: Ask) {
    if ask.reply.send(Ok(Verdict::Admitted)).is_err() || !ask.open {
        uncount(leases, &ask.account, ask.host.as_deref());
    }
}

/// The one writer of a process's leases: sends the asks that came in together, and
/// renews every `renew_every`. Ends with the last reference to the slots.
async fn writer(
    slots: Weak<SharedSlots>,
    mut inbox: mpsc::UnboundedReceiver<Ask>,
    renew_every: Duration,
) {
    let mut renewal = tokio::time::interval(renew_every);
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renewal.tick().await;
    loop {
        tokio::select! {
            ask = inbox.recv() => {
                let Some(ask) = ask else { return };
                let mut asks = vec![ask];
                let until = tokio::time::Instant::now() + LINGER;
                while asks.len() < MAX_ASKS {
                    match tokio::time::timeout_at(until, inbox.recv()).await {
                        Ok(Some(ask)) => asks.push(ask),
                        _ => break,
                    }
                }
                let Some(slots) = slots.upgrade() else { return };
                slots.send(asks).await;
            }
            _ = renewal.tick() => {
                let Some(slots) = slots.upgrade() else { return };
                if let Err(e) = slots.renew().await {
                    tracing::warn!(error = %e, "could not renew the connection leases");
                }
            }
        }
    }
}

/// Why an account is paused, as every process reads it in Redis.
const PAUSED_WHY: &str =
    "after the server's throttling answer or with its daily download budget used up";

struct SlotGate {
    slots: Arc<SharedSlots>,
    host_cap: bool,
}

impl ConnectionGate for SlotGate {
    fn admit<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Ticket, Error>> + Send + 'a>> {
        Box::pin(async move {
            let slots = &self.slots;
            let (account, host) = SharedSlots::fields(endpoint, login, self.host_cap);
            let mut wait = Duration::from_millis(50);
            let mut waited = false;
            loop {
                if slots.open_locally(&account, host.as_deref()) {
                    break;
                }
                match slots
                    .take(&account, host.as_deref(), slots.caps(endpoint))
                    .await?
                {
                    Verdict::Admitted => break,
                    // Not waited out here: the job goes back to the queue for that long
                    // and the worker slot serves another account meanwhile.
                    Verdict::Paused(left) => {
                        return Err(Error::Paused {
                            what: format!("{login} at {}", endpoint.host),
                            why: PAUSED_WHY.into(),
                            left,
                        })
                    }
                    Verdict::Full(full) => {
                        if full == "host" {
                            if let Some(evict) =
                                &*slots.evict_idle.lock().unwrap_or_else(|e| e.into_inner())
                            {
                                evict(&endpoint.host);
                            }
                        }
                        if !waited {
                            let scope = if full == "host" { "host" } else { "account" };
                            metrics::counter!(crate::telemetry::SLOT_WAITS, "scope" => scope)
                                .increment(1);
                            tracing::debug!(host = %endpoint.host, cap = full, "waiting for a connection slot");
                            waited = true;
                        }
                        tokio::time::sleep(wait.mul_f64(0.5 + fastrand::f64())).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
            let slots = Arc::downgrade(slots);
            Ok(Ticket::new(move || {
                if let Some(slots) = slots.upgrade() {
                    slots.close(&account, host.as_deref());
                }
            }))
        })
    }

    fn spend<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
        bytes: u64,
        budget: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>> {
        Box::pin(async move {
            let (account, _) = SharedSlots::fields(endpoint, login, self.host_cap);
            let (day, left) = crate::domain::budget::utc_day();
            let key = format!("{}:spent:{day}:{account}", self.slots.store.prefix);
            let mut conn = self.slots.store.conn.clone();
            let (spent, _): (u64, i64) = redis::pipe()
                .atomic()
                .incr(&key, bytes)
                .expire(&key, 2 * 86_400)
                .query_async(&mut conn)
                .await
                .map_err(|e| store_error("download budget", e))?;
            if spent < budget {
                return Ok(());
            }
            // Every process stops connecting to the account until the day is over.
            let _ = self.slots.pause(&account, Some(left)).await;
            Err(crate::domain::budget::used_up(
                endpoint, login, budget, left,
            ))
        })
    }

    fn throttled<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
        hint: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let (account, _) = SharedSlots::fields(endpoint, login, self.host_cap);
            match self.slots.pause(&account, hint).await {
                Ok(pause) => tracing::warn!(
                    host = %endpoint.host,
                    pause_ms = pause.as_millis() as u64,
                    "the server throttles this account: pausing it"
                ),
                Err(e) => tracing::warn!(error = %e, "could not record the account's pause"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Lease;

    #[test]
    fn a_host_lease_keeps_its_recent_peak_and_an_account_lease_what_is_open() {
        // a host (block 4, spare 3): 9 connections open at the peak, 2 now
        let mut host = Lease {
            leased: 12,
            open: 2,
            peak: 9,
            spare: 3,
            ..Lease::default()
        };
        assert_eq!(host.kept_at_renewal(), 12, "the peak and the spare");
        host.leased = 12;
        assert_eq!(
            host.kept_at_renewal(),
            5,
            "the next renewal: 2 open and the spare"
        );
        host.open = 0;
        assert_eq!(host.kept_at_renewal(), 0, "none open: all goes back");
        // an account: no spare, the peak does not count
        let mut account = Lease {
            leased: 3,
            open: 1,
            peak: 3,
            ..Lease::default()
        };
        assert_eq!(account.kept_at_renewal(), 1);
        account.open = 0;
        account.pinned = 1;
        assert_eq!(account.kept_at_renewal(), 1, "a pinned lease keeps one");
    }
}
