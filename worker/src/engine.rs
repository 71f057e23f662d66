//! The copy engine: runs one [`FolderJob`] — one source folder (or UID range) into one
//! target folder — safely re-runnable at any point.
//!
//! One pass:
//! 1. EXAMINE the source, SELECT the target (creating it if missing), load the checkpoint.
//!    A checkpoint whose UIDVALIDITYs no longer match is discarded.
//! 2. Nothing changed since the last pass (same UIDNEXT, MESSAGES and HIGHESTMODSEQ)?
//!    Done: two commands.
//! 3. An in-flight window left by a crash is resolved by content (see [`recover`]).
//! 4. Without a checkpoint, the folder is reconciled against the target by identity.
//! 5. New messages are copied in chunks. Before each chunk the in-flight window (source
//!    UIDs and the target's UIDNEXT) is written durably; after it, the checkpoint.
//! 6. Flag changes are propagated (CHANGEDSINCE where the source has CONDSTORE).
//!
//! The target is never expunged and nothing is deleted there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use mailferry_shared::domain::job::{Checkpoint, FolderJob, SkipKind, SkippedMessage, SourceState};
use mailferry_shared::imap::client::{Command, Session};
use mailferry_shared::imap::mailbox::{MailboxInfo, StatusItems};
use mailferry_shared::imap::pool::Pool;
use mailferry_shared::imap::uidset;
use mailferry_shared::imap::Flag;
use mailferry_shared::redis::lease::Fence;
use mailferry_shared::store::StateStore;
use mailferry_shared::{failpoint, Error as SharedError};

use crate::accounts::{AccountDirectory, UserAccounts};
use crate::copy::{copy_messages, ByteBudget, CopySettings, Outcome, TargetFolder};
use crate::error::JobError;
use crate::progress::{JobReport, ProgressSink};
use crate::recover;
use mailferry_shared::imap::message::{flag_key, uid_fetch, uid_range, Meta};

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Messages per in-flight window, i.e. between two checkpoints.
    pub chunk_messages: usize,
    pub copy: CopySettings,
    /// Messages larger than this are skipped (besides the target's APPENDLIMIT). Keep it
    /// at or below the connections' literal limit, or such a message fails its folder.
    pub max_message_size: Option<u64>,
    /// Bytes of message bodies in memory at once, across all jobs of the process.
    pub bytes_in_flight: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            chunk_messages: 1000,
            copy: CopySettings {
                fetch_messages: 250,
                fetch_bytes: 8 << 20,
                multiappend: 50,
                append_bytes: 8 << 20,
                append_window: 32,
            },
            max_message_size: Some(mailferry_shared::imap::Limits::default().max_literal),
            bytes_in_flight: 32 << 20,
        }
    }
}

pub struct Engine<S: StateStore> {
    store: Arc<S>,
    accounts: Arc<dyn AccountDirectory>,
    progress: Arc<dyn ProgressSink>,
    settings: EngineSettings,
    budget: ByteBudget,
}

impl<S: StateStore> Engine<S> {
    pub fn new(
        store: Arc<S>,
        accounts: Arc<dyn AccountDirectory>,
        progress: Arc<dyn ProgressSink>,
        settings: EngineSettings,
    ) -> Self {
        let budget = ByteBudget::new(settings.bytes_in_flight);
        Engine {
            store,
            accounts,
            progress,
            settings,
            budget,
        }
    }

    pub fn progress(&self) -> &Arc<dyn ProgressSink> {
        &self.progress
    }

    /// Loads the accounts of a delivery's users ahead of its jobs (together, where the
    /// directory can: see [`AccountDirectory::preload`]). Hold the answer until the
    /// delivery's jobs are done: the accounts stay loaded while it is held.
    #[must_use = "the preloaded accounts stay loaded only while held"]
    pub async fn preload_accounts(&self, jobs: &[FolderJob]) -> Vec<UserAccounts> {
        let mut by_batch: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for job in jobs {
            let users = by_batch.entry(job.batch.as_str()).or_default();
            if !users.contains(&job.user) {
                users.push(job.user.clone());
            }
        }
        let mut held = Vec::new();
        for (batch, users) in by_batch {
            held.extend(self.accounts.preload(batch, &users).await);
        }
        held
    }

    /// Logs out of the user's idle connections now, not when the reaper finds them idle:
    /// a small user's jobs of the pass were all in one delivery, and a worker running
    /// many users at once would otherwise hold their idle source connections against
    /// the host's cap (it filled the cap of 200 at 1,000 × 20, and planning and copying
    /// waited for slots).
    pub async fn close_idle(&self, batch: &str, user: &str) {
        if let Ok(accounts) = self.accounts.accounts(batch, user).await {
            accounts
                .source
                .close_idle_since(std::time::Duration::ZERO)
                .await;
            accounts
                .target
                .close_idle_since(std::time::Duration::ZERO)
                .await;
        }
    }

