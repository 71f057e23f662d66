//! Endpoints: the IMAP servers a tenant migrates from and to, made from a provider
//! preset or custom settings, and the connection test an admin runs before using one.

use std::net::IpAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use mailferry_shared::config::seal::Binding;
use mailferry_shared::domain::endpoint::{is_internal, Endpoint, Security};
use mailferry_shared::domain::login::{AuthMethod, Credentials};
use mailferry_shared::imap::pool::connect_and_log_in;
use mailferry_shared::imap::Limits;
use mailferry_shared::oauth::{jwt, Grant};
use mailferry_shared::providers::{preset, PRESETS};
use mailferry_shared::redis::control::now_ms;
use mailferry_shared::redis::directory::{endpoint_seal_scope, EndpointRecord, Role};
use mailferry_shared::secret::Secret;
use serde::{Deserialize, Serialize};

use super::{ApiError, Json, Path, Shared, Tenant};

#[derive(Serialize)]
pub struct PresetView {
    name: &'static str,
    label: &'static str,
    host: &'static str,
    port: u16,
    security: Security,
    /// How its accounts log in: `password`, or the OAuth2 grants it supports.
    logins: &'static [&'static str],
    #[serde(skip_serializing_if = "Option::is_none")]
    oauth: Option<OAuthView>,
    /// Connections per account mailferry opens at most (under the provider's limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<u32>,
    /// Bytes downloaded from one account a day at most (under the provider's allowance).
    #[serde(skip_serializing_if = "Option::is_none")]
    daily_download_bytes: Option<u64>,
    note: &'static str,
}

#[derive(Serialize)]
pub struct OAuthView {
    /// `{tenant}` stands for the organisation's tenant (`tenant` when making an endpoint).
    token_url: &'static str,
    user_scope: &'static str,
    app_scope: &'static str,
}

pub async fn presets() -> Json<Vec<PresetView>> {
    Json(
        PRESETS
            .iter()
            .map(|p| PresetView {
                name: p.name,
                label: p.label,
                host: p.host,
                port: p.port,
                security: Security::Tls,
                logins: p.logins,
                oauth: p.oauth.map(|o| OAuthView {
                    token_url: o.token_url,
                    user_scope: o.user_scope,
                    app_scope: o.app_scope,
                }),
                max_connections: p.max_connections,
                daily_download_bytes: p.daily_download_bytes,
                note: p.note,
            })
            .collect(),
    )
}

/// What a client sends to make an endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    name: String,
    role: Role,
    /// A preset's name, or `custom` (the default) with host and port.
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    security: Option<Security>,
    #[serde(default)]
    accept_invalid_certs: bool,
    #[serde(default)]
    auth: Option<AuthMethod>,
    /// The admin's or master user's password, with `admin_plain` or `dovecot_master`.
    #[serde(default)]
    admin_password: Option<String>,
    /// With `oauth2` and a Microsoft preset: the organisation's tenant (directory id or
    /// domain) whose token endpoint to use.
    #[serde(default)]
    tenant: Option<String>,
    /// With `oauth2`: the app's secret. The client secret (client_secret grant, or a
    /// confidential client's refresh tokens), the certificate's private key in PEM
    /// (client_certificate), or the service account's JSON key file whole
    /// (service_account: its client_email and key id fill the grant's where not given).
    #[serde(default)]
    app_secret: Option<String>,
    /// With the `client_certificate` grant: the certificate (PEM) uploaded to the app
    /// registration, whose thumbprint fills the grant's where not given.
    #[serde(default)]
    certificate: Option<String>,
    /// Connections to one account at most (default: the preset's, else the
    /// installation's `worker.connections_per_account`; the lower applies).
    #[serde(default)]
    max_connections: Option<u32>,
    /// Connections to the server at most, every account together (a small server).
    #[serde(default)]
    max_host_connections: Option<u32>,
    /// Bytes downloaded from one account a UTC day at most (default: the preset's).
    #[serde(default)]
    daily_download_bytes: Option<u64>,
}

