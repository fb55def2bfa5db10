//! `Pool`: the handle users hold, checkout, and the pool as a `Service`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use marina_core::{BoxError, Probe};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower_service::Service;

use crate::builder::Builder;
use crate::config::{Config, ConnectRetry};
use crate::core::{Connecting, Core, Entry, HeldSlot, Reason, RunningFlag, Wait, first};
use crate::error::{ConnectTimeout, PoolError, RetriesExhausted};
use crate::pooled::Pooled;
use crate::slots::{Closed, Grant, NEVER, WaitError};
use crate::stats::PoolStats;

/// What a [`Pool`] needs of its connector: a cloneable `Service<T>` whose connections
/// and futures can move between threads and whose errors convert into [`BoxError`].
/// Implemented for every such service; never implement it by hand.
pub trait Connector<T>:
    Service<T, Response: Send + 'static, Error: Into<BoxError>, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<C, T> Connector<T> for C where
    C: Service<T, Response: Send + 'static, Error: Into<BoxError>, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// What a pool needs of its target (an address, `host:port`, a URI): cheap to clone,
/// shareable, and printable for events, metrics and error messages. Implemented for
/// every such type.
pub trait Target: Clone + fmt::Debug + Send + Sync + 'static {}

impl<T: Clone + fmt::Debug + Send + Sync + 'static> Target for T {}

/// Everything a pool for one target needs: the core plus the connector. Background
/// tasks hold it too, so it is not what decides when the pool closes ([`Handle`] is).
pub(crate) struct Inner<C, T>
where
    C: Service<T>,
{
    pub(crate) core: Arc<Core<C::Response>>,
    /// Locked only to clone it for a connect, so the connector need not be `Sync`.
    pub(crate) connector: std::sync::Mutex<C>,
    pub(crate) target: T,
    pub(crate) config: Config,
    pub(crate) probe: Option<Arc<dyn Probe<C::Response>>>,
    pub(crate) connect_gate: Semaphore,
    /// True while the maintenance task exists; cleared when its future is dropped (also
    /// when its runtime shuts down), so the next checkout restarts it.
    pub(crate) maintenance_running: std::sync::atomic::AtomicBool,
}

/// What users' `Pool` clones share: when the last one is dropped, the pool closes.
struct Handle<C, T>
where
    C: Service<T>,
{
    inner: Arc<Inner<C, T>>,
}

impl<C, T> Drop for Handle<C, T>
where
    C: Service<T>,
{
    fn drop(&mut self) {
        // The last handle is gone: close, so idle connections are freed now, checked-out
        // ones when they come back, and the background tasks end (they hold `Inner`,
        // which must not keep an abandoned pool open).
        self.inner.core.shut();
    }
}

/// A bounded pool of connections to one target, made by a connector `C: Service<T>`.
///
/// The pooled item `C::Response` can be a raw stream (`TcpStream`) or a protocol client
/// built on one. A checkout is a [`Pooled`] guard that returns the connection on drop.
///
/// # Sharing
///
/// `Clone`, and cheap to clone (one `Arc`): every clone is a handle to the same pool —
/// its connections, its queue of waiters, its statistics and its background tasks. It
/// is `Send + Sync` (the [`Connector`] and [`Target`] bounds see to that), and
/// [`get`](Self::get) takes `&self`, so one handle serves any number of concurrent
/// checkouts: clone it into each task (no `Arc` or `Mutex` needed). When the last
/// handle is dropped the pool closes: idle connections are closed at once, checked-out
/// ones when they are returned, and the background tasks end. A [`Pooled`] guard is
/// not a handle and does not keep the pool open.
///
/// ```
/// # use marina_pool::{Pool, TcpConnector};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_pool::PoolError> {
/// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// # let addr = l.local_addr().unwrap();
/// let pool = Pool::builder().max_size(2).build(TcpConnector::new(), addr)?;
/// let mut tasks = Vec::new();
/// for _ in 0..4 {
///     let pool = pool.clone(); // one pool, four users
///     tasks.push(tokio::spawn(async move { pool.get().await.map(drop) }));
/// }
/// for t in tasks {
///     t.await.unwrap()?;
/// }
/// assert!(pool.stats().created <= 2);
/// # Ok(()) }
/// ```
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use marina_pool::{Pool, TcpConnector};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let addr = listener.local_addr()?;
/// # tokio::spawn(async move { loop {
/// #     let (mut s, _) = listener.accept().await.unwrap();
/// #     tokio::spawn(async move { let (mut r, mut w) = s.split(); let _ = tokio::io::copy(&mut r, &mut w).await; });
/// # } });
/// let pool = Pool::builder()
///     .max_size(4)
///     .acquire_timeout(Duration::from_secs(2))
///     .build(TcpConnector::new(), addr)?;
///
/// for _ in 0..3 {
///     let mut conn = pool.get().await?;
///     conn.write_all(b"hi").await?;
///     let mut buf = [0; 2];
///     conn.read_exact(&mut buf).await?;
/// } // each `conn` goes back to the pool here
///
/// let stats = pool.stats();
/// assert_eq!(stats.created, 1); // one TCP connect served all three
/// assert_eq!(stats.acquired, 3);
/// # Ok(()) }
/// ```
pub struct Pool<C, T>
where
    C: Service<T>,
{
    handle: Arc<Handle<C, T>>,
}

impl<C, T> Clone for Pool<C, T>
where
    C: Service<T>,
{
    fn clone(&self) -> Self {
        Pool {
            handle: self.handle.clone(),
        }
    }
}

