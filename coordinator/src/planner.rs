//! Planning: turns a user into folder jobs.
//!
//! One round of pipelined commands per side: LIST and NAMESPACE on both servers, the
//! folder mapping, CREATE/SUBSCRIBE of missing target folders, then STATUS of every
//! source (and mapped target) folder. A folder whose STATUS matches its checkpoint gets
//! no job at all, so a no-op pass costs a handful of commands per user, not a rescan.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use mailferry_shared::domain::folders::{
    encode_target_strict, map_folders, Action, FolderMapping, Namespace, Rules, SpecialUse,
};
use mailferry_shared::domain::job::{
    ArchiveOnly, Checkpoint, CheckpointKey, FolderJob, OtherFolder, SourceState, WireName,
};
use mailferry_shared::imap::mailbox::{status_of, FolderStatus, StatusItems};
use mailferry_shared::imap::pool::Pool;
use mailferry_shared::store::StateStore;
use mailferry_shared::{Error as SharedError, Side};

/// Why a user could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{side}: {source}")]
    Imap {
        side: Side,
        #[source]
        source: SharedError,
    },
    #[error("{0}")]
    Mapping(#[from] mailferry_shared::domain::folders::MappingError),
    #[error("state store: {0}")]
    Store(SharedError),
}

impl PlanError {
    fn source_side(e: SharedError) -> Self {
        PlanError::Imap {
            side: Side::Source,
            source: e,
        }
    }
    fn target_side(e: SharedError) -> Self {
        PlanError::Imap {
            side: Side::Target,
            source: e,
        }
    }
}

