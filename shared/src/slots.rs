//! Connection slots shared by every process of an installation (DESIGN.md invariant 6):
//! at most `per_account` connections to one account and `per_host` to one source host,
//! across all workers and the coordinator. Gmail allows 15 per account; a provider's
//! server may allow a few hundred per host.
//!
//! Each process holds a *lease* on an account (`P:slots:account:<host>:<port>:<login>`)
//! or a host (`P:slots:host:<host>`): a field of that hash, `<process>` → `<count>
//! <expiry ms>`, on Redis's clock. A process counts its own connections against its
//! leases without asking Redis; it asks only for more than it holds (a host's lease
//! grows by a block at a time, so that opening connections to a thousand accounts on
//! one host costs a lease per account, not two Redis calls per connection). Once every
//! third of the time to live, one call renews what is still in use and gives back what
//! is not, so the leases of a process that dies lapse by themselves.
//!
//! A throttling answer from a server pauses the account it came for (the hash's `pause`
//! field, until the server's suggested time or `worker.throttle_pause_secs`): no process
//! opens a connection to it meanwhile, and every other account goes on.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::imap::pool::{ConnectionGate, Ticket};
use crate::redis_store::{store_error, RedisStore};

/// The time (ms) and a lease hash's other holders. KEYS/ARGV per script.
const COMMON: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function at(v)
  local sp = string.find(v, ' ', 1, true)
  return tonumber(string.sub(v, 1, sp - 1)), tonumber(string.sub(v, sp + 1))
end
-- Sum of the other processes' live leases, the pause, and the lapsed leases removed.
local function others(key, me)
  local all = redis.call('HGETALL', key)
  local sum, pause, lapsed = 0, 0, {}
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if f == 'pause' then
      pause = tonumber(v)
    elseif f ~= me then
      local n, expiry = at(v)
      if expiry > now then sum = sum + n else table.insert(lapsed, f) end
    end
  end
  if #lapsed > 0 then redis.call('HDEL', key, unpack(lapsed)) end
  return sum, pause
end
"#;

/// Grows this process's lease on an account to `want` connections (and on the host to
/// between `host min` and `host max`, when `host min` > 0) if the other processes'
/// leases leave room and the account is not paused.
/// KEYS: account hash, host hash. ARGV: process, ttl ms, account cap, want, host cap,
/// host min, host max. Returns {'ok', host lease}, {'paused', ms left}, or which cap
/// is full.
const TAKE: &str = r#"
local me, ttl = ARGV[1], tonumber(ARGV[2])
local taken, pause = others(KEYS[1], me)
if pause > now then return {'paused', tostring(pause - now)} end
local want = tonumber(ARGV[4])
if taken + want > tonumber(ARGV[3]) then return {'account'} end
local host = 0
local host_min = tonumber(ARGV[6])
if host_min > 0 then
  local room = tonumber(ARGV[5]) - others(KEYS[2], me)
  if room < host_min then return {'host'} end
  host = math.min(room, tonumber(ARGV[7]))
  redis.call('HSET', KEYS[2], me, host .. ' ' .. string.format('%.0f', now + ttl))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('HSET', KEYS[1], me, want .. ' ' .. string.format('%.0f', now + ttl))
redis.call('PEXPIRE', KEYS[1], math.max(ttl, pause - now))
return {'ok', tostring(host)}
"#;

/// Sets this process's leases: KEYS the hashes, ARGV process, ttl ms, then a count per
/// key (0 gives the lease back).
const SET_LEASES: &str = r#"
local me, ttl = ARGV[1], tonumber(ARGV[2])
local value = ' ' .. string.format('%.0f', now + ttl)
for i = 1, #KEYS do
  local n = tonumber(ARGV[2 + i])
  if n > 0 then
    redis.call('HSET', KEYS[i], me, n .. value)
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  else
    redis.call('HDEL', KEYS[i], me)
  end
end
return 1
"#;

/// Pauses an account: KEYS the account hash, ARGV the pause in ms.
const PAUSE: &str = r#"
local until_ = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'pause', string.format('%.0f', until_))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"#;

static TAKE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{COMMON}{TAKE}")));
static SET_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{COMMON}{SET_LEASES}")));
static PAUSE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{COMMON}{PAUSE}")));

/// A lease of this process's on an account or a host.
#[derive(Debug, Default)]
struct Lease {
    /// Connections it allows this process (as last written to Redis).
    leased: u32,
    /// Connections of this process open now under it.
    open: u32,
    /// When it was last written (a lease written within a third of the time to live
    /// needs no renewal yet).
    written: Option<Instant>,
    /// Unused connections a renewal keeps while some are open: part of a block for a
    /// host, none for an account.
    spare: u32,
}

