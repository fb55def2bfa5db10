//! `Pool`: the handle, the shared core and the background maintenance task.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::{BoxError, Probe};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tower_service::Service;

use crate::check::default_check;
use crate::config::{Config, Problem, Reuse};
use crate::error::{ConnectTimeout, PoolError};
use crate::pooled::Pooled;
use crate::slots::{Closed, Grant, NEVER, Slots, WaitError, Waiter};
use crate::stats::{ConnStats, PoolStats};

/// A synchronous liveness check of an idle connection, run at checkout.
pub(crate) type CheckFn<X> = Arc<dyn Fn(&mut X) -> bool + Send + Sync>;

/// A connection in the pool, with its bookkeeping.
pub(crate) struct Entry<X> {
    pub(crate) conn: X,
    pub(crate) meta: Arc<ConnMeta>,
}

/// Per-connection bookkeeping, shared with the stats registry.
pub(crate) struct ConnMeta {
    pub(crate) id: u64,
    created_at: Instant,
    created_ms: u64,
    returned_ms: AtomicU64,
    pub(crate) uses: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// Why a connection was closed (for stats and events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Broken,
    IdleTimeout,
    Lifetime,
    HealthCheck,
    Closed,
    Shrunk,
    Detached,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Broken => "broken",
            Reason::IdleTimeout => "idle_timeout",
            Reason::Lifetime => "max_lifetime",
            Reason::HealthCheck => "health_check",
            Reason::Closed => "closed",
            Reason::Shrunk => "shrunk",
            Reason::Detached => "detached",
        }
    }

    fn is_eviction(self) -> bool {
        matches!(
            self,
            Reason::IdleTimeout | Reason::Lifetime | Reason::HealthCheck
        )
    }
}

/// Milliseconds since the pool started, refreshed by the maintenance task and by slow
/// paths. The hot path reads it instead of the system clock (a clock read costs about
/// 30 ns here, half of a whole checkout), so idle and lifetime limits are enforced at
/// checkout with the maintenance tick's granularity (at most one second).
struct Clock {
    epoch: Instant,
    now_ms: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }

    fn coarse_ms(&self) -> u64 {
        self.now_ms.load(Relaxed)
    }

    /// `at` in nanoseconds since the epoch (the unit of waiter deadlines).
    fn ns_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos().min(NEVER as u128 - 1) as u64
    }

    /// Reads tokio's clock and publishes it; returns it in milliseconds.
    fn refresh(&self) -> u64 {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.now_ms.fetch_max(ms, Relaxed);
        ms
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) created: AtomicU64,
    pub(crate) destroyed: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) retired_uses: AtomicU64,
}

/// The part of a pool that checked-out connections point back to. It does not know the
/// connector, so `Pooled<X>` has one type parameter.
///
/// `slots` comes first so its lock shares a cache line with the `Arc`'s counters, which
/// every checkout touches too.
#[repr(C)]
pub(crate) struct Core<X> {
    pub(crate) slots: Slots<Entry<X>>,
    clock: Clock,
    idle_timeout_ms: u64,
    max_lifetime_ms: u64,
    check: Option<CheckFn<X>>,
    pub(crate) counters: Counters,
    registry: Mutex<HashMap<u64, Arc<ConnMeta>>>,
    next_id: AtomicU64,
    drained: Notify,
    refilled: Notify,
    pub(crate) connecting: AtomicUsize,
    probing: AtomicUsize,
    /// Wakes the deadline timer (see [`expire_waiters`]).
    timer: Notify,
    timer_started: AtomicBool,
    pub(crate) name: Arc<str>,
}

