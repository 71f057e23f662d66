//! Secrets (passwords, tokens) as a type that cannot be printed by accident, and the
//! process-wide measures that keep them out of memory that outlives its use.
//!
//! `Debug` redacts, there is no `Display`, and `Serialize` is deliberately not
//! implemented: the only way to the bytes is [`Secret::expose`], which is easy to grep for.
//!
//! What is wiped: a `Secret`'s buffer when it is dropped, the buffers sealing and opening
//! use, and the IMAP commands that carry a password (LOGIN, AUTHENTICATE) once written.
//! What is not: copies the TLS library, the kernel's socket buffers, the JSON and CSV
//! parsers that read a password from a request make; those are why
//! [`keep_out_of_core_dumps`] exists too.

use zeroize::Zeroize;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call it only where the value is sent to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Volatile writes the optimiser may not remove, over the whole capacity.
        self.0.zeroize();
    }
}

/// Overwrites a buffer that held a secret, in a way the optimiser keeps.
pub fn wipe(buf: &mut Vec<u8>) {
    buf.zeroize();
}

/// Keeps this process's memory — where passwords, tokens and sealing keys live while
/// it runs — out of any core dump it may leave (Linux: `/proc/self/coredump_filter` = 0,
/// so a dump holds no anonymous or file-backed mapping; children inherit it). Called
/// first thing by every mailferry process. Returns why it could not, where it could not
/// (another OS, a read-only /proc): the caller logs it and goes on.
pub fn keep_out_of_core_dumps() -> Result<(), String> {
    const FILTER: &str = "/proc/self/coredump_filter";
    if !cfg!(target_os = "linux") {
        return Err("core dumps are only kept out on Linux".into());
    }
    std::fs::write(FILTER, "0").map_err(|e| format!("cannot write {FILTER}: {e}"))?;
    match std::fs::read_to_string(FILTER) {
        Ok(now) if u32::from_str_radix(now.trim(), 16) == Ok(0) => Ok(()),
        Ok(now) => Err(format!("{FILTER} reads {} after writing 0", now.trim())),
        Err(e) => Err(format!("cannot read {FILTER}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_never_shows_the_value() {
        let s = super::Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