impl<C, T> fmt::Debug for Pool<C, T>
where
    C: Service<T>,
    T: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.handle.inner.core.slots.snapshot();
        f.debug_struct("Pool")
            .field("target", &self.handle.inner.target)
            .field("open", &snap.open)
            .field("idle", &snap.idle)
            .field("max_size", &snap.max)
            .finish_non_exhaustive()
    }
}

impl<C, T> Pool<C, T>
where
    C: Service<T>,
{
    /// Closes without waiting (the first step of [`close`](Self::close)). Returns how
    /// many `PoolService` reservations could not be taken back yet (their service was
    /// being polled or called on another thread).
    pub(crate) fn begin_close(&self) -> usize {
        self.handle.inner.core.shut()
    }

    /// The reservation cells of this pool's `PoolService`s.
    pub(crate) fn reservations(&self) -> &crate::service::Reservations<C::Response> {
        &self.handle.inner.core.reservations
    }

    /// True once the pool was closed (an atomic load: no lock taken).
    #[inline]
    pub(crate) fn is_shut(&self) -> bool {
        self.handle.inner.core.is_closed()
    }

    /// True when a connection is checked out or being opened, someone waits, or another
    /// handle than this one exists (a `call` future not yet polled, a user's clone).
    pub(crate) fn in_use(&self) -> bool {
        if Arc::strong_count(&self.handle) > 1 {
            return true;
        }
        let s = self.handle.inner.core.slots.snapshot();
        s.open > s.idle || s.waiting > 0
    }
}

/// A pool of TCP connections to one address.
pub type TcpPool = Pool<crate::TcpConnector, std::net::SocketAddr>;

impl Pool<crate::TcpConnector, std::net::SocketAddr> {
    /// Starts configuring a pool (of any connector and target, despite where rustdoc
    /// lists it); finish with [`Builder::build`]. The same as [`Builder::new`].
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl<C, T> Pool<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// Builds a pool from `config` (see [`Builder`] for hooks). Fails with
    /// [`PoolError::Invalid`] when the configuration has errors.
    pub fn new(config: Config, connector: C, target: T) -> Result<Self, PoolError> {
        Builder::from(config).build(connector, target)
    }

    pub(crate) fn from_parts(
        builder: &Builder,
        connector: C,
        target: T,
    ) -> Result<Self, PoolError> {
        let config = builder.config.clone();
        let report = config.validate();
        if !report.is_ok() {
            return Err(PoolError::Invalid(report.errors));
        }
        let name = builder.pool_name(&target);
        for a in &report.advisories {
            tracing::warn!(pool = %name, "{a}");
        }
        let hooks = builder.pool_hooks::<C, T>(&connector)?;
        let probe = hooks.probe;
        let pool = Pool {
            handle: Arc::new(Handle {
                inner: Arc::new(Inner {
                    core: Arc::new(Core::new(&config, hooks.check, hooks.managed, name)),
                    connect_gate: Semaphore::new(config.max_connecting),
                    connector: std::sync::Mutex::new(connector),
                    target,
                    config,
                    probe,
                    maintenance_running: std::sync::atomic::AtomicBool::new(false),
                }),
            }),
        };
        pool.start_maintenance();
        Ok(pool)
    }

