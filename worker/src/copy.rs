//! The pipelined copy of a list of messages from the selected source folder to a target
//! folder. Bodies stream from `UID FETCH` straight into `APPEND`s (LITERAL+, grouped
//! into MULTIAPPENDs where the target has it) while earlier APPENDs are still being
//! answered, so the copy is bound by the servers rather than by round trips.
//!
//! Memory is bounded by a byte budget shared by every job of the process: a FETCH is
//! only sent once the budget holds the sizes of its messages, and each message's share
//! is returned as soon as its APPEND has been written to the target socket.
//!
//! FETCH data is matched to its batch by UID, never by command order: servers may run
//! pipelined UID FETCHes in parallel (Dovecot does), so the next batch's messages can
//! arrive before the previous batch's completion.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use mailferry_shared::error::is_throttling;
use mailferry_shared::failpoint;
use mailferry_shared::imap::client::{check, Command, CommandHandle, Expect, Session};
use mailferry_shared::imap::mailbox::MailboxInfo;
use mailferry_shared::imap::parse::Status;
use mailferry_shared::imap::uidset;
use mailferry_shared::imap::Flag;
use mailferry_shared::redis::lease::Fence;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::JobError;
use mailferry_shared::imap::message::{parse_fetch, Meta};

/// How a copy is cut into commands.
#[derive(Debug, Clone)]
pub struct CopySettings {
    /// Messages per source FETCH.
    pub fetch_messages: usize,
    /// Bytes per source FETCH (a single larger message goes alone).
    pub fetch_bytes: u64,
    /// Messages per APPEND when the target has MULTIAPPEND (1 = one per APPEND).
    pub multiappend: usize,
    /// Bytes per (MULTI)APPEND group.
    pub append_bytes: u64,
    /// APPEND commands awaiting their answer before we wait for the oldest.
    pub append_window: usize,
}

/// A shared budget of bytes in flight, counted in KiB.
#[derive(Clone)]
pub struct ByteBudget {
    semaphore: Arc<Semaphore>,
    capacity_kib: u32,
}

impl ByteBudget {
    pub fn new(bytes: u64) -> Self {
        let capacity_kib = (bytes / 1024).clamp(1024, u64::from(u32::MAX >> 4)) as u32;
        ByteBudget {
            semaphore: Arc::new(Semaphore::new(capacity_kib as usize)),
            capacity_kib,
        }
    }

    /// A message's weight: its size in KiB, at most the whole budget so a message larger
    /// than the budget can still pass (alone).
    fn weight(&self, size: u64) -> u32 {
        (size / 1024 + 1).min(u64::from(self.capacity_kib)) as u32
    }
}

/// The target folder being appended to.
pub struct TargetFolder<'a> {
    pub wire_name: &'a [u8],
    pub info: &'a MailboxInfo,
    pub multiappend: bool,
    pub binary: bool,
    /// The target advertises UIDPLUS: its APPENDUID codes are trusted (RFC 4315 defines
    /// them; a server that does not advertise the extension promises nothing).
    pub uidplus: bool,
    /// Shut when this run may no longer write to the folder (its claim lapsed, or the
    /// user was stopped): checked before every APPEND group goes out.
    pub fence: &'a Fence,
}

impl TargetFolder<'_> {
    /// The flags of a message that the target can keep.
    pub fn keepable(&self, flags: &[Flag]) -> Vec<Flag> {
        flags
            .iter()
            .filter(|f| !f.is_recent())
            .filter(|f| self.info.permanent_flags.is_empty() || self.info.accepts_flag(f.as_str()))
            .cloned()
            .collect()
    }
}

/// What became of one source message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// At the target; its target UID when the server reported it (UIDPLUS).
    Copied { target_uid: Option<u32>, size: u64 },
    /// The target refused it; the reason is the server's answer.
    Refused(String),
    /// Asked for but not returned by the source (expunged meanwhile, or a server
    /// quirk). Not handled: the next pass asks again.
    Missed,
}

