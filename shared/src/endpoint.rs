//! IMAP endpoints (where a server is and how to reach it safely) and the credentials of
//! one account on it.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// How the connection is protected. Implicit TLS is the default; STARTTLS, once chosen,
/// is mandatory; plaintext exists only when asked for by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    Tls,
    StartTls,
    Plain,
}

impl std::str::FromStr for Security {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tls" | "imaps" | "ssl" => Ok(Security::Tls),
            "starttls" => Ok(Security::StartTls),
            "plain" | "none" | "plaintext" => Ok(Security::Plain),
            other => Err(format!(
                "unknown security {other:?}: expected tls, starttls or plain"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// Extra PEM CA certificates to trust besides the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. Only ever set by an explicit per-endpoint choice.
    pub accept_invalid_certs: bool,
    pub connect_timeout: Duration,
    /// A server that sends nothing for this long while a command is open is dead.
    pub read_timeout: Duration,
    /// The longest a command may take, besides the time its bytes need at the floor
    /// rate (see `imap::client`): a server that answers one byte at a time, or floods a
    /// command with data it did not ask for, fails the command after this.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Duration,
    /// Connect only to public addresses (the API's `forbid_private_sources`). Checked on
    /// the addresses each connection resolves and then connects to, not once when the
    /// endpoint is made: a name can resolve to a public address then and to an internal
    /// one later (DNS rebinding).
    #[serde(default)]
    pub public_only: bool,
    /// At most this many connections to one account at this server, across every
    /// process (a provider's limit: Gmail refuses a 16th, the user's own phone
    /// included). The lower of this and `worker.connections_per_account` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// At most this many connections to this server, every account together (a
    /// tenant's own small server). The lower of this and `worker.connections_per_host`
    /// applies, on the source side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_host_connections: Option<u32>,
    /// Bytes of messages mailferry downloads from one account a UTC day at most (a
    /// provider's allowance: Gmail's is 2.5 GB); at it, the account pauses until the
    /// next day (see [`crate::budget`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_download_bytes: Option<u64>,
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Endpoint {
    pub fn new(host: impl Into<String>, port: u16, security: Security) -> Self {
        Endpoint {
            host: host.into(),
            port,
            security,
            ca_file: None,
            accept_invalid_certs: false,
            connect_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(180),
            command_timeout: default_command_timeout(),
            public_only: false,
            max_connections: None,
            max_host_connections: None,
            daily_download_bytes: None,
        }
    }

    /// The connections a pool may open to one account: the installation's number, or
    /// the endpoint's own cap where that is lower.
    pub fn connection_cap(&self, installation: usize) -> usize {
        self.max_connections
            .map_or(installation, |own| installation.min(own as usize))
            .max(1)
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Whether `ip` is not a public unicast address: loopback, private, link-local,
/// carrier-grade NAT, benchmarking, documentation, IETF protocol assignments, reserved,
/// unspecified, broadcast, multicast, unique local, site-local, discard-only; and an
/// IPv4 address inside IPv6 (mapped, compatible, NAT64, 6to4) by the IPv4 address.
pub fn is_internal(ip: &std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10, CGNAT
                || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, IETF assignments
                || (a == 192 && b == 0 && c == 2) // 192.0.2.0/24, documentation
                || (a == 198 && (18..20).contains(&b)) // 198.18.0.0/15, benchmarking
                || (a == 198 && b == 51 && c == 100) // documentation
                || (a == 203 && b == 0 && c == 113) // documentation
                || a >= 240 // 240.0.0.0/4, reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                is_internal(&IpAddr::V4(Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                )))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(&IpAddr::V4(v4));
            }
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return embedded(s[6], s[7]); // ::a.b.c.d, IPv4-compatible
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(s[6], s[7]); // 64:ff9b::/96, NAT64
            }
            if s[0] == 0x2002 {
                return embedded(s[1], s[2]); // 2002::/16, 6to4
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7, unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10, link-local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, site-local
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // 64:ff9b:1::/48, local NAT64
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // 100::/64, discard
                || (s[0] == 0x2001 && s[1] == 0xdb8) // 2001:db8::/32, documentation
                || (s[0] == 0x2001 && s[1] < 0x200) // 2001::/23, IETF assignments (Teredo …)
        }
    }
}

/// A provider preset: where its IMAP server is, how its accounts log in today, and
/// what the admin must know. The one list the CLI, the API (`/presets`), the console
/// and the docs read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    /// The name people know it by.
    pub label: &'static str,
    pub host: &'static str,
    pub port: u16,
    /// The ways to log in the provider accepts, the recommended first: `password`
    /// (an app password), or an OAuth2 grant (`refresh_token`, `client_secret`,
    /// `client_certificate`, `service_account`).
    pub logins: &'static [&'static str],
    /// The provider's OAuth2 token endpoint and scopes, where it has OAuth2.
    pub oauth: Option<ProviderOAuth>,
    /// Connections per account mailferry opens at most: under the provider's own limit,
    /// with room left for the user's phone and mail client (the limit counts theirs).
    pub max_connections: Option<u32>,
    /// Bytes downloaded from one account a day at most, under the provider's allowance.
    pub daily_download_bytes: Option<u64>,
    pub note: &'static str,
}

impl Preset {
    /// The provider's server, with its connection cap.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            max_connections: self.max_connections,
            daily_download_bytes: self.daily_download_bytes,
            ..Endpoint::new(self.host, self.port, Security::Tls)
        }
    }
}

/// Where a provider's tokens come from and for what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderOAuth {
    /// The token endpoint; `{tenant}` is replaced by the organisation's tenant.
    pub token_url: &'static str,
    /// The tenant when none is given (Microsoft's multi-tenant endpoints).
    pub default_tenant: &'static str,
    /// The scope of a user's own (delegated) access, with a refresh token.
    pub user_scope: &'static str,
    /// The scope of an app's access to every mailbox (app-only, service account).
    pub app_scope: &'static str,
}

