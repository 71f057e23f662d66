//! Batches and their users: made from a tenant's endpoints, filled from a CSV or one
//! user at a time, started, stopped, synced now and closed; each user's detail and the
//! batch's report.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use mailferry_shared::config::seal::{Binding, Keyring};
use mailferry_shared::config::settings::MIN_SYNC_INTERVAL_SECS;
use mailferry_shared::domain::batch::{BatchRecord, Owner, UserRecord};
use mailferry_shared::domain::endpoint::Endpoint;
use mailferry_shared::domain::folders::Rules;
use mailferry_shared::domain::login::AuthMethod;
use mailferry_shared::domain::status::{Intent, JobState, MessageCounts, UserStatus};
use mailferry_shared::domain::users::{parse_csv, CsvError};
use mailferry_shared::error::Side;
use mailferry_shared::redis::control::now_ms;
use mailferry_shared::redis::directory::{endpoint_seal_scope, EndpointRecord, Role};
use mailferry_shared::secret::Secret;
use mailferry_shared::store::StateStore;
use serde::{Deserialize, Serialize};

use super::endpoints::{new_id, record_of};
use super::{limit_reached, ApiError, Body, Json, Path, Query, Shared, Tenant};
use crate::cluster::{summarize, Action, UserLine};

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

// ---- users ----

/// One user as a list shows it.
#[derive(Serialize)]
pub struct UserView {
    id: String,
    status: &'static str,
    /// Why the user failed, or why the server is throttling it.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    copied: i64,
    copied_bytes: i64,
    skipped: i64,
    /// Folder jobs of the current pass: finished, and all.
    jobs_done: usize,
    jobs: usize,
    /// The source's messages and how many are at the target (see the summary's).
    messages: MessageCounts,
    pass: u64,
    last_synced_ms: Option<u64>,
    next_sync_ms: Option<u64>,
}