fn as_ms(d: Option<Duration>) -> u64 {
    d.map_or(u64::MAX, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl<X> Core<X> {
    /// Why `meta`'s connection must not be used any more at `now_ms`, if it must not.
    fn expired(&self, meta: &ConnMeta, now_ms: u64) -> Option<Reason> {
        if now_ms.saturating_sub(meta.created_ms) >= self.max_lifetime_ms {
            Some(Reason::Lifetime)
        } else if now_ms.saturating_sub(meta.returned_ms.load(Relaxed)) >= self.idle_timeout_ms {
            Some(Reason::IdleTimeout)
        } else {
            None
        }
    }

    /// Turns an idle entry just taken (its slot held) into a checked-out connection, or
    /// closes it when it expired or fails the liveness check.
    pub(crate) fn checkout(self: &Arc<Self>, mut e: Entry<X>) -> Option<Pooled<X>> {
        if let Some(reason) = self.expired(&e.meta, self.clock.coarse_ms()) {
            self.retire(e, reason, true);
            return None;
        }
        if self.check.as_ref().is_some_and(|check| !check(&mut e.conn)) {
            self.retire(e, Reason::Broken, true);
            return None;
        }
        // Only the holder of a connection writes its counter: no read-modify-write needed.
        e.meta.uses.store(e.meta.uses.load(Relaxed) + 1, Relaxed);
        Some(Pooled::new(e, self.clone()))
    }

    /// Takes back a checked-out connection.
    pub(crate) fn give_back(&self, e: Entry<X>, broken: bool) {
        if broken {
            e.meta.errors.fetch_add(1, Relaxed);
            self.retire(e, Reason::Broken, true);
            return;
        }
        let now = self.clock.coarse_ms();
        if now.saturating_sub(e.meta.created_ms) >= self.max_lifetime_ms {
            self.retire(e, Reason::Lifetime, true);
            return;
        }
        e.meta.returned_ms.store(now, Relaxed);
        if let Some(e) = self.slots.put(e) {
            let reason = if self.slots.snapshot().closed {
                Reason::Closed
            } else {
                Reason::Shrunk
            };
            self.retire(e, reason, false);
        }
    }

    /// Closes a connection: bookkeeping, event, drop; frees its slot if it still holds one.
    pub(crate) fn retire(&self, e: Entry<X>, reason: Reason, release_slot: bool) {
        let Entry { conn, meta } = e;
        self.forget(&meta);
        drop(conn);
        self.counters.destroyed.fetch_add(1, Relaxed);
        if reason.is_eviction() {
            self.counters.evicted.fetch_add(1, Relaxed);
        }
        tracing::debug!(pool = %self.name, id = meta.id, reason = reason.as_str(), "connection closed");
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("marina_pool_connections_closed_total", "pool" => self.name.to_string(), "reason" => reason.as_str()).increment(1);
            if reason.is_eviction() {
                metrics::counter!("marina_pool_connections_evicted_total", "pool" => self.name.to_string()).increment(1);
            }
        }
        if release_slot {
            self.slots.release();
        }
        self.drained.notify_waiters();
    }

    pub(crate) fn forget(&self, meta: &ConnMeta) {
        crate::sync::lock_std(&self.registry).remove(&meta.id);
        self.counters
            .retired_uses
            .fetch_add(meta.uses.load(Relaxed), Relaxed);
    }

    fn register(&self, conn: X) -> Entry<X> {
        let now = self.clock.refresh();
        let meta = Arc::new(ConnMeta {
            id: self.next_id.fetch_add(1, Relaxed),
            created_at: Instant::now(),
            created_ms: now,
            returned_ms: AtomicU64::new(now),
            uses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        crate::sync::lock_std(&self.registry).insert(meta.id, meta.clone());
        self.counters.created.fetch_add(1, Relaxed);
        tracing::debug!(pool = %self.name, id = meta.id, "connection opened");
        #[cfg(feature = "metrics")]
        metrics::counter!("marina_pool_connections_created_total", "pool" => self.name.to_string())
            .increment(1);
        Entry { conn, meta }
    }

    /// Closes the slots, closes idle connections and stops the deadline timer.
    fn shut(&self) {
        for e in self.slots.close() {
            self.retire(e, Reason::Closed, false);
        }
        self.timer.notify_one();
    }

    /// Counts a checkout that gave up after `limit` and makes its error.
    fn timed_out(&self, limit: Option<Duration>) -> PoolError {
        let limit = limit.unwrap_or_default();
        self.counters.timed_out.fetch_add(1, Relaxed);
        tracing::debug!(pool = %self.name, ?limit, "checkout timed out");
        #[cfg(feature = "metrics")]
        metrics::counter!("marina_pool_timeouts_total", "pool" => self.name.to_string()).increment(1);
        PoolError::Timeout(limit)
    }

    /// A waiter with a deadline was queued: make sure the deadline timer runs and is
    /// awake.
    fn arm_timer(self: &Arc<Self>, wake: bool)
    where
        X: Send + 'static,
    {
        if !self.timer_started.load(Relaxed) && !self.timer_started.swap(true, Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(expire_waiters(self.clone()));
                }
                // Not in a runtime: waiters wait without a deadline until one is.
                Err(_) => self.timer_started.store(false, Relaxed),
            }
        }
        if wake {
            self.timer.notify_one();
        }
    }

    fn stats(&self) -> PoolStats {
        let snap = self.slots.snapshot();
        let connecting = self.connecting.load(Relaxed);
        let probing = self.probing.load(Relaxed);
        let total = snap.open.saturating_sub(connecting);
        let idle = (snap.idle + probing).min(total);
        let active = total - idle;
        let mut idle_ids = Vec::with_capacity(snap.idle);
        self.slots.for_each_idle(|e| idle_ids.push(e.meta.id));
        let now = Instant::now();
        let now_ms = self.clock.refresh();
        let registry = crate::sync::lock_std(&self.registry);
        let mut acquired = self.counters.retired_uses.load(Relaxed);
        let mut connections: Vec<ConnStats> = registry
            .values()
            .map(|m| {
                let uses = m.uses.load(Relaxed);
                acquired += uses;
                ConnStats {
                    id: m.id,
                    age: now.saturating_duration_since(m.created_at),
                    idle_for: idle_ids.contains(&m.id).then(|| {
                        Duration::from_millis(now_ms.saturating_sub(m.returned_ms.load(Relaxed)))
                    }),
                    uses,
                    errors: m.errors.load(Relaxed),
                }
            })
            .collect();
        drop(registry);
        connections.sort_by_key(|c| c.id);
        let c = &self.counters;
        PoolStats {
            max_size: snap.max,
            total,
            idle,
            active,
            connecting,
            waiting: snap.waiting,
            created: c.created.load(Relaxed),
            acquired,
            released: acquired.saturating_sub(active as u64),
            destroyed: c.destroyed.load(Relaxed),
            evicted: c.evicted.load(Relaxed),
            timed_out: c.timed_out.load(Relaxed),
            failed: c.failed.load(Relaxed),
            cancelled: c.cancelled.load(Relaxed),
            closed: snap.closed,
            connections,
        }
    }
}

/// Holds a `Create` grant while a connect runs: if the connect is cancelled or fails,
/// the slot goes back (to a waiter, if any).
struct Connecting<'a, X> {
    core: &'a Core<X>,
    armed: bool,
}

