//! A hostile IMAP server: a relay in front of a real Dovecot that frames what both sides
//! send and lets a script answer in the server's place at an exact point of the
//! conversation (the greeting, the FETCH of bodies, the first APPEND, …).
//!
//! Logins, folders and mail stay real; only what the script says is hostile, and only
//! where it says it. The relay counts how often the script played, so a test can prove
//! that its hostile bytes reached mailferry's parser rather than passing vacuously.
//! Every hostile stream is bounded (in bytes and in time), and stops when the client
//! goes away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mailferry_shared::imap::parse::Framer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// What the script sees when the server has one response ready for the client.
pub struct Moment<'a> {
    /// Which connection (0 for the first accepted).
    pub connection: usize,
    /// The client's last complete command line, tag removed, upper-cased (`UID FETCH
    /// 1:5 (UID FLAGS INTERNALDATE BODY.PEEK[])`); empty before the first command.
    pub command: &'a str,
    /// The server's response (one whole response, literals included).
    pub response: &'a [u8],
    /// How many times the script has played on any connection so far.
    pub played: usize,
}

/// What the relay does in the server's place.
pub enum Play {
    /// These bytes instead of the response.
    Send(Vec<u8>),
    /// The response as the server sent it.
    Pass,
    /// `bytes`, one byte at a time, `every` apart.
    Drip { bytes: Vec<u8>, every: Duration },
    /// `unit` again and again, up to `max_bytes` (or 30 s, or until the client leaves).
    Flood { unit: Vec<u8>, max_bytes: usize },
    /// Nothing for this long.
    Pause(Duration),
    /// Close the connection.
    Close,
}

/// `None` lets the response pass; `Some(plays)` plays them instead (and counts).
pub type Script = Arc<dyn Fn(&Moment<'_>) -> Option<Vec<Play>> + Send + Sync>;

/// Makes a [`Script`] from a closure.
pub fn script(f: impl Fn(&Moment<'_>) -> Option<Vec<Play>> + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

pub struct HostileServer {
    pub port: u16,
    /// How many times the script played (0: the hostility never happened).
    pub played: Arc<AtomicUsize>,
    /// Every command the clients sent, in the order each was complete (literals
    /// included), with the connection it came on: [`HostileServer::sent`].
    commands: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One command a client sent through the relay.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Which connection (0 for the first accepted).
    pub connection: usize,
    /// Its first line, tag removed, upper-cased, as [`Moment::command`].
    pub line: String,
}

impl Sent {
    /// The command's name: `UID FETCH`, `APPEND`, `LOGIN`, … (a `UID` command keeps
    /// its second word).
    pub fn name(&self) -> String {
        let mut words = self.line.split(' ');
        let first = words.next().unwrap_or_default();
        match (first, words.next()) {
            ("UID", Some(second)) => format!("UID {second}"),
            _ => first.to_string(),
        }
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileServer {
    pub async fn start(upstream_port: u16, script: Script) -> HostileServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let played = Arc::new(AtomicUsize::new(0));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let (counter, log) = (played.clone(), commands.clone());
        let task = tokio::spawn(async move {
            for connection in 0.. {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (script, counter, log) = (script.clone(), counter.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        return;
                    };
                    relay(connection, client, server, script, counter, log).await;
                });
            }
        });
        HostileServer {
            port,
            played,
            commands,
            task,
        }
    }

    /// A relay that only listens: every response passes, and [`HostileServer::sent`]
    /// tells what the clients said.
    pub async fn recording(upstream_port: u16) -> HostileServer {
        HostileServer::start(upstream_port, script(|_| None)).await
    }

    /// The commands sent so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.commands.lock().unwrap().clone()
    }

    pub fn played(&self) -> usize {
        self.played.load(Ordering::SeqCst)
    }
}

fn generous_framer() -> Framer {
    Framer::new(64 << 20, 1 << 30)
}

async fn relay(
    connection: usize,
    client: TcpStream,
    server: TcpStream,
    script: Script,
    played: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Sent>>>,
) {
    let _ = client.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let command = Arc::new(Mutex::new(String::new()));

    // Client to server: passed on as it comes, each complete command noted first (the
    // server answers only after it has the command, so the note is always in time).
    let noted = command.clone();
    let upward = async move {
        let mut framer = generous_framer();
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            // A command is noted once its first line is complete, before its literals:
            // an APPEND with a synchronizing literal waits for the server's `+`, which
            // the script must see as the APPEND's.
            while let Ok(Some(frame)) = framer.next_frame(&mut buf) {
                note(&noted, &frame);
                log.lock().unwrap().push(Sent {
                    connection,
                    line: noted.lock().unwrap().clone(),
                });
            }
            if buf.contains(&b'\n') {
                note(&noted, &buf);
            }
            if server_wr.write_all(&chunk[..n]).await.is_err() {
                return;
            }
        }
    };

    let downward = async move {
        let mut framer = generous_framer();
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; 64 * 1024];
        // After STARTTLS's answer the stream is TLS: passed on untouched.
        let mut raw = false;
        loop {
            let n = match server_rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if raw {
                if client_wr.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(frame)) = framer.next_frame(&mut buf) {
                let current = command.lock().unwrap().clone();
                let moment = Moment {
                    connection,
                    command: &current,
                    response: &frame,
                    played: played.load(Ordering::SeqCst),
                };
                let plays = match script(&moment) {
                    None => vec![Play::Pass],
                    Some(plays) => {
                        played.fetch_add(1, Ordering::SeqCst);
                        plays
                    }
                };
                for play in plays {
                    if !perform(play, &frame, &mut client_wr).await {
                        return;
                    }
                }
                if current == "STARTTLS" && !frame.starts_with(b"* ") && !frame.starts_with(b"+") {
                    raw = true;
                    if client_wr.write_all(&buf.split()).await.is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
    }
}

/// Notes the command whose first line starts `bytes`.
fn note(noted: &Mutex<String>, bytes: &[u8]) {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line)
        .trim_end()
        .to_ascii_uppercase();
    let without_tag = line.split_once(' ').map_or("", |(_, rest)| rest);
    *noted.lock().unwrap() = without_tag.to_string();
}

/// Plays one step; `false` once the connection is to end.
async fn perform(play: Play, response: &[u8], to: &mut OwnedWriteHalf) -> bool {
    match play {
        Play::Pass => to.write_all(response).await.is_ok(),
        Play::Send(bytes) => to.write_all(&bytes).await.is_ok(),
        Play::Pause(d) => {
            tokio::time::sleep(d).await;
            true
        }
        Play::Close => false,
        Play::Drip { bytes, every } => {
            for b in bytes {
                if to.write_all(&[b]).await.is_err() {
                    return false;
                }
                tokio::time::sleep(every).await;
            }
            true
        }
        Play::Flood { unit, max_bytes } => {
            let started = Instant::now();
            let mut sent = 0;
            while sent < max_bytes && started.elapsed() < Duration::from_secs(30) {
                if to.write_all(&unit).await.is_err() {
                    return false;
                }
                sent += unit.len();
            }
            true
        }
    }
}

/// The first line of a response, as text (for scripts that look for `* 3 FETCH`, …).
pub fn first_line(response: &[u8]) -> String {
    let line = response.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line).trim_end().to_string()
}
