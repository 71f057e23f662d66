//! Daily download budgets: a provider allows each account so many bytes of IMAP
//! downloads a day (Gmail: 2.5 GB) and refuses everything after that, the user's own
//! mail client included, until the day is over. An endpoint's budget
//! (`Endpoint::daily_download_bytes`, filled from the preset) stops mailferry short of
//! it: the bytes of the messages copied are counted per account and UTC day (in Redis
//! across the cluster's processes, in the pool in embedded mode), and at the budget the
//! account pauses until the next UTC day and goes on by itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::domain::endpoint::Endpoint;
use crate::error::Error;

const DAY_SECS: u64 = 86_400;

/// Today's UTC day number, and the time left until the next one begins.
pub fn utc_day() -> (u64, Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    (
        now / DAY_SECS,
        Duration::from_secs(DAY_SECS - now % DAY_SECS),
    )
}

/// The error of an account whose budget is used up for `left` more.
pub fn used_up(endpoint: &Endpoint, login: &str, budget: u64, left: Duration) -> Error {
    Error::Paused {
        what: format!("{login} at {}", endpoint.host),
        why: format!(
            "with its daily download budget used up ({budget} bytes a day: {})",
            endpoint.host
        ),
        left,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_ends_within_a_day_and_a_used_up_budget_says_so() {
        let (day, left) = utc_day();
        assert!(day > 20_000, "a day number since 1970");
        assert!(left > Duration::ZERO && left <= Duration::from_secs(DAY_SECS));
        let e = used_up(
            &Endpoint::new(
                "imap.gmail.com",
                993,
                crate::domain::endpoint::Security::Tls,
            ),
            "alice@gmail.com",
            1000,
            Duration::from_secs(60),
        );
        let text = e.to_string();
        assert!(
            text.contains("alice@gmail.com at imap.gmail.com is paused until"),
            "{text}"
        );
        assert!(text.contains("daily download budget used up"), "{text}");
        assert_eq!(e.kind(), "paused");
    }
}
