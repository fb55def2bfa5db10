//! Connectors that know their connections: [`Manage`] and [`Managed`].

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use marina_core::BoxError;
use tower_service::Service;

use crate::error::ConnectTimeout;

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connector that knows the connections it makes: how to open one, how to tell that
/// one is broken, how to check one before it is reused, and which connect errors are
/// worth retrying. Write it once for a client type, and every pool of that connector
/// hands out only live clients, with no per-pool hook.
///
/// Wrap it in [`Managed`] to build a pool: `builder.build(Managed::new(manager), target)`.
///
/// A plain `tower::Service<T>` connector (a closure through `service_fn`, a
/// [`TcpConnector`](crate::TcpConnector)) keeps working without this trait; the pool
/// then checks socket state for the stream types it knows (`TcpStream`, `UnixStream`)
/// and nothing for other types. A pooled item that is not a socket — a database client
/// that owns its socket in a background task, say — needs a `Manage` (or a
/// [`Builder::check`](crate::Builder::check) on each pool): else the pool cannot know
/// that a client died with its server.
///
/// The crate's `postgres` and `redis` features implement it for `tokio-postgres` and
/// `redis`: see the `marina_pool::postgres` and `marina_pool::redis` modules.
///
/// # Examples
///
/// A client that remembers when its connection ended:
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use marina_pool::{Manage, Managed, Pool};
///
/// struct Client { closed: Arc<AtomicBool> }
///
/// struct Connector;
///
/// impl Manage<&'static str> for Connector {
///     type Conn = Client;
///     type Error = std::io::Error;
///
///     async fn connect(&self, _target: &&'static str) -> Result<Client, std::io::Error> {
///         Ok(Client { closed: Arc::new(AtomicBool::new(false)) })
///     }
///
///     // Cheap and synchronous: run at every checkout of an idle client.
///     fn is_broken(&self, client: &mut Client) -> bool {
///         client.closed.load(Ordering::Relaxed)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_pool::PoolError> {
/// let pool = Pool::builder().max_size(4).build(Managed::new(Connector), "memory")?;
/// let client = pool.get().await?;
/// let (id, closed) = (client.id(), client.closed.clone());
/// drop(client);
/// closed.store(true, Ordering::Relaxed); // its connection ends while it is idle
/// let client = pool.get().await?;
/// assert_ne!(client.id(), id); // the dead one was closed, a new one opened
/// assert_eq!(pool.stats().destroyed, 1);
/// # Ok(()) }
/// ```
pub trait Manage<T>: Send + Sync + 'static {
    /// What [`connect`](Self::connect) makes: the pooled item.
    type Conn: Send + 'static;
    /// Why a connect (or a [`recycle`](Self::recycle)) failed.
    type Error: Error + Send + Sync + 'static;

    /// Opens a connection to `target`. The pool bounds it by its `connect_timeout`.
    ///
    /// # Cancel safety
    ///
    /// The pool drops this future when its `connect_timeout` passes or the checkout
    /// waiting for it is dropped: dropped, it should leave nothing behind — no half-open
    /// socket, no task spawned for a connection that was never returned.
    fn connect(&self, target: &T) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// True when `conn` is known to be unusable: its connection closed, a protocol
    /// error left it out of step. Run on an idle connection at every checkout (and by
    /// the background health check), so it must be cheap and must not do I/O on the
    /// wire; like bb8's `has_broken` or a client's `is_closed()`.
    ///
    /// The default checks socket state for `TcpStream` and `UnixStream` items (see
    /// [`socket_is_open`](crate::socket_is_open)) and says `false` for anything else.
    fn is_broken(&self, conn: &mut Self::Conn) -> bool {
        !crate::check::socket_check(conn)
    }

    /// An optional asynchronous check (or reset) of an idle connection before it is
    /// handed out again, like deadpool's `recycle`: a ping, a `DISCARD ALL`. Return
    /// `None` (the default) when there is nothing to do; the checkout then stays on its
    /// fast path. A connection whose future fails, or outlasts the pool's
    /// `health_check_timeout`, is closed and the checkout goes on with another one.
    ///
    /// It runs only on reused connections (not on one just opened), after
    /// [`is_broken`](Self::is_broken) said `false`, and costs a round trip per checkout
    /// if it does I/O: prefer `is_broken` where the client can tell.
    ///
    /// # Cancel safety
    ///
    /// The pool drops this future when `health_check_timeout` or the checkout's
    /// `acquire_timeout` passes, or the checkout is dropped; the connection is then
    /// closed, not reused, so a recycle dropped half-way need not leave it usable.
    fn recycle(
        &self,
        conn: &mut Self::Conn,
    ) -> Option<impl Future<Output = Result<(), Self::Error>> + Send> {
        let _ = conn;
        None::<std::future::Ready<Result<(), Self::Error>>>
    }

    /// True when a failed connect is worth retrying (the server is restarting, the
    /// network blinked); false when it will fail the same way again (a wrong password,
    /// an unknown database), in which case [`Pool::get`](crate::Pool::get) returns it at
    /// once. See [`ConnectRetry`](crate::ConnectRetry).
    ///
    /// The default is [`is_transient`](crate::is_transient): an I/O error of a
    /// transient kind anywhere in the error's source chain.
    fn is_transient(&self, error: &Self::Error) -> bool {
        is_transient(error)
    }
}