impl<'a, X> Connecting<'a, X> {
    fn new(core: &'a Core<X>) -> Self {
        core.connecting.fetch_add(1, Relaxed);
        Connecting { core, armed: true }
    }

    fn done(mut self) {
        self.armed = false;
        self.core.connecting.fetch_sub(1, Relaxed);
    }
}

impl<X> Drop for Connecting<'_, X> {
    fn drop(&mut self) {
        if self.armed {
            self.core.connecting.fetch_sub(1, Relaxed);
            self.core.counters.cancelled.fetch_add(1, Relaxed);
            self.core.slots.release();
            self.core.drained.notify_waiters();
        }
    }
}

/// A queued `get()`: withdraws itself from the queue when dropped.
struct Wait<'a, X> {
    core: &'a Core<X>,
    waiter: Option<Arc<Waiter<Entry<X>>>>,
}

impl<X> Future for Wait<'_, X> {
    type Output = Result<Grant<Entry<X>>, WaitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let w = self.waiter.as_ref().expect("polled after completion");
        let r = std::task::ready!(self.core.slots.poll_waiter(w, cx));
        self.waiter = None;
        Poll::Ready(r)
    }
}

impl<X> Drop for Wait<'_, X> {
    fn drop(&mut self) {
        if let Some(w) = self.waiter.take() {
            if let Some(e) = self.core.slots.cancel(&w) {
                self.core.retire(e, Reason::Closed, false);
            }
        }
    }
}

/// Everything a pool for one target needs: the core plus the connector.
struct Inner<C, T>
where
    C: Service<T>,
{
    core: Arc<Core<C::Response>>,
    connector: C,
    target: T,
    config: Config,
    probe: Option<Arc<dyn Probe<C::Response>>>,
    connect_gate: Semaphore,
    maintenance: AtomicBool,
}

impl<C, T> Drop for Inner<C, T>
where
    C: Service<T>,
{
    fn drop(&mut self) {
        // The last handle is gone: close so idle connections (and the core they would
        // keep alive) are freed now; checked-out ones are closed when they come back.
        self.core.shut();
    }
}

/// A bounded pool of connections to one target, made by a connector `C: Service<T>`.
///
/// `Pool` is a cheap, `Clone`able handle; clones share the pool. When the last handle
/// is dropped the pool closes: idle connections are closed at once, checked-out ones
/// when they are returned, and the background task ends.
///
/// The pooled item `C::Response` can be a raw stream (`TcpStream`) or a protocol client
/// built on one. A checkout is a [`Pooled`] guard that returns the connection on drop.
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
    inner: Arc<Inner<C, T>>,
}

