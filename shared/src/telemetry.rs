//! The metrics every mailferry process exports, in one place: their names (stable,
//! `mailferry_` prefix, unit in the name), kinds, labels and help texts. Code records
//! through the [`metrics`] facade with these constants; the coordinator's binary
//! installs the Prometheus recorder and serves `/metrics`. The Grafana dashboard in
//! `helm/dashboards/` queries only names listed in [`CATALOGUE`] (a test checks it).
//!
//! Labels never carry a user id, an address or a folder name: only bounded values
//! (a reason's kind, a side, a status, a batch name chosen by the admin).

/// How a metric is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

pub const MESSAGES_COPIED: &str = "mailferry_messages_copied_total";
pub const BYTES_COPIED: &str = "mailferry_copied_bytes_total";
pub const MESSAGES_SKIPPED: &str = "mailferry_messages_skipped_total";
pub const JOB_FAILURES: &str = "mailferry_job_failures_total";
pub const JOBS_FINISHED: &str = "mailferry_jobs_finished_total";
pub const JOB_DURATION: &str = "mailferry_job_duration_seconds";
pub const MESSAGE_SIZE: &str = "mailferry_message_size_bytes";
pub const JOBS_IN_FLIGHT: &str = "mailferry_jobs_in_flight";
pub const JOB_SLOTS: &str = "mailferry_job_slots";
pub const SLOT_WAITS: &str = "mailferry_connection_slot_waits_total";
pub const THROTTLE_PAUSES: &str = "mailferry_throttle_pauses_total";
pub const RECONNECTS: &str = "mailferry_reconnects_total";
pub const REDIS_ERRORS: &str = "mailferry_redis_errors_total";
pub const USERS: &str = "mailferry_users";
pub const BATCH_MESSAGES_COPIED: &str = "mailferry_batch_pass_copied_messages";
pub const QUEUE_JOBS: &str = "mailferry_queue_ready_messages";
pub const QUEUE_DEAD: &str = "mailferry_queue_dead_messages";
pub const LEADER: &str = "mailferry_coordinator_leader";
pub const BUILD_INFO: &str = "mailferry_build_info";
pub const IMAP_COMMAND_SECONDS: &str = "mailferry_imap_command_seconds";
pub const IMAP_CONNECTIONS: &str = "mailferry_imap_connections";
// The process's own, under the names Prometheus's client libraries use.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_FDS: &str = "process_open_fds";