    /// Runs one job to the end. On error nothing is lost: the checkpoint and the target
    /// stay consistent and the job can simply run again.
    /// `fence` says when this run must stop writing (see [`Fence`]).
    pub async fn run_job(&self, job: &FolderJob, fence: &Fence) -> Result<JobReport, JobError> {
        tracing::debug!(job = %job.id(), "job: looking up accounts");
        let accounts = self.accounts.accounts(&job.batch, &job.user).await?;
        tracing::debug!(job = %job.id(), "job: getting connections");
        let result = async {
            let mut source = accounts.source.get().await.map_err(JobError::source_side)?;
            let mut target = accounts.target.get().await.map_err(JobError::target_side)?;
            tracing::debug!(job = %job.id(), "job: connected");
            let report = self
                .run_on(job, &accounts.source, &mut source, &mut target, fence)
                .await?;
            source.release();
            target.release();
            Ok(report)
        }
        .await;
        if let Err(JobError::Imap { side, source }) = &result {
            accounts.report_throttling(*side, source).await;
        }
        let report = result?;
        tracing::debug!(job = %job.id(), copied = report.copied, "job: done");
        Ok(report)
    }

    async fn run_on(
        &self,
        job: &FolderJob,
        source_pool: &Pool,
        source: &mut Session,
        target: &mut Session,
        fence: &Fence,
    ) -> Result<JobReport, JobError> {
        let (lo, hi) = job.uid_range.unwrap_or((1, u32::MAX));
        let src = source
            .examine(job.source_folder.as_bytes())
            .await
            .map_err(JobError::source_side)?;
        tracing::debug!(job = %job.id(), "job: source folder open");
        let dst = open_or_create(target, job.target_folder.as_bytes()).await?;
        // The SELECT's own EXISTS is in `dst`; what the server announces from here on
        // is the folder growing (see `measured_at_target`).
        target.take_exists();
        tracing::debug!(job = %job.id(), "job: target folder open");
        let key = job.checkpoint_key();
        let stored = self
            .store
            .load_checkpoint(&key)
            .await
            .map_err(JobError::Store)?;
        let Resumed {
            mut cp,
            incremental,
            validity_changed,
        } = resume(stored, src.uidvalidity, dst.uidvalidity);
        if validity_changed {
            tracing::warn!(job = %job.id(), "UIDVALIDITY changed: reconciling the folder");
        }
        let mut report = JobReport {
            source_messages: src.exists.saturating_sub(cp.elsewhere),
            target_messages: dst.exists,
            ..JobReport::default()
        };

        let now = SourceState {
            uidvalidity: src.uidvalidity,
            uidnext: src.uidnext,
            messages: src.exists,
            highestmodseq: src.highestmodseq,
        };
        if incremental && cp.is_current(&now, Some(dst.uidvalidity)) {
            report.unchanged = true;
            report.whole_folder = true;
            report.skipped_total = cp.skipped.len() as u32;
            self.progress.job_started(job, 0, 0);
            self.progress.job_finished(job, &report);
            return Ok(report);
        }

        // Copies this checkpoint does not know of can only be at or above this target
        // UID (a run that ended without writing its checkpoint made them). A checkpoint
        // of the older format names an in-flight window instead; one with neither was
        // written with nothing in flight.
        let bound = if incremental {
            search_bound(&mut cp)
        } else {
            None
        };

        // With CONDSTORE a pass reads only new messages' metadata and changed flags;
        // without it, the flags of every message are compared.
        let condstore = incremental && src.highestmodseq.is_some() && cp.source_modseq.is_some();
        let meta_from = if condstore {
            metadata_from(&cp, lo)
        } else {
            lo
        };
        let metas = if src.exists == 0 {
            Vec::new()
        } else {
            fetch_metas(source, meta_from, hi)
                .await
                .map_err(JobError::source_side)?
        };

        let mut reconciled = false;
        // Without a checkpoint the whole folder is reconciled, also for a UID-range job:
        // the match is a multiset over the folder (two identical messages need two
        // copies), which a range alone cannot judge, and the checkpoint it fills is the
        // one all of the folder's ranges share.
        if !incremental && dst.exists > 0 && src.exists > 0 {
            let pairs = recover::reconcile(source, target, &cp.uid_map, (1, u32::MAX)).await?;
            report.matched += pairs.len() as u64;
            reconciled = true;
            for (s, d) in pairs {
                cp.uid_map.insert(s, d);
            }
        }

        // What to copy: not handled before, not at the target already, not too large.
        let limit = size_limit(
            target.capabilities().append_limit(),
            self.settings.max_message_size,
        );
        let missed_before: HashSet<u32> = std::mem::take(&mut cp.missed).into_iter().collect();
        let Triage {
            mut to_copy,
            too_large,
        } = triage(&metas, &cp, &missed_before, limit);
        for skipped in too_large {
            self.progress.skipped(job, &skipped);
            report.skipped.push(skipped.clone());
            cp.skipped.push(skipped);
        }
        // An archive-only folder (All Mail) leaves out what the user's other folders hold.
        // They count as handled once the watermark passes them (see `count_elsewhere`).
        let mut elsewhere: Vec<u32> = Vec::new();
        if let Some(archive) = &job.archive {
            let found = crate::archive::in_other_folders(
                source,
                job.source_folder.as_bytes(),
                src.uidvalidity,
                archive,
                &to_copy,
            )
            .await
            .map_err(JobError::source_side)?;
            to_copy.retain(|m| !found.contains(&m.uid));
            elsewhere = found.into_iter().collect();
            elsewhere.sort_unstable();
            tracing::debug!(job = %job.id(), in_other_folders = elsewhere.len(), "archive-only folder");
        }
        let mut elsewhere_counted = 0;
        let held_bound = recover_unrecorded(
            job,
            (source, target),
            &dst,
            bound,
            hi,
            &mut cp,
            &mut report,
            &mut to_copy,
        )
        .await?;
        self.progress.job_started(
            job,
            to_copy.len() as u64,
            to_copy.iter().map(|m| m.size).sum(),
        );

        let caps = target.capabilities();
        let folder = TargetFolder {
            wire_name: job.target_folder.as_bytes(),
            info: &dst,
            multiappend: caps.has("MULTIAPPEND"),
            binary: caps.has("BINARY"),
            uidplus: caps.has("UIDPLUS"),
            fence,
        };
        let uidplus = folder.uidplus;
        let mut target_uidnext = dst.uidnext;
        let mut copied_now: HashSet<u32> = HashSet::new();
        let chunks: Vec<&[Meta]> = to_copy
            .chunks(self.settings.chunk_messages.max(1))
            .collect();
        if !chunks.is_empty() {
            // An account whose daily download budget is used up copies nothing more.
            source_pool.spend(0).await.map_err(JobError::source_side)?;
        }
        let chunk_count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let bytes_before = report.copied_bytes;
            // No write-ahead record: copies made from here on are at or above the bound
            // the last checkpoint holds, which is what the next run searches.
            let chunk_bound = target_uidnext;
            failpoint::hit("before-chunk");

            let outcomes = self
                .copy_chunk(job, (source, target), chunk, &folder)
                .await?;
            // Copies without a reported target UID, in APPEND order.
            let unmapped = self.record_outcomes(
                job,
                chunk,
                outcomes,
                &mut cp,
                &mut report,
                &mut target_uidnext,
                &mut copied_now,
            );
            if !uidplus && !unmapped.is_empty() {
                map_without_uidplus(
                    job,
                    target,
                    chunk_bound,
                    &unmapped,
                    &mut cp,
                    &mut target_uidnext,
                )
                .await?;
            }
            let last = chunk.last().expect("chunks are not empty").uid;
            if contiguous(&cp, lo) {
                cp.source_uid_done = cp.source_uid_done.max(last + 1);
            }
            count_elsewhere(&mut cp, &elsewhere, &mut elsewhere_counted);
            cp.target_uidnext = Some(bound_to_write(held_bound, target_uidnext));
            // The last chunk of a pass with no flags to sync is saved by the pass's own
            // save right after the loop: one checkpoint write for a small folder, not
            // two. Should the run end in between, its copies are unrecorded ones, which
            // the next run finds like any other: by its search from the bound the last
            // checkpoint holds, or by reconciling a folder that has none.
            let saved_after_the_loop = i + 1 == chunk_count && !(incremental || reconciled);
            if !saved_after_the_loop {
                self.save(job, &cp, fence).await?;
            }
            // Counted once the chunk is checkpointed (or about to be): a pause here
            // loses nothing.
            source_pool
                .spend(report.copied_bytes - bytes_before)
                .await
                .map_err(JobError::source_side)?;
        }
        // Every source message of the range that existed when the job looked is handled
        // now (copied, found, skipped, or listed as missed to be asked for again).
        if contiguous(&cp, lo) {
            let top = hi.min(src.uidnext.saturating_sub(1));
            cp.source_uid_done = cp.source_uid_done.max(top.saturating_add(1));
        }
        count_elsewhere(&mut cp, &elsewhere, &mut elsewhere_counted);
        report.source_messages = src.exists.saturating_sub(cp.elsewhere);