/// Copies `metas` (all from the source folder selected on `source`). Returns the outcome
/// per UID and the UIDs whose MULTIAPPEND group was refused as a whole, which the caller
/// copies again one per APPEND to find the culprit.
pub async fn copy_messages(
    source: &mut Session,
    target: &mut Session,
    metas: &[Meta],
    folder: &TargetFolder<'_>,
    settings: &CopySettings,
    budget: &ByteBudget,
    on_copied: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(Vec<(u32, Outcome)>, Vec<u32>), JobError> {
    let by_uid: HashMap<u32, &Meta> = metas.iter().map(|m| (m.uid, m)).collect();
    let batches = plan_batches(metas, settings, budget);
    let group_limit = if folder.multiappend {
        settings.multiappend.max(1)
    } else {
        1
    };

    let mut outcomes = Vec::with_capacity(metas.len());
    let mut regroup = Vec::new();
    let mut fetches: VecDeque<OpenFetch> = VecDeque::new();
    let mut appends: VecDeque<OpenAppend> = VecDeque::new();
    let mut group = Group::default();
    let mut next_batch = 0;

    loop {
        // Keep up to two FETCHes open so the source never idles between batches. Wait for
        // budget only when nothing of ours is in flight: the budget we hold is returned
        // by the work below, so waiting with work in flight could wait for ourselves.
        while fetches.len() < 2 && next_batch < batches.len() {
            let batch = &batches[next_batch];
            let permit = if fetches.is_empty() && group.is_empty() {
                budget
                    .semaphore
                    .clone()
                    .acquire_many_owned(batch.weight)
                    .await
                    .expect("the byte budget is never closed")
            } else {
                match budget
                    .semaphore
                    .clone()
                    .try_acquire_many_owned(batch.weight)
                {
                    Ok(p) => p,
                    Err(_) => break,
                }
            };
            let command = Command::new("UID FETCH").raw(format!(
                " {} (UID FLAGS INTERNALDATE BODY.PEEK[])",
                uidset::format(&batch.uids)
            ));
            let handle = source
                .send_expecting(command, batch.expect())
                .await
                .map_err(JobError::source_side)?;
            fetches.push_back(OpenFetch {
                handle,
                permit,
                expected: batch
                    .uids
                    .iter()
                    .map(|u| (*u, budget.weight(by_uid[u].size)))
                    .collect(),
            });
            next_batch += 1;
        }
        let Some(front) = fetches.front_mut() else {
            break;
        };
        let next = front.handle.next().await;
        match next {
            Some(response) => {
                let Some(fetched) = parse_fetch(&response) else {
                    continue;
                };
                let (Some(uid), Some(body)) = (fetched.uid, fetched.body) else {
                    continue; // an unsolicited flag update, not our data
                };
                let Some((owner, weight)) = fetches
                    .iter_mut()
                    .enumerate()
                    .find_map(|(i, f)| f.expected.remove(&uid).map(|w| (i, w)))
                else {
                    continue; // not asked for, or already received
                };
                failpoint::hit("mid-fetch");
                let permit = fetches[owner].permit.split(weight as usize);
                let meta = by_uid[&uid];
                let flags = folder.keepable(fetched.flags.as_deref().unwrap_or(&meta.flags));
                let date = fetched
                    .internal_date
                    .unwrap_or_else(|| meta.internal_date.clone());
                if !group.is_empty()
                    && (group.uids.len() >= group_limit
                        || group.bytes + body.len() as u64 > settings.append_bytes)
                {
                    flush(target, &mut group, &mut appends, folder.fence).await?;
                }
                group.push(uid, &flags, &date, body, folder, permit);
                if group.uids.len() >= group_limit {
                    flush(target, &mut group, &mut appends, folder.fence).await?;
                }
                while appends.len() > settings.append_window {
                    let done = appends.pop_front().expect("non-empty");
                    settle(done, folder.uidplus, &mut outcomes, &mut regroup, on_copied).await?;
                }
            }
            None => {
                let done = fetches.pop_front().expect("front exists");
                let (_, status) = done.handle.finish().await.map_err(JobError::source_side)?;
                check("UID FETCH", status).map_err(JobError::source_side)?;
                // Whatever this command was asked for and did not return. (A later
                // batch's data that arrived early was already taken off its list.)
                for uid in done.expected.keys() {
                    outcomes.push((*uid, Outcome::Missed));
                }
                // Hand what we have to the target now rather than idling it.
                flush(target, &mut group, &mut appends, folder.fence).await?;
            }
        }
    }
    flush(target, &mut group, &mut appends, folder.fence).await?;
    while let Some(done) = appends.pop_front() {
        settle(done, folder.uidplus, &mut outcomes, &mut regroup, on_copied).await?;
    }
    Ok((outcomes, regroup))
}

struct Batch {
    uids: Vec<u32>,
    weight: u32,
    /// The sizes the source declared: all together, and the largest.
    bytes: u64,
    largest: u64,
}

impl Batch {
    /// Time for the batch's bytes, and a bound on each body: twice the largest declared
    /// size and 64 KiB (a server may count bare line feeds that it sends as CRLF). A
    /// source that sends more than that for a message fails the FETCH with a protocol
    /// error rather than holding more memory than the byte budget allowed for.
    fn expect(&self) -> Expect {
        Expect {
            bytes: self.bytes,
            max_literal: Some(self.largest.saturating_mul(2).saturating_add(64 << 10)),
        }
    }
}

fn plan_batches(metas: &[Meta], settings: &CopySettings, budget: &ByteBudget) -> Vec<Batch> {
    let max_weight = budget.capacity_kib / 2;
    let mut out: Vec<Batch> = Vec::new();
    for m in metas {
        let w = budget.weight(m.size);
        let fits = out.last().is_some_and(|b| {
            b.uids.len() < settings.fetch_messages
                && b.bytes + m.size <= settings.fetch_bytes
                && b.weight + w <= max_weight
        });
        if fits {
            let b = out.last_mut().expect("checked");
            b.uids.push(m.uid);
            b.weight += w;
            b.bytes += m.size;
            b.largest = b.largest.max(m.size);
        } else {
            out.push(Batch {
                uids: vec![m.uid],
                weight: w,
                bytes: m.size,
                largest: m.size,
            });
        }
    }
    out
}

struct OpenFetch {
    handle: CommandHandle,
    permit: OwnedSemaphorePermit,
    /// Messages asked for and not yet received, with their budget weight.
    expected: HashMap<u32, u32>,
}

struct OpenAppend {
    handle: CommandHandle,
    uids: Vec<u32>,
    sizes: Vec<u64>,
}

#[derive(Default)]
struct Group {
    uids: Vec<u32>,
    sizes: Vec<u64>,
    bytes: u64,
    command: Option<Command>,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.uids.is_empty()
    }

    fn push(
        &mut self,
        uid: u32,
        flags: &[Flag],
        date: &str,
        body: Bytes,
        folder: &TargetFolder<'_>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let command = self
            .command
            .take()
            .unwrap_or_else(|| Command::new("APPEND").arg(folder.wire_name));
        let command = command
            .raw(format!(" {}", Flag::list(flags)))
            .arg(date)
            .raw(" ");
        let len = body.len() as u64;
        // RFC 3501 literals cannot carry NUL; BINARY's literal8 can.
        let command = if folder.binary && body.contains(&0) {
            command.literal8(body)
        } else {
            command.literal(body)
        };
        self.command = Some(command);
        self.uids.push(uid);
        self.sizes.push(len);
        self.bytes += len;
        self.permits.extend(permit);
    }
}

