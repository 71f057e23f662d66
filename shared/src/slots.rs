//! Connection slots shared by every process of an installation (DESIGN.md invariant 6):
//! at most `per_account` connections to one account and `per_host` to one source host,
//! across all workers and the coordinator. Gmail allows 15 per account; a provider's
//! server may allow a few hundred per host.
//!
//! A slot is a member of a Redis sorted set (`P:slots:account:<host>:<port>:<login>`,
//! `P:slots:host:<host>`) scored by its expiry. Its process renews all the slots it
//! holds in one call every third of their time to live, so the slots of a process that
//! dies lapse by themselves; a slot is given back when its connection closes.
//!
//! A throttling answer from a server pauses the account it came for
//! (`P:slots:account:…:pause`, expiring after the server's suggested time or
//! `worker.throttle_pause_secs`): no process opens a connection to it meanwhile, and
//! every other account goes on.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control::now_ms;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::imap::pool::{ConnectionGate, Ticket};
use crate::redis_store::{store_error, RedisStore};

/// Takes a slot in both sets if both have room and the account is not paused. KEYS:
/// account set, host set, account pause. ARGV: holder, now ms, expiry ms, account cap,
/// host cap. Returns {'ok'}, {'paused', ms left}, or which cap is full.
const TAKE: &str = r#"
local left = redis.call('PTTL', KEYS[3])
if left > 0 then return {'paused', tostring(left)} end
for i = 1, 2 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[2]) end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return {'account'} end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {'host'} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {'ok'}
"#;

/// Renews slots (re-adding one that lapsed: its connection is still open and counts).
/// KEYS: account set, host set, account set, host set, ... ARGV: expiry ms, holders.
const RENEW: &str = r#"
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2 * i - 3], ARGV[1], ARGV[i])
  redis.call('ZADD', KEYS[2 * i - 2], ARGV[1], ARGV[i])
end
return 1
"#;

/// KEYS: account set, host set. ARGV: holder.
const GIVE_BACK: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"#;

/// The slots this process holds, and how to take more.
pub struct SharedSlots {
    store: RedisStore,
    per_account: u32,
    per_host: u32,
    ttl: Duration,
    /// How long an account pauses after a throttling answer that suggests no time.
    default_pause: Duration,
    process: String,
    /// holder → (account set, host set)
    held: Mutex<HashMap<String, (String, String)>>,
    /// Closes this process's idle connections to a host: called when a connection
    /// finds the host's cap full, so that connections idling for their own user's next
    /// job do not hold the slots other users wait for.
    evict_idle: Mutex<Option<Evictor>>,
}

/// See [`SharedSlots::on_host_full`].
pub type Evictor = Box<dyn Fn(&str) + Send + Sync>;

impl SharedSlots {
    /// Starts the renewal of the slots it will hold (a task that ends with the last
    /// reference).
    pub fn new(
        store: RedisStore,
        per_account: u32,
        per_host: u32,
        ttl: Duration,
        default_pause: Duration,
    ) -> Arc<Self> {
        let slots = Arc::new(SharedSlots {
            store,
            per_account: per_account.max(1),
            per_host: per_host.max(1),
            ttl,
            default_pause,
            process: format!("{}-{:08x}", std::process::id(), fastrand::u32(..)),
            held: Mutex::new(HashMap::new()),
            evict_idle: Mutex::new(None),
        });
        let weak = Arc::downgrade(&slots);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let Some(slots) = weak.upgrade() else { return };
                if let Err(e) = slots.renew().await {
                    tracing::warn!(error = %e, "could not renew the connection slots");
                }
            }
        });
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

    fn keys(&self, endpoint: &Endpoint, login: &str, host_cap: bool) -> (String, String) {
        let prefix = self.store.prefix.as_str();
        let account = format!(
            "{prefix}:slots:account:{}:{}:{login}",
            endpoint.host, endpoint.port
        );
        // Without the host cap, a set of the account's own stands in for the host's.
        let host = if host_cap {
            format!("{prefix}:slots:host:{}", endpoint.host)
        } else {
            format!("{account}:host")
        };
        (account, host)
    }

    async fn take(
        &self,
        account: &str,
        host: &str,
        holder: &str,
        host_cap: bool,
    ) -> Result<(String, u64), Error> {
        let mut conn = self.store.conn.clone();
        let now = now_ms();
        redis::Script::new(TAKE)
            .key(account)
            .key(host)
            .key(format!("{account}:pause"))
            .arg(holder)
            .arg(now)
            .arg(now + self.ttl.as_millis() as u64)
            .arg(self.per_account)
            .arg(if host_cap { self.per_host } else { u32::MAX })
            .invoke_async::<Vec<String>>(&mut conn)
            .await
            .map(|answer| {
                let left = answer.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
                (answer.into_iter().next().unwrap_or_default(), left)
            })
            .map_err(|e| store_error("slot script", e))
    }

    /// Pauses the account for `pause` (the server's hint) or the default.
    async fn pause(&self, account: &str, pause: Option<Duration>) -> Result<Duration, Error> {
        metrics::counter!(crate::telemetry::THROTTLE_PAUSES).increment(1);
        let pause = pause
            .unwrap_or(self.default_pause)
            .max(Duration::from_millis(100));
        let mut conn = self.store.conn.clone();
        redis::cmd("SET")
            .arg(format!("{account}:pause"))
            .arg(now_ms())
            .arg("PX")
            .arg(pause.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| store_error("SET", e))?;
        Ok(pause)
    }

    async fn renew(&self) -> Result<(), Error> {
        let held: Vec<(String, (String, String))> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(h, k)| (h.clone(), k.clone()))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut conn = self.store.conn.clone();
        let script = redis::Script::new(RENEW);
        let mut call = script.prepare_invoke();
        for (_, (account, host)) in &held {
            call.key(account).key(host);
        }
        call.arg(now_ms() + self.ttl.as_millis() as u64);
        for (holder, _) in &held {
            call.arg(holder);
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("slot script", e))?;
        Ok(())
    }

    fn give_back(self: Arc<Self>, holder: String) {
        let Some((account, host)) = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&holder)
        else {
            return;
        };
        // From a destructor: give it back in the background (without a runtime, at
        // process exit, the slot simply lapses).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut conn = self.store.conn.clone();
                let _ = redis::Script::new(GIVE_BACK)
                    .key(&account)
                    .key(&host)
                    .arg(&holder)
                    .invoke_async::<i64>(&mut conn)
                    .await;
            });
        }
    }
}

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
            let (account, host) = slots.keys(endpoint, login, self.host_cap);
            let holder = format!("{}-{:016x}", slots.process, fastrand::u64(..));
            let mut wait = Duration::from_millis(50);
            let mut waited = false;
            loop {
                let (answer, left) = slots.take(&account, &host, &holder, self.host_cap).await?;
                match answer.as_str() {
                    "ok" => break,
                    // Not waited out here: the job goes back to the queue for that long
                    // and the worker slot serves another account meanwhile.
                    "paused" => {
                        return Err(Error::Paused {
                            what: format!("{login} at {}", endpoint.host),
                            left: Duration::from_millis(left),
                        })
                    }
                    full => {
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
            slots
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(holder.clone(), (account, host));
            let slots = slots.clone();
            Ok(Ticket::new(move || slots.give_back(holder)))
        })
    }

    fn throttled<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        login: &'a str,
        hint: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let (account, _) = self.slots.keys(endpoint, login, self.host_cap);
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