/// One source folder with what the plan found out about it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlannedFolder {
    #[serde(flatten)]
    pub mapping: FolderMapping,
    /// Source STATUS (messages, size where the server reports it).
    pub messages: Option<u32>,
    pub size: Option<u64>,
    /// A job was made for it (false: excluded, empty and unchanged, or up to date).
    pub job: bool,
    /// Why the folder could not be planned (the source refused STATUS, the target
    /// refused CREATE).
    pub problem: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(messages: u32, uidnext: u32) -> FolderStatus {
        FolderStatus {
            messages,
            uidnext,
            uidvalidity: 5,
            highestmodseq: None,
            size: None,
        }
    }

    #[test]
    fn a_folder_needs_a_job_when_it_is_new_and_not_empty_or_changed_since_its_checkpoint() {
        assert!(needs_job(None, &status(3, 4), None));
        assert!(!needs_job(None, &status(0, 1), None), "an empty new folder");
        let cp = Checkpoint {
            source_uidvalidity: 5,
            target_uidvalidity: 8,
            source_uid_done: 4,
            source_messages: 3,
            source_uidnext: 4,
            source_modseq: Some(9),
            ..Checkpoint::default()
        };
        let condstore = |messages, uidnext| FolderStatus {
            highestmodseq: Some(9),
            ..status(messages, uidnext)
        };
        assert!(
            !needs_job(Some(&cp), &condstore(3, 4), Some(8)),
            "unchanged"
        );
        assert!(needs_job(Some(&cp), &condstore(4, 5), Some(8)), "new mail");
        assert!(
            needs_job(Some(&cp), &condstore(3, 4), Some(9)),
            "the target folder was replaced"
        );
        assert!(
            needs_job(Some(&cp), &status(3, 4), Some(8)),
            "without CONDSTORE a flag change is invisible: always looked at"
        );
    }

    #[test]
    fn pending_messages_count_what_is_new_and_what_was_missed() {
        let mut cp = Checkpoint {
            source_uidvalidity: 5,
            source_messages: 100,
            ..Checkpoint::default()
        };
        assert_eq!(pending_messages(None, &status(120, 121)), 120);
        assert_eq!(pending_messages(Some(&cp), &status(120, 121)), 20);
        cp.missed = vec![7, 9];
        assert_eq!(pending_messages(Some(&cp), &status(120, 121)), 22);
        cp.source_uidvalidity = 6;
        assert_eq!(
            pending_messages(Some(&cp), &status(120, 121)),
            120,
            "another UIDVALIDITY"
        );
    }

    const LIMITS: SplitLimits = SplitLimits {
        max_messages: 10_000,
        max_bytes: 1 << 30,
    };

    fn folder(name: &str, range: Option<(u32, u32)>) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(Bytes::from(name.to_string())),
            target_folder: WireName(Bytes::from(name.to_string())),
            uid_range: range,
            pass: 1,
            group: None,
            archive: None,
        }
    }

    #[test]
    fn small_folders_are_grouped_within_a_tenth_of_the_limits() {
        // (messages, bytes) by folder name
        let size = |j: &FolderJob| match j.source_folder.display().as_str() {
            "Big" => (5_000, 1 << 20),
            "Huge mail" => (10, 200 << 20),
            "A" | "B" => (600, 1 << 20),
            _ => (10, 1 << 10),
        };
        let mut jobs: Vec<FolderJob> = ["Big", "Huge mail", "A", "B", "c1", "c2", "c3"]
            .into_iter()
            .map(|n| folder(n, None))
            .collect();
        jobs.push(folder("Ranged", Some((1, 100))));
        jobs.push(folder("lonely", None));
        jobs.swap(7, 8); // the range last
        group_small_jobs(&mut jobs, size, &LIMITS);
        let groups: Vec<(String, Option<u32>)> = jobs
            .iter()
            .map(|j| (j.source_folder.display(), j.group))
            .collect();
        assert_eq!(
            groups,
            [
                ("Big".into(), None),       // above 1,000 messages
                ("Huge mail".into(), None), // above 100 MiB
                // B would not fit with A (1,200 messages): A's group holds only A,
                // which makes it a job alone
                ("A".into(), None),
                ("B".into(), Some(2)),
                ("c1".into(), Some(2)),
                ("c2".into(), Some(2)),
                ("c3".into(), Some(2)),
                ("lonely".into(), Some(2)),
                ("Ranged".into(), None),
            ]
        );
        // planned again, nothing of the old grouping is kept
        let mut two = vec![folder("A", None), folder("B", None)];
        two[0].group = Some(7);
        group_small_jobs(&mut two, size, &LIMITS);
        assert!(two.iter().all(|j| j.group.is_none()), "{two:?}");
    }

    #[test]
    fn thousands_of_empty_folders_make_groups_of_at_most_the_cap() {
        let mut jobs: Vec<FolderJob> = (0..1_201).map(|i| folder(&format!("f{i}"), None)).collect();
        group_small_jobs(&mut jobs, |_| (0, 0), &LIMITS);
        let mut sizes = std::collections::BTreeMap::new();
        for job in &jobs {
            *sizes.entry(job.group).or_insert(0) += 1;
        }
        assert_eq!(
            sizes.into_iter().collect::<Vec<_>>(),
            [(Some(1), 500), (Some(2), 500), (Some(3), 201)]
        );
    }

    #[test]
    fn small_folders_and_small_remainders_stay_one_job() {
        assert!(range_starts(10_000, 10_000, None, LIMITS).is_empty());
        // a big folder with little new mail since the last pass
        assert!(range_starts(500_000, 300, Some(50 << 30), LIMITS).is_empty());
        assert!(range_starts(0, 0, None, LIMITS).is_empty());
    }

    #[test]
    fn big_folders_are_cut_by_count_and_by_bytes() {
        let starts = range_starts(25_000, 25_000, None, LIMITS);
        assert_eq!(starts, vec![10_001, 20_001], "three jobs");
        // 4,000 messages of 1 MB each: 1 GB per job is 1,024 messages
        let starts = range_starts(4_000, 4_000, Some(4_000 << 20), LIMITS);
        assert_eq!(starts, vec![1_025, 2_049, 3_073]);
        // only the new part of the folder is cut
        let starts = range_starts(100_000, 25_000, None, LIMITS);
        assert_eq!(starts, vec![85_001, 95_001]);
        // no overflow near the top of the number range
        let starts = range_starts(u32::MAX, u32::MAX, None, LIMITS);
        assert_eq!(starts.len(), (u32::MAX / 10_000) as usize);
    }
}

#[derive(Debug, Clone)]
pub struct UserPlan {
    pub folders: Vec<PlannedFolder>,
    pub jobs: Vec<FolderJob>,
}

