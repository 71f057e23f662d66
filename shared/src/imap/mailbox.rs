//! Mailbox-level operations on a session: LIST, SELECT/EXAMINE, STATUS, CREATE.
//! Each turns server responses into plain data the engine and planner work with.

use std::collections::HashMap;

use bytes::Bytes;

use super::client::{check, Command, Session};
use super::parse::{lookup, Response, Status, Value};
use crate::error::Error;

/// A server's personal namespace: the prefix its folders live under and its delimiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub prefix: String,
    pub delimiter: Option<char>,
}

/// One folder as LIST reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// The name as it is on the wire (modified UTF-7 unless the server says otherwise).
    pub wire_name: Bytes,
    pub delimiter: Option<char>,
    /// Attributes, lower-cased: `\noselect`, `\sent`, ...
    pub attributes: Vec<String>,
}

impl ListEntry {
    pub fn has(&self, attr: &str) -> bool {
        self.attributes.iter().any(|a| a.eq_ignore_ascii_case(attr))
    }

    pub fn selectable(&self) -> bool {
        !self.has("\\noselect") && !self.has("\\nonexistent")
    }
}

/// What SELECT or EXAMINE says about a folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxInfo {
    pub exists: u32,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub highestmodseq: Option<u64>,
    /// Flags that can be stored permanently, lower-cased; `\*` means any keyword.
    pub permanent_flags: Vec<String>,
}

impl MailboxInfo {
    /// Whether a flag may be set here: system flags listed, keywords listed or `\*`.
    pub fn accepts_flag(&self, flag: &str) -> bool {
        let lower = flag.to_ascii_lowercase();
        if self.permanent_flags.contains(&lower) {
            return true;
        }
        !lower.starts_with('\\') && self.permanent_flags.iter().any(|f| f == "\\*")
    }
}

/// What STATUS says about a folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderStatus {
    pub messages: u32,
    pub uidnext: u32,
    pub uidvalidity: u32,
    pub highestmodseq: Option<u64>,
    /// Total size in octets, when the server supports STATUS=SIZE.
    pub size: Option<u64>,
}

/// What a STATUS asks for beyond MESSAGES, UIDNEXT, UIDVALIDITY and (where the server
/// has STATUS=SIZE) SIZE.
#[derive(Debug, Clone, Copy)]
pub struct StatusItems {
    /// HIGHESTMODSEQ, where the server has CONDSTORE: for a source, whose changes later
    /// passes read by modification sequence. Not for a target (see [`Session::select`]).
    pub modseq: bool,
}

impl StatusItems {
    pub const SOURCE: StatusItems = StatusItems { modseq: true };
    pub const TARGET: StatusItems = StatusItems { modseq: false };
}

/// `name`'s entry in statuses keyed by wire name; INBOX matches in any case (a server
/// may answer `inbox` with `INBOX`).
pub fn status_of<'a>(
    statuses: &'a HashMap<Bytes, FolderStatus>,
    name: &[u8],
) -> Option<&'a FolderStatus> {
    statuses.get(name).or_else(|| {
        if !name.eq_ignore_ascii_case(b"INBOX") {
            return None;
        }
        statuses
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(b"INBOX"))
            .map(|(_, v)| v)
    })
}

impl Session {
    /// LIST "" "*", with special-use attributes where the server can return them.
    pub async fn list_all(&mut self) -> Result<Vec<ListEntry>, Error> {
        Ok(self.list_with_status(None).await?.0)
    }

    /// LIST "" "*" and, where the server has LIST-STATUS (RFC 5819) and `status` asks
    /// for it, every listed folder's STATUS in the same command: one round trip and one
    /// command instead of a STATUS per folder. The map holds what the server answered,
    /// by wire name; a folder it left out (RFC 5819 lets a server skip one whose STATUS
    /// fails) is simply absent, and so is everything without LIST-STATUS.
    pub async fn list_with_status(
        &mut self,
        status: Option<StatusItems>,
    ) -> Result<(Vec<ListEntry>, HashMap<Bytes, FolderStatus>), Error> {
        let caps = self.capabilities();
        let mut returns = Vec::new();
        if caps.has("LIST-EXTENDED") && caps.has("SPECIAL-USE") {
            returns.push("SPECIAL-USE".to_string());
        }
        if let Some(items) = status.filter(|_| caps.has("LIST-STATUS")) {
            returns.push(format!("STATUS {}", self.status_items(items)));
        }
        let command = if returns.is_empty() {
            Command::new("LIST \"\" \"*\"")
        } else {
            Command::new("LIST \"\" \"*\"").raw(format!(" RETURN ({})", returns.join(" ")))
        };
        let untagged = self.run(command).await?;
        let statuses = untagged.iter().filter_map(parse_status).collect();
        Ok((untagged.iter().filter_map(parse_list).collect(), statuses))
    }

