//! `TlsConnector`: TLS over any connector's streams.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use marina_core::BoxError;
use pin_project_lite::pin_project;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use super::{TlsConfig, TlsError};

/// A connect target that names the server to verify: the name (or IP address) its
/// certificate must carry.
///
/// Implemented for `SocketAddr` (its IP address: the certificate must list it, or set
/// a name with [`TlsConfig::server_name`]), for `String` targets `"host:port"` (the
/// host; `"[::1]:443"` is the IPv6 address), and, with the `hyper` feature, for
/// `http::Uri` (its host).
pub trait TlsTarget {
    /// The server name, or `None` when the target gives none.
    fn server_name(&self) -> Option<ServerName<'static>>;
}

impl TlsTarget for SocketAddr {
    fn server_name(&self) -> Option<ServerName<'static>> {
        Some(ServerName::from(self.ip()))
    }
}

impl TlsTarget for String {
    fn server_name(&self) -> Option<ServerName<'static>> {
        host_name(self)
    }
}

#[cfg(feature = "hyper")]
impl TlsTarget for hyper::Uri {
    fn server_name(&self) -> Option<ServerName<'static>> {
        host_name(self.host()?)
    }
}

/// The server name in `"host:port"`, `"host"`, `"[v6]:port"` or `"[v6]"`.
fn host_name(target: &str) -> Option<ServerName<'static>> {
    let host = if let Some(rest) = target.strip_prefix('[') {
        &rest[..rest.find(']')?]
    } else if target.matches(':').count() == 1 {
        target.split_once(':').map_or(target, |(host, _)| host)
    } else {
        // No port, or a bare IPv6 address.
        target
    };
    ServerName::try_from(host.to_string()).ok()
}

/// TLS over the connections another connector makes: a `Service<T>` for each target
/// type `T` the inner connector takes (`SocketAddr`, `"host:port"` strings, …) that
/// names a server ([`TlsTarget`]), answering [`TlsStream`]s once the handshake is done.
///
/// Errors: the inner connector's error as it is, or a [`TlsError`] (boxed as a
/// [`BoxError`]; downcast or [`marina_core::find`] it).
///
/// # Sharing
///
/// `Clone` when the inner connector is: clones share the `ClientConfig` (and its TLS
/// session cache). Ready when the inner connector is.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use marina_pool::tls::{TlsConfig, TlsConnector};
/// use marina_pool::TcpConnector;
/// # let roots = rustls::RootCertStore::empty();
///
/// let connector = TlsConnector::new(
///     TcpConnector::new().connect_timeout(Some(Duration::from_secs(2))),
///     TlsConfig::with_roots(roots).alpn(["h2"]),
/// );
/// # drop(connector);
/// ```
#[derive(Clone)]
pub struct TlsConnector<C> {
    inner: C,
    tls: TlsConfig,
}

impl<C: fmt::Debug> fmt::Debug for TlsConnector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("inner", &self.inner)
            .field("tls", &self.tls)
            .finish()
    }
}

impl<C> TlsConnector<C> {
    /// TLS with `tls` over `inner`'s connections.
    pub fn new(inner: C, tls: TlsConfig) -> Self {
        TlsConnector { inner, tls }
    }

    /// The TLS settings.
    pub fn tls_config(&self) -> &TlsConfig {
        &self.tls
    }

    /// The inner connector.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }

    /// The inner connector, mutably.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Unwraps the inner connector.
    pub fn into_inner(self) -> C {
        self.inner
    }
}

impl<C, T> Service<T> for TlsConnector<C>
where
    C: Service<T>,
    C::Response: AsyncRead + AsyncWrite + Unpin,
    C::Error: Into<BoxError>,
    T: TlsTarget,
{
    type Response = TlsStream<C::Response>;
    type Error = BoxError;
    type Future = TlsConnectFuture<C::Future, C::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, target: T) -> Self::Future {
        let name = self
            .tls
            .server_name
            .clone()
            .or_else(|| target.server_name());
        let state = match name {
            Some(name) => State::Connecting {
                connect: self.inner.call(target),
                tls: Some((
                    tokio_rustls::TlsConnector::from(self.tls.config.clone()),
                    name,
                )),
            },
            None => State::Failed {
                error: Some(TlsError::no_server_name()),
            },
        };
        TlsConnectFuture { state }
    }
}

pin_project! {
    /// The future of [`TlsConnector`]'s calls: the inner connect, then the handshake.
    ///
    /// # Cancel safety
    ///
    /// Dropping it abandons the connect and leaks nothing: the inner connect's future
    /// is dropped (see its own cancel safety), or the handshake is, closing the
    /// connection it was made on (the server sees the connection close mid-handshake).
    pub struct TlsConnectFuture<F, IO> {
        #[pin]
        state: State<F, IO>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, IO> {
        Connecting {
            #[pin]
            connect: F,
            tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
        },
        Handshaking {
            handshake: tokio_rustls::Connect<IO>,
            name: ServerName<'static>,
        },
        Failed {
            error: Option<TlsError>,
        },
    }
}

impl<F, IO> fmt::Debug for TlsConnectFuture<F, IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Connecting { .. } => "connecting",
            State::Handshaking { .. } => "handshaking",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("TlsConnectFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, IO, E> Future for TlsConnectFuture<F, IO>
where
    F: Future<Output = Result<IO, E>>,
    E: Into<BoxError>,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<TlsStream<IO>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Connecting { connect, tls } => {
                    let io = ready!(connect.poll(cx)).map_err(Into::into)?;
                    let (connector, name) = tls.take().expect("polled after completion");
                    let handshake = connector.connect(name.clone(), io);
                    state.set(State::Handshaking { handshake, name });
                }
                StateProj::Handshaking { handshake, name } => {
                    return Poll::Ready(
                        ready!(Pin::new(handshake).poll(cx))
                            .map_err(|e| TlsError::handshake(name.to_str().into_owned(), e).into()),
                    );
                }
                StateProj::Failed { error } => {
                    let e = error.take().expect("polled after completion");
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_targets() {
        let name = |s: &str| host_name(s).map(|n| n.to_str().into_owned());
        assert_eq!(name("example.com:443").as_deref(), Some("example.com"));
        assert_eq!(name("example.com").as_deref(), Some("example.com"));
        assert_eq!(name("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(name("[::1]:443").as_deref(), Some("::1"));
        assert_eq!(name("::1").as_deref(), Some("::1"));
        assert_eq!(name("not a name:1"), None);
        let addr: SocketAddr = "10.1.2.3:443".parse().unwrap();
        assert_eq!(
            addr.server_name()
                .map(|n| n.to_str().into_owned())
                .as_deref(),
            Some("10.1.2.3")
        );
    }
}
