//! OAuth2 access tokens for IMAP logins (XOAUTH2, OAUTHBEARER), fetched from the
//! provider's token endpoint and renewed as they expire.
//!
//! Files: `mod.rs` (what a client and a grant are, the token source every connection of
//! an account asks, the reading of a token endpoint's answer), `http.rs` (one HTTPS POST,
//! bounded), `jwt.rs` (the RS256 assertions of the service-account and certificate
//! grants).
//!
//! The grants, and the providers that use them:
//! - [`Grant::RefreshToken`] (RFC 6749 §6): each user's secret is a refresh token a user
//!   gave once (Outlook.com, Gmail). A provider may answer with a new refresh token; it
//!   is handed to the [`Rotated`] hook, which stores it (sealed, in the cluster).
//! - [`Grant::ClientSecret`] and [`Grant::ClientCertificate`] (RFC 6749 §4.4, RFC 7523
//!   §2.2): Microsoft 365 app-only access. One token for the app serves every mailbox
//!   of the organisation (`IMAP.AccessAsApp`, scope `https://outlook.office365.com/.default`).
//! - [`Grant::ServiceAccount`] (RFC 7523 §2.1): Google Workspace domain-wide
//!   delegation; a JWT signed with the service account's key names the user in `sub`,
//!   so each mailbox has its own token.
//!
//! A [`TokenSource`] is shared by every connection of the process that uses the same
//! grant for the same account ([`TokenSource::shared`]), fetches one token at a time,
//! renews it shortly before it expires ([`renew_margin`]) and once more after a server
//! refused it. A refusal by the token endpoint (`invalid_grant`, `invalid_client`, …) is
//! [`Error::AuthRejected`], named and with what to do, never a retry loop; an endpoint
//! that is down or throttling is retried like a server that is.

pub mod http;
pub mod jwt;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::domain::endpoint::Endpoint;
use crate::error::Error;
use crate::secret::Secret;

/// The SASL mechanism that carries the token to the IMAP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Google's and Microsoft's `user=… auth=Bearer …`.
    #[default]
    Xoauth2,
    /// RFC 7628.
    Oauthbearer,
}

/// How access tokens are obtained. What is secret (refresh token, client secret, private
/// key) is never here: it travels sealed, beside the account ([`crate::config::seal`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Grant {
    /// The user's secret is a refresh token; the app secret, when there is one, is the
    /// client secret (Google's apps need it, Microsoft's public clients do not).
    RefreshToken,
    /// Client credentials; the app secret is the client secret.
    ClientSecret,
    /// Client credentials with a certificate; the app secret is its private key (PEM).
    ClientCertificate {
        /// The certificate's `x5t` (base64url SHA-1), by which the provider finds it.
        thumbprint: String,
    },
    /// JWT bearer with a service account key; the app secret is the key (PEM).
    ServiceAccount {
        /// The account's `client_email`: the assertion's issuer.
        client_email: String,
        /// The key's id (`private_key_id`), sent as `kid` where known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
    },
}

impl Grant {
    /// One token for the whole app (every mailbox), not one per user.
    pub fn is_app_wide(&self) -> bool {
        matches!(self, Grant::ClientSecret | Grant::ClientCertificate { .. })
    }

    /// Whether the grant needs a secret of the app beside (or instead of) the user's.
    pub fn needs_app_secret(&self) -> bool {
        !matches!(self, Grant::RefreshToken)
    }

    /// Whether each user brings a secret of their own (a refresh token).
    pub fn needs_user_secret(&self) -> bool {
        matches!(self, Grant::RefreshToken)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientSecret => "client_secret",
            Grant::ClientCertificate { .. } => "client_certificate",
            Grant::ServiceAccount { .. } => "service_account",
        }
    }
}

/// An OAuth2 client: where tokens come from and for what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OAuthClient {
    /// `https://…` only. (Empty in an API request: the preset's.)
    #[serde(default)]
    pub token_url: String,
    /// The app's client id (empty for a service account, whose key names it).
    #[serde(default)]
    pub client_id: String,
    /// Space-separated scopes asked for. (Empty in an API request: the preset's.)
    #[serde(default)]
    pub scope: String,
    pub grant: Grant,
    #[serde(default)]
    pub mechanism: Mechanism,
}

