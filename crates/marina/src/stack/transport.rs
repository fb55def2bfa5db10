//! `Transport`: the stream under every pooled connection of a stack, plain TCP, TLS,
//! or a stream of a connector of the user's ([`StackBuilder::connector`](crate::StackBuilder::connector)).

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::{BoxError, BoxFuture};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The stream a [`Stack`](crate::Stack)'s connection runs on: TCP, or TLS over TCP
/// when the stack was built with [`StackBuilder::tls`](crate::StackBuilder::tls) (the
/// `tls` feature), or the stream of the stack's own connector
/// ([`StackBuilder::connector`](crate::StackBuilder::connector)). A
/// [`Conn`](crate::Conn) is one of these through the bandwidth limiter.
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
    /// A stream from the connector set with
    /// [`StackBuilder::connector`](crate::StackBuilder::connector) (a simulated network,
    /// a Unix socket, a tunnel), boxed.
    Custom(CustomStream),
}

/// What a custom connector's stream must be.
trait CustomIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> CustomIo for S {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The stream of a connector set with
/// [`StackBuilder::connector`](crate::StackBuilder::connector), boxed: read and write it
/// through [`Transport`], or reach the connector's own type with
/// [`downcast_mut`](Self::downcast_mut) or [`with_ref`](Self::with_ref).
///
/// `Sync` whatever the stream is: it is reached through `&mut`, or by
/// [`with_ref`](Self::with_ref), under a lock.
pub struct CustomStream {
    // A `Mutex` for `Sync` without requiring it of the stream: every read and write
    // goes through `get_mut`, which takes no lock.
    io: std::sync::Mutex<Box<dyn CustomIo>>,
}

impl fmt::Debug for CustomStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CustomStream(..)")
    }
}

impl CustomStream {
    /// Boxes `io`.
    pub fn new<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(io: S) -> Self {
        CustomStream {
            io: std::sync::Mutex::new(Box::new(io)),
        }
    }

    fn io(&mut self) -> &mut dyn CustomIo {
        &mut **self
            .io
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream as the connector's type `S`, if it is one.
    pub fn downcast_mut<S: 'static>(&mut self) -> Option<&mut S> {
        self.io().as_any_mut().downcast_mut()
    }

    /// Runs `f` on the stream as the connector's type `S`, if it is one (`None`
    /// otherwise).
    pub fn with_ref<S: 'static, R>(&self, f: impl FnOnce(&S) -> R) -> Option<R> {
        let io = self
            .io
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        io.as_any().downcast_ref::<S>().map(f)
    }

    /// Whether an idle connection can be reused: a read without waiting finds nothing
    /// (`Pending`). End of stream, an error or unread bytes (a reply nobody asked for)
    /// mean it cannot; a byte read by the check is lost, which is fine since the
    /// connection is then dropped.
    pub fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(self.io()).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }
}

impl AsyncRead for CustomStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()).poll_read(cx, buf)
    }
}

impl AsyncWrite for CustomStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()).poll_shutdown(cx)
    }
}

impl Transport {
    /// The TCP socket under it (for socket options, addresses).
    ///
    /// # Panics
    ///
    /// When the stream is a custom connector's ([`Transport::Custom`], with
    /// [`StackBuilder::connector`](crate::StackBuilder::connector)): there is no TCP
    /// socket. Use [`try_tcp`](Self::try_tcp) where that can be.
    pub fn tcp(&self) -> &TcpStream {
        self.try_tcp().expect(
            "Transport::tcp on a custom connector's stream: it has no TCP socket (use try_tcp)",
        )
    }

    /// The TCP socket under it: `None` for a custom connector's stream.
    pub fn try_tcp(&self) -> Option<&TcpStream> {
        match self {
            Transport::Tcp(s) => Some(s),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Some(s.get_ref().0),
            Transport::Custom(_) => None,
        }
    }

    /// The custom connector's stream, if this is one.
    pub fn custom(&mut self) -> Option<&mut CustomStream> {
        match self {
            Transport::Custom(s) => Some(s),
            _ => None,
        }
    }

