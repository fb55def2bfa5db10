//! The echo backends: a line in, the same line and the backend's tag back, each
//! delivery recorded.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use turmoil::net::{TcpListener, TcpStream};

use crate::log::{Event, Log};
use crate::request::parse_id;

/// The port every backend listens on.
pub const PORT: u16 = 7000;

/// A backend host's name.
pub fn host_name(i: usize) -> String {
    format!("b{i}")
}

/// The tag a backend appends to its echo: the request line, a space, `@b{i}`.
pub fn reply_for(line: &str, backend: usize) -> String {
    format!("{line} @b{backend}")
}

/// What the driver can change in a backend while it runs, and what it counts.
#[derive(Debug, Default)]
pub struct BackendState {
    /// Reads requests and never answers.
    pub black_hole: bool,
    /// Connections its handler tasks hold now: number → the client's port.
    pub open: std::collections::BTreeMap<u64, u16>,
    /// Connections accepted so far (numbers them).
    pub accepted: u64,
}

/// Every backend's state, shared by the driver and the hosts.
#[derive(Debug, Clone, Default)]
pub struct Backends(Arc<Mutex<Vec<BackendState>>>);

impl Backends {
    /// `n` backends.
    pub fn new(n: usize) -> Self {
        Backends(Arc::new(Mutex::new(
            (0..n).map(|_| BackendState::default()).collect(),
        )))
    }

    /// The state, locked.
    pub fn lock(&self) -> MutexGuard<'_, Vec<BackendState>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a connection open while its handler runs; the drop (the connection's end,
/// or the host's crash dropping the task) counts it closed.
struct OpenConn {
    backends: Backends,
    log: Log,
    backend: usize,
    conn: u64,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.backends.lock()[self.backend].open.remove(&self.conn);
        self.log.push(Event::Closed {
            backend: self.backend,
            conn: self.conn,
        });
    }
}

/// Backend `i`'s software: accept, echo each line after `service_time`.
pub async fn serve(
    i: usize,
    backends: Backends,
    log: Log,
    service_time: Duration,
) -> turmoil::Result {
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let conn = {
            let mut all = backends.lock();
            all[i].accepted += 1;
            let conn = all[i].accepted;
            all[i].open.insert(conn, peer.port());
            conn
        };
        log.push(Event::Accepted { backend: i, conn });
        let guard = OpenConn {
            backends: backends.clone(),
            log: log.clone(),
            backend: i,
            conn,
        };
        tokio::task::spawn_local(connection(
            i,
            stream,
            guard,
            backends.clone(),
            log.clone(),
            service_time,
        ));
    }
}

async fn connection(
    i: usize,
    stream: TcpStream,
    guard: OpenConn,
    backends: Backends,
    log: Log,
    service_time: Duration,
) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let id = parse_id(&line);
        if let Some(id) = id {
            log.push(Event::Delivered {
                id,
                backend: i,
                conn: guard.conn,
            });
        }
        if backends.lock()[i].black_hole {
            // Read on (so the peer's writes succeed), never answer.
            continue;
        }
        tokio::time::sleep(service_time).await;
        // A black hole that began while this request was served swallows it too.
        if backends.lock()[i].black_hole {
            continue;
        }
        if w.write_all(format!("{}\n", reply_for(&line, i)).as_bytes())
            .await
            .is_err()
        {
            break;
        }
        if let Some(id) = id {
            log.push(Event::Replied { id, backend: i });
        }
    }
    drop(guard);
}
