//! Throw-away Cyrus IMAP servers: the second implementation the suite migrates from and
//! to. Cyrus differs from Dovecot where it matters: `.` as delimiter, personal folders
//! under `INBOX.`, and it refuses messages with bare line feeds or NUL bytes.
//!
//! Cyrus conflicts with Dovecot as a Debian package, so `tests/run-all.sh` unpacks its
//! packages into a directory of their own (`MAILFERRY_CYRUS_ROOT`, default
//! `/var/tmp/mailferry-cyrus/root`) and installs only the libraries they need.

use crate::dovecot::{free_port, stop, temp_dir, wait_for_greeting};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Cyrus {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

/// Where the unpacked Cyrus packages are.
pub fn cyrus_root() -> PathBuf {
    std::env::var_os("MAILFERRY_CYRUS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/mailferry-cyrus/root"))
}

impl Cyrus {
    /// The delimiter and personal prefix this configuration gives.
    pub const DELIMITER: char = '.';
    pub const PREFIX: &'static str = "INBOX.";

    /// A server where any password is accepted (`sasl_pwcheck_method: alwaystrue`):
    /// logins are tested against Dovecot; here the mail is what matters.
    pub fn start() -> Cyrus {
        let root = cyrus_root();
        let bin = root.join("usr/lib/cyrus/bin");
        assert!(
            bin.join("master").is_file(),
            "Cyrus is not unpacked at {}: run `bash tests/run-all.sh` once (it fetches it), \
             or set MAILFERRY_CYRUS_ROOT",
            root.display()
        );
        let dir = temp_dir("cyrus");
        let conf = dir.join("conf");
        for sub in [
            "db", "log", "msg", "proc", "ptclient", "quota", "sieve", "socket", "user", "lock",
            "sync",
        ] {
            std::fs::create_dir_all(conf.join(sub)).expect("mkdir");
        }
        std::fs::create_dir_all(dir.join("spool")).expect("mkdir");
        let status = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the Cyrus directory failed");
        let port = free_port();
        let d = dir.display();
        std::fs::write(
            dir.join("imapd.conf"),
            format!(
                "configdirectory: {d}/conf\npartition-default: {d}/spool\n\
                 cyrus_user: nobody\ncyrus_group: nogroup\n\
                 sasl_pwcheck_method: alwaystrue\nsasl_mech_list: PLAIN LOGIN\nallowplaintext: yes\n\
                 admins: cyradmin\nautocreate_quota: 0\nunixhierarchysep: no\naltnamespace: no\n\
                 munge8bit: no\nservername: localhost\nsyslog_prefix: mft-cyrus-{port}\n\
                 lmtpsocket: {d}/conf/socket/lmtp\nidlesocket: {d}/conf/socket/idle\n\
                 notifysocket: {d}/conf/socket/notify\n"
            ),
        )
        .expect("imapd.conf");
        let b = bin.display();
        std::fs::write(
            dir.join("cyrus.conf"),
            format!(
                "START {{\n  recover cmd=\"{b}/ctl_cyrusdb -r -C {d}/imapd.conf\"\n}}\n\
                 SERVICES {{\n  imap cmd=\"{b}/imapd -C {d}/imapd.conf\" listen=\"127.0.0.1:{port}\" prefork=1\n}}\n\
                 EVENTS {{\n}}\nDAEMON {{\n}}\n"
            ),
        )
        .expect("cyrus.conf");
        use std::os::unix::process::CommandExt;
        // Cyrus's master signals its whole process group when it stops: give it its own,
        // or stopping one test's server stops every other test's.
        let child = Command::new(bin.join("master"))
            .process_group(0)
            .arg("-C")
            .arg(dir.join("imapd.conf"))
            .arg("-M")
            .arg(dir.join("cyrus.conf"))
            .arg("-p")
            .arg(dir.join("master.pid"))
            .arg("-D")
            .env("LD_LIBRARY_PATH", root.join("usr/lib/x86_64-linux-gnu"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("master.log")).expect("log"))
            .spawn()
            .expect("starting Cyrus master");
        let server = Cyrus {
            dir,
            port,
            child: Some(child),
        };
        wait_for_greeting("Cyrus", server.port, &[server.dir.join("master.log")]);
        server
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        stop(self.child.take(), &self.dir);
    }
}