impl OAuthClient {
    /// Checks what can be checked without a network: the URL, and the fields each grant needs.
    pub fn validate(&self) -> Result<(), String> {
        http::HttpsUrl::parse(&self.token_url)?;
        if self.scope.trim().is_empty() {
            return Err("the OAuth2 scope is empty".into());
        }
        match &self.grant {
            Grant::ServiceAccount { client_email, .. } if client_email.is_empty() => {
                Err("the service account's client_email is empty".into())
            }
            Grant::ClientCertificate { thumbprint } if thumbprint.is_empty() => {
                Err("the certificate's thumbprint is empty".into())
            }
            Grant::RefreshToken | Grant::ClientSecret | Grant::ClientCertificate { .. }
                if self.client_id.is_empty() =>
            {
                Err(format!("the {} grant needs a client id", self.grant.name()))
            }
            _ => Ok(()),
        }
    }
}

/// A service account key file as Google hands it out (the fields mailferry uses).
#[derive(serde::Deserialize)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl ServiceAccountKey {
    /// Reads a key file's JSON; the error names the missing part, never the key.
    pub fn parse(json: &str) -> Result<ServiceAccountKey, String> {
        let key: ServiceAccountKey = serde_json::from_str(json).map_err(|e| {
            format!(
                "not a Google service account key (JSON with client_email and private_key): \
                 line {} column {}",
                e.line(),
                e.column()
            )
        })?;
        jwt::rsa_key_from_pem(&key.private_key)
            .map_err(|e| format!("the service account key's private_key: {e}"))?;
        Ok(key)
    }
}

/// What is sealed for a user who logs in with OAuth2: the refresh token (the
/// refresh-token grant) and the app's secret (the client secret of a confidential
/// client, the client secret or private key of an app-only grant, a service account's
/// key). One sealed value, so that an OAuth2 user is stored, sealed, rotated and opened
/// exactly like a user with a password.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct GrantSecrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_secret: Option<String>,
}

impl GrantSecrets {
    pub fn pack(refresh_token: Option<&Secret>, app_secret: Option<&Secret>) -> Secret {
        let packed = GrantSecrets {
            refresh_token: refresh_token.map(|s| s.expose().to_string()),
            app_secret: app_secret.map(|s| s.expose().to_string()),
        };
        let json = serde_json::to_string(&packed).unwrap_or_default();
        packed.wipe();
        Secret::new(json)
    }

    /// `(refresh token, app secret)`; the error says what the value is not (never what it is).
    pub fn unpack(secret: &Secret) -> Result<(Option<Secret>, Option<Secret>), String> {
        let mut packed: GrantSecrets = serde_json::from_str(secret.expose()).map_err(|_| {
            "the stored OAuth2 secret is not one mailferry sealed (give the refresh token or \
             the app's secret again)"
                .to_string()
        })?;
        let out = (
            packed
                .refresh_token
                .take()
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            packed
                .app_secret
                .take()
                .filter(|s| !s.is_empty())
                .map(Secret::new),
        );
        Ok(out)
    }

    fn wipe(mut self) {
        use zeroize::Zeroize;
        if let Some(s) = self.refresh_token.as_mut() {
            s.zeroize();
        }
        if let Some(s) = self.app_secret.as_mut() {
            s.zeroize();
        }
    }
}

/// Called with a refresh token the provider rotated, to store it where the next run finds it.
pub type Rotated = Arc<dyn Fn(Secret) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// An access token and when to stop using it.
struct Current {
    token: Secret,
    renew_at: Instant,
}

/// Access tokens for one grant and account, shared by every connection that needs one.
pub struct TokenSource {
    client: OAuthClient,
    url: http::HttpsUrl,
    /// The mailbox: the assertion's `sub` for a service account.
    login: String,
    /// Where the token is used: its CA file, timeouts and address policy also apply to
    /// the token endpoint.
    via: Endpoint,
    /// The user's refresh token (replaced when the provider rotates it).
    refresh: Mutex<Option<Secret>>,
    /// The client secret or private key.
    app_secret: Option<Secret>,
    rotated: Option<Rotated>,
    /// One fetch at a time: connections that need a token while one is being fetched
    /// wait for it.
    current: tokio::sync::Mutex<Option<Current>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.client.token_url)
            .field("grant", &self.client.grant.name())
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// How long before its expiry a token is renewed: a quarter of its lifetime, between
/// 1 s and 5 minutes (an hour-long token is renewed at 55 minutes, a 6-second test
/// token at 4.5 s). The margin covers the time between handing a token out and the
/// server checking it: a connect, a TLS handshake, and a server that delays logins
/// after failures (Dovecot's auth penalty, up to 15 s).
pub fn renew_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