        // Flags of messages copied earlier.
        if incremental || reconciled {
            report.flags_updated = sync_flags(
                source,
                target,
                &folder,
                &cp,
                &metas,
                &copied_now,
                condstore,
                (lo, hi),
            )
            .await?;
        }

        close_pass(&mut cp, &src, hi);
        report.whole_folder = hi == u32::MAX;
        cp.target_uidnext = Some(bound_to_write(held_bound, target_uidnext));
        self.save(job, &cp, fence).await?;
        report.skipped_total = cp.skipped.len() as u32;
        report.target_messages = measured_at_target(target, job, &dst, &report).await?;
        self.progress.job_finished(job, &report);
        Ok(report)
    }

    /// Copies one chunk: in MULTIAPPEND groups, and a group the target refused as a
    /// whole (one message spoiled it) once more one message per APPEND, to find the
    /// culprit. Each UID's outcome.
    async fn copy_chunk(
        &self,
        job: &FolderJob,
        (source, target): (&mut Session, &mut Session),
        chunk: &[Meta],
        folder: &TargetFolder<'_>,
    ) -> Result<Vec<(u32, Outcome)>, JobError> {
        let progress = self.progress.clone();
        let mut on_copied = |n: u64, bytes: u64| progress.copied(job, n, bytes);
        let (mut outcomes, regroup) = copy_messages(
            source,
            target,
            chunk,
            folder,
            &self.settings.copy,
            &self.budget,
            &mut on_copied,
        )
        .await?;
        if !regroup.is_empty() {
            let retry: Vec<Meta> = chunk
                .iter()
                .filter(|m| regroup.contains(&m.uid))
                .cloned()
                .collect();
            let single = CopySettings {
                multiappend: 1,
                ..self.settings.copy.clone()
            };
            let (more, _) = copy_messages(
                source,
                target,
                &retry,
                &TargetFolder {
                    multiappend: false,
                    ..*folder
                },
                &single,
                &self.budget,
                &mut on_copied,
            )
            .await?;
            outcomes.extend(more);
        }
        Ok(outcomes)
    }

    /// Records a chunk's outcomes in the checkpoint and the report (copied, refused by
    /// the target, missed by the source); returns the copies the target gave no UID
    /// for, in APPEND order.
    #[allow(clippy::too_many_arguments)]
    fn record_outcomes(
        &self,
        job: &FolderJob,
        chunk: &[Meta],
        outcomes: Vec<(u32, Outcome)>,
        cp: &mut Checkpoint,
        report: &mut JobReport,
        target_uidnext: &mut u32,
        copied_now: &mut HashSet<u32>,
    ) -> Vec<(u32, u64)> {
        let sizes: HashMap<u32, &Meta> = chunk.iter().map(|m| (m.uid, m)).collect();
        let mut unmapped: Vec<(u32, u64)> = Vec::new();
        for (uid, outcome) in outcomes {
            match outcome {
                Outcome::Copied { target_uid, size } => {
                    report.copied += 1;
                    report.copied_bytes += size;
                    copied_now.insert(uid);
                    match target_uid {
                        Some(t) => {
                            cp.uid_map.insert(uid, t);
                            *target_uidnext = (*target_uidnext).max(t + 1);
                        }
                        None => unmapped.push((uid, size)),
                    }
                }
                Outcome::Refused(reason) => {
                    let m = sizes[&uid];
                    let skipped = SkippedMessage {
                        uid,
                        size: m.size,
                        internal_date: m.internal_date.clone(),
                        reason,
                        kind: SkipKind::Refused,
                    };
                    self.progress.skipped(job, &skipped);
                    report.skipped.push(skipped.clone());
                    cp.skipped.push(skipped);
                }
                Outcome::Missed => {
                    tracing::warn!(job = %job.id(), uid, "the source did not return a message it listed; asking again next pass");
                    report.missed += 1;
                    cp.missed.push(uid);
                }
            }
        }
        unmapped
    }

    async fn save(&self, job: &FolderJob, cp: &Checkpoint, fence: &Fence) -> Result<(), JobError> {
        // A run that lost its claim must not overwrite the checkpoint of the run that
        // took the folder over.
        fence.check().map_err(JobError::Fenced)?;
        self.store
            .save_checkpoint(&job.checkpoint_key(), cp)
            .await
            .map_err(JobError::Store)
    }
}

