//! Gmail's archive: which messages of a folder holding every message (`\All`, Gmail's
//! All Mail) are in none of the user's other folders (copied or excluded: mail in an
//! excluded folder is not archived mail; virtual folders such as Starred are left out).
//!
//! Those are the only ones an archive-only job copies (into the batch's archive folder):
//! labelled mail is copied from its label folders, and a second copy from All Mail would
//! be a duplicate at the target. Two ways to tell:
//!
//! - **Labels**, where the source has Gmail's `X-GM-EXT-1`: one
//!   `UID FETCH <pending> (UID X-GM-LABELS)`. A message is labelled when one of its labels
//!   names one of those folders (`\Inbox`, `\Sent`, `\Draft`… name the system folders by
//!   their special use; `\Important` and `\Starred` are not folders).
//! - **Content**, anywhere else (a server whose `\All` folder is virtual, such as
//!   Dovecot's `virtual` plugin): each other folder is examined and its sizes and
//!   INTERNALDATEs read; where one matches a pending message, the header section's hash
//!   decides (the identity [`crate::recover`] matches copies by). As many pending
//!   messages of an identity count as labelled as the other folders hold together. On
//!   Gmail one message with three labels is one message in All Mail, on a virtual folder
//!   it is three: counting them all never copies labelled mail twice, and can leave out
//!   of the archive only a message whose exact copy (same date, same header) is at the
//!   target already.
//!
//! Either way only the pending messages of the pass are asked about, so a pass with
//! nothing new in All Mail reads no other folder; and a message checked once is never
//! checked again (the checkpoint moves past it), so a label removed later does not
//! copy it a second time: it is at the target already, in the label's folder.

use std::collections::{HashMap, HashSet};

use mailferry_shared::domain::date::internal_date_epoch;
use mailferry_shared::domain::folders::SpecialUse;
use mailferry_shared::domain::job::{ArchiveOnly, OtherFolder};
use mailferry_shared::domain::mutf7;
use mailferry_shared::imap::client::Session;
use mailferry_shared::imap::uidset;
use mailferry_shared::Error;

use crate::recover::{identities, Identity};
use mailferry_shared::imap::message::{uid_fetch, Meta};

/// UID sets sent in one command stay below this many bytes.
const MAX_SET_BYTES: usize = 8 * 1024;

/// The UIDs of `pending` (messages of the archive-only folder `folder`, which is selected
/// with `uidvalidity`) that are in one of `archive.others`. The folder is selected again
/// when this returns.
pub async fn in_other_folders(
    source: &mut Session,
    folder: &[u8],
    uidvalidity: u32,
    archive: &ArchiveOnly,
    pending: &[Meta],
) -> Result<HashSet<u32>, Error> {
    if pending.is_empty() || archive.others.is_empty() {
        return Ok(HashSet::new());
    }
    if source.capabilities().has("X-GM-EXT-1") {
        by_labels(source, &archive.others, pending).await
    } else {
        by_content(source, folder, uidvalidity, &archive.others, pending).await
    }
}

async fn by_labels(
    source: &mut Session,
    others: &[OtherFolder],
    pending: &[Meta],
) -> Result<HashSet<u32>, Error> {
    let wanted: HashSet<u32> = pending.iter().map(|m| m.uid).collect();
    let uids: Vec<u32> = wanted.iter().copied().collect();
    let mut out = HashSet::new();
    for set in uidset::format_chunks(&uids, MAX_SET_BYTES) {
        let labelled = uid_fetch(source, &set, "(UID X-GM-LABELS)", |f| {
            let uid = f.uid.filter(|u| wanted.contains(u))?;
            let labels = f.labels?;
            labels
                .iter()
                .any(|l| names_another_folder(l, others))
                .then_some(uid)
        })
        .await?;
        out.extend(labelled);
    }
    Ok(out)
}

/// Whether a Gmail label (as X-GM-LABELS spells it) is one of the other folders.
pub fn names_another_folder(label: &[u8], others: &[OtherFolder]) -> bool {
    if let Some(system) = label.strip_prefix(b"\\") {
        let special = match system.to_ascii_lowercase().as_slice() {
            b"inbox" => SpecialUse::Inbox,
            b"sent" => SpecialUse::Sent,
            b"draft" | b"drafts" => SpecialUse::Drafts,
            b"trash" => SpecialUse::Trash,
            b"spam" | b"junk" => SpecialUse::Junk,
            // \Important, \Starred and anything new: not a folder of its own.
            _ => return false,
        };
        return others.iter().any(|o| {
            o.special == Some(special)
                || (special == SpecialUse::Inbox
                    && o.name.as_bytes().eq_ignore_ascii_case(b"INBOX"))
        });
    }
    // A user label is its folder's name; compare decoded, as a label may come in UTF-8
    // or in modified UTF-7.
    let decoded = mutf7::decode_lenient(label);
    others
        .iter()
        .any(|o| o.name.as_bytes() == label || o.name.display() == decoded)
}