/// The most a cap may be set to.
const MAX_CAP: u32 = 1000;

/// An endpoint as the API shows it (never its admin password).
#[derive(Serialize)]
pub struct EndpointView {
    id: String,
    name: String,
    role: Role,
    provider: String,
    host: String,
    port: u16,
    security: Security,
    accept_invalid_certs: bool,
    auth: AuthMethod,
    has_admin_password: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_host_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daily_download_bytes: Option<u64>,
    /// What the admin must know about the provider (app passwords, limits).
    note: Option<&'static str>,
    created_ms: u64,
}

impl From<&EndpointRecord> for EndpointView {
    fn from(r: &EndpointRecord) -> Self {
        EndpointView {
            id: r.id.clone(),
            name: r.name.clone(),
            role: r.role,
            provider: r.provider.clone(),
            host: r.endpoint.host.clone(),
            port: r.endpoint.port,
            security: r.endpoint.security,
            accept_invalid_certs: r.endpoint.accept_invalid_certs,
            auth: r.auth.clone(),
            has_admin_password: r.admin_secret.is_some(),
            max_connections: r.endpoint.max_connections,
            max_host_connections: r.endpoint.max_host_connections,
            daily_download_bytes: r.endpoint.daily_download_bytes,
            note: preset(&r.provider).map(|p| p.note),
            created_ms: r.created_ms,
        }
    }
}

/// Checks an OAuth2 endpoint's client and returns the app secret to seal: a service
/// account's private key out of its JSON key file (whose client_email and key id fill
/// the grant's where not given), a certificate's private key checked as usable.
fn oauth_app_secret(
    client: &mut mailferry_shared::oauth::OAuthClient,
    app_secret: Option<String>,
) -> Result<Option<String>, ApiError> {
    use mailferry_shared::oauth::ServiceAccountKey;
    if app_secret.is_none() && client.grant.needs_app_secret() {
        return Err(ApiError::invalid(format!(
            "app_secret: the OAuth2 {} grant needs the app's secret",
            client.grant.name()
        )));
    }
    let app_secret = match (&mut client.grant, app_secret) {
        (_, None) => None,
        (
            Grant::ServiceAccount {
                client_email,
                key_id,
            },
            Some(json),
        ) => {
            let key = ServiceAccountKey::parse(&json)
                .map_err(|e| ApiError::invalid(format!("app_secret: {e}")))?;
            if client_email.is_empty() {
                *client_email = key.client_email.clone();
            }
            if key_id.is_none() {
                *key_id = key.private_key_id.clone();
            }
            Some(key.private_key)
        }
        (Grant::ClientCertificate { .. }, Some(pem)) => {
            jwt::rsa_key_from_pem(&pem)
                .map_err(|e| ApiError::invalid(format!("app_secret: {e}")))?;
            Some(pem)
        }
        (_, Some(secret)) => Some(secret),
    };
    client
        .validate()
        .map_err(|e| ApiError::invalid(format!("auth: {e}")))?;
    Ok(app_secret)
}