impl<C, T> Clone for Pool<C, T>
where
    C: Service<T>,
{
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<C, T> fmt::Debug for Pool<C, T>
where
    C: Service<T>,
    T: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.inner.core.slots.snapshot();
        f.debug_struct("Pool")
            .field("target", &self.inner.target)
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
    /// Closes without waiting (the first step of [`close`](Self::close)).
    pub(crate) fn begin_close(&self) {
        self.inner.core.shut();
    }

    /// True when the pool holds no connection, connects nothing and nobody waits.
    pub(crate) fn is_empty_and_unused(&self) -> bool {
        let s = self.inner.core.slots.snapshot();
        s.open == 0 && s.waiting == 0
    }
}

impl Pool<crate::TcpConnector, std::net::SocketAddr> {
    /// Starts configuring a pool; finish with [`Builder::build`].
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl<C, T> Pool<C, T>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + fmt::Debug + Send + Sync + 'static,
{
    /// Builds a pool from `config` (see [`Builder`] for hooks). Fails with
    /// [`PoolError::Invalid`] when the configuration has errors.
    pub fn new(config: Config, connector: C, target: T) -> Result<Self, PoolError> {
        Builder::from(config).build(connector, target)
    }

    fn from_parts(builder: &Builder, connector: C, target: T) -> Result<Self, PoolError> {
        let config = builder.config.clone();
        let report = config.validate();
        if !report.is_ok() {
            return Err(PoolError::Invalid(report.errors));
        }
        let name: Arc<str> = match &builder.name {
            Some(n) => n.clone(),
            None => format!("{target:?}").into(),
        };
        for a in &report.advisories {
            tracing::warn!(pool = %name, "{a}");
        }
        let check: Option<CheckFn<C::Response>> = match &builder.check {
            None => default_check::<C::Response>(),
            Some(any) => Some(
                any.downcast_ref::<CheckFn<C::Response>>()
                    .cloned()
                    .ok_or_else(|| type_mismatch("check"))?,
            ),
        };
        let probe = match &builder.probe {
            None => None,
            Some(any) => Some(
                any.downcast_ref::<Arc<dyn Probe<C::Response>>>()
                    .cloned()
                    .ok_or_else(|| type_mismatch("probe"))?,
            ),
        };
        let core = Arc::new(Core {
            slots: Slots::new(config.max_size, config.reuse == Reuse::Lifo),
            clock: Clock::new(),
            idle_timeout_ms: as_ms(config.idle_timeout),
            max_lifetime_ms: as_ms(config.max_lifetime),
            check,
            counters: Counters::default(),
            registry: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            drained: Notify::new(),
            refilled: Notify::new(),
            connecting: AtomicUsize::new(0),
            probing: AtomicUsize::new(0),
            timer: Notify::new(),
            timer_started: AtomicBool::new(false),
            name,
        });
        let pool = Pool {
            inner: Arc::new(Inner {
                core,
                connect_gate: Semaphore::new(config.max_connecting),
                connector,
                target,
                config,
                probe,
                maintenance: AtomicBool::new(false),
            }),
        };
        pool.start_maintenance();
        Ok(pool)
    }

    /// Checks out a connection: an idle one if there is one, else a new one if the
    /// pool has room, else waits in FIFO order for one to be returned.
    ///
    /// Fails with [`PoolError::Timeout`] after `acquire_timeout` in all,
    /// [`PoolError::Connect`] at once when a connect fails, [`PoolError::Closed`] when the
    /// pool is or gets closed. Idle connections that expired or whose socket was closed
    /// by the peer are closed, not handed out.
    ///
    /// Takes part in tokio's cooperative budget, like `tokio::sync::Semaphore`: a task
    /// that loops on a ready pool still yields to others now and then.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropping the future at any point leaves nothing behind: a queued
    /// waiter is withdrawn (a connection already handed to it goes to the next waiter or
    /// back to the idle queue), and a connect in flight is dropped and its slot freed
    /// (counted in [`PoolStats::cancelled`]).
    pub fn get(&self) -> impl Future<Output = Result<Pooled<C::Response>, PoolError>> + Send + '_ {
        Checkout {
            pool: self,
            slow: None,
        }
    }

    /// The fast path: an idle connection if one is ready.
    #[inline]
    fn try_checkout(&self) -> FastPath<C::Response> {
        let core = &self.inner.core;
        loop {
            match core.slots.try_acquire() {
                Err(Closed) => return FastPath::Closed,
                Ok(Some(Grant::Idle(e))) => {
                    if let Some(p) = core.checkout(e) {
                        return FastPath::Ready(p);
                    }
                }
                Ok(Some(Grant::Create)) => return FastPath::Slow(Some(Grant::Create)),
                Ok(None) => return FastPath::Slow(None),
            }
        }
    }

