//! Which of a user's jobs go out now (pure, unit-tested): bundles within the user's
//! limit of jobs in flight, one job at a time per target folder.

use std::collections::{HashMap, HashSet};

use mailferry_shared::domain::job::FolderJob;
use mailferry_shared::domain::status::JobState;

/// Which of a user's waiting jobs to publish now, as bundles (one queue message each):
/// at most `cap` bundles in flight per user — a group of small folders counts once, as
/// it travels and runs as one — and one job at a time per target folder, a folder's UID
/// ranges in order (they share the folder's checkpoint and its claim; see
/// docs/design.md). `jobs` are the pass's open jobs in planned order (largest folders
/// first).
pub fn next_to_publish(jobs: &[(FolderJob, JobState)], cap: usize) -> Vec<Vec<FolderJob>> {
    let flying = units_in_flight(jobs);
    let in_flight = flying.len();
    let mut busy: HashSet<&[u8]> = jobs
        .iter()
        .filter(|(_, s)| s.in_flight())
        .map(|(j, _)| j.target_folder.as_bytes())
        .collect();
    let lowest = |folder: &[u8]| {
        jobs.iter()
            .filter(|(j, s)| *s == JobState::Waiting && j.target_folder.as_bytes() == folder)
            .map(|(j, _)| j.uid_range.map_or(0, |r| r.0))
            .min()
    };
    let mut taken: HashSet<u32> = HashSet::new();
    let mut out = Vec::new();
    for (job, state) in jobs {
        if out.len() + in_flight >= cap {
            break;
        }
        if *state != JobState::Waiting {
            continue;
        }
        match job.group {
            None => {
                let folder = job.target_folder.as_bytes();
                if busy.contains(folder) || lowest(folder) != Some(job.uid_range.map_or(0, |r| r.0))
                {
                    continue;
                }
                busy.insert(folder);
                out.push(vec![job.clone()]);
            }
            Some(g) => {
                if flying.contains(&Unit::Group(g)) || !taken.insert(g) {
                    continue;
                }
                let members: Vec<&FolderJob> = jobs
                    .iter()
                    .filter(|(j, s)| j.group == Some(g) && *s == JobState::Waiting)
                    .map(|(j, _)| j)
                    .collect();
                // Its jobs run one after another in one worker, so two of them may
                // share a target folder; none may share one with a job in flight.
                if members
                    .iter()
                    .any(|j| busy.contains(j.target_folder.as_bytes()))
                {
                    continue;
                }
                busy.extend(members.iter().map(|j| j.target_folder.as_bytes()));
                out.push(members.into_iter().cloned().collect());
            }
        }
    }
    out
}

/// What travels as one: a group, or a job alone (by its index in the pass's jobs).
#[derive(PartialEq, Eq, Hash)]
enum Unit {
    Group(u32),
    Alone(usize),
}

fn units_in_flight(jobs: &[(FolderJob, JobState)]) -> HashSet<Unit> {
    jobs.iter()
        .enumerate()
        .filter(|(_, (_, s))| s.in_flight())
        .map(|(i, (j, _))| j.group.map_or(Unit::Alone(i), Unit::Group))
        .collect()
}

/// How many bundles of a user's pass are queued or running: what `max_jobs_per_user`
/// bounds.
pub fn bundles_in_flight(jobs: &[(FolderJob, JobState)]) -> usize {
    units_in_flight(jobs).len()
}

