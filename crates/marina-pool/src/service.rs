//! `PoolService`: request-level service over a pool of services.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use marina_core::{BoxError, NotSent, PolledAfterCompletion};
use pin_project_lite::pin_project;
use tower::load::Load;
use tower_service::Service;

use crate::core::HeldSlot;
use crate::pool::{Checked, Reserve, SlowCheckout};
use crate::sync::lock_std;
use crate::{Connector, Pool, PoolError, Pooled, Target};

/// A `Service<Req>` over a pool whose items are themselves `Service<Req>` (a line
/// protocol client, a tower wrapper around hyper's `SendRequest`): `poll_ready` checks
/// a client out and keeps it for the next call, `call` sends the request through it,
/// and the client goes back to the pool once the response future completes. For
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
/// # Readiness
///
/// `poll_ready` reserves for the next call what the pool has free: an idle client
/// (checked out, and its own `poll_ready` ready), or, in a pool with room, a free slot
/// that the call connects in. `call` then sends through the reserved client at once,
/// with no checkout and no allocation of its own.
///
/// When the pool is saturated — every connection in use, no room for another — what
/// happens depends on the service:
///
/// - By default `poll_ready` is `Ready` anyway, and the call waits for a connection in
///   the pool's FIFO queue (bounded by `acquire_timeout`), as it always did. Sticky
///   sessions and consistent hashing need this: a balancer moves the requests of an
///   endpoint that is not ready to another one, and a request should rather wait for
///   its busy backend than leave it.
/// - With [`pending_when_saturated`](Self::pending_when_saturated), `poll_ready` waits
///   instead: `Pending`, in the pool's FIFO queue like a [`Pool::get`], and woken when a
///   connection or a slot is freed for it. A balancer above then sees a saturated pool
///   as an endpoint that is not ready, routes around it, and comes back when it has a
///   connection to give.
///
/// Either way `poll_ready` is also `Pending` while the connector's
/// [`recycle`](crate::Manage::recycle) runs on the idle client it reserves, or while
/// the reserved client's own `poll_ready` is pending.
///
/// It never returns an error. A wait that ends without a client (`acquire_timeout`
/// reached, pool closed) or a client whose `poll_ready` fails makes it `Ready`, and the
/// next `call` fails at once with that error, marked [`NotSent`] and carrying its
/// request (see below); the one after checks out afresh. A connect, made by the call
/// that uses a reserved slot, fails that call the same way, as does a wait in the call.
/// (A `poll_ready` error would tell a balancer that the endpoint is gone for good, and
/// it would drop it.)
///
/// The checks a checkout runs on an idle connection before handing it out — expiry,
/// then the liveness check (socket state, or the connector's
/// [`Manage::is_broken`](crate::Manage::is_broken)) — run on a reserved client when the
/// call uses it, once per request as before: a client that died while it was reserved
/// (its peer closed it, say) is closed then, and the request goes through a connection
/// opened in its slot, never through the dead one. Each `poll_ready` on a service that
/// holds a client polls the client's own `poll_ready` again.
///
/// A reserved client is checked out: [`PoolStats::active`](crate::PoolStats::active)
/// counts it (and [`PoolStats::connecting`](crate::PoolStats::connecting) a reserved
/// slot), and no one else can use it until the service is called or dropped. Dropping
/// the service — one made ready and never called, too — returns what it reserved to
/// the pool, and withdraws it from the pool's queue if it was waiting.
///
/// [`Pool::close`] does not wait for what a service holds for its next call: it takes
/// it back, at once, though no one polls or calls the service again (a balancer keeps
/// its ready endpoints without calling them). A reserved client is closed, a reserved
/// slot freed, a checkout waiting in `poll_ready` withdrawn and its task woken; the
/// service's next `poll_ready` is `Ready`, and its next call fails with
/// [`PoolError::Closed`](crate::PoolError::Closed), not sent, carrying its request. A
/// call already made is in use: `close()` waits for its client to come back. (For
/// this the pool keeps a weak reference to each service's reservation, taken when the
/// service is made or cloned; `poll_ready` and `call` each take the reservation's
/// uncontended spin lock — a compare-and-swap and a store — which `close()` only
/// tries, never waiting on the service.)
///
/// Calling it without a `Ready` from `poll_ready` first breaks the `Service` contract,
/// but works: the checkout then happens in the response future, as in a [`Pool::get`].
///
/// ```
/// use std::future::poll_fn;
/// use marina_pool::{Pool, PoolService};
/// use tower::{Service, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// # let connector = service_fn(|_target: &'static str| async {
/// #     Ok::<_, std::io::Error>(service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req * 2) }))
/// # });
/// let pool = Pool::builder().max_size(1).build(connector, "memory")?;
/// let held = pool.get().await?; // the pool's only connection
/// let mut svc = PoolService::new(pool.clone()).pending_when_saturated();
/// let mut ready = tokio_test::task::spawn(poll_fn(|cx| svc.poll_ready(cx)));
/// assert!(ready.poll().is_pending()); // saturated: not ready
/// drop(held);
/// assert!(ready.is_woken()); // the freed connection went to `svc`
/// assert!(ready.poll().is_ready());
/// drop(ready);
/// assert_eq!(pool.stats().active, 1); // reserved for svc's next call
/// drop(svc);
/// assert_eq!(pool.stats().idle, 1); // given back
/// # Ok(()) }
/// ```
///
/// # Cancel safety
///
/// Dropping the service at any point leaves nothing behind: a queued checkout is
/// withdrawn, a recycle in progress dropped (its client closed), a reserved client
/// returned to the pool, a reserved slot freed. A `poll_ready` that returned `Pending`
/// keeps its place in the pool's queue until the next `poll_ready`, `call` or drop.
/// Dropping a [`ResponseFuture`] closes its client (see there).
///
/// # Sharing
///
/// `Clone`, and cheap to clone (two `Arc`s cloned, one allocated for its reservation,
/// which it registers with the pool for [`Pool::close`]): clones share the pool and the
/// count of requests in flight, so [`Load`] and [`in_flight`](Self::in_flight) count
/// every clone's requests. A clone does not share the reservation: it starts with
/// nothing reserved and reserves its own client in its own `poll_ready` (it keeps
/// [`pending_when_saturated`](Self::pending_when_saturated)). It is `Send + Sync`,
/// so it needs no `Buffer`: clone it into each task. It holds a [`Pool`] handle, which
/// keeps the pool open while any clone lives.
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
    /// What `poll_ready` got ready for the next call, in a cell the pool can reach too
    /// (it holds a weak reference, taken when the service was made): closing the pool
    /// takes back what the cell holds ([`Reservations::reclaim`]).
    reserved: Arc<ReservedCell<C::Response>>,
    /// `poll_ready` waits in the pool's queue when nothing is free.
    pending_when_saturated: bool,
}