pub struct PlanRequest<'a, S: StateStore> {
    pub batch: &'a str,
    pub user: &'a str,
    pub pass: u64,
    pub source: &'a Arc<Pool>,
    pub target: &'a Arc<Pool>,
    pub rules: &'a Rules,
    /// `None` in a dry run: nothing is created and no checkpoint is consulted.
    pub store: Option<&'a S>,
    /// No pass of the user has run before: the store holds no checkpoint of it, and
    /// none is read (each folder with messages gets a job; the worker's claim reads
    /// the checkpoint anyway, so a stray one is still honoured).
    pub first_pass: bool,
    /// Cut folders with more than this much left to copy into UID-range jobs
    /// (`None`: one job per folder, as the embedded mode runs them).
    pub split: Option<SplitLimits>,
}

/// The largest job the cluster planner makes: a folder with more left to copy is cut
/// into UID-range jobs.
#[derive(Debug, Clone, Copy)]
pub struct SplitLimits {
    pub max_messages: u32,
    pub max_bytes: u64,
}

/// A bundle of small folders holds at most this share of [`SplitLimits`] (1,000
/// messages or 100 MiB with the defaults): large enough that a mailbox of many small
/// folders costs one message, one login and one dispatch, small enough that a user's
/// bundles still spread over several workers.
pub const BUNDLE_SHARE: u64 = 10;
/// Jobs in one group at most, whatever their size: a mailbox of thousands of empty
/// folders makes several bundles, and a claim script's arguments stay bounded (Redis's
/// Lua unpacks at most about 8,000 values at once).
pub const MAX_GROUP_JOBS: usize = 500;

