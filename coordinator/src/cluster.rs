//! The coordinator's side of the cluster mode: storing a batch (endpoints, users,
//! sealed secrets), starting a pass (plan each user, publish its folder jobs), and the
//! per-user status rolled up from what the workers record.

use std::collections::BTreeMap;

use mailferry_shared::amqp_queue::AmqpQueue;
use mailferry_shared::batch::{BatchRecord, UserRecord};
use mailferry_shared::folders::Rules;
use mailferry_shared::imap::Limits;
use mailferry_shared::queue::JobQueue;
use mailferry_shared::redis_store::RedisStore;
use mailferry_shared::seal::Keyring;
use mailferry_shared::settings::Settings;
use mailferry_shared::status::{roll_up, Intent, UserStatus, UserView};
use mailferry_shared::Error;
use mailferry_worker::accounts::{AccountDirectory, RedisAccounts};

use crate::embedded::UserSpec;
use crate::planner::{plan_user, PlanRequest};

pub struct Cluster {
    settings: Settings,
    store: RedisStore,
    keys: std::sync::Arc<Keyring>,
}

/// One line of `batch status`.
#[derive(Debug, Clone)]
pub struct UserLine {
    pub user: String,
    pub status: UserStatus,
    pub counters: BTreeMap<String, i64>,
}

fn valid_batch_name(name: &str) -> Result<(), Error> {
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
        let store = RedisStore::connect(&settings.redis_url, &settings.key_prefix).await?;
        Ok(Cluster {
            settings,
            store,
            keys: std::sync::Arc::new(keys),
        })
    }

    /// Stores the batch and its users; secrets are sealed for their batch and user.
    pub async fn create_batch(&self, batch: &str, users: &[UserSpec]) -> Result<(), Error> {
        valid_batch_name(batch)?;
        let first = users
            .first()
            .ok_or_else(|| Error::Config("a batch needs at least one user".into()))?;
        let record = BatchRecord {
            source: first.source.clone(),
            source_auth: first.source_credentials.method.clone(),
            target: first.target.clone(),
            target_auth: first.target_credentials.method.clone(),
        };
        self.store.put_batch(batch, &record).await?;
        for u in users {
            let seal = |s| {
                self.keys
                    .seal(s, batch, &u.id)
                    .map_err(|e| Error::Config(e.to_string()))
            };
            let user = UserRecord {
                source_login: u.source_credentials.login.clone(),
                source_secret: seal(&u.source_credentials.secret)?,
                target_login: u.target_credentials.login.clone(),
                target_secret: seal(&u.target_credentials.secret)?,
            };
            self.store.put_user(batch, &u.id, &user).await?;
        }
        Ok(())
    }

    /// Plans every (or every named) user of the batch and publishes its folder jobs.
    /// Returns, per user, the number of jobs published or why planning failed.
    pub async fn start(
        &self,
        batch: &str,
        only: &[String],
    ) -> Result<Vec<(String, Result<usize, String>)>, Error> {
        if self.store.batch(batch).await?.is_none() {
            return Err(Error::Config(format!("no batch named {batch:?}")));
        }
        let mut users = self.store.users(batch).await?;
        if !only.is_empty() {
            for name in only {
                if !users.contains(name) {
                    return Err(Error::Config(format!(
                        "batch {batch:?} has no user {name:?}"
                    )));
                }
            }
            users.retain(|u| only.contains(u));
        }
        let queue = AmqpQueue::connect(
            &self.settings.amqp_url,
            &self.settings.key_prefix,
            self.settings.queue.delivery_limit,
        )
        .await?;
        let accounts = RedisAccounts::new(
            self.store.clone(),
            self.keys.clone(),
            Limits::default(),
            self.settings.worker.connections_per_account as usize,
        );
        let pass = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut out = Vec::new();
        for user in users {
            let planned = async {
                let pools = accounts
                    .accounts(batch, &user)
                    .await
                    .map_err(|e| e.to_string())?;
                plan_user(PlanRequest {
                    batch,
                    user: &user,
                    pass,
                    source: &pools.source,
                    target: &pools.target,
                    rules: &Rules::default(),
                    store: Some(&self.store),
                })
                .await
                .map_err(|e| e.to_string())
            }
            .await;
            match planned {
                Ok(plan) => {
                    let ids: Vec<String> = plan.jobs.iter().map(|j| j.id()).collect();
                    // Recorded before publishing, so a fast worker's "running" is never
                    // overwritten by "queued".
                    self.store.begin_pass(batch, &user, &ids, None).await?;
                    for job in plan.jobs {
                        queue.publish(job).await?;
                    }
                    out.push((user, Ok(ids.len())));
                }
                Err(reason) => {
                    self.store
                        .begin_pass(batch, &user, &[], Some(&reason))
                        .await?;
                    out.push((user, Err(reason)));
                }
            }
        }
        Ok(out)
    }

    pub async fn status(&self, batch: &str) -> Result<Vec<UserLine>, Error> {
        if self.store.batch(batch).await?.is_none() {
            return Err(Error::Config(format!("no batch named {batch:?}")));
        }
        let mut out = Vec::new();
        for user in self.store.users(batch).await? {
            let (jobs, planned) = self.store.pass_state(batch, &user).await?;
            let plan_error = planned.clone().flatten();
            let status = roll_up(&UserView {
                intent: Intent::Active,
                planned: planned.is_some(),
                plan_error: plan_error.as_deref(),
                jobs: &jobs,
            });
            let counters = self.store.progress(batch, &user).await?;
            out.push(UserLine {
                user,
                status,
                counters,
            });
        }
        Ok(out)
    }
}