    /// Checks out an idle connection if one is ready now, without waiting or connecting.
    ///
    /// `Ok(None)` when none is idle (or others are already waiting: they go first).
    pub fn try_get(&self) -> Result<Option<Pooled<C::Response>>, PoolError> {
        let core = &self.inner.core;
        loop {
            match core.slots.try_acquire() {
                Err(Closed) => return Err(PoolError::Closed),
                Ok(Some(Grant::Idle(e))) => {
                    if let Some(p) = core.checkout(e) {
                        return Ok(Some(p));
                    }
                }
                Ok(Some(Grant::Create)) => {
                    core.slots.release();
                    return Ok(None);
                }
                Ok(None) => return Ok(None),
            }
        }
    }

    async fn get_slow(
        &self,
        mut grant: Option<Grant<Entry<C::Response>>>,
    ) -> Result<Pooled<C::Response>, PoolError> {
        self.start_maintenance();
        let core = &self.inner.core;
        let limit = self.inner.config.acquire_timeout;
        // One clock read per slow checkout: waiting costs hundreds of nanoseconds anyway.
        let now = Instant::now();
        let deadline = limit.and_then(|l| now.checked_add(l));
        let deadline_ns = deadline.map_or(NEVER, |d| core.clock.ns_at(d));
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
                            core,
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
            match g {
                Grant::Idle(e) => {
                    if let Some(p) = core.checkout(e) {
                        return Ok(p);
                    }
                }
                Grant::Create => {
                    let guard = Connecting::new(core);
                    let conn = match deadline {
                        None => self.inner.connect().await,
                        Some(d) => match tokio::time::timeout_at(d, self.inner.connect()).await {
                            Ok(r) => r,
                            // Dropping `guard` frees the slot and counts the cancel.
                            Err(_) => return Err(core.timed_out(limit)),
                        },
                    };
                    guard.done();
                    match conn {
                        Ok(conn) => {
                            let e = core.register(conn);
                            e.meta.uses.store(1, Relaxed);
                            return Ok(Pooled::new(e, core.clone()));
                        }
                        Err(err) => {
                            core.counters.failed.fetch_add(1, Relaxed);
                            core.slots.release();
                            core.drained.notify_waiters();
                            return Err(PoolError::Connect(err));
                        }
                    }
                }
            }
        }
    }

    /// A snapshot of the pool's gauges, counters and connections.
    pub fn stats(&self) -> PoolStats {
        self.inner.core.stats()
    }

    /// The configuration the pool was built with (`max_size` as built; see
    /// [`stats`](Self::stats) for the current one after a [`resize`](Self::resize)).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The target this pool connects to.
    pub fn target(&self) -> &T {
        &self.inner.target
    }

    /// Changes `max_size` at run time. Growing lets waiters connect at once; shrinking
    /// closes idle connections over the new size now and checked-out ones as they are
    /// returned, until the pool fits. A `max_size` of 0 is raised to 1.
    pub fn resize(&self, max_size: usize) {
        let core = &self.inner.core;
        for e in core.slots.resize(max_size.max(1)) {
            core.retire(e, Reason::Shrunk, false);
        }
    }

    /// Waits until `min_idle` connections are idle (opening them here if the background
    /// warm-up has not), or the pool is full. Returns the first connect error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: connects it started are dropped and their slots freed.
    pub async fn ready_min(&self) -> Result<(), PoolError> {
        self.start_maintenance();
        let core = &self.inner.core;
        let min = self.inner.config.min_idle;
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
            if self.inner.refill().await? == 0 && snap.refilling > 0 {
                refilled.await;
            }
        }
    }

    /// Closes the pool: waiters fail with [`PoolError::Closed`], later `get`s too, idle
    /// connections are closed now; then waits until every checked-out connection has
    /// been returned (and closed) and every connect in flight has ended.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pool is closed once this is first polled; dropping the future
    /// only stops the waiting.
    pub async fn close(&self) {
        let core = &self.inner.core;
        self.begin_close();
        tracing::info!(pool = %core.name, "pool closed");
        loop {
            let drained = core.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if core.slots.snapshot().open == 0 {
                return;
            }
            drained.await;
        }
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.core.slots.snapshot().closed
    }

    fn start_maintenance(&self) {
        if self.inner.maintenance.load(Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.maintenance.swap(true, Relaxed) {
            return;
        }
        rt.spawn(maintain(Arc::downgrade(&self.inner)));
    }
}

/// What the fast path of a checkout found.
enum FastPath<X> {
    Ready(Pooled<X>),
    Closed,
    /// Wait or connect, starting with this grant if there is one.
    Slow(Option<Grant<Entry<X>>>),
}

type SlowCheckout<'a, X> = Pin<Box<dyn Future<Output = Result<Pooled<X>, PoolError>> + Send + 'a>>;