/// A random id for a new object: a letter (its kind) and 16 hex digits.
pub fn new_id(kind: char) -> String {
    format!("{kind}{:016x}", fastrand::u64(..))
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

pub async fn create(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Json(new): Json<NewEndpoint>,
) -> Result<(StatusCode, Json<EndpointView>), ApiError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::invalid("name: give 1 to 100 characters"));
    }
    let limit = api.limits().endpoints_per_tenant;
    if api.cluster.store.endpoints(&tenant).await?.len() >= limit {
        return Err(super::limit_reached(
            "endpoints",
            limit,
            "endpoints_per_tenant",
        ));
    }
    let provider = new
        .provider
        .as_deref()
        .unwrap_or("custom")
        .to_ascii_lowercase();
    let mut endpoint = match (preset(&provider), provider.as_str()) {
        (Some(p), _) => {
            if new.host.is_some() || new.port.is_some() {
                return Err(ApiError::invalid(format!(
                    "provider {}: its host and port are fixed (use provider custom for others)",
                    p.name
                )));
            }
            p.endpoint()
        }
        (None, "custom") => {
            let host = new.host.as_deref().map(str::trim).unwrap_or("");
            if !valid_host(host) {
                return Err(ApiError::invalid(
                    "host: give the IMAP server's name or address",
                ));
            }
            let security = new.security.unwrap_or(Security::Tls);
            let port = new.port.unwrap_or(match security {
                Security::Tls => 993,
                Security::StartTls | Security::Plain => 143,
            });
            if port == 0 {
                return Err(ApiError::invalid("port: 1 to 65535"));
            }
            Endpoint::new(host, port, security)
        }
        (None, other) => {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            return Err(ApiError::invalid(format!(
                "provider {other:?}: expected {} or custom",
                names.join(", ")
            )));
        }
    };
    if let Some(security) = new.security {
        endpoint.security = security;
    }
    endpoint.accept_invalid_certs = new.accept_invalid_certs;
    for (name, cap) in [
        ("max_connections", new.max_connections),
        ("max_host_connections", new.max_host_connections),
    ] {
        if cap.is_some_and(|c| c == 0 || c > MAX_CAP) {
            return Err(ApiError::invalid(format!("{name}: 1 to {MAX_CAP}")));
        }
    }
    endpoint.max_connections = new.max_connections.or(endpoint.max_connections);
    endpoint.max_host_connections = new.max_host_connections;
    if new.daily_download_bytes == Some(0) {
        return Err(ApiError::invalid("daily_download_bytes: at least 1"));
    }
    endpoint.daily_download_bytes = new.daily_download_bytes.or(endpoint.daily_download_bytes);
    let mut auth = new.auth.unwrap_or(AuthMethod::Password);
    let admin = matches!(
        auth,
        AuthMethod::AdminPlain { .. } | AuthMethod::DovecotMaster { .. }
    );
    let mut admin_password = new.admin_password.filter(|p| !p.is_empty());
    let app_secret = new.app_secret.filter(|p| !p.is_empty());
    if let AuthMethod::OAuth2(client) = &mut auth {
        if let Some(provider) = preset(&provider).and_then(|p| p.oauth) {
            provider.fill(client, new.tenant.as_deref().filter(|t| !t.is_empty()));
        } else if new.tenant.is_some() {
            return Err(ApiError::invalid(
                "tenant: only with a provider that has one (microsoft365, outlook, hotmail)",
            ));
        }
        if admin_password.is_some() {
            return Err(ApiError::invalid(
                "admin_password: an OAuth2 endpoint takes the app's secret as app_secret",
            ));
        }
        if let (Grant::ClientCertificate { thumbprint }, Some(pem)) =
            (&mut client.grant, new.certificate.as_deref())
        {
            if thumbprint.is_empty() {
                *thumbprint = jwt::certificate_thumbprint(pem)
                    .map_err(|e| ApiError::invalid(format!("certificate: {e}")))?;
            }
        } else if new.certificate.is_some() {
            return Err(ApiError::invalid(
                "certificate: only for the OAuth2 client_certificate grant",
            ));
        }
        admin_password = oauth_app_secret(client, app_secret)?;
    } else if app_secret.is_some() || new.certificate.is_some() {
        return Err(ApiError::invalid(
            "app_secret, certificate: only for auth oauth2",
        ));
    }
    match (&auth, admin, &admin_password) {
        (
            AuthMethod::AdminPlain { admin: who } | AuthMethod::DovecotMaster { master: who },
            _,
            _,
        ) if who.trim().is_empty() => {
            return Err(ApiError::invalid("auth: name the admin or master user"))
        }
        (_, true, None) => {
            return Err(ApiError::invalid(
                "admin_password: an admin or master login needs its password",
            ))
        }
        (AuthMethod::OAuth2(_), _, _) => {}
        (_, false, Some(_)) => {
            return Err(ApiError::invalid(
                "admin_password: only for auth admin_plain or dovecot_master",
            ))
        }
        _ => {}
    }
    // And every connection to it checks again, the addresses it connects to.
    endpoint.public_only = check_host(&api, new.role, &endpoint).await?;
    let id = new_id('e');
    let admin_secret = match admin_password {
        Some(p) => {
            let (scope, who) = endpoint_seal_scope(&tenant, &id);
            let to = Binding::new(&scope, &who, new.role.side(), &endpoint).logging_in_with(&auth);
            Some(
                api.cluster
                    .keys
                    .seal(&Secret::new(p), to)
                    .map_err(|e| ApiError::invalid(e.to_string()))?,
            )
        }
        None => None,
    };
    let record = EndpointRecord {
        id,
        name: name.to_string(),
        role: new.role,
        provider,
        endpoint,
        auth,
        admin_secret,
        created_ms: now_ms(),
    };
    api.cluster.store.put_endpoint(&tenant, &record).await?;
    Ok((StatusCode::CREATED, Json(EndpointView::from(&record))))
}