    /// The TLS stream, if this is one.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&marina_pool::tls::TlsStream<TcpStream>> {
        match self {
            Transport::Tls(s) => Some(s),
            _ => None,
        }
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            matches!(self, Transport::Tls(_))
        }
        #[cfg(not(feature = "tls"))]
        {
            false
        }
    }

    /// The protocol the server chose by ALPN (`b"h2"`, `b"http/1.1"`); `None` over
    /// plain TCP, a custom connector's stream, or when none was negotiated.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match self {
            Transport::Tcp(_) | Transport::Custom(_) => None,
            #[cfg(feature = "tls")]
            Transport::Tls(s) => marina_pool::tls::alpn_protocol(s),
        }
    }

    /// Whether an idle connection can be reused: no FIN, RST or unread bytes on the
    /// socket ([`marina_pool::socket_is_open`]); over TLS, records that arrived while it
    /// was idle are read first without waiting (session tickets leave it usable, data
    /// or a `close_notify` do not: `marina_pool::tls::is_open`); a custom connector's
    /// stream is read once without waiting ([`CustomStream::is_open`]).
    pub fn is_open(&mut self) -> bool {
        match self {
            Transport::Tcp(s) => marina_pool::socket_is_open(s),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => marina_pool::tls::is_open(s),
            Transport::Custom(s) => s.is_open(),
        }
    }
}

/// The TCP socket under it, as [`tcp`](Transport::tcp): code written when a
/// [`Conn`](crate::Conn)'s stream was a bare `TcpStream` keeps compiling, for example a
/// `check` of `|c| marina::pool::socket_is_open(c.get_ref())` (over TLS, prefer
/// [`Transport::is_open`], which reads TLS records that arrived while idle).
///
/// # Panics
///
/// On a custom connector's stream ([`Transport::Custom`]), as [`Transport::tcp`]: a
/// stack built with [`StackBuilder::connector`](crate::StackBuilder::connector) checks
/// its connections with [`Transport::is_open`] instead.
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
            Transport::Custom(s) => Pin::new(s).poll_read(cx, buf),
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
            Transport::Custom(s) => Pin::new(s).poll_write(cx, buf),
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
            Transport::Custom(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.is_write_vectored(),
            Transport::Custom(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Transport::Custom(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Transport::Custom(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A connector of the user's, type-erased: connects to an address within the stack's
/// connect timeout.
pub(super) type CustomConnect =
    Arc<dyn Fn(SocketAddr) -> BoxFuture<'static, Result<Transport, BoxError>> + Send + Sync>;

/// Erases `connector` (see [`StackBuilder::connector`](crate::StackBuilder::connector)).
pub(super) fn custom_connect<C>(connector: C) -> CustomConnect
where
    C: tower_service::Service<SocketAddr> + Clone + Send + Sync + 'static,
    C::Response: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    use tower::ServiceExt;
    Arc::new(move |addr| {
        let connect = connector.clone().oneshot(addr);
        Box::pin(async move {
            let io = connect.await.map_err(Into::into)?;
            Ok(Transport::Custom(CustomStream::new(io)))
        })
    })
}

/// The stack's connector under the bandwidth limiter: TCP, then TLS when set; or the
/// user's connector, bounded by the connect timeout.
#[derive(Clone)]
pub(super) struct TransportConnector {
    tcp: marina_pool::TcpConnector,
    #[cfg(feature = "tls")]
    tls: Option<marina_pool::tls::TlsConnector<marina_pool::TcpConnector>>,
    custom: Option<(CustomConnect, Duration)>,
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
            custom: None,
        }
    }

    /// Connects with `custom` instead, each connect bounded by `timeout`.
    pub(super) fn custom(mut self, custom: Option<CustomConnect>, timeout: Duration) -> Self {
        self.custom = custom.map(|c| (c, timeout));
        self
    }
}

impl tower_service::Service<std::net::SocketAddr> for TransportConnector {
    type Response = Transport;
    type Error = marina_core::BoxError;
    type Future = marina_core::BoxFuture<'static, Result<Transport, marina_core::BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Every connector is always ready (a custom one is driven to ready per connect).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, addr: std::net::SocketAddr) -> Self::Future {
        if let Some((custom, timeout)) = &self.custom {
            let connect = custom(addr);
            let timeout = *timeout;
            return Box::pin(async move {
                match tokio::time::timeout(timeout, connect).await {
                    Ok(r) => r,
                    Err(_) => Err(marina_pool::ConnectTimeout {
                        timeout,
                        target: addr.to_string(),
                    }
                    .into()),
                }
            });
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            let connect = tls.call(addr);
            return Box::pin(async move { Ok(Transport::from(connect.await?)) });
        }
        let connect = self.tcp.call(addr);
        Box::pin(async move { Ok(Transport::Tcp(connect.await?)) })
    }
}
