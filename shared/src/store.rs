//! Where checkpoints live. [`StateStore`] is the interface; [`DirStore`] is the embedded
//! implementation (one JSON file per folder under a state directory, written atomically
//! and durably, readable by its owner only). The cluster implementation (Redis) fills the
//! same interface.
//!
//! A state directory has one writer at a time: [`DirStore::open`] takes an exclusive
//! lock on `<dir>/lock` for as long as the store lives. Two runs on one directory (an
//! overlapping cron job, a second terminal) would each trust checkpoints the other is
//! rewriting and copy the same mail twice; the second is refused instead.
//!
//! The lock file also says whether the last run ended ([`DirStore::mark_finished`]):
//! `<pid> running` while one runs, `<pid> finished` after. A run that finds `running`
//! under a free lock knows its predecessor died (`kill -9`, a power cut), and with it
//! perhaps APPENDs that the target had received but not yet stored (see
//! `embedded::SETTLE_AFTER_CRASH`).

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::domain::job::{Checkpoint, CheckpointKey};
use crate::error::Error;

pub trait StateStore: Send + Sync + 'static {
    fn load_checkpoint(
        &self,
        key: &CheckpointKey,
    ) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;

    fn save_checkpoint(
        &self,
        key: &CheckpointKey,
        checkpoint: &Checkpoint,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Several checkpoints at once (the planner: every folder of a user); a store that
    /// can do it in one round trip does.
    fn load_checkpoints(
        &self,
        keys: &[CheckpointKey],
    ) -> impl Future<Output = Result<Vec<Option<Checkpoint>>, Error>> + Send {
        async move {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                out.push(self.load_checkpoint(key).await?);
            }
            Ok(out)
        }
    }
}

/// Checkpoints as files: `<dir>/checkpoints/<batch>/<user>/<folder>.json`.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
    /// The directory's lock, held while any clone of the store lives.
    lock: std::sync::Arc<std::fs::File>,
    /// The run before this one did not say it finished.
    predecessor_died: bool,
}

impl DirStore {
    /// Opens (creating it, owner-only) the state directory and locks it, or says which
    /// process holds it.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let root = root.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("checkpoints"))
            .map_err(|e| {
                Error::Store(format!(
                    "cannot create state directory {}: {e}",
                    root.display()
                ))
            })?;
        let lock_path = root.join("lock");
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::Store(format!("opening {}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(Error::Store(format!(
                    "state directory {} is in use by another mailferry run (process {}): \
                     wait for it to end, or give this run its own --state-dir",
                    root.display(),
                    holder.split_whitespace().next().unwrap_or("unknown")
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Store(format!(
                    "locking {}: {e}",
                    lock_path.display()
                )))
            }
        }
        let before = std::fs::read_to_string(&lock_path).unwrap_or_default();
        let lock = std::sync::Arc::new(lock);
        // Who holds it, for the message a second run shows.
        write_lock(&lock, "running")
            .map_err(|e| Error::Store(format!("writing {}: {e}", lock_path.display())))?;
        Ok(DirStore {
            root,
            lock,
            predecessor_died: before.trim_end().ends_with(" running"),
        })
    }

    /// Whether the last run on this directory died without finishing (its lock file
    /// still said `running`).
    pub fn predecessor_died(&self) -> bool {
        self.predecessor_died
    }

    /// Records that this run ended with nothing in flight: the next run need not wait
    /// for writes of ours to land.
    pub fn mark_finished(&self) -> Result<(), Error> {
        write_lock(&self.lock, "finished")
            .map_err(|e| Error::Store(format!("writing {}: {e}", self.root.join("lock").display())))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &CheckpointKey) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(file_name(key.batch.as_bytes()))
            .join(file_name(key.user.as_bytes()))
            .join(format!("{}.json", file_name(key.source_folder.as_bytes())))
    }
}

/// `<pid> <state>` into the lock file, durably.
fn write_lock(mut file: &std::fs::File, state: &str) -> std::io::Result<()> {
    use std::io::Seek;
    file.set_len(0)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    file.write_all(format!("{} {state}\n", std::process::id()).as_bytes())?;
    file.sync_all()
}