impl ProviderOAuth {
    pub fn token_url(&self, tenant: Option<&str>) -> String {
        self.token_url
            .replace("{tenant}", tenant.unwrap_or(self.default_tenant))
    }

    /// The scope for a grant: an app's grants get the app scope.
    pub fn scope(&self, grant: &crate::oauth::Grant) -> &'static str {
        if grant.needs_user_secret() {
            self.user_scope
        } else {
            self.app_scope
        }
    }
}

const MICROSOFT_ORGANISATIONS: ProviderOAuth = ProviderOAuth {
    token_url: "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
    default_tenant: "organizations",
    user_scope: crate::oauth::MICROSOFT_USER_SCOPE,
    app_scope: crate::oauth::MICROSOFT_APP_SCOPE,
};

const MICROSOFT_CONSUMERS: ProviderOAuth = ProviderOAuth {
    default_tenant: "consumers",
    ..MICROSOFT_ORGANISATIONS
};

const GOOGLE: ProviderOAuth = ProviderOAuth {
    token_url: crate::oauth::GOOGLE_TOKEN_URL,
    default_tenant: "",
    user_scope: crate::oauth::GOOGLE_SCOPE,
    app_scope: crate::oauth::GOOGLE_SCOPE,
};

/// Gmail allows 2,500 MB of IMAP downloads an account a day; mailferry stops at 2 GB,
/// leaving the user's own mail client the rest.
const GMAIL_DAILY_BUDGET: u64 = 2_000_000_000;

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "microsoft365",
        label: "Microsoft 365",
        host: "outlook.office365.com",
        port: 993,
        logins: &["client_secret", "client_certificate", "refresh_token"],
        oauth: Some(MICROSOFT_ORGANISATIONS),
        max_connections: Some(16),
        daily_download_bytes: None,
        note: "Exchange Online accepts only OAuth2 (basic authentication is off). Migrate an \
               organisation with an app registration granted IMAP.AccessAsApp (admin \
               consent), its client secret or certificate and your tenant id, and give \
               the app access to the mailboxes (New-ServicePrincipal, Add-MailboxPermission).",
    },
    Preset {
        name: "google-workspace",
        label: "Google Workspace",
        host: "imap.gmail.com",
        port: 993,
        logins: &["service_account", "refresh_token"],
        oauth: Some(GOOGLE),
        max_connections: Some(10),
        daily_download_bytes: Some(GMAIL_DAILY_BUDGET),
        note: "Migrate a Workspace domain with a service account and domain-wide \
               delegation for the scope https://mail.google.com/ (Admin console > Security \
               > API controls); give its JSON key. Gmail allows at most 15 simultaneous \
               IMAP connections per account (mailferry opens at most 10) and 2.5 GB of \
               downloads a day (mailferry stops at 2 GB and goes on the next day).",
    },
    Preset {
        name: "gmail",
        label: "Gmail",
        host: "imap.gmail.com",
        port: 993,
        logins: &["password", "refresh_token"],
        oauth: Some(GOOGLE),
        max_connections: Some(10),
        daily_download_bytes: Some(GMAIL_DAILY_BUDGET),
        note: "Gmail needs an app password (Google Account > Security > App passwords, \
               which requires 2-Step Verification) or an OAuth2 refresh token. Labels \
               become folders; mail that is only in All Mail (archived, no label) goes to \
               the batch's archive folder, once. Gmail allows at most 15 simultaneous IMAP \
               connections per account (mailferry opens at most 10) and 2.5 GB of downloads \
               a day (mailferry stops at 2 GB and goes on the next day).",
    },
    Preset {
        name: "outlook",
        label: "Outlook.com",
        host: "outlook.office365.com",
        port: 993,
        logins: &["refresh_token"],
        oauth: Some(MICROSOFT_CONSUMERS),
        max_connections: Some(16),
        daily_download_bytes: None,
        note: "Outlook.com accepts only OAuth2 since 16 September 2024 (app passwords no \
               longer work for IMAP): each user's refresh token from an app registration \
               that allows personal Microsoft accounts.",
    },
    Preset {
        name: "hotmail",
        label: "Hotmail",
        host: "outlook.office365.com",
        port: 993,
        logins: &["refresh_token"],
        oauth: Some(MICROSOFT_CONSUMERS),
        max_connections: Some(16),
        daily_download_bytes: None,
        note: "Hotmail is served by Outlook.com, which accepts only OAuth2 since 16 September \
               2024: each user's refresh token from an app registration that allows \
               personal Microsoft accounts.",
    },
    Preset {
        name: "yahoo",
        label: "Yahoo",
        host: "imap.mail.yahoo.com",
        port: 993,
        logins: &["password"],
        oauth: None,
        max_connections: None,
        daily_download_bytes: None,
        note: "Yahoo needs an app password (Account security > Generate app password).",
    },
];

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

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
    OAuth2(crate::oauth::OAuthClient),
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
        use crate::oauth::GrantSecrets;
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
    pub tokens: Option<std::sync::Arc<crate::oauth::TokenSource>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.1",
            "198.51.100.7",
            "203.0.113.9",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "100::1",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(is_internal(&internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "142.250.1.108",
            "2a00:1450:4001::6d",
            "100.128.0.1",
            "172.32.0.1",
            "198.20.0.1",
            "64:ff9b::8efa:16c",
            "2002:8efa:16c::1",
            "::ffff:142.250.1.108",
        ] {
            assert!(!is_internal(&public.parse().unwrap()), "{public}");
        }
    }
}
