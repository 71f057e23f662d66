//! Messages as the engine sees them: metadata from FETCH, and the content identities used
//! to recognise a message already at the target without a marker header.

use crate::imap::client::{fetch_item, Command, Session};
use crate::imap::parse::{Response, Value};
use crate::imap::Flag;
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// What FETCH (UID RFC822.SIZE FLAGS INTERNALDATE) says about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub size: u64,
    pub flags: Vec<Flag>,
    pub internal_date: String,
}

/// A FETCH response, picked apart.
#[derive(Debug, Default)]
pub struct Fetched {
    pub uid: Option<u32>,
    pub size: Option<u64>,
    /// Valid flags only (see [`Flag`]); `\Recent` left out.
    pub flags: Option<Vec<Flag>>,
    pub internal_date: Option<String>,
    pub body: Option<Bytes>,
    pub header: Option<Bytes>,
    /// Gmail's labels (X-GM-LABELS), as the server spells them.
    pub labels: Option<Vec<Bytes>>,
}

pub fn parse_fetch(response: &Response) -> Option<Fetched> {
    let Response::Numbered { name, data, .. } = response else {
        return None;
    };
    if name != "FETCH" {
        return None;
    }
    Some(Fetched {
        // UIDs are 1 to 2^32-1: anything else is not a UID (and never wraps to one).
        uid: fetch_item(data, "UID")
            .and_then(Value::number32)
            .filter(|&n| n > 0),
        size: fetch_item(data, "RFC822.SIZE").and_then(Value::number),
        flags: fetch_item(data, "FLAGS").and_then(Value::list).map(|l| {
            l.iter()
                .filter_map(Flag::from_value)
                .filter(|f| !f.is_recent())
                .collect()
        }),
        internal_date: fetch_item(data, "INTERNALDATE").and_then(Value::text),
        body: fetch_item(data, "BODY[]")
            .or_else(|| fetch_item(data, "BINARY[]"))
            .and_then(|v| v.bytes().cloned()),
        header: fetch_item(data, "BODY[HEADER]").and_then(|v| v.bytes().cloned()),
        labels: fetch_item(data, "X-GM-LABELS")
            .and_then(Value::list)
            .map(|l| l.iter().filter_map(|v| v.bytes().cloned()).collect()),
    })
}

impl Fetched {
    pub fn meta(&self) -> Option<Meta> {
        Some(Meta {
            uid: self.uid?,
            size: self.size?,
            flags: self.flags.clone().unwrap_or_default(),
            internal_date: self.internal_date.clone()?,
        })
    }
}

/// `lo:hi` as a UID set, `*` standing for an open end (`hi == u32::MAX`).
pub fn uid_range(lo: u32, hi: u32) -> String {
    if hi == u32::MAX {
        format!("{lo}:*")
    } else {
        format!("{lo}:{hi}")
    }
}

/// Runs `UID FETCH <set> <items>` and keeps what `pick` makes of each FETCH response,
/// in arrival order. Responses are consumed as they stream in, so only the picks are
/// held. Note that `n:*` also returns the highest message when its UID is below `n`:
/// `pick` filters by UID where that matters.
pub async fn uid_fetch<T>(
    session: &mut Session,
    set: &str,
    items: &str,
    mut pick: impl FnMut(Fetched) -> Option<T>,
) -> Result<Vec<T>, crate::Error> {
    let mut handle = session
        .send(Command::new("UID FETCH").raw(format!(" {set} {items}")))
        .await?;
    let mut out = Vec::new();
    while let Some(r) = handle.next().await {
        if let Some(picked) = parse_fetch(&r).and_then(&mut pick) {
            out.push(picked);
        }
    }
    handle.ok().await?;
    Ok(out)
}

/// SHA-256 of the bytes without CR, so a target that turns bare LF into CRLF when it
/// stores a message still matches its source.
pub fn content_hash(bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for piece in bytes.split(|&b| b == b'\r') {
        h.update(piece);
    }
    h.finalize().into()
}

/// The header section: everything up to the first empty line.
pub fn header_section(message: &[u8]) -> &[u8] {
    let mut i = 0;
    while i < message.len() {
        if message[i] == b'\n' {
            let rest = &message[i + 1..];
            if rest.starts_with(b"\n") || rest.starts_with(b"\r\n") {
                return &message[..i + 1];
            }
        }
        i += 1;
    }
    message
}

/// Normalises flags for comparison: lower-case, sorted, no `\Recent`.
pub fn flag_key(flags: &[Flag]) -> Vec<String> {
    let mut v: Vec<String> = flags
        .iter()
        .filter(|f| !f.is_recent())
        .map(Flag::key)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(line: &[u8]) -> Fetched {
        let mut framer = crate::imap::parse::Framer::new(1 << 20, 1 << 20);
        let responses = crate::imap::parse::split_all(line, &mut framer).unwrap();
        parse_fetch(&responses[0]).unwrap()
    }

    #[test]
    fn a_uid_past_32_bits_or_zero_is_no_uid() {
        // 4294967297 used to wrap to UID 1, taking another message's place.
        assert_eq!(
            fetched(b"* 1 FETCH (UID 4294967297 RFC822.SIZE 5)\r\n").uid,
            None
        );
        assert_eq!(fetched(b"* 1 FETCH (UID 0 RFC822.SIZE 5)\r\n").uid, None);
        assert_eq!(
            fetched(b"* 1 FETCH (UID 4294967295)\r\n").uid,
            Some(u32::MAX)
        );
    }

    #[test]
    fn only_valid_flags_are_read() {
        let f = fetched(b"* 1 FETCH (UID 3 FLAGS (\\Seen \\Recent \"a) b\" {3}\r\nx y $Work))\r\n");
        let flags: Vec<String> = f.flags.unwrap().iter().map(Flag::to_string).collect();
        assert_eq!(flags, vec!["\\Seen", "$Work"]);
    }

    #[test]
    fn content_hash_ignores_carriage_returns_only() {
        assert_eq!(content_hash(b"a\r\nb\r\n"), content_hash(b"a\nb\n"));
        assert_ne!(content_hash(b"a\nb\n"), content_hash(b"a\nc\n"));
    }

    #[test]
    fn uid_ranges_use_star_for_an_open_end() {
        assert_eq!(uid_range(5, u32::MAX), "5:*");
        assert_eq!(uid_range(1, 500), "1:500");
    }

    #[test]
    fn header_section_stops_at_the_first_empty_line() {
        assert_eq!(
            header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\n"),
            b"A: 1\r\nB: 2\r\n"
        );
        assert_eq!(header_section(b"A: 1\n\nbody"), b"A: 1\n");
        assert_eq!(header_section(b"no body"), b"no body");
    }
}