/// True when `error`, or an error in its [`source`](Error::source) chain, says a connect
/// may succeed if tried again: an [`io::Error`] of kind `ConnectionRefused`,
/// `ConnectionReset`, `ConnectionAborted` or `TimedOut`, or the pool's own
/// [`ConnectTimeout`]. Anything else counts as permanent.
///
/// The default of [`Manage::is_transient`], and what a pool uses for a plain
/// `Service` connector.
///
/// # Examples
///
/// ```
/// use std::io::{Error, ErrorKind};
/// use marina_pool::is_transient;
///
/// assert!(is_transient(&Error::from(ErrorKind::ConnectionRefused)));
/// assert!(!is_transient(&Error::from(ErrorKind::PermissionDenied)));
/// // Found through a wrapper's source chain too.
/// let wrapped = Error::other(Error::from(ErrorKind::ConnectionReset));
/// assert!(is_transient(&wrapped));
/// ```
pub fn is_transient(error: &(dyn Error + 'static)) -> bool {
    // A stack, not a chain: an `io::Error` wrapping another error hides it from
    // `source()` (which skips to the wrapped error's own source), so both are followed.
    let mut todo = vec![error];
    let mut seen = 0;
    while let Some(e) = todo.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        if e.is::<ConnectTimeout>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            use io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut
            ) {
                return true;
            }
            if let Some(inner) = io.get_ref() {
                todo.push(inner);
            }
        }
        todo.extend(e.source());
    }
    false
}

