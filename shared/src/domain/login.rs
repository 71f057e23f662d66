//! How an account logs in ([`AuthMethod`]), and its unsealed [`Credentials`].

use crate::domain::endpoint::Endpoint;
use crate::error::Error;
use crate::oauth::{GrantSecrets, OAuthClient, Rotated, TokenSource};
use crate::secret::Secret;
use std::sync::Arc;

/// How to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum AuthMethod {
    /// AUTHENTICATE PLAIN when offered, LOGIN otherwise: a password or app password.
    Password,
    /// AUTHENTICATE XOAUTH2 with an access token as the secret. (Spelt `xoauth2`; the
    /// derived spelling of earlier versions is still read.)
    #[serde(rename = "xoauth2", alias = "x_o_auth2")]
    XOAuth2,
    /// SASL PLAIN with an authorization identity: log in as `admin` (whose password is
    /// the secret) acting for the user.
    AdminPlain { admin: String },
    /// Dovecot master user: LOGIN as `user*master` with the master's password.
    DovecotMaster { master: String },
    /// Access tokens from an OAuth2 token endpoint, renewed as they expire
    /// ([`crate::oauth`]). The user's secret is a refresh token (or unused, for the
    /// app-only and service-account grants, whose secret is the app's).
    #[serde(rename = "oauth2")]
    OAuth2(OAuthClient),
}

impl AuthMethod {
    /// Whether the user's own secret is needed to log in (every method but the app-wide
    /// OAuth2 grants, which use the app's).
    pub fn needs_user_secret(&self) -> bool {
        match self {
            AuthMethod::OAuth2(client) => client.grant.needs_user_secret(),
            _ => true,
        }
    }

    /// Whether the endpoint keeps a secret of its own: an admin's or master's password,
    /// or an OAuth2 app's secret (required by the app-only and service-account grants,
    /// optional with refresh tokens: a confidential client's secret).
    pub fn endpoint_secret(&self) -> EndpointSecret {
        match self {
            AuthMethod::AdminPlain { .. } | AuthMethod::DovecotMaster { .. } => {
                EndpointSecret::Required
            }
            AuthMethod::OAuth2(client) if client.grant.needs_app_secret() => {
                EndpointSecret::Required
            }
            AuthMethod::OAuth2(_) => EndpointSecret::Optional,
            AuthMethod::Password | AuthMethod::XOAuth2 => EndpointSecret::None,
        }
    }

    /// What is sealed for one user: the password the user was given, or the
    /// endpoint's admin password in its place; for OAuth2, the user's refresh token
    /// beside the app's secret ([`crate::oauth::GrantSecrets`]), or the app's secret
    /// alone for the grants that need no user secret. `None`: nothing to log in with yet.
    pub fn user_secret(&self, given: Option<&Secret>, endpoint: Option<&Secret>) -> Option<Secret> {
        match self {
            AuthMethod::OAuth2(client) if client.grant.needs_user_secret() => {
                given.map(|refresh| GrantSecrets::pack(Some(refresh), endpoint))
            }
            AuthMethod::OAuth2(_) => endpoint.map(|app| GrantSecrets::pack(None, Some(app))),
            _ => given.or(endpoint).cloned(),
        }
    }
}

/// Whether an endpoint's method keeps a secret of the endpoint's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointSecret {
    Required,
    Optional,
    None,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub login: String,
    pub secret: Secret,
    pub method: AuthMethod,
    /// Where the access tokens of an [`AuthMethod::OAuth2`] login come from.
    pub tokens: Option<Arc<TokenSource>>,
}

impl Credentials {
    /// A login with a password (or a fixed token, or an admin's password): no token source.
    pub fn new(login: impl Into<String>, secret: Secret, method: AuthMethod) -> Self {
        Credentials {
            login: login.into(),
            secret,
            method,
            tokens: None,
        }
    }
}

/// The token source of an OAuth2 login (`None` for every other method): its secrets
/// from the credentials' packed [`GrantSecrets`].
pub fn tokens_for(
    credentials: &Credentials,
    via: &Endpoint,
    rotated: Option<Rotated>,
) -> Result<Option<Arc<TokenSource>>, Error> {
    let AuthMethod::OAuth2(client) = &credentials.method else {
        return Ok(None);
    };
    let (refresh, app) = GrantSecrets::unpack(&credentials.secret)
        .map_err(|e| Error::Config(format!("credentials of {}: {e}", credentials.login)))?;
    TokenSource::shared(client, &credentials.login, via, refresh, app, rotated).map(Some)
}
