//! Throw-away Dovecot servers for tests: each in its own temporary directory with its own
//! configuration, free loopback ports, users from a passwd-file and mail owned by an
//! unprivileged account (Dovecot refuses to store mail as root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TestCa;

/// How a test server is set up.
#[derive(Debug, Clone)]
pub struct DovecotConfig {
    pub users: Vec<(String, String)>,
    /// Hierarchy separator of the personal namespace.
    pub separator: char,
    /// Serve implicit TLS (on `imaps_port`) and offer STARTTLS on the plain port.
    pub tls: bool,
    /// Advertise APPENDLIMIT and refuse larger messages (bytes).
    pub max_mail_size: Option<u64>,
    /// Each user's storage quota (KiB), announced with QUOTA and enforced.
    pub quota_kib: Option<u64>,
    /// A master user `(name, password)` for `user*name` logins.
    pub master: Option<(String, String)>,
    /// Maildir with LAYOUT=fs (allows `.` in names) rather than Maildir++ (refuses it).
    pub layout_fs: bool,
    /// Advertise only these capabilities (the server still has the others): to test
    /// how mailferry copes with a server without LITERAL+, UIDPLUS, CONDSTORE, ...
    pub capabilities: Option<String>,
    /// Connections one user may have open from one address (Dovecot refuses more,
    /// as Gmail refuses a 16th).
    pub max_user_connections: u32,
    /// Also accept OAuth2 bearer tokens (XOAUTH2, OAUTHBEARER), validated by Dovecot
    /// itself: the `oauth2` passdb in local mode, checking each JWT's HS256 signature,
    /// its expiry and that its `sub` names the user logging in.
    pub oauth2: Option<OAuth2Validation>,
    /// Behave as Gmail does: `[Gmail]/All Mail` (`\All`) is a virtual folder holding
    /// every message of every folder plus the archived ones, which are in no listed
    /// folder (APPEND them to [`ARCHIVED`]); `[Gmail]/Starred` (`\Flagged`) holds the
    /// flagged ones. `[Gmail]` is listed but not announced by NAMESPACE, as on Gmail.
    pub gmail: bool,
}

/// Where a [`DovecotConfig::gmail`] server keeps archived mail: a folder of a hidden,
/// unlisted namespace, seen only through `[Gmail]/All Mail` (a path: `/` between levels).
pub const ARCHIVED: &str = ".archived/Mail";

#[derive(Debug, Clone)]
pub struct OAuth2Validation {
    /// The HS256 key (base64), as [`crate::oauth::TokenEndpoint::key_base64`] gives it.
    pub key_base64: String,
    /// Dovecot's `username_format` for the comparison of `sub` and the login: `%u`
    /// (the default) for tokens of one user, `%d` for an app's token that serves every
    /// mailbox of its domain.
    pub username_format: String,
}

impl Default for DovecotConfig {
    fn default() -> Self {
        DovecotConfig {
            users: vec![("alice".into(), "alice-secret".into())],
            separator: '/',
            tls: false,
            max_mail_size: None,
            quota_kib: None,
            master: None,
            layout_fs: true,
            capabilities: None,
            max_user_connections: 200,
            oauth2: None,
            gmail: false,
        }
    }
}

