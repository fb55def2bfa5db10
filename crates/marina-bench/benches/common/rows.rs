//! The rows the stack and instruction-count benches drive: line echo servers, and each
//! row's client (a connection per request, deadpool + round robin, marina's pool, the
//! marina stack in several shapes).

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use marina::core::{BoxError, Request};
use marina::limit::Rate;
use marina::line::LineClient;
use marina::pool::{Config, TcpConnector};
use marina::{AffinityMode, KeyFnBox, Stack, StackHandle, StackService};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tower::util::MapResponse;
use tower::{Service, ServiceExt};

/// Starts a line echo server on 127.0.0.1 (a task per connection) and returns its
/// address.
pub(crate) async fn echo_server() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors and the like: let the client see errors.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let mut line = Vec::with_capacity(64);
                loop {
                    line.clear();
                    match read.read_until(b'\n', &mut line).await {
                        Ok(n) if n > 0 && line.ends_with(b"\n") => {}
                        _ => return,
                    }
                    if write.write_all(&line).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

// --------------------------------------------------------------------------- clients

/// Round robin over a fixed set, shared by every task's clone.
pub(crate) struct Rr<T> {
    items: Arc<[T]>,
    next: Arc<AtomicUsize>,
}

impl<T> Clone for Rr<T> {
    fn clone(&self) -> Self {
        Rr {
            items: self.items.clone(),
            next: self.next.clone(),
        }
    }
}

impl<T> Rr<T> {
    fn new(items: Vec<T>) -> Self {
        Rr {
            items: items.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn pick(&self) -> &T {
        &self.items[self.next.fetch_add(1, Relaxed) % self.items.len()]
    }
}

/// deadpool's manager for line clients.
#[derive(Debug)]
pub(crate) struct LineManager {
    addr: SocketAddr,
}

impl deadpool::managed::Manager for LineManager {
    type Type = LineClient<TcpStream>;
    type Error = io::Error;

    async fn create(&self) -> io::Result<LineClient<TcpStream>> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(LineClient::new(stream))
    }

    async fn recycle(
        &self,
        client: &mut LineClient<TcpStream>,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<io::Error> {
        if client.is_usable() {
            Ok(())
        } else {
            Err(deadpool::managed::RecycleError::message(
                "broken by a failed call",
            ))
        }
    }
}

type Deadpool = deadpool::managed::Pool<LineManager>;

/// marina's pool of line clients over its TCP connector.
type LineConnector = MapResponse<TcpConnector, fn(TcpStream) -> LineClient<TcpStream>>;
type MarinaPool = marina::pool::Pool<LineConnector, SocketAddr>;

/// The session a `marina-sticky-rate` client's requests carry.
#[derive(Debug, Clone)]
pub(crate) struct Session(pub(crate) String);

/// One task's client of a row.
#[derive(Clone)]
pub(crate) enum Client {
    Connect(Rr<SocketAddr>),
    Deadpool(Rr<Deadpool>),
    Pool(Rr<MarinaPool>),
    Stack {
        svc: StackService<String, String>,
        /// Set per task for the sticky row.
        session: Option<Session>,
    },
}

impl Client {
    /// One echo: the reply line.
    pub(crate) async fn exchange(&mut self, line: String) -> Result<String, BoxError> {
        match self {
            Client::Connect(addrs) => Ok(connect_exchange(*addrs.pick(), line).await?),
            Client::Deadpool(pools) => {
                let mut client = pools.pick().get().await?;
                Ok(client.ready().await?.call(line).await?)
            }
            Client::Pool(pools) => {
                let mut client = pools.pick().get().await?;
                Ok(client.ready().await?.call(line).await?)
            }
            Client::Stack { svc, session } => {
                let mut req = Request::new(line);
                if let Some(s) = session {
                    req.extensions.insert(s.clone());
                }
                Ok(svc.ready().await?.call(req).await?.body)
            }
        }
    }
}

/// Connect, send `line`, read the reply, close.
async fn connect_exchange(addr: SocketAddr, line: String) -> io::Result<String> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let mut msg = line.into_bytes();
    msg.push(b'\n');
    stream.get_mut().write_all(&msg).await?;
    msg.clear();
    stream.read_until(b'\n', &mut msg).await?;
    if msg.pop() != Some(b'\n') {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    String::from_utf8(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A row, built: its client and what must be closed afterwards.
pub(crate) struct Built {
    pub(crate) client: Client,
    pub(crate) stack: Option<StackHandle>,
}

fn pool_config(size: usize) -> Config {
    Config {
        max_size: size,
        min_idle: size,
        ..Config::balanced()
    }
}

pub(crate) async fn build(row: &str, addrs: &[SocketAddr], size: usize) -> Result<Built, BoxError> {
    let client = match row {
        "connect" => Client::Connect(Rr::new(addrs.to_vec())),
        "deadpool" => {
            let mut pools = Vec::new();
            for &addr in addrs {
                let pool = Deadpool::builder(LineManager { addr })
                    .max_size(size)
                    .build()?;
                // Open every connection.
                let mut held = Vec::new();
                for _ in 0..size {
                    held.push(pool.get().await?);
                }
                drop(held);
                pools.push(pool);
            }
            Client::Deadpool(Rr::new(pools))
        }
        "pool" | "pool-nocheck" => {
            let mut pools = Vec::new();
            for &addr in addrs {
                let connector: LineConnector = MapResponse::new(
                    TcpConnector::new().connect_timeout(Some(Duration::from_secs(5))),
                    LineClient::new as fn(TcpStream) -> LineClient<TcpStream>,
                );
                let builder = marina::pool::Pool::builder().config(pool_config(size));
                let builder = if row == "pool" {
                    // What `build_line` checks at checkout.
                    builder.check(|c: &mut LineClient<TcpStream>| {
                        c.is_usable() && c.with_io(marina::pool::socket_is_open).unwrap_or(true)
                    })
                } else {
                    builder.check(|c: &mut LineClient<TcpStream>| c.is_usable())
                };
                let pool = builder.build(connector, addr)?;
                pool.ready_min().await?;
                pools.push(pool);
            }
            Client::Pool(Rr::new(pools))
        }
        "marina" | "marina-bare" | "marina-sticky-rate" => {
            let mut builder = Stack::builder::<String>()
                .endpoints(addrs.iter().copied())
                .pool(pool_config(size));
            if row == "marina-bare" {
                builder = builder.health(None).failover(None);
            }
            let sticky = row == "marina-sticky-rate";
            if sticky {
                let session = KeyFnBox::new(|r: &Request<String>| {
                    r.extensions.get::<Session>().map(|s| s.0.clone())
                });
                builder = builder
                    .affinity(AffinityMode::Sticky(session, Default::default()))
                    .rate_limit(Rate::per_second(10_000_000));
            }
            let (svc, handle) = builder.build_line()?;
            // Wait for every pool to have opened its connections.
            let deadline = Instant::now() + Duration::from_secs(5);
            while handle.stats().backends.iter().any(|b| b.pool.idle < size) {
                if Instant::now() > deadline {
                    return Err("the stack's pools did not fill in 5 s".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            return Ok(Built {
                client: Client::Stack {
                    svc,
                    session: sticky.then(|| Session(String::new())),
                },
                stack: Some(handle),
            });
        }
        other => return Err(format!("unknown row {other}").into()),
    };
    Ok(Built {
        client,
        stack: None,
    })
}
