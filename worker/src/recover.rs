//! Finding out what is already at the target, without marker headers.
//!
//! - [`resolve_since`]: after a run that ended without writing its checkpoint, the
//!   target messages at or above the checkpoint's recorded UIDNEXT are matched to the
//!   source messages still to copy. Only that window is read.
//! - [`reconcile`]: with no usable checkpoint (first run against a non-empty target,
//!   state lost, UIDVALIDITY changed) the whole folder is matched by a cheap identity:
//!   INTERNALDATE and a hash of the header section.
//!
//! Both match as multisets in UID order, so two identical source messages need two
//! target copies: a source duplicate is never swallowed by one target message.

use std::collections::{HashMap, HashSet, VecDeque};

use mailferry_shared::domain::date::internal_date_epoch;
use mailferry_shared::domain::job::UidMap;
use mailferry_shared::imap::client::Session;
use mailferry_shared::imap::uidset;

use crate::error::JobError;
use mailferry_shared::imap::message::{content_hash, header_section, uid_fetch, uid_range, Meta};

/// What [`resolve_since`] found among the target messages above the checkpoint's bound.
#[derive(Debug, Default)]
pub struct Window {
    /// `(source uid, target uid)`: copies made by a run whose checkpoint was lost.
    pub pairs: Vec<(u32, u32)>,
    /// The lowest target UID above the bound that matched none of the pending source
    /// messages (delivered by someone else, or copied by another range of the folder).
    pub lowest_unmatched: Option<u32>,
}

/// After a run ended without writing its checkpoint (a crash, a lost claim, a store
/// that did not answer), the target messages at or above the checkpoint's
/// `target_uidnext` that the UID map does not name may be its copies. They are matched
/// by identity (INTERNALDATE and a hash of the header section, as [`reconcile`] does)
/// to the `pending` source messages, those the checkpoint says are still to copy. Only
/// the window is read at the target, and at the source only the pending messages whose
/// INTERNALDATE one of the window's messages has.
pub async fn resolve_since(
    source: &mut Session,
    target: &mut Session,
    uid_map: &UidMap,
    bound: u32,
    pending: &[Meta],
) -> Result<Window, JobError> {
    let bound = bound.max(1);
    if pending.is_empty() {
        return Ok(Window::default());
    }
    let mapped: HashSet<u32> = uid_map.iter().map(|(_, d)| d).collect();
    let candidates: Vec<(u32, Identity)> = identities(target, &uid_range(bound, u32::MAX), |uid| {
        uid >= bound && !mapped.contains(&uid)
    })
    .await
    .map_err(JobError::target_side)?;
    if candidates.is_empty() {
        return Ok(Window::default());
    }
    let dates: HashSet<Option<i64>> = candidates.iter().map(|(_, id)| id.0).collect();
    let wanted: Vec<u32> = pending
        .iter()
        .filter(|m| dates.contains(&internal_date_epoch(&m.internal_date)))
        .map(|m| m.uid)
        .collect();
    let mut by_identity: HashMap<Identity, VecDeque<u32>> = HashMap::new();
    for (uid, id) in &candidates {
        by_identity.entry(*id).or_default().push_back(*uid);
    }
    let mut pairs = Vec::new();
    if !wanted.is_empty() {
        let wanted_set: HashSet<u32> = wanted.iter().copied().collect();
        let source_ids = identities(source, &uidset::format(&wanted), |uid| {
            wanted_set.contains(&uid)
        })
        .await
        .map_err(JobError::source_side)?;
        for (uid, id) in source_ids {
            if let Some(t) = by_identity.get_mut(&id).and_then(VecDeque::pop_front) {
                pairs.push((uid, t));
            }
        }
    }
    let lowest_unmatched = by_identity.values().flatten().copied().min();
    Ok(Window {
        pairs,
        lowest_unmatched,
    })
}

/// A message's identity for reconciliation.
pub(crate) type Identity = (Option<i64>, [u8; 32]);

/// The identities of the messages of `set` whose UID is `wanted`, in UID order.
pub(crate) async fn identities(
    session: &mut Session,
    set: &str,
    wanted: impl Fn(u32) -> bool,
) -> Result<Vec<(u32, Identity)>, mailferry_shared::Error> {
    let items = "(UID INTERNALDATE BODY.PEEK[HEADER])";
    let mut out = uid_fetch(session, set, items, |f| {
        let (uid, header) = (f.uid?, f.header?);
        let date = f.internal_date.as_deref().and_then(internal_date_epoch);
        wanted(uid).then(|| (uid, (date, content_hash(header_section(&header)))))
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
    let target_ids = identities(target, "1:*", |_| true)
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
    let source_ids = identities(source, &uid_range(lo, hi), |uid| (lo..=hi).contains(&uid))
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
