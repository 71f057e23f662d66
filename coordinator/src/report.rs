//! What the embedded mode shows while it runs and what it says at the end: progress bars
//! on a terminal (plain log lines otherwise), a per-user summary, and the exit code.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mailferry_shared::domain::job::{FolderJob, SkippedMessage};
use mailferry_shared::{Error as SharedError, Side};
use mailferry_worker::{JobError, JobReport, ProgressSink};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal, lines otherwise.
    Auto,
    Bars,
    Lines,
    None,
}

/// What went wrong, in the terms the exit code speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    Other,
    TargetAuth,
    SourceAuth,
    Connection,
}

pub fn classify(side: Option<Side>, e: &SharedError) -> FailureKind {
    match e {
        SharedError::AuthRejected { .. } => match side {
            Some(Side::Target) => FailureKind::TargetAuth,
            _ => FailureKind::SourceAuth,
        },
        SharedError::Dns { .. }
        | SharedError::ConnectionRefused { .. }
        | SharedError::Timeout { .. }
        | SharedError::TlsCertificate { .. }
        | SharedError::TlsHandshake { .. }
        | SharedError::StartTlsNotOffered { .. }
        | SharedError::ConnectionLost { .. }
        | SharedError::Throttled { .. } => FailureKind::Connection,
        _ => FailureKind::Other,
    }
}

fn classify_job(e: &JobError) -> FailureKind {
    match e {
        JobError::Imap { side, source } => classify(Some(*side), source),
        _ => FailureKind::Other,
    }
}

/// Everything known about one user's run.
#[derive(Debug, Default)]
pub struct UserSummary {
    pub folders_planned: usize,
    pub folders_done: usize,
    pub to_copy: u64,
    pub to_copy_bytes: u64,
    pub copied: u64,
    pub copied_bytes: u64,
    pub matched: u64,
    pub flags_updated: u64,
    /// Listed by the source but not returned when fetched; the next run asks again.
    pub missed: u64,
    pub skipped: Vec<(String, SkippedMessage)>,
    /// Folders that failed for good: folder (or "" for the whole user), reason, kind.
    pub failed: Vec<(String, String, FailureKind)>,
    pub retries: u64,
    pub started: Option<Instant>,
    pub elapsed: Duration,
}

struct UserState {
    summary: UserSummary,
    bar: Option<ProgressBar>,
    current: String,
    /// Bytes copied so far, counted as APPENDs complete (the summary's count comes
    /// from finished jobs).
    live_bytes: u64,
}

impl UserState {
    /// The text beside the bar: folders done, bytes so far, the folder last started.
    fn refresh(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{}/{} folders, {}, {}",
                self.summary.folders_done,
                self.summary.folders_planned,
                human_bytes(self.live_bytes),
                self.current
            ));
        }
    }
}

pub struct Reporter {
    mode: ProgressMode,
    multi: Option<MultiProgress>,
    users: Mutex<BTreeMap<String, UserState>>,
}

impl Reporter {
    pub fn new(mode: ProgressMode) -> Self {
        use std::io::IsTerminal;
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bars,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        let multi = (mode == ProgressMode::Bars)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Reporter {
            mode,
            multi,
            users: Mutex::new(BTreeMap::new()),
        }
    }

    fn with_user<R>(&self, user: &str, f: impl FnOnce(&mut UserState) -> R) -> R {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let state = users.entry(user.to_string()).or_insert_with(|| {
            let bar = self.multi.as_ref().map(|m| {
                let bar = m.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:24!} [{bar:30}] {pos}/{len} msgs {rate:>10} {wide_msg}",
                    )
                    .expect("valid template")
                    .with_key(
                        "rate",
                        |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.0}/s", state.per_sec());
                        },
                    )
                    .progress_chars("=> "),
                );
                bar.set_prefix(user.to_string());
                bar
            });
            UserState {
                summary: UserSummary {
                    started: Some(Instant::now()),
                    ..UserSummary::default()
                },
                bar,
                current: String::new(),
                live_bytes: 0,
            }
        });
        f(state)
    }

    /// A line for the log (lines mode) or above the bars (bars mode).
    pub fn line(&self, text: &str) {
        match (&self.multi, self.mode) {
            (Some(m), _) => {
                let _ = m.println(text);
            }
            (None, ProgressMode::None) => {}
            (None, _) => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{text}");
            }
        }
    }

    pub fn user_planned(&self, user: &str, folders: usize, jobs: usize) {
        self.with_user(user, |s| {
            s.summary.folders_planned = folders;
            // Folders without a job (up to date, excluded, empty) are done already.
            s.summary.folders_done = folders - jobs;
            s.refresh();
        });
        if self.multi.is_none() {
            self.line(&format!(
                "{user}: planned {folders} folders, {jobs} to sync"
            ));
        }
    }

    pub fn user_failed(&self, user: &str, reason: &str, kind: FailureKind) {
        self.with_user(user, |s| {
            s.summary
                .failed
                .push((String::new(), reason.to_string(), kind));
            if let Some(bar) = &s.bar {
                bar.abandon_with_message(format!("FAILED: {reason}"));
            }
        });
        if self.multi.is_none() {
            self.line(&format!("{user}: FAILED: {reason}"));
        }
    }

    /// Ends the bars and returns every user's summary.
    pub fn finish(&self) -> BTreeMap<String, UserSummary> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = BTreeMap::new();
        for (user, mut state) in std::mem::take(&mut *users) {
            if let Some(bar) = state.bar.take() {
                // The summary that follows says it all; a finished bar would be drawn twice.
                bar.finish_and_clear();
            }
            if let Some(t) = state.summary.started {
                state.summary.elapsed = t.elapsed();
            }
            out.insert(user, state.summary);
        }
        out
    }
}

