//! The unit of work and what is remembered about it: a [`FolderJob`] copies one source
//! folder (or a UID range of it) to one target folder in one pass; a [`Checkpoint`]
//! records how far a folder has been copied and what is in flight.
//!
//! A folder job is the unit of claims, checkpoints and job states. What travels on the
//! queue is a *bundle*: one job, or several small whole-folder jobs of one user planned
//! into the same [`FolderJob::group`], which one worker runs one after another on the
//! same connections (one message, one login and one dispatch for a mailbox of many small
//! folders instead of one per folder).

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A folder name exactly as the server spells it on the wire. Serialized as a string
/// when it is UTF-8 (it almost always is: modified UTF-7 is ASCII), else as `hex:...`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireName(pub Bytes);

impl WireName {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The decoded name for people.
    pub fn display(&self) -> String {
        crate::domain::mutf7::decode_lenient(&self.0)
    }
}

impl std::fmt::Debug for WireName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl Serialize for WireName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) if !text.starts_with("hex:") => s.serialize_str(text),
            _ => {
                let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
                s.serialize_str(&format!("hex:{hex}"))
            }
        }
    }
}

impl<'de> Deserialize<'de> for WireName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.strip_prefix("hex:") {
            Some(hex) => {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(serde::de::Error::custom)?;
                Ok(WireName(Bytes::from(bytes)))
            }
            None => Ok(WireName(Bytes::from(text))),
        }
    }
}

/// One folder (or UID range of one) of one user, in one pass. Carries ids and names
/// only — never credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderJob {
    pub batch: String,
    pub user: String,
    pub source_folder: WireName,
    pub target_folder: WireName,
    /// Inclusive source UID range; `None` for the whole folder.
    pub uid_range: Option<(u32, u32)>,
    pub pass: u64,
    /// Jobs of a user's pass with the same group travel and run together (see the
    /// module's notes); `None`: alone. Not part of the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    /// Set for a folder holding every message (Gmail's All Mail): only its messages in
    /// none of the user's other folders are copied. Not part of the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveOnly>,
}

/// What an archive-only job needs to know: the user's other source folders (copied or not, virtual ones left out), whose
/// messages it leaves out (see `worker::archive`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveOnly {
    pub others: Vec<OtherFolder>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherFolder {
    pub name: WireName,
    /// Its special use: Gmail names a system folder's label by it (`\Inbox`, `\Sent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub special: Option<crate::domain::folders::SpecialUse>,
}

impl FolderJob {
    /// Deterministic: publishing the same job twice names the same work.
    pub fn id(&self) -> String {
        let range = match self.uid_range {
            Some((lo, hi)) => format!("{lo}-{hi}"),
            None => "all".to_string(),
        };
        format!(
            "{}:{}:{}:{}:{}",
            self.batch,
            self.user,
            id_name(self.source_folder.as_bytes()),
            range,
            self.pass
        )
    }

    /// The id of a bundle of jobs (one queue message): its first job's, and how many
    /// follow. Deterministic like the jobs' own.
    pub fn bundle_id(jobs: &[FolderJob]) -> String {
        match jobs {
            [] => String::new(),
            [one] => one.id(),
            [first, rest @ ..] => format!("{}+{}", first.id(), rest.len()),
        }
    }

    pub fn checkpoint_key(&self) -> CheckpointKey {
        CheckpointKey {
            batch: self.batch.clone(),
            user: self.user.clone(),
            source_folder: self.source_folder.clone(),
        }
    }
}

/// Which folder a checkpoint belongs to: of which user, in which batch. The batch is
/// part of it (DESIGN.md invariant 11): the same address in two batches, or in two
/// tenants' batches, is two migrations, each with its own target and its own record of
/// what it copied there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckpointKey {
    pub batch: String,
    pub user: String,
    pub source_folder: WireName,
}

/// Source UID → target UID, stored as runs: copies made in order compress to a handful.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidMap {
    /// `(first source uid, first target uid, length)`, sorted by source uid.
    runs: Vec<(u32, u32, u32)>,
}

impl UidMap {
    pub fn insert(&mut self, src: u32, dst: u32) {
        let at = self.runs.partition_point(|&(s, _, _)| s <= src);
        if at > 0 {
            let (s, d, n) = self.runs[at - 1];
            if src < s + n {
                return; // already mapped
            }
            if src == s + n && dst == d + n && (at == self.runs.len() || self.runs[at].0 > src) {
                self.runs[at - 1].2 += 1;
                return;
            }
        }
        self.runs.insert(at, (src, dst, 1));
    }

    pub fn get(&self, src: u32) -> Option<u32> {
        let at = self.runs.partition_point(|&(s, _, _)| s <= src);
        let (s, d, n) = *self.runs.get(at.checked_sub(1)?)?;
        (src < s + n).then(|| d + (src - s))
    }

    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.2 as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.runs
            .iter()
            .flat_map(|&(s, d, n)| (0..n).map(move |i| (s + i, d + i)))
    }
}