type Registry = Mutex<HashMap<[u8; 32], Weak<TokenSource>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl TokenSource {
    /// The process's token source for this grant and account, made if there is none:
    /// the pools of two batches that move the same mailbox, or (for app-wide grants)
    /// every mailbox of an organisation, share one token. `user_secret` is the refresh
    /// token of a [`Grant::RefreshToken`]; `app_secret` the client secret or private key.
    pub fn shared(
        client: &OAuthClient,
        login: &str,
        via: &Endpoint,
        user_secret: Option<Secret>,
        app_secret: Option<Secret>,
        rotated: Option<Rotated>,
    ) -> Result<Arc<TokenSource>, Error> {
        client
            .validate()
            .map_err(|e| Error::Config(format!("OAuth2 for {login}: {e}")))?;
        if client.grant.needs_user_secret() && user_secret.as_ref().is_none_or(Secret::is_empty) {
            return Err(Error::AuthRejected {
                server_says: format!("no refresh token is stored for {login}"),
            });
        }
        if client.grant.needs_app_secret() && app_secret.as_ref().is_none_or(Secret::is_empty) {
            return Err(Error::Config(format!(
                "the OAuth2 {} grant needs the app's secret, and none is configured",
                client.grant.name()
            )));
        }
        let key = registry_key(
            client,
            login,
            via,
            user_secret.as_ref(),
            app_secret.as_ref(),
        );
        let mut all = registry().lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|_, weak| weak.strong_count() > 0);
        if let Some(found) = all.get(&key).and_then(Weak::upgrade) {
            return Ok(found);
        }
        let source = Arc::new(TokenSource {
            url: http::HttpsUrl::parse(&client.token_url).map_err(Error::Config)?,
            client: client.clone(),
            login: login.to_string(),
            via: via.clone(),
            refresh: Mutex::new(user_secret),
            app_secret,
            rotated,
            current: tokio::sync::Mutex::new(None),
        });
        all.insert(key, Arc::downgrade(&source));
        Ok(source)
    }

    pub fn mechanism(&self) -> Mechanism {
        self.client.mechanism
    }

    /// A token to log in with: the current one while it is fresh, else a new one.
    pub async fn token(&self) -> Result<Secret, Error> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if Instant::now() < c.renew_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *current = Some(fresh);
        Ok(token)
    }

    /// The server refused `token`: it is not handed out again (a token fetched since by
    /// another connection is kept).
    pub async fn refused(&self, token: &Secret) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| &c.token == token) {
            *current = None;
        }
    }

    async fn fetch(&self) -> Result<Current, Error> {
        let started = Instant::now();
        let form = self.form()?;
        let answer = http::post_form(&self.url, Bytes::copy_from_slice(&form), &self.via).await?;
        let answer = read_answer(&self.url.host, answer)?;
        if let Some(rotated) = answer.refresh_token {
            let changed = self.client.grant == Grant::RefreshToken && {
                let mut refresh = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
                let changed = refresh.as_ref() != Some(&rotated);
                *refresh = Some(rotated.clone());
                changed
            };
            if changed {
                tracing::info!(login = %self.login, "the provider rotated the refresh token; storing the new one");
                if let Some(store) = &self.rotated {
                    store(rotated).await;
                }
            }
        }
        tracing::debug!(login = %self.login, grant = self.client.grant.name(),
            lifetime_s = answer.lifetime.as_secs(), "fetched an access token");
        Ok(Current {
            token: answer.access_token,
            renew_at: started
                + answer
                    .lifetime
                    .saturating_sub(renew_margin(answer.lifetime)),
        })
    }

    /// The token request's form, by grant.
    fn form(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        let c = &self.client;
        let app = self.app_secret.as_ref().map(Secret::expose).unwrap_or("");
        let sign = |claims: serde_json::Value, header: serde_json::Value| {
            let key = jwt::rsa_key_from_pem(app)
                .map_err(|e| Error::Config(format!("the OAuth2 app's private key: {e}")))?;
            jwt::sign_rs256(&header, &claims, &key).map_err(Error::Config)
        };
        let now = unix_now();
        Ok(match &c.grant {
            Grant::RefreshToken => {
                let refresh = self
                    .refresh
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| Secret::new(""));
                let mut pairs = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.expose()),
                    ("client_id", c.client_id.as_str()),
                    ("scope", c.scope.as_str()),
                ];
                if !app.is_empty() {
                    pairs.push(("client_secret", app));
                }
                http::form_encode(&pairs)
            }
            Grant::ClientSecret => http::form_encode(&[
                ("grant_type", "client_credentials"),
                ("client_id", c.client_id.as_str()),
                ("client_secret", app),
                ("scope", c.scope.as_str()),
            ]),
            Grant::ClientCertificate { thumbprint } => {
                let assertion = sign(
                    serde_json::json!({
                        "aud": c.token_url, "iss": c.client_id, "sub": c.client_id,
                        "jti": format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
                        "nbf": now, "iat": now, "exp": now + 600,
                    }),
                    serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": thumbprint}),
                )?;
                http::form_encode(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", c.client_id.as_str()),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.as_str()),
                    ("scope", c.scope.as_str()),
                ])
            }
            Grant::ServiceAccount {
                client_email,
                key_id,
            } => {
                let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
                if let Some(kid) = key_id {
                    header["kid"] = kid.as_str().into();
                }
                let assertion = sign(
                    serde_json::json!({
                        "iss": client_email, "sub": self.login, "scope": c.scope,
                        "aud": c.token_url, "iat": now, "exp": now + 3600,
                    }),
                    header,
                )?;
                http::form_encode(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ])
            }
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which grant and which account: equal keys share tokens. App-wide grants leave the
/// mailbox out; the secrets are in (hashed) so that two batches with different app
/// secrets for the same client never share.
fn registry_key(
    client: &OAuthClient,
    login: &str,
    via: &Endpoint,
    user_secret: Option<&Secret>,
    app_secret: Option<&Secret>,
) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut part = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(serde_json::to_string(client).unwrap_or_default().as_bytes());
    if !client.grant.is_app_wide() {
        part(login.as_bytes());
    }
    part(user_secret.map(Secret::expose).unwrap_or("").as_bytes());
    part(app_secret.map(Secret::expose).unwrap_or("").as_bytes());
    part(
        via.ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
            .as_bytes(),
    );
    part(&[via.public_only as u8]);
    let mut key = [0u8; 32];
    key.copy_from_slice(h.finish().as_ref());
    key
}