impl ProgressSink for Reporter {
    fn job_started(&self, job: &FolderJob, messages: u64, bytes: u64) {
        self.with_user(&job.user, |s| {
            s.summary.to_copy += messages;
            s.summary.to_copy_bytes += bytes;
            s.current = job.source_folder.display();
            if let Some(bar) = &s.bar {
                bar.set_length(s.summary.to_copy);
            }
            s.refresh();
        });
    }

    fn copied(&self, job: &FolderJob, messages: u64, bytes: u64) {
        self.with_user(&job.user, |s| {
            s.live_bytes += bytes;
            if let Some(bar) = &s.bar {
                bar.inc(messages);
            }
            s.refresh();
        });
    }

    fn skipped(&self, job: &FolderJob, message: &SkippedMessage) {
        let folder = job.source_folder.display();
        self.with_user(&job.user, |s| {
            s.summary.skipped.push((folder.clone(), message.clone()))
        });
        self.line(&format!(
            "{}: {folder}: skipped UID {} ({} bytes): {}",
            job.user, message.uid, message.size, message.reason
        ));
    }

    fn job_finished(&self, job: &FolderJob, report: &JobReport) {
        let folder = job.source_folder.display();
        let done = self.with_user(&job.user, |s| {
            s.summary.folders_done += 1;
            s.summary.copied += report.copied;
            s.summary.copied_bytes += report.copied_bytes;
            s.summary.matched += report.matched;
            s.summary.flags_updated += report.flags_updated;
            s.summary.missed += report.missed;
            s.refresh();
            (s.summary.folders_done, s.summary.folders_planned)
        });
        if self.multi.is_none() {
            self.line(&format!(
                "{}: {folder}: copied {} ({}), already there {}, flags updated {}, skipped {} [{}/{} folders]",
                job.user,
                report.copied,
                human_bytes(report.copied_bytes),
                report.matched,
                report.flags_updated,
                report.skipped.len(),
                done.0,
                done.1
            ));
        }
    }

    fn job_failed(&self, job: &FolderJob, error: &JobError, reason: &str, will_retry: bool) {
        let folder = job.source_folder.display();
        self.with_user(&job.user, |s| {
            if will_retry {
                s.summary.retries += 1;
            } else {
                s.summary.folders_done += 1;
                s.summary
                    .failed
                    .push((folder.clone(), reason.to_string(), classify_job(error)));
            }
        });
        let what = if will_retry { "will retry" } else { "FAILED" };
        self.line(&format!("{}: {folder}: {what}: {reason}", job.user));
    }
}

/// One user's folder mapping as a table, one line a folder (indented by two): where
/// it goes, its messages and size, and what happens to it. `migrate --dry-run` and
/// `mailferry api preview` print it.
pub fn mapping_table(folders: &[crate::planner::PlannedFolder]) -> String {
    use mailferry_shared::domain::folders::Action;
    let mut out = format!(
        "  {:<32} {:<32} {:>9} {:>10}  action\n",
        "source", "target", "messages", "size"
    );
    for f in folders {
        let action = match &f.mapping.action {
            Action::Copy if f.mapping.target_exists => "copy".to_string(),
            Action::Copy => "create, copy".to_string(),
            Action::Create => "create (container)".to_string(),
            Action::Exclude(why) => format!("skip: {why}"),
        };
        let action = match &f.problem {
            Some(p) => format!("{action} ({p})"),
            None if f.mapping.archive_only => format!("{action}: only messages in no other folder"),
            None => action,
        };
        out.push_str(&format!(
            "  {:<32} {:<32} {:>9} {:>10}  {action}\n",
            f.mapping.source_path,
            f.mapping.target_path,
            f.messages.map(|m| m.to_string()).unwrap_or_default(),
            f.size.map(human_bytes).unwrap_or_default(),
        ));
    }
    out
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Exit codes, most severe first: the first that applies is the process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Skipped = 1,
    Usage = 2,
    SourceAuth = 3,
    TargetAuth = 4,
    Connection = 5,
    FolderFailed = 6,
    BadRows = 7,
}