    /// Checks out a connection: an idle one if there is one, else a new one if the
    /// pool has room, else waits in FIFO order for one to be returned.
    ///
    /// Fails with [`PoolError::Timeout`] after `acquire_timeout` in all,
    /// [`PoolError::Connect`] when a connect fails for good, [`PoolError::Closed`] when
    /// the pool is or gets closed. Idle connections that expired, whose socket was
    /// closed by the peer, or that the connector calls broken
    /// ([`Manage::is_broken`](crate::Manage::is_broken)) are closed, not handed out.
    ///
    /// A connect that fails for a transient reason (refused, reset, timed out) is retried
    /// with jittered backoff within `acquire_timeout`, as
    /// [`Config::connect_retry`] says (by default once the pool has reached its target
    /// before); if the time runs out, the error is a [`PoolError::Connect`] whose source
    /// is a [`RetriesExhausted`](crate::RetriesExhausted) carrying the last connect error.
    /// Other connect errors are returned at once.
    ///
    /// Takes part in tokio's cooperative budget, like `tokio::sync::Semaphore`: a task
    /// that loops on a ready pool still yields to others now and then.
    ///
    /// A panic in user code it runs (the checkout check, the connector, a
    /// [`recycle`](crate::Manage::recycle)) reaches the caller, after the connection
    /// involved is closed and its slot freed: the pool stays usable.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropping the future at any point leaves nothing behind: a queued
    /// waiter is withdrawn (a connection already handed to it goes to the next waiter or
    /// back to the idle queue), a connect in flight is dropped and its slot freed
    /// (counted in [`PoolStats::cancelled`]), and a connection being recycled is closed.
    pub fn get(&self) -> impl Future<Output = Result<Pooled<C::Response>, PoolError>> + Send + '_ {
        self.checkout(self.handle.inner.config.connect_retry)
    }

    /// [`get`](Self::get), retrying connects as `retry` says.
    pub(crate) fn checkout(
        &self,
        retry: ConnectRetry,
    ) -> impl Future<Output = Result<Pooled<C::Response>, PoolError>> + Send + '_ {
        Checkout {
            pool: self,
            retry,
            wait: None,
            slow: None,
            #[cfg(feature = "metrics")]
            started: None,
        }
    }

    /// A checkout (connects not retried) as a future of its own, holding a handle of
    /// the pool: for a `PoolService` call that found nothing reserved.
    pub(crate) fn checkout_owned(&self) -> SlowCheckout<'static, C::Response> {
        let pool = self.clone();
        Box::pin(async move { pool.checkout(ConnectRetry::Off).await })
    }

    /// A connect (not retried) in `slot`, as a future of its own holding a handle of the
    /// pool: for a `PoolService` call that uses a reserved slot. The slot is freed if
    /// the future is dropped before its first poll, and guarded by the connect after.
    pub(crate) fn connect_in_slot_owned(
        &self,
        slot: HeldSlot<C::Response>,
    ) -> SlowCheckout<'static, C::Response> {
        let pool = self.clone();
        Box::pin(async move {
            #[cfg(feature = "metrics")]
            let started = Instant::now();
            let grant = slot.into_grant();
            let deadline = pool.deadline();
            let got = pool
                .get_slow(Some(grant), None, ConnectRetry::Off, deadline)
                .await;
            #[cfg(feature = "metrics")]
            pool.handle.inner.core.metrics.checkout(Some(started), &got);
            got
        })
    }

    /// The fast path: an idle connection if one is ready (its liveness checked unless
    /// `CHECK` is false: see [`Core::checkout_with`]).
    #[inline]
    fn try_checkout<const CHECK: bool>(&self) -> FastPath<C::Response> {
        let core = &self.handle.inner.core;
        loop {
            match core.slots.try_acquire_with(|| core.clone()) {
                (Err(Closed), _) => return FastPath::Closed,
                (Ok(Some(Grant::Idle(e))), Some(handle)) => {
                    if let Some(mut p) = Core::checkout_with::<CHECK>(handle, e, true) {
                        // A connection the connector wants to recycle first takes the
                        // slow path (the future is made again there).
                        if core
                            .hooks
                            .as_ref()
                            .is_some_and(|h| h.recycle(&mut p).is_some())
                        {
                            return FastPath::Recycle(p);
                        }
                        return FastPath::Ready(p);
                    }
                }
                (Ok(Some(Grant::Idle(e))), None) => {
                    if let Some(mut p) = Core::checkout_with::<CHECK>(core.clone(), e, true) {
                        if core
                            .hooks
                            .as_ref()
                            .is_some_and(|h| h.recycle(&mut p).is_some())
                        {
                            return FastPath::Recycle(p);
                        }
                        return FastPath::Ready(p);
                    }
                }
                (Ok(Some(Grant::Create)), _) => return FastPath::Slow(Some(Grant::Create)),
                (Ok(None), _) => return FastPath::Slow(None),
            }
        }
    }

    /// Checks out an idle connection if one is ready now, without waiting or connecting.
    ///
    /// `Ok(None)` when none is idle (or others are already waiting: they go first).
    ///
    /// # Examples
    ///
    /// ```
    /// # use marina_pool::{Pool, TcpConnector};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_pool::PoolError> {
    /// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let pool = Pool::builder().max_size(1).build(TcpConnector::new(), l.local_addr().unwrap())?;
    /// assert!(pool.try_get()?.is_none()); // nothing opened yet
    /// drop(pool.get().await?);
    /// let conn = pool.try_get()?.expect("the idle connection");
    /// assert!(pool.try_get()?.is_none()); // it is checked out
    /// # drop(conn); Ok(()) }
    /// ```
    pub fn try_get(&self) -> Result<Option<Pooled<C::Response>>, PoolError> {
        self.start_maintenance();
        let core = &self.handle.inner.core;
        loop {
            match core.slots.try_acquire() {
                Err(Closed) => return Err(PoolError::Closed),
                Ok(Some(Grant::Idle(e))) => {
                    if let Some(p) = core.checkout(e) {
                        return Ok(Some(p));
                    }
                }
                Ok(Some(Grant::Create)) => {
                    core.release_slot();
                    return Ok(None);
                }
                Ok(None) => return Ok(None),
            }
        }
    }

    /// The checkout's deadline, from now: one clock read per checkout that cannot be
    /// served at once (waiting costs hundreds of nanoseconds anyway).
    fn deadline(&self) -> Option<Instant> {
        self.handle
            .inner
            .config
            .acquire_timeout
            .and_then(|l| Instant::now().checked_add(l))
    }

    /// True when the connector wants `p` recycled before it is handed out.
    fn wants_recycle(&self, p: &mut Pooled<C::Response>) -> bool {
        let core = &self.handle.inner.core;
        core.hooks.as_ref().is_some_and(|h| h.recycle(p).is_some())
    }

    /// The rest of a checkout that must connect, recycle, or wait again after a stale
    /// connection: boxed by [`Checkout`] only when needed.
    async fn get_slow(
        &self,
        mut grant: Option<Grant<Entry<C::Response>>>,
        recycle: Option<Pooled<C::Response>>,
        retry: ConnectRetry,
        deadline: Option<Instant>,
    ) -> Result<Pooled<C::Response>, PoolError> {
        let inner = &self.handle.inner;
        let core = &inner.core;
        let limit = inner.config.acquire_timeout;
        let deadline_ns = deadline.map_or(NEVER, |d| core.clock.ns_at(d));
        if let Some(p) = recycle {
            match self.recycled(p, deadline).await {
                Recycled::Ready(p) => return Ok(p),
                Recycled::Failed => grant = Some(Grant::Create),
                Recycled::TimedOut => return Err(core.timed_out(limit)),
            }
        }
        loop {
            let g = match grant.take() {
                Some(g) => g,
                None => match core.slots.acquire_or_wait(deadline_ns) {
                    Err(Closed) => return Err(PoolError::Closed),
                    Ok(Ok(g)) => g,
                    Ok(Err(queued)) => {
                        if deadline.is_some() {
                            core.arm_timer(queued.wake_timer);
                        }
                        let waited = Wait {
                            core: &**core,
                            waiter: Some(queued.waiter),
                        }
                        .await;
                        match waited {
                            Ok(g) => g,
                            Err(WaitError::Closed) => return Err(PoolError::Closed),
                            Err(WaitError::TimedOut) => return Err(core.timed_out(limit)),
                        }
                    }
                },
            };
            // A grant handed over just before `close()` must not outlive it.
            if core.is_closed() {
                match g {
                    Grant::Idle(e) => core.retire(e, Reason::Closed, true),
                    Grant::Create => core.release_slot(),
                }
                return Err(PoolError::Closed);
            }
            match g {
                Grant::Idle(e) => match core.checkout_or_keep_slot::<true>(e) {
                    Some(p) => match self.recycled(p, deadline).await {
                        Recycled::Ready(p) => return Ok(p),
                        // Closed, its slot kept: connect in it.
                        Recycled::Failed => grant = Some(Grant::Create),
                        Recycled::TimedOut => return Err(core.timed_out(limit)),
                    },
                    // The connection was stale: connect in its slot rather than give the
                    // slot up and queue again behind later arrivals.
                    None => grant = Some(Grant::Create),
                },
                Grant::Create => return self.connect_in_slot(deadline, retry).await,
            }
        }
    }

    /// Runs the connector's [`recycle`](crate::Manage::recycle) on a connection just
    /// checked out, if it has one: the connection is handed out if it passes, closed
    /// (keeping its slot) if it fails or outlasts `health_check_timeout`.
    async fn recycled(
        &self,
        mut p: Pooled<C::Response>,
        deadline: Option<Instant>,
    ) -> Recycled<C::Response> {
        let inner = &self.handle.inner;
        let core = &inner.core;
        let Some(hooks) = &core.hooks else {
            return Recycled::Ready(p);
        };
        // Broken until it passes: cancelled or panicking half-way, it is closed.
        p.mark_broken();
        let result = {
            let Some(fut) = hooks.recycle(&mut p) else {
                p.mark_healthy();
                return Recycled::Ready(p);
            };
            let until = Instant::now() + inner.config.health_check_timeout;
            let until = deadline.map_or(until, |d| d.min(until));
            tokio::time::timeout_at(until, fut).await
        };
        match result {
            Ok(Ok(())) => {
                p.mark_healthy();
                Recycled::Ready(p)
            }
            Ok(Err(error)) => {
                tracing::debug!(pool = %core.name, id = p.id(), %error, "connection failed its recycle check");
                core.retire(p.take_unused(), Reason::Broken, false);
                Recycled::Failed
            }
            Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                core.retire(p.take_unused(), Reason::Broken, true);
                Recycled::TimedOut
            }
            Err(_) => {
                tracing::debug!(pool = %core.name, id = p.id(), "connection's recycle check timed out");
                core.retire(p.take_unused(), Reason::Broken, false);
                Recycled::Failed
            }
        }
    }

    /// Connects in a slot this checkout holds, retrying transient failures within the
    /// deadline as `retry` says.
    async fn connect_in_slot(
        &self,
        deadline: Option<Instant>,
        retry: ConnectRetry,
    ) -> Result<Pooled<C::Response>, PoolError> {
        let inner = &self.handle.inner;
        let core = &inner.core;
        let limit = inner.config.acquire_timeout;
        // Frees the slot (and counts a cancel) if this future is dropped or a hook panics.
        let guard = Connecting::new(core);
        let mut backoff = Backoff::new();
        let mut last_error = None;
        let mut attempts = 0;
        // Out of time while retrying: the backend is unreachable, not the pool busy.
        let exhausted = |attempts, last: Option<BoxError>| match last {
            Some(last) => PoolError::Connect(
                RetriesExhausted::new(attempts, limit.unwrap_or_default(), last).into(),
            ),
            None => core.timed_out(limit),
        };
        loop {
            attempts += 1;
            let conn = match deadline {
                None => inner.connect().await,
                Some(d) => match tokio::time::timeout_at(d, inner.connect()).await {
                    Ok(r) => r,
                    // Dropping `guard` frees the slot and counts the cancel.
                    Err(_) => return Err(exhausted(attempts, last_error)),
                },
            };
            let err = match conn {
                Ok(conn) => {
                    let e = core.register(conn);
                    guard.done();
                    if core.is_closed() {
                        core.retire(e, Reason::Closed, true);
                        return Err(PoolError::Closed);
                    }
                    e.meta.uses.store(1, Relaxed);
                    return Ok(Pooled::new(e, core.clone()));
                }
                Err(err) => err,
            };
            core.counters.failed.fetch_add(1, Relaxed);
            if core.is_closed() || !inner.should_retry(retry, &err) {
                guard.fail();
                return Err(PoolError::Connect(err));
            }
            let wait = backoff.next_delay();
            tracing::debug!(pool = %core.name, error = %err, retry_in = ?wait, "connect failed; retrying");
            last_error = Some(err);
            let wake = Instant::now() + wait;
            let closing = core.closing.notified();
            tokio::pin!(closing);
            closing.as_mut().enable();
            if core.is_closed() {
                guard.fail();
                return Err(PoolError::Closed);
            }
            let out_of_time = deadline.is_some_and(|d| wake >= d);
            let until = match deadline {
                Some(d) if out_of_time => d,
                _ => wake,
            };
            if !first(tokio::time::sleep_until(until), closing).await {
                guard.fail();
                return Err(PoolError::Closed);
            }
            if out_of_time {
                guard.fail();
                return Err(exhausted(attempts, last_error));
            }
        }
    }

    /// A snapshot of the pool's gauges, counters and connections.
    ///
    /// # Examples
    ///
    /// ```
    /// # use marina_pool::{Pool, TcpConnector};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_pool::PoolError> {
    /// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let pool = Pool::builder().build(TcpConnector::new(), l.local_addr().unwrap())?;
    /// let conn = pool.get().await?;
    /// let s = pool.stats();
    /// assert_eq!((s.total, s.active, s.idle, s.created, s.acquired), (1, 1, 0, 1, 1));
    /// assert_eq!(s.connections[0].id, conn.id());
    /// assert_eq!(s.connections[0].idle_for, None); // checked out
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> PoolStats {
        self.handle.inner.core.stats()
    }

    /// The configuration the pool was built with (`max_size` as built; see
    /// [`stats`](Self::stats) for the current one after a [`resize`](Self::resize)).
    pub fn config(&self) -> &Config {
        &self.handle.inner.config
    }

    /// The target this pool connects to.
    pub fn target(&self) -> &T {
        &self.handle.inner.target
    }

    /// Changes `max_size` at run time. Growing lets waiters connect at once; shrinking
    /// closes idle connections over the new size now and checked-out ones as they are
    /// returned, until the pool fits. A `max_size` of 0 is raised to 1.
    ///
    /// # Examples
    ///
    /// ```
    /// # use marina_pool::{Pool, TcpConnector};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_pool::PoolError> {
    /// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let pool = Pool::builder().max_size(2).build(TcpConnector::new(), l.local_addr().unwrap())?;
    /// let (a, b) = (pool.get().await?, pool.get().await?);
    /// pool.resize(1);
    /// drop((a, b)); // one is closed on return, so the pool fits in its new size
    /// assert_eq!((pool.stats().total, pool.stats().max_size), (1, 1));
    /// # Ok(()) }
    /// ```
    ///
    /// On a closed pool it does nothing (its `max_size` reads 0).
    pub fn resize(&self, max_size: usize) {
        let core = &self.handle.inner.core;
        for e in core.slots.resize(max_size.max(1)) {
            core.retire(e, Reason::Shrunk, false);
        }
    }

    /// Waits until `min_idle` connections are idle (opening them here if the background
    /// warm-up has not), or the pool is full, or someone is waiting for a connection
    /// (they take idle ones as they come). Returns the first connect error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: connects it started are dropped and their slots freed.
    pub async fn ready_min(&self) -> Result<(), PoolError> {
        self.start_maintenance();
        let inner = &self.handle.inner;
        let core = &inner.core;
        let min = inner.config.min_idle;
        loop {
            let refilled = core.refilled.notified();
            tokio::pin!(refilled);
            refilled.as_mut().enable();
            let snap = core.slots.snapshot();
            if snap.closed {
                return Err(PoolError::Closed);
            }
            if snap.idle >= min || snap.open >= snap.max || snap.waiting > 0 {
                return Ok(());
            }
            if inner.refill().await? == 0 && snap.refilling > 0 {
                refilled.await;
            }
        }
    }

    /// Closes the pool: waiters fail with [`PoolError::Closed`], later `get`s too, idle
    /// connections are closed now; then waits until every checked-out connection has
    /// been returned (and closed) and every connect in flight has ended.
    ///
    /// What a [`PoolService`](crate::PoolService) holds for its next call is not in
    /// use, and is taken back now, whether or not anyone polls or calls that service
    /// again (a balancer keeps ready endpoints without calling them): a reserved client
    /// is closed (counted in [`PoolStats::destroyed`](crate::PoolStats::destroyed)), a
    /// reserved slot freed, a checkout waiting in `poll_ready` withdrawn (its task
    /// woken). That service's next call fails with [`PoolError::Closed`], not sent. So
    /// once `close()` returns, [`stats`](Self::stats)`().total` is 0. (A service being
    /// polled or called on another thread at that very moment is taken back as soon
    /// as that poll or call returns.)
    ///
    /// Do not await it while holding one of the pool's connections in the same task:
    /// it would wait for itself.
    ///
    /// # Examples
    ///
    /// ```
    /// # use marina_pool::{Pool, PoolError, TcpConnector};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), PoolError> {
    /// # let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    /// let pool = Pool::builder().build(TcpConnector::new(), l.local_addr().unwrap())?;
    /// let conn = pool.get().await?;
    /// let closing = tokio::spawn({
    ///     let pool = pool.clone();
    ///     async move { pool.close().await }
    /// });
    /// # tokio::task::yield_now().await;
    /// assert!(pool.get().await.unwrap_err().is_closed()); // closed at once
    /// drop(conn); // the checked-out connection comes back and is closed: close() ends
    /// closing.await.unwrap();
    /// assert_eq!(pool.stats().total, 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pool is closed once this is first polled; dropping the future
    /// only stops the waiting.
    pub async fn close(&self) {
        let core = &self.handle.inner.core;
        let mut busy = self.begin_close();
        tracing::info!(pool = %core.name, "pool closed");
        // A service being polled or called on another thread right now: its reservation
        // is taken back as soon as that poll or call returns (a moment: the pool never
        // waits for its user code while holding anything).
        while busy > 0 {
            tokio::task::yield_now().await;
            busy = core.reservations.reclaim();
        }
        core.drained().await;
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.handle.inner.core.slots.snapshot().closed
    }

    /// Starts the maintenance task, or restarts it if the runtime it ran on has shut
    /// down (a pool can outlive a runtime). Outside a runtime it starts on first use.
    fn start_maintenance(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
        let inner = &self.handle.inner;
        if inner.maintenance_running.load(Acquire)
            || inner.core.is_closed()
            || inner.maintenance_running.swap(true, AcqRel)
        {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let running = RunningFlag(inner.clone(), |i| &i.maintenance_running);
                rt.spawn(async move {
                    let inner = running.0.clone();
                    let _running = running;
                    crate::maintain::maintain(inner).await
                });
            }
            Err(_) => inner.maintenance_running.store(false, Release),
        }
    }
}

