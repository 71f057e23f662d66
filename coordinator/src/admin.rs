//! The admin's side of the cluster mode: storing a batch (endpoints, users, sealed
//! secrets), recording what the admin asks for (start, stop, sync now, close, the
//! interval), and each user's status rolled up from what the coordinator and the
//! workers record. Only Redis is needed: the coordinator process ([`crate::scheduler`])
//! acts on these records.

use std::collections::BTreeMap;

use mailferry_shared::config::seal::{Binding, Keyring};
use mailferry_shared::config::settings::{Settings, MIN_SYNC_INTERVAL_SECS};
use mailferry_shared::domain::batch::{BatchRecord, UserRecord};
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::progress::Counter;
use mailferry_shared::domain::status::{
    roll_up, Intent, JobState, MessageCounts, UserStatus, UserView,
};
use mailferry_shared::error::Side;
use mailferry_shared::redis::control::PassRecord;
use mailferry_shared::redis::directory::endpoint_seal_scope;
use mailferry_shared::redis::RedisStore;
use mailferry_shared::Error;

use crate::embedded::UserSpec;

pub struct Cluster {
    pub(crate) settings: Settings,
    pub(crate) store: RedisStore,
    pub(crate) keys: std::sync::Arc<Keyring>,
}

/// What the admin asks of users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    SyncNow,
    Close,
}

/// One user's line of `batch status`.
#[derive(Debug, Clone)]
pub struct UserLine {
    pub user: String,
    pub status: UserStatus,
    pub counters: BTreeMap<String, i64>,
    pub pass: PassRecord,
    /// Folder jobs of the current pass: finished, and all.
    pub jobs_done: usize,
    pub jobs: usize,
    /// The source's messages and how many the target holds, over the pass's finished
    /// folders, as measured at each folder's end: unlike `copied`, it counts what runs
    /// that were killed afterwards appended.
    pub messages: MessageCounts,
    /// When the next pass is due (ms since the epoch), if scheduled.
    pub next_due_ms: Option<u64>,
}

/// A batch's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchSummary {
    pub users_by_status: BTreeMap<&'static str, usize>,
    pub copied: i64,
    pub copied_bytes: i64,
    pub skipped: i64,
    pub failed_users: usize,
    pub messages: MessageCounts,
}

/// Totals over users' lines (pure, so the API can serve the same numbers).
pub fn summarize(lines: &[UserLine]) -> BatchSummary {
    let mut sum = BatchSummary::default();
    for line in lines {
        *sum.users_by_status.entry(line.status.name()).or_default() += 1;
        let count = |c: Counter| line.counters.get(c.name()).copied().unwrap_or(0);
        sum.copied += count(Counter::Copied);
        sum.copied_bytes += count(Counter::CopiedBytes);
        sum.skipped += count(Counter::Skipped);
        sum.messages.merge(&line.messages);
        if matches!(line.status, UserStatus::Failed { .. }) {
            sum.failed_users += 1;
        }
    }
    sum
}

pub fn valid_batch_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "batch name {name:?}: use up to 64 letters, digits, '-' and '_'"
        )))
    }
}

impl Cluster {
    pub async fn connect(settings: Settings) -> Result<Self, Error> {
        let keys = settings
            .sealing_keys()
            .map_err(|e| Error::Config(e.to_string()))
            .and_then(|k| Keyring::parse(&k).map_err(|e| Error::Config(e.to_string())))?;
        let store = RedisStore::from_settings(&settings).await?;
        Ok(Cluster {
            settings,
            store,
            keys: std::sync::Arc::new(keys),
        })
    }

    /// Stores the batch and its users (secrets sealed for their batch and user). Users
    /// arrive not started. Creating a batch again updates endpoints and credentials and
    /// adds users; what the admin asked of existing users stays.
    /// `rules`: the batch's folder rules; `None` keeps those it has (none for a new one).
    pub async fn create_batch(
        &self,
        batch: &str,
        users: &[UserSpec],
        rules: Option<Rules>,
    ) -> Result<(), Error> {
        valid_batch_name(batch)?;
        let first = users
            .first()
            .ok_or_else(|| Error::Config("a batch needs at least one user".into()))?;
        let previous = self.store.batch(batch).await?;
        let record = BatchRecord {
            source: first.source.clone(),
            source_auth: first.source_credentials.method.clone(),
            target: first.target.clone(),
            target_auth: first.target_credentials.method.clone(),
            sync_interval_secs: previous.as_ref().and_then(|b| b.sync_interval_secs),
            folder_rules: match rules {
                Some(rules) => {
                    rules
                        .validate()
                        .map_err(|e| Error::Config(format!("folder rules: {e}")))?;
                    rules
                }
                None => previous
                    .as_ref()
                    .map(|b| b.folder_rules.clone())
                    .unwrap_or_default(),
            },
            owner: previous.and_then(|b| b.owner),
        };
        self.store.put_batch(batch, &record).await?;
        for u in users {
            let seal = |s, side, server, method| {
                self.keys
                    .seal(
                        s,
                        Binding::new(batch, &u.id, side, server).logging_in_with(method),
                    )
                    .map_err(|e| Error::Config(e.to_string()))
            };
            let user = UserRecord {
                source_login: u.source_credentials.login.clone(),
                source_secret: Some(seal(
                    &u.source_credentials.secret,
                    Side::Source,
                    &record.source,
                    &record.source_auth,
                )?),
                target_login: u.target_credentials.login.clone(),
                target_secret: Some(seal(
                    &u.target_credentials.secret,
                    Side::Target,
                    &record.target,
                    &record.target_auth,
                )?),
            };
            self.store.put_user(batch, &u.id, &user).await?;
        }
        let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
        self.store.import_users(batch, &ids).await
    }

