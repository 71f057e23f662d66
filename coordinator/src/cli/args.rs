//! Small parsers the commands share: durations and secrets.

use std::path::Path;

use mailferry_shared::secret::Secret;

/// `90`, `90s`, `30m`, `6h`, `1d` as seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 's'),
    };
    let factor = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: use a number of seconds, or s, m, h or d"
            ))
        }
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("{text:?} is not a duration (like 90s, 30m, 6h or 1d)"))
}

/// A secret from a file (`flag` names the option that gave it; its first line), else
/// the environment variable `env`, else a prompt (`what`) when standard input is a
/// terminal. Never from a command-line value: other users can read those.
pub fn read_secret(
    flag: &str,
    file: Option<&Path>,
    env: &str,
    what: &str,
) -> Result<Secret, String> {
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(format!("{flag} {} is empty", path.display()));
        }
        return Ok(Secret::new(line));
    }
    if let Ok(value) = std::env::var(env) {
        if !value.is_empty() {
            return Ok(Secret::new(value));
        }
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let value = rpassword::prompt_password(format!("{what}: "))
            .map_err(|e| format!("reading the {what}: {e}"))?;
        if value.is_empty() {
            return Err(format!("empty {what}"));
        }
        return Ok(Secret::new(value));
    }
    Err(format!("no {what}: set {env}, or use {flag} PATH"))
}