/// What the fast path of a checkout found.
enum FastPath<X> {
    Ready(Pooled<X>),
    /// Checked out, but the connector wants to recycle it first.
    Recycle(Pooled<X>),
    Closed,
    /// Wait or connect, starting with this grant if there is one.
    Slow(Option<Grant<Entry<X>>>),
}

/// What [`Pool::recycled`] did with a connection.
enum Recycled<X> {
    Ready(Pooled<X>),
    /// It was closed; the checkout keeps its slot.
    Failed,
    /// The checkout's deadline passed; the connection was closed and its slot freed.
    TimedOut,
}

/// Jittered exponential backoff between connect retries: 10 ms doubling up to 500 ms,
/// each delay drawn from its upper half.
struct Backoff {
    next: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(10);
    const MAX: std::time::Duration = std::time::Duration::from_millis(500);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        d / 2 + d.mul_f64(fastrand::f64() / 2.0)
    }
}

impl<C, T> Inner<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// Whether a failed connect is retried: as `retry` allows, and if the connector
    /// calls the error transient.
    fn should_retry(&self, retry: ConnectRetry, err: &BoxError) -> bool {
        let allowed = match retry {
            ConnectRetry::Off => false,
            ConnectRetry::Reconnects => self.core.reached.load(Relaxed),
            ConnectRetry::Always => true,
        };
        allowed
            && (err.is::<ConnectTimeout>()
                || match &self.core.hooks {
                    Some(h) => h.is_transient(&**err),
                    None => crate::manage::is_transient(&**err),
                })
    }
}