/// A [`PoolService`]'s reservation, shared with its pool's [`Reservations`].
///
/// A spin lock: the service takes it for each `poll_ready` and `call` (never
/// contended but by a closing pool: an uncontended compare-and-swap and a store, no
/// poisoning), and a closing pool only tries it ([`Reservations::reclaim`]), holding it
/// for a `mem::replace`, so neither side ever waits long: the service's critical
/// sections may run user code (the client's `poll_ready`, the liveness check), which
/// the pool never waits for.
pub(crate) struct ReservedCell<X> {
    held: spin::mutex::SpinMutex<Held<X>>,
}

/// What a [`ReservedCell`] guards.
struct Held<X> {
    reserved: Reserved<X>,
    /// The task whose `poll_ready` last returned `Pending`: woken when closing the pool
    /// takes what it waited on (a queued checkout, a client not ready).
    waker: Option<Waker>,
}

impl<X> ReservedCell<X> {
    fn new() -> Self {
        ReservedCell {
            held: spin::mutex::SpinMutex::new(Held {
                reserved: Reserved::Nothing,
                waker: None,
            }),
        }
    }
}

/// The reservation cells of a pool's [`PoolService`]s (weak references, one per
/// service and clone, taken when it is made): what [`Pool::close`] walks to take back
/// what the services hold for their next call. Not touched on the request path.
pub(crate) struct Reservations<X> {
    cells: std::sync::Mutex<Vec<Weak<ReservedCell<X>>>>,
}

