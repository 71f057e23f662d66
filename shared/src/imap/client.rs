//! The tokio driver around the sans-I/O parser: connecting (implicit TLS, mandatory
//! STARTTLS, or explicit plaintext), authenticating, and a pipelined session.
//!
//! A [`Session`] owns the write half; a reader task owns the read half and hands every
//! response to the command it belongs to: tagged completions by tag, untagged data to the
//! oldest open command (IMAP answers in order). Untagged data flows through a bounded
//! channel, so a caller that reads a large FETCH slowly slows the socket down rather
//! than letting responses pile up in memory.
//!
//! Time is bounded as well as memory. Besides the endpoint's `read_timeout` (silence
//! while a command is open), each command has a deadline fixed when it reaches the head
//! of the pipeline: `command_timeout` plus the bytes it is expected to move at
//! [`FLOOR_RATE`] (see [`Expect`]). A server that answers a byte every few minutes, or
//! floods a command with data it never asked for, fails that command instead of holding
//! the connection, and the job slot behind it, for ever. Writes are bounded the same way,
//! so a target that stops reading an APPEND cannot pin it either, and connecting (TLS,
//! greeting, STARTTLS, capabilities) has one deadline as a whole.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::parse::{lookup, parse_response, Framer, Response, Status, StatusResponse, Value};
use super::tls;
use crate::domain::endpoint::{Endpoint, Security};
use crate::domain::login::{AuthMethod, Credentials};
use crate::error::{is_throttling, login_refused, suggested_backoff, Error};

/// Bounds on what a server may make us buffer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest response text outside literals (all of one response's lines together).
    /// Nothing mailferry reads comes near it: LIST, STATUS and FETCH metadata lines are
    /// short, and it sends no SEARCH.
    pub max_line: usize,
    /// Largest literal (message) we accept from this server.
    pub max_literal: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 1 << 20,
            max_literal: 512 << 20,
        }
    }
}

/// The slowest transfer rate a command's expected bytes are given time for: 64 KiB/s,
/// far below any real server and far above a server that stalls on purpose.
pub const FLOOR_RATE: u64 = 64 * 1024;

/// What a command is expected to move, which bounds its time and its literals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect {
    /// Bytes the command sends or receives (message bodies): each [`FLOOR_RATE`] of them
    /// adds a second to the command's deadline.
    pub bytes: u64,
    /// The largest literal one of its responses may carry (`None`: the session's limit).
    /// The copy sets it from the sizes the source declared, so a message that arrives
    /// far larger than its RFC822.SIZE fails instead of overrunning the byte budget.
    pub max_literal: Option<u64>,
}

impl Expect {
    fn time(&self, base: Duration) -> Duration {
        base + Duration::from_secs(self.bytes / FLOOR_RATE)
    }
}

/// Anything a session can run over: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The server's capabilities, upper-cased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities(BTreeSet<String>);