/// Finds the copies an earlier run made after its last checkpoint (they can only be at
/// or above `bound` at the target), maps them and takes them out of `to_copy`. Returns
/// the bound a UID-range job keeps: target messages above it that match none of this
/// job's pending messages may be another range's, so a range job keeps them inside the
/// bound it writes (a whole-folder job has seen every pending message: what is left was
/// delivered by someone else; a range job that does not search keeps the bound it
/// found). A target that does not say its UIDNEXT is searched every time.
#[allow(clippy::too_many_arguments)]
async fn recover_unrecorded(
    job: &FolderJob,
    (source, target): (&mut Session, &mut Session),
    dst: &MailboxInfo,
    bound: Option<u32>,
    hi: u32,
    cp: &mut Checkpoint,
    report: &mut JobReport,
    to_copy: &mut Vec<Meta>,
) -> Result<Option<u32>, JobError> {
    let range_job = hi != u32::MAX;
    let above = |b: &u32| dst.uidnext == 0 || dst.uidnext > *b;
    let mut held_bound = bound.filter(|b| range_job && above(b));
    if let Some(bound) = bound.filter(|b| above(b) && !to_copy.is_empty()) {
        let window = recover::resolve_since(source, target, &cp.uid_map, bound, to_copy).await?;
        if !window.pairs.is_empty() {
            tracing::info!(job = %job.id(), found = window.pairs.len(), "found copies of an earlier run that ended without its checkpoint");
        }
        report.matched += window.pairs.len() as u64;
        let found: HashSet<u32> = window.pairs.iter().map(|p| p.0).collect();
        for (s, d) in window.pairs {
            cp.uid_map.insert(s, d);
        }
        to_copy.retain(|m| !found.contains(&m.uid));
        if range_job {
            held_bound = window.lowest_unmatched;
        }
    }
    Ok(held_bound)
}