/// The future of [`Pool::get`]: the fast path runs inline; waiting and connecting run
/// in a boxed future made only when needed, so the common case stays small and cheap.
struct Checkout<'a, C, T>
where
    C: Service<T>,
{
    pool: &'a Pool<C, T>,
    slow: Option<SlowCheckout<'a, C::Response>>,
}

impl<C, T> Future for Checkout<'_, C, T>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + fmt::Debug + Send + Sync + 'static,
{
    type Output = Result<Pooled<C::Response>, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(slow) = self.slow.as_mut() {
            return slow.as_mut().poll(cx);
        }
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        coop.made_progress();
        let first = match self.pool.try_checkout() {
            FastPath::Ready(p) => return Poll::Ready(Ok(p)),
            FastPath::Closed => return Poll::Ready(Err(PoolError::Closed)),
            FastPath::Slow(first) => first,
        };
        // A `Create` grant moves into the slow future, which guards it from its first
        // poll, right below, on: no await point comes between.
        let pool = self.pool;
        let slow = self.slow.insert(Box::pin(pool.get_slow(first)));
        slow.as_mut().poll(cx)
    }
}

impl<C, T> Inner<C, T>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + fmt::Debug + Send + Sync + 'static,
{
    /// One connect: waits for a `max_connecting` permit, then the connector, bounded by
    /// `connect_timeout`.
    async fn connect(&self) -> Result<C::Response, BoxError> {
        let _permit = self.connect_gate.acquire().await.map_err(BoxError::from)?;
        let mut svc = self.connector.clone();
        let target = self.target.clone();
        let attempt = async move {
            poll_fn(|cx| svc.poll_ready(cx)).await.map_err(Into::into)?;
            svc.call(target).await.map_err(Into::into)
        };
        let r = match self.config.connect_timeout {
            None => attempt.await,
            Some(timeout) => match tokio::time::timeout(timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Err(ConnectTimeout {
                    timeout,
                    target: format!("{:?}", self.target),
                }
                .into()),
            },
        };
        if let Err(e) = &r {
            tracing::warn!(pool = %self.core.name, error = %e, "connect failed");
            #[cfg(feature = "metrics")]
            metrics::counter!("marina_pool_connect_errors_total", "pool" => self.core.name.to_string()).increment(1);
        }
        r
    }

    /// Opens connections until `min_idle` are idle (or being opened). Returns how many
    /// it started; fails with the first connect error.
    async fn refill(self: &Arc<Self>) -> Result<usize, PoolError> {
        let min = self.config.min_idle;
        let mut set = tokio::task::JoinSet::new();
        while self.core.slots.try_reserve_refill(min) {
            let inner = self.clone();
            set.spawn(async move { inner.refill_one().await });
        }
        let started = set.len();
        let mut first = None;
        while let Some(r) = set.join_next().await {
            if let Ok(Err(e)) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(started), Err)
    }

    async fn refill_one(&self) -> Result<(), PoolError> {
        struct Reserved<'a, X> {
            core: &'a Core<X>,
            armed: bool,
        }
        impl<X> Drop for Reserved<'_, X> {
            fn drop(&mut self) {
                if self.armed {
                    self.core.connecting.fetch_sub(1, Relaxed);
                    self.core.counters.cancelled.fetch_add(1, Relaxed);
                    self.core.slots.refilled(None);
                    self.core.refilled.notify_waiters();
                }
            }
        }
        let core = &*self.core;
        core.connecting.fetch_add(1, Relaxed);
        let mut reserved = Reserved { core, armed: true };
        let r = self.connect().await;
        reserved.armed = false;
        core.connecting.fetch_sub(1, Relaxed);
        let out = match r {
            Ok(conn) => {
                let e = core.register(conn);
                if let Some(e) = core.slots.refilled(Some(e)) {
                    core.retire(e, Reason::Closed, false);
                }
                Ok(())
            }
            Err(err) => {
                core.counters.failed.fetch_add(1, Relaxed);
                core.slots.refilled(None);
                core.drained.notify_waiters();
                Err(PoolError::Connect(err))
            }
        };
        core.refilled.notify_waiters();
        out
    }

    fn evict(&self) {
        let core = &*self.core;
        let now = core.clock.refresh();
        let mut reasons = Vec::new();
        let out = core.slots.evict_idle(|e| match core.expired(&e.meta, now) {
            Some(r) => {
                reasons.push(r);
                true
            }
            None => false,
        });
        for (e, r) in out.into_iter().zip(reasons) {
            core.retire(e, r, false);
        }
    }

    /// Validates idle connections that have been idle for at least the health-check
    /// interval, one at a time so the others stay available.
    async fn health_check(&self, interval: Duration) {
        let core = &*self.core;
        let now = core.clock.refresh();
        let min_idle_ms = interval.as_millis() as u64;
        let mut seen = Vec::new();
        loop {
            let mut batch = core.slots.take_idle(1, |e| {
                !seen.contains(&e.meta.id)
                    && now.saturating_sub(e.meta.returned_ms.load(Relaxed)) >= min_idle_ms
            });
            let Some(mut e) = batch.pop() else { return };
            seen.push(e.meta.id);
            core.probing.fetch_add(1, Relaxed);
            let mut ok = core.check.as_ref().is_none_or(|check| check(&mut e.conn));
            if ok {
                if let Some(probe) = &self.probe {
                    let limit = self.config.health_check_timeout;
                    ok = matches!(
                        tokio::time::timeout(limit, probe.probe(&mut e.conn)).await,
                        Ok(Ok(_))
                    );
                }
            }
            core.probing.fetch_sub(1, Relaxed);
            if ok {
                if let Some(e) = core.slots.put(e) {
                    core.retire(e, Reason::Closed, false);
                }
            } else {
                tracing::debug!(pool = %core.name, id = e.meta.id, "idle connection failed its health check");
                core.retire(e, Reason::HealthCheck, true);
            }
        }
    }
}