pub(crate) type SlowCheckout<'a, X> =
    Pin<Box<dyn Future<Output = Result<Pooled<X>, PoolError>> + Send + 'a>>;

/// A [`Pool::get`] queued for a connection, with its deadline.
type Queued<'a, X> = (Wait<X, &'a Core<X>>, Option<Instant>);

/// The future of [`Pool::get`]: the fast path and the wait in the queue run inline;
/// connecting, recycling and waiting again after a stale connection run in a boxed
/// future made only when needed, so the common cases (a connection ready, or handed
/// over after a wait) stay small and allocate nothing but the waiter.
struct Checkout<'a, C, T>
where
    C: Service<T>,
{
    pool: &'a Pool<C, T>,
    retry: ConnectRetry,
    /// Queued for a connection, with the checkout's deadline.
    wait: Option<Queued<'a, C::Response>>,
    slow: Option<SlowCheckout<'a, C::Response>>,
    /// When it left the fast path (for `marina_pool_checkout_wait_seconds`).
    #[cfg(feature = "metrics")]
    started: Option<Instant>,
}

impl<'a, C, T> Checkout<'a, C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// Goes on in the boxed slow future, polled at once: a grant moved into it is
    /// guarded from its first poll on, with no await point between.
    fn slow(
        &mut self,
        grant: Option<Grant<Entry<C::Response>>>,
        recycle: Option<Pooled<C::Response>>,
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Pooled<C::Response>, PoolError>> {
        let (pool, retry) = (self.pool, self.retry);
        let slow = self
            .slow
            .insert(Box::pin(pool.get_slow(grant, recycle, retry, deadline)));
        slow.as_mut().poll(cx)
    }

    /// What a queued checkout got.
    fn granted(
        &mut self,
        got: Result<Grant<Entry<C::Response>>, WaitError>,
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Pooled<C::Response>, PoolError>> {
        let pool = self.pool;
        let g = match pool.granted(got) {
            Ok(g) => g,
            Err(e) => return Poll::Ready(Err(e)),
        };
        match g {
            Grant::Idle(e) => match pool.handle.inner.core.checkout_or_keep_slot::<true>(e) {
                Some(mut p) => {
                    if pool.wants_recycle(&mut p) {
                        self.slow(None, Some(p), deadline, cx)
                    } else {
                        Poll::Ready(Ok(p))
                    }
                }
                // The connection was stale: connect in its slot rather than give the
                // slot up and queue again behind later arrivals.
                None => self.slow(Some(Grant::Create), None, deadline, cx),
            },
            Grant::Create => self.slow(Some(Grant::Create), None, deadline, cx),
        }
    }
}

impl<C, T> Future for Checkout<'_, C, T>
where
    C: Connector<T>,
    T: Target,
{
    type Output = Result<Pooled<C::Response>, PoolError>;

    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_mut))]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        #[cfg(feature = "metrics")]
        {
            let got = std::task::ready!(self.as_mut().poll_checkout(cx));
            self.pool
                .handle
                .inner
                .core
                .metrics
                .checkout(self.started, &got);
            Poll::Ready(got)
        }
        #[cfg(not(feature = "metrics"))]
        self.poll_checkout(cx)
    }
}