/// Maps copies a target without UIDPLUS gave no UID for: what arrived at or above the
/// chunk's bound is our APPENDs in order, unless someone else delivered meanwhile, so
/// it is mapped only when count and sizes agree. Its highest UID bounds the next window.
async fn map_without_uidplus(
    job: &FolderJob,
    target: &mut Session,
    chunk_bound: u32,
    unmapped: &[(u32, u64)],
    cp: &mut Checkpoint,
    target_uidnext: &mut u32,
) -> Result<(), JobError> {
    let arrived = arrived_since(target, chunk_bound)
        .await
        .map_err(JobError::target_side)?;
    let aligned =
        arrived.len() == unmapped.len() && arrived.iter().zip(unmapped).all(|(a, u)| a.1 == u.1);
    if aligned {
        for ((t, _), (s, _)) in arrived.iter().zip(unmapped) {
            cp.uid_map.insert(*s, *t);
        }
    } else {
        tracing::warn!(job = %job.id(), "target without UIDPLUS changed during the copy: later flag changes of this chunk will not be propagated");
    }
    if let Some((t, _)) = arrived.last() {
        *target_uidnext = (*target_uidnext).max(t + 1);
    }
    Ok(())
}

/// Brings the flags of messages copied in earlier passes up to date at the target
/// (those copied in this pass have theirs): with CONDSTORE the messages changed since
/// the checkpoint's MODSEQ, else every message's flags, compared with the target's so
/// that only real changes are sent. Returns how many were updated.
#[allow(clippy::too_many_arguments)]
async fn sync_flags(
    source: &mut Session,
    target: &mut Session,
    folder: &TargetFolder<'_>,
    cp: &Checkpoint,
    metas: &[Meta],
    copied_now: &HashSet<u32>,
    condstore: bool,
    (lo, hi): (u32, u32),
) -> Result<u64, JobError> {
    let changed: Vec<(u32, Vec<Flag>)> = if condstore {
        changed_flags(source, lo, hi, cp.source_modseq.unwrap_or(0))
            .await
            .map_err(JobError::source_side)?
    } else {
        metas.iter().map(|m| (m.uid, m.flags.clone())).collect()
    };
    let wanted: Vec<(u32, Vec<Flag>)> = changed
        .into_iter()
        .filter(|(uid, _)| !copied_now.contains(uid))
        .filter_map(|(uid, flags)| cp.uid_map.get(uid).map(|t| (t, folder.keepable(&flags))))
        .collect();
    let updates = if condstore {
        wanted
    } else {
        let current = target_flags(target).await.map_err(JobError::target_side)?;
        wanted
            .into_iter()
            .filter(|(t, flags)| {
                current
                    .get(t)
                    .is_some_and(|cur| flag_key(cur) != flag_key(flags))
            })
            .collect()
    };
    store_flags(target, &updates)
        .await
        .map_err(JobError::target_side)
}

/// Ends the pass in the checkpoint. What says "the whole folder is done" is written by
/// the folder's last (or only) job; its MODSEQ is the lowest any range of the pass saw,
/// so a flag changed during the pass in a range already done is still caught next time.
fn close_pass(cp: &mut Checkpoint, src: &MailboxInfo, hi: u32) {
    let seen_modseq = lowest(cp.range_modseq, src.highestmodseq);
    if hi == u32::MAX {
        cp.source_uidnext = src.uidnext;
        cp.source_messages = src.exists;
        cp.source_modseq = seen_modseq;
        cp.range_modseq = None;
    } else {
        cp.range_modseq = seen_modseq;
    }
}

/// Where a job starts from: its stored checkpoint when both folders' UIDVALIDITY are
/// still the ones it recorded (an incremental pass), else a fresh one (the folder is
/// reconciled against the target).
struct Resumed {
    cp: Checkpoint,
    incremental: bool,
    /// A checkpoint was stored but is of other folders now.
    validity_changed: bool,
}

