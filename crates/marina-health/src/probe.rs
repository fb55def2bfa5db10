//! Endpoint probes: TCP connect, line ping/pong, HTTP GET.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use marina_core::{BoxError, BoxFuture, Probe};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Passes when a TCP connection to the address opens.
///
/// ```
/// use marina_health::TcpConnectProbe;
/// use marina_core::Probe;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let mut addr = listener.local_addr().unwrap();
/// assert!(TcpConnectProbe.probe(&mut addr).await.is_ok());
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnectProbe;

impl Probe<SocketAddr> for TcpConnectProbe {
    fn probe<'a>(&'a self, addr: &'a mut SocketAddr) -> BoxFuture<'a, Result<Duration, BoxError>> {
        Box::pin(async move {
            let start = Instant::now();
            TcpStream::connect(*addr).await?;
            Ok(start.elapsed())
        })
    }
}

/// Sends a line and expects a given line back (`PING` → `PONG`, or an echo).
///
/// Fails when the connection cannot be opened, is closed before the reply (the socket
/// check of a server that accepts and hangs up), or the reply differs.
///
/// ```
/// use marina_health::LineProbe;
///
/// let ping = LineProbe::new("PING", "PONG");
/// let echo = LineProbe::new("hello", "hello");
/// # let _ = (ping, echo);
/// ```
#[derive(Debug, Clone)]
pub struct LineProbe {
    send: String,
    expect: String,
}

impl LineProbe {
    /// Sends `send` plus a newline; passes when the reply line (without its line end)
    /// equals `expect`.
    pub fn new(send: impl Into<String>, expect: impl Into<String>) -> Self {
        LineProbe {
            send: send.into(),
            expect: expect.into(),
        }
    }
}

/// Over a connection already open (a pooled one): marina-pool's background validation
/// can use it, so a pool of line-protocol connections pings each idle one.
///
/// ```
/// use marina_health::LineProbe;
/// use marina_pool::{Pool, TcpConnector};
/// use tokio::net::TcpStream;
///
/// # fn main() -> Result<(), marina_pool::PoolError> {
/// # let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
/// let pool = Pool::builder()
///     // LineProbe probes addresses and open streams alike: say which.
///     .probe::<TcpStream, _>(LineProbe::new("PING", "PONG"))
///     .build(TcpConnector::new(), addr)?;
/// # drop(pool); Ok(()) }
/// ```
impl Probe<TcpStream> for LineProbe {
    fn probe<'a>(&'a self, stream: &'a mut TcpStream) -> BoxFuture<'a, Result<Duration, BoxError>> {
        Box::pin(async move {
            let start = Instant::now();
            stream
                .write_all(format!("{}\n", self.send).as_bytes())
                .await?;
            let reply = read_reply_line(stream).await?;
            if reply != self.expect {
                return Err(format!("expected {:?}, got {reply:?}", self.expect).into());
            }
            Ok(start.elapsed())
        })
    }
}

/// Reads the first line the peer sends, at most 8 KiB (a peer that streams without a
/// newline cannot grow it further); EOF before it is an error naming `what`.
async fn first_line(stream: &mut TcpStream, what: &str) -> Result<String, BoxError> {
    let mut line = String::new();
    let n = BufReader::new(stream)
        .take(8192)
        .read_line(&mut line)
        .await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed before {what}"),
        )
        .into());
    }
    Ok(line)
}

/// Reads one line byte by byte, so nothing after it is taken from the connection (it
/// stays usable for the pool).
async fn read_reply_line(stream: &mut TcpStream) -> Result<String, BoxError> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if stream.read(&mut b).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the reply",
            )
            .into());
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 8192 {
            return Err("reply line longer than 8 KiB".into());
        }
    }
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches('\r').to_string())
}

impl Probe<SocketAddr> for LineProbe {
    fn probe<'a>(&'a self, addr: &'a mut SocketAddr) -> BoxFuture<'a, Result<Duration, BoxError>> {
        Box::pin(async move {
            let start = Instant::now();
            let mut stream = TcpStream::connect(*addr).await?;
            stream
                .write_all(format!("{}\n", self.send).as_bytes())
                .await?;
            let line = first_line(&mut stream, "the reply").await?;
            let reply = line.trim_end_matches(['\r', '\n']);
            if reply != self.expect {
                return Err(format!("expected {:?}, got {reply:?}", self.expect).into());
            }
            Ok(start.elapsed())
        })
    }
}

