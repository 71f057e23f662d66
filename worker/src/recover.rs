//! Finding out what is already at the target, without marker headers.
//!
//! - [`resolve_window`]: after a crash between APPEND and checkpoint, the target messages
//!   at or above the recorded UIDNEXT are matched by content to the in-flight source
//!   messages. Only a bounded window is read.
//! - [`reconcile`]: with no usable checkpoint (first run against a non-empty target,
//!   state lost, UIDVALIDITY changed) the whole folder is matched by a cheap identity:
//!   INTERNALDATE and a hash of the header section.
//!
//! Both match as multisets in UID order, so two identical source messages need two
//! target copies: a source duplicate is never swallowed by one target message.

use std::collections::{HashMap, HashSet, VecDeque};

use mailferry_shared::date::internal_date_epoch;
use mailferry_shared::imap::client::Session;
use mailferry_shared::imap::uidset;
use mailferry_shared::job::{InFlight, UidMap};

use crate::error::JobError;
use crate::message::{content_hash, header_section, uid_fetch, uid_range};

/// Pairs `(source uid, target uid)` for in-flight messages that did reach the target.
pub async fn resolve_window(
    source: &mut Session,
    target: &mut Session,
    uid_map: &UidMap,
    window: &InFlight,
) -> Result<Vec<(u32, u32)>, JobError> {
    if window.source_uids.is_empty() {
        return Ok(Vec::new());
    }
    let mapped: HashSet<u32> = uid_map.iter().map(|(_, d)| d).collect();
    // Target side: everything at or above the recorded UIDNEXT not already accounted for.
    let set = uid_range(window.target_uidnext.max(1), u32::MAX);
    let mut candidates = uid_fetch(target, &set, "(UID BODY.PEEK[])", |f| {
        match (f.uid, f.body) {
            (Some(uid), Some(body)) if uid >= window.target_uidnext && !mapped.contains(&uid) => {
                Some((uid, content_hash(&body)))
            }
            _ => None,
        }
    })
    .await
    .map_err(JobError::target_side)?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    candidates.sort_unstable_by_key(|c| c.0);
    let mut by_hash: HashMap<[u8; 32], VecDeque<u32>> = HashMap::new();
    for (uid, hash) in candidates {
        by_hash.entry(hash).or_default().push_back(uid);
    }

    let set = uidset::format(&window.source_uids);
    let mut source_hashes = uid_fetch(source, &set, "(UID BODY.PEEK[])", |f| {
        Some((f.uid?, content_hash(&f.body?)))
    })
    .await
    .map_err(JobError::source_side)?;
    source_hashes.sort_unstable_by_key(|s| s.0);

    let mut pairs = Vec::new();
    for (uid, hash) in source_hashes {
        if let Some(t) = by_hash.get_mut(&hash).and_then(VecDeque::pop_front) {
            pairs.push((uid, t));
        }
    }
    Ok(pairs)
}

/// A message's identity for reconciliation.
type Identity = (Option<i64>, [u8; 32]);

async fn identities(
    session: &mut Session,
    (lo, hi): (u32, u32),
) -> Result<Vec<(u32, Identity)>, mailferry_shared::Error> {
    let items = "(UID INTERNALDATE BODY.PEEK[HEADER])";
    let mut out = uid_fetch(session, &uid_range(lo, hi), items, |f| {
        let (uid, header) = (f.uid?, f.header?);
        let date = f.internal_date.as_deref().and_then(internal_date_epoch);
        (lo..=hi)
            .contains(&uid)
            .then(|| (uid, (date, content_hash(header_section(&header)))))
    })
    .await?;
    out.sort_unstable_by_key(|x| x.0);
    Ok(out)
}

/// Pairs source messages in `lo..=hi` (not yet in `uid_map`) with target messages that
/// have the same identity and are not mapped to another source message.
pub async fn reconcile(
    source: &mut Session,
    target: &mut Session,
    uid_map: &UidMap,
    (lo, hi): (u32, u32),
) -> Result<Vec<(u32, u32)>, JobError> {
    let mapped_targets: HashSet<u32> = uid_map.iter().map(|(_, d)| d).collect();
    let target_ids = identities(target, (1, u32::MAX))
        .await
        .map_err(JobError::target_side)?;
    let mut by_identity: HashMap<Identity, VecDeque<u32>> = HashMap::new();
    for (uid, id) in target_ids {
        if !mapped_targets.contains(&uid) {
            by_identity.entry(id).or_default().push_back(uid);
        }
    }
    if by_identity.is_empty() {
        return Ok(Vec::new());
    }
    let source_ids = identities(source, (lo, hi))
        .await
        .map_err(JobError::source_side)?;
    let mut pairs = Vec::new();
    for (uid, id) in source_ids {
        if uid_map.get(uid).is_some() {
            continue;
        }
        if let Some(t) = by_identity.get_mut(&id).and_then(VecDeque::pop_front) {
            pairs.push((uid, t));
        }
    }
    Ok(pairs)
}
