//! The provider presets: where each provider's IMAP server is, how its accounts log in,
//! its OAuth2 token endpoint and scopes, its connection cap and daily budget, and what
//! the admin must know. The one list the CLI (`--source-preset`), the API (`/presets`),
//! the console (which reads `/presets`) and the docs read: a new provider is a new entry
//! of [`PRESETS`]. A provider's quirks that other parts must know live here too
//! ([`is_gmail_system_container`]).

use crate::domain::endpoint::{Endpoint, Security};
use crate::oauth::{Grant, OAuthClient};

/// Microsoft's token endpoint for a tenant (a directory id or domain; `organizations`,
/// `consumers` or `common` for the multi-tenant endpoints).
pub fn microsoft_token_url(tenant: &str) -> String {
    format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")
}
/// Exchange Online's app-only IMAP scope.
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// The delegated IMAP scope of Microsoft 365 and Outlook.com, with a refresh token.
pub const MICROSOFT_USER_SCOPE: &str =
    "https://outlook.office.com/IMAP.AccessAsUser.All offline_access";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Full IMAP access to Gmail.
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";

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
    /// Fills what an OAuth2 client left empty from the provider's defaults: the token endpoint (for
    /// `tenant`, else the provider's default tenant) and the grant's scope.
    pub fn fill(&self, client: &mut OAuthClient, tenant: Option<&str>) {
        if client.token_url.is_empty() {
            client.token_url = self.token_url(tenant);
        }
        if client.scope.is_empty() {
            client.scope = self.scope(&client.grant).to_string();
        }
    }

    pub fn token_url(&self, tenant: Option<&str>) -> String {
        self.token_url
            .replace("{tenant}", tenant.unwrap_or(self.default_tenant))
    }

    /// The scope for a grant: an app's grants get the app scope.
    pub fn scope(&self, grant: &Grant) -> &'static str {
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
    user_scope: MICROSOFT_USER_SCOPE,
    app_scope: MICROSOFT_APP_SCOPE,
};

const MICROSOFT_CONSUMERS: ProviderOAuth = ProviderOAuth {
    default_tenant: "consumers",
    ..MICROSOFT_ORGANISATIONS
};

const GOOGLE: ProviderOAuth = ProviderOAuth {
    token_url: GOOGLE_TOKEN_URL,
    default_tenant: "",
    user_scope: GOOGLE_SCOPE,
    app_scope: GOOGLE_SCOPE,
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

/// Gmail's container of its system folders: `[Gmail]`, `[Google Mail]` in some
/// countries. Not a folder of the user's: folder mapping leaves it out, and the system
/// folders in it lose it at the target (`[Gmail]/Sent Mail` → `Sent Mail`).
pub fn is_gmail_system_container(level: &str) -> bool {
    matches!(level, "[Gmail]" | "[Google Mail]")
}

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}