    /// Key rotation: every stored secret not sealed with the keyring's newest key (users'
    /// passwords, the API's endpoints' admin passwords and the batches' copies of them)
    /// is opened with the key it names and sealed again with the newest. Returns (secrets
    /// resealed, secrets already current). A secret no listed key opens stops it with
    /// an error naming the user: nothing is rewritten that could not be read back.
    pub async fn reseal_all(&self) -> Result<(usize, usize), Error> {
        let (mut resealed, mut current) = (0, 0);
        let mut count = |again: Option<String>, secret: &mut String| match again {
            Some(again) => {
                *secret = again;
                resealed += 1;
                true
            }
            None => {
                current += 1;
                false
            }
        };
        // The API's endpoints' admin passwords, and the batches' copies of them.
        for tenant in self.store.tenants().await? {
            for mut endpoint in self.store.endpoints(&tenant).await? {
                let (scope, who) = endpoint_seal_scope(&tenant, &endpoint.id);
                let to = Binding::new(&scope, &who, endpoint.role.side(), &endpoint.endpoint)
                    .logging_in_with(&endpoint.auth);
                let Some(secret) = endpoint.admin_secret.as_mut() else {
                    continue;
                };
                let again = self.keys.reseal(secret, to).map_err(|e| {
                    Error::Config(format!("tenant {tenant}, endpoint {}: {e}", endpoint.id))
                })?;
                if count(again, secret) {
                    self.store.put_endpoint(&tenant, &endpoint).await?;
                }
            }
        }
        for batch in self.store.batches().await? {
            let Some(mut record) = self.store.batch(&batch).await? else {
                continue;
            };
            if let Some(owner) = record.owner.as_mut() {
                let mut changed = false;
                let sides = [
                    (
                        &owner.source_endpoint,
                        &mut owner.source_admin_secret,
                        Side::Source,
                        &record.source,
                        &record.source_auth,
                    ),
                    (
                        &owner.target_endpoint,
                        &mut owner.target_admin_secret,
                        Side::Target,
                        &record.target,
                        &record.target_auth,
                    ),
                ];
                for (endpoint, secret, side, server, method) in sides {
                    let Some(secret) = secret.as_mut() else {
                        continue;
                    };
                    let (scope, who) = endpoint_seal_scope(&owner.tenant, endpoint);
                    let to = Binding::new(&scope, &who, side, server).logging_in_with(method);
                    let again = self.keys.reseal(secret, to).map_err(|e| {
                        Error::Config(format!("batch {batch}, endpoint {endpoint}: {e}"))
                    })?;
                    changed |= count(again, secret);
                }
                if changed {
                    self.store.put_batch(&batch, &record).await?;
                }
            }
        }
        for batch in self.store.batches().await? {
            let Some(servers) = self.store.batch(&batch).await? else {
                continue;
            };
            for user in self.store.users(&batch).await? {
                // Closed users' credentials are deleted: nothing to reseal.
                let Some(mut record) = self.store.user(&batch, &user).await? else {
                    continue;
                };
                let mut changed = false;
                let secrets = [
                    (
                        &mut record.source_secret,
                        Side::Source,
                        &servers.source,
                        &servers.source_auth,
                    ),
                    (
                        &mut record.target_secret,
                        Side::Target,
                        &servers.target,
                        &servers.target_auth,
                    ),
                ];
                for (secret, side, server, method) in secrets {
                    let Some(secret) = secret.as_mut() else {
                        continue;
                    };
                    let to = Binding::new(&batch, &user, side, server).logging_in_with(method);
                    let again = self
                        .keys
                        .reseal(secret, to)
                        .map_err(|e| Error::Config(format!("batch {batch}, user {user}: {e}")))?;
                    changed |= count(again, secret);
                }
                if changed {
                    self.store.put_user(&batch, &user, &record).await?;
                }
            }
        }
        Ok((resealed, current))
    }

    /// Every batch's name.
    pub async fn batches(&self) -> Result<Vec<String>, Error> {
        self.store.batches().await
    }

    async fn batch_record(&self, batch: &str) -> Result<BatchRecord, Error> {
        self.store
            .batch(batch)
            .await?
            .ok_or_else(|| Error::Config(format!("no batch named {batch:?}")))
    }