impl<C, T> Checkout<'_, C, T>
where
    C: Connector<T>,
    T: Target,
{
    #[inline]
    fn poll_checkout(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Pooled<C::Response>, PoolError>> {
        let this = &mut *self;
        if let Some(slow) = this.slow.as_mut() {
            return slow.as_mut().poll(cx);
        }
        if let Some((wait, deadline)) = this.wait.as_mut() {
            let got = std::task::ready!(Pin::new(wait).poll(cx));
            let deadline = *deadline;
            this.wait = None;
            return this.granted(got, deadline, cx);
        }
        let pool = this.pool;
        // A relaxed load of a flag that rarely changes: restarts maintenance if its
        // runtime went away, even for a pool that never reaches the slow path.
        if !pool.handle.inner.maintenance_running.load(Relaxed) {
            pool.start_maintenance();
        }
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        coop.made_progress();
        let fast = pool.try_checkout::<true>();
        #[cfg(feature = "metrics")]
        if matches!(fast, FastPath::Recycle(_) | FastPath::Slow(_)) {
            this.started = Some(Instant::now());
        }
        match fast {
            FastPath::Ready(p) => Poll::Ready(Ok(p)),
            FastPath::Closed => Poll::Ready(Err(PoolError::Closed)),
            FastPath::Recycle(p) => this.slow(None, Some(p), pool.deadline(), cx),
            FastPath::Slow(Some(g)) => this.slow(Some(g), None, pool.deadline(), cx),
            FastPath::Slow(None) => {
                // Queue, inline: no boxed future for a plain wait.
                let core = &pool.handle.inner.core;
                let deadline = pool.deadline();
                let deadline_ns = deadline.map_or(NEVER, |d| core.clock.ns_at(d));
                match core.slots.acquire_or_wait(deadline_ns) {
                    Err(Closed) => Poll::Ready(Err(PoolError::Closed)),
                    Ok(Ok(g)) => this.granted(Ok(g), deadline, cx),
                    Ok(Err(queued)) => {
                        if deadline.is_some() {
                            core.arm_timer(queued.wake_timer);
                        }
                        let mut wait = Wait {
                            core: &**core,
                            waiter: Some(queued.waiter),
                        };
                        match Pin::new(&mut wait).poll(cx) {
                            Poll::Ready(got) => this.granted(got, deadline, cx),
                            Poll::Pending => {
                                this.wait = Some((wait, deadline));
                                Poll::Pending
                            }
                        }
                    }
                }
            }
        }
    }
}

impl<C, T> Pool<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// The grant a queued checkout got, or why it got none. A grant handed over just
    /// before `close()` does not outlive it.
    fn granted(
        &self,
        got: Result<Grant<Entry<C::Response>>, WaitError>,
    ) -> Result<Grant<Entry<C::Response>>, PoolError> {
        let inner = &self.handle.inner;
        let core = &inner.core;
        let g = match got {
            Ok(g) => g,
            Err(WaitError::Closed) => return Err(PoolError::Closed),
            Err(WaitError::TimedOut) => return Err(core.timed_out(inner.config.acquire_timeout)),
        };
        if core.is_closed() {
            match g {
                Grant::Idle(e) => core.retire(e, Reason::Closed, true),
                Grant::Create => core.release_slot(),
            }
            return Err(PoolError::Closed);
        }
        Ok(g)
    }
}