impl<X> Default for Reservations<X> {
    fn default() -> Self {
        Reservations {
            cells: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<X> Reservations<X> {
    /// Registers a new service's cell. The references of dropped services are pruned
    /// whenever the list would grow, so it stays within twice the live services.
    fn register(&self, cell: &Arc<ReservedCell<X>>) {
        let mut cells = lock_std(&self.cells);
        if cells.len() == cells.capacity() {
            cells.retain(|w| w.strong_count() > 0);
        }
        cells.push(Arc::downgrade(cell));
    }

    /// Takes back what every live service holds for its next call (a client, a slot,
    /// a checkout in progress): dropped, so a connection is closed (the pool is closed)
    /// and a slot freed; the service's next call fails with [`PoolError::Closed`], not
    /// sent, and a task waiting in its `poll_ready` is woken. Call it after the pool
    /// was marked closed, so that a service polled afterwards reserves nothing more.
    ///
    /// Returns how many cells were busy (a `poll_ready` or `call` running on another
    /// thread): try again later for those (the pool does not wait for user code).
    pub(crate) fn reclaim(&self) -> usize {
        let cells: Vec<Arc<ReservedCell<X>>> = {
            let mut cells = lock_std(&self.cells);
            cells.retain(|w| w.strong_count() > 0);
            cells.iter().filter_map(Weak::upgrade).collect()
        };
        let mut busy = 0;
        for cell in &cells {
            let Some(mut held) = cell.held.try_lock() else {
                busy += 1;
                continue;
            };
            if !matches!(
                held.reserved,
                Reserved::Checkout(_) | Reserved::Slot(_) | Reserved::Client { .. }
            ) {
                continue;
            }
            let taken = std::mem::replace(
                &mut held.reserved,
                Reserved::Failed(PoolError::Closed.into()),
            );
            let waker = held.waker.take();
            drop(held);
            // Outside the lock: closing a connection runs user code (its `Drop`).
            drop(taken);
            if let Some(w) = waker {
                w.wake();
            }
        }
        // The last reference to a service dropped meanwhile drops its cell here.
        drop(cells);
        busy
    }
}

/// What a [`PoolService`] holds between `poll_ready` and `call`.
enum Reserved<X> {
    /// Nothing: the next `poll_ready` starts a checkout.
    Nothing,
    /// A checkout waiting in the pool's queue (or for the connector's `recycle`).
    Checkout(Reserve<X>),
    /// A free slot: the call connects in it.
    Slot(HeldSlot<X>),
    /// Nothing was free (and `poll_ready` does not wait): the call waits for a client.
    Busy,
    /// A client checked out for the next call; `ready` once its own `poll_ready` said
    /// so. Its liveness check runs when the call uses it.
    Client { conn: Pooled<X>, ready: bool },
    /// The checkout, or the client's `poll_ready`, failed: the next call fails with it,
    /// not sent, and gives its request back.
    Failed(BoxError),
}

impl<X> Reserved<X> {
    fn name(&self) -> &'static str {
        match self {
            Reserved::Nothing => "nothing",
            Reserved::Checkout(_) => "checking out",
            Reserved::Slot(_) => "a slot to connect in",
            Reserved::Busy => "nothing (the pool is saturated)",
            Reserved::Client { ready: true, .. } => "a ready client",
            Reserved::Client { ready: false, .. } => "a client not ready yet",
            Reserved::Failed(_) => "a failure for the next call",
        }
    }
}

impl<C, T> PoolService<C, T>
where
    C: Service<T>,
{
    /// Serves requests through clients checked out of `pool`.
    pub fn new(pool: Pool<C, T>) -> Self {
        let reserved = Arc::new(ReservedCell::new());
        pool.reservations().register(&reserved);
        PoolService {
            pool,
            in_flight: Arc::new(AtomicUsize::new(0)),
            reserved,
            pending_when_saturated: false,
        }
    }

    /// Makes `poll_ready` wait while the pool is saturated: `Pending`, in the pool's
    /// FIFO queue like a [`Pool::get`], until a connection or a slot is freed for it.
    /// A balancer above then sees a saturated pool as an endpoint that is not ready and
    /// routes around it. (By default `poll_ready` is `Ready` then, and the call waits
    /// for a connection.) See [Readiness](#readiness).
    pub fn pending_when_saturated(mut self) -> Self {
        self.pending_when_saturated = true;
        self
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

/// A clone shares the pool and the count of requests in flight, not the reservation:
/// it starts with nothing reserved.
impl<C, T> Clone for PoolService<C, T>
where
    C: Service<T>,
{
    fn clone(&self) -> Self {
        let reserved = Arc::new(ReservedCell::new());
        self.pool.reservations().register(&reserved);
        PoolService {
            pool: self.pool.clone(),
            in_flight: self.in_flight.clone(),
            reserved,
            pending_when_saturated: self.pending_when_saturated,
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
            .field(
                "reserved",
                // Not waiting for a close that is taking it back.
                &self
                    .reserved
                    .held
                    .try_lock()
                    .map_or("being taken back", |h| h.reserved.name()),
            )
            .field("pending_when_saturated", &self.pending_when_saturated)
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

/// Counts a call in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl<C, T, Req> Service<Req> for PoolService<C, T>
where
    C: Connector<T>,
    C::Response: Service<Req>,
    <C::Response as Service<Req>>::Error: Into<BoxError>,
    T: Target,
    Req: Send + 'static,
{
    type Response = <C::Response as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<C, T, Req>;

    /// Reserves a client for the next call: `Ready` once one is checked out and its own
    /// `poll_ready` is ready, `Pending` while the pool has none to give (or the client
    /// is not ready). Never an error: a failed checkout fails the next call instead.
    /// See the type's docs.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut held = self.reserved.held.lock();
        let poll = poll_reserved(
            &self.pool,
            &mut held.reserved,
            self.pending_when_saturated,
            cx,
        );
        if poll.is_pending() {
            // Woken if closing the pool takes what it waits on.
            set_waker(&mut held.waker, cx);
        }
        poll
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let in_flight = Some(InFlight::start(&self.in_flight));
        let mut held = self.reserved.held.lock();
        // The common case: a ready client, checked now, once per request. Taken out of
        // the cell: from here on it is in use, and closing the pool waits for it rather
        // than taking it back.
        if matches!(held.reserved, Reserved::Client { ready: true, .. }) && !self.pool.is_shut() {
            let Reserved::Client { mut conn, .. } =
                std::mem::replace(&mut held.reserved, Reserved::Nothing)
            else {
                unreachable!("matched above")
            };
            drop(held);
            if let Some(reason) = conn.recheck() {
                // It died while reserved: the future connects in its slot.
                let slot = conn.close_keeping_slot(reason);
                let fut = self.pool.connect_in_slot_owned(slot);
                return ResponseFuture::slow(
                    SlowCall::new(&self.pool).getting(fut),
                    req,
                    in_flight,
                );
            }
            // Broken until proven otherwise: if the response future is dropped before
            // the response arrives, the client is closed, not reused mid-protocol.
            conn.mark_broken();
            let fut = conn.call(req);
            let conn = Some(conn);
            let state = State::Called { fut, conn };
            return ResponseFuture { state, in_flight };
        }
        let reserved = std::mem::replace(&mut held.reserved, Reserved::Nothing);
        drop(held);
        self.call_unready(reserved, req, in_flight)
    }
}

/// [`PoolService::poll_ready`] on its reservation (its cell locked).
#[inline]
fn poll_reserved<C, T, Req>(
    pool: &Pool<C, T>,
    reserved: &mut Reserved<C::Response>,
    queue: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>>
where
    C: Connector<T>,
    C::Response: Service<Req>,
    <C::Response as Service<Req>>::Error: Into<BoxError>,
    T: Target,
{
    // The common case: a client reserved already, polled again.
    if let Reserved::Client { conn, ready } = reserved
        && !conn.is_broken()
        && !pool.is_shut()
    {
        return match poll_client(conn, ready, cx) {
            Poll::Ready(Err(e)) => {
                *reserved = Reserved::Failed(e);
                Poll::Ready(Ok(()))
            }
            other => other,
        };
    }
    loop {
        if matches!(reserved, Reserved::Client { .. } | Reserved::Slot(_)) && pool.is_shut() {
            // Closed meanwhile: give it back (it is closed), and fail the next call.
            *reserved = Reserved::Failed(PoolError::Closed.into());
        }
        match reserved {
            Reserved::Client { conn, .. } if conn.is_broken() => {
                // Its `poll_ready` panicked last time: closed (on drop), and
                // another one checked out.
                *reserved = Reserved::Nothing;
            }
            Reserved::Client { conn, ready } => {
                return match poll_client(conn, ready, cx) {
                    Poll::Ready(Err(e)) => {
                        *reserved = Reserved::Failed(e);
                        Poll::Ready(Ok(()))
                    }
                    other => other,
                };
            }
            // (Busy: polled again, maybe something was freed meanwhile.)
            Reserved::Nothing | Reserved::Busy => {
                // An idle client or a free slot; the liveness check and any connect
                // happen at the call. When nothing is free, waits in the pool's
                // queue, or leaves the wait to the call.
                let mut checkout = Reserve::new(queue);
                match checkout.poll(pool, cx) {
                    Poll::Ready(got) => {
                        *reserved = Reserved::got(got);
                        if matches!(reserved, Reserved::Busy) {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Poll::Pending => {
                        *reserved = Reserved::Checkout(checkout);
                        return Poll::Pending;
                    }
                }
            }
            Reserved::Checkout(checkout) => {
                let got = std::task::ready!(checkout.poll(pool, cx));
                *reserved = Reserved::got(got);
            }
            // Not a `poll_ready` error: that would tell a balancer the endpoint is
            // gone for good.
            Reserved::Slot(_) | Reserved::Failed(_) => return Poll::Ready(Ok(())),
        }
    }
}

/// Keeps the waker of a `poll_ready` that returned `Pending` (a clone only when the
/// task changed).
#[cold]
fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl<C, T> PoolService<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// [`call`](Service::call) with no ready client reserved.
    #[inline(never)]
    fn call_unready<Req>(
        &mut self,
        mut reserved: Reserved<C::Response>,
        req: Req,
        in_flight: Option<InFlight>,
    ) -> ResponseFuture<C, T, Req>
    where
        C::Response: Service<Req>,
        Req: Send + 'static,
    {
        if matches!(reserved, Reserved::Client { .. } | Reserved::Slot(_)) && self.pool.is_shut() {
            // Closed meanwhile: give it back (it is closed), and fail the call.
            reserved = Reserved::Failed(PoolError::Closed.into());
        }
        let new = || SlowCall::new(&self.pool);
        let slow = match reserved {
            // Not sent: the request goes back with the error, so a balancer can send
            // it elsewhere without having copied it.
            Reserved::Failed(e) => {
                let error = Some(NotSent::with_request(e, req).into());
                let state = State::Failed { error };
                return ResponseFuture { state, in_flight };
            }
            // A connect, in the slot reserved. No connect retries: a balancer fails
            // over to another backend at once.
            Reserved::Slot(slot) => new().getting(self.pool.connect_in_slot_owned(slot)),
            // Saturated: the call waits in the pool's queue.
            Reserved::Busy => new().getting(self.pool.checkout_owned()),
            // Called without a `Ready` from `poll_ready` first: the future gets the
            // client ready (checked, then its own `poll_ready`), or checks one out.
            Reserved::Client { mut conn, .. } => match conn.recheck() {
                None => new().with_client(conn),
                Some(reason) => {
                    let slot = conn.close_keeping_slot(reason);
                    new().getting(self.pool.connect_in_slot_owned(slot))
                }
            },
            Reserved::Checkout(reserve) => new().reserving(reserve),
            Reserved::Nothing => new().getting(self.pool.checkout_owned()),
        };
        ResponseFuture::slow(slow, req, in_flight)
    }
}

impl<C, T, Req> ResponseFuture<C, T, Req>
where
    C: Service<T>,
    C::Response: Service<Req>,
{
    fn slow(
        slow: SlowCall<C::Response, Pool<C, T>, Req>,
        req: Req,
        in_flight: Option<InFlight>,
    ) -> Self {
        let slow = Box::new(slow.request(req));
        ResponseFuture {
            state: State::Slow { slow },
            in_flight,
        }
    }
}

impl<X> Reserved<X> {
    /// What a finished checkout leaves reserved.
    #[inline]
    fn got(got: Result<Checked<X>, PoolError>) -> Self {
        match got {
            Ok(Checked::Conn(conn)) => Reserved::Client { conn, ready: false },
            Ok(Checked::Slot(slot)) => Reserved::Slot(slot),
            Ok(Checked::Busy) => Reserved::Busy,
            Err(e) => Reserved::Failed(e.into()),
        }
    }
}

pin_project! {
    /// The future of [`PoolService`]'s calls: the checked-out client's own future,
    /// which returns the client to the pool when it completes. Not boxed.
    ///
    /// # Cancel safety
    ///
    /// Dropping it before it completes is safe and leaks nothing. Once it holds a
    /// client, that client is closed rather than reused (it may be mid-protocol). If
    /// it has no client yet (its reserved client was found dead at the call, or the
    /// service was called without a `Ready` from `poll_ready` first), it checks one out
    /// itself; dropped while it waits for one, it is like dropping [`Pool::get`]'s
    /// future, and the request is dropped unsent.
    pub struct ResponseFuture<C, T, Req>
    where
        C: Service<T>,
        C::Response: Service<Req>,
    {
        #[pin]
        state: CallState<C, T, Req>,
        // Taken when it completes.
        in_flight: Option<InFlight>,
    }
}

pin_project! {
    /// Where a [`ResponseFuture`] is. `X`: the pooled client; `F`: its future; `P`:
    /// the pool, for a call that has to check a client out.
    #[project = StateProj]
    enum State<X, F, P, Req> {
        /// The client's call is in flight.
        Called {
            #[pin]
            fut: F,
            conn: Option<Pooled<X>>,
        },
        /// Failed before sending; the error carries the request.
        Failed { error: Option<BoxError> },
        /// Not called yet, for want of a ready client (rare: boxed, so that the
        /// common future, which every layer above moves, stays small).
        Slow { slow: Box<SlowCall<X, P, Req>> },
    }
}

/// The [`State`] of a [`PoolService`]'s call.
type CallState<C, T, Req> = State<
    <C as Service<T>>::Response,
    <<C as Service<T>>::Response as Service<Req>>::Future,
    Pool<C, T>,
    Req,
>;

/// A call that has to get its client ready first: get one (a reservation that was
/// still waiting, a connect in a reserved slot, or a plain checkout), check it, wait for
/// its `poll_ready`.
struct SlowCall<X, P, Req> {
    pool: P,
    /// A reservation still waiting.
    reserve: Option<Reserve<X>>,
    /// A connect or a checkout.
    get: Option<SlowCheckout<'static, X>>,
    /// The client, once checked out and checked.
    conn: Option<Pooled<X>>,
    req: Option<Req>,
}

impl<X, P: Clone, Req> SlowCall<X, P, Req> {
    fn new(pool: &P) -> Self {
        SlowCall {
            pool: pool.clone(),
            reserve: None,
            get: None,
            conn: None,
            req: None,
        }
    }

    fn reserving(mut self, reserve: Reserve<X>) -> Self {
        self.reserve = Some(reserve);
        self
    }

    fn getting(mut self, get: SlowCheckout<'static, X>) -> Self {
        self.get = Some(get);
        self
    }

    fn with_client(mut self, conn: Pooled<X>) -> Self {
        self.conn = Some(conn);
        self
    }

    fn request(mut self, req: Req) -> Self {
        self.req = Some(req);
        self
    }
}

impl<C, T, Req> fmt::Debug for ResponseFuture<C, T, Req>
where
    C: Service<T>,
    C::Response: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Failed { .. } => "failed",
            State::Slow { slow } if slow.conn.is_some() => "waiting for the client",
            State::Slow { .. } => "checking out",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<C, T, Req> Future for ResponseFuture<C, T, Req>
where
    C: Connector<T>,
    C::Response: Service<Req>,
    <C::Response as Service<Req>>::Error: Into<BoxError>,
    T: Target,
    Req: Send + 'static,
{
    type Output = Result<<C::Response as Service<Req>>::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let out = match this.state.as_mut().project() {
            StateProj::Called { fut, conn } => std::task::ready!(poll_called(fut, conn, cx)),
            _ => std::task::ready!(poll_state(this.state, cx)),
        };
        // No longer in flight once complete, even if the caller keeps the future.
        this.in_flight.take();
        Poll::Ready(out)
    }
}

/// Polls a reserved client's own `poll_ready`. A client whose `poll_ready` fails or
/// panics stays marked broken: closed when dropped.
#[inline]
fn poll_client<X, Req>(
    conn: &mut Pooled<X>,
    ready: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>>
where
    X: Service<Req>,
    X::Error: Into<BoxError>,
{
    conn.mark_broken();
    match conn.poll_ready(cx) {
        Poll::Ready(Ok(())) => {
            conn.mark_healthy();
            *ready = true;
            Poll::Ready(Ok(()))
        }
        Poll::Pending => {
            conn.mark_healthy();
            *ready = false;
            Poll::Pending
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
    }
}

/// Polls the client's call; once it completes, its client goes back to the pool (or is
/// closed, still marked broken, when the call failed).
#[inline]
fn poll_called<X, F, R, E>(
    fut: Pin<&mut F>,
    conn: &mut Option<Pooled<X>>,
    cx: &mut Context<'_>,
) -> Poll<Result<R, BoxError>>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    let out = std::task::ready!(fut.poll(cx));
    let Some(mut conn) = conn.take() else {
        return Poll::Ready(Err(PolledAfterCompletion.into()));
    };
    Poll::Ready(match out {
        Ok(resp) => {
            conn.mark_healthy();
            Ok(resp)
        }
        Err(e) => Err(e.into()),
    })
}

/// Drives a [`ResponseFuture`]'s state to its output: the rare states (a failure, a
/// client to get ready first), out of line.
#[inline(never)]
fn poll_state<C, T, Req>(
    mut state: Pin<&mut CallState<C, T, Req>>,
    cx: &mut Context<'_>,
) -> Poll<Result<<C::Response as Service<Req>>::Response, BoxError>>
where
    C: Connector<T>,
    C::Response: Service<Req>,
    <C::Response as Service<Req>>::Error: Into<BoxError>,
    T: Target,
    Req: Send + 'static,
{
    // A slow call's client and request are taken once, on the step that uses them.
    const DONE: &str = "a slow call's client and request are used once";
    loop {
        match state.as_mut().project() {
            StateProj::Called { fut, conn } => return poll_called(fut, conn, cx),
            StateProj::Failed { error } => {
                return Poll::Ready(Err(marina_core::after_completion(error)));
            }
            StateProj::Slow { slow } => {
                let s = &mut **slow;
                if s.conn.is_none() {
                    let got = match (s.get.as_mut(), s.reserve.as_mut()) {
                        (Some(get), _) => {
                            std::task::ready!(get.as_mut().poll(cx)).map(Checked::Conn)
                        }
                        (None, Some(reserve)) => std::task::ready!(reserve.poll(&s.pool, cx)),
                        (None, None) => unreachable!("a slow call gets a client"),
                    };
                    (s.get, s.reserve) = (None, None);
                    let slot = match got {
                        // Checked now, before use (the checkout may have left it).
                        Ok(Checked::Conn(mut conn)) => match conn.recheck() {
                            None => {
                                s.conn = Some(conn);
                                None
                            }
                            Some(reason) => Some(conn.close_keeping_slot(reason)),
                        },
                        Ok(Checked::Slot(slot)) => Some(slot),
                        Ok(Checked::Busy) => unreachable!("a slow call's reservation queues"),
                        Err(e) => {
                            let req = s.req.take().expect(DONE);
                            return Poll::Ready(Err(NotSent::with_request(e, req).into()));
                        }
                    };
                    if let Some(slot) = slot {
                        // Connect in the slot.
                        s.get = Some(s.pool.connect_in_slot_owned(slot));
                        continue;
                    }
                }
                let client = s.conn.as_mut().expect(DONE);
                client.mark_broken();
                match std::task::ready!(client.poll_ready(cx)) {
                    Ok(()) => {
                        let mut conn = s.conn.take().expect(DONE);
                        let fut = conn.call(s.req.take().expect(DONE));
                        state.set(State::Called {
                            fut,
                            conn: Some(conn),
                        });
                    }
                    Err(e) => {
                        // Closed: its `poll_ready` failed.
                        drop(s.conn.take());
                        let req = s.req.take().expect(DONE);
                        return Poll::Ready(Err(NotSent::with_request(e, req).into()));
                    }
                }
            }
        }
    }
}