/// A file name that any byte string maps to, one to one: unsafe bytes become `%XX`.
fn file_name(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for (i, &b) in raw.iter().enumerate() {
        let safe = b.is_ascii_alphanumeric() || b"-_@+,=".contains(&b) || (b == b'.' && i > 0);
        if safe {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00empty");
    }
    out
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content:
/// temporary file, fsync, rename, fsync of the directory.
/// The file is its owner's only (mode 0600, directories 0700): it names the user's
/// folders.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().expect("a file path has a parent");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    crate::failpoint::hit("mid-checkpoint");
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl StateStore for DirStore {
    async fn load_checkpoint(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, Error> {
        let path = self.path(key);
        tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(cp) => Ok(Some(cp)),
                Err(e) => {
                    // Not fatal: without a checkpoint the folder is reconciled against
                    // the target, which costs time but never duplicates.
                    tracing::warn!(path = %path.display(), error = %e, "ignoring damaged checkpoint");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Store(format!("reading {}: {e}", path.display()))),
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))?
    }

    async fn save_checkpoint(
        &self,
        key: &CheckpointKey,
        checkpoint: &Checkpoint,
    ) -> Result<(), Error> {
        let path = self.path(key);
        let bytes = serde_json::to_vec(checkpoint).map_err(|e| Error::Store(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            write_atomically(&path, &bytes)
                .map_err(|e| Error::Store(format!("writing {}: {e}", path.display())))
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::WireName;

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_name(b"alice@example.com"), "alice@example.com");
        assert_eq!(file_name(b"../x"), "%2E.%2Fx");
        assert_ne!(file_name(b"a/b"), file_name(b"a%2Fb"));
    }

    #[tokio::test]
    async fn checkpoints_round_trip_and_a_damaged_one_reads_as_missing() {
        let dir = std::env::temp_dir().join(format!("mf-store-{}", fastrand::u64(..)));
        let store = DirStore::open(&dir).unwrap();
        let key = CheckpointKey {
            batch: "default".into(),
            user: "u".into(),
            source_folder: WireName("INBOX".into()),
        };
        assert_eq!(store.load_checkpoint(&key).await.unwrap(), None);
        let mut cp = Checkpoint {
            source_uid_done: 42,
            ..Checkpoint::default()
        };
        cp.uid_map.insert(1, 7);
        store.save_checkpoint(&key, &cp).await.unwrap();
        assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(cp.clone()));
        // The same user and folder in another batch is another migration.
        let other_batch = CheckpointKey {
            batch: "second".into(),
            ..key.clone()
        };
        assert_eq!(store.load_checkpoint(&other_batch).await.unwrap(), None);
        store
            .save_checkpoint(&other_batch, &Checkpoint::default())
            .await
            .unwrap();
        assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(cp));
        std::fs::write(store.path(&key), b"{not json").unwrap();
        assert_eq!(store.load_checkpoint(&key).await.unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_directory_has_one_store_at_a_time_and_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mf-store-{}", fastrand::u64(..)));
        let first = DirStore::open(&dir).unwrap();
        assert!(
            !first.predecessor_died(),
            "a new directory has no predecessor"
        );
        let clone = first.clone();
        let refused = DirStore::open(&dir).unwrap_err().to_string();
        assert!(
            refused.contains("is in use by another mailferry run"),
            "{refused}"
        );
        assert!(
            refused.contains(&std::process::id().to_string()),
            "{refused}"
        );
        drop(first);
        assert!(
            DirStore::open(&dir).is_err(),
            "a clone still holds the lock"
        );
        drop(clone);
        let again = DirStore::open(&dir).unwrap();
        assert!(again.predecessor_died(), "the first never said it finished");
        again.mark_finished().unwrap();
        drop(again);
        let again = DirStore::open(&dir).unwrap();
        assert!(!again.predecessor_died());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("checkpoints")), 0o700);
        let file = dir.join("checkpoints/u/x.json");
        write_atomically(&file, b"{}").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        drop(again);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
