//! Message flags as values that are safe to send to another server.
//!
//! A flag read from one server is written into another server's command (`APPEND mbox
//! (flags) …`, `UID STORE … FLAGS.SILENT (flags)`) without quoting: IMAP has no quoted
//! form for flags. A [`Flag`] can only be made from an atom that fits RFC 3501's `flag`
//! grammar, so a quoted string or literal in a hostile server's FLAGS list (which could
//! carry `)\r\nZ1 DELETE …`) never becomes one, and no command builder has to remember a
//! check of its own.

use std::fmt;

use super::parse::Value;

/// A system flag (`\Seen`) or keyword (`$Forwarded`, `NonJunk`), as the server spelled it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flag(String);

impl Flag {
    /// The flag an atom names, if it is a valid flag. Quoted strings, literals, NIL and
    /// lists are not flags.
    pub fn from_value(value: &Value) -> Option<Flag> {
        match value {
            Value::Atom(bytes) => Flag::parse(std::str::from_utf8(bytes).ok()?),
            _ => None,
        }
    }

    /// `text` as a flag: an optional leading `\` and then one or more atom characters
    /// (RFC 3501: any CHAR except `( ) { SP CTL % * " \ ]`).
    pub fn parse(text: &str) -> Option<Flag> {
        let name = text.strip_prefix('\\').unwrap_or(text);
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b));
        valid.then(|| Flag(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `\Recent` is the server's own and can be neither set nor copied.
    pub fn is_recent(&self) -> bool {
        self.0.eq_ignore_ascii_case("\\recent")
    }

    /// Flags compare case-insensitively; this is the form to compare by.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    /// A parenthesised flag list for a command: `(\Seen $Forwarded)`.
    pub fn list(flags: &[Flag]) -> String {
        let mut out = String::from("(");
        for (i, f) in flags.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(&f.0);
        }
        out.push(')');
        out
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn only_atoms_of_the_flag_grammar_are_flags() {
        for ok in ["\\Seen", "$Forwarded", "NonJunk", "$label1", "x.y-z_1"] {
            assert_eq!(Flag::parse(ok).map(|f| f.to_string()).as_deref(), Some(ok));
        }
        for bad in [
            "",
            "\\",
            "a b",
            "x)\r\nZ1 DELETE \"Archive\"\r\nZ2 NOOP (y",
            "a(b",
            "a{5}",
            "50%",
            "*",
            "\\*",
            "q\"",
            "a]",
            "caf\u{e9}",
            "tab\there",
            "nul\0",
        ] {
            assert_eq!(Flag::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quoted_strings_and_literals_are_never_flags() {
        let injected = Bytes::from_static(b"x)\r\nZ1 DELETE \"Archive/2021\"\r\nZ2 NOOP (y");
        assert_eq!(Flag::from_value(&Value::Str(injected)), None);
        assert_eq!(
            Flag::from_value(&Value::Str(Bytes::from_static(b"ok"))),
            None
        );
        assert_eq!(Flag::from_value(&Value::Nil), None);
        assert_eq!(
            Flag::from_value(&Value::Atom(Bytes::from_static(b"\\Answered"))),
            Flag::parse("\\Answered")
        );
    }

    #[test]
    fn a_flag_list_is_parenthesised() {
        let flags: Vec<Flag> = ["\\Seen", "$x"]
            .iter()
            .filter_map(|f| Flag::parse(f))
            .collect();
        assert_eq!(Flag::list(&flags), "(\\Seen $x)");
        assert_eq!(Flag::list(&[]), "()");
    }
}