pub fn user_view(line: &UserLine) -> UserView {
    let count = |k: &str| line.counters.get(k).copied().unwrap_or(0);
    let reason = match &line.status {
        UserStatus::Failed { reason } => Some(reason.clone()),
        UserStatus::Syncing {
            throttled: Some(why),
        } => Some(format!("throttled by the server: {why}")),
        _ => None,
    };
    UserView {
        id: line.user.clone(),
        status: line.status.name(),
        reason,
        copied: count("copied"),
        copied_bytes: count("copied_bytes"),
        skipped: count("skipped"),
        jobs_done: line.jobs_done,
        jobs: line.jobs,
        messages: line.messages,
        pass: line.pass.pass,
        last_synced_ms: line.pass.synced_ms,
        next_sync_ms: line.next_due_ms,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

const MAX_PAGE: usize = 10_000;

#[derive(Serialize)]
pub struct UserPage {
    total: usize,
    offset: usize,
    users: Vec<UserView>,
}

/// The batch's users, sorted by id, `limit` (at most 10,000) from `offset`.
pub async fn users(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<UserPage>, ApiError> {
    owned(&api, &tenant, &id).await?;
    if page.limit == 0 || page.limit > MAX_PAGE {
        return Err(ApiError::invalid(format!("limit: 1 to {MAX_PAGE}")));
    }
    let all = api.cluster.store.users(&id).await?;
    let total = all.len();
    let ids: Vec<String> = all.into_iter().skip(page.offset).take(page.limit).collect();
    let lines = api.cluster.status_of(&id, ids).await?;
    Ok(Json(UserPage {
        total,
        offset: page.offset,
        users: lines.iter().map(user_view).collect(),
    }))
}

/// Seals users' secrets for the batch's servers: the password given, else the batch
/// endpoint's admin password (opened once per request), else none.
struct Sealer<'a> {
    keys: &'a Keyring,
    batch: &'a str,
    source: &'a Endpoint,
    target: &'a Endpoint,
    source_auth: &'a AuthMethod,
    target_auth: &'a AuthMethod,
    /// The endpoints' own secrets (an admin's password, an OAuth2 app's secret), opened.
    source_admin: Option<Secret>,
    target_admin: Option<Secret>,
}

impl<'a> Sealer<'a> {
    fn new(
        keys: &'a Keyring,
        batch: &'a str,
        record: &'a BatchRecord,
        owner: &Owner,
    ) -> Result<Self, ApiError> {
        let open = |sealed: &Option<String>, endpoint: &str, side, server, method| {
            sealed
                .as_deref()
                .map(|s| {
                    let (scope, who) = endpoint_seal_scope(&owner.tenant, endpoint);
                    let to = Binding::new(&scope, &who, side, server).logging_in_with(method);
                    keys.open(s, to).map_err(|e| {
                        ApiError::invalid(format!("endpoint {endpoint}'s admin password: {e}"))
                    })
                })
                .transpose()
        };
        Ok(Sealer {
            keys,
            batch,
            source: &record.source,
            target: &record.target,
            source_auth: &record.source_auth,
            target_auth: &record.target_auth,
            source_admin: open(
                &owner.source_admin_secret,
                &owner.source_endpoint,
                Side::Source,
                &record.source,
                &record.source_auth,
            )?,
            target_admin: open(
                &owner.target_admin_secret,
                &owner.target_endpoint,
                Side::Target,
                &record.target,
                &record.target_auth,
            )?,
        })
    }

    fn seal(
        &self,
        to: Binding,
        method: &AuthMethod,
        given: Option<&Secret>,
        admin: &Option<Secret>,
    ) -> Result<Option<String>, ApiError> {
        method
            .user_secret(given, admin.as_ref())
            .map(|s| {
                self.keys
                    .seal(&s, to)
                    .map_err(|e| ApiError::invalid(e.to_string()))
            })
            .transpose()
    }

    fn source(&self, user: &str, given: Option<&Secret>) -> Result<Option<String>, ApiError> {
        let to = Binding::new(self.batch, user, Side::Source, self.source)
            .logging_in_with(self.source_auth);
        self.seal(to, self.source_auth, given, &self.source_admin)
    }

    fn target(&self, user: &str, given: Option<&Secret>) -> Result<Option<String>, ApiError> {
        let to = Binding::new(self.batch, user, Side::Target, self.target)
            .logging_in_with(self.target_auth);
        self.seal(to, self.target_auth, given, &self.target_admin)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    email: String,
    #[serde(default)]
    source_login: Option<String>,
    #[serde(default)]
    source_password: Option<String>,
    #[serde(default)]
    target_login: Option<String>,
    #[serde(default)]
    target_password: Option<String>,
}

/// A user's stored settings as the API shows them: logins, and whether passwords are
/// stored (never the passwords).
#[derive(Serialize)]
pub struct AccountView {
    id: String,
    #[serde(flatten)]
    logins: Logins,
}

#[derive(Serialize)]
pub struct Logins {
    source_login: String,
    target_login: String,
    has_source_password: bool,
    has_target_password: bool,
}

fn logins(r: &UserRecord) -> Logins {
    Logins {
        source_login: r.source_login.clone(),
        target_login: r.target_login.clone(),
        has_source_password: r.source_secret.is_some(),
        has_target_password: r.target_secret.is_some(),
    }
}

fn account_view(id: &str, r: &UserRecord) -> AccountView {
    AccountView {
        id: id.to_string(),
        logins: logins(r),
    }
}

fn valid_email(email: &str) -> bool {
    mailferry_shared::domain::users::valid_address(email) && email.len() <= 320
}

fn secret(text: &Option<String>) -> Option<Secret> {
    text.as_deref().filter(|p| !p.is_empty()).map(Secret::new)
}

pub async fn add_user(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    Json(new): Json<NewUser>,
) -> Result<(StatusCode, Json<AccountView>), ApiError> {
    let (record, owner) = owned(&api, &tenant, &id).await?;
    let email = new.email.trim().to_string();
    if !valid_email(&email) {
        return Err(ApiError::invalid(format!(
            "email {email:?} is not an email address"
        )));
    }
    if api.cluster.store.user(&id, &email).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "{email} is in the batch already (PATCH it to change it)"
        )));
    }
    room_for_users(&api, &tenant, 1).await?;
    let login = |l: &Option<String>| {
        l.as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .unwrap_or(&email)
            .to_string()
    };
    let sealer = Sealer::new(&api.cluster.keys, &id, &record, &owner)?;
    let record = UserRecord {
        source_login: login(&new.source_login),
        source_secret: sealer.source(&email, secret(&new.source_password).as_ref())?,
        target_login: login(&new.target_login),
        target_secret: sealer.target(&email, secret(&new.target_password).as_ref())?,
    };
    api.cluster
        .store
        .put_users(&id, &[(email.clone(), record.clone())])
        .await?;
    Ok((StatusCode::CREATED, Json(account_view(&email, &record))))
}

#[derive(Serialize)]
pub struct ImportReport {
    /// Users added to the batch.
    added: usize,
    /// Users already in the batch whose logins (and passwords, where given) changed.
    updated: usize,
    /// Rows refused, each with its line number (1 is the header) and reason.
    errors: Vec<RowErrorView>,
}