fn resume(stored: Option<Checkpoint>, source_validity: u32, target_validity: u32) -> Resumed {
    match stored {
        Some(cp)
            if cp.source_uidvalidity == source_validity
                && cp.target_uidvalidity == target_validity =>
        {
            Resumed {
                cp,
                incremental: true,
                validity_changed: false,
            }
        }
        other => Resumed {
            cp: Checkpoint {
                source_uidvalidity: source_validity,
                target_uidvalidity: target_validity,
                ..Checkpoint::default()
            },
            incremental: false,
            validity_changed: other.is_some(),
        },
    }
}

/// Copies an incremental pass's checkpoint does not know of can only be at or above
/// this target UID (a run that ended without writing its checkpoint made them). A
/// checkpoint of the older format names an in-flight window instead (taken out of it
/// here); one with neither was written with nothing in flight.
fn search_bound(cp: &mut Checkpoint) -> Option<u32> {
    lowest(
        cp.in_flight.take().map(|w| w.target_uidnext as u64),
        cp.target_uidnext.map(u64::from),
    )
    .map(|b| b as u32)
}

/// With CONDSTORE, the first UID whose metadata a pass reads: the watermark, or the
/// first message an earlier pass missed, and never below the job's range.
fn metadata_from(cp: &Checkpoint, lo: u32) -> u32 {
    let first_missed = cp.missed.iter().copied().min().unwrap_or(u32::MAX);
    cp.source_uid_done.min(first_missed).max(lo)
}

/// The tighter of the target's APPENDLIMIT and our own maximum, with its name.
fn size_limit(append_limit: Option<u64>, configured: Option<u64>) -> Option<(u64, &'static str)> {
    match (append_limit, configured) {
        (Some(a), Some(m)) if a <= m => Some((a, "the target's APPENDLIMIT")),
        (Some(a), None) => Some((a, "the target's APPENDLIMIT")),
        (_, Some(m)) => Some((m, "the configured maximum")),
        (None, None) => None,
    }
}

/// What a pass does with the messages it listed: copy them, or skip them for their
/// size. Messages it leaves out of both are handled already.
#[derive(Debug, Default)]
struct Triage {
    to_copy: Vec<Meta>,
    /// Larger than the limit: recorded as skipped, never sent.
    too_large: Vec<SkippedMessage>,
}