/// Jobs (of one user and pass) as the bundles they travel in: a group's jobs together,
/// each other job alone, in the order given.
pub fn bundles(jobs: Vec<FolderJob>) -> Vec<Vec<FolderJob>> {
    let mut out: Vec<Vec<FolderJob>> = Vec::new();
    let mut at: HashMap<u32, usize> = HashMap::new();
    for job in jobs {
        match job.group {
            Some(g) if at.contains_key(&g) => out[at[&g]].push(job),
            Some(g) => {
                at.insert(g, out.len());
                out.push(vec![job]);
            }
            None => out.push(vec![job]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::domain::job::WireName;

    fn job(folder: &str, range: Option<(u32, u32)>) -> FolderJob {
        FolderJob {
            batch: "b".into(),
            user: "u".into(),
            source_folder: WireName(folder.to_string().into()),
            target_folder: WireName(folder.to_string().into()),
            uid_range: range,
            pass: 1,
            group: None,
            archive: None,
        }
    }

    fn names(bundles: &[Vec<FolderJob>]) -> Vec<String> {
        bundles
            .iter()
            .flatten()
            .map(|j| {
                format!(
                    "{} {:?}",
                    j.source_folder.display(),
                    j.uid_range.map(|r| r.0)
                )
            })
            .collect()
    }

    #[test]
    fn ranges_of_a_folder_go_one_at_a_time_in_order_within_the_cap() {
        let w = JobState::Waiting;
        let plan = vec![
            (job("INBOX", Some((1, 100))), w.clone()),
            (job("INBOX", Some((101, 200))), w.clone()),
            (job("INBOX", Some((201, u32::MAX))), w.clone()),
            (job("Sent", None), w.clone()),
            (job("Drafts", None), w.clone()),
        ];
        assert_eq!(
            names(&next_to_publish(&plan, 4)),
            ["INBOX Some(1)", "Sent None", "Drafts None"]
        );
        assert_eq!(
            names(&next_to_publish(&plan, 2)),
            ["INBOX Some(1)", "Sent None"]
        );
        // INBOX's first range is done, Sent runs: INBOX's second range is next
        let mut later = plan.clone();
        later.remove(0);
        later[2].1 = JobState::Running;
        assert_eq!(names(&next_to_publish(&later, 2)), ["INBOX Some(101)"]);
        // the cap counts jobs in flight
        later[0].1 = JobState::Queued;
        assert!(next_to_publish(&later, 2).is_empty());
        // a range is never published while its folder has a job in flight, even if
        // an earlier range was handed back and waits again
        let handed_back = vec![
            (job("INBOX", Some((1, 100))), JobState::Running),
            (job("INBOX", Some((101, 200))), w.clone()),
        ];
        assert!(next_to_publish(&handed_back, 4).is_empty());
    }

    fn grouped(folder: &str, group: u32) -> FolderJob {
        FolderJob {
            group: Some(group),
            archive: None,
            ..job(folder, None)
        }
    }

    #[test]
    fn a_group_travels_as_one_bundle_and_counts_once_against_the_cap() {
        let w = JobState::Waiting;
        let plan = vec![
            (job("INBOX", None), w.clone()),
            (grouped("Sent", 1), w.clone()),
            (grouped("Drafts", 1), w.clone()),
            (grouped("Junk", 2), w.clone()),
            (grouped("Trash", 2), w.clone()),
        ];
        let first = next_to_publish(&plan, 2);
        assert_eq!(first.len(), 2);
        assert_eq!(names(&first), ["INBOX None", "Sent None", "Drafts None"]);
        // group 1 runs: with a cap of 2 one more bundle fits, group 2 whole
        let mut later = plan.clone();
        later[1].1 = JobState::Running;
        later[2].1 = JobState::Queued;
        let next = next_to_publish(&later, 2);
        assert_eq!(names(&next), ["INBOX None"]);
        later[0].1 = JobState::Queued;
        assert!(
            next_to_publish(&later, 2).is_empty(),
            "INBOX and group 1 fly"
        );
        later[0].1 = JobState::Done {
            verified: true,
            mismatch: None,
            counts: None,
        };
        assert_eq!(
            names(&next_to_publish(&later, 2)),
            ["Junk None", "Trash None"]
        );
        // a group waits while one of its folders has a job in flight
        let blocked = vec![
            (job("Junk", Some((1, 10))), JobState::Running),
            (grouped("Junk", 3), w.clone()),
            (grouped("Trash", 3), w.clone()),
        ];
        assert!(next_to_publish(&blocked, 4).is_empty());
        // republishing what flies keeps the bundles
        let flying: Vec<FolderJob> = plan.iter().map(|(j, _)| j.clone()).collect();
        let b = bundles(flying);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 2]);
    }
}