/// What a [`Reserve`] got: an idle connection, a free slot to connect in, or (for one
/// that does not queue) nothing.
pub(crate) enum Checked<X> {
    Conn(Pooled<X>),
    Slot(HeldSlot<X>),
    /// Nothing free, and the reserve was not to queue.
    Busy,
}

/// A checkout that reserves, for a use to come, an idle connection or else a free slot
/// to connect in: for a [`PoolService`](crate::PoolService), which reserves in
/// `poll_ready` what its next call uses. It never connects itself, and leaves the
/// liveness check of an idle connection to the use ([`Pooled::recheck`]), so that it
/// runs once, when the connection is used; expiry and the connector's `recycle` run
/// here.
///
/// Unlike [`Pool::get`]'s future it does not borrow its pool: it is polled with it, so
/// it can live beside its pool in the service from one `poll_ready` to the next, and it
/// holds the pool's core by `Arc` while queued. Dropped at any point, it leaves nothing
/// behind. Once it has returned `Ready` it must not be polled again.
pub(crate) struct Reserve<X> {
    /// Whether it queues when nothing is free (else it ends [`Checked::Busy`]).
    queue: bool,
    /// Queued for a connection.
    wait: Option<Wait<X, Arc<Core<X>>>>,
    /// The connector's `recycle` of the idle connection taken.
    recycle: Option<SlowCheckout<'static, X>>,
    /// When it left the fast path (for `marina_pool_checkout_wait_seconds`).
    #[cfg(feature = "metrics")]
    started: Option<Instant>,
}

