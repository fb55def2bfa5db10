//! `Transport`: the stream under every pooled connection of a stack, plain TCP or TLS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The stream a [`Stack`](crate::Stack)'s connection runs on: TCP, or TLS over TCP
/// when the stack was built with [`StackBuilder::tls`](crate::StackBuilder::tls) (the
/// `tls` feature). A [`Conn`](crate::Conn) is one of these through the bandwidth
/// limiter.
///
/// Read and write it as any tokio stream; [`is_open`](Self::is_open) is the checkout
/// check a protocol's `check` should call, and [`alpn_protocol`](Self::alpn_protocol)
/// the protocol a TLS server chose.
///
/// Non-exhaustive: match it with a wildcard arm (the `Tls` variant exists only with the
/// `tls` feature).
#[derive(Debug)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP (boxed: a TLS session is a few hundred bytes of state).
    #[cfg(feature = "tls")]
    Tls(Box<marina_pool::tls::TlsStream<TcpStream>>),
}

impl Transport {
    /// The TCP socket under it (for socket options, addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Tcp(s) => s,
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.get_ref().0,
        }
    }

    /// The TLS stream, if this is one.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&marina_pool::tls::TlsStream<TcpStream>> {
        match self {
            Transport::Tls(s) => Some(s),
            Transport::Tcp(_) => None,
        }
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Transport::Tcp(_))
    }

    /// The protocol the server chose by ALPN (`b"h2"`, `b"http/1.1"`); `None` over
    /// plain TCP or when none was negotiated.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            Transport::Tcp(_) => None,
            #[cfg(feature = "tls")]
            Transport::Tls(s) => marina_pool::tls::alpn_protocol(s),
        }
    }

    /// Whether an idle connection can be reused: no FIN, RST or unread bytes on the
    /// socket ([`marina_pool::socket_is_open`]); over TLS, records that arrived while it
    /// was idle are read first without waiting (session tickets leave it usable, data
    /// or a `close_notify` do not: `marina_pool::tls::is_open`).
    pub fn is_open(&mut self) -> bool {
        match self {
            Transport::Tcp(s) => marina_pool::socket_is_open(s),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => marina_pool::tls::is_open(s),
        }
    }
}

/// The TCP socket under it, as [`tcp`](Transport::tcp): code written when a
/// [`Conn`](crate::Conn)'s stream was a bare `TcpStream` keeps compiling, for example a
/// `check` of `|c| marina::pool::socket_is_open(c.get_ref())` (over TLS, prefer
/// [`Transport::is_open`], which reads TLS records that arrived while idle).
///
/// ```
/// # async fn f(conn: marina::Conn) {
/// let open = marina::pool::socket_is_open(conn.get_ref());
/// let peer = conn.get_ref().peer_addr();
/// # let _ = (open, peer); }
/// ```
impl std::ops::Deref for Transport {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        self.tcp()
    }
}

impl From<TcpStream> for Transport {
    fn from(s: TcpStream) -> Self {
        Transport::Tcp(s)
    }
}

#[cfg(feature = "tls")]
impl From<marina_pool::tls::TlsStream<TcpStream>> for Transport {
    fn from(s: marina_pool::tls::TlsStream<TcpStream>) -> Self {
        Transport::Tls(Box::new(s))
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The stack's connector under the bandwidth limiter: TCP, then TLS when set.
#[derive(Clone)]
pub(super) struct TransportConnector {
    tcp: marina_pool::TcpConnector,
    #[cfg(feature = "tls")]
    tls: Option<marina_pool::tls::TlsConnector<marina_pool::TcpConnector>>,
}

impl TransportConnector {
    pub(super) fn new(
        tcp: marina_pool::TcpConnector,
        #[cfg(feature = "tls")] tls: Option<marina_pool::tls::TlsConfig>,
    ) -> Self {
        TransportConnector {
            #[cfg(feature = "tls")]
            tls: tls.map(|tls| marina_pool::tls::TlsConnector::new(tcp.clone(), tls)),
            tcp,
        }
    }
}

impl tower_service::Service<std::net::SocketAddr> for TransportConnector {
    type Response = Transport;
    type Error = marina_core::BoxError;
    type Future = marina_core::BoxFuture<'static, Result<Transport, marina_core::BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both connectors are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, addr: std::net::SocketAddr) -> Self::Future {
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            let connect = tls.call(addr);
            return Box::pin(async move { Ok(Transport::from(connect.await?)) });
        }
        let connect = self.tcp.call(addr);
        Box::pin(async move { Ok(Transport::Tcp(connect.await?)) })
    }
}
