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

/// A TCP proxy that slows what the server sends to `bytes_per_sec`: a distant or busy
/// source, so that a folder job lasts long enough for something to happen during it.
pub struct SlowProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowProxy {
    pub async fn start(upstream_port: u16, bytes_per_sec: usize) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    });
                    // 20 slices a second, each at most a twentieth of the rate.
                    let slice = (bytes_per_sec / 20).max(1);
                    let mut buf = vec![0u8; slice];
                    loop {
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    }
                    let _ = cw.shutdown().await;
                    up.abort();
                });
            }
        });
        SlowProxy { port, task }
    }
}