/// Puts a pass's small whole-folder jobs into groups that travel and run together
/// ([`FolderJob::group`]), in the order given, each within `1 / BUNDLE_SHARE` of the
/// limits; `size` gives a job's folder's (messages, bytes). UID ranges and larger
/// folders stay alone, and so does a group that would hold one job.
pub fn group_small_jobs(
    jobs: &mut [FolderJob],
    size: impl Fn(&FolderJob) -> (u64, u64),
    limits: &SplitLimits,
) {
    let most_messages = (u64::from(limits.max_messages) / BUNDLE_SHARE).max(1);
    let most_bytes = (limits.max_bytes / BUNDLE_SHARE).max(1);
    let mut group = 0u32;
    let mut members = 0usize;
    let mut total = (0u64, 0u64);
    for job in jobs.iter_mut() {
        job.group = None;
        let (messages, bytes) = size(job);
        if job.uid_range.is_some() || messages > most_messages || bytes > most_bytes {
            continue;
        }
        if members == 0
            || members >= MAX_GROUP_JOBS
            || total.0 + messages > most_messages
            || total.1 + bytes > most_bytes
        {
            group += 1;
            members = 0;
            total = (0, 0);
        }
        job.group = Some(group);
        members += 1;
        total = (total.0 + messages, total.1 + bytes);
    }
    // Groups of one are just jobs.
    let mut counts = std::collections::HashMap::new();
    for job in jobs.iter() {
        if let Some(g) = job.group {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    for job in jobs.iter_mut() {
        if job.group.is_some_and(|g| counts[&g] == 1) {
            job.group = None;
        }
    }
}

/// Where a folder is cut into UID-range jobs: the sequence numbers that begin a new
/// range (empty: one job). The `pending` messages still to copy are the folder's last
/// `pending` of `messages` (new mail gets the highest UIDs); `size` is the folder's
/// total when the server reports it.
pub fn range_starts(
    messages: u32,
    pending: u32,
    size: Option<u64>,
    limits: SplitLimits,
) -> Vec<u32> {
    let pending = pending.min(messages);
    let average = size
        .filter(|_| messages > 0)
        .map_or(1, |s| s / u64::from(messages))
        .max(1);
    let by_bytes = (limits.max_bytes / average).clamp(1, u64::from(u32::MAX)) as u32;
    let step = limits.max_messages.min(by_bytes).max(1);
    if pending <= step {
        return Vec::new();
    }
    let first = messages - pending + 1;
    (1..)
        .map_while(|k: u32| k.checked_mul(step).and_then(|o| first.checked_add(o)))
        .take_while(|&p| p <= messages)
        .collect()
}

/// The UID-range jobs of `job`'s folder, cut at the sequence numbers `starts`: the
/// first range begins at UID 1 and the last is open-ended, so mail that arrives
/// meanwhile falls into it. One EXAMINE and one FETCH.
async fn cut_into_ranges(
    source: &Arc<Pool>,
    job: &FolderJob,
    starts: &[u32],
) -> Result<Vec<FolderJob>, SharedError> {
    let mut session = source.get().await?;
    session.examine(job.source_folder.as_bytes()).await?;
    let positions: Vec<String> = starts.iter().map(u32::to_string).collect();
    let responses = session
        .run(
            mailferry_shared::imap::client::Command::new("FETCH")
                .raw(format!(" {} (UID)", positions.join(","))),
        )
        .await?;
    session.release();
    let mut bounds: Vec<u32> = responses
        .iter()
        .filter_map(mailferry_shared::imap::message::parse_fetch)
        .filter_map(|f| f.uid)
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut jobs = Vec::new();
    let mut lo = 1;
    for b in bounds.into_iter().filter(|&b| b > 1) {
        jobs.push(FolderJob {
            uid_range: Some((lo, b - 1)),
            ..job.clone()
        });
        lo = b;
    }
    jobs.push(FolderJob {
        uid_range: Some((lo, u32::MAX)),
        ..job.clone()
    });
    Ok(jobs)
}

/// A target may refuse a name for a character it does not allow in folder names
/// (Dovecot's Maildir++ refuses `.`). Such folders get the strict escaping and one more
/// try; what still fails is reported per folder.
async fn retry_refused(
    target: &mut mailferry_shared::imap::Session,
    mappings: &mut [FolderMapping],
    ns: &Namespace,
    refused: Vec<(Bytes, SharedError)>,
) -> Result<std::collections::HashMap<Bytes, String>, SharedError> {
    let mut problems = std::collections::HashMap::new();
    let mut retry = Vec::new();
    for (wire, error) in refused {
        let Some(m) = mappings.iter_mut().find(|m| m.target_wire == wire) else {
            continue;
        };
        let taken = |w: &Bytes| retry.iter().any(|(_, x): &(Bytes, Bytes)| x == w);
        match encode_target_strict(&m.target_levels, ns) {
            Some((path, strict)) if !taken(&strict) => {
                tracing::info!(folder = %m.source_path, target = %path, "target refused the name; using strict escaping");
                m.target_path = path;
                m.target_wire = strict.clone();
                retry.push((wire, strict));
            }
            _ => {
                problems.insert(
                    wire,
                    format!("target refused to create the folder: {error}"),
                );
            }
        }
    }
    let names: Vec<Bytes> = retry.iter().map(|(_, s)| s.clone()).collect();
    for ((_, strict), result) in retry.iter().zip(target.create_all(&names).await?) {
        if let Err(e) = result {
            problems.insert(
                strict.clone(),
                format!("target refused to create the folder: {e}"),
            );
        }
    }
    Ok(problems)
}

/// Every copied folder's checkpoint, in one round trip where the store can: none for
/// a dry run (no store) and none for a user's first pass (nothing was copied yet).
async fn copied_checkpoints<S: StateStore>(
    req: &PlanRequest<'_, S>,
    mappings: &[FolderMapping],
) -> Result<std::collections::HashMap<Bytes, Checkpoint>, PlanError> {
    let Some(store) = req.store.filter(|_| !req.first_pass) else {
        return Ok(std::collections::HashMap::new());
    };
    let names: Vec<Bytes> = mappings
        .iter()
        .filter(|m| m.action == Action::Copy)
        .map(|m| m.source_wire.clone())
        .collect();
    let keys: Vec<CheckpointKey> = names
        .iter()
        .map(|n| CheckpointKey {
            batch: req.batch.to_string(),
            user: req.user.to_string(),
            source_folder: WireName(n.clone()),
        })
        .collect();
    let found = store
        .load_checkpoints(&keys)
        .await
        .map_err(PlanError::Store)?;
    Ok(names
        .into_iter()
        .zip(found)
        .filter_map(|(n, cp)| cp.map(|cp| (n, cp)))
        .collect())
}

/// Whether a folder needs a job this pass (pure): one never copied does unless it is
/// empty (its target folder exists already); one copied before does unless its
/// checkpoint is current for the source's state and the target's UIDVALIDITY.
fn needs_job(cp: Option<&Checkpoint>, st: &FolderStatus, target_validity: Option<u32>) -> bool {
    match cp {
        None => st.messages > 0,
        Some(cp) => {
            let now = SourceState {
                uidvalidity: st.uidvalidity,
                uidnext: st.uidnext,
                messages: st.messages,
                highestmodseq: st.highestmodseq,
            };
            !cp.is_current(&now, target_validity)
        }
    }
}

/// About how many messages a folder's job has to copy (pure; what a split is sized
/// by): the messages since its checkpoint and those missed before, or all of them when
/// there is no checkpoint of this UIDVALIDITY.
fn pending_messages(cp: Option<&Checkpoint>, st: &FolderStatus) -> u32 {
    match cp.filter(|cp| cp.source_uidvalidity == st.uidvalidity) {
        Some(cp) => st
            .messages
            .saturating_sub(cp.source_messages)
            .saturating_add(cp.missed.len() as u32),
        None => st.messages,
    }
}

/// What an archive-only folder (All Mail) leaves out: the messages of every other real
/// folder, copied or not (mail in an excluded folder is not archived mail).
fn archive_others(
    src_list: &[mailferry_shared::imap::mailbox::ListEntry],
    mappings: &[FolderMapping],
) -> Vec<OtherFolder> {
    let selectable: std::collections::HashSet<&Bytes> = src_list
        .iter()
        .filter(|e| e.selectable())
        .map(|e| &e.wire_name)
        .collect();
    mappings
        .iter()
        .filter(|m| !m.archive_only && selectable.contains(&m.source_wire))
        .filter(|m| !m.special_use.is_some_and(SpecialUse::is_virtual))
        .map(|m| OtherFolder {
            name: WireName(m.source_wire.clone()),
            special: m.special_use,
        })
        .collect()
}

pub async fn plan_user<S: StateStore>(req: PlanRequest<'_, S>) -> Result<UserPlan, PlanError> {
    let (source, target) = tokio::join!(req.source.get(), req.target.get());
    let mut source = source.map_err(PlanError::source_side)?;
    let mut target = target.map_err(PlanError::target_side)?;

    // With LIST-STATUS the listing brings every folder's STATUS along; what it leaves
    // out is asked for below, one STATUS each.
    let (src_listed, dst_listed) = tokio::join!(
        source.list_with_status(Some(StatusItems::SOURCE)),
        target.list_with_status(Some(StatusItems::TARGET))
    );
    let (src_list, src_listed_status) = src_listed.map_err(PlanError::source_side)?;
    let (dst_list, dst_listed_status) = dst_listed.map_err(PlanError::target_side)?;
    let (src_ns, dst_ns) = tokio::join!(
        source.personal_namespace(&src_list),
        target.personal_namespace(&dst_list)
    );
    let src_ns = src_ns.map_err(PlanError::source_side)?;
    let dst_ns = dst_ns.map_err(PlanError::target_side)?;
    let mut mappings = map_folders(&src_list, &src_ns, &dst_list, &dst_ns, req.rules)?;

    let wanted = |m: &FolderMapping| matches!(m.action, Action::Copy | Action::Create);
    let copying: Vec<&FolderMapping> = mappings
        .iter()
        .filter(|m| m.action == Action::Copy)
        .collect();
    let src_names: Vec<Bytes> = copying.iter().map(|m| m.source_wire.clone()).collect();
    let existing_targets: Vec<Bytes> = copying
        .iter()
        .filter(|m| m.target_exists)
        .map(|m| m.target_wire.clone())
        .collect();
    let to_create: Vec<Bytes> = mappings
        .iter()
        .filter(|m| wanted(m) && !m.target_exists)
        .map(|m| m.target_wire.clone())
        .collect();

    let unlisted = |names: &[Bytes], listed: &HashMap<Bytes, FolderStatus>| -> Vec<Bytes> {
        names
            .iter()
            .filter(|n| status_of(listed, n).is_none())
            .cloned()
            .collect()
    };
    let src_asked = unlisted(&src_names, &src_listed_status);
    let dst_asked = unlisted(&existing_targets, &dst_listed_status);

    let dry_run = req.store.is_none();
    let (src_status, dst_side) =
        tokio::join!(source.status_many(&src_asked, StatusItems::SOURCE), async {
            let statuses = target.status_many(&dst_asked, StatusItems::TARGET).await?;
            let created = if dry_run {
                Vec::new()
            } else {
                target.create_all(&to_create).await?
            };
            Ok::<_, SharedError>((statuses, created))
        });
    let src_status = src_status.map_err(PlanError::source_side)?;
    let (dst_status, created) = dst_side.map_err(PlanError::target_side)?;
    let refused: Vec<(Bytes, SharedError)> = to_create
        .iter()
        .cloned()
        .zip(created)
        .filter_map(|(name, r)| r.err().map(|e| (name, e)))
        .collect();
    let create_problems = if refused.is_empty() {
        std::collections::HashMap::new()
    } else {
        retry_refused(&mut target, &mut mappings, &dst_ns, refused)
            .await
            .map_err(PlanError::target_side)?
    };
    source.release();
    target.release();
    let dst_status: HashMap<Bytes, FolderStatus> = existing_targets
        .iter()
        .filter_map(|n| status_of(&dst_listed_status, n).map(|s| (n.clone(), s.clone())))
        .chain(
            dst_asked
                .into_iter()
                .zip(dst_status)
                .filter_map(|(n, s)| s.ok().map(|s| (n, s))),
        )
        .collect();
    let mut src_status: HashMap<Bytes, Result<FolderStatus, SharedError>> = src_names
        .iter()
        .filter_map(|n| status_of(&src_listed_status, n).map(|s| (n.clone(), Ok(s.clone()))))
        .chain(src_asked.into_iter().zip(src_status))
        .collect();

    let mut checkpoints = copied_checkpoints(&req, &mappings).await?;

    let others = archive_others(&src_list, &mappings);
    let mut folders = Vec::new();
    let mut jobs = Vec::new();
    for mapping in mappings {
        let mut planned = PlannedFolder {
            messages: None,
            size: None,
            job: false,
            problem: create_problems.get(&mapping.target_wire).cloned(),
            mapping,
        };
        if planned.mapping.action == Action::Copy && planned.problem.is_none() {
            match src_status.remove(&planned.mapping.source_wire) {
                Some(Ok(st)) => {
                    planned.messages = Some(st.messages);
                    planned.size = st.size;
                    let job = FolderJob {
                        batch: req.batch.to_string(),
                        user: req.user.to_string(),
                        source_folder: WireName(planned.mapping.source_wire.clone()),
                        target_folder: WireName(planned.mapping.target_wire.clone()),
                        uid_range: None,
                        pass: req.pass,
                        group: None,
                        archive: planned.mapping.archive_only.then(|| ArchiveOnly {
                            others: others.clone(),
                        }),
                    };
                    let cp = checkpoints.remove(&planned.mapping.source_wire);
                    let target_validity = dst_status
                        .get(&planned.mapping.target_wire)
                        .map(|s| s.uidvalidity);
                    let needed =
                        req.store.is_some() && needs_job(cp.as_ref(), &st, target_validity);
                    if needed {
                        planned.job = true;
                        let pending = pending_messages(cp.as_ref(), &st);
                        // An archive-only folder is not cut: each range would read the
                        // other folders again.
                        let starts = req
                            .split
                            .filter(|_| job.archive.is_none())
                            .map(|limits| range_starts(st.messages, pending, st.size, limits))
                            .unwrap_or_default();
                        if starts.is_empty() {
                            jobs.push(job);
                        } else {
                            let ranges = cut_into_ranges(req.source, &job, &starts)
                                .await
                                .map_err(PlanError::source_side)?;
                            tracing::info!(folder = %planned.mapping.source_path, jobs = ranges.len(), "folder cut into UID-range jobs");
                            jobs.extend(ranges);
                        }
                    }
                }
                Some(Err(e)) => planned.problem = Some(format!("source refused STATUS: {e}")),
                None => {}
            }
        }
        folders.push(planned);
    }
    Ok(UserPlan { folders, jobs })
}
