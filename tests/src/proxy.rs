//! A TCP proxy that cuts connections: the "server that drops the connection" of the
//! fault tests, as a real socket between mailferry and a real server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which way the bytes flow when the cut happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Server to client (a FETCH being read).
    Download,
    /// Client to server (an APPEND being sent).
    Upload,
}

#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub direction: Direction,
    /// Cut once this many bytes have passed in `direction` on one connection.
    pub after_bytes: usize,
    /// How many connections are cut; later ones pass through untouched.
    pub times: usize,
}

pub struct CuttingProxy {
    pub port: u16,
    pub cuts_done: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    pub async fn start(upstream_port: u16, cut: Cut) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cuts_done = Arc::new(AtomicUsize::new(0));
        let done = cuts_done.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let done = done.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        return;
                    };
                    relay(client, server, cut, done).await;
                });
            }
        });
        CuttingProxy {
            port,
            cuts_done,
            task,
        }
    }
}

async fn relay(client: TcpStream, server: TcpStream, cut: Cut, done: Arc<AtomicUsize>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                mut to: tokio::net::tcp::OwnedWriteHalf,
                cutting: bool,
                armed: Arc<std::sync::atomic::AtomicBool>,
                done: Arc<AtomicUsize>| async move {
        let mut passed = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cutting && armed.load(Ordering::SeqCst) && passed + n > cut.after_bytes {
                if done.load(Ordering::SeqCst) < cut.times {
                    done.fetch_add(1, Ordering::SeqCst);
                    let keep = cut.after_bytes.saturating_sub(passed);
                    let _ = to.write_all(&buf[..keep]).await;
                    return; // dropping both halves closes the connection mid-stream
                }
                armed.store(false, Ordering::SeqCst);
            }
            passed += n;
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = pump(
        sr,
        cw,
        cut.direction == Direction::Download,
        armed.clone(),
        done.clone(),
    );
    let up = pump(cr, sw, cut.direction == Direction::Upload, armed, done);
    // When either direction ends, the whole connection ends.
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

/// A TCP proxy that slows one direction to `bytes_per_sec`: what the server sends (a
/// distant or busy source, so that a folder job lasts long enough for something to
/// happen during it), or what the client sends (a target that takes APPENDs slowly, so
/// that a worker can be caught in the middle of writing one). It counts the bytes it
/// passed each way.
pub struct SlowProxy {
    pub port: u16,
    /// Bytes passed client to server, and server to client.
    pub uploaded: Arc<AtomicUsize>,
    pub downloaded: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, counting, at most `rate` bytes a second when given.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: Option<usize>,
    count: Arc<AtomicUsize>,
) {
    // 20 slices a second, each at most a twentieth of the rate.
    let slice = rate.map_or(64 * 1024, |r| (r / 20).max(1));
    let mut buf = vec![0u8; slice];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                count.fetch_add(n, Ordering::SeqCst);
                if rate.is_some() {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

impl SlowProxy {
    /// Slows what the server sends.
    pub async fn start(upstream_port: u16, bytes_per_sec: usize) -> SlowProxy {
        Self::throttled(upstream_port, bytes_per_sec, Direction::Download).await
    }

    pub async fn throttled(
        upstream_port: u16,
        bytes_per_sec: usize,
        slowed: Direction,
    ) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let uploaded = Arc::new(AtomicUsize::new(0));
        let downloaded = Arc::new(AtomicUsize::new(0));
        let (up_count, down_count) = (uploaded.clone(), downloaded.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (up_count, down_count) = (up_count.clone(), down_count.clone());
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let rate = |d| (slowed == d).then_some(bytes_per_sec);
                    let up = tokio::spawn(pump(cr, sw, rate(Direction::Upload), up_count));
                    pump(sr, cw, rate(Direction::Download), down_count).await;
                    up.abort();
                });
            }
        });
        SlowProxy {
            port,
            uploaded,
            downloaded,
            task,
        }
    }
}
