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
        }
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A provider preset: where its IMAP server is and what the admin must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub host: &'static str,
    pub port: u16,
    pub note: &'static str,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "gmail",
        host: "imap.gmail.com",
        port: 993,
        note: "Gmail needs an app password (Google Account > Security > App passwords, \
               which requires 2-Step Verification) or an OAuth2 access token (--auth xoauth2). \
               Gmail allows at most 15 simultaneous IMAP connections per account.",
    },
    Preset {
        name: "outlook",
        host: "outlook.office365.com",
        port: 993,
        note: "Outlook.com needs two-step verification and an app password, or an OAuth2 \
               access token (--auth xoauth2).",
    },
    Preset {
        name: "hotmail",
        host: "outlook.office365.com",
        port: 993,
        note: "Hotmail is served by Outlook.com: it needs two-step verification and an app \
               password, or an OAuth2 access token (--auth xoauth2).",
    },
    Preset {
        name: "yahoo",
        host: "imap.mail.yahoo.com",
        port: 993,
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
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub login: String,
    pub secret: Secret,
    pub method: AuthMethod,
}
