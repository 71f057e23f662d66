//! The shared crate's error type. Every variant knows its [`Disposition`], so what a
//! caller does with a failure (retry the job, pause the account, fail the user) is a pure
//! function of the error rather than string matching scattered through the engine.

use std::time::Duration;

use crate::imap::parse::{ParseError, StatusResponse};

/// Which side of a migration an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot resolve host {host}: {detail}")]
    Dns { host: String, detail: String },
    #[error("connection to {addr} refused")]
    ConnectionRefused { addr: String },
    #[error("timed out {what}")]
    Timeout { what: String },
    #[error("TLS certificate of {host} rejected: {detail}")]
    TlsCertificate { host: String, detail: String },
    #[error("TLS handshake with {host} failed: {detail}")]
    TlsHandshake { host: String, detail: String },
    #[error("{host} does not offer STARTTLS, which this endpoint requires")]
    StartTlsNotOffered { host: String },
    #[error("authentication rejected: {server_says}")]
    AuthRejected { server_says: String },
    #[error("server busy or throttling: {server_says}")]
    Throttled {
        server_says: String,
        backoff: Option<Duration>,
    },
    /// No connection was tried (or no more is copied): the account is paused, `why`
    /// says after what.
    #[error("{what} is paused until {} (another {} s) {why}", paused_until(*.left), .left.as_secs())]
    Paused {
        what: String,
        why: String,
        left: Duration,
    },
    #[error("connection lost: {detail}")]
    ConnectionLost { detail: String },
    #[error("protocol error: {0}")]
    Protocol(#[from] ParseError),
    #[error("{command} failed: {}", response.describe())]
    Command {
        command: String,
        response: StatusResponse,
    },
    #[error("{0}")]
    Config(String),
    #[error("state store: {0}")]
    Store(String),
}

impl Error {
    /// A short, stable name of the kind of error (a metric label: no hosts, no words
    /// of the server's).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Dns { .. } => "dns",
            Error::ConnectionRefused { .. } => "connection_refused",
            Error::Timeout { .. } => "timeout",
            Error::TlsCertificate { .. } => "tls_certificate",
            Error::TlsHandshake { .. } => "tls_handshake",
            Error::StartTlsNotOffered { .. } => "starttls_not_offered",
            Error::AuthRejected { .. } => "authentication_rejected",
            Error::Throttled { .. } => "throttled",
            Error::Paused { .. } => "paused",
            Error::ConnectionLost { .. } => "connection_lost",
            Error::Protocol(_) => "protocol",
            Error::Command { .. } => "command_refused",
            Error::Config(_) => "config",
            Error::Store(_) => "store",
        }
    }
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A passing fault (dropped connection, timeout): retry with backoff.
    Retry,
    /// The server asked us to slow down: pause this account, then retry.
    Throttle(Option<Duration>),
    /// Retrying cannot help (bad password, certificate, configuration): stop and report.
    Fatal,
}

impl Error {
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::ConnectionRefused { .. }
            | Error::Timeout { .. }
            | Error::ConnectionLost { .. }
            | Error::TlsHandshake { .. }
            // Redis or RabbitMQ out of reach (restarting, failing over) passes too; a
            // damaged record does not, but the attempts are capped.
            | Error::Store(_) => Disposition::Retry,
            Error::Throttled { backoff, .. } => Disposition::Throttle(*backoff),
            Error::Paused { left, .. } => Disposition::Throttle(Some(*left)),
            Error::Command { response, .. } if is_daily_limit(response) => {
                Disposition::Throttle(Some(DAILY_LIMIT_PAUSE))
            }
            Error::Command { response, .. } if is_throttling(response) => {
                Disposition::Throttle(suggested_backoff(&response.text))
            }
            // A server that answers NO to a command (other than throttling) will answer
            // the same next time; a protocol error from a broken server likewise.
            Error::Command { .. }
            | Error::Protocol(_)
            | Error::Dns { .. }
            | Error::TlsCertificate { .. }
            | Error::StartTlsNotOffered { .. }
            | Error::AuthRejected { .. }
            | Error::Config(_) => Disposition::Fatal,
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self.disposition(), Disposition::Fatal)
    }

    pub(crate) fn lost(detail: impl Into<String>) -> Self {
        Error::ConnectionLost {
            detail: detail.into(),
        }
    }
}

/// When a pause of `left` from now ends, for people.
fn paused_until(left: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    crate::domain::date::utc_minute((now + left).as_secs() as i64)
}

/// How long an account is paused after it used up a provider's daily allowance (Gmail:
/// "Account exceeded command or bandwidth limits", 2.5 GB of IMAP downloads a day):
/// the allowance comes back within a day, and an hour's pause costs the provider one
/// login attempt an hour meanwhile.
pub const DAILY_LIMIT_PAUSE: Duration = Duration::from_secs(3600);

/// True for a provider's "this account used up its daily allowance" (Gmail's
/// `[OVERQUOTA] Account exceeded command or bandwidth limits`, or its web-interface
/// wording). Not any OVERQUOTA: at a target that is a full mailbox, not a pause.
pub fn is_daily_limit(response: &StatusResponse) -> bool {
    let text = response.text.to_ascii_lowercase();
    text.contains("bandwidth limit") || text.contains("exceeded command or bandwidth")
}