/// A message that was not copied, and why. No subject or body: size, date and UID only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedMessage {
    pub uid: u32,
    pub size: u64,
    pub internal_date: String,
    /// For people: what was refused and why, with the sizes and limits.
    pub reason: String,
    /// For counting (the skipped messages' metric label). Records of earlier versions
    /// have none and read as [`SkipKind::Refused`].
    #[serde(default)]
    pub kind: SkipKind,
}

/// Why a message was skipped, as a metric counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// Larger than the run's `--max-message-size` or the target's APPENDLIMIT.
    TooLarge,
    /// The target refused to store it (its APPEND answered NO).
    #[default]
    Refused,
}

impl SkipKind {
    /// The label of `mailferry_messages_skipped_total{reason}` (a refusal keeps the
    /// `other` of earlier versions, which dashboards may query).
    pub fn label(self) -> &'static str {
        match self {
            SkipKind::TooLarge => "too_large",
            SkipKind::Refused => "other",
        }
    }
}

/// APPENDs that may or may not have reached the target, as the older checkpoint format
/// recorded them before sending (now `Checkpoint::target_uidnext` bounds them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub source_uids: Vec<u32>,
    /// The target folder's UIDNEXT before the APPENDs: anything they created is at or above.
    pub target_uidnext: u32,
}

/// How far a folder has been copied. The target mailbox stays the truth: a checkpoint
/// that is lost or stale costs a reconciliation, never a duplicate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub source_uidvalidity: u32,
    pub target_uidvalidity: u32,
    /// Every source UID below this has been handled (copied, matched or skipped).
    pub source_uid_done: u32,
    /// The source's HIGHESTMODSEQ when flags were last brought up to date.
    pub source_modseq: Option<u64>,
    /// Source MESSAGES and UIDNEXT at the end of the last complete pass.
    pub source_messages: u32,
    pub source_uidnext: u32,
    pub uid_map: UidMap,
    pub skipped: Vec<SkippedMessage>,
    /// Source UIDs below `source_uid_done` that were asked for and not returned; the
    /// next pass asks for them again (if they still exist).
    #[serde(default)]
    pub missed: Vec<u32>,
    /// Written by the versions before `target_uidnext`; read, resolved and dropped.
    pub in_flight: Option<InFlight>,
    /// Every target message at or above this UID that `uid_map` does not name may be a
    /// copy made by a run that ended before writing its checkpoint: the next run matches
    /// those to the pending source messages before copying any (no write-ahead record,
    /// so a store may keep checkpoints in memory until the job ends). `None` in
    /// checkpoints of the older format.
    #[serde(default)]
    pub target_uidnext: Option<u32>,
    /// The lowest HIGHESTMODSEQ seen by the UID-range jobs of the pass so far; the
    /// folder's last range makes it `source_modseq`.
    #[serde(default)]
    pub range_modseq: Option<u64>,
    /// For an archive-only job: source messages below `source_uid_done` found in
    /// another folder, and so not copied from this one. They count as accounted
    /// for in the folder's reconciliation. (A count: such a message later deleted at the
    /// source still counts, which errs on the lenient side.)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub elsewhere: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What the source says about a folder now, to compare with its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceState {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub highestmodseq: Option<u64>,
}

impl Checkpoint {
    /// The source messages this folder's copy must account for at the last complete
    /// pass: all of them, but for an archive-only folder those found elsewhere.
    pub fn messages_to_copy(&self) -> u32 {
        self.source_messages.saturating_sub(self.elsewhere)
    }

    /// True when nothing can have changed since the last complete pass: same
    /// UIDVALIDITYs, UIDNEXT, message count and HIGHESTMODSEQ (without CONDSTORE a flag
    /// change is invisible to STATUS, so the folder is never taken as unchanged), and
    /// nothing left open (no in-flight window, no missed message to ask for again).
    pub fn is_current(&self, source: &SourceState, target_uidvalidity: Option<u32>) -> bool {
        self.in_flight.is_none()
            && self.missed.is_empty()
            && self.source_uidvalidity == source.uidvalidity
            && Some(self.target_uidvalidity) == target_uidvalidity
            && self.source_uidnext == source.uidnext
            && self.source_messages == source.messages
            && source.highestmodseq.is_some()
            && self.source_modseq == source.highestmodseq
    }
}