/// Sorts a pass's listed messages (pure). A message is pending when it is at or above
/// the checkpoint's watermark, or was missed by an earlier pass; a pending message is
/// left out when the checkpoint maps it to a target message already or skipped it
/// before, skipped when it is over `limit`, and copied otherwise.
fn triage(
    metas: &[Meta],
    cp: &Checkpoint,
    missed_before: &HashSet<u32>,
    limit: Option<(u64, &'static str)>,
) -> Triage {
    let skipped_before: HashSet<u32> = cp.skipped.iter().map(|s| s.uid).collect();
    let mut out = Triage::default();
    for m in metas {
        let pending = m.uid >= cp.source_uid_done || missed_before.contains(&m.uid);
        if !pending || cp.uid_map.get(m.uid).is_some() || skipped_before.contains(&m.uid) {
            continue;
        }
        match limit.filter(|(l, _)| m.size > *l) {
            Some((limit, which)) => out.too_large.push(SkippedMessage {
                uid: m.uid,
                size: m.size,
                internal_date: m.internal_date.clone(),
                reason: format!("larger than {which} ({} > {limit} bytes)", m.size),
                kind: SkipKind::TooLarge,
            }),
            None => out.to_copy.push(m.clone()),
        }
    }
    out
}

/// Adds to the checkpoint's count of messages found in other folders those the
/// watermark has passed now (`elsewhere` is sorted; `counted` of them are in already).
/// Counted no earlier, so a run that ends before its checkpoint counts none twice: the
/// next run finds them pending, and elsewhere, again.
fn count_elsewhere(cp: &mut Checkpoint, elsewhere: &[u32], counted: &mut usize) {
    let passed = elsewhere.partition_point(|&uid| uid < cp.source_uid_done);
    if passed > *counted {
        cp.elsewhere = cp.elsewhere.saturating_add((passed - *counted) as u32);
        *counted = passed;
    }
}

/// A range job moves the folder's watermark only when every UID below its range is
/// handled already (the folder's ranges share one checkpoint and normally run in
/// order); otherwise its copies are remembered in the UID map alone.
fn contiguous(cp: &Checkpoint, lo: u32) -> bool {
    cp.source_uid_done.max(1) >= lo
}

/// The bound a checkpoint records: the target's UIDNEXT as this run knows it, unless
/// a range job holds it lower for messages another range may own.
fn bound_to_write(held: Option<u32>, target_uidnext: u32) -> u32 {
    held.map_or(target_uidnext, |h| h.min(target_uidnext))
}

fn lowest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The target folder's message count at the end of a job, measured, not computed: the
/// count the reconciliation compares with the source. The size the server announced
/// after the job's last APPEND (`* n EXISTS`, which servers send for the selected
/// folder) when it covers at least what the folder held plus what was appended; else
/// one STATUS (allowed on the selected folder in IMAP4rev2 and answered by the servers
/// we test). An announcement below that may be an older one, or an expunge by someone
/// else: STATUS tells.
async fn measured_at_target(
    target: &mut Session,
    job: &FolderJob,
    dst: &MailboxInfo,
    report: &JobReport,
) -> Result<u32, JobError> {
    let at_least = dst.exists.saturating_add(report.copied as u32);
    if let Some(announced) = target.take_exists().filter(|&n| n >= at_least) {
        return Ok(announced);
    }
    let status = target
        .status_many(
            &[bytes::Bytes::copy_from_slice(job.target_folder.as_bytes())],
            StatusItems::TARGET,
        )
        .await
        .map_err(JobError::target_side)?;
    Ok(match status.into_iter().next() {
        Some(Ok(st)) => st.messages,
        _ => at_least,
    })
}

async fn open_or_create(target: &mut Session, wire_name: &[u8]) -> Result<MailboxInfo, JobError> {
    match target.select(wire_name).await {
        Ok(info) => Ok(info),
        Err(SharedError::Command { .. }) => {
            let created = target
                .create_all(&[bytes::Bytes::copy_from_slice(wire_name)])
                .await
                .map_err(JobError::target_side)?;
            for r in created {
                r.map_err(JobError::target_side)?;
            }
            target
                .select(wire_name)
                .await
                .map_err(JobError::target_side)
        }
        Err(e) => Err(JobError::target_side(e)),
    }
}

/// `UID FETCH lo:hi (UID RFC822.SIZE FLAGS INTERNALDATE)`, sorted by UID.
async fn fetch_metas(session: &mut Session, lo: u32, hi: u32) -> Result<Vec<Meta>, SharedError> {
    let items = "(UID RFC822.SIZE FLAGS INTERNALDATE)";
    let mut metas = uid_fetch(session, &uid_range(lo, hi), items, |f| {
        f.meta().filter(|m| (lo..=hi).contains(&m.uid))
    })
    .await?;
    metas.sort_unstable_by_key(|m| m.uid);
    metas.dedup_by_key(|m| m.uid);
    Ok(metas)
}

async fn changed_flags(
    session: &mut Session,
    lo: u32,
    hi: u32,
    since: u64,
) -> Result<Vec<(u32, Vec<Flag>)>, SharedError> {
    let items = format!("(UID FLAGS) (CHANGEDSINCE {since})");
    uid_fetch(session, &uid_range(lo, hi), &items, |f| {
        match (f.uid, f.flags) {
            (Some(uid), Some(flags)) if (lo..=hi).contains(&uid) => Some((uid, flags)),
            _ => None,
        }
    })
    .await
}

async fn target_flags(session: &mut Session) -> Result<HashMap<u32, Vec<Flag>>, SharedError> {
    let flags = uid_fetch(session, "1:*", "(UID FLAGS)", |f| f.uid.zip(f.flags)).await?;
    Ok(flags.into_iter().collect())
}

/// Sets flags with one `UID STORE` per distinct flag set, pipelined.
async fn store_flags(
    session: &mut Session,
    updates: &[(u32, Vec<Flag>)],
) -> Result<u64, SharedError> {
    let mut by_set: BTreeMap<Vec<Flag>, Vec<u32>> = BTreeMap::new();
    for (uid, flags) in updates {
        by_set.entry(flags.clone()).or_default().push(*uid);
    }
    let mut handles = Vec::new();
    for (flags, uids) in &by_set {
        let command = Command::new("UID STORE").raw(format!(
            " {} FLAGS.SILENT {}",
            uidset::format(uids),
            Flag::list(flags)
        ));
        handles.push(session.send(command).await?);
    }
    for h in handles {
        h.ok().await?;
    }
    Ok(updates.len() as u64)
}

/// `(uid, size)` of the messages at or above `bound`, by UID.
async fn arrived_since(session: &mut Session, bound: u32) -> Result<Vec<(u32, u64)>, SharedError> {
    let set = uid_range(bound.max(1), u32::MAX);
    let mut out = uid_fetch(session, &set, "(UID RFC822.SIZE)", |f| {
        f.uid.zip(f.size).filter(|(uid, _)| *uid >= bound)
    })
    .await?;
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::domain::job::InFlight;

    fn meta(uid: u32, size: u64) -> Meta {
        Meta {
            uid,
            size,
            flags: Vec::new(),
            internal_date: "01-Jan-2020 00:00:00 +0000".into(),
        }
    }

    fn uids(metas: &[Meta]) -> Vec<u32> {
        metas.iter().map(|m| m.uid).collect()
    }

    #[test]
    fn the_tighter_size_limit_applies_and_is_named() {
        assert_eq!(size_limit(None, None), None);
        assert_eq!(
            size_limit(Some(10), None),
            Some((10, "the target's APPENDLIMIT"))
        );
        assert_eq!(
            size_limit(None, Some(20)),
            Some((20, "the configured maximum"))
        );
        assert_eq!(
            size_limit(Some(10), Some(20)),
            Some((10, "the target's APPENDLIMIT"))
        );
        assert_eq!(
            size_limit(Some(30), Some(20)),
            Some((20, "the configured maximum"))
        );
    }

    #[test]
    fn a_pass_copies_what_is_pending_and_not_handled_and_skips_what_is_too_large() {
        let mut cp = Checkpoint {
            source_uid_done: 10,
            ..Checkpoint::default()
        };
        cp.uid_map.insert(12, 7); // copied by a run that did not move the watermark
        cp.skipped.push(SkippedMessage {
            uid: 13,
            size: 900,
            internal_date: String::new(),
            reason: "larger than the configured maximum (900 > 500 bytes)".into(),
            kind: SkipKind::TooLarge,
        });
        let metas = [
            meta(3, 100),  // below the watermark: done
            meta(4, 100),  // below, but missed last pass: asked for again
            meta(10, 100), // at the watermark: pending
            meta(12, 100), // mapped already
            meta(13, 900), // skipped before: not again
            meta(14, 600), // too large now
            meta(15, 500), // exactly the limit: copied
        ];
        let missed = HashSet::from([4]);
        let t = triage(&metas, &cp, &missed, Some((500, "the configured maximum")));
        assert_eq!(uids(&t.to_copy), [4, 10, 15]);
        assert_eq!(t.too_large.len(), 1);
        let s = &t.too_large[0];
        assert_eq!((s.uid, s.size, s.kind), (14, 600, SkipKind::TooLarge));
        assert_eq!(
            s.reason,
            "larger than the configured maximum (600 > 500 bytes)"
        );

        let no_limit = triage(&metas, &cp, &HashSet::new(), None);
        assert_eq!(uids(&no_limit.to_copy), [10, 14, 15]);
        assert!(no_limit.too_large.is_empty());
    }
    #[test]
    fn a_checkpoint_is_resumed_only_while_both_folders_keep_their_uidvalidity() {
        let stored = Checkpoint {
            source_uidvalidity: 7,
            target_uidvalidity: 9,
            source_uid_done: 40,
            ..Checkpoint::default()
        };
        let r = resume(Some(stored.clone()), 7, 9);
        assert!(r.incremental && !r.validity_changed);
        assert_eq!(r.cp.source_uid_done, 40);
        for (s, d) in [(8, 9), (7, 10)] {
            let r = resume(Some(stored.clone()), s, d);
            assert!(!r.incremental && r.validity_changed);
            assert_eq!(
                (
                    r.cp.source_uidvalidity,
                    r.cp.target_uidvalidity,
                    r.cp.source_uid_done
                ),
                (s, d, 0)
            );
        }
        let r = resume(None, 3, 4);
        assert!(!r.incremental && !r.validity_changed);
    }

    #[test]
    fn the_search_bound_is_the_lowest_the_checkpoint_names_and_the_window_is_taken() {
        let mut cp = Checkpoint::default();
        assert_eq!(search_bound(&mut cp), None, "nothing was in flight");
        cp.target_uidnext = Some(50);
        assert_eq!(search_bound(&mut cp), Some(50));
        cp.in_flight = Some(InFlight {
            source_uids: vec![3],
            target_uidnext: 45,
        });
        assert_eq!(search_bound(&mut cp), Some(45));
        assert_eq!(cp.in_flight, None);
    }

    #[test]
    fn condstore_reads_metadata_from_the_watermark_or_the_first_missed_message() {
        let mut cp = Checkpoint {
            source_uid_done: 100,
            ..Checkpoint::default()
        };
        assert_eq!(metadata_from(&cp, 1), 100);
        cp.missed = vec![70, 30];
        assert_eq!(metadata_from(&cp, 1), 30);
        assert_eq!(metadata_from(&cp, 50), 50, "never below the job's range");
    }

    #[test]
    fn a_pass_closes_the_folder_only_in_its_last_job_with_the_lowest_modseq_seen() {
        let src = MailboxInfo {
            exists: 12,
            uidnext: 40,
            uidvalidity: 3,
            highestmodseq: Some(90),
            ..MailboxInfo::default()
        };
        // An earlier range of the pass saw MODSEQ 70: the folder's end keeps 70.
        let mut cp = Checkpoint {
            range_modseq: Some(70),
            ..Checkpoint::default()
        };
        close_pass(&mut cp, &src, u32::MAX);
        assert_eq!(
            (
                cp.source_uidnext,
                cp.source_messages,
                cp.source_modseq,
                cp.range_modseq
            ),
            (40, 12, Some(70), None)
        );
        // A range that is not the folder's last only lowers what the pass saw.
        let mut cp = Checkpoint::default();
        close_pass(&mut cp, &src, 20);
        assert_eq!(
            (cp.source_uidnext, cp.source_modseq, cp.range_modseq),
            (0, None, Some(90))
        );
    }
}
