//! The user list: Exchange Online's migration CSV (`EmailAddress,UserName,Password`) plus
//! optional `TargetUserName` and `TargetPassword` columns. Every bad row is reported with
//! its line number and reason; good rows still import.

use std::collections::HashSet;

use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct UserRow {
    /// The CSV line the row starts on (1 = header).
    pub line: u64,
    /// The mailbox address: the user's identity and, by default, the target login.
    pub email: String,
    /// Login at the source.
    pub source_login: String,
    /// `None` when the Password cell is empty: the CLI refuses such a row, the API
    /// imports it and asks for the password when the user is started.
    pub source_password: Option<Secret>,
    /// Login at the target (defaults to the address).
    pub target_login: String,
    /// Password at the target, when the CSV carries one.
    pub target_password: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("the CSV header must contain EmailAddress, UserName and Password (found: {found})")]
    Header { found: String },
    #[error("reading the CSV: {0}")]
    Read(String),
}

#[derive(Debug, Default)]
pub struct ImportResult {
    pub users: Vec<UserRow>,
    pub errors: Vec<RowError>,
}

/// Parses a CSV. A header problem fails the whole file (no row can be read without it);
/// anything wrong with a row fails only that row.
pub fn parse_csv(input: &[u8]) -> Result<ImportResult, CsvError> {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let headers = reader
        .headers()
        .map_err(|e| CsvError::Read(e.to_string()))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(email_col), Some(user_col), Some(pass_col)) =
        (col("EmailAddress"), col("UserName"), col("Password"))
    else {
        // A file without its header line starts with a user, password and all: that
        // line is not repeated in the error (errors reach logs and answers).
        let found = if headers.iter().any(|h| h.contains('@')) {
            format!(
                "a line that looks like a user rather than a header, with {} columns \
                 (not shown: it may hold a password)",
                headers.len()
            )
        } else {
            headers.iter().collect::<Vec<_>>().join(",")
        };
        return Err(CsvError::Header { found });
    };
    let target_user_col = col("TargetUserName");
    let target_pass_col = col("TargetPassword");

    // The csv crate's own line counter is off by one on CRLF files; count from byte offsets.
    let newlines: Vec<u64> = input
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i as u64)
        .collect();
    let line_at = |pos: Option<&csv::Position>| {
        pos.map(|p| {
            // After a CRLF the reported start is the LF itself.
            let start = p.byte() + u64::from(input.get(p.byte() as usize) == Some(&b'\n'));
            newlines.partition_point(|&nl| nl < start) as u64 + 1
        })
        .unwrap_or(0)
    };

    let mut out = ImportResult::default();
    let mut seen = HashSet::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = line_at(e.position());
                out.errors.push(RowError {
                    line,
                    reason: format!("unreadable row: {e}"),
                });
                continue;
            }
        };
        let line = line_at(record.position());
        if record.iter().all(str::is_empty) {
            continue; // blank line
        }
        let get = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("").to_string();
        let email = get(Some(email_col));
        let fail = |reason: String| RowError { line, reason };
        if email.is_empty() {
            out.errors.push(fail("EmailAddress is empty".into()));
            continue;
        }
        if !valid_address(&email) {
            out.errors.push(fail(format!(
                "EmailAddress {email:?} is not an email address"
            )));
            continue;
        }
        let source_login = get(Some(user_col));
        if source_login.is_empty() {
            out.errors
                .push(fail(format!("UserName is empty for {email}")));
            continue;
        }
        let password = record.get(pass_col).unwrap_or("");
        if !seen.insert(email.to_ascii_lowercase()) {
            out.errors
                .push(fail(format!("{email} appears more than once")));
            continue;
        }
        let target_login = Some(get(target_user_col))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| email.clone());
        let target_password = target_pass_col
            .and_then(|i| record.get(i))
            .filter(|s| !s.is_empty())
            .map(Secret::new);
        out.users.push(UserRow {
            line,
            email,
            source_login,
            source_password: Some(password).filter(|p| !p.is_empty()).map(Secret::new),
            target_login,
            target_password,
        });
    }
    Ok(out)
}

/// Looks like `local@domain`: no spaces or control characters, no dot at the
/// domain's ends.
pub fn valid_address(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_rows_import_and_bad_rows_name_their_line() {
        let csv = "\u{feff}EmailAddress,UserName,Password,TargetUserName\r\n\
alice@example.com,alice,\"p,w\"\"1\",\r\n\
bob@example.com,,pw,\r\n\
not-an-address,carol,pw,\r\n\
dave@example.com,dave,,\r\n\
alice@example.com,alice2,pw,\r\n\
\r\n\
erin@example.com,erin,pw,erin.target\n";
        let r = parse_csv(csv.as_bytes()).unwrap();
        let emails: Vec<_> = r.users.iter().map(|u| u.email.as_str()).collect();
        assert_eq!(
            emails,
            ["alice@example.com", "dave@example.com", "erin@example.com"]
        );
        let password = |i: usize| r.users[i].source_password.as_ref().map(|p| p.expose());
        assert_eq!(password(0), Some("p,w\"1"));
        assert_eq!(password(1), None, "an empty password is left to the caller");
        assert_eq!(r.users[0].target_login, "alice@example.com");
        assert_eq!(r.users[2].target_login, "erin.target");
        let lines: Vec<_> = r.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 6]);
        assert!(r.errors[0].reason.contains("UserName is empty"));
        assert!(r.errors[2].reason.contains("more than once"));
    }

    #[test]
    fn a_wrong_header_says_what_it_found() {
        let err = parse_csv(b"Mail,Login,Secret\na,b,c\n").unwrap_err();
        assert!(err.to_string().contains("Mail,Login,Secret"), "{err}");
    }

    #[test]
    fn a_missing_header_does_not_repeat_the_first_users_password() {
        let err = parse_csv(b"alice@example.com,alice,hunter2\n").unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("looks like a user rather than a header, with 3 columns"),
            "{text}"
        );
    }
}