/// A folder name as a job id holds it: the name itself when it is UTF-8 without U+FFFD
/// (every name a server sends in modified UTF-7, so the ids of earlier versions stay
/// the same); otherwise its lossy text and a hash of its bytes. Two folders never share
/// an id: a lossy text alone would make `Caf\xE9` and `Caf\xE8` one job, and the second
/// folder's state would be the first's. (Ids of the second kind hold U+FFFD, which those
/// of the first never do.)
fn id_name(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\u{FFFD}') => std::borrow::Cow::Borrowed(text),
        _ => {
            use sha2::Digest;
            let hash = sha2::Sha256::digest(bytes);
            let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
            std::borrow::Cow::Owned(format!("{}#{hex}", String::from_utf8_lossy(bytes)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_current_only_when_nothing_is_open_or_changed() {
        let cp = Checkpoint {
            source_uidvalidity: 1,
            target_uidvalidity: 2,
            source_uidnext: 10,
            source_messages: 9,
            source_modseq: Some(77),
            ..Checkpoint::default()
        };
        let now = SourceState {
            uidvalidity: 1,
            uidnext: 10,
            messages: 9,
            highestmodseq: Some(77),
        };
        assert!(cp.is_current(&now, Some(2)));
        assert!(
            !cp.is_current(
                &SourceState {
                    highestmodseq: Some(78),
                    ..now
                },
                Some(2)
            ),
            "a flag changed"
        );
        assert!(
            !cp.is_current(&SourceState { messages: 8, ..now }, Some(2)),
            "an expunge"
        );
        assert!(
            !cp.is_current(
                &SourceState {
                    highestmodseq: None,
                    ..now
                },
                Some(2)
            ),
            "no CONDSTORE"
        );
        assert!(!cp.is_current(&now, Some(3)), "target folder recreated");
        assert!(!cp.is_current(&now, None), "target folder gone");
        let missed = Checkpoint {
            missed: vec![4],
            ..cp.clone()
        };
        assert!(
            !missed.is_current(&now, Some(2)),
            "a missed message must be asked for again"
        );
        let open = Checkpoint {
            in_flight: Some(InFlight {
                source_uids: vec![9],
                target_uidnext: 5,
            }),
            ..cp
        };
        assert!(
            !open.is_current(&now, Some(2)),
            "an open window must be resolved"
        );
    }

    #[test]
    fn uid_map_compresses_runs_and_answers_lookups() {
        let mut m = UidMap::default();
        for i in 1..=1000 {
            m.insert(i, i + 10);
        }
        m.insert(2000, 5);
        m.insert(1500, 3);
        m.insert(500, 999); // already mapped: ignored
        assert_eq!(m.runs.len(), 3);
        assert_eq!(m.get(1), Some(11));
        assert_eq!(m.get(1000), Some(1010));
        assert_eq!(m.get(1001), None);
        assert_eq!(m.get(1500), Some(3));
        assert_eq!(m.get(2000), Some(5));
        assert_eq!(m.len(), 1002);
        assert_eq!(m.iter().nth(1000), Some((1500, 3)));
    }

    #[test]
    fn job_ids_are_deterministic_and_wire_names_round_trip() {
        let job = FolderJob {
            batch: "b1".into(),
            user: "alice@example.com".into(),
            source_folder: WireName(Bytes::from_static(b"Entw&APw-rfe")),
            target_folder: WireName(Bytes::from_static(b"\xffraw")),
            uid_range: Some((1, 500)),
            pass: 3,
            group: None,
            archive: None,
        };
        assert_eq!(job.id(), "b1:alice@example.com:Entw&APw-rfe:1-500:3");
        let json = serde_json::to_string(&job).unwrap();
        assert!(json.contains("hex:ff726177"));
        assert_eq!(serde_json::from_str::<FolderJob>(&json).unwrap(), job);
        let grouped = FolderJob {
            group: Some(2),
            ..job.clone()
        };
        assert_eq!(grouped.id(), job.id(), "the group is not part of the id");
        assert_eq!(
            FolderJob::bundle_id(&[job.clone(), grouped.clone(), grouped]),
            format!("{}+2", job.id())
        );
    }

    #[test]
    fn folders_whose_names_are_not_utf8_never_share_a_job_id() {
        let job = |name: &[u8]| FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(name.to_vec().into()),
            target_folder: WireName(name.to_vec().into()),
            uid_range: None,
            pass: 1,
            group: None,
            archive: None,
        };
        // A UTF-8 name keeps the id earlier versions gave it.
        assert_eq!(job(b"Sent/2024").id(), "b:u:Sent/2024:all:1");
        let (a, b) = (job(b"Caf\xe9").id(), job(b"Caf\xe8").id());
        assert_ne!(a, b);
        assert!(a.starts_with("b:u:Caf\u{FFFD}#"), "{a}");
        // A name that is U+FFFD in UTF-8 is not the lossy text of a broken one.
        assert_ne!(job("Caf\u{FFFD}".as_bytes()).id(), a);
        assert_ne!(job("Caf\u{FFFD}".as_bytes()).id(), "b:u:Caf\u{FFFD}:all:1");
        assert_eq!(job(b"Caf\xe9").id(), a, "deterministic");
    }
}