/// A token endpoint's successful answer, read.
#[derive(Debug)]
pub struct Granted {
    pub access_token: Secret,
    pub lifetime: Duration,
    pub refresh_token: Option<Secret>,
}

/// Reads a token endpoint's answer (RFC 6749 §5.1, §5.2). Every byte of it is untrusted:
/// the error's description reaches logs and the console only sanitized and cut short.
pub fn read_answer(host: &str, answer: http::Answer) -> Result<Granted, Error> {
    #[derive(serde::Deserialize)]
    struct Ok_ {
        access_token: String,
        #[serde(default)]
        token_type: Option<String>,
        #[serde(default)]
        expires_in: Option<serde_json::Value>,
        #[serde(default)]
        refresh_token: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Err_ {
        error: String,
        #[serde(default)]
        error_description: Option<String>,
    }
    let status = answer.status;
    if status == 200 {
        let ok: Ok_ = serde_json::from_slice(&answer.body).map_err(|_| {
            Error::lost(format!(
                "the token endpoint {host} answered 200 without a token (not RFC 6749 JSON)"
            ))
        })?;
        if let Some(kind) = &ok.token_type {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(Error::Config(format!(
                    "the token endpoint {host} issued a {:?} token; IMAP needs a bearer token",
                    sanitize(kind)
                )));
            }
        }
        if ok.access_token.is_empty() || ok.access_token.bytes().any(|b| !(0x21..0x7f).contains(&b))
        {
            return Err(Error::lost(format!(
                "the token endpoint {host} issued an access token with bytes no token has"
            )));
        }
        // Seconds, as a number (RFC 6749) or a string (some providers); an hour if absent.
        let seconds = match &ok.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(3600)
        .clamp(1, 7 * 24 * 3600);
        return Ok(Granted {
            access_token: Secret::new(ok.access_token),
            lifetime: Duration::from_secs(seconds),
            refresh_token: ok.refresh_token.filter(|r| !r.is_empty()).map(Secret::new),
        });
    }
    if status == 429 || status >= 500 {
        return Err(Error::Throttled {
            server_says: format!("the token endpoint {host} answered HTTP {status}"),
            backoff: answer.retry_after,
        });
    }
    let refused: Option<Err_> = serde_json::from_slice(&answer.body).ok();
    let Some(refused) = refused else {
        return Err(Error::AuthRejected {
            server_says: format!(
                "the token endpoint {host} answered HTTP {status} without an OAuth2 error"
            ),
        });
    };
    let code = sanitize(&refused.error);
    let description = refused
        .error_description
        .as_deref()
        .map(sanitize)
        .unwrap_or_default();
    let what_to_do = match code.as_str() {
        "invalid_client" => "the client id, client secret or certificate is wrong, or expired",
        "invalid_grant" if description.contains("AADSTS65001") => {
            "the app lacks admin consent in this tenant: grant it in Entra ID"
        }
        "invalid_grant" => {
            "the refresh token or assertion was refused (revoked, expired, or the user must \
             sign in and consent again)"
        }
        "unauthorized_client" => {
            "the app may not use this grant (Google: domain-wide delegation is not set up \
             for this client and scope; Microsoft: the app registration does not allow it)"
        }
        "invalid_scope" => "the scope is not one this app may ask for",
        "consent_required" | "interaction_required" => {
            "the user or an admin must consent to the app first"
        }
        "access_denied" => "access was denied to the app",
        _ => "the token endpoint refused the request",
    };
    Err(Error::AuthRejected {
        server_says: format!(
            "token endpoint {host}: {code}{}{} ({what_to_do})",
            if description.is_empty() { "" } else { ": " },
            description
        ),
    })
}