impl<X: Send + 'static> Reserve<X> {
    pub(crate) fn new(queue: bool) -> Self {
        Reserve {
            queue,
            wait: None,
            recycle: None,
            #[cfg(feature = "metrics")]
            started: None,
        }
    }

    /// Polls the reservation, out of `pool` (always the same pool).
    ///
    /// A connection (or an error) ends a checkout, as far as the metrics tell; a slot
    /// is measured by the connect in it, and `Busy` by the checkout that follows.
    #[inline]
    pub(crate) fn poll<C, T>(
        &mut self,
        pool: &Pool<C, T>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Checked<X>, PoolError>>
    where
        C: Connector<T> + Service<T, Response = X>,
        T: Target,
    {
        #[cfg(feature = "metrics")]
        {
            let got = std::task::ready!(self.poll_reserve(pool, cx));
            let metrics = &pool.handle.inner.core.metrics;
            match &got {
                Ok(Checked::Conn(_)) => metrics.ended(self.started, None),
                Err(e) => metrics.ended(self.started, Some(e)),
                Ok(_) => {}
            }
            Poll::Ready(got)
        }
        #[cfg(not(feature = "metrics"))]
        self.poll_reserve(pool, cx)
    }

    #[inline]
    fn poll_reserve<C, T>(
        &mut self,
        pool: &Pool<C, T>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Checked<X>, PoolError>>
    where
        C: Connector<T> + Service<T, Response = X>,
        T: Target,
    {
        if let Some(recycle) = self.recycle.as_mut() {
            return recycle.as_mut().poll(cx).map_ok(Checked::Conn);
        }
        let core = &pool.handle.inner.core;
        if let Some(wait) = self.wait.as_mut() {
            let got = std::task::ready!(Pin::new(wait).poll(cx));
            self.wait = None;
            return self.granted(pool, got, cx);
        }
        if !pool.handle.inner.maintenance_running.load(Relaxed) {
            pool.start_maintenance();
        }
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        coop.made_progress();
        let fast = pool.try_checkout::<false>();
        #[cfg(feature = "metrics")]
        if matches!(fast, FastPath::Recycle(_) | FastPath::Slow(None)) {
            self.started = Some(Instant::now());
        }
        match fast {
            FastPath::Ready(p) => Poll::Ready(Ok(Checked::Conn(p))),
            FastPath::Closed => Poll::Ready(Err(PoolError::Closed)),
            FastPath::Recycle(p) => self.recycle(pool, p, cx),
            FastPath::Slow(Some(_)) => Poll::Ready(Ok(Checked::Slot(HeldSlot::new(core.clone())))),
            FastPath::Slow(None) if !self.queue => Poll::Ready(Ok(Checked::Busy)),
            FastPath::Slow(None) => {
                let deadline = pool.deadline();
                let deadline_ns = deadline.map_or(NEVER, |d| core.clock.ns_at(d));
                match core.slots.acquire_or_wait(deadline_ns) {
                    Err(Closed) => Poll::Ready(Err(PoolError::Closed)),
                    Ok(Ok(g)) => self.granted(pool, Ok(g), cx),
                    Ok(Err(queued)) => {
                        if deadline.is_some() {
                            core.arm_timer(queued.wake_timer);
                        }
                        let mut wait = Wait {
                            core: core.clone(),
                            waiter: Some(queued.waiter),
                        };
                        match Pin::new(&mut wait).poll(cx) {
                            Poll::Ready(got) => self.granted(pool, got, cx),
                            Poll::Pending => {
                                self.wait = Some(wait);
                                Poll::Pending
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs the connector's `recycle` in a boxed future, polled at once (the
    /// connection is guarded by it from here on).
    fn recycle<C, T>(
        &mut self,
        pool: &Pool<C, T>,
        p: Pooled<X>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Checked<X>, PoolError>>
    where
        C: Connector<T> + Service<T, Response = X>,
        T: Target,
    {
        // A handle of its own, so the future outlives any borrow of the pool.
        let pool = pool.clone();
        let recycle = self.recycle.insert(Box::pin(async move {
            let deadline = pool.deadline();
            pool.get_slow(None, Some(p), ConnectRetry::Off, deadline)
                .await
        }));
        recycle.as_mut().poll(cx).map_ok(Checked::Conn)
    }

    /// What a queued reservation got.
    fn granted<C, T>(
        &mut self,
        pool: &Pool<C, T>,
        got: Result<Grant<Entry<X>>, WaitError>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Checked<X>, PoolError>>
    where
        C: Connector<T> + Service<T, Response = X>,
        T: Target,
    {
        let core = &pool.handle.inner.core;
        match pool.granted(got) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(Grant::Idle(e)) => match core.checkout_or_keep_slot::<false>(e) {
                Some(mut p) => {
                    if pool.wants_recycle(&mut p) {
                        self.recycle(pool, p, cx)
                    } else {
                        Poll::Ready(Ok(Checked::Conn(p)))
                    }
                }
                // Expired: its slot is the reservation's.
                None => Poll::Ready(Ok(Checked::Slot(HeldSlot::new(core.clone())))),
            },
            Ok(Grant::Create) => Poll::Ready(Ok(Checked::Slot(HeldSlot::new(core.clone())))),
        }
    }
}

/// The future of [`Pool`] and [`KeyedPool`](crate::KeyedPool) used as a `Service`.
///
/// # Cancel safety
///
/// Cancel safe, like [`Pool::get`]: dropping it leaves no slot, waiter or half-made
/// connection behind.
pub struct PoolFuture<X> {
    inner: Pin<Box<dyn Future<Output = Result<Pooled<X>, PoolError>> + Send>>,
}

impl<X> PoolFuture<X> {
    pub(crate) fn new(
        f: impl Future<Output = Result<Pooled<X>, PoolError>> + Send + 'static,
    ) -> Self {
        PoolFuture { inner: Box::pin(f) }
    }
}

impl<X> fmt::Debug for PoolFuture<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolFuture").finish_non_exhaustive()
    }
}

impl<X> Future for PoolFuture<X> {
    type Output = Result<Pooled<X>, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
/// A pool is a `Service` from its target to a checked-out connection, so a pool of
/// streams is a [`tower::make::MakeConnection`]. It is always ready: backpressure is the
/// wait inside the call, bounded by `acquire_timeout`. Calling it with any other target
/// fails with [`PoolError::WrongTarget`]; use [`KeyedPool`](crate::KeyedPool) for many.
impl<C, T> Service<T> for Pool<C, T>
where
    C: Connector<T>,
    T: Target + PartialEq,
{
    type Response = Pooled<C::Response>;
    type Error = PoolError;
    type Future = PoolFuture<C::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: T) -> Self::Future {
        if target != self.handle.inner.target {
            return PoolFuture::new(async { Err(PoolError::WrongTarget) });
        }
        let pool = self.clone();
        PoolFuture::new(async move { pool.get().await })
    }
}
