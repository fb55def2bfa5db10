//! The default liveness check: socket state, without I/O on the wire.

use std::any::Any;
use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::core::CheckFn;

/// Checks a socket without reading from the connection: a non-blocking `MSG_PEEK` of one
/// byte. `false` when the peer closed it (EOF), reset it (an error), or sent bytes nobody
/// asked for (a reply left unread by the last user would be read by the next one).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// let (server, _) = listener.accept().await?;
/// assert!(marina_pool::socket_is_open(&client));
/// drop(server);
/// # tokio::task::yield_now().await;
/// # let mut n = 0;
/// # while marina_pool::socket_is_open(&client) && n < 1000 { tokio::task::yield_now().await; n += 1; }
/// assert!(!marina_pool::socket_is_open(&client)); // the peer's FIN is seen
/// # Ok(()) }
/// ```
pub fn socket_is_open(stream: &TcpStream) -> bool {
    peek_open(socket2::SockRef::from(stream))
}

fn peek_open(sock: socket2::SockRef<'_>) -> bool {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    match sock.peek(&mut buf) {
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

/// The check a pool uses unless [`Builder::check`](crate::Builder::check) replaces it:
/// a socket-state check for the socket types it knows (`TcpStream`, `UnixStream`, TLS
/// over TCP with the `tls` feature, and these in hyper-util's `TokioIo` with the
/// `hyper` feature), `None` (nothing to run) for other connection types.
pub(crate) fn default_check<X: 'static>() -> Option<CheckFn<X>> {
    use std::any::TypeId;
    let id = TypeId::of::<X>();
    let mut known = id == TypeId::of::<TcpStream>();
    #[cfg(unix)]
    {
        known |= id == TypeId::of::<tokio::net::UnixStream>();
    }
    #[cfg(feature = "hyper")]
    {
        use hyper_util::rt::TokioIo;
        known |= id == TypeId::of::<TokioIo<TcpStream>>();
        #[cfg(unix)]
        {
            known |= id == TypeId::of::<TokioIo<tokio::net::UnixStream>>();
        }
    }
    #[cfg(feature = "tls")]
    {
        known |= id == TypeId::of::<crate::tls::TlsStream<TcpStream>>();
        #[cfg(feature = "hyper")]
        {
            known |=
                id == TypeId::of::<hyper_util::rt::TokioIo<crate::tls::TlsStream<TcpStream>>>();
        }
    }
    known.then(|| Arc::new(socket_check::<X>) as CheckFn<X>)
}

pub(crate) fn socket_check<X: 'static>(conn: &mut X) -> bool {
    let any: &mut dyn Any = conn;
    if let Some(s) = any.downcast_ref::<TcpStream>() {
        return socket_is_open(s);
    }
    #[cfg(feature = "tls")]
    {
        if let Some(s) = any.downcast_mut::<crate::tls::TlsStream<TcpStream>>() {
            return crate::tls::is_open(s);
        }
        #[cfg(feature = "hyper")]
        if let Some(s) =
            any.downcast_mut::<hyper_util::rt::TokioIo<crate::tls::TlsStream<TcpStream>>>()
        {
            return crate::tls::is_open(s.inner_mut());
        }
    }
    #[cfg(unix)]
    if let Some(s) = any.downcast_ref::<tokio::net::UnixStream>() {
        return peek_open(socket2::SockRef::from(s));
    }
    #[cfg(feature = "hyper")]
    {
        use hyper_util::rt::TokioIo;
        if let Some(s) = any.downcast_ref::<TokioIo<TcpStream>>() {
            return socket_is_open(s.inner());
        }
        #[cfg(unix)]
        if let Some(s) = any.downcast_ref::<TokioIo<tokio::net::UnixStream>>() {
            return peek_open(socket2::SockRef::from(s.inner()));
        }
    }
    true
}