async fn flush(
    target: &mut Session,
    group: &mut Group,
    appends: &mut VecDeque<OpenAppend>,
    fence: &Fence,
) -> Result<(), JobError> {
    let Some(command) = group.command.take() else {
        return Ok(());
    };
    // The last moment to stop: once sent, these messages will be at the target.
    fence.check().map_err(JobError::Fenced)?;
    let expect = Expect {
        bytes: group.bytes,
        max_literal: None,
    };
    // Writing a group takes time (a slow target, a process frozen halfway), and the
    // fence may shut meanwhile: then the rest is not sent. The command is cut off
    // unfinished and the connection given up, so the server discards all of it (a
    // MULTIAPPEND stores all of its messages or none). The fence is polled first, so a
    // process resuming after a freeze stops before it writes again.
    let sent = tokio::select! {
        biased;
        why = fence.shut() => Err(why),
        sent = target.send_expecting(command, expect) => Ok(sent),
    };
    let handle = match sent {
        Err(why) => {
            target.abandon("an APPEND cut off: this run may no longer write here");
            return Err(JobError::Fenced(why));
        }
        Ok(sent) => sent.map_err(JobError::target_side)?,
    };
    let g = std::mem::take(group);
    // The bodies are on the wire: their share of the budget goes back (g.permits drop).
    appends.push_back(OpenAppend {
        handle,
        uids: g.uids,
        sizes: g.sizes,
    });
    Ok(())
}

