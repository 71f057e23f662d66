//! Sans-I/O IMAP response framing and parsing.
//!
//! [`Framer`] cuts a byte stream into whole responses (a line plus any literals it
//! announces), enforcing bounds on line length and literal size so a hostile or broken
//! server cannot make us buffer without limit. [`parse_response`] turns one frame into a
//! [`Response`]. Literals are zero-copy slices of the frame, so a message body read from
//! the source travels to the target's APPEND without being copied.

use bytes::{Buf, Bytes, BytesMut};

/// A protocol error: the server sent something we cannot frame or parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("response text longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("literals of {size} bytes in one response exceed the limit of {limit} bytes")]
    LiteralTooLarge { size: u64, limit: u64 },
    #[error("response nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// How deep lists (and response codes) may nest. What we read is two or three levels
/// deep; a server's BODYSTRUCTURE (never asked for) stays far below this too.
pub const MAX_DEPTH: usize = 100;

/// Cuts responses out of a growing buffer. Keeps its scan position between calls so a
/// large literal arriving in many reads is not rescanned from the start each time.
///
/// The bounds hold for a whole response, not for each piece of it: the text outside
/// literals adds up towards `max_line` and the literals towards `max_literal`, so a
/// response of endless `{0}` literals ends in an error like an endless line does. A
/// response therefore never takes more than `max_line + max_literal` bytes of buffer.
#[derive(Debug)]
pub struct Framer {
    max_line: usize,
    max_literal: u64,
    /// Where the current (unfinished) line segment starts.
    segment_start: usize,
    /// Where to resume the search for a line feed.
    scan_pos: usize,
    /// Bytes of a literal still to arrive before scanning resumes.
    literal_remaining: usize,
    /// Text bytes of the current response's earlier segments (before its literals).
    frame_text: usize,
    /// Literal bytes announced so far in the current response.
    frame_literals: u64,
}

impl Framer {
    pub fn new(max_line: usize, max_literal: u64) -> Self {
        Framer {
            max_line,
            max_literal,
            segment_start: 0,
            scan_pos: 0,
            literal_remaining: 0,
            frame_text: 0,
            frame_literals: 0,
        }
    }

    pub fn max_literal(&self) -> u64 {
        self.max_literal
    }

    /// Changes the literal bound for responses from now on (the session sets each
    /// command's own, see `client::Expect`).
    pub fn set_max_literal(&mut self, max_literal: u64) {
        self.max_literal = max_literal;
    }

    fn text_too_long(&self, segment: usize) -> Result<(), ParseError> {
        if self.frame_text + segment > self.max_line {
            return Err(ParseError::LineTooLong {
                limit: self.max_line,
            });
        }
        Ok(())
    }

    /// Returns the next complete response, or `None` when more bytes are needed.
    pub fn next_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, ParseError> {
        loop {
            if self.literal_remaining > 0 {
                let available = buf.len() - self.scan_pos;
                if available < self.literal_remaining {
                    return Ok(None);
                }
                self.scan_pos += self.literal_remaining;
                self.segment_start = self.scan_pos;
                self.literal_remaining = 0;
            }
            let Some(lf) = buf[self.scan_pos..].iter().position(|&b| b == b'\n') else {
                self.scan_pos = buf.len();
                self.text_too_long(buf.len() - self.segment_start)?;
                return Ok(None);
            };
            let eol = self.scan_pos + lf;
            self.text_too_long(eol + 1 - self.segment_start)?;
            let line = &buf[self.segment_start..eol];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match literal_announcement(line) {
                Some(size) => {
                    let total = self.frame_literals.saturating_add(size);
                    if total > self.max_literal {
                        return Err(ParseError::LiteralTooLarge {
                            size: total,
                            limit: self.max_literal,
                        });
                    }
                    self.frame_literals = total;
                    self.frame_text += eol + 1 - self.segment_start;
                    self.literal_remaining = size as usize;
                    self.scan_pos = eol + 1;
                    let need = self.scan_pos + self.literal_remaining;
                    if buf.capacity() < need {
                        // Exactly what the literal needs: growth by doubling would make a
                        // 50 MB message cost up to 100 MB.
                        regrow(buf, need);
                    }
                }
                None => {
                    let frame = buf.split_to(eol + 1).freeze();
                    self.segment_start = 0;
                    self.scan_pos = 0;
                    self.frame_text = 0;
                    self.frame_literals = 0;
                    return Ok(Some(frame));
                }
            }
        }
    }
}