    /// The named users (all of the batch's when `only` is empty); an unknown name is
    /// an error and nothing is done.
    async fn select(&self, batch: &str, only: &[String]) -> Result<Vec<String>, Error> {
        self.batch_record(batch).await?;
        let mut users = self.store.users(batch).await?;
        if !only.is_empty() {
            // Sets: a selection of 100,000 users among as many is checked in linear time.
            let known: std::collections::HashSet<&String> = users.iter().collect();
            if let Some(unknown) = only.iter().find(|name| !known.contains(name)) {
                return Err(Error::Config(format!(
                    "batch {batch:?} has no user {unknown:?}"
                )));
            }
            let wanted: std::collections::HashSet<&String> = only.iter().collect();
            users.retain(|u| wanted.contains(u));
        }
        Ok(users)
    }

    /// Records the admin's request. Returns the users it applied to, and those it did
    /// not with the reason (a closed user cannot be started again; only started users
    /// can be synced now or closed).
    pub async fn act(
        &self,
        batch: &str,
        only: &[String],
        action: Action,
    ) -> Result<(Vec<String>, Vec<(String, String)>), Error> {
        let users = self.select(batch, only).await?;
        let intents = self.store.intents(batch).await?;
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        for user in users {
            let now = intents.get(&user).copied().unwrap_or(Intent::Idle);
            let verdict = match (action, now) {
                (_, Intent::Closed) => Err("closed already (its credentials are deleted)"),
                (Action::Start, _) => Ok(()),
                (Action::Stop, Intent::Idle) => Err("not started"),
                (Action::Stop, _) => Ok(()),
                (Action::SyncNow | Action::Close, Intent::Active | Intent::Closing) => Ok(()),
                (Action::SyncNow | Action::Close, Intent::Stopped) => {
                    Err("stopped (start it again first)")
                }
                (Action::SyncNow | Action::Close, Intent::Idle) => Err("not started"),
            };
            match verdict {
                Ok(()) => applied.push(user),
                Err(why) => refused.push((user, why.to_string())),
            }
        }
        match action {
            Action::Start => {
                self.store
                    .set_intent(batch, &applied, Intent::Active, true)
                    .await?
            }
            Action::Stop => {
                self.store
                    .set_intent(batch, &applied, Intent::Stopped, false)
                    .await?
            }
            Action::Close => {
                self.store
                    .set_intent(batch, &applied, Intent::Closing, true)
                    .await?
            }
            Action::SyncNow => {
                let now = mailferry_shared::redis::control::now_ms();
                for user in &applied {
                    self.store.schedule(batch, user, now).await?;
                }
            }
        }
        Ok((applied, refused))
    }

    pub async fn set_interval(&self, batch: &str, secs: u64) -> Result<(), Error> {
        if secs < MIN_SYNC_INTERVAL_SECS {
            return Err(Error::Config(format!(
                "the interval must be at least {MIN_SYNC_INTERVAL_SECS} seconds"
            )));
        }
        let mut record = self.batch_record(batch).await?;
        record.sync_interval_secs = Some(secs);
        self.store.put_batch(batch, &record).await
    }

    /// The interval between passes of `batch`'s users.
    pub fn interval_of(&self, record: &BatchRecord) -> u64 {
        record.interval_secs(self.settings.coordinator.sync_interval_secs)
    }

    pub async fn status(&self, batch: &str) -> Result<(Vec<UserLine>, u64), Error> {
        let record = self.batch_record(batch).await?;
        let users = self.store.users(batch).await?;
        let lines = self.status_of(batch, users).await?;
        Ok((lines, self.interval_of(&record)))
    }

    /// The status lines of some of a batch's users, in the order given.
    /// Reads only these users' records (pipelined), so a page of a large batch or one
    /// user's detail costs what it shows, not the whole batch.
    pub async fn status_of(&self, batch: &str, users: Vec<String>) -> Result<Vec<UserLine>, Error> {
        let states = self.store.user_states(batch, &users).await?;
        let mut out = Vec::with_capacity(users.len());
        for (user, state) in users.into_iter().zip(states) {
            let jobs: Vec<JobState> = state.jobs.into_iter().map(|(_, s)| s).collect();
            let status = user_status(state.intent, &state.pass, &jobs);
            out.push(UserLine {
                jobs_done: jobs.iter().filter(|j| !j.is_open()).count(),
                jobs: jobs.len(),
                messages: MessageCounts::of(&jobs),
                next_due_ms: state.due_ms,
                user,
                status,
                counters: state.progress,
                pass: state.pass,
            });
        }
        Ok(out)
    }
}

/// A user's status from the admin's intent, the pass record and the pass's jobs
/// ([`roll_up`] decides; this only reads the pass record).
pub fn user_status(intent: Intent, pass: &PassRecord, jobs: &[JobState]) -> UserStatus {
    roll_up(&UserView {
        intent,
        planned: pass.pass > 0,
        plan_error: pass.plan_error.as_deref(),
        jobs,
        ended: pass.finished_ms.is_some(),
    })
}
