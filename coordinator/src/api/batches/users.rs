//! A batch's users: listed a page at a time, added one by one or imported from a CSV
//! (each bad row reported), edited, removed, and one user's detail (its folders, what
//! was skipped and why).

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use mailferry_shared::config::seal::{Binding, Keyring};
use mailferry_shared::domain::batch::{BatchRecord, Owner, UserRecord};
use mailferry_shared::domain::endpoint::Endpoint;
use mailferry_shared::domain::login::AuthMethod;
use mailferry_shared::domain::progress::Counter;
use mailferry_shared::domain::status::{Intent, JobState, MessageCounts, UserStatus};
use mailferry_shared::domain::users::{parse_csv, CsvError};
use mailferry_shared::error::Side;
use mailferry_shared::redis::control::now_ms;
use mailferry_shared::redis::directory::endpoint_seal_scope;
use mailferry_shared::secret::Secret;
use mailferry_shared::store::StateStore;
use serde::{Deserialize, Serialize};

use super::*;
use crate::admin::UserLine;
use crate::api::{limit_reached, ApiError, Body, Json, Path, Query, Shared, Tenant};

/// One user as a list shows it.
#[derive(Serialize)]
pub struct UserView {
    pub(super) id: String,
    pub(super) status: &'static str,
    /// Why the user failed, or why the server is throttling it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<String>,
    pub(super) copied: i64,
    pub(super) copied_bytes: i64,
    pub(super) skipped: i64,
    /// Folder jobs of the current pass: finished, and all.
    pub(super) jobs_done: usize,
    pub(super) jobs: usize,
    /// The source's messages and how many are at the target (see the summary's).
    pub(super) messages: MessageCounts,
    pub(super) pass: u64,
    pub(super) last_synced_ms: Option<u64>,
    pub(super) next_sync_ms: Option<u64>,
}

pub fn user_view(line: &UserLine) -> UserView {
    let count = |c: Counter| line.counters.get(c.name()).copied().unwrap_or(0);
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
        copied: count(Counter::Copied),
        copied_bytes: count(Counter::CopiedBytes),
        skipped: count(Counter::Skipped),
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
pub(super) struct Sealer<'a> {
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
    pub(super) fn new(
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

    pub(super) fn seal(
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

    pub(super) fn source(
        &self,
        user: &str,
        given: Option<&Secret>,
    ) -> Result<Option<String>, ApiError> {
        let to = Binding::new(self.batch, user, Side::Source, self.source)
            .logging_in_with(self.source_auth);
        self.seal(to, self.source_auth, given, &self.source_admin)
    }

    pub(super) fn target(
        &self,
        user: &str,
        given: Option<&Secret>,
    ) -> Result<Option<String>, ApiError> {
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
    let copied_now = line
        .counters
        .get(Counter::Copied.name())
        .copied()
        .unwrap_or(0);
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
