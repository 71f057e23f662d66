//! Batches and their users: made from a tenant's endpoints, filled from a CSV or one
//! user at a time, started, stopped, synced now and closed; each user's detail and the
//! batch's report.
//!
//! - `mod.rs`: a batch made, listed, shown and edited.
//! - `users.rs`: its users: listed, added, imported from a CSV, edited, removed, and one
//!   user's detail.
//! - `actions.rs`: start, stop, sync now and close, for the batch or a selection.
//! - `reports.rs`: the batch's report, as JSON and as CSV.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use mailferry_shared::config::settings::MIN_SYNC_INTERVAL_SECS;
use mailferry_shared::domain::batch::{BatchRecord, Owner};
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::status::MessageCounts;
use mailferry_shared::redis::control::now_ms;
use mailferry_shared::redis::directory::{EndpointRecord, Role};
use serde::{Deserialize, Serialize};

use super::endpoints::{new_id, record_of};
use super::{limit_reached, ApiError, Json, Path, Shared, Tenant};
use crate::admin::{summarize, UserLine};

mod actions;
mod reports;
mod users;

pub use actions::*;
pub use reports::*;
pub use users::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBatch {
    name: String,
    source_endpoint: String,
    target_endpoint: String,
    #[serde(default)]
    sync_interval_secs: Option<u64>,
    /// Which folders to copy and where they land (include, exclude, rename `FROM=TO`).
    #[serde(default)]
    folder_rules: Option<Rules>,
}

#[derive(Serialize)]
pub struct BatchView {
    id: String,
    name: String,
    source_endpoint: String,
    target_endpoint: String,
    /// Seconds between passes of a synced user.
    sync_interval_secs: u64,
    folder_rules: Rules,
    created_ms: u64,
}

#[derive(Serialize)]
pub struct BatchDetail {
    #[serde(flatten)]
    batch: BatchView,
    summary: SummaryView,
}

#[derive(Serialize)]
pub struct SummaryView {
    users: usize,
    users_by_status: BTreeMap<&'static str, usize>,
    copied: i64,
    copied_bytes: i64,
    skipped: i64,
    failed_users: usize,
    /// The source's messages and how many are at the target, over the users' finished
    /// folders of their current pass (measured at each folder's end).
    messages: MessageCounts,
}

fn view(api: &Shared, id: &str, record: &BatchRecord, owner: &Owner) -> BatchView {
    BatchView {
        id: id.to_string(),
        name: owner.name.clone(),
        source_endpoint: owner.source_endpoint.clone(),
        target_endpoint: owner.target_endpoint.clone(),
        sync_interval_secs: api.cluster.interval_of(record),
        folder_rules: record.folder_rules.clone(),
        created_ms: owner.created_ms,
    }
}

/// The tenant's batch `id` and its owner record, or 404 (also for another tenant's).
pub async fn owned(api: &Shared, tenant: &str, id: &str) -> Result<(BatchRecord, Owner), ApiError> {
    let record = api.cluster.store.batch(id).await?;
    match record {
        Some(mut r) => match r.owner.take() {
            Some(owner) if owner.tenant == tenant => Ok((r, owner)),
            _ => Err(ApiError::not_found("batch")),
        },
        None => Err(ApiError::not_found("batch")),
    }
}

fn check_interval(secs: u64) -> Result<(), ApiError> {
    if secs < MIN_SYNC_INTERVAL_SECS {
        return Err(ApiError::invalid(format!(
            "sync_interval_secs: at least {MIN_SYNC_INTERVAL_SECS}"
        )));
    }
    Ok(())
}

fn check_rules(rules: &Rules) -> Result<(), ApiError> {
    rules
        .validate()
        .map_err(|e| ApiError::invalid(format!("folder_rules: {e}")))
}

fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::invalid("name: give 1 to 100 characters"));
    }
    Ok(name.to_string())
}