/// Gives `buf` room for `capacity` bytes in a fresh allocation, moving the unconsumed
/// bytes over. `BytesMut::reserve` would instead grow the old allocation by doubling,
/// keeping the already consumed prefix alive: a connection's read buffer then creeps up
/// to many megabytes (measured: 93 % of the heap at peak).
pub fn regrow(buf: &mut BytesMut, capacity: usize) {
    let mut fresh = BytesMut::with_capacity(capacity.max(buf.len()));
    fresh.extend_from_slice(buf);
    *buf = fresh;
}

/// `Some(n)` when a line segment ends with a literal announcement `{n}` or `{n+}`.
fn literal_announcement(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One element of an IMAP response's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Atom(Bytes),
    /// A quoted string or a literal.
    Str(Bytes),
    Nil,
    List(Vec<Value>),
}

impl Value {
    /// The bytes of an atom or string (`None` for NIL and lists).
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Atom(b) | Value::Str(b) => Some(b),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    pub fn number(&self) -> Option<u64> {
        match self {
            Value::Atom(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// A number that fits 32 bits (UIDs, UIDVALIDITY, UIDNEXT, counts): a larger one is
    /// no number at all rather than one wrapped round to a small UID.
    pub fn number32(&self) -> Option<u32> {
        self.number().and_then(|n| u32::try_from(n).ok())
    }

    pub fn list(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// Case-insensitive comparison of an atom with `name`.
    pub fn is_atom(&self, name: &str) -> bool {
        matches!(self, Value::Atom(b) if b.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Looks up `key` in a `(KEY value KEY value ...)` list, case-insensitively.
pub fn lookup<'a>(pairs: &'a [Value], key: &str) -> Option<&'a Value> {
    pairs
        .chunks(2)
        .find(|kv| kv[0].is_atom(key))
        .and_then(|kv| kv.get(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    PreAuth,
}

/// A status response: `OK [CODE args] text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusResponse {
    pub status: Status,
    /// The response code, name first (`APPENDUID`, `UIDVALIDITY`, ...), if any.
    pub code: Option<Vec<Value>>,
    pub text: String,
}

impl StatusResponse {
    pub fn code_name(&self) -> Option<String> {
        self.code
            .as_ref()
            .and_then(|c| c.first())
            .and_then(Value::text)
            .map(|s| s.to_ascii_uppercase())
    }

    /// The response as the server said it, for error messages: `NO [OVERQUOTA] Quota exceeded`.
    pub fn describe(&self) -> String {
        let status = match self.status {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
            Status::Bye => "BYE",
            Status::PreAuth => "PREAUTH",
        };
        match self.code_name() {
            Some(code) => format!("{status} [{code}] {}", self.text),
            None => format!("{status} {}", self.text),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `+ text`: the server waits for a literal or a SASL response.
    Continuation(String),
    Tagged {
        tag: String,
        status: StatusResponse,
    },
    /// `* OK ...`, `* BYE ...`
    UntaggedStatus(StatusResponse),
    /// `* 12 FETCH (...)`, `* 3 EXISTS`
    Numbered {
        number: u32,
        name: String,
        data: Vec<Value>,
    },
    /// `* LIST ...`, `* STATUS ...`, `* CAPABILITY ...`: name upper-cased.
    Data {
        name: String,
        data: Vec<Value>,
    },
}

/// Parses one frame produced by [`Framer`].
pub fn parse_response(frame: Bytes) -> Result<Response, ParseError> {
    let mut p = Cursor {
        buf: frame,
        pos: 0,
        depth: 0,
    };
    p.trim_line_end();
    let tag = p.atom_text()?;
    if tag == "+" {
        p.skip_space();
        return Ok(Response::Continuation(p.rest_text()));
    }
    p.expect_space()?;
    if tag == "*" {
        let word = p.atom_text()?;
        if let Ok(number) = word.parse::<u32>() {
            p.expect_space()?;
            let name = p.atom_text()?.to_ascii_uppercase();
            let data = p.values()?;
            return Ok(Response::Numbered { number, name, data });
        }
        let upper = word.to_ascii_uppercase();
        if let Some(status) = status_word(&upper) {
            return Ok(Response::UntaggedStatus(p.status_rest(status)?));
        }
        let data = p.values()?;
        return Ok(Response::Data { name: upper, data });
    }
    let word = p.atom_text()?.to_ascii_uppercase();
    let status = status_word(&word)
        .ok_or_else(|| ParseError::Malformed(format!("tagged response with status {word:?}")))?;
    Ok(Response::Tagged {
        tag,
        status: p.status_rest(status)?,
    })
}

fn status_word(word: &str) -> Option<Status> {
    Some(match word {
        "OK" => Status::Ok,
        "NO" => Status::No,
        "BAD" => Status::Bad,
        "BYE" => Status::Bye,
        "PREAUTH" => Status::PreAuth,
        _ => return None,
    })
}

struct Cursor {
    buf: Bytes,
    pos: usize,
    /// Lists (and response codes) open around the current position.
    depth: usize,
}

impl Cursor {
    fn trim_line_end(&mut self) {
        let mut end = self.buf.len();
        while end > 0 && matches!(self.buf[end - 1], b'\r' | b'\n') {
            end -= 1;
        }
        self.buf.truncate(end);
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    fn expect_space(&mut self) -> Result<(), ParseError> {
        if self.peek() == Some(b' ') {
            self.skip_space();
            Ok(())
        } else {
            Err(self.malformed("expected a space"))
        }
    }

    fn malformed(&self, what: &str) -> ParseError {
        let start = self.pos.saturating_sub(20);
        let end = (self.pos + 20).min(self.buf.len());
        ParseError::Malformed(format!(
            "{what} at byte {} near {:?}",
            self.pos,
            String::from_utf8_lossy(&self.buf[start..end])
        ))
    }

    fn rest_text(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.buf[self.pos..])
            .trim()
            .to_string();
        self.pos = self.buf.len();
        text
    }

    fn atom_text(&mut self) -> Result<String, ParseError> {
        match self.atom()? {
            Value::Atom(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            _ => Err(self.malformed("expected an atom")),
        }
    }

    /// An atom; a `[...]` section inside it (as in `BODY[HEADER.FIELDS (X)]`) is kept whole.
    fn atom(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        let mut depth = 0usize;
        while let Some(b) = self.peek() {
            match b {
                b'[' => depth += 1,
                b']' if depth > 0 => depth -= 1,
                b' ' | b'(' | b')' if depth == 0 => break,
                _ => {}
            }
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.malformed("expected an atom"));
        }
        Ok(Value::Atom(self.buf.slice(start..self.pos)))
    }

    fn quoted(&mut self) -> Result<Value, ParseError> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.malformed("unterminated quoted string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Value::Str(Bytes::from(out)));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self
                        .peek()
                        .ok_or_else(|| self.malformed("dangling escape"))?;
                    out.push(c);
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn literal(&mut self) -> Result<Value, ParseError> {
        let close = self.buf[self.pos..]
            .iter()
            .position(|&b| b == b'}')
            .ok_or_else(|| self.malformed("unterminated literal announcement"))?;
        let spec = &self.buf[self.pos + 1..self.pos + close];
        let spec = spec.strip_suffix(b"+").unwrap_or(spec);
        let size: usize = std::str::from_utf8(spec)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.malformed("bad literal size"))?;
        self.pos += close + 1;
        if self.buf[self.pos..].starts_with(b"\r\n") {
            self.pos += 2;
        } else if self.buf[self.pos..].starts_with(b"\n") {
            self.pos += 1;
        } else {
            return Err(self.malformed("literal announcement not followed by a line end"));
        }
        if self.buf.len() - self.pos < size {
            return Err(self.malformed("literal shorter than announced"));
        }
        let value = Value::Str(self.buf.slice(self.pos..self.pos + size));
        self.pos += size;
        Ok(value)
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        match self.peek() {
            Some(b'(') => {
                // Recursion is bounded: a line of 300,000 `(` must be an error, not a
                // stack overflow that takes the process down.
                if self.depth >= MAX_DEPTH {
                    return Err(ParseError::TooDeep { limit: MAX_DEPTH });
                }
                self.pos += 1;
                self.depth += 1;
                let mut items = Vec::new();
                let list = loop {
                    self.skip_space();
                    match self.peek() {
                        Some(b')') => {
                            self.pos += 1;
                            break Ok(Value::List(items));
                        }
                        None => break Err(self.malformed("unterminated list")),
                        _ => match self.value() {
                            Ok(v) => items.push(v),
                            Err(e) => break Err(e),
                        },
                    }
                };
                self.depth -= 1;
                list
            }
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal(),
            // literal8 (RFC 3516 BINARY): `~{n}`
            Some(b'~') if self.buf.get(self.pos + 1) == Some(&b'{') => {
                self.pos += 1;
                self.literal()
            }
            Some(_) => {
                let atom = self.atom()?;
                Ok(if atom.is_atom("NIL") {
                    Value::Nil
                } else {
                    atom
                })
            }
            None => Err(self.malformed("expected a value")),
        }
    }

    fn values(&mut self) -> Result<Vec<Value>, ParseError> {
        let mut out = Vec::new();
        loop {
            self.skip_space();
            if self.peek().is_none() {
                return Ok(out);
            }
            out.push(self.value()?);
        }
    }

    /// After `OK`/`NO`/...: an optional `[CODE args]` and free text.
    fn status_rest(&mut self, status: Status) -> Result<StatusResponse, ParseError> {
        self.skip_space();
        let mut code = None;
        if self.peek() == Some(b'[') {
            let mut depth = 0usize;
            let mut end = None;
            for (i, &b) in self.buf[self.pos..].iter().enumerate() {
                match b {
                    b'[' => depth += 1,
                    b']' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(self.pos + i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let end = end.ok_or_else(|| self.malformed("unterminated response code"))?;
            let mut inner = Cursor {
                buf: self.buf.slice(self.pos + 1..end),
                pos: 0,
                depth: self.depth + 1,
            };
            // A code we cannot parse is kept as its raw text rather than failing the
            // whole response: the status and text still matter.
            code = Some(
                inner
                    .values()
                    .unwrap_or_else(|_| vec![Value::Atom(self.buf.slice(self.pos + 1..end))]),
            );
            self.pos = end + 1;
        }
        Ok(StatusResponse {
            status,
            code,
            text: self.rest_text(),
        })
    }
}

/// Consumes and returns the bytes `Framer` would leave: used by tests to feed byte scripts.
pub fn split_all(input: &[u8], framer: &mut Framer) -> Result<Vec<Response>, ParseError> {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(frame) = framer.next_frame(&mut buf)? {
        out.push(parse_response(frame)?);
    }
    if buf.has_remaining() {
        return Err(ParseError::Malformed("trailing partial response".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framer() -> Framer {
        Framer::new(1024, 1 << 20)
    }

    #[test]
    fn fetch_with_literal_body_survives_byte_by_byte_delivery() {
        let body = b"Subject: x\r\n\r\nline with ) and ( and {5}\r\n";
        let mut wire = format!(
            "* 1 FETCH (UID 7 FLAGS (\\Seen $Forwarded) INTERNALDATE \"01-Jan-2020 10:00:00 +0100\" RFC822.SIZE {} BODY[] {{{}}}\r\n",
            body.len(),
            body.len()
        )
        .into_bytes();
        wire.extend_from_slice(body);
        wire.extend_from_slice(b")\r\na1 OK [APPENDUID 3 9:10] done\r\n");
        let mut f = framer();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in &wire {
            buf.extend_from_slice(&[*b]);
            while let Some(frame) = f.next_frame(&mut buf).unwrap() {
                frames.push(parse_response(frame).unwrap());
            }
        }
        assert_eq!(frames.len(), 2);
        let Response::Numbered { number, name, data } = &frames[0] else {
            panic!("{:?}", frames[0])
        };
        assert_eq!((*number, name.as_str()), (1, "FETCH"));
        let items = data[0].list().unwrap();
        assert_eq!(lookup(items, "UID").unwrap().number(), Some(7));
        assert_eq!(
            lookup(items, "BODY[]").unwrap().bytes().unwrap().as_ref(),
            body
        );
        let flags = lookup(items, "FLAGS").unwrap().list().unwrap();
        assert!(flags[1].is_atom("$forwarded"));
        let Response::Tagged { tag, status } = &frames[1] else {
            panic!()
        };
        assert_eq!(tag, "a1");
        assert_eq!(status.code_name().as_deref(), Some("APPENDUID"));
        assert_eq!(status.code.as_ref().unwrap()[2].text().unwrap(), "9:10");
    }

    #[test]
    fn list_status_and_codes() {
        let wire = b"* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent Items\"\r\n\
* LIST (\\Noselect) NIL {5}\r\nA\"b\\c\r\n\
* STATUS \"INBOX\" (MESSAGES 3 UIDNEXT 4 UIDVALIDITY 99 HIGHESTMODSEQ 12)\r\n\
* OK [PERMANENTFLAGS (\\Seen \\*)] Flags permitted.\r\n\
* BODY[HEADER.FIELDS (MESSAGE-ID)] x\r\n\
+ go ahead\r\n\
t2 NO [UNAVAILABLE] Suggested Backoff Time: 500 ms\r\n";
        let r = split_all(wire, &mut framer()).unwrap();
        let Response::Data { name, data } = &r[0] else {
            panic!()
        };
        assert_eq!(name, "LIST");
        assert_eq!(data[2].text().unwrap(), "Sent Items");
        let Response::Data { data, .. } = &r[1] else {
            panic!()
        };
        assert_eq!(data[1], Value::Nil);
        assert_eq!(data[2].bytes().unwrap().as_ref(), b"A\"b\\c");
        let Response::Data { data, .. } = &r[2] else {
            panic!()
        };
        assert_eq!(
            lookup(data[1].list().unwrap(), "uidnext").unwrap().number(),
            Some(4)
        );
        let Response::UntaggedStatus(s) = &r[3] else {
            panic!()
        };
        assert_eq!(s.code_name().as_deref(), Some("PERMANENTFLAGS"));
        assert_eq!(s.text, "Flags permitted.");
        let Response::Data { name, .. } = &r[4] else {
            panic!()
        };
        assert_eq!(name, "BODY[HEADER.FIELDS (MESSAGE-ID)]");
        assert_eq!(r[5], Response::Continuation("go ahead".into()));
        let Response::Tagged { status, .. } = &r[6] else {
            panic!()
        };
        assert_eq!(status.status, Status::No);
        assert_eq!(
            status.describe(),
            "NO [UNAVAILABLE] Suggested Backoff Time: 500 ms"
        );
    }

    #[test]
    fn bounds_are_enforced() {
        let mut f = Framer::new(16, 100);
        let mut buf = BytesMut::from(&b"* OK this line is far too long\r\n"[..]);
        assert!(matches!(
            f.next_frame(&mut buf),
            Err(ParseError::LineTooLong { .. })
        ));
        let mut f = Framer::new(1024, 100);
        let mut buf = BytesMut::from(&b"* 1 FETCH (BODY[] {101}\r\n"[..]);
        assert_eq!(
            f.next_frame(&mut buf),
            Err(ParseError::LiteralTooLarge {
                size: 101,
                limit: 100
            })
        );
        // a line without a line feed that grows past the bound is refused too
        let mut f = Framer::new(8, 100);
        let mut buf = BytesMut::from(&b"* OK no newline yet"[..]);
        assert!(f.next_frame(&mut buf).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = |n: usize| {
            let mut line = b"* 1 FETCH ".to_vec();
            line.extend(std::iter::repeat_n(b'(', n));
            line.extend(std::iter::repeat_n(b')', n));
            line.extend_from_slice(b"\r\n");
            line
        };
        let mut f = Framer::new(1 << 20, 1 << 20);
        assert!(split_all(&deep(MAX_DEPTH), &mut f).is_ok());
        assert_eq!(
            split_all(&deep(MAX_DEPTH + 1), &mut f),
            Err(ParseError::TooDeep { limit: MAX_DEPTH })
        );
        assert_eq!(
            split_all(&deep(300_000), &mut f),
            Err(ParseError::TooDeep { limit: MAX_DEPTH })
        );
        // The same inside a greeting's response code: the code falls back to its raw
        // text, the greeting itself still parses.
        let mut greeting = b"* OK [X ".to_vec();
        greeting.extend(std::iter::repeat_n(b'(', 300_000));
        greeting.extend(std::iter::repeat_n(b')', 300_000));
        greeting.extend_from_slice(b"] hi\r\n");
        let r = split_all(&greeting, &mut f).unwrap();
        let Response::UntaggedStatus(s) = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!((s.status, s.text.as_str()), (Status::Ok, "hi"));
    }

    #[test]
    fn bounds_hold_for_a_whole_response_not_each_piece() {
        // endless empty literals: the text between them adds up to the line bound
        let mut f = Framer::new(1000, 1 << 20);
        let mut buf = BytesMut::from(&b"* 1 FETCH (X "[..]);
        let mut outcome = Ok(None);
        for _ in 0..1000 {
            buf.extend_from_slice(b"{0}\r\n");
            outcome = f.next_frame(&mut buf);
            if outcome.is_err() {
                break;
            }
        }
        assert_eq!(outcome, Err(ParseError::LineTooLong { limit: 1000 }));
        // literals add up to the literal bound
        let mut f = Framer::new(1000, 100);
        let mut buf = BytesMut::from(&b"* 1 FETCH (A {60}\r\n"[..]);
        buf.extend_from_slice(&[b'a'; 60]);
        buf.extend_from_slice(b" B {60}\r\n");
        assert_eq!(
            f.next_frame(&mut buf),
            Err(ParseError::LiteralTooLarge {
                size: 120,
                limit: 100
            })
        );
        // and the counts start again with the next response
        let mut f = Framer::new(30, 100);
        let wire = b"* 1 FETCH (A {60}\r\n".iter().copied();
        let mut two = wire.clone().collect::<Vec<u8>>();
        two.extend_from_slice(&[b'a'; 60]);
        two.extend_from_slice(b")\r\n");
        let twice = [two.clone(), two].concat();
        assert_eq!(split_all(&twice, &mut f).unwrap().len(), 2);
    }

    #[test]
    fn literal8_carries_nul_bytes() {
        let wire = b"* 1 FETCH (BINARY[] ~{3}\r\na\0b)\r\n";
        let r = split_all(wire, &mut framer()).unwrap();
        let Response::Numbered { data, .. } = &r[0] else {
            panic!()
        };
        let items = data[0].list().unwrap();
        assert_eq!(
            lookup(items, "BINARY[]").unwrap().bytes().unwrap().as_ref(),
            b"a\0b"
        );
    }

    #[test]
    fn literal_that_looks_like_a_line_end_inside_is_not_split() {
        // the literal contains "\r\n* 2 FETCH" which must stay body bytes
        let wire = b"* 1 FETCH (BODY[] {13}\r\nab\r\n* 2 FETCH)\r\n";
        let r = split_all(wire, &mut framer()).unwrap();
        assert_eq!(r.len(), 1);
    }
}
