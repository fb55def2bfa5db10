//! What the Redis tests share: finding the server (or skipping outside CI), a key
//! prefix per test, and a loopback TCP proxy that can stop forwarding.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The server the tests use: `MARINA_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn url() -> String {
    std::env::var("MARINA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Redis URL if a server answers `PING` there. Without one: in CI (`CI` set) the
/// test fails; elsewhere it prints why and the test is skipped (returns early).
pub async fn redis() -> Option<String> {
    let url = url();
    let answer = async {
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    let why = match tokio::time::timeout(Duration::from_secs(3), answer).await {
        Ok(Ok(_)) => return Some(url),
        Ok(Err(e)) => e,
        Err(_) => "no answer within 3 s".to_string(),
    };
    if std::env::var_os("CI").is_some() {
        panic!(
            "no Redis at MARINA_REDIS_URL={url} ({why}); CI must run these tests (.ci/run starts one)"
        );
    }
    eprintln!(
        "SKIPPED: no Redis at MARINA_REDIS_URL={url} ({why}). Start one \
         (redis-server --port 6379 --save '' --appendonly no) or set MARINA_REDIS_URL to run this test."
    );
    None
}

/// A key prefix of this test's own, so tests run in parallel (and again) apart.
pub fn prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "marina-test:{test}:{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    )
}

/// A plain connection for a test's own commands.
pub async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a redis:// URL");
    let (userinfo, hostpath) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    format!("{scheme}://{userinfo}{addr}{path}")
}

/// The host and port of `url`.
pub fn target(url: &str) -> String {
    let rest = url.split_once("://").expect("a redis:// URL").1;
    let hostpath = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = hostpath.split('/').next().unwrap();
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:6379")
    }
}

/// What the proxy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Forward,
    /// Holds every byte (a hung or very slow Redis): connections stay open, nothing
    /// moves until forwarding resumes.
    Pause,
    /// Closes every connection, and each new one at once (a dead Redis).
    Kill,
}

/// A loopback TCP proxy in front of Redis that a test switches between forwarding,
/// holding everything, and dropping every connection.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Forward);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() == Mode::Kill {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, rx.clone()));
                tokio::spawn(pipe(sr, cw, rx.clone()));
            }
        });
        Proxy { addr, mode }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

/// Copies `from` to `to` while forwarding; holds while paused; ends (closing both
/// halves) when killed.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Wait until forwarding (or killed).
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Forward => break,
                Mode::Kill => return,
                Mode::Pause => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            n = from.read(&mut buf) => {
                let Ok(n) = n else { return };
                if n == 0 {
                    return;
                }
                // Bytes read just as a pause began are held until it ends.
                loop {
                    let m = *mode.borrow_and_update();
                    match m {
                        Mode::Forward => break,
                        Mode::Kill => return,
                        Mode::Pause => {
                            if mode.changed().await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Polls `cond` every 10 ms until it holds, for at most `max`: whether it did.
pub async fn eventually(max: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + max;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A shared counter of requests in flight at a backend, with its high-water mark.
#[derive(Default)]
pub struct InFlight {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        let n = self.now.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(n, Relaxed);
        InFlightGuard(self.clone())
    }

    pub fn now(&self) -> usize {
        self.now.load(Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max.load(Relaxed)
    }
}

pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Relaxed);
    }
}