/// Printable ASCII only, at most 200 characters: what a hostile endpoint may put in a log.
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> http::Answer {
        http::Answer {
            status,
            retry_after: Some(Duration::from_secs(7)),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn a_granted_token_is_read_with_its_lifetime_and_rotated_refresh_token() {
        let g = read_answer(
            "t",
            answer(200, r#"{"access_token":"eyJ.a.b","token_type":"Bearer","expires_in":"3599","refresh_token":"r2"}"#),
        )
        .unwrap();
        assert_eq!(g.access_token.expose(), "eyJ.a.b");
        assert_eq!(g.lifetime, Duration::from_secs(3599));
        assert_eq!(g.refresh_token.unwrap().expose(), "r2");
        let g = read_answer("t", answer(200, r#"{"access_token":"x","expires_in":0}"#)).unwrap();
        assert_eq!(g.lifetime, Duration::from_secs(1), "never zero");
        assert!(g.refresh_token.is_none());
    }

    #[test]
    fn refusals_are_named_with_what_to_do_and_outages_are_retried() {
        let e = read_answer(
            "login.example",
            answer(401, r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\u001b[31m"}"#),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::AuthRejected { .. }), "{e:?}");
        assert!(
            text.contains("invalid_client") && text.contains("AADSTS7000215"),
            "{text}"
        );
        assert!(
            text.contains("client secret or certificate is wrong"),
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "control bytes are not passed on: {text:?}"
        );
        let e = read_answer("g", answer(400, r#"{"error":"unauthorized_client"}"#)).unwrap_err();
        assert!(e.to_string().contains("domain-wide delegation"), "{e}");
        let e = read_answer(
            "m",
            answer(400, r#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented"}"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("admin consent"), "{e}");
        assert_eq!(e.disposition(), crate::Disposition::Fatal);
        let e = read_answer("m", answer(503, "<html>down</html>")).unwrap_err();
        assert_eq!(
            e.disposition(),
            crate::Disposition::Throttle(Some(Duration::from_secs(7)))
        );
        let e = read_answer("m", answer(200, r#"{"access_token":"a b"}"#)).unwrap_err();
        assert!(
            e.is_retryable(),
            "a garbled token is retried, not trusted: {e}"
        );
        let e = read_answer(
            "m",
            answer(200, r#"{"access_token":"x","token_type":"mac"}"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bearer"), "{e}");
    }

    #[test]
    fn grant_secrets_pack_and_unpack_and_a_password_is_not_one() {
        let packed = GrantSecrets::pack(Some(&Secret::new("r1")), Some(&Secret::new("cs")));
        let (r, a) = GrantSecrets::unpack(&packed).unwrap();
        assert_eq!((r.unwrap().expose(), a.unwrap().expose()), ("r1", "cs"));
        let (r, a) =
            GrantSecrets::unpack(&GrantSecrets::pack(None, Some(&Secret::new("k")))).unwrap();
        assert!(r.is_none() && a.is_some());
        let e = GrantSecrets::unpack(&Secret::new("hunter2")).unwrap_err();
        assert!(
            !e.contains("hunter2") && e.contains("not one mailferry sealed"),
            "{e}"
        );
    }

    #[test]
    fn margins_renew_early_enough_for_any_lifetime() {
        assert_eq!(
            renew_margin(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(renew_margin(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            renew_margin(Duration::from_secs(100)),
            Duration::from_secs(25)
        );
    }

    #[test]
    fn each_grant_says_what_it_needs() {
        let mut c = OAuthClient {
            token_url: crate::providers::GOOGLE_TOKEN_URL.into(),
            client_id: String::new(),
            scope: crate::providers::GOOGLE_SCOPE.into(),
            grant: Grant::ServiceAccount {
                client_email: "sa@p.iam.gserviceaccount.com".into(),
                key_id: None,
            },
            mechanism: Mechanism::Xoauth2,
        };
        c.validate().unwrap();
        c.grant = Grant::ClientSecret;
        assert!(c.validate().unwrap_err().contains("client id"));
        c.client_id = "app".into();
        c.token_url = "http://login.example/token".into();
        assert!(c.validate().unwrap_err().contains("https://"));
        // serialized as the batch records keep it
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["grant"]["kind"], "client_secret");
        assert_eq!(json["mechanism"], "xoauth2");
    }

    #[test]
    fn app_wide_tokens_are_shared_across_mailboxes_and_user_tokens_are_not() {
        let via = Endpoint::new("imap.example", 993, crate::domain::endpoint::Security::Tls);
        let app = OAuthClient {
            token_url: crate::providers::microsoft_token_url("contoso"),
            client_id: "app".into(),
            scope: crate::providers::MICROSOFT_APP_SCOPE.into(),
            grant: Grant::ClientSecret,
            mechanism: Mechanism::Xoauth2,
        };
        let s = || Some(Secret::new("s3cret"));
        let a = TokenSource::shared(&app, "alice@contoso", &via, None, s(), None).unwrap();
        let b = TokenSource::shared(&app, "bob@contoso", &via, None, s(), None).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let other = TokenSource::shared(
            &app,
            "bob@contoso",
            &via,
            None,
            Some(Secret::new("x")),
            None,
        )
        .unwrap();
        assert!(
            !Arc::ptr_eq(&a, &other),
            "another app secret, another token"
        );
        let user = OAuthClient {
            grant: Grant::RefreshToken,
            scope: crate::providers::MICROSOFT_USER_SCOPE.into(),
            ..app.clone()
        };
        let r = || Some(Secret::new("r1"));
        let a = TokenSource::shared(&user, "alice@contoso", &via, r(), None, None).unwrap();
        let b = TokenSource::shared(&user, "bob@contoso", &via, r(), None, None).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        let e = TokenSource::shared(&user, "carol@contoso", &via, None, None, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("no refresh token"), "{e}");
        let e = TokenSource::shared(&app, "carol@contoso", &via, None, None, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("app's secret"), "{e}");
    }
}
