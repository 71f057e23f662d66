//! Crash injection for the crash-safety tests. `MAILFERRY_FAILPOINT=name:N` makes the
//! process abort (no destructors, no flushing: as abrupt as `kill -9`) the N-th time it
//! passes the point `name`; `name:N:panic` makes that pass panic instead (a bug in one
//! job, which must fail that job and nothing else). Unset, a failpoint costs one relaxed
//! atomic load.
//!
//! Points: `before-chunk` (a chunk of messages about to be copied, the last one
//! checkpointed),
//! `mid-fetch` (a message body received), `after-append` (an APPEND completed at the
//! target, its checkpoint not yet written), `mid-checkpoint` (checkpoint temp file
//! written, not yet renamed into place).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Config {
    name: String,
    at: u64,
    panic: bool,
    hits: AtomicU64,
}

fn config() -> Option<&'static Config> {
    static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let spec = std::env::var("MAILFERRY_FAILPOINT").ok()?;
            let (name, at) = spec.split_once(':')?;
            let (at, panic) = match at.split_once(':') {
                Some((at, "panic")) => (at, true),
                Some(_) => return None,
                None => (at, false),
            };
            Some(Config {
                name: name.to_string(),
                at: at.parse().ok()?,
                panic,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Passes the failpoint `name`.
pub fn hit(name: &str) {
    if let Some(c) = config() {
        if c.name == name && c.hits.fetch_add(1, Ordering::Relaxed) + 1 == c.at {
            if c.panic {
                panic!("failpoint {name}:{} reached", c.at);
            }
            eprintln!("mailferry: failpoint {name}:{} reached, aborting", c.at);
            std::process::abort();
        }
    }
}