/// What a pool needs of a [`Manage`] once the target type is gone: the checkout hooks.
pub(crate) trait Hooks<X>: Send + Sync {
    fn is_broken(&self, conn: &mut X) -> bool;
    fn recycle<'a>(&'a self, conn: &'a mut X) -> Option<BoxFuture<'a, Result<(), BoxError>>>;
    fn is_transient(&self, error: &(dyn Error + 'static)) -> bool;
}

/// A [`Manage`] with its types erased, as [`Managed`] holds it.
trait Connect<X, T>: Hooks<X> {
    fn connect(self: Arc<Self>, target: T) -> BoxFuture<'static, Result<X, BoxError>>;
    fn hooks(self: Arc<Self>) -> Arc<dyn Hooks<X>>;
}

struct Erased<M, T>(M, PhantomData<fn(T)>);

impl<M, T> Hooks<M::Conn> for Erased<M, T>
where
    M: Manage<T>,
    T: 'static,
{
    fn is_broken(&self, conn: &mut M::Conn) -> bool {
        self.0.is_broken(conn)
    }

    fn recycle<'a>(&'a self, conn: &'a mut M::Conn) -> Option<BoxFuture<'a, Result<(), BoxError>>> {
        let fut = self.0.recycle(conn)?;
        Some(Box::pin(async move { fut.await.map_err(BoxError::from) }))
    }

    fn is_transient(&self, error: &(dyn Error + 'static)) -> bool {
        match error.downcast_ref::<M::Error>() {
            Some(e) => self.0.is_transient(e),
            None => is_transient(error),
        }
    }
}

impl<M, T> Connect<M::Conn, T> for Erased<M, T>
where
    M: Manage<T>,
    T: Send + Sync + 'static,
{
    fn connect(self: Arc<Self>, target: T) -> BoxFuture<'static, Result<M::Conn, BoxError>> {
        Box::pin(async move {
            let this = self;
            this.0.connect(&target).await.map_err(BoxError::from)
        })
    }

    fn hooks(self: Arc<Self>) -> Arc<dyn Hooks<M::Conn>> {
        self
    }
}

/// A [`Manage`] as a pool's connector: a cheap, `Clone`able `Service<T>` whose
/// connections are `X`. A pool built over a `Managed` connector uses its
/// [`is_broken`](Manage::is_broken) at every checkout, its [`recycle`](Manage::recycle)
/// before reuse and its [`is_transient`](Manage::is_transient) to decide which connect
/// failures to retry — in every pool of it, [`KeyedPool`](crate::KeyedPool)s included.
///
/// Its type names only the connection and the target, so a pool of it is easy to
/// name: `Pool<Managed<Client, Config>, Config>`.
///
/// # Sharing
///
/// `Clone`, and cheap to clone (one `Arc`): clones share the one manager, so every
/// pool built over a clone (a [`KeyedPool`](crate::KeyedPool)'s per-target pools
/// included) uses the same `Manage` value. `Send + Sync`, always ready.
///
/// # Examples
///
/// See [`Manage`].
pub struct Managed<X, T> {
    inner: Arc<dyn Connect<X, T>>,
}

impl<X, T> Managed<X, T>
where
    X: Send + 'static,
    T: Send + Sync + 'static,
{
    /// Wraps `manager` for use as a pool's connector.
    pub fn new<M>(manager: M) -> Self
    where
        M: Manage<T, Conn = X>,
    {
        Managed {
            inner: Arc::new(Erased(manager, PhantomData)),
        }
    }

    /// The checkout hooks, for the pool.
    pub(crate) fn hooks(&self) -> Arc<dyn Hooks<X>> {
        self.inner.clone().hooks()
    }
}

impl<X, T> Clone for Managed<X, T> {
    fn clone(&self) -> Self {
        Managed {
            inner: self.inner.clone(),
        }
    }
}

impl<X, T> fmt::Debug for Managed<X, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("conn", &std::any::type_name::<X>())
            .finish_non_exhaustive()
    }
}

impl<X, T> Service<T> for Managed<X, T> {
    type Response = X;
    type Error = BoxError;
    type Future = ManagedFuture<X>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: T) -> Self::Future {
        ManagedFuture {
            inner: self.inner.clone().connect(target),
        }
    }
}

/// The future of a [`Managed`] connector's calls: a connect in progress.
///
/// # Cancel safety
///
/// Dropping it drops the [`Manage::connect`] future in progress, and leaves behind
/// only what that future leaves when dropped (see its cancel safety).
pub struct ManagedFuture<X> {
    inner: BoxFuture<'static, Result<X, BoxError>>,
}

impl<X> fmt::Debug for ManagedFuture<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedFuture").finish_non_exhaustive()
    }
}

impl<X> Future for ManagedFuture<X> {
    type Output = Result<X, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
