//! `TcpConnector`: the default connector.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tower_service::Service;

/// Opens TCP connections: a `Service<SocketAddr>`, and a `Service<String>` for
/// `"host:port"` targets resolved through DNS (each address tried in turn).
///
/// Sets `TCP_NODELAY` and TCP keepalive (first probe after 30 s idle by default) on each
/// connection, and bounds each connect attempt by `connect_timeout` when set (the pool
/// has its own `connect_timeout` too). Errors are [`ConnectError`]s naming the address.
///
/// # Sharing
///
/// `Clone`: a clone is a copy of the settings, with no state shared between clones or
/// between connects; clone it freely (a pool clones its connector for each connect).
/// Always ready.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use marina_pool::TcpConnector;
///
/// let connector = TcpConnector::new()
///     .connect_timeout(Some(Duration::from_secs(2)))
///     .keepalive(Some(Duration::from_secs(60)))
///     .nodelay(true);
/// # let _ = connector;
/// ```
#[derive(Debug, Clone)]
pub struct TcpConnector {
    connect_timeout: Option<Duration>,
    keepalive: Option<Duration>,
    nodelay: bool,
}

impl Default for TcpConnector {
    fn default() -> Self {
        TcpConnector {
            connect_timeout: None,
            keepalive: Some(Duration::from_secs(30)),
            nodelay: true,
        }
    }
}

impl TcpConnector {
    /// `TCP_NODELAY` on, keepalive after 30 s, no connect timeout of its own.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds each connect attempt (per address, for DNS names).
    pub fn connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// TCP keepalive idle time before the first probe; `None` leaves the OS default (off).
    pub fn keepalive(mut self, idle: Option<Duration>) -> Self {
        self.keepalive = idle;
        self
    }

    /// Sets `TCP_NODELAY` (disables Nagle's algorithm). On by default.
    pub fn nodelay(mut self, on: bool) -> Self {
        self.nodelay = on;
        self
    }

    async fn connect_addr(self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        let err = |source| ConnectError {
            target: addr.to_string(),
            source,
        };
        let connect = TcpStream::connect(addr);
        let stream = match self.connect_timeout {
            None => connect.await,
            Some(t) => match tokio::time::timeout(t, connect).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {t:?}"),
                )),
            },
        }
        .map_err(err)?;
        stream.set_nodelay(self.nodelay).map_err(err)?;
        if let Some(idle) = self.keepalive {
            SockRef::from(&stream)
                .set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))
                .map_err(err)?;
        }
        Ok(stream)
    }

    async fn connect_host(self, host: String) -> Result<TcpStream, ConnectError> {
        let addrs = tokio::net::lookup_host(host.as_str())
            .await
            .map_err(|source| ConnectError {
                target: host.clone(),
                source,
            })?;
        let mut last = None;
        for addr in addrs {
            match self.clone().connect_addr(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e.source),
            }
        }
        Err(ConnectError {
            target: host,
            source: last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "name resolved to no address")
            }),
        })
    }
}

/// A connect failed; names what was being connected to.
#[derive(Debug)]
pub struct ConnectError {
    target: String,
    source: io::Error,
}

impl ConnectError {
    /// The address or `host:port` that could not be reached.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The I/O error's kind (`ConnectionRefused`, `TimedOut`, …).
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connect to {} failed", self.target)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The future of [`TcpConnector`]'s calls.
///
/// # Cancel safety
///
/// Dropping it abandons the connect and leaks nothing: the socket of a connect in
/// progress is closed (if the handshake had got far enough, the peer sees the
/// connection close), and nothing is retried. For a `"host:port"` target, a DNS lookup
/// in progress runs on tokio's blocking pool and cannot be interrupted: it finishes
/// there and its result is discarded.
pub struct ConnectFuture {
    inner: Pin<Box<dyn Future<Output = Result<TcpStream, ConnectError>> + Send>>,
}

impl fmt::Debug for ConnectFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectFuture").finish_non_exhaustive()
    }
}

impl Future for ConnectFuture {
    type Output = Result<TcpStream, ConnectError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<SocketAddr> for TcpConnector {
    type Response = TcpStream;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        ConnectFuture {
            inner: Box::pin(self.clone().connect_addr(addr)),
        }
    }
}

impl Service<String> for TcpConnector {
    type Response = TcpStream;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, host: String) -> Self::Future {
        ConnectFuture {
            inner: Box::pin(self.clone().connect_host(host)),
        }
    }
}