pub struct Dovecot {
    pub dir: PathBuf,
    pub port: u16,
    pub imaps_port: Option<u16>,
    pub ca: Option<TestCa>,
    pub config: DovecotConfig,
    child: Option<Child>,
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

/// A fresh directory for a test's files, readable by the mail user.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mft-{tag}-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    set_mode(&dir, 0o755);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn id_of(flag: &str, user: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .expect("running id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

impl Dovecot {
    pub fn start(config: DovecotConfig) -> Dovecot {
        let binary = which("dovecot").unwrap_or_else(|| {
            panic!("dovecot is not installed: run `bash .ci/run` once, or `apt-get install dovecot-imapd`")
        });
        let dir = temp_dir("dovecot");
        for sub in ["run", "state", "log", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        let mail_user =
            std::env::var("MAILFERRY_TEST_MAIL_USER").unwrap_or_else(|_| "nobody".into());
        let (uid, gid) = (id_of("-u", &mail_user), id_of("-g", &mail_user));
        std::os::unix::fs::chown(dir.join("mail"), Some(uid), Some(gid)).expect("chown mail dir");
        set_mode(&dir.join("mail"), 0o770);

        let mut users = String::new();
        for (name, password) in &config.users {
            users.push_str(&format!(
                "{name}:{{PLAIN}}{password}:{uid}:{gid}::{}/mail/{name}::\n",
                dir.display()
            ));
        }
        std::fs::write(dir.join("users"), users).expect("users file");
        let (master_name, master_pass) = config
            .master
            .clone()
            .unwrap_or_else(|| ("nomaster".into(), format!("{:x}", fastrand::u64(..))));
        std::fs::write(
            dir.join("master-users"),
            format!("{master_name}:{{PLAIN}}{master_pass}\n"),
        )
        .expect("master users file");
        set_mode(&dir.join("users"), 0o644);
        set_mode(&dir.join("master-users"), 0o644);

        let port = free_port();
        let (ca, imaps_port, ssl) = if config.tls {
            let ca = TestCa::create(&dir.join("ssl"));
            let p = free_port();
            let ssl = format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n",
                ca.server_cert.display(),
                ca.server_key.display()
            );
            (Some(ca), Some(p), ssl)
        } else {
            (None, None, "ssl = no\n".to_string())
        };
        let quota = if config.max_mail_size.is_some() || config.quota_kib.is_some() {
            let max = config
                .max_mail_size
                .map(|max| format!("  quota_max_mail_size = {max}\n"))
                .unwrap_or_default();
            let rule = config
                .quota_kib
                .map(|kib| format!("  quota_rule = *:storage={kib}k\n"))
                .unwrap_or_default();
            format!(
                "mail_plugins = $mail_plugins quota\nplugin {{\n  quota = count:User quota\n  quota_vsizes = yes\n{max}{rule}}}\nprotocol imap {{\n  mail_plugins = $mail_plugins imap_quota\n}}\n"
            )
        } else {
            String::new()
        };
        let oauth2 = match &config.oauth2 {
            Some(v) => {
                // The key dict's path: <azp or "default">/<alg>/<kid or "default">.
                let keys = dir.join("oauth2-keys/default/HS256");
                std::fs::create_dir_all(&keys).expect("mkdir keys");
                std::fs::write(keys.join("default"), &v.key_base64).expect("key");
                std::fs::write(
                    dir.join("oauth2.conf"),
                    format!(
                        "introspection_mode = local\nlocal_validation_key_dict = fs:posix:prefix={}/oauth2-keys/\n\
                         username_attribute = sub\nusername_format = {}\n",
                        dir.display(),
                        v.username_format
                    ),
                )
                .expect("oauth2.conf");
                Command::new("chmod")
                    .args(["-R", "a+rX"])
                    .arg(dir.join("oauth2-keys"))
                    .status()
                    .expect("chmod");
                set_mode(&dir.join("oauth2.conf"), 0o644);
                // auth_verbose: each refusal's reason in the log, for the tests to read.
                format!(
                    "auth_verbose = yes\nauth_mechanisms = $auth_mechanisms xoauth2 oauthbearer\npassdb {{\n  driver = oauth2\n  \
                     mechanisms = xoauth2 oauthbearer\n  args = {}/oauth2.conf\n}}\n",
                    dir.display()
                )
            }
            None => String::new(),
        };
        let gmail = if config.gmail {
            // Dovecot's virtual plugin: each folder of the namespace is a directory with
            // a `dovecot-virtual` file naming the folders it shows and a search.
            for (name, search) in [("All Mail", "all"), ("Starred", "flagged")] {
                let folder = dir.join("virtual").join(name);
                std::fs::create_dir_all(&folder).expect("mkdir virtual");
                let sep = config.separator;
                let archived = if name == "All Mail" {
                    format!(".archived{sep}*\n")
                } else {
                    String::new()
                };
                std::fs::write(
                    folder.join("dovecot-virtual"),
                    format!("*\n{archived}-[Gmail]{sep}*\n  {search}\n"),
                )
                .expect("dovecot-virtual");
            }
            Command::new("chmod")
                .args(["-R", "a+rX"])
                .arg(dir.join("virtual"))
                .status()
                .expect("chmod");
            format!(
                r#"mail_plugins = $mail_plugins virtual
namespace archived {{
  prefix = .archived{sep}
  separator = {sep}
  location = maildir:~/archived:LAYOUT=fs
  hidden = yes
  list = no
}}
namespace gmail {{
  prefix = [Gmail]{sep}
  separator = {sep}
  location = virtual:{dir}/virtual:INDEX=~/virtual-index
  hidden = yes
  list = yes
  subscriptions = no
  mailbox "All Mail" {{
    special_use = \All
  }}
  mailbox Starred {{
    special_use = \Flagged
  }}
}}
"#,
                sep = config.separator,
                dir = dir.display(),
            )
        } else {
            String::new()
        };
        let conf = format!(
            r#"# written by the mailferry test harness
instance_name = mft-{port}
base_dir = {dir}/run
state_dir = {dir}/state
protocols = imap
listen = 127.0.0.1
log_path = {dir}/log/dovecot.log
info_log_path = {dir}/log/dovecot.log
shutdown_clients = yes
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
{oauth2}passdb {{
  driver = passwd-file
  args = scheme=PLAIN {dir}/master-users
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {dir}/users
}}
userdb {{
  driver = passwd-file
  args = {dir}/users
}}
mail_location = maildir:~/maildir{layout}
first_valid_uid = 1
first_valid_gid = 1
mail_fsync = never
namespace inbox {{
  inbox = yes
  prefix =
  separator = {sep}
  mailbox Drafts {{
    special_use = \Drafts
  }}
  mailbox Sent {{
    special_use = \Sent
  }}
  mailbox Trash {{
    special_use = \Trash
  }}
  mailbox Junk {{
    special_use = \Junk
  }}
}}
mail_max_userip_connections = {max_connections}
{capability}
imap_max_line_length = 1M
{quota}{gmail}{ssl}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 1
}}
service anvil {{
  chroot =
}}
"#,
            dir = dir.display(),
            sep = config.separator,
            max_connections = config.max_user_connections,
            imaps = imaps_port.unwrap_or(0),
            layout = if config.layout_fs { ":LAYOUT=fs" } else { "" },
            capability = config
                .capabilities
                .as_ref()
                .map(|c| format!("imap_capability = {c}\n"))
                .unwrap_or_default(),
        );
        std::fs::write(dir.join("dovecot.conf"), conf).expect("dovecot.conf");
        use std::os::unix::process::CommandExt;
        let child = Command::new(binary)
            .process_group(0)
            .arg("-F")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log/stderr.log")).expect("log file"))
            .spawn()
            .expect("starting dovecot");
        let server = Dovecot {
            dir,
            port,
            imaps_port,
            ca,
            config,
            child: Some(child),
        };
        server.wait_for_greeting();
        server
    }

    fn wait_for_greeting(&self) {
        let log = self.dir.join("log/dovecot.log");
        wait_for_greeting(
            "dovecot",
            self.port,
            &[log, self.dir.join("log/stderr.log")],
        );
    }

    pub fn password(&self, user: &str) -> String {
        self.config
            .users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.clone())
            .expect("a configured user")
    }

    /// Changes a user's password: the passwd-file is rewritten and the server reloaded
    /// (SIGHUP; its auth processes read the file again). Connections already logged in
    /// stay.
    pub fn change_password(&self, user: &str, password: &str) {
        let path = self.dir.join("users");
        let text = std::fs::read_to_string(&path).expect("users file");
        let prefix = format!("{user}:{{PLAIN}}");
        let changed: String = text
            .lines()
            .map(|line| match line.strip_prefix(&prefix) {
                Some(rest) => {
                    let rest = rest.split_once(':').map_or("", |(_, r)| r);
                    format!("{prefix}{password}:{rest}\n")
                }
                None => format!("{line}\n"),
            })
            .collect();
        assert_ne!(changed, text, "no user {user}");
        std::fs::write(&path, changed).expect("users file");
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "SIGHUP to dovecot");
        // The reload takes a moment; logins refused from then on.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// The log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        stop(self.child.take(), &self.dir);
    }
}

/// Waits until an IMAP server answers on `port` with a greeting; panics with its logs.
pub(crate) fn wait_for_greeting(what: &str, port: u16, logs: &[PathBuf]) {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() && &buf == b"* OK" {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs: Vec<String> = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    panic!("{what} on port {port} did not start:\n{}", logs.join("\n"));
}

/// Stops a server (SIGTERM, then SIGKILL after 5 s) and removes its directory unless
/// MAILFERRY_TEST_KEEP is set.
pub(crate) fn stop(child: Option<Child>, dir: &Path) {
    if let Some(mut child) = child {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    if std::env::var_os("MAILFERRY_TEST_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
