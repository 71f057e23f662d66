//! UID sets: `1:5,7,9:12` to and from lists of UIDs.

/// Formats UIDs (any order, duplicates allowed) as a compact sequence set.
pub fn format(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Like [`format`], cut into sets of at most about `max_len` bytes each, for commands
/// that must stay under a server's line length limit (Dovecot's is 64 KiB by default).
pub fn format_chunks(uids: &[u32], max_len: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in format(uids).split(',').filter(|p| !p.is_empty()) {
        match out.last_mut() {
            Some(last) if last.len() + 1 + part.len() <= max_len => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// Parses a set of explicit UIDs (no `*`), in the order given, as APPENDUID and COPYUID
/// report them. `None` if malformed or unreasonably large.
pub fn parse(set: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in set.split(',') {
        match part.split_once(':') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                let (lo, hi) = (a.min(b), a.max(b));
                if hi - lo > 10_000_000 {
                    return None;
                }
                out.extend(lo..=hi);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(format(&[9, 1, 2, 3, 7, 10, 11, 3]), "1:3,7,9:11");
        assert_eq!(parse("1:3,7,11:9").unwrap(), vec![1, 2, 3, 7, 9, 10, 11]);
        assert_eq!(parse("4"), Some(vec![4]));
        assert_eq!(parse("x"), None);
        assert_eq!(format(&[]), "");
        assert_eq!(
            format_chunks(&[1, 2, 3, 5, 7, 9, 10], 6),
            ["1:3,5", "7,9:10"]
        );
        assert!(format_chunks(&[], 6).is_empty());
    }
}
