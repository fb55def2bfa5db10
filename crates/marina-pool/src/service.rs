//! `PoolService`: request-level service over a pool of services.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use marina_core::{BoxError, NotSent};
use tower::load::Load;
use tower_service::Service;

use crate::{ConnectRetry, Pool};

/// A `Service<Req>` over a pool whose items are themselves `Service<Req>` (a line
/// protocol client, a tower wrapper around hyper's `SendRequest`): each call checks a
/// client out, calls it, and returns it once the response future completes. For
/// protocols whose response body streams after the response future completes (HTTP/1),
/// the client goes back while the body may still be arriving: the next user's
/// `poll_ready` then waits for it.
///
/// A client whose `poll_ready` or call fails, or whose call is cancelled before its
/// response arrives (the request future dropped mid-way), is closed rather than reused:
/// it may be in the middle of the protocol.
///
/// Implements [`tower::load::Load`] with the number of requests in flight, so any load
/// balancer (tower's p2c, marina-balance) can use it as an endpoint.
///
/// Its checkouts do not retry failed connects, whatever
/// [`Config::connect_retry`](crate::Config::connect_retry) says: a refused connect fails
/// the request at once, so the balancer above can send it to another backend without
/// delay (the `marina` stack's endpoints are `PoolService`s). Over a single backend,
/// call [`Pool::get`] yourself to have connects retried through a restart.
///
/// Errors are [`BoxError`]s. When the request never reached a client — the checkout
/// failed (a [`PoolError`](crate::PoolError): connect refused, acquire timeout, pool
/// closed) or the checked-out client's `poll_ready` failed — the error is marked
/// [`NotSent`] (wrapping the original) and carries the request back
/// ([`NotSent::with_request`]: take it with [`marina_core::take_unsent_request`]), so a
/// balancer may fail over to another endpoint safely, without having copied the
/// request (marina-balance's `failover_unsent`); reach the `PoolError` with
/// [`marina_core::find`]. Errors from the client's
/// call are passed on as they are: the request may have been sent.
///
/// # Sharing
///
/// `Clone`, and cheap to clone (two `Arc`s): clones share the pool and the count of
/// requests in flight, so [`Load`] and [`in_flight`](Self::in_flight) count every
/// clone's requests. It is `Send + Sync` and always ready (the wait for a client is in
/// the call), so it needs no `Buffer`: clone it into each task. It holds a [`Pool`]
/// handle, which keeps the pool open while any clone lives.
///
/// # Examples
///
/// ```
/// use marina_pool::{Pool, PoolService};
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// // A "connector" whose connections are services (here: trivial in-memory ones).
/// let connector = service_fn(|_target: &'static str| async {
///     Ok::<_, std::io::Error>(service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req * 2) }))
/// });
/// let pool = Pool::builder().max_size(2).build(connector, "memory")?;
/// let mut svc = PoolService::new(pool.clone());
/// assert_eq!(svc.ready().await?.call(21).await?, 42);
/// assert_eq!(pool.stats().idle, 1); // the client went back to the pool
/// # Ok(()) }
/// ```
pub struct PoolService<C, T>
where
    C: Service<T>,
{
    pool: Pool<C, T>,
    in_flight: Arc<AtomicUsize>,
}

impl<C, T> PoolService<C, T>
where
    C: Service<T>,
{
    /// Serves requests through clients checked out of `pool`.
    pub fn new(pool: Pool<C, T>) -> Self {
        PoolService {
            pool,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The pool behind this service.
    pub fn pool(&self) -> &Pool<C, T> {
        &self.pool
    }

    /// Requests in flight now (the [`Load`] metric).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

impl<C, T> Clone for PoolService<C, T>
where
    C: Service<T>,
{
    fn clone(&self) -> Self {
        PoolService {
            pool: self.pool.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

impl<C, T> fmt::Debug for PoolService<C, T>
where
    C: Service<T>,
    T: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolService")
            .field("pool", &self.pool)
            .field("in_flight", &self.in_flight.load(Relaxed))
            .finish()
    }
}

impl<C, T> Load for PoolService<C, T>
where
    C: Service<T>,
{
    type Metric = usize;

    fn load(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl<C, T, Req> Service<Req> for PoolService<C, T>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Service<Req> + Send + 'static,
    <C::Response as Service<Req>>::Error: Into<BoxError>,
    <C::Response as Service<Req>>::Future: Send,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + fmt::Debug + Send + Sync + 'static,
    Req: Send + 'static,
{
    type Response = <C::Response as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<Self::Response>;

    /// Always ready: the checkout (and its wait) happens in the call, bounded by the
    /// pool's `acquire_timeout`.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.in_flight.fetch_add(1, Relaxed);
        let guard = InFlight(self.in_flight.clone());
        let pool = self.pool.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let _guard = guard;
                // No connect retries: a balancer fails over to another backend at once.
                // Not sent: the request goes back with the error, so a balancer can
                // send it elsewhere without having copied it.
                let mut conn = match pool.checkout(ConnectRetry::Off).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(NotSent::with_request(e, req).into()),
                };
                // Broken until proven otherwise: if this future is dropped before the
                // response arrives, the client is closed, not reused mid-protocol.
                conn.mark_broken();
                if let Err(e) = poll_fn(|cx| conn.poll_ready(cx)).await {
                    return Err(NotSent::with_request(e, req).into());
                }
                let resp = conn.call(req).await.map_err(Into::into)?;
                conn.mark_healthy();
                Ok(resp)
            }),
        }
    }
}

/// The future of [`PoolService`]'s calls.
///
/// # Cancel safety
///
/// Dropping it before it completes is safe and leaks nothing. While it waits for a
/// client it is like dropping [`Pool::get`]'s future, and the request is dropped
/// unsent; once it holds a client, that client is closed rather than reused (it may be
/// mid-protocol).
pub struct ResponseFuture<R> {
    inner: Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>,
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