impl Capabilities {
    fn from_values(values: &[Value]) -> Self {
        Capabilities(
            values
                .iter()
                .filter_map(Value::text)
                .map(|s| s.to_ascii_uppercase())
                .filter(|s| s != "CAPABILITY")
                .collect(),
        )
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains(&name.to_ascii_uppercase())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// RFC 7889 APPENDLIMIT=n (a bare APPENDLIMIT means "per mailbox", which we ignore).
    pub fn append_limit(&self) -> Option<u64> {
        self.0
            .iter()
            .find_map(|c| c.strip_prefix("APPENDLIMIT=")?.parse().ok())
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// A piece of a command: text sent as is, or a literal.
#[derive(Debug, Clone)]
enum Part {
    Text(Vec<u8>),
    Literal(Bytes),
    /// A BINARY literal8 (`~{n}`), which may contain NUL.
    Literal8(Bytes),
}

/// A command being built. `Debug` shows only the verb, so arguments (passwords) never
/// reach a log through it.
#[derive(Clone)]
pub struct Command {
    verb: String,
    parts: Vec<Part>,
    /// Carries a password or token: its bytes are wiped when it is dropped.
    sensitive: bool,
}

impl Drop for Command {
    fn drop(&mut self) {
        if !self.sensitive {
            return;
        }
        for part in &mut self.parts {
            match part {
                Part::Text(t) => zeroize::Zeroize::zeroize(t),
                Part::Literal(data) | Part::Literal8(data) => {
                    // `arg` made this literal from the password alone: it is not shared.
                    if let Ok(mut owned) = std::mem::take(data).try_into_mut() {
                        zeroize::Zeroize::zeroize(owned.as_mut());
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Command({})", self.verb)
    }
}

impl Command {
    pub fn new(verb: &str) -> Self {
        Command {
            verb: verb.split(' ').take(2).collect::<Vec<_>>().join(" "),
            parts: vec![Part::Text(verb.as_bytes().to_vec())],
            sensitive: false,
        }
    }

    /// Marks a command that carries a secret: wiped once it has been written.
    pub fn sensitive(mut self) -> Self {
        self.sensitive = true;
        self
    }

    fn text_mut(&mut self) -> &mut Vec<u8> {
        if !matches!(self.parts.last(), Some(Part::Text(_))) {
            self.parts.push(Part::Text(Vec::new()));
        }
        match self.parts.last_mut() {
            Some(Part::Text(t)) => t,
            _ => unreachable!("a text part was just pushed"),
        }
    }

    /// Appends raw protocol text (the caller knows it is valid).
    pub fn raw(mut self, text: impl AsRef<[u8]>) -> Self {
        self.text_mut().extend_from_slice(text.as_ref());
        self
    }

    /// Appends a space and an astring: quoted when it can be, a literal otherwise.
    pub fn arg(mut self, value: impl AsRef<[u8]>) -> Self {
        let value = value.as_ref();
        let quotable = value
            .iter()
            .all(|&b| b.is_ascii() && b != b'\r' && b != b'\n' && b != 0);
        if quotable {
            let t = self.text_mut();
            t.extend_from_slice(b" \"");
            for &b in value {
                if b == b'"' || b == b'\\' {
                    t.push(b'\\');
                }
                t.push(b);
            }
            t.push(b'"');
            self
        } else {
            self.text_mut().push(b' ');
            self.literal(Bytes::copy_from_slice(value))
        }
    }

    /// Appends a literal (no leading space: the caller places it).
    pub fn literal(mut self, data: Bytes) -> Self {
        self.parts.push(Part::Literal(data));
        self
    }

    /// Appends a BINARY literal8 (the server must advertise BINARY).
    pub fn literal8(mut self, data: Bytes) -> Self {
        self.parts.push(Part::Literal8(data));
        self
    }

    pub fn verb(&self) -> &str {
        &self.verb
    }
}

struct Pending {
    tag: String,
    /// The command for the latency metric (a label: one of the commands we send).
    verb: &'static str,
    untagged: mpsc::Sender<Response>,
    done: oneshot::Sender<StatusResponse>,
    /// When the command was written, and the time it may take once at the head of the
    /// pipeline (see the module notes).
    sent_at: Instant,
    allowed: Duration,
    max_literal: Option<u64>,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Pending>,
    /// Why the connection is unusable, once it is.
    closed: Option<String>,
    /// The text of an untagged BYE, if the server sent one.
    bye: Option<String>,
    /// The selected folder's size as the server last announced it (`* n EXISTS`), until
    /// [`Session::take_exists`] takes it.
    exists: Option<u32>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lost(&self) -> Error {
        let st = self.lock();
        let detail = match (&st.bye, &st.closed) {
            (Some(bye), _) => format!("server said BYE: {bye}"),
            (None, Some(reason)) => reason.clone(),
            (None, None) => "connection closed".to_string(),
        };
        Error::lost(detail)
    }
}

/// A command in flight.
pub struct CommandHandle {
    pub tag: String,
    verb: String,
    untagged: mpsc::Receiver<Response>,
    done: oneshot::Receiver<StatusResponse>,
    completed: Option<StatusResponse>,
    shared: Arc<Shared>,
}

impl CommandHandle {
    /// The next untagged response, or `None` once the command has completed.
    pub async fn next(&mut self) -> Option<Response> {
        self.untagged.recv().await
    }

    /// Waits for completion, collecting any untagged responses.
    pub async fn finish(mut self) -> Result<(Vec<Response>, StatusResponse), Error> {
        let mut untagged = Vec::new();
        while let Some(r) = self.untagged.recv().await {
            untagged.push(r);
        }
        let status = match self.completed.take() {
            Some(s) => s,
            None => (&mut self.done).await.map_err(|_| self.shared.lost())?,
        };
        Ok((untagged, status))
    }

    /// Like [`finish`](Self::finish), but a NO or BAD becomes an error.
    pub async fn ok(self) -> Result<(Vec<Response>, StatusResponse), Error> {
        let verb = self.verb.clone();
        let (untagged, status) = self.finish().await?;
        check(&verb, status).map(|s| (untagged, s))
    }
}

/// Turns a non-OK completion into the matching error.
pub fn check(verb: &str, status: StatusResponse) -> Result<StatusResponse, Error> {
    match status.status {
        Status::Ok => Ok(status),
        _ if is_throttling(&status) => Err(Error::Throttled {
            backoff: suggested_backoff(&status.text),
            server_says: status.describe(),
        }),
        _ => Err(Error::Command {
            command: verb.to_string(),
            response: status,
        }),
    }
}

/// The command's name as a metric label: only the commands mailferry sends, so the
/// label's values stay few whatever a caller passes.
fn metric_verb(verb: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "LOGIN",
        "AUTHENTICATE",
        "CAPABILITY",
        "ID",
        "ENABLE",
        "NAMESPACE",
        "LIST",
        "LSUB",
        "STATUS",
        "SELECT",
        "EXAMINE",
        "CREATE",
        "SUBSCRIBE",
        "FETCH",
        "UID FETCH",
        "UID SEARCH",
        "SEARCH",
        "UID STORE",
        "STORE",
        "APPEND",
        "NOOP",
        "LOGOUT",
        "GETQUOTAROOT",
        "STARTTLS",
        "UNSELECT",
        "CLOSE",
    ];
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(verb))
        .copied()
        .unwrap_or("other")
}

/// An open, pipelining IMAP connection.
pub struct Session {
    writer: BufWriter<WriteHalf<Box<dyn Io>>>,
    shared: Arc<Shared>,
    continuations: mpsc::Receiver<String>,
    next_tag: u64,
    caps: Capabilities,
    reader: JoinHandle<()>,
    host: String,
    command_timeout: Duration,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
        metrics::gauge!(crate::telemetry::IMAP_CONNECTIONS).decrement(1.0);
    }
}

/// Connects, negotiates TLS as the endpoint demands and reads the greeting and
/// capabilities. The session is not yet authenticated.
pub async fn connect(endpoint: &Endpoint, limits: Limits) -> Result<Session, Error> {
    let tcp = tcp_connect(endpoint).await?;
    // Each read has its own timeout; this bounds a greeting that arrives a byte at a
    // time, or never ends, as a whole.
    let whole = endpoint.command_timeout;
    match tokio::time::timeout(whole, open_session(endpoint, limits, tcp)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            what: format!(
                "the greeting of {} (TLS, greeting and capabilities not done within {} s)",
                endpoint.address(),
                whole.as_secs()
            ),
        }),
    }
}

/// TLS as the endpoint demands, the greeting and the capabilities.
async fn open_session(
    endpoint: &Endpoint,
    limits: Limits,
    tcp: TcpStream,
) -> Result<Session, Error> {
    let _ = tcp.set_nodelay(true);
    let mut framer = Framer::new(limits.max_line, limits.max_literal);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (io, caps): (Box<dyn Io>, Capabilities) = match endpoint.security {
        Security::Plain => {
            let mut tcp = tcp;
            let caps = greeting(endpoint, &mut tcp, &mut buf, &mut framer).await?;
            (Box::new(tcp), caps)
        }
        Security::Tls => {
            let mut tls = tls::handshake(endpoint, tcp).await?;
            let caps = greeting(endpoint, &mut tls, &mut buf, &mut framer).await?;
            (Box::new(tls), caps)
        }
        Security::StartTls => {
            let mut tcp = tcp;
            let mut caps = greeting(endpoint, &mut tcp, &mut buf, &mut framer).await?;
            if caps.is_empty() {
                let (untagged, _) =
                    simple_command(endpoint, &mut tcp, &mut buf, &mut framer, "s1 CAPABILITY")
                        .await?;
                caps = caps_from_untagged(&untagged).unwrap_or_default();
            }
            if !caps.has("STARTTLS") {
                return Err(Error::StartTlsNotOffered {
                    host: endpoint.host.clone(),
                });
            }
            let (_, status) =
                simple_command(endpoint, &mut tcp, &mut buf, &mut framer, "s2 STARTTLS").await?;
            check("STARTTLS", status)?;
            if !buf.is_empty() {
                // Bytes sent before the handshake could be an injection attempt (CVE-2011-0411 style).
                return Err(Error::TlsHandshake {
                    host: endpoint.host.clone(),
                    detail: "server sent data after STARTTLS before the handshake".into(),
                });
            }
            let tls = tls::handshake(endpoint, tcp).await?;
            // Capabilities from before TLS must not be trusted: ask again below.
            (Box::new(tls), Capabilities::default())
        }
    };
    let mut session = Session::start(io, buf, framer, endpoint);
    session.caps = caps;
    if session.caps.is_empty() {
        session.refresh_capabilities().await?;
    }
    Ok(session)
}

pub(crate) async fn tcp_connect(endpoint: &Endpoint) -> Result<TcpStream, Error> {
    let addrs: Vec<_> = match tokio::time::timeout(
        endpoint.connect_timeout,
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    {
        Err(_) => {
            return Err(Error::Timeout {
                what: format!("resolving {}", endpoint.host),
            })
        }
        Ok(Err(e)) => {
            return Err(Error::Dns {
                host: endpoint.host.clone(),
                detail: e.to_string(),
            })
        }
        Ok(Ok(addrs)) => addrs.collect(),
    };
    // The policy applies to the addresses connected to, not to an earlier lookup of
    // the same name (DNS rebinding).
    if endpoint.public_only {
        if let Some(internal) = addrs
            .iter()
            .find(|a| crate::domain::endpoint::is_internal(&a.ip()))
        {
            return Err(Error::Config(format!(
                "host {} resolves to {}, an internal address: this installation migrates \
                 only from public servers",
                endpoint.host,
                internal.ip()
            )));
        }
    }
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(endpoint.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = Some(Error::ConnectionRefused {
                    addr: endpoint.address(),
                })
            }
            Ok(Err(e)) => last = Some(Error::lost(format!("connecting to {addr}: {e}"))),
            Err(_) => {
                last = Some(Error::Timeout {
                    what: format!("connecting to {}", endpoint.address()),
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Dns {
        host: endpoint.host.clone(),
        detail: "no addresses".into(),
    }))
}

async fn read_response<S: AsyncRead + Unpin>(
    endpoint: &Endpoint,
    stream: &mut S,
    buf: &mut BytesMut,
    framer: &mut Framer,
) -> Result<Response, Error> {
    loop {
        if let Some(frame) = framer.next_frame(buf)? {
            return Ok(parse_response(frame)?);
        }
        match tokio::time::timeout(endpoint.read_timeout, stream.read_buf(buf)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("waiting for {}", endpoint.address()),
                })
            }
            Ok(Ok(0)) => {
                return Err(Error::lost(format!(
                    "{} closed the connection",
                    endpoint.address()
                )))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Error::lost(e.to_string())),
        }
    }
}

async fn greeting<S: AsyncRead + Unpin>(
    endpoint: &Endpoint,
    stream: &mut S,
    buf: &mut BytesMut,
    framer: &mut Framer,
) -> Result<Capabilities, Error> {
    match read_response(endpoint, stream, buf, framer).await? {
        Response::UntaggedStatus(s) if matches!(s.status, Status::Ok | Status::PreAuth) => {
            Ok(caps_from_code(&s).unwrap_or_default())
        }
        Response::UntaggedStatus(s) if s.status == Status::Bye => Err(Error::Throttled {
            backoff: suggested_backoff(&s.text),
            server_says: s.describe(),
        }),
        other => Err(Error::Protocol(super::parse::ParseError::Malformed(
            format!("unexpected greeting {other:?}"),
        ))),
    }
}

async fn simple_command<S: AsyncRead + AsyncWrite + Unpin>(
    endpoint: &Endpoint,
    stream: &mut S,
    buf: &mut BytesMut,
    framer: &mut Framer,
    line: &str,
) -> Result<(Vec<Response>, StatusResponse), Error> {
    stream
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .map_err(|e| Error::lost(e.to_string()))?;
    let tag = line.split(' ').next().unwrap_or_default();
    let mut untagged = Vec::new();
    loop {
        match read_response(endpoint, stream, buf, framer).await? {
            Response::Tagged { tag: t, status } if t == tag => return Ok((untagged, status)),
            other => untagged.push(other),
        }
    }
}

fn caps_from_code(s: &StatusResponse) -> Option<Capabilities> {
    (s.code_name().as_deref() == Some("CAPABILITY"))
        .then(|| Capabilities::from_values(s.code.as_deref().unwrap_or_default()))
}

fn caps_from_untagged(untagged: &[Response]) -> Option<Capabilities> {
    untagged.iter().find_map(|r| match r {
        Response::Data { name, data } if name == "CAPABILITY" => {
            Some(Capabilities::from_values(data))
        }
        _ => None,
    })
}

impl Session {
    fn start(io: Box<dyn Io>, buf: BytesMut, framer: Framer, endpoint: &Endpoint) -> Self {
        let (rd, wr) = tokio::io::split(io);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
        });
        let (cont_tx, cont_rx) = mpsc::channel(4);
        metrics::gauge!(crate::telemetry::IMAP_CONNECTIONS).increment(1.0);
        let reader = tokio::spawn(read_loop(
            rd,
            buf,
            framer,
            shared.clone(),
            cont_tx,
            endpoint.read_timeout,
        ));
        Session {
            writer: BufWriter::with_capacity(64 * 1024, wr),
            shared,
            continuations: cont_rx,
            next_tag: 1,
            caps: Capabilities::default(),
            reader,
            host: endpoint.host.clone(),
            command_timeout: endpoint.command_timeout,
        }
    }

    /// The selected folder's message count the server announced last (`* n EXISTS`,
    /// in a SELECT's answer or after an APPEND to it), and forgets it: `None` when it
    /// announced none since the last call.
    pub fn take_exists(&self) -> Option<u32> {
        self.shared.lock().exists.take()
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Gives the connection up (a command was cut off halfway, and the server must not
    /// see the rest): it is closed, and a pool drops it instead of lending it again.
    pub fn abandon(&mut self, reason: &str) {
        self.shared
            .lock()
            .closed
            .get_or_insert_with(|| reason.to_string());
        self.reader.abort();
    }

    /// True once the connection has failed or the server said BYE.
    pub fn is_closed(&self) -> bool {
        let st = self.shared.lock();
        st.closed.is_some() || st.bye.is_some()
    }

    /// Whether a literal of `len` bytes may be sent without waiting for a continuation.
    fn non_synchronizing(&self, len: usize) -> bool {
        self.caps.has("LITERAL+") || (self.caps.has("LITERAL-") && len <= 4096)
    }

    /// Sends a command without waiting for its completion (pipelining).
    pub async fn send(&mut self, command: Command) -> Result<CommandHandle, Error> {
        self.send_expecting(command, Expect::default()).await
    }

    /// Like [`send`](Self::send), for a command that moves message bodies: `expect`
    /// gives it time for them and bounds the literals of its responses.
    pub async fn send_expecting(
        &mut self,
        command: Command,
        expect: Expect,
    ) -> Result<CommandHandle, Error> {
        let allowed = expect.time(self.command_timeout);
        match tokio::time::timeout(allowed, self.send_unbounded(command, expect, allowed)).await {
            Ok(result) => result,
            Err(_) => {
                let reason = format!(
                    "sending a command took longer than {} s (the server stopped reading, or \
                     never asked for its literal)",
                    allowed.as_secs()
                );
                self.shared.lock().closed.get_or_insert(reason);
                Err(self.shared.lost())
            }
        }
    }

    async fn send_unbounded(
        &mut self,
        command: Command,
        expect: Expect,
        allowed: Duration,
    ) -> Result<CommandHandle, Error> {
        let tag = format!("m{}", self.next_tag);
        self.next_tag += 1;
        let (utx, urx) = mpsc::channel(64);
        let (dtx, drx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if st.closed.is_some() {
                drop(st);
                return Err(self.shared.lost());
            }
            st.pending.push_back(Pending {
                tag: tag.clone(),
                verb: metric_verb(&command.verb),
                untagged: utx,
                done: dtx,
                sent_at: Instant::now(),
                allowed,
                max_literal: expect.max_literal,
            });
        }
        let mut handle = CommandHandle {
            tag: tag.clone(),
            verb: command.verb.clone(),
            untagged: urx,
            done: drx,
            completed: None,
            shared: self.shared.clone(),
        };
        let write = async {
            self.writer.write_all(tag.as_bytes()).await?;
            self.writer.write_all(b" ").await?;
            for part in &command.parts {
                match part {
                    Part::Text(t) => self.writer.write_all(t).await?,
                    Part::Literal(data) | Part::Literal8(data) => {
                        let tilde = if matches!(part, Part::Literal8(_)) {
                            "~"
                        } else {
                            ""
                        };
                        if self.non_synchronizing(data.len()) {
                            self.writer
                                .write_all(format!("{tilde}{{{}+}}\r\n", data.len()).as_bytes())
                                .await?;
                        } else {
                            self.writer
                                .write_all(format!("{tilde}{{{}}}\r\n", data.len()).as_bytes())
                                .await?;
                            self.writer.flush().await?;
                            tokio::select! {
                                cont = self.continuations.recv() => {
                                    if cont.is_none() {
                                        return Err(std::io::Error::other("connection closed"));
                                    }
                                }
                                // The server refused the literal: the command is over.
                                // (Or the connection ended: an error, never a handle
                                // whose completion was already taken.)
                                done = &mut handle.done => {
                                    let status = done.map_err(|_| {
                                        std::io::Error::other("connection closed")
                                    })?;
                                    handle.completed = Some(status);
                                    return Ok(());
                                }
                            }
                        }
                        self.writer.write_all(data).await?;
                    }
                }
            }
            self.writer.write_all(b"\r\n").await?;
            self.writer.flush().await
        };
        match write.await {
            Ok(()) => Ok(handle),
            Err(e) => {
                let mut st = self.shared.lock();
                st.closed
                    .get_or_insert_with(|| format!("write failed: {e}"));
                drop(st);
                Err(self.shared.lost())
            }
        }
    }

    /// Sends a command and waits for an OK.
    pub async fn run(&mut self, command: Command) -> Result<Vec<Response>, Error> {
        Ok(self.send(command).await?.ok().await?.0)
    }

    pub async fn refresh_capabilities(&mut self) -> Result<(), Error> {
        let untagged = self.run(Command::new("CAPABILITY")).await?;
        self.caps = caps_from_untagged(&untagged).unwrap_or_default();
        Ok(())
    }

    /// Authenticates with the method the credentials name.
    pub async fn authenticate(&mut self, creds: &Credentials) -> Result<(), Error> {
        let secret = creds.secret.expose().as_bytes();
        let result = match &creds.method {
            AuthMethod::Password => {
                if self.caps.has("AUTH=PLAIN") {
                    self.sasl("PLAIN", plain_response(b"", creds.login.as_bytes(), secret))
                        .await
                } else {
                    self.login(creds.login.as_bytes(), secret).await
                }
            }
            AuthMethod::AdminPlain { admin } => {
                let ir = plain_response(creds.login.as_bytes(), admin.as_bytes(), secret);
                self.sasl("PLAIN", ir).await
            }
            AuthMethod::DovecotMaster { master } => {
                let login = format!("{}*{}", creds.login, master);
                self.login(login.as_bytes(), secret).await
            }
            AuthMethod::XOAuth2 => {
                let ir = xoauth2_response(creds.login.as_bytes(), secret);
                self.sasl("XOAUTH2", ir).await
            }
            AuthMethod::OAuth2(_) => {
                return Err(Error::Config(
                    "OAuth2 logs in with an access token from its token source \
                     (authenticate_bearer)"
                        .into(),
                ))
            }
        };
        self.authenticated(result).await
    }

    /// Authenticates with an OAuth2 access token for `login`.
    pub async fn authenticate_bearer(
        &mut self,
        login: &str,
        token: &crate::secret::Secret,
        mechanism: crate::oauth::Mechanism,
    ) -> Result<(), Error> {
        let token = token.expose().as_bytes();
        let result = match mechanism {
            crate::oauth::Mechanism::Xoauth2 => {
                self.sasl("XOAUTH2", xoauth2_response(login.as_bytes(), token))
                    .await
            }
            crate::oauth::Mechanism::Oauthbearer => {
                self.sasl("OAUTHBEARER", oauthbearer_response(login.as_bytes(), token))
                    .await
            }
        };
        self.authenticated(result).await
    }

    /// After AUTHENTICATE or LOGIN: a refusal named, else the capabilities of the
    /// authenticated state.
    async fn authenticated(&mut self, result: Result<StatusResponse, Error>) -> Result<(), Error> {
        let status = match result {
            Ok(status) => status,
            Err(Error::Command { response, .. }) => return Err(login_refused(&response)),
            Err(e) => return Err(e),
        };
        match caps_from_code(&status) {
            Some(caps) => self.caps = caps,
            None => self.refresh_capabilities().await?,
        }
        Ok(())
    }

    async fn login(&mut self, user: &[u8], secret: &[u8]) -> Result<StatusResponse, Error> {
        if self.caps.has("LOGINDISABLED") {
            return Err(Error::Config(format!(
                "{} refuses LOGIN on this connection (LOGINDISABLED): use TLS or STARTTLS",
                self.host
            )));
        }
        let handle = self
            .send(Command::new("LOGIN").arg(user).arg(secret).sensitive())
            .await?;
        let (_, status) = handle.finish().await?;
        check("LOGIN", status)
    }

    /// AUTHENTICATE with an initial response; any further challenge (XOAUTH2's error
    /// report) is answered with an empty line so the server sends its final NO.
    async fn sasl(&mut self, mechanism: &str, initial: Vec<u8>) -> Result<StatusResponse, Error> {
        let initial = zeroize::Zeroizing::new(initial);
        let encoded =
            zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*initial));
        let with_ir = self.caps.has("SASL-IR");
        let command = if with_ir {
            Command::new("AUTHENTICATE")
                .raw(format!(" {mechanism} "))
                .raw(encoded.as_bytes())
                .sensitive()
        } else {
            Command::new("AUTHENTICATE").raw(format!(" {mechanism}"))
        };
        let mut handle = self.send(command).await?;
        let mut sent_initial = with_ir;
        loop {
            tokio::select! {
                done = &mut handle.done => {
                    let status = done.map_err(|_| self.shared.lost())?;
                    return check("AUTHENTICATE", status);
                }
                cont = self.continuations.recv() => {
                    if cont.is_none() {
                        // The connection ended; its last words may be this command's
                        // tagged answer (Dovecot: NO [LIMIT], then it closes), which the
                        // reader delivered before closing: prefer it to "lost".
                        return match (&mut handle.done).await {
                            Ok(status) => check("AUTHENTICATE", status),
                            Err(_) => Err(self.shared.lost()),
                        };
                    }
                    let reply: &[u8] = if sent_initial { b"" } else { encoded.as_bytes() };
                    sent_initial = true;
                    let write = async {
                        self.writer.write_all(reply).await?;
                        self.writer.write_all(b"\r\n").await?;
                        self.writer.flush().await
                    };
                    write.await.map_err(|e| Error::lost(e.to_string()))?;
                }
            }
        }
    }

    /// LOGOUT, best effort: the connection is being dropped anyway.
    pub async fn logout(mut self) {
        if let Ok(handle) = self.send(Command::new("LOGOUT")).await {
            let _ = tokio::time::timeout(Duration::from_secs(2), handle.finish()).await;
        }
    }
}