pub async fn list(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
) -> Result<Json<Vec<EndpointView>>, ApiError> {
    let all = api.cluster.store.endpoints(&tenant).await?;
    Ok(Json(all.iter().map(EndpointView::from).collect()))
}

/// The tenant's endpoint `id`, or 404.
pub async fn record_of(api: &Shared, tenant: &str, id: &str) -> Result<EndpointRecord, ApiError> {
    api.cluster
        .store
        .endpoint(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("endpoint"))
}

pub async fn show(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<EndpointView>, ApiError> {
    let record = record_of(&api, &tenant, &id).await?;
    Ok(Json(EndpointView::from(&record)))
}

pub async fn remove(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    // Batches keep their own copy of the endpoint's settings: removing it changes none.
    if api.cluster.store.delete_endpoint(&tenant, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("endpoint"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestAccount {
    login: String,
    /// Optional with an admin or master login: the endpoint's own password is used.
    #[serde(default)]
    password: Option<String>,
}

#[derive(Serialize)]
pub struct TestVerdict {
    ok: bool,
    /// The server's capabilities after logging in.
    #[serde(skip_serializing_if = "Option::is_none")]
    capabilities: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<Failure>,
}

#[derive(Serialize)]
pub struct Failure {
    /// dns, connection_refused, timeout, tls_certificate, tls_handshake,
    /// starttls_not_offered, authentication_rejected, throttled, connection_lost, …
    code: &'static str,
    /// What happened, with the server's own words where it said something.
    message: String,
}

/// Connects, logs in with the test account and logs out. The answer is 200 either
/// way: the verdict says whether the server can be used, and if not, why.
pub async fn test(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
    Json(account): Json<TestAccount>,
) -> Result<Json<TestVerdict>, ApiError> {
    let record = record_of(&api, &tenant, &id).await?;
    if account.login.trim().is_empty() {
        return Err(ApiError::invalid("login: give the test account's login"));
    }
    let endpoint_secret = match &record.admin_secret {
        Some(sealed) => {
            let (scope, who) = endpoint_seal_scope(&tenant, &record.id);
            let to = Binding::new(&scope, &who, record.role.side(), &record.endpoint)
                .logging_in_with(&record.auth);
            Some(api.cluster.keys.open(sealed, to).map_err(|e| {
                ApiError::invalid(format!("the endpoint's admin password or app secret: {e}"))
            })?)
        }
        None => None,
    };
    let given = account.password.filter(|p| !p.is_empty()).map(Secret::new);
    let Some(secret) = record
        .auth
        .user_secret(given.as_ref(), endpoint_secret.as_ref())
    else {
        return Err(ApiError::invalid(
            "password: give the test account's password (or, with OAuth2, its refresh token)",
        ));
    };
    // Checked again: the settings may have changed since the endpoint was made.
    check_host(&api, record.role, &record.endpoint).await?;
    let credentials = Credentials::new(account.login.trim(), secret, record.auth.clone());
    let verdict = match try_login(&record.endpoint, credentials).await {
        Ok(capabilities) => TestVerdict {
            ok: true,
            capabilities: Some(capabilities),
            failure: None,
        },
        Err(e) => TestVerdict {
            ok: false,
            capabilities: None,
            failure: Some(Failure {
                code: e.kind(),
                message: e.to_string(),
            }),
        },
    };
    Ok(Json(verdict))
}

/// How long a connection test may take in all.
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);
/// A test waits this long at most for the connection and for each answer (a migration
/// waits longer: the admin is looking at the page).
const TEST_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// From fetching a token (OAuth2) to logging in: each step's failure is the verdict.
async fn try_login(
    endpoint: &Endpoint,
    mut credentials: Credentials,
) -> Result<Vec<String>, mailferry_shared::Error> {
    let mut endpoint = endpoint.clone();
    endpoint.connect_timeout = endpoint.connect_timeout.min(TEST_STEP_TIMEOUT);
    endpoint.read_timeout = endpoint.read_timeout.min(TEST_STEP_TIMEOUT);
    endpoint.command_timeout = endpoint.command_timeout.min(TEST_STEP_TIMEOUT);
    let endpoint = &endpoint;
    let attempt = async {
        credentials.tokens =
            mailferry_shared::domain::login::tokens_for(&credentials, endpoint, None)?;
        let session = connect_and_log_in(endpoint, Limits::default(), &credentials).await?;
        let capabilities: Vec<String> = session.capabilities().iter().map(str::to_string).collect();
        session.logout().await;
        Ok(capabilities)
    };
    tokio::time::timeout(TEST_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(mailferry_shared::Error::Timeout {
                what: format!("testing {}", endpoint.address()),
            })
        })
}

/// With `api.forbid_private_sources`: refuses a source server whose name resolves to
/// an internal address (loopback, private, link-local, carrier-grade NAT, unique
/// local, unspecified, multicast). Checked when the endpoint is made and each time it
/// is tested.
/// Whether a tenant may point an endpoint at this host, and if so whether its
/// connections must stay on public addresses. A target the operator lists in
/// `api.target_hosts` is trusted (the installation's own servers, internal as they
/// are); with a list, no other target is taken. Without one, a target is checked like a
/// source when `forbid_private_sources` is on — else the connection test would probe the
/// installation's network for any tenant. Sources are refused when internal.
async fn check_host(api: &Shared, role: Role, endpoint: &Endpoint) -> Result<bool, ApiError> {
    let settings = &api.cluster.settings.api;
    if role == Role::Target && !settings.target_hosts.is_empty() {
        let host = endpoint.host.trim_start_matches('[').trim_end_matches(']');
        if settings
            .target_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
        {
            return Ok(false);
        }
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "forbidden_host",
            format!(
                "host {host}: targets are the installation's own servers, and this is not one \
                 of them (api.target_hosts: {})",
                settings.target_hosts.join(", ")
            ),
        ));
    }
    refuse_internal(api, endpoint).await?;
    Ok(settings.forbid_private_sources)
}

async fn refuse_internal(api: &Shared, endpoint: &Endpoint) -> Result<(), ApiError> {
    if !api.cluster.settings.api.forbid_private_sources {
        return Ok(());
    }
    let host = endpoint.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, endpoint.port))
            .await
            .map_err(|e| {
                ApiError::invalid(format!(
                    "host {host}: cannot resolve it ({e}), so it cannot be checked"
                ))
            })?
            .map(|a| a.ip())
            .collect(),
    };
    match addrs.iter().find(|ip| is_internal(ip)) {
        Some(ip) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "forbidden_host",
            format!(
                "host {host} resolves to {ip}, an internal address: this installation migrates only from public servers, and to the servers its operator names (api.target_hosts)"
            ),
        )),
        None => Ok(()),
    }
}