/// Sends `GET path HTTP/1.1` and passes on a 2xx status line.
///
/// A minimal HTTP/1.1 client (no TLS, no redirects): enough for the health endpoints of
/// the services behind a pool, without pulling in an HTTP stack.
///
/// ```
/// use marina_health::HttpProbe;
/// let probe = HttpProbe::new("/healthz").host("api.internal");
/// # let _ = probe;
/// ```
#[derive(Debug, Clone)]
pub struct HttpProbe {
    path: String,
    host: Option<String>,
}

impl HttpProbe {
    /// Probes `path` (e.g. `/healthz`).
    pub fn new(path: impl Into<String>) -> Self {
        HttpProbe {
            path: path.into(),
            host: None,
        }
    }

    /// The `Host` header (default: the address).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
}

impl Probe<SocketAddr> for HttpProbe {
    fn probe<'a>(&'a self, addr: &'a mut SocketAddr) -> BoxFuture<'a, Result<Duration, BoxError>> {
        Box::pin(async move {
            let start = Instant::now();
            let mut stream = TcpStream::connect(*addr).await?;
            let host = self.host.clone().unwrap_or_else(|| addr.to_string());
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: marina-health\r\nConnection: close\r\n\r\n",
                self.path
            );
            stream.write_all(req.as_bytes()).await?;
            let line = first_line(&mut stream, "the status line").await?;
            let mut parts = line.split_whitespace();
            let (version, code) = (parts.next(), parts.next());
            let code: u16 = match (version, code) {
                (Some(v), Some(c)) if v.starts_with("HTTP/") => {
                    c.parse().map_err(|_| format!("bad status line {line:?}"))?
                }
                _ => return Err(format!("bad status line {line:?}").into()),
            };
            if !(200..300).contains(&code) {
                return Err(format!("status {code}").into());
            }
            Ok(start.elapsed())
        })
    }
}

/// The standard gRPC health check: `grpc.health.v1.Health/Check` for a service name
/// (empty for the whole server), passing on `SERVING` (feature `grpc`).
///
/// As a `Probe<SocketAddr>` it opens a plaintext HTTP/2 channel per round; as a
/// `Probe<tonic::transport::Channel>` it reuses a channel you already have.
///
/// ```
/// use marina_health::GrpcProbe;
/// let probe = GrpcProbe::new("my.package.MyService");
/// # let _ = probe;
/// ```
#[cfg(feature = "grpc")]
#[derive(Debug, Clone, Default)]
pub struct GrpcProbe {
    service: String,
}

#[cfg(feature = "grpc")]
impl GrpcProbe {
    /// Checks `service` (`""` for the server as a whole).
    pub fn new(service: impl Into<String>) -> Self {
        GrpcProbe {
            service: service.into(),
        }
    }

    async fn check(&self, channel: tonic::transport::Channel) -> Result<(), BoxError> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: self.service.clone(),
            })
            .await?
            .into_inner();
        match ServingStatus::try_from(reply.status) {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => Err(format!("service reports {}", other.as_str_name()).into()),
            Err(_) => Err(format!("unknown serving status {}", reply.status).into()),
        }
    }
}

#[cfg(feature = "grpc")]
impl Probe<SocketAddr> for GrpcProbe {
    fn probe<'a>(&'a self, addr: &'a mut SocketAddr) -> BoxFuture<'a, Result<Duration, BoxError>> {
        Box::pin(async move {
            let start = Instant::now();
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await?;
            self.check(channel).await?;
            Ok(start.elapsed())
        })
    }
}

#[cfg(feature = "grpc")]
impl Probe<tonic::transport::Channel> for GrpcProbe {
    fn probe<'a>(
        &'a self,
        channel: &'a mut tonic::transport::Channel,
    ) -> BoxFuture<'a, Result<Duration, BoxError>> {
        Box::pin(async move {
            let start = Instant::now();
            self.check(channel.clone()).await?;
            Ok(start.elapsed())
        })
    }
}