/// The exit code for a finished run.
pub fn exit_for(summaries: &BTreeMap<String, UserSummary>, bad_rows: usize) -> Exit {
    let kinds: Vec<FailureKind> = summaries
        .values()
        .flat_map(|s| s.failed.iter().map(|f| f.2))
        .collect();
    if kinds.contains(&FailureKind::Connection) {
        Exit::Connection
    } else if kinds.contains(&FailureKind::SourceAuth) {
        Exit::SourceAuth
    } else if kinds.contains(&FailureKind::TargetAuth) {
        Exit::TargetAuth
    } else if !kinds.is_empty() {
        Exit::FolderFailed
    } else if bad_rows > 0 {
        Exit::BadRows
    } else if summaries
        .values()
        .any(|s| !s.skipped.is_empty() || s.missed > 0)
    {
        Exit::Skipped
    } else {
        Exit::Ok
    }
}

/// The end-of-run summary, one block per user.
pub fn render_summary(summaries: &BTreeMap<String, UserSummary>) -> String {
    let mut out = String::new();
    for (user, s) in summaries {
        let secs = s.elapsed.as_secs_f64().max(0.001);
        let status = if !s.failed.is_empty() {
            "FAILED"
        } else if s.missed > 0 {
            "incomplete: run again"
        } else if !s.skipped.is_empty() {
            "synced with skipped messages"
        } else {
            "synced"
        };
        out.push_str(&format!(
            "{user}: {status}\n  folders {}/{}, copied {} messages ({}), already at target {}, \
             flags updated {}, skipped {}, failed folders {}, {:.1} s, {:.0} msgs/s, {}/s\n",
            s.folders_done,
            s.folders_planned,
            s.copied,
            human_bytes(s.copied_bytes),
            s.matched,
            s.flags_updated,
            s.skipped.len(),
            s.failed.iter().filter(|f| !f.0.is_empty()).count(),
            secs,
            s.copied as f64 / secs,
            human_bytes((s.copied_bytes as f64 / secs) as u64),
        ));
        if s.missed > 0 {
            out.push_str(&format!(
                "  missed: {} messages the source listed but did not return; the next run asks again\n",
                s.missed
            ));
        }
        for (folder, m) in &s.skipped {
            out.push_str(&format!(
                "  skipped: {folder} UID {} ({} bytes, {}): {}\n",
                m.uid, m.size, m.internal_date, m.reason
            ));
        }
        for (folder, reason, _) in &s.failed {
            if folder.is_empty() {
                out.push_str(&format!("  failed: {reason}\n"));
            } else {
                out.push_str(&format!("  failed: {folder}: {reason}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::domain::job::SkipKind;

    #[test]
    fn the_most_severe_problem_sets_the_exit_code() {
        let mut all = BTreeMap::new();
        assert_eq!(exit_for(&all, 0), Exit::Ok);
        assert_eq!(exit_for(&all, 2), Exit::BadRows);
        let mut a = UserSummary::default();
        a.skipped.push((
            "INBOX".into(),
            SkippedMessage {
                uid: 1,
                size: 9,
                internal_date: String::new(),
                reason: "too big".into(),
                kind: SkipKind::TooLarge,
            },
        ));
        all.insert("a".into(), a);
        assert_eq!(exit_for(&all, 0), Exit::Skipped);
        let mut b = UserSummary::default();
        b.failed.push((
            String::new(),
            "bad password".into(),
            FailureKind::TargetAuth,
        ));
        all.insert("b".into(), b);
        assert_eq!(exit_for(&all, 3), Exit::TargetAuth);
        let mut c = UserSummary::default();
        c.failed
            .push((String::new(), "refused".into(), FailureKind::Connection));
        all.insert("c".into(), c);
        assert_eq!(exit_for(&all, 0), Exit::Connection);
        let text = render_summary(&all);
        assert!(
            text.contains("skipped: INBOX UID 1 (9 bytes, ): too big"),
            "{text}"
        );
    }
}