/// `(size, INTERNALDATE)`: what a message must share with a pending one to be compared
/// by its header.
type Key = (u64, Option<i64>);

fn key(size: u64, internal_date: &str) -> Key {
    (size, internal_date_epoch(internal_date))
}

async fn by_content(
    source: &mut Session,
    folder: &[u8],
    uidvalidity: u32,
    others: &[OtherFolder],
    pending: &[Meta],
) -> Result<HashSet<u32>, Error> {
    let keys: HashSet<Key> = pending
        .iter()
        .map(|m| key(m.size, &m.internal_date))
        .collect();
    // For each identity, how many copies the other folders hold.
    let mut held: HashMap<(u64, Identity), u32> = HashMap::new();
    for other in others {
        let info = match source.examine(other.name.as_bytes()).await {
            Ok(info) => info,
            // Deleted or renamed since the pass was planned: nothing of it is copied.
            Err(Error::Command { .. }) => continue,
            Err(e) => return Err(e),
        };
        if info.exists == 0 {
            continue;
        }
        let sizes: HashMap<u32, u64> =
            uid_fetch(source, "1:*", "(UID RFC822.SIZE INTERNALDATE)", |f| {
                let m = f.meta()?;
                keys.contains(&key(m.size, &m.internal_date))
                    .then_some((m.uid, m.size))
            })
            .await?
            .into_iter()
            .collect();
        let uids: Vec<u32> = sizes.keys().copied().collect();
        for set in uidset::format_chunks(&uids, MAX_SET_BYTES) {
            for (uid, id) in identities(source, &set, |uid| sizes.contains_key(&uid)).await? {
                *held.entry((sizes[&uid], id)).or_default() += 1;
            }
        }
    }

    // Back to the archive folder, which the engine goes on copying from.
    let info = source.examine(folder).await?;
    if info.uidvalidity != uidvalidity {
        return Err(Error::ConnectionLost {
            detail: format!(
                "folder {} was recreated (UIDVALIDITY {uidvalidity} → {}) while the other \
                 folders were read; the job runs again",
                mutf7::decode_lenient(folder),
                info.uidvalidity
            ),
        });
    }
    if held.is_empty() {
        return Ok(HashSet::new());
    }
    let found: HashSet<Key> = held.keys().map(|(size, id)| (*size, id.0)).collect();
    let sizes: HashMap<u32, u64> = pending
        .iter()
        .filter(|m| found.contains(&key(m.size, &m.internal_date)))
        .map(|m| (m.uid, m.size))
        .collect();
    let uids: Vec<u32> = sizes.keys().copied().collect();
    let mut out = HashSet::new();
    for set in uidset::format_chunks(&uids, MAX_SET_BYTES) {
        for (uid, id) in identities(source, &set, |uid| sizes.contains_key(&uid)).await? {
            if let Some(left) = held.get_mut(&(sizes[&uid], id)).filter(|n| **n > 0) {
                *left -= 1;
                out.insert(uid);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mailferry_shared::domain::job::WireName;

    fn label(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn other(name: &str, special: Option<SpecialUse>) -> OtherFolder {
        OtherFolder {
            name: WireName(Bytes::from(mutf7::encode(name))),
            special,
        }
    }

    #[test]
    fn system_labels_name_folders_by_special_use_and_user_labels_by_name() {
        let others = [
            other("INBOX", Some(SpecialUse::Inbox)),
            other("[Gmail]/Sent Mail", Some(SpecialUse::Sent)),
            other("Work/Projects", None),
            other("Entwürfe", None),
        ];
        let named = |l: &str| names_another_folder(&label(l), &others);
        assert!(named("\\Inbox"));
        assert!(named("\\Sent"));
        assert!(!named("\\Draft"), "no Drafts folder is copied");
        assert!(!named("\\Important"));
        assert!(!named("\\Starred"));
        assert!(named("Work/Projects"));
        assert!(!named("Work"));
        assert!(named("Entw&APw-rfe"), "modified UTF-7");
        assert!(named("Entwürfe"), "UTF-8");
        assert!(!named("Important"), "a user label named like a system one");
    }
}