/// The deadline timer: one task per pool (started by the first waiter with a
/// deadline) times out queued waiters in order. Waiters share one timeout, so the
/// front waiter is always due first and one sleep serves the whole queue, where a
/// timer per waiter would cost a timer-wheel insert and removal on every wait. Ends
/// when the pool is closed.
async fn expire_waiters<X: Send + 'static>(core: Arc<Core<X>>) {
    loop {
        let woken = core.timer.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if core.slots.snapshot().closed {
            return;
        }
        match core.slots.next_deadline() {
            None => woken.await,
            Some(due) => {
                tokio::time::sleep_until(core.clock.epoch + Duration::from_nanos(due)).await;
                core.slots.expire(core.clock.ns_at(Instant::now()));
            }
        }
    }
}

/// The background task: one per pool, ends when the last handle is dropped or the
/// pool is closed.
async fn maintain<C, T>(weak: Weak<Inner<C, T>>)
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + fmt::Debug + Send + Sync + 'static,
{
    let (evict_every, health_every, tick) = {
        let Some(inner) = weak.upgrade() else { return };
        let c = &inner.config;
        let mut tick = c.eviction_interval;
        if let Some(h) = c.health_check_interval {
            tick = tick.min(h);
        }
        if c.idle_timeout.is_some() || c.max_lifetime.is_some() {
            // The coarse clock that checkouts read is refreshed at least every second.
            tick = tick.min(Duration::from_secs(1));
        }
        (c.eviction_interval, c.health_check_interval, tick)
    };
    let start = Instant::now();
    let mut next_evict = start + evict_every;
    let mut next_health = health_every.map(|h| start + h);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.core.slots.snapshot().closed {
            return;
        }
        inner.core.clock.refresh();
        let now = Instant::now();
        if now >= next_evict {
            inner.evict();
            next_evict = now + evict_every;
        }
        if let (Some(at), Some(every)) = (next_health, health_every) {
            if now >= at {
                inner.health_check(every).await;
                next_health = Some(Instant::now() + every);
            }
        }
        if let Err(e) = inner.refill().await {
            tracing::debug!(pool = %inner.core.name, error = %e, "refill to min_idle failed");
        }
        #[cfg(feature = "metrics")]
        {
            let s = inner.core.stats();
            let name = inner.core.name.to_string();
            metrics::gauge!("marina_pool_connections", "pool" => name.clone(), "state" => "idle")
                .set(s.idle as f64);
            metrics::gauge!("marina_pool_connections", "pool" => name.clone(), "state" => "active")
                .set(s.active as f64);
            metrics::gauge!("marina_pool_connections", "pool" => name.clone(), "state" => "connecting").set(s.connecting as f64);
            metrics::gauge!("marina_pool_waiting", "pool" => name).set(s.waiting as f64);
        }
    }
}

fn type_mismatch(hook: &str) -> PoolError {
    PoolError::Invalid(vec![Problem {
        field: if hook == "probe" { "probe" } else { "check" },
        message: format!(
            "the {hook} was written for another connection type than the connector makes"
        ),
    }])
}

