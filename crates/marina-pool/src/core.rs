//! The shared core of a pool: slot accounting, per-connection bookkeeping, the coarse
//! clock, and the waiting machinery (waiter futures and the deadline timer).

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Config, Reuse};
use crate::error::PoolError;
use crate::manage::Hooks;
use crate::pooled::Pooled;
use crate::service::Reservations;
use crate::slots::{Grant, NEVER, Slots, WaitError, Waiter};
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
    pub(crate) returned_ms: AtomicU64,
    pub(crate) uses: AtomicU64,
    /// Checkouts of it that ended (returned, closed or detached).
    pub(crate) releases: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl ConnMeta {
    /// Counts one more checkout ending. Only the holder writes it: no read-modify-write.
    pub(crate) fn released(&self) {
        self.releases
            .store(self.releases.load(Relaxed) + 1, Relaxed);
    }
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

    pub(crate) fn is_eviction(self) -> bool {
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
pub(crate) struct Clock {
    pub(crate) epoch: Instant,
    now_ms: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn coarse_ms(&self) -> u64 {
        self.now_ms.load(Relaxed)
    }

    /// `at` in nanoseconds since the epoch (the unit of waiter deadlines).
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(NEVER as u128 - 1) as u64
    }

    /// Reads tokio's clock and publishes it; returns it in milliseconds.
    pub(crate) fn refresh(&self) -> u64 {
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
    pub(crate) retired_releases: AtomicU64,
}

/// The part of a pool that checked-out connections point back to. It does not know the
/// connector, so `Pooled<X>` has one type parameter.
///
/// `slots` comes first so its lock shares a cache line with the `Arc`'s counters, which
/// every checkout touches too.
#[repr(C)]
pub(crate) struct Core<X> {
    pub(crate) slots: Slots<Entry<X>>,
    pub(crate) clock: Clock,
    idle_timeout_ms: u64,
    max_lifetime_ms: u64,
    pub(crate) check: Option<CheckFn<X>>,
    /// The connector's hooks, when it is a [`Managed`](crate::Managed) one.
    pub(crate) hooks: Option<Arc<dyn Hooks<X>>>,
    pub(crate) counters: Counters,
    registry: Mutex<HashMap<u64, Arc<ConnMeta>>>,
    next_id: AtomicU64,
    /// Notified whenever a slot is freed (`close()` waits for the last one).
    drained: Notify,
    /// Notified when a background refill ends (`ready_min()` waits for them).
    pub(crate) refilled: Notify,
    /// Notified once, when the pool closes (background tasks end on it).
    pub(crate) closing: Notify,
    pub(crate) connecting: AtomicUsize,
    /// The reservation cells of the pool's `PoolService`s: closing the pool takes back
    /// what they hold for their next call.
    pub(crate) reservations: Reservations<X>,
    pub(crate) probing: AtomicUsize,
    /// Wakes the deadline timer (see [`expire_waiters`]).
    timer: Notify,
    /// True while the deadline timer task exists; its future clears it when dropped
    /// (also when the runtime it ran on shuts down), so the next waiter restarts it.
    timer_running: AtomicBool,
    /// Mirrors the slots' closed flag, readable without their lock.
    closed: AtomicBool,
    /// Set by the first successful connect ([`ConnectRetry::Reconnects`](crate::ConnectRetry::Reconnects)
    /// retries only after it).
    pub(crate) reached: AtomicBool,
    pub(crate) name: Arc<str>,
    /// The pool's metric handles, registered when it was built.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::PoolMetrics,
}

impl<X> Core<X> {
    pub(crate) fn new(
        config: &Config,
        check: Option<CheckFn<X>>,
        hooks: Option<Arc<dyn Hooks<X>>>,
        name: Arc<str>,
    ) -> Self {
        Core {
            slots: Slots::new(config.max_size, config.reuse == Reuse::Lifo),
            clock: Clock::new(),
            idle_timeout_ms: as_ms(config.idle_timeout),
            max_lifetime_ms: as_ms(config.max_lifetime),
            check,
            hooks,
            counters: Counters::default(),
            registry: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            drained: Notify::new(),
            refilled: Notify::new(),
            closing: Notify::new(),
            connecting: AtomicUsize::new(0),
            reservations: Reservations::default(),
            probing: AtomicUsize::new(0),
            timer: Notify::new(),
            timer_running: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            reached: AtomicBool::new(false),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::PoolMetrics::new(&name),
            name,
        }
    }
}

fn as_ms(d: Option<Duration>) -> u64 {
    d.map_or(u64::MAX, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl<X> Core<X> {
    /// Why `meta`'s connection must not be used any more at `now_ms`, if it must not.
    pub(crate) fn expired(&self, meta: &ConnMeta, now_ms: u64) -> Option<Reason> {
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
    pub(crate) fn checkout(self: &Arc<Self>, e: Entry<X>) -> Option<Pooled<X>> {
        Self::checkout_with::<true>(self.clone(), e, true)
    }

    /// Like [`checkout`](Self::checkout), but a connection that fails the checks keeps
    /// its slot for the caller to connect in. Without `CHECK`, the liveness check is
    /// left to the caller (see [`checkout_with`](Self::checkout_with)).
    pub(crate) fn checkout_or_keep_slot<const CHECK: bool>(
        self: &Arc<Self>,
        e: Entry<X>,
    ) -> Option<Pooled<X>> {
        Self::checkout_with::<CHECK>(self.clone(), e, false)
    }

    /// [`checkout`](Self::checkout) with the guard's reference to the pool taken already
    /// (the fast path takes it under the slot lock, whose cache line it shares).
    /// Without `CHECK`, the liveness check is skipped: the caller runs it when it uses
    /// the connection ([`Pooled::recheck`], for a `PoolService` reservation).
    // Always: it is most of the checkout fast path, which is measured in nanoseconds.
    #[inline(always)]
    pub(crate) fn checkout_with<const CHECK: bool>(
        this: Arc<Self>,
        mut e: Entry<X>,
        release_on_failure: bool,
    ) -> Option<Pooled<X>> {
        if let Some(reason) = this.expired(&e.meta, this.clock.coarse_ms()) {
            this.retire(e, reason, release_on_failure);
            return None;
        }
        if let Some(check) = this.check.as_ref().filter(|_| CHECK) {
            // User code: if it panics, the connection is closed and its slot freed
            // before the panic goes on to the caller, so the pool stays whole.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&mut e.conn))) {
                Ok(true) => {}
                Ok(false) => {
                    this.retire(e, Reason::Broken, release_on_failure);
                    return None;
                }
                Err(panic) => {
                    this.retire(e, Reason::Broken, true);
                    std::panic::resume_unwind(panic);
                }
            }
        }
        // Only the holder of a connection writes its counter: no read-modify-write needed.
        e.meta.uses.store(e.meta.uses.load(Relaxed) + 1, Relaxed);
        Some(Pooled::new(e, this))
    }

    /// Why a connection held since an earlier checkout must not be used any more, if
    /// it must not: the checks of a checkout again (expiry, the liveness check). The
    /// check is user code: the caller makes sure a panic in it closes the connection.
    #[inline]
    pub(crate) fn unusable(&self, e: &mut Entry<X>) -> Option<Reason> {
        if let Some(reason) = self.expired(&e.meta, self.clock.coarse_ms()) {
            return Some(reason);
        }
        match self.check.as_ref() {
            Some(check) if !check(&mut e.conn) => Some(Reason::Broken),
            _ => None,
        }
    }

    /// Takes back a checked-out connection.
    pub(crate) fn give_back(&self, e: Entry<X>, broken: bool) {
        e.meta.released();
        if broken {
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
            self.retire(e, self.surplus_reason(), false);
        }
    }

    /// Closes a connection: bookkeeping, drop, event; frees its slot if it still holds
    /// one.
    ///
    /// The connection's `Drop` and the event (a tracing subscriber, a metrics recorder)
    /// are user code: they run after the bookkeeping, and the slot is freed even if they
    /// panic, so a panic there leaves the pool whole.
    pub(crate) fn retire(&self, e: Entry<X>, reason: Reason, release_slot: bool) {
        let Entry { conn, meta } = e;
        self.forget(&meta);
        self.counters.destroyed.fetch_add(1, Relaxed);
        if reason.is_eviction() {
            self.counters.evicted.fetch_add(1, Relaxed);
        }
        {
            // Dropped after the connection (so the pool never holds more sockets than
            // `max_size`), even when its drop panics.
            let _free = FreeSlot {
                core: self,
                release: release_slot,
            };
            drop(conn);
        }
        if reason.is_eviction() {
            tracing::debug!(pool = %self.name, id = meta.id, reason = reason.as_str(), "connection evicted");
        } else {
            tracing::debug!(pool = %self.name, id = meta.id, reason = reason.as_str(), "connection closed");
        }
        #[cfg(feature = "metrics")]
        self.metrics.closed(reason);
    }

    pub(crate) fn forget(&self, meta: &ConnMeta) {
        crate::sync::lock_std(&self.registry).remove(&meta.id);
        let c = &self.counters;
        c.retired_uses.fetch_add(meta.uses.load(Relaxed), Relaxed);
        c.retired_releases
            .fetch_add(meta.releases.load(Relaxed), Relaxed);
    }

    /// Records a connection just opened. The event (user code) comes first: if it
    /// panics, nothing was recorded, and the caller's guard frees the slot.
    pub(crate) fn register(&self, conn: X) -> Entry<X> {
        let id = self.next_id.fetch_add(1, Relaxed);
        tracing::debug!(pool = %self.name, id, "connection opened");
        #[cfg(feature = "metrics")]
        self.metrics.created();
        let now = self.clock.refresh();
        let meta = Arc::new(ConnMeta {
            id,
            created_at: Instant::now(),
            created_ms: now,
            returned_ms: AtomicU64::new(now),
            uses: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        crate::sync::lock_std(&self.registry).insert(meta.id, meta.clone());
        self.counters.created.fetch_add(1, Relaxed);
        self.reached.store(true, Relaxed);
        Entry { conn, meta }
    }

    /// Closes the slots, closes idle connections, takes back what `PoolService`s hold
    /// for their next call (see [`Reservations::reclaim`]; returns how many of them were
    /// busy, to be tried again) and stops the deadline timer.
    pub(crate) fn shut(&self) -> usize {
        self.closed.store(true, SeqCst);
        for e in self.slots.close() {
            self.retire(e, Reason::Closed, false);
        }
        // After the slots closed: a service polled from here on reserves nothing more.
        let busy = self.reservations.reclaim();
        self.closing.notify_waiters();
        self.timer.notify_one();
        self.drained.notify_waiters();
        busy
    }

    /// Why a connection the slots would not take back is closed.
    pub(crate) fn surplus_reason(&self) -> Reason {
        if self.is_closed() {
            Reason::Closed
        } else {
            Reason::Shrunk
        }
    }

    /// True once the pool was closed (no lock taken).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    /// Frees a slot that holds no connection (a connect that failed or was abandoned).
    pub(crate) fn release_slot(&self) {
        self.slots.release();
        self.drained.notify_waiters();
    }

    /// Withdraws a queued waiter (see [`Slots::cancel`]).
    pub(crate) fn cancel_wait(&self, w: &Waiter<Entry<X>>) {
        if let Some(e) = self.slots.cancel(w) {
            self.retire(e, self.surplus_reason(), false);
        }
        self.drained.notify_waiters();
    }

    /// Ends a refill reservation (see [`Slots::refilled`]).
    pub(crate) fn refilled(&self, e: Option<Entry<X>>) {
        if let Some(e) = self.slots.refilled(e) {
            self.retire(e, self.surplus_reason(), false);
        }
        self.drained.notify_waiters();
        self.refilled.notify_waiters();
    }

    /// Waits until every slot is free: no connection open, none connecting.
    ///
    /// What `PoolService`s held for their next call was taken back when the pool
    /// closed ([`shut`](Self::shut)): only connections in use, and connects in flight,
    /// are waited for.
    pub(crate) async fn drained(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.slots.snapshot().open == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Counts a checkout that gave up after `limit` and makes its error.
    pub(crate) fn timed_out(&self, limit: Option<Duration>) -> PoolError {
        let limit = limit.unwrap_or_default();
        self.counters.timed_out.fetch_add(1, Relaxed);
        tracing::debug!(pool = %self.name, ?limit, "checkout timed out");
        #[cfg(feature = "metrics")]
        self.metrics.timed_out();
        PoolError::Timeout(limit)
    }

    /// A waiter with a deadline was queued: make sure the deadline timer runs and is
    /// awake.
    pub(crate) fn arm_timer(self: &Arc<Self>, wake: bool)
    where
        X: Send + 'static,
    {
        // (Re)start it when it never ran or its runtime shut down under it.
        if !self.timer_running.load(Acquire) && !self.timer_running.swap(true, AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let running = RunningFlag(self.clone(), |c| &c.timer_running);
                    rt.spawn(async move {
                        let core = running.0.clone();
                        let _running = running;
                        expire_waiters(core).await
                    });
                }
                // Outside a runtime nothing can time out; the next waiter inside one
                // starts the timer.
                Err(_) => self.timer_running.store(false, Release),
            }
        }
        if wake {
            self.timer.notify_one();
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let snap = self.slots.snapshot();
        let connecting = self.connecting.load(Relaxed);
        let probing = self.probing.load(Relaxed);
        let total = snap.open.saturating_sub(connecting);
        let idle = (snap.idle + probing).min(total);
        let active = total - idle;
        // Sorted, searched by halves: no hashing, one allocation (none when nothing is
        // idle); stats of thousands of pools are read in one go.
        let mut idle_ids = Vec::with_capacity(snap.idle);
        self.slots.for_each_idle(|e| idle_ids.push(e.meta.id));
        idle_ids.sort_unstable();
        let now = Instant::now();
        let now_ms = self.clock.refresh();
        let registry = crate::sync::lock_std(&self.registry);
        let mut acquired = self.counters.retired_uses.load(Relaxed);
        let mut released = self.counters.retired_releases.load(Relaxed);
        let mut connections: Vec<ConnStats> = registry
            .values()
            .map(|m| {
                let uses = m.uses.load(Relaxed);
                acquired += uses;
                released += m.releases.load(Relaxed);
                ConnStats {
                    id: m.id,
                    age: now.saturating_duration_since(m.created_at),
                    idle_for: idle_ids.binary_search(&m.id).is_ok().then(|| {
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
            released,
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

/// Frees a slot (if asked) and wakes `close()` when dropped, also while unwinding.
struct FreeSlot<'a, X> {
    core: &'a Core<X>,
    release: bool,
}

impl<X> Drop for FreeSlot<'_, X> {
    fn drop(&mut self) {
        if self.release {
            self.core.slots.release();
        }
        self.core.drained.notify_waiters();
    }
}

/// Holds a `Create` grant while a connect runs: if the connect is cancelled or fails,
/// the slot goes back (to a waiter, if any).
pub(crate) struct Connecting<'a, X> {
    core: &'a Core<X>,
    armed: bool,
}

impl<'a, X> Connecting<'a, X> {
    pub(crate) fn new(core: &'a Core<X>) -> Self {
        core.connecting.fetch_add(1, Relaxed);
        Connecting { core, armed: true }
    }

    pub(crate) fn done(mut self) {
        self.armed = false;
        self.core.connecting.fetch_sub(1, Relaxed);
    }

    /// Ends a connect that did not produce a connection (not a cancel): frees the slot.
    pub(crate) fn fail(self) {
        let core = self.core;
        self.done();
        core.release_slot();
    }
}

impl<X> Drop for Connecting<'_, X> {
    fn drop(&mut self) {
        if self.armed {
            self.core.connecting.fetch_sub(1, Relaxed);
            self.core.counters.cancelled.fetch_add(1, Relaxed);
            self.core.release_slot();
        }
    }
}

/// A slot held with no connection in it, for a connect to come: reserved by a
/// `PoolService` in a pool with room, or kept when its connection was closed at use.
/// Counted as connecting. Freed when dropped, unless given to a connect first.
pub(crate) struct HeldSlot<X> {
    core: Option<Arc<Core<X>>>,
}

impl<X> HeldSlot<X> {
    pub(crate) fn new(core: Arc<Core<X>>) -> Self {
        core.connecting.fetch_add(1, Relaxed);
        HeldSlot { core: Some(core) }
    }

    /// The slot as a grant to connect in: from here on the connect's guard frees it.
    pub(crate) fn into_grant(mut self) -> Grant<Entry<X>> {
        if let Some(core) = self.core.take() {
            core.connecting.fetch_sub(1, Relaxed);
        }
        Grant::Create
    }
}

impl<X> Drop for HeldSlot<X> {
    fn drop(&mut self) {
        if let Some(core) = self.core.take() {
            core.connecting.fetch_sub(1, Relaxed);
            core.release_slot();
        }
    }
}

/// A queued `get()`: withdraws itself from the queue when dropped. `R` is how it holds
/// the pool's core: borrowed by [`Pool::get`](crate::Pool::get)'s future, an `Arc` in
/// [`PoolService`](crate::PoolService), whose checkouts outlive any borrow.
pub(crate) struct Wait<X, R: Deref<Target = Core<X>>> {
    pub(crate) core: R,
    pub(crate) waiter: Option<Arc<Waiter<Entry<X>>>>,
}

impl<X, R: Deref<Target = Core<X>> + Unpin> Future for Wait<X, R> {
    type Output = Result<Grant<Entry<X>>, WaitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let w = self.waiter.as_ref().expect("polled after completion");
        let r = std::task::ready!(self.core.slots.poll_waiter(w, cx));
        self.waiter = None;
        Poll::Ready(r)
    }
}

impl<X, R: Deref<Target = Core<X>>> Drop for Wait<X, R> {
    fn drop(&mut self) {
        if let Some(w) = self.waiter.take() {
            self.core.cancel_wait(&w);
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
                let sleep = tokio::time::sleep_until(core.clock.epoch + Duration::from_nanos(due));
                // Also wake when the pool closes, so the task does not outlive it.
                if !first(sleep, woken).await {
                    continue;
                }
                core.slots.expire(core.clock.ns_at(Instant::now()));
            }
        }
    }
}

/// Clears a "task running" flag when the task's future is dropped: when it ends, and
/// when the runtime it ran on shuts down and drops it.
pub(crate) struct RunningFlag<S>(pub(crate) Arc<S>, pub(crate) fn(&S) -> &AtomicBool);

impl<S> Drop for RunningFlag<S> {
    fn drop(&mut self) {
        (self.1)(&self.0).store(false, Release);
    }
}

/// Runs two futures until either finishes: `true` if `a` did.
pub(crate) async fn first<A: Future, B: Future>(a: A, b: B) -> bool {
    tokio::pin!(a, b);
    poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() {
            Poll::Ready(true)
        } else if b.as_mut().poll(cx).is_ready() {
            Poll::Ready(false)
        } else {
            Poll::Pending
        }
    })
    .await
}

pin_project_lite::pin_project! {
    /// Runs a future, catching a panic in any of its polls (user code: a probe, a
    /// connector, a tracing subscriber), so a background task survives it.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        CatchUnwind { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