/// The slots this process holds, and how to take more.
pub struct SharedSlots {
    store: RedisStore,
    per_account: u32,
    per_host: u32,
    /// How many connections a host lease grows by at a time: a thirty-second of the
    /// cap, so that thirty-two processes' spare never keeps the host from another.
    host_block: u32,
    ttl: Duration,
    /// How long an account pauses after a throttling answer that suggests no time.
    default_pause: Duration,
    process: String,
    /// This process's leases, by hash key.
    leases: Mutex<HashMap<String, Lease>>,
    /// Held while a lease is written to Redis: the writes of one process go in order,
    /// so Redis never keeps a smaller number than the one its connections count on.
    writes: tokio::sync::Mutex<()>,
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
            host_block: (per_host / 32).max(1),
            ttl,
            default_pause,
            process: format!("{}-{:08x}", std::process::id(), fastrand::u32(..)),
            leases: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            evict_idle: Mutex::new(None),
        });
        let weak = Arc::downgrade(&slots);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let Some(slots) = weak.upgrade() else { return };
                if let Err(e) = slots.renew().await {
                    tracing::warn!(error = %e, "could not renew the connection leases");
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

    /// The account's lease hash, and the host's when the host cap applies.
    fn keys(&self, endpoint: &Endpoint, login: &str, host_cap: bool) -> (String, Option<String>) {
        let prefix = self.store.prefix.as_str();
        let account = format!(
            "{prefix}:slots:account:{}:{}:{login}",
            endpoint.host, endpoint.port
        );
        let host = host_cap.then(|| format!("{prefix}:slots:host:{}", endpoint.host));
        (account, host)
    }

    /// Counts a connection against this process's leases if they have room.
    fn open_locally(&self, account: &str, host: Option<&str>) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |key: &str, leases: &HashMap<String, Lease>| {
            leases.get(key).is_some_and(|l| l.open < l.leased)
        };
        if !fits(account, &leases) || host.is_some_and(|h| !fits(h, &leases)) {
            return false;
        }
        for key in std::iter::once(account).chain(host) {
            if let Some(l) = leases.get_mut(key) {
                l.open += 1;
            }
        }
        true
    }

    /// Asks Redis for one more connection than this process has open to the account
    /// (and, when the host's lease is used up, for a block more of the host).
    async fn take(&self, account: &str, host: Option<&str>) -> Result<(String, u64), Error> {
        let _writing = self.writes.lock().await;
        // Another connection's call may have grown the leases while this one waited.
        if self.open_locally(account, host) {
            return Ok(("ok".to_string(), 0));
        }
        // This connection is counted at once (so that no other connection of the
        // process can take the room it asks for meanwhile) and uncounted if refused.
        let (want, host_min, host_max, host_reserved) = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let acc = leases.entry(account.to_string()).or_default();
            acc.open += 1;
            let want = acc.open.max(acc.leased);
            let (host_min, host_max, host_reserved) = match host {
                Some(h) => {
                    let lease = leases.entry(h.to_string()).or_insert_with(|| Lease {
                        spare: self.host_block - 1,
                        ..Lease::default()
                    });
                    if lease.open < lease.leased {
                        lease.open += 1;
                        (0, 0, true) // the host's lease has room: not asked for
                    } else {
                        (lease.open + 1, lease.open + self.host_block, false)
                    }
                }
                None => (0, 0, false),
            };
            (want, host_min, host_max, host_reserved)
        };
        let answer: Result<Vec<String>, Error> = TAKE_SCRIPT
            .key(account)
            .key(host.unwrap_or(account))
            .arg(&self.process)
            .arg(self.ttl.as_millis() as u64)
            .arg(self.per_account)
            .arg(want)
            .arg(self.per_host)
            .arg(host_min)
            .arg(host_max)
            .invoke_async(&mut self.store.conn.clone())
            .await
            .map_err(|e| store_error("slot script", e));
        let (verdict, number) = match &answer {
            Ok(a) => (
                a.first().cloned().unwrap_or_default(),
                a.get(1).and_then(|n| n.parse().ok()).unwrap_or(0),
            ),
            Err(_) => (String::new(), 0),
        };
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if verdict == "ok" {
            let acc = leases.entry(account.to_string()).or_default();
            acc.leased = want;
            acc.written = Some(now);
            if let Some(h) = host {
                let lease = leases.entry(h.to_string()).or_default();
                if !host_reserved {
                    lease.leased = number as u32;
                    lease.written = Some(now);
                    lease.open += 1;
                }
            }
        } else {
            for key in std::iter::once(account).chain(host.filter(|_| host_reserved)) {
                if let Some(l) = leases.get_mut(key) {
                    l.open = l.open.saturating_sub(1);
                }
            }
        }
        drop(leases);
        answer?;
        Ok((verdict, number))
    }

    /// Pauses the account for `pause` (the server's hint) or the default.
    async fn pause(&self, account: &str, pause: Option<Duration>) -> Result<Duration, Error> {
        metrics::counter!(crate::telemetry::THROTTLE_PAUSES).increment(1);
        let pause = pause
            .unwrap_or(self.default_pause)
            .max(Duration::from_millis(100));
        let mut conn = self.store.conn.clone();
        PAUSE_SCRIPT
            .key(account)
            .arg(pause.as_millis() as u64)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| store_error("pause script", e))?;
        Ok(pause)
    }

    /// Renews the leases in use that were written a third of their time to live ago,
    /// and gives back what no connection uses (a host keeps a block spare): one call.
    async fn renew(&self) -> Result<(), Error> {
        let _writing = self.writes.lock().await;
        let due: Vec<(String, u32)> = {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let mut due = Vec::new();
            for (key, lease) in leases.iter_mut() {
                let keep = if lease.open == 0 {
                    0
                } else {
                    lease.leased.min(lease.open + lease.spare)
                };
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
            leases.retain(|_, l| l.leased > 0 || l.open > 0);
            due
        };
        if due.is_empty() {
            return Ok(());
        }
        let mut conn = self.store.conn.clone();
        let mut call = SET_SCRIPT.prepare_invoke();
        for (key, _) in &due {
            call.key(key);
        }
        call.arg(&self.process).arg(self.ttl.as_millis() as u64);
        for (_, n) in &due {
            call.arg(*n);
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
            let mut wait = Duration::from_millis(50);
            let mut waited = false;
            loop {
                if slots.open_locally(&account, host.as_deref()) {
                    break;
                }
                let (answer, left) = slots.take(&account, host.as_deref()).await?;
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
            let slots = Arc::downgrade(slots);
            Ok(Ticket::new(move || {
                if let Some(slots) = slots.upgrade() {
                    slots.close(&account, host.as_deref());
                }
            }))
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