/// Configures and builds a [`Pool`]: a method per [`Config`] field, plus the liveness
/// hooks. Start from [`Pool::builder`] or from a [`Config`] (`Builder::from(config)`).
#[derive(Clone, Default)]
pub struct Builder {
    pub(crate) config: Config,
    name: Option<Arc<str>>,
    check: Option<Arc<dyn Any + Send + Sync>>,
    probe: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("name", &self.name)
            .field("check", &self.check.is_some())
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl From<Config> for Builder {
    fn from(config: Config) -> Self {
        Builder {
            config,
            ..Builder::default()
        }
    }
}

macro_rules! knobs {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $conv:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            #[allow(clippy::redundant_closure_call)]
            { self.config.$name = ($conv)(value); }
            self
        }
    )*};
}

impl Builder {
    knobs! {
        /// See [`Config::min_idle`].
        min_idle: usize => |v| v;
        /// See [`Config::max_size`].
        max_size: usize => |v| v;
        /// See [`Config::acquire_timeout`].
        acquire_timeout: Duration => Some;
        /// See [`Config::connect_timeout`].
        connect_timeout: Duration => Some;
        /// See [`Config::idle_timeout`].
        idle_timeout: Duration => Some;
        /// See [`Config::max_lifetime`].
        max_lifetime: Duration => Some;
        /// See [`Config::health_check_interval`].
        health_check_interval: Duration => Some;
        /// See [`Config::health_check_timeout`].
        health_check_timeout: Duration => |v| v;
        /// See [`Config::eviction_interval`].
        eviction_interval: Duration => |v| v;
        /// See [`Config::max_connecting`].
        max_connecting: usize => |v| v;
        /// See [`Config::reuse`].
        reuse: Reuse => |v| v;
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Disables (or re-enables with `Some`) the acquire timeout; see [`Config::acquire_timeout`].
    pub fn acquire_timeout_opt(mut self, value: Option<Duration>) -> Self {
        self.config.acquire_timeout = value;
        self
    }

    /// Disables idle timeout and max lifetime: connections live until they break.
    pub fn no_expiry(mut self) -> Self {
        self.config.idle_timeout = None;
        self.config.max_lifetime = None;
        self
    }

    /// Names the pool in events and metrics (default: the target's `Debug` text).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into().into());
        self
    }

    /// Replaces the liveness check run on an idle connection at checkout and before a
    /// background probe. It must be cheap (no I/O on the wire): return `false` if the
    /// connection is known to be unusable.
    ///
    /// The default checks socket state for `TcpStream` (and `UnixStream`, and hyper-util's
    /// `TokioIo` of either): a connection whose peer closed it (EOF or RST), or that has
    /// unread bytes waiting (a previous user did not read its whole reply), is closed
    /// instead of handed out. Other types pass.
    pub fn check<X, F>(mut self, check: F) -> Self
    where
        X: 'static,
        F: Fn(&mut X) -> bool + Send + Sync + 'static,
    {
        let f: CheckFn<X> = Arc::new(check);
        self.check = Some(Arc::new(f));
        self
    }

    /// Adds a [`Probe`] run on idle connections every `health_check_interval` (for
    /// example a ping). A probe that fails or outlasts `health_check_timeout` closes the
    /// connection.
    pub fn probe<X, P>(mut self, probe: P) -> Self
    where
        X: 'static,
        P: Probe<X>,
    {
        let p: Arc<dyn Probe<X>> = Arc::new(probe);
        self.probe = Some(Arc::new(p));
        self
    }

    /// The configuration so far.
    pub fn get_config(&self) -> &Config {
        &self.config
    }

    /// Builds the pool for `target`, opened through `connector`.
    ///
    /// Warm-up to `min_idle` starts in the background at once when called inside a tokio
    /// runtime (else on first use); [`Pool::ready_min`] waits for it.
    ///
    /// Fails with [`PoolError::Invalid`] listing every configuration error, or when a
    /// `check`/`probe` hook was written for another connection type.
    pub fn build<C, T>(&self, connector: C, target: T) -> Result<Pool<C, T>, PoolError>
    where
        C: Service<T> + Clone + Send + Sync + 'static,
        C::Response: Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
        T: Clone + fmt::Debug + Send + Sync + 'static,
    {
        Pool::from_parts(self, connector, target)
    }
}

/// The future of [`Pool`] and [`KeyedPool`](crate::KeyedPool) used as a `Service`.
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
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + PartialEq + fmt::Debug + Send + Sync + 'static,
{
    type Response = Pooled<C::Response>;
    type Error = PoolError;
    type Future = PoolFuture<C::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: T) -> Self::Future {
        if target != self.inner.target {
            return PoolFuture::new(async { Err(PoolError::WrongTarget) });
        }
        let pool = self.clone();
        PoolFuture::new(async move { pool.get().await })
    }
}