pub async fn create(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Json(new): Json<NewBatch>,
) -> Result<(StatusCode, Json<BatchView>), ApiError> {
    let name = check_name(&new.name)?;
    if let Some(secs) = new.sync_interval_secs {
        check_interval(secs)?;
    }
    let folder_rules = new.folder_rules.unwrap_or_default();
    check_rules(&folder_rules)?;
    let endpoint = |id: String, role: Role| {
        let api = api.clone();
        let tenant = tenant.clone();
        async move {
            let record = record_of(&api, &tenant, &id).await.map_err(|_| {
                ApiError::invalid(format!(
                    "no endpoint {id} (make it first: POST /api/v1/endpoints)"
                ))
            })?;
            if record.role != role {
                return Err(ApiError::invalid(format!(
                    "endpoint {id} is a {} endpoint; a batch needs a {} one here",
                    role_name(record.role),
                    role_name(role)
                )));
            }
            Ok::<EndpointRecord, ApiError>(record)
        }
    };
    let source = endpoint(new.source_endpoint, Role::Source).await?;
    let target = endpoint(new.target_endpoint, Role::Target).await?;
    let limit = api.limits().batches_per_tenant;
    if api.cluster.store.tenant_batches(&tenant).await?.len() >= limit {
        return Err(limit_reached("batches", limit, "batches_per_tenant"));
    }
    let id = new_id('b');
    let owner = Owner {
        tenant: tenant.clone(),
        name,
        source_endpoint: source.id.clone(),
        target_endpoint: target.id.clone(),
        created_ms: now_ms(),
        source_admin_secret: source.admin_secret.clone(),
        target_admin_secret: target.admin_secret.clone(),
    };
    let record = BatchRecord {
        source: source.endpoint.clone(),
        source_auth: source.auth.clone(),
        target: target.endpoint.clone(),
        target_auth: target.auth.clone(),
        sync_interval_secs: new.sync_interval_secs,
        owner: Some(owner.clone()),
        folder_rules,
    };
    api.cluster.store.put_batch(&id, &record).await?;
    api.cluster.store.add_tenant_batch(&tenant, &id).await?;
    Ok((StatusCode::CREATED, Json(view(&api, &id, &record, &owner))))
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

pub async fn list(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
) -> Result<Json<Vec<BatchView>>, ApiError> {
    let mut out = Vec::new();
    for id in api.cluster.store.tenant_batches(&tenant).await? {
        if let Ok((record, owner)) = owned(&api, &tenant, &id).await {
            out.push(view(&api, &id, &record, &owner));
        }
    }
    out.sort_by_key(|b| std::cmp::Reverse(b.created_ms));
    Ok(Json(out))
}

pub async fn show(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<BatchDetail>, ApiError> {
    let (record, owner) = owned(&api, &tenant, &id).await?;
    let (lines, _) = api.cluster.status(&id).await?;
    Ok(Json(BatchDetail {
        batch: view(&api, &id, &record, &owner),
        summary: summary_view(&lines),
    }))
}

pub fn summary_view(lines: &[UserLine]) -> SummaryView {
    let sum = summarize(lines);
    SummaryView {
        users: lines.len(),
        users_by_status: sum.users_by_status,
        copied: sum.copied,
        copied_bytes: sum.copied_bytes,
        skipped: sum.skipped,
        failed_users: sum.failed_users,
        messages: sum.messages,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEdit {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    sync_interval_secs: Option<u64>,
    /// Replaces the batch's folder rules; applies to the passes planned from then on.
    #[serde(default)]
    folder_rules: Option<Rules>,
}

pub async fn edit(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    Json(edit): Json<BatchEdit>,
) -> Result<Json<BatchView>, ApiError> {
    let (mut record, mut owner) = owned(&api, &tenant, &id).await?;
    if let Some(name) = &edit.name {
        owner.name = check_name(name)?;
    }
    if let Some(secs) = edit.sync_interval_secs {
        check_interval(secs)?;
        record.sync_interval_secs = Some(secs);
    }
    if let Some(rules) = edit.folder_rules {
        check_rules(&rules)?;
        record.folder_rules = rules;
    }
    record.owner = Some(owner.clone());
    api.cluster.store.put_batch(&id, &record).await?;
    Ok(Json(view(&api, &id, &record, &owner)))
}