async fn settle(
    done: OpenAppend,
    uidplus: bool,
    outcomes: &mut Vec<(u32, Outcome)>,
    regroup: &mut Vec<u32>,
    on_copied: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), JobError> {
    let (_, status) = done.handle.finish().await.map_err(JobError::target_side)?;
    match status.status {
        Status::Ok => {
            failpoint::hit("after-append");
            let target_uids = (uidplus && status.code_name().as_deref() == Some("APPENDUID"))
                .then(|| status.code.as_ref()?.get(2)?.text())
                .flatten()
                .and_then(|set| uidset::parse(&set))
                .filter(|uids| uids.len() == done.uids.len());
            let bytes: u64 = done.sizes.iter().sum();
            let sizes = metrics::histogram!(mailferry_shared::telemetry::MESSAGE_SIZE);
            for size in &done.sizes {
                sizes.record(*size as f64);
            }
            for (i, (uid, size)) in done.uids.iter().zip(&done.sizes).enumerate() {
                outcomes.push((
                    *uid,
                    Outcome::Copied {
                        target_uid: target_uids.as_ref().map(|t| t[i]),
                        size: *size,
                    },
                ));
            }
            on_copied(done.uids.len() as u64, bytes);
            Ok(())
        }
        _ if is_throttling(&status) => Err(JobError::target_side(
            check("APPEND", status).expect_err("not OK"),
        )),
        _ if status.code_name().as_deref() == Some("OVERQUOTA")
            || status.text.to_ascii_lowercase().contains("quota") =>
        {
            Err(JobError::TargetOverQuota {
                server_says: status.describe(),
            })
        }
        _ if done.uids.len() > 1 => {
            // (TOOBIG/LIMIT included: which message was too big is found one by one.)
            // MULTIAPPEND is all or nothing: one bad message refuses the group.
            regroup.extend(done.uids);
            Ok(())
        }
        _ => {
            outcomes.push((
                done.uids[0],
                Outcome::Refused(format!("target refused the message: {}", status.describe())),
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: u32, size: u64) -> Meta {
        Meta {
            uid,
            size,
            flags: vec![],
            internal_date: String::new(),
        }
    }

    #[test]
    fn batches_respect_counts_bytes_and_budget() {
        let settings = CopySettings {
            fetch_messages: 3,
            fetch_bytes: 10_000,
            multiappend: 50,
            append_bytes: 1 << 20,
            append_window: 8,
        };
        let budget = ByteBudget::new(4 << 20);
        let metas: Vec<Meta> = (1..=7)
            .map(|u| meta(u, 1000))
            .chain([meta(8, 50 << 20), meta(9, 10)])
            .collect();
        let b = plan_batches(&metas, &settings, &budget);
        let uids: Vec<Vec<u32>> = b.iter().map(|b| b.uids.clone()).collect();
        assert_eq!(
            uids,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7], vec![8], vec![9]]
        );
        // a message larger than the whole budget weighs the whole budget, never more
        assert_eq!(b[3].weight, budget.capacity_kib);
    }

    #[test]
    fn only_keepable_flags_travel() {
        let info = MailboxInfo {
            permanent_flags: vec!["\\seen".into(), "\\deleted".into()],
            ..MailboxInfo::default()
        };
        let folder = TargetFolder {
            wire_name: b"INBOX",
            info: &info,
            multiappend: true,
            binary: false,
            uidplus: true,
            fence: &Fence::open_ended(),
        };
        let flags: Vec<Flag> = ["\\Seen", "\\Deleted", "$Forwarded", "\\Recent"]
            .iter()
            .filter_map(|f| Flag::parse(f))
            .collect();
        let kept = |folder: &TargetFolder<'_>| -> Vec<String> {
            folder
                .keepable(&flags)
                .iter()
                .map(Flag::to_string)
                .collect()
        };
        assert_eq!(kept(&folder), vec!["\\Seen", "\\Deleted"]);
        let any = MailboxInfo {
            permanent_flags: vec!["\\seen".into(), "\\*".into()],
            ..MailboxInfo::default()
        };
        let folder = TargetFolder {
            info: &any,
            ..folder
        };
        assert_eq!(kept(&folder), vec!["\\Seen", "$Forwarded"]);
    }
}
