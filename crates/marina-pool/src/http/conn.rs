//! The pooled item: one HTTP/1 or HTTP/2 connection made by hyper, and the [`Manage`]
//! connector that opens it over any I/O connector.

use std::error::Error;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Body;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use marina_core::BoxError;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::body::ReqBody;
use super::tap::{Seen, Tap};
use crate::manage::Manage;

/// Which HTTP version a client speaks to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP/1.1: one request at a time per connection; a connection is checked out for
    /// the whole exchange, response body included.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge: connections are shared, each carrying up to the
    /// server's `SETTINGS_MAX_CONCURRENT_STREAMS` requests at once.
    Http2,
    /// What the I/O connector negotiated (ALPN): HTTP/2 when its stream says `h2`
    /// ([`Negotiated::negotiated_h2`]), else HTTP/1.1.
    Negotiated,
}

/// What an I/O stream negotiated with its server: the HTTP version an [`HttpClient`]
/// speaks on it under [`Protocol::Negotiated`].
///
/// Implemented for the plain streams (`TcpStream`, `UnixStream`: never HTTP/2 by
/// negotiation), for a [`Pooled`](crate::Pooled) stream and a `Box` (what the stream
/// inside says), and, with the `tls` feature, for the TLS streams of
/// `marina_pool::tls` (ALPN `h2`). Implement it for a stream type of your own to use it
/// under an [`HttpClient`](super::HttpClient): one line, `false`, if it never
/// negotiates.
///
/// [`HttpClient`]: super::HttpClient
pub trait Negotiated {
    /// True when the stream's handshake chose HTTP/2 (ALPN `h2`).
    fn negotiated_h2(&self) -> bool;
}

impl Negotiated for tokio::net::TcpStream {
    fn negotiated_h2(&self) -> bool {
        false
    }
}

#[cfg(unix)]
impl Negotiated for tokio::net::UnixStream {
    fn negotiated_h2(&self) -> bool {
        false
    }
}

impl<X: Negotiated> Negotiated for crate::Pooled<X> {
    fn negotiated_h2(&self) -> bool {
        (**self).negotiated_h2()
    }
}

impl<X: Negotiated + ?Sized> Negotiated for Box<X> {
    fn negotiated_h2(&self) -> bool {
        (**self).negotiated_h2()
    }
}

/// ALPN `h2`: what [`Protocol::Negotiated`] reads from a connection of
/// `marina_pool::tls::TlsConnector`.
#[cfg(feature = "tls")]
impl<IO> Negotiated for tokio_rustls::client::TlsStream<IO> {
    fn negotiated_h2(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(b"h2")
    }
}

/// HTTP/2 settings of the connections a client opens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct H2Settings {
    /// Cap on streams per connection, whatever the server allows.
    pub(crate) max_streams: usize,
    /// Ping interval (idle connections included) and the time a ping may take.
    pub(crate) keep_alive: Option<(Duration, Duration)>,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            max_streams: 1000,
            keep_alive: Some((Duration::from_secs(5), Duration::from_secs(20))),
        }
    }
}

/// One pooled HTTP connection: hyper's request sender, its protocol, and for HTTP/2
/// what the server said about streams and shutdown.
///
/// Hyper's connection task runs on its own tokio task until the connection closes or
/// this value (every clone of its sender) is dropped.
pub struct HttpConn<B> {
    pub(crate) kind: Kind<B>,
    pub(crate) born: tokio::time::Instant,
}

pub(crate) enum Kind<B> {
    H1(http1::SendRequest<ReqBody<B>>),
    H2 {
        sender: http2::SendRequest<ReqBody<B>>,
        seen: Arc<Seen>,
    },
}

impl<B> HttpConn<B> {
    /// True for an HTTP/2 connection (shared by concurrent requests).
    pub fn is_http2(&self) -> bool {
        matches!(self.kind, Kind::H2 { .. })
    }

    /// True when the connection can take no new request: hyper saw it close, or (HTTP/2)
    /// the server sent `GOAWAY`.
    pub fn is_closed(&self) -> bool {
        match &self.kind {
            Kind::H1(s) => s.is_closed(),
            Kind::H2 { sender, seen } => sender.is_closed() || seen.goaway(),
        }
    }

    /// HTTP/2: how many concurrent streams the server allows on this connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`), `None` for HTTP/1.
    pub fn max_streams(&self) -> Option<usize> {
        match &self.kind {
            Kind::H1(_) => None,
            Kind::H2 { seen, .. } => Some(seen.max_streams()),
        }
    }
}

impl<B> fmt::Debug for HttpConn<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConn")
            .field("http2", &self.is_http2())
            .field("closed", &self.is_closed())
            .field("max_streams", &self.max_streams())
            .finish()
    }
}

/// Why an HTTP connection could not be made: the I/O connector failed, or hyper's
/// handshake did. Its [`source`](Error::source) is the cause.
#[derive(Debug)]
pub struct HttpConnectError {
    stage: &'static str,
    inner: BoxError,
}

impl fmt::Display for HttpConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http connect failed ({}): {}", self.stage, self.inner)
    }
}

impl Error for HttpConnectError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.inner)
    }
}

/// Opens [`HttpConn`]s over the streams of an I/O connector `C` (a
/// [`TcpConnector`](crate::TcpConnector), a TLS connector).
pub(crate) struct HttpManager<C, B> {
    pub(crate) io: C,
    pub(crate) protocol: Protocol,
    pub(crate) h2: H2Settings,
    pub(crate) _body: PhantomData<fn() -> B>,
}

impl<C, B, T> Manage<T> for HttpManager<C, B>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: AsyncRead + AsyncWrite + Negotiated + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    T: Clone + Send + Sync + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Conn = HttpConn<B>;
    type Error = HttpConnectError;

    async fn connect(&self, target: &T) -> Result<HttpConn<B>, HttpConnectError> {
        let failed = |e: C::Error| HttpConnectError {
            stage: "connect",
            inner: e.into(),
        };
        let mut io = self.io.clone();
        std::future::poll_fn(|cx| io.poll_ready(cx))
            .await
            .map_err(failed)?;
        let io = io.call(target.clone()).await.map_err(failed)?;
        let h2 = match self.protocol {
            Protocol::Http1 => false,
            Protocol::Http2 => true,
            Protocol::Negotiated => io.negotiated_h2(),
        };
        let handshake = |e: hyper::Error| HttpConnectError {
            stage: "handshake",
            inner: e.into(),
        };
        if !h2 {
            let (sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(handshake)?;
            tokio::spawn(async move {
                // Ends when the sender is dropped (the pool closed it) or the peer hangs up.
                let _ = conn.await;
            });
            return Ok(HttpConn {
                kind: Kind::H1(sender),
                born: tokio::time::Instant::now(),
            });
        }
        let seen = Arc::new(Seen::new());
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some((interval, timeout)) = self.h2.keep_alive {
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        let (sender, conn) = builder
            .handshake(TokioIo::new(Tap::new(io, seen.clone())))
            .await
            .map_err(handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // The server's first frame says how many streams it takes: wait for it (bounded
        // by the pool's connect timeout), so the pool knows the connection's capacity.
        seen.settings().await;
        if !seen.has_settings() {
            return Err(HttpConnectError {
                stage: "handshake",
                inner: "the server closed the HTTP/2 connection before its SETTINGS".into(),
            });
        }
        Ok(HttpConn {
            kind: Kind::H2 { sender, seen },
            born: tokio::time::Instant::now(),
        })
    }

    fn is_broken(&self, conn: &mut HttpConn<B>) -> bool {
        conn.is_closed()
    }
}