/// True for the ways servers say "too many connections" or "slow down".
pub fn is_throttling(response: &StatusResponse) -> bool {
    let code = response.code_name();
    // LIMIT is not here: servers use it for "message too large" as much as for rates,
    // and the text ("too many ...") tells the rate case apart.
    if matches!(code.as_deref(), Some("UNAVAILABLE") | Some("INUSE")) {
        return true;
    }
    let text = response.text.to_ascii_lowercase();
    text.contains("too many")
        || text.contains("suggested backoff")
        || text.contains("try again later")
        || text.contains("throttl")
}

/// What a refused login means. A server at its connection limit answers the login
/// itself (Dovecot: `NO [LIMIT] Maximum number of connections from user+IP exceeded`;
/// Gmail: "Too many simultaneous connections"): that is throttling, to wait out, not a
/// wrong password to report to the admin.
pub fn login_refused(response: &StatusResponse) -> Error {
    let text = response.text.to_ascii_lowercase();
    let at_limit = response.code_name().as_deref() == Some("LIMIT")
        || text.contains("maximum number of connections")
        || text.contains("too many connections")
        || text.contains("simultaneous connections");
    if is_daily_limit(response) {
        Error::Throttled {
            server_says: response.describe(),
            backoff: Some(DAILY_LIMIT_PAUSE),
        }
    } else if at_limit || is_throttling(response) {
        Error::Throttled {
            server_says: response.describe(),
            backoff: suggested_backoff(&response.text),
        }
    } else {
        Error::AuthRejected {
            server_says: response.describe(),
        }
    }
}

/// Parses Microsoft's "Suggested Backoff Time: 1234 milliseconds" hint.
pub fn suggested_backoff(text: &str) -> Option<Duration> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find("suggested backoff time")?;
    let digits: String = lower[at..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::parse::Status;

    fn no(code: Option<&str>, text: &str) -> Error {
        Error::Command {
            command: "SELECT".into(),
            response: StatusResponse {
                status: Status::No,
                code: code.map(|c| vec![crate::imap::parse::Value::Atom(c.to_string().into())]),
                text: text.into(),
            },
        }
    }

    fn refusal(code: Option<&str>, text: &str) -> StatusResponse {
        StatusResponse {
            status: Status::No,
            code: code.map(|c| vec![crate::imap::parse::Value::Atom(c.to_string().into())]),
            text: text.into(),
        }
    }

    #[test]
    fn a_login_refused_for_the_connection_limit_is_throttling_not_a_bad_password() {
        let dovecot = refusal(
            Some("LIMIT"),
            "Maximum number of connections from user+IP exceeded (mail_max_userip_connections=2)",
        );
        assert!(matches!(login_refused(&dovecot), Error::Throttled { .. }));
        let gmail = refusal(None, "Too many simultaneous connections. (Failure)");
        assert!(matches!(login_refused(&gmail), Error::Throttled { .. }));
        let wrong = refusal(Some("AUTHENTICATIONFAILED"), "Authentication failed.");
        assert!(matches!(login_refused(&wrong), Error::AuthRejected { .. }));
        assert_eq!(login_refused(&wrong).disposition(), Disposition::Fatal);
        // a connection slot that could not be taken because Redis was restarting
        let store = Error::Store("redis slot script: broken pipe".into());
        assert_eq!(store.disposition(), Disposition::Retry);
    }

    #[test]
    fn throttling_answers_pause_instead_of_failing() {
        assert_eq!(
            no(
                Some("UNAVAILABLE"),
                "Server Unavailable. Suggested Backoff Time: 2500 milliseconds"
            )
            .disposition(),
            Disposition::Throttle(Some(Duration::from_millis(2500)))
        );
        assert_eq!(
            no(None, "Too many simultaneous connections").disposition(),
            Disposition::Throttle(None)
        );
        assert_eq!(
            no(Some("NONEXISTENT"), "Mailbox doesn't exist").disposition(),
            Disposition::Fatal
        );
        // Dovecot's answer to an oversized APPEND is no reason to slow down
        assert_eq!(
            no(
                Some("LIMIT"),
                "Mail size is larger than the maximum size allowed"
            )
            .disposition(),
            Disposition::Fatal
        );
        assert_eq!(
            no(Some("LIMIT"), "Too many open connections").disposition(),
            Disposition::Throttle(None)
        );
        assert_eq!(Error::lost("eof").disposition(), Disposition::Retry);
        // Gmail's daily download allowance used up: paused an hour, then again
        assert_eq!(
            no(
                Some("OVERQUOTA"),
                "Account exceeded command or bandwidth limits. (Failure)"
            )
            .disposition(),
            Disposition::Throttle(Some(DAILY_LIMIT_PAUSE))
        );
        // ... but a full mailbox at a target is no reason to wait
        assert_eq!(
            no(Some("OVERQUOTA"), "Quota exceeded").disposition(),
            Disposition::Fatal
        );
        assert_eq!(
            Error::AuthRejected {
                server_says: "x".into()
            }
            .disposition(),
            Disposition::Fatal
        );
    }
}
