//! A batch's preview, before Start: for each user, the folder mapping the next pass
//! would use (the batch's folder rules applied), each folder's messages and size, the
//! target's storage quota where the server announces QUOTA, and whether the mail fits.
//!
//! Read-only on both servers: the planner's dry run (no CREATE, no checkpoint) and
//! GETQUOTAROOT. It logs in as the workers do (the users' sealed secrets, the
//! endpoints' connection caps through Redis), a few users at a time, each bounded in
//! time; a request names at most [`MAX_USERS`] users (default: the batch's first
//! [`DEFAULT_USERS`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Extension;
use mailferry_shared::domain::folders::{Action, Rules};
use mailferry_shared::imap::mailbox::Quota;
use mailferry_shared::imap::Limits;
use mailferry_shared::redis::RedisStore;
use mailferry_worker::{AccountDirectory, RedisAccounts};
use serde::{Deserialize, Serialize};

use super::batches::owned;
use super::{ApiError, Json, Path, Shared, Tenant};
use crate::planner::{plan_user, PlanRequest, PlannedFolder};

/// The most users one request previews, and how many when it names none.
pub const MAX_USERS: usize = 50;
pub const DEFAULT_USERS: usize = 20;
/// Users previewed at once, and how long one may take.
const AT_ONCE: usize = 4;
const PER_USER: Duration = Duration::from_secs(60);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The users to preview (default: the batch's first [`DEFAULT_USERS`]).
    #[serde(default)]
    users: Option<Vec<String>>,
}

#[derive(Serialize)]
pub struct PreviewAnswer {
    users: Vec<UserPreview>,
    /// Users of the batch not in this answer (ask for them by name).
    more: usize,
}

#[derive(Serialize)]
pub struct UserPreview {
    user: String,
    folders: Vec<PlannedFolder>,
    /// Messages and bytes of the folders to copy. An archive-only folder (Gmail's All
    /// Mail) is left out: which of its messages are in no other folder is known only
    /// when its job compares them.
    messages: u64,
    /// `None` when a folder's size is unknown (the source lacks STATUS=SIZE).
    bytes: Option<u64>,
    quota: Option<Quota>,
    /// The mail fits in the room the quota leaves (`None`: no quota, or sizes unknown).
    fits: Option<bool>,
    /// Why the user could not be previewed (a wrong password, a server down).
    problem: Option<String>,
}

pub async fn preview(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    Json(body): Json<PreviewRequest>,
) -> Result<Json<PreviewAnswer>, ApiError> {
    let (record, _) = owned(&api, &tenant, &id).await?;
    let all = api.cluster.store.users(&id).await?;
    let asked = body.users;
    let users: Vec<String> = match asked {
        Some(users) => {
            if users.is_empty() || users.len() > MAX_USERS {
                return Err(ApiError::invalid(format!(
                    "users: name 1 to {MAX_USERS} users"
                )));
            }
            if let Some(stranger) = users.iter().find(|u| !all.contains(u)) {
                return Err(ApiError::invalid(format!(
                    "users: {stranger:?} is not in the batch"
                )));
            }
            users
        }
        None => all.iter().take(DEFAULT_USERS).cloned().collect(),
    };
    let more = all.len().saturating_sub(users.len());
    let settings = &api.cluster.settings;
    let store = api.cluster.store.clone();
    let accounts = Arc::new(
        RedisAccounts::new(
            store.clone(),
            api.cluster.keys.clone(),
            Limits::default(),
            settings.worker.connections_per_account as usize,
        )
        .with_shared_slots(mailferry_worker::shared_slots(settings, &store)),
    );
    let rules = Arc::new(record.folder_rules.clone());
    let at_once = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut running = tokio::task::JoinSet::new();
    for (i, user) in users.into_iter().enumerate() {
        let (accounts, rules, batch) = (accounts.clone(), rules.clone(), id.clone());
        let at_once = at_once.clone();
        running.spawn(async move {
            let _turn = at_once.acquire_owned().await;
            let preview =
                tokio::time::timeout(PER_USER, preview_user(&accounts, &batch, &user, &rules))
                    .await
                    .unwrap_or_else(|_| {
                        UserPreview::failed(
                            user,
                            format!("no answer within {} s", PER_USER.as_secs()),
                        )
                    });
            (i, preview)
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = running.join_next().await {
        answers.push(done.map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("preview: {e}"),
            )
        })?);
    }
    answers.sort_by_key(|(i, _)| *i);
    Ok(Json(PreviewAnswer {
        users: answers.into_iter().map(|(_, p)| p).collect(),
        more,
    }))
}

impl UserPreview {
    fn failed(user: String, problem: String) -> Self {
        UserPreview {
            user,
            folders: Vec::new(),
            messages: 0,
            bytes: None,
            quota: None,
            fits: None,
            problem: Some(problem),
        }
    }
}

async fn preview_user(
    accounts: &RedisAccounts,
    batch: &str,
    user: &str,
    rules: &Rules,
) -> UserPreview {
    let pools = match accounts.accounts(batch, user).await {
        Ok(pools) => pools,
        Err(e) => return UserPreview::failed(user.to_string(), e.to_string()),
    };
    let plan = plan_user::<RedisStore>(PlanRequest {
        batch,
        user,
        pass: 0,
        source: &pools.source,
        target: &pools.target,
        rules,
        store: None,
        first_pass: true,
        split: None,
    })
    .await;
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => return UserPreview::failed(user.to_string(), e.to_string()),
    };
    let quota = match pools.target.get().await {
        Ok(mut session) => {
            let quota = session.storage_quota().await;
            session.release();
            quota.ok().flatten()
        }
        Err(_) => None,
    };
    pools.source.close_idle().await;
    pools.target.close_idle().await;
    let copied: Vec<&PlannedFolder> = plan
        .folders
        .iter()
        .filter(|f| f.mapping.action == Action::Copy && !f.mapping.archive_only)
        .filter(|f| f.problem.is_none())
        .collect();
    let messages = copied
        .iter()
        .map(|f| u64::from(f.messages.unwrap_or(0)))
        .sum();
    let bytes = copied.iter().map(|f| f.size).sum::<Option<u64>>();
    let fits = match (quota, bytes) {
        (Some(q), Some(b)) => Some(q.used_bytes.saturating_add(b) <= q.limit_bytes),
        _ => None,
    };
    UserPreview {
        user: user.to_string(),
        folders: plan.folders,
        messages,
        bytes,
        quota,
        fits,
        problem: None,
    }
}