/// Google's and Microsoft's XOAUTH2: `user=U ^A auth=Bearer T ^A ^A`.
fn xoauth2_response(user: &[u8], token: &[u8]) -> Vec<u8> {
    let mut out = b"user=".to_vec();
    out.extend_from_slice(user);
    out.extend_from_slice(b"\x01auth=Bearer ");
    out.extend_from_slice(token);
    out.extend_from_slice(b"\x01\x01");
    out
}

/// RFC 7628 OAUTHBEARER: a GS2 header naming the user (`,` and `=` escaped), then
/// `auth=Bearer T` between ^A separators.
fn oauthbearer_response(user: &[u8], token: &[u8]) -> Vec<u8> {
    let mut out = b"n,a=".to_vec();
    for &b in user {
        match b {
            b',' => out.extend_from_slice(b"=2C"),
            b'=' => out.extend_from_slice(b"=3D"),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(b",\x01auth=Bearer ");
    out.extend_from_slice(token);
    out.extend_from_slice(b"\x01\x01");
    out
}

/// RFC 4616 PLAIN: `authzid NUL authcid NUL password`.
fn plain_response(authz: &[u8], authc: &[u8], secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(authz.len() + authc.len() + secret.len() + 2);
    out.extend_from_slice(authz);
    out.push(0);
    out.extend_from_slice(authc);
    out.push(0);
    out.extend_from_slice(secret);
    out
}

async fn read_loop(
    mut rd: ReadHalf<Box<dyn Io>>,
    mut buf: BytesMut,
    mut framer: Framer,
    shared: Arc<Shared>,
    continuations: mpsc::Sender<String>,
    read_timeout: Duration,
) {
    let session_max_literal = framer.max_literal();
    // When the last command completed: the next one's clock starts then at the latest.
    let mut last_completion = Instant::now();
    let reason = loop {
        let mut failure = None;
        loop {
            // Untagged data may belong to any open command (a server may answer
            // pipelined FETCHes in parallel, as Dovecot does): the largest bound of the
            // open commands applies, the session's own where one has none.
            let open_max = {
                let st = shared.lock();
                st.pending
                    .iter()
                    .map(|p| p.max_literal.unwrap_or(session_max_literal))
                    .max()
            };
            framer.set_max_literal(
                open_max.map_or(session_max_literal, |m| m.min(session_max_literal)),
            );
            match framer.next_frame(&mut buf) {
                Ok(None) => break,
                Ok(Some(frame)) => match parse_response(frame) {
                    Ok(response) => {
                        if matches!(response, Response::Tagged { .. }) {
                            last_completion = Instant::now();
                        }
                        dispatch(&shared, &continuations, response).await
                    }
                    Err(e) => {
                        failure = Some(format!("protocol error: {e}"));
                        break;
                    }
                },
                Err(e) => {
                    failure = Some(format!("protocol error: {e}"));
                    break;
                }
            }
        }
        if let Some(f) = failure {
            break f;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            // What is left is a partial response, usually small (a literal in progress
            // already has its exact room, reserved by the framer). A long one in
            // progress doubles its room, so a line near the bound is copied a few times,
            // not once every 64 KiB.
            let capacity = buf.len() + buf.len().max(64 * 1024);
            super::parse::regrow(&mut buf, capacity);
        }
        let deadline = shared
            .lock()
            .pending
            .front()
            .map(|p| (p.sent_at.max(last_completion) + p.allowed, p.allowed));
        let now = Instant::now();
        let wait = match deadline {
            Some((at, allowed)) if at <= now => {
                break format!(
                    "server did not complete a command within {} s",
                    allowed.as_secs()
                )
            }
            Some((at, _)) => read_timeout.min(at - now),
            None => read_timeout,
        };
        match tokio::time::timeout(wait, rd.read_buf(&mut buf)).await {
            Err(_) => {
                // Either the command's deadline (checked above, next time round) or
                // the silence bound.
                if wait == read_timeout && !shared.lock().pending.is_empty() {
                    break format!("server sent nothing for {} s", read_timeout.as_secs());
                }
            }
            Ok(Ok(0)) => break "server closed the connection".to_string(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break format!("read failed: {e}"),
        }
    };
    let mut st = shared.lock();
    st.closed.get_or_insert(reason);
    // Dropping the pending commands wakes every waiter with "connection lost".
    st.pending.clear();
}

async fn dispatch(shared: &Shared, continuations: &mpsc::Sender<String>, response: Response) {
    match response {
        Response::Continuation(text) => {
            let _ = continuations.try_send(text);
        }
        Response::Tagged { tag, status } => {
            let pending = {
                let mut st = shared.lock();
                let at = st.pending.iter().position(|p| p.tag == tag);
                at.and_then(|i| st.pending.remove(i))
            };
            if let Some(p) = pending {
                metrics::histogram!(crate::telemetry::IMAP_COMMAND_SECONDS, "command" => p.verb)
                    .record(p.sent_at.elapsed().as_secs_f64());
                let _ = p.done.send(status);
            }
        }
        Response::UntaggedStatus(s) if s.status == Status::Bye => {
            shared.lock().bye = Some(s.text);
        }
        other => {
            if let Response::Numbered { number, name, .. } = &other {
                if name == "EXISTS" {
                    shared.lock().exists = Some(*number);
                }
            }
            let target = shared.lock().pending.front().map(|p| p.untagged.clone());
            if let Some(tx) = target {
                let _ = tx.send(other).await;
            }
        }
    }
}

/// Reads the `key value` pairs of a FETCH response's data list.
pub fn fetch_items(data: &[Value]) -> &[Value] {
    data.first().and_then(Value::list).unwrap_or_default()
}

pub fn fetch_item<'a>(data: &'a [Value], key: &str) -> Option<&'a Value> {
    lookup(fetch_items(data), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_responses() {
        assert_eq!(
            plain_response(b"alice", b"admin", b"pw"),
            b"alice\0admin\0pw"
        );
        assert_eq!(plain_response(b"", b"alice", b"pw"), b"\0alice\0pw");
        // the example of Google's XOAUTH2 documentation, before base64
        assert_eq!(
            xoauth2_response(b"someuser@example.com", b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
            b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
        );
        // RFC 7628 §4.1's example, and a login whose `,` and `=` must be escaped
        assert_eq!(
            oauthbearer_response(b"user@example.com", b"vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg=="),
            b"n,a=user@example.com,\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01"
        );
        assert_eq!(
            oauthbearer_response(b"a,b=c", b"t"),
            b"n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01"
        );
    }

    #[tokio::test]
    async fn a_public_only_endpoint_refuses_the_internal_address_it_resolves() {
        // Resolved by the connection itself: a name checked once elsewhere could
        // resolve differently by now (DNS rebinding).
        for host in ["localhost", "127.0.0.1", "::ffff:10.0.0.1"] {
            let mut endpoint = Endpoint::new(host, 1, Security::Plain);
            endpoint.public_only = true;
            let err = connect(&endpoint, Limits::default())
                .await
                .err()
                .expect("refused");
            assert!(
                err.to_string().contains("an internal address"),
                "{host}: {err}"
            );
        }
    }

    #[test]
    fn commands_never_show_their_arguments_in_debug_output() {
        let c = Command::new("LOGIN").arg("alice").arg("hunter2");
        assert_eq!(format!("{c:?}"), "Command(LOGIN)");
    }

    #[test]
    fn arguments_are_quoted_or_sent_as_literals() {
        let c = Command::new("SELECT").arg("a \"b\" \\c");
        let Part::Text(t) = &c.parts[0] else { panic!() };
        assert_eq!(t, b"SELECT \"a \\\"b\\\" \\\\c\"");
        let c = Command::new("LOGIN").arg("caf\u{e9}");
        assert!(
            matches!(c.parts.last(), Some(Part::Literal(b)) if b.as_ref() == "caf\u{e9}".as_bytes())
        );
    }
}
