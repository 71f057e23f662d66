//! What the admin asks of a batch's users: start, stop, sync now and close, for the
//! whole batch or a selection (every user named must be in it).

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::Extension;
use mailferry_shared::secret::Secret;
use serde::{Deserialize, Serialize};

use super::users::Sealer;
use super::*;
use crate::admin::Action;
use crate::api::{ApiError, Json, Path, Shared, Tenant};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// The users to act on; empty or absent: every user of the batch.
    #[serde(default)]
    users: Vec<String>,
    /// Start only: source passwords to store first, by user.
    #[serde(default)]
    source_passwords: HashMap<String, String>,
}

#[derive(Serialize)]
pub struct ActionReport {
    applied: Vec<String>,
    refused: Vec<Refusal>,
}

#[derive(Serialize)]
pub struct Refusal {
    user: String,
    reason: String,
}

/// The selection, checked: every user named is in the batch.
async fn selected(api: &Shared, batch: &str, users: &[String]) -> Result<Vec<String>, ApiError> {
    let all = api.cluster.store.users(batch).await?;
    if users.is_empty() {
        return Ok(all);
    }
    let known: HashSet<&String> = all.iter().collect();
    if let Some(unknown) = users.iter().find(|u| !known.contains(u)) {
        return Err(ApiError::invalid(format!(
            "users: the batch has no user {unknown:?}"
        )));
    }
    let mut unique: Vec<String> = users.to_vec();
    unique.sort();
    unique.dedup();
    Ok(unique)
}

async fn act(
    api: &Shared,
    tenant: &str,
    batch: &str,
    selection: Selection,
    action: Action,
) -> Result<Json<ActionReport>, ApiError> {
    let (record, owner) = owned(api, tenant, batch).await?;
    let users = selected(api, batch, &selection.users).await?;
    let mut refused = Vec::new();
    let users = if action == Action::Start {
        let wanted: HashSet<&String> = users.iter().collect();
        if let Some(stranger) = selection
            .source_passwords
            .keys()
            .find(|u| !wanted.contains(u))
        {
            return Err(ApiError::invalid(format!(
                "source_passwords: {stranger:?} is not among the users started"
            )));
        }
        let sealer = Sealer::new(&api.cluster.keys, batch, &record, &owner)?;
        let records = api.cluster.store.user_records(batch, &users).await?;
        let mut ready = Vec::with_capacity(users.len());
        let mut changed = Vec::new();
        for (user, record) in users.into_iter().zip(records) {
            // A closed user's stored logins are deleted with its credentials.
            let Some(mut record) = record else {
                refused.push(Refusal {
                    user,
                    reason: "closed already (its credentials are deleted)".into(),
                });
                continue;
            };
            if let Some(p) = selection
                .source_passwords
                .get(&user)
                .filter(|p| !p.is_empty())
            {
                record.source_secret = sealer.source(&user, Some(&Secret::new(p.clone())))?;
                changed.push((user.clone(), record.clone()));
            }
            if record.source_secret.is_none() {
                refused.push(Refusal {
                    user,
                    reason: "no source password (or refresh token): enter it to start this user"
                        .into(),
                });
            } else if record.target_secret.is_none() {
                refused.push(Refusal {
                    user,
                    reason: "no target password: give one (TargetPassword), or an admin login on the target endpoint".into(),
                });
            } else {
                ready.push(user);
            }
        }
        api.cluster.store.put_users(batch, &changed).await?;
        ready
    } else {
        if !selection.source_passwords.is_empty() {
            return Err(ApiError::invalid(
                "source_passwords: only when starting users",
            ));
        }
        users
    };
    let mut applied = Vec::new();
    if !users.is_empty() {
        let (done, not) = api.cluster.act(batch, &users, action).await?;
        applied = done;
        refused.extend(
            not.into_iter()
                .map(|(user, reason)| Refusal { user, reason }),
        );
    }
    refused.sort_by(|a, b| a.user.cmp(&b.user));
    Ok(Json(ActionReport { applied, refused }))
}

macro_rules! action_handler {
    ($name:ident, $action:expr) => {
        pub async fn $name(
            State(api): State<Shared>,
            Extension(Tenant(tenant)): Extension<Tenant>,
            Path(id): Path<String>,
            Json(selection): Json<Selection>,
        ) -> Result<Json<ActionReport>, ApiError> {
            act(&api, &tenant, &id, selection, $action).await
        }
    };
}

action_handler!(start, Action::Start);
action_handler!(stop, Action::Stop);
action_handler!(sync_now, Action::SyncNow);
action_handler!(close, Action::Close);