#[derive(Serialize)]
pub struct RowErrorView {
    line: u64,
    reason: String,
}

/// How many more users the tenant may hold, if at least `wanted`; else why not.
async fn room_for_users(api: &Shared, tenant: &str, wanted: usize) -> Result<usize, ApiError> {
    let batches = api.cluster.store.tenant_batches(tenant).await?;
    let held: usize = api.cluster.store.user_counts(&batches).await?.iter().sum();
    let limit = api.limits().users_per_tenant;
    let room = limit.saturating_sub(held);
    if room < wanted {
        return Err(limit_reached("users", limit, "users_per_tenant"));
    }
    Ok(room)
}

/// Imports users from a CSV (Exchange's `EmailAddress,UserName,Password`, optional
/// `TargetUserName` and `TargetPassword`). Good rows import; each bad row is reported.
/// A row without a password imports too: the password is asked for at start.
pub async fn import(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<ImportReport>, ApiError> {
    let (record, owner) = owned(&api, &tenant, &id).await?;
    let existing: HashSet<String> = api.cluster.store.users(&id).await?.into_iter().collect();
    let room = room_for_users(&api, &tenant, 0).await?;
    let keys = api.cluster.keys.clone();
    let batch = id.clone();
    // Parsing and sealing 100,000 rows is CPU work: off the async threads.
    let (records, errors, updates) = tokio::task::spawn_blocking(move || {
        let parsed = parse_csv(&body).map_err(|e| match e {
            CsvError::Header { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_csv_header",
                e.to_string(),
            ),
            CsvError::Read(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_csv", e.to_string())
            }
        })?;
        let sealer = Sealer::new(&keys, &batch, &record, &owner)?;
        let mut records = Vec::with_capacity(parsed.users.len());
        let mut updates = Vec::new();
        for row in parsed.users {
            let record = UserRecord {
                source_secret: sealer.source(&row.email, row.source_password.as_ref())?,
                target_secret: sealer.target(&row.email, row.target_password.as_ref())?,
                source_login: row.source_login,
                target_login: row.target_login,
            };
            if existing.contains(&row.email) {
                updates.push(records.len());
            }
            records.push((row.email, record));
        }
        Ok::<_, ApiError>((records, parsed.errors, updates))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    // An existing user re-imported without a password keeps the one it has.
    let mut records = records;
    if !updates.is_empty() {
        let ids: Vec<String> = updates.iter().map(|&i| records[i].0.clone()).collect();
        let stored = api.cluster.store.user_records(&id, &ids).await?;
        for (&i, old) in updates.iter().zip(stored) {
            if let Some(old) = old {
                let new = &mut records[i].1;
                new.source_secret = new.source_secret.take().or(old.source_secret);
                new.target_secret = new.target_secret.take().or(old.target_secret);
            }
        }
    }
    let added = records.len() - updates.len();
    if added > room {
        let limit = api.limits().users_per_tenant;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "limit_reached",
            format!(
                "the import adds {added} users and this tenant has room for {room} of its \
                 {limit} (api.limits.users_per_tenant): nothing was imported"
            ),
        ));
    }
    api.cluster.store.put_users(&id, &records).await?;
    Ok(Json(ImportReport {
        added: records.len() - updates.len(),
        updated: updates.len(),
        errors: errors
            .into_iter()
            .map(|e| RowErrorView {
                line: e.line,
                reason: e.reason,
            })
            .collect(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEdit {
    #[serde(default)]
    source_login: Option<String>,
    #[serde(default)]
    source_password: Option<String>,
    #[serde(default)]
    target_login: Option<String>,
    #[serde(default)]
    target_password: Option<String>,
}

async fn user_record(api: &Shared, batch: &str, user: &str) -> Result<UserRecord, ApiError> {
    api.cluster
        .store
        .user(batch, user)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))
}

pub async fn edit_user(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((id, user)): Path<(String, String)>,
    Json(edit): Json<UserEdit>,
) -> Result<Json<AccountView>, ApiError> {
    let (batch_record, owner) = owned(&api, &tenant, &id).await?;
    let mut record = user_record(&api, &id, &user).await?;
    let sealer = Sealer::new(&api.cluster.keys, &id, &batch_record, &owner)?;
    let login = |l: &Option<String>, what: &str| match l.as_deref().map(str::trim) {
        Some("") => Err(ApiError::invalid(format!("{what}: cannot be empty"))),
        other => Ok(other.map(str::to_string)),
    };
    if let Some(l) = login(&edit.source_login, "source_login")? {
        record.source_login = l;
    }
    if let Some(l) = login(&edit.target_login, "target_login")? {
        record.target_login = l;
    }
    if let Some(p) = secret(&edit.source_password) {
        record.source_secret = sealer.source(&user, Some(&p))?;
    }
    if let Some(p) = secret(&edit.target_password) {
        record.target_secret = sealer.target(&user, Some(&p))?;
    }
    api.cluster.store.put_user(&id, &user, &record).await?;
    Ok(Json(account_view(&user, &record)))
}

pub async fn remove_user(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    owned(&api, &tenant, &id).await?;
    user_record(&api, &id, &user).await?;
    match api.cluster.store.intent(&id, &user).await? {
        Intent::Active | Intent::Closing => Err(ApiError::conflict(format!(
            "{user} is migrating: stop it first"
        ))),
        Intent::Idle | Intent::Stopped | Intent::Closed => {
            api.cluster.store.remove_user(&id, &user).await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// One folder of a user's current pass.
#[derive(Serialize)]
pub struct FolderView {
    source: String,
    target: String,
    /// waiting, queued, running, throttled, done or failed (the least advanced of the
    /// folder's jobs when it is split into UID ranges).
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Source and target counts matched after the pass.
    verified: bool,
    /// Source messages at the target (copied now or earlier).
    at_target: u64,
    skipped: u64,
    /// Source messages when the folder last finished a pass.
    source_messages: Option<u32>,
}

#[derive(Serialize)]
pub struct SkippedView {
    folder: String,
    uid: u32,
    size: u64,
    date: String,
    reason: String,
}

#[derive(Serialize)]
pub struct UserDetail {
    #[serde(flatten)]
    line: UserView,
    #[serde(flatten)]
    logins: Logins,
    /// Messages per second copied in the current pass (while it runs).
    rate_messages_per_sec: Option<f64>,
    /// Seconds left in the current pass at that rate (an estimate).
    eta_secs: Option<u64>,
    folders: Vec<FolderView>,
    skipped_messages: Vec<SkippedView>,
}

fn state_name(state: &JobState) -> (&'static str, u8) {
    // (name, how far along: the folder shows its least advanced job)
    match state {
        JobState::Failed { .. } => ("failed", 0),
        JobState::Waiting => ("waiting", 1),
        JobState::Queued => ("queued", 2),
        JobState::Throttled { .. } => ("throttled", 3),
        JobState::Running => ("running", 4),
        JobState::Done { .. } => ("done", 5),
    }
}

pub async fn user_detail(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path((id, user)): Path<(String, String)>,
) -> Result<Json<UserDetail>, ApiError> {
    owned(&api, &tenant, &id).await?;
    // A closed user keeps its status and counts, not its logins (deleted with its
    // credentials).
    let record = match api.cluster.store.user(&id, &user).await? {
        Some(record) => record,
        None if api.cluster.store.has_user(&id, &user).await? => UserRecord {
            source_login: String::new(),
            source_secret: None,
            target_login: String::new(),
            target_secret: None,
        },
        None => return Err(ApiError::not_found("user")),
    };
    let line = api
        .cluster
        .status_of(&id, vec![user.clone()])
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("user"))?;
    let store = &api.cluster.store;
    let states = store.job_states(&id, &user).await?;
    let jobs = store.with_specs(&id, &user, &states).await?;
    // One folder per source folder, in plan order (UID-range jobs folded together).
    let mut order: Vec<String> = Vec::new();
    let mut folders: HashMap<
        String,
        (FolderView, u8, mailferry_shared::domain::job::CheckpointKey),
    > = HashMap::new();
    for (job, state) in &jobs {
        let source = job.source_folder.display();
        let (name, rank) = state_name(state);
        let (reason, verified) = match state {
            JobState::Failed { reason } => (Some(reason.clone()), false),
            JobState::Throttled { server_says } => (Some(server_says.clone()), false),
            JobState::Done {
                verified, mismatch, ..
            } => (mismatch.clone(), *verified),
            _ => (None, false),
        };
        let entry = folders.entry(source.clone()).or_insert_with(|| {
            order.push(source.clone());
            (
                FolderView {
                    source: source.clone(),
                    target: job.target_folder.display(),
                    state: name,
                    reason: None,
                    verified: true,
                    at_target: 0,
                    skipped: 0,
                    source_messages: None,
                },
                rank,
                job.checkpoint_key(),
            )
        });
        if rank < entry.1 {
            entry.0.state = name;
            entry.1 = rank;
        }
        entry.0.verified &= verified;
        if reason.is_some() {
            entry.0.reason = reason;
        }
    }
    let keys: Vec<_> = order.iter().map(|f| folders[f].2.clone()).collect();
    let checkpoints = store.load_checkpoints(&keys).await?;
    let mut skipped_messages = Vec::new();
    let mut accounted = 0u64;
    let mut out = Vec::with_capacity(order.len());
    for (folder, checkpoint) in order.iter().zip(checkpoints) {
        let mut view = folders
            .remove(folder)
            .expect("every folder has its entry")
            .0;
        if let Some(cp) = checkpoint {
            view.at_target = cp.uid_map.len() as u64;
            view.skipped = cp.skipped.len() as u64;
            view.source_messages = Some(cp.messages_to_copy()).filter(|&n| n > 0);
            accounted += view.at_target + view.skipped;
            skipped_messages.extend(cp.skipped.into_iter().map(|m| SkippedView {
                folder: folder.clone(),
                uid: m.uid,
                size: m.size,
                date: m.internal_date,
                reason: m.reason,
            }));
        }
        out.push(view);
    }
    // Migrating now, as the status says: a pass whose jobs are all done reads synced
    // before the coordinator has closed its record.
    let running = matches!(
        line.status,
        UserStatus::Starting | UserStatus::Queued | UserStatus::Syncing { .. }
    );
    let copied_now = line.counters.get("copied").copied().unwrap_or(0);
    let rate = match (running, line.pass.copied_at_plan) {
        (true, Some(at_plan)) => {
            let secs = now_ms().saturating_sub(line.pass.planned_ms) as f64 / 1000.0;
            Some(if secs > 0.0 {
                (copied_now - at_plan).max(0) as f64 / secs
            } else {
                0.0
            })
        }
        _ => None,
    };
    let eta = match (rate, line.pass.source_messages) {
        (Some(r), Some(total)) if r > 0.0 => {
            Some((total.saturating_sub(accounted) as f64 / r).ceil() as u64)
        }
        _ => None,
    };
    Ok(Json(UserDetail {
        line: user_view(&line),
        logins: logins(&record),
        rate_messages_per_sec: rate.map(|r| (r * 10.0).round() / 10.0),
        eta_secs: eta,
        folders: out,
        skipped_messages,
    }))
}

// ---- actions ----

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

// ---- reports ----

#[derive(Serialize)]
pub struct Report {
    batch: BatchView,
    generated_ms: u64,
    summary: SummaryView,
    users: Vec<UserView>,
}

async fn report(api: &Shared, tenant: &str, id: &str) -> Result<Report, ApiError> {
    let (record, owner) = owned(api, tenant, id).await?;
    let (lines, _) = api.cluster.status(id).await?;
    Ok(Report {
        batch: view(api, id, &record, &owner),
        generated_ms: now_ms(),
        summary: summary_view(&lines),
        users: lines.iter().map(user_view).collect(),
    })
}

fn attachment(name: String) -> (header::HeaderName, String) {
    (
        header::CONTENT_DISPOSITION,
        format!("attachment; filename=\"{name}\""),
    )
}

pub async fn report_json(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let report = report(&api, &tenant, &id).await?;
    Ok(([attachment(format!("mailferry-{id}.json"))], Json(report)).into_response())
}

/// The report as CSV: one row per user (RFC 4180 quoting; times in RFC 3339, UTC).
pub async fn report_csv(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let report = report(&api, &tenant, &id).await?;
    let mut out = String::from(
        "user,status,reason,copied,copied_bytes,skipped,folder_jobs_done,folder_jobs,pass,last_synced\r\n",
    );
    for u in &report.users {
        let row = [
            u.id.clone(),
            u.status.to_string(),
            u.reason.clone().unwrap_or_default(),
            u.copied.to_string(),
            u.copied_bytes.to_string(),
            u.skipped.to_string(),
            u.jobs_done.to_string(),
            u.jobs.to_string(),
            u.pass.to_string(),
            u.last_synced_ms.map(rfc3339).unwrap_or_default(),
        ];
        let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            attachment(format!("mailferry-{id}.csv")),
        ],
        out,
    )
        .into_response())
}

/// A CSV cell, quoted when it must be; a cell a spreadsheet would run as a formula
/// (`=`, `+`, `-`, `@`, or a tab or carriage return before one: OWASP's list) is
/// prefixed with `'`.
fn csv_cell(text: &str) -> String {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let text = if formula && text.parse::<f64>().is_err() {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = mailferry_shared::domain::date::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("-5"), "-5");
        assert_eq!(csv_cell("\t=1+1"), "'\t=1+1");
        assert_eq!(csv_cell("\r=1+1"), "\"'\r=1+1\"");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_590_400_000), "2025-12-01T12:00:00Z");
    }
}