/// Every exported metric: name, kind, labels, help.
pub const CATALOGUE: &[(&str, Kind, &[&str], &str)] = &[
    (MESSAGES_COPIED, Kind::Counter, &[], "Messages appended to target folders."),
    (BYTES_COPIED, Kind::Counter, &[], "Bytes of the messages appended to target folders."),
    (MESSAGES_SKIPPED, Kind::Counter, &["reason"], "Messages not copied, by reason (too_large; other: the target refused it)."),
    (JOB_FAILURES, Kind::Counter, &["side", "reason", "outcome"], "Folder jobs that failed, by side, kind of error and outcome (retry, dead_letter, throttled)."),
    (JOBS_FINISHED, Kind::Counter, &["outcome"], "Folder jobs ended, by outcome (done, unchanged, mismatch, skipped, handed_back, stopped; failed_unrun: not tried, its account was refused in the same bundle)."),
    (JOB_DURATION, Kind::Histogram, &[], "Wall time of folder job runs that reached the end."),
    (MESSAGE_SIZE, Kind::Histogram, &[], "Sizes of the messages copied."),
    (JOBS_IN_FLIGHT, Kind::Gauge, &[], "Folder jobs this worker is running."),
    (JOB_SLOTS, Kind::Gauge, &[], "Jobs this worker runs at once (worker.job_slots)."),
    (SLOT_WAITS, Kind::Counter, &["scope"], "Times a connection waited for a slot under a shared cap (scope: account, host)."),
    (THROTTLE_PAUSES, Kind::Counter, &[], "Accounts paused after a server's throttling answer."),
    (RECONNECTS, Kind::Counter, &["service"], "Connections re-established after a loss (service: amqp)."),
    (REDIS_ERRORS, Kind::Counter, &[], "Redis commands that failed (the connection manager reconnects)."),
    (USERS, Kind::Gauge, &["batch", "status"], "Users by status, per batch not yet completed (the leading coordinator; 0 on the others)."),
    (BATCH_MESSAGES_COPIED, Kind::Gauge, &["batch"], "Messages copied so far in the batch's current passes: a gauge that starts again with each pass (the leading coordinator; 0 on the others)."),
    (QUEUE_JOBS, Kind::Gauge, &[], "Messages (job bundles) ready in the jobs queue, not those being worked on (the leading coordinator; 0 on the others)."),
    (QUEUE_DEAD, Kind::Gauge, &[], "Messages in the dead-letter queue (the leading coordinator; 0 on the others)."),
    (LEADER, Kind::Gauge, &[], "1 while this coordinator holds the leader lease."),
    (BUILD_INFO, Kind::Gauge, &["version", "process"], "Always 1; the labels tell the version and the process kind."),
    (IMAP_COMMAND_SECONDS, Kind::Histogram, &["command"], "Time from sending an IMAP command to the server's completion, by command (LOGIN, AUTHENTICATE, SELECT, EXAMINE, STATUS, UID FETCH, APPEND, …): a slow server shows here before its jobs slow down."),
    (IMAP_CONNECTIONS, Kind::Gauge, &[], "IMAP connections this process holds open, both sides, idle ones in the pools included."),
    (PROCESS_CPU, Kind::Counter, &[], "CPU time this process has used, user and system (Linux)."),
    (PROCESS_RSS, Kind::Gauge, &[], "Resident memory of this process (Linux)."),
    (PROCESS_FDS, Kind::Gauge, &[], "Open file descriptors of this process: sockets to servers among them (Linux)."),
];

/// Records the process metrics from `/proc/self` (Linux; elsewhere nothing). Called
/// before each scrape is rendered and by the upkeep.
pub fn record_process() {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks of
    // USER_HZ, which Linux fixes at 100 for user space on every architecture.
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // The command name (field 2) may hold spaces: count from after its ')'.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                metrics::counter!(PROCESS_CPU).absolute((user + system) / 100);
            }
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        if let Some(kib) = rss_kib {
            metrics::gauge!(PROCESS_RSS).set(kib * 1024.0);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(PROCESS_FDS).set(fds.count() as f64);
    }
}

/// Registers every metric's help text with the installed recorder.
pub fn describe() {
    for (name, kind, _, help) in CATALOGUE {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// The name a Prometheus series of `name` belongs to (histograms export `_bucket`,
/// `_sum` and `_count`), if it is one of ours.
pub fn family(series: &str) -> Option<&'static str> {
    CATALOGUE.iter().map(|(n, ..)| *n).find(|n| {
        series == *n
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| series.strip_suffix(s) == Some(n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_unique_and_carry_their_unit() {
        let mut seen = std::collections::HashSet::new();
        for (name, kind, labels, _) in CATALOGUE {
            // Ours are prefixed; the process metrics keep the names every Prometheus
            // client library gives them, so standard dashboards find them.
            let standard = [PROCESS_CPU, PROCESS_RSS, PROCESS_FDS].contains(name);
            assert!(name.starts_with("mailferry_") || standard, "{name}");
            assert!(seen.insert(*name), "{name} twice");
            if *kind == Kind::Counter {
                assert!(name.ends_with("_total"), "{name}: counters end in _total");
            }
            for l in *labels {
                assert!(
                    !["user", "email", "address", "folder"].contains(l),
                    "{name}: {l}"
                );
            }
        }
        assert_eq!(
            family("mailferry_job_duration_seconds_bucket"),
            Some(JOB_DURATION)
        );
        assert_eq!(family("mailferry_users"), Some(USERS));
        assert_eq!(family("mailferry_nope"), None);
    }
}