    /// EXAMINE a folder to read it: with CONDSTORE where the server has it, so the
    /// answer carries HIGHESTMODSEQ and later passes read only what changed.
    pub async fn examine(&mut self, wire_name: &[u8]) -> Result<MailboxInfo, Error> {
        let mut command = Command::new("EXAMINE").arg(wire_name);
        if self.capabilities().has("CONDSTORE") {
            command = command.raw(" (CONDSTORE)");
        }
        self.opened(command).await
    }

    /// SELECT a folder to write to it. Without CONDSTORE: nothing reads a target's
    /// modification sequences, and asking for them makes Dovecot keep them up for the
    /// folder from then on (work on every APPEND).
    pub async fn select(&mut self, wire_name: &[u8]) -> Result<MailboxInfo, Error> {
        self.opened(Command::new("SELECT").arg(wire_name)).await
    }

    async fn opened(&mut self, command: Command) -> Result<MailboxInfo, Error> {
        let untagged = self.run(command).await?;
        let mut info = MailboxInfo::default();
        for r in &untagged {
            match r {
                Response::Numbered { number, name, .. } if name == "EXISTS" => {
                    info.exists = *number
                }
                Response::UntaggedStatus(s) if s.status == Status::Ok => {
                    let code = s.code.as_deref().unwrap_or_default();
                    let arg = code.get(1);
                    match s.code_name().as_deref() {
                        Some("UIDVALIDITY") => info.uidvalidity = number32(arg),
                        Some("UIDNEXT") => info.uidnext = number32(arg),
                        Some("HIGHESTMODSEQ") => info.highestmodseq = Some(number(arg)),
                        Some("PERMANENTFLAGS") => {
                            info.permanent_flags = flag_list(arg);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// The account's storage quota, where the server announces QUOTA (RFC 9208):
    /// `GETQUOTAROOT INBOX`, and of the roots' STORAGE resources the one with the least
    /// room. `None` without QUOTA, without a STORAGE limit, or when the server refuses.
    pub async fn storage_quota(&mut self) -> Result<Option<Quota>, Error> {
        if !self.capabilities().has("QUOTA") {
            return Ok(None);
        }
        let untagged = match self.run(Command::new("GETQUOTAROOT").arg(b"INBOX")).await {
            Ok(untagged) => untagged,
            Err(Error::Command { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(untagged
            .iter()
            .filter_map(parse_storage_quota)
            .min_by_key(|q| q.limit_bytes.saturating_sub(q.used_bytes)))
    }

    /// The STATUS items to ask for, in parentheses.
    fn status_items(&self, items: StatusItems) -> String {
        let mut out = String::from("(MESSAGES UIDNEXT UIDVALIDITY");
        if items.modseq && self.capabilities().has("CONDSTORE") {
            out.push_str(" HIGHESTMODSEQ");
        }
        if self.capabilities().has("STATUS=SIZE") {
            out.push_str(" SIZE");
        }
        out.push(')');
        out
    }

    /// STATUS for many folders in one round trip. A folder the server refuses gets its
    /// own error; the others still answer.
    pub async fn status_many(
        &mut self,
        wire_names: &[Bytes],
        items: StatusItems,
    ) -> Result<Vec<Result<FolderStatus, Error>>, Error> {
        let items = format!(" {}", self.status_items(items));
        let mut handles = Vec::with_capacity(wire_names.len());
        for name in wire_names {
            handles.push(
                self.send(Command::new("STATUS").arg(name).raw(&items))
                    .await?,
            );
        }
        // Match answers to folders by the name in the STATUS response, not by command
        // order: a server may run pipelined commands in parallel.
        let mut completions = Vec::with_capacity(handles.len());
        let mut by_name: HashMap<Bytes, FolderStatus> = HashMap::new();
        for handle in handles {
            let (untagged, status) = handle.finish().await?;
            for r in &untagged {
                if let Some((name, st)) = parse_status(r) {
                    by_name.insert(name, st);
                }
            }
            completions.push(status);
        }
        Ok(wire_names
            .iter()
            .zip(completions)
            .map(|(name, status)| {
                check("STATUS", status)?;
                status_of(&by_name, name).cloned().ok_or_else(|| {
                    Error::Protocol(super::parse::ParseError::Malformed(format!(
                        "STATUS {:?} answered OK without data",
                        String::from_utf8_lossy(name)
                    )))
                })
            })
            .collect())
    }

    /// CREATE and SUBSCRIBE many folders, pipelined. "Already exists" is success.
    pub async fn create_all(
        &mut self,
        wire_names: &[Bytes],
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let mut handles = Vec::new();
        for name in wire_names {
            let create = self.send(Command::new("CREATE").arg(name)).await?;
            let subscribe = self.send(Command::new("SUBSCRIBE").arg(name)).await?;
            handles.push((create, subscribe));
        }
        let mut out = Vec::new();
        for (create, subscribe) in handles {
            let (_, status) = create.finish().await?;
            let created = match status.status {
                Status::Ok => Ok(()),
                _ if status.code_name().as_deref() == Some("ALREADYEXISTS")
                    || status.text.to_ascii_lowercase().contains("exists") =>
                {
                    Ok(())
                }
                _ => check("CREATE", status).map(|_| ()),
            };
            // A failed SUBSCRIBE is cosmetic: the folder is there.
            let _ = subscribe.finish().await?;
            out.push(created);
        }
        Ok(out)
    }
}

fn parse_status(r: &Response) -> Option<(Bytes, FolderStatus)> {
    let Response::Data { name, data } = r else {
        return None;
    };
    if name != "STATUS" {
        return None;
    }
    let mailbox = data.first()?.bytes()?.clone();
    let pairs = data.get(1).and_then(Value::list).unwrap_or_default();
    let get = |k| lookup(pairs, k).and_then(Value::number);
    let get32 = |k| lookup(pairs, k).and_then(Value::number32);
    Some((
        mailbox,
        FolderStatus {
            messages: get32("MESSAGES").unwrap_or(0),
            uidnext: get32("UIDNEXT").unwrap_or(0),
            uidvalidity: get32("UIDVALIDITY").unwrap_or(0),
            highestmodseq: get("HIGHESTMODSEQ"),
            size: get("SIZE"),
        },
    ))
}

/// Storage at a quota root: what is used and the limit, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Quota {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

/// `* QUOTA "root" (STORAGE 10 512 MESSAGE 4 1000)`: the STORAGE resource, whose units
/// are 1024 octets. Numbers past what a u64 of bytes holds are not a quota.
fn parse_storage_quota(r: &Response) -> Option<Quota> {
    let Response::Data { name, data } = r else {
        return None;
    };
    if name != "QUOTA" {
        return None;
    }
    let resources = data.get(1)?.list()?;
    resources.chunks(3).find_map(|triple| match triple {
        [resource, used, limit] if resource.is_atom("STORAGE") => Some(Quota {
            used_bytes: used.number()?.checked_mul(1024)?,
            limit_bytes: limit.number()?.checked_mul(1024)?,
        }),
        _ => None,
    })
}

fn number(v: Option<&Value>) -> u64 {
    v.and_then(Value::number).unwrap_or(0)
}

/// 0 (unknown) for a value past 32 bits, which no UIDVALIDITY or UIDNEXT can be.
fn number32(v: Option<&Value>) -> u32 {
    v.and_then(Value::number32).unwrap_or(0)
}

fn flag_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::list)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::text)
        .map(|f| f.to_ascii_lowercase())
        .collect()
}

fn parse_list(r: &Response) -> Option<ListEntry> {
    let Response::Data { name, data } = r else {
        return None;
    };
    if name != "LIST" || data.len() < 3 {
        return None;
    }
    let attributes = flag_list(data.first());
    let delimiter = match &data[1] {
        Value::Str(b) | Value::Atom(b) => b.first().map(|&c| c as char),
        _ => None,
    };
    let wire_name = data[2].bytes()?.clone();
    Some(ListEntry {
        wire_name,
        delimiter,
        attributes,
    })
}

impl Session {
    /// The personal namespace (prefix and delimiter), from NAMESPACE when the server has
    /// it, else from LIST's delimiter with no prefix.
    pub async fn personal_namespace(&mut self, listed: &[ListEntry]) -> Result<Namespace, Error> {
        let from_list = listed.iter().find_map(|e| e.delimiter);
        if self.capabilities().has("NAMESPACE") {
            let untagged = self.run(Command::new("NAMESPACE")).await?;
            for r in &untagged {
                if let Response::Data { name, data } = r {
                    if name != "NAMESPACE" {
                        continue;
                    }
                    let first = data.first().and_then(Value::list).and_then(|l| l.first());
                    if let Some(personal) = first.and_then(Value::list) {
                        let prefix = personal.first().and_then(Value::text).unwrap_or_default();
                        let delimiter = personal
                            .get(1)
                            .and_then(Value::bytes)
                            .and_then(|b| b.first().map(|&c| c as char))
                            .or(from_list);
                        return Ok(Namespace {
                            prefix: crate::domain::mutf7::decode_lenient(prefix.as_bytes()),
                            delimiter,
                        });
                    }
                }
            }
        }
        Ok(Namespace {
            prefix: String::new(),
            delimiter: from_list,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn list_status_answers_are_found_by_wire_name_and_inbox_in_any_case() {
        use super::*;
        let answer = |line: &str| {
            parse_status(
                &crate::imap::parse::parse_response(Bytes::from(format!("{line}\r\n"))).unwrap(),
            )
            .unwrap()
        };
        let statuses: HashMap<Bytes, FolderStatus> = [
            answer("* STATUS \"inbox\" (MESSAGES 3 UIDNEXT 9 UIDVALIDITY 7 SIZE 100)"),
            answer("* STATUS \"Sent\" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 8 HIGHESTMODSEQ 5)"),
        ]
        .into_iter()
        .collect();
        let inbox = status_of(&statuses, b"INBOX").expect("INBOX in any case");
        assert_eq!(
            (inbox.messages, inbox.uidnext, inbox.size),
            (3, 9, Some(100))
        );
        assert_eq!(
            status_of(&statuses, b"Sent").unwrap().highestmodseq,
            Some(5)
        );
        // Other names match exactly: `sent` is another folder, unlisted.
        assert!(status_of(&statuses, b"sent").is_none());
        assert!(status_of(&statuses, b"Drafts").is_none());
    }

    #[test]
    fn a_storage_quota_is_read_in_bytes_and_nonsense_is_none() {
        use super::*;
        let parse = |line: &str| {
            let frame = Bytes::from(format!("{line}\r\n"));
            parse_storage_quota(&crate::imap::parse::parse_response(frame).unwrap())
        };
        assert_eq!(
            parse("* QUOTA \"User quota\" (MESSAGE 4 1000 STORAGE 10 512)"),
            Some(Quota {
                used_bytes: 10 * 1024,
                limit_bytes: 512 * 1024
            })
        );
        assert_eq!(parse("* QUOTA \"\" (MESSAGE 4 1000)"), None);
        assert_eq!(parse("* QUOTA \"\" (STORAGE 1 99999999999999999999)"), None);
        assert_eq!(parse("* QUOTA \"\" (STORAGE 1 18014398509481984)"), None);
        assert_eq!(parse("* QUOTAROOT INBOX \"User quota\""), None);
    }

    use super::*;
    use crate::imap::parse::{split_all, Framer};

    #[test]
    fn status_numbers_past_32_bits_are_unknown_not_wrapped() {
        let wire = b"* STATUS INBOX (MESSAGES 4294967297 UIDNEXT 99999999999 UIDVALIDITY 7)\r\n";
        let r = split_all(wire, &mut Framer::new(1 << 20, 1 << 20)).unwrap();
        let (_, st) = parse_status(&r[0]).unwrap();
        assert_eq!((st.messages, st.uidnext, st.uidvalidity), (0, 0, 7));
    }
}
