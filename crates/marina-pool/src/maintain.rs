//! The background work of a pool: connects, refill to `min_idle`, eviction, health
//! checks, and the maintenance task that schedules them.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use marina_core::BoxError;
use tokio::time::Instant;

use crate::core::{CatchUnwind, Core, Entry, Reason, first};
use crate::error::{ConnectTimeout, PoolError};
use crate::pool::{Connector, Inner, Target};

impl<C, T> Inner<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// One connect: waits for a `max_connecting` permit, then the connector, bounded by
    /// `connect_timeout`.
    pub(crate) async fn connect(&self) -> Result<C::Response, BoxError> {
        let _permit = self.connect_gate.acquire().await.map_err(BoxError::from)?;
        let mut svc = crate::sync::lock_std(&self.connector).clone();
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
            self.core.metrics.connect_errors.increment(1);
        }
        r
    }

    /// Opens connections until `min_idle` are idle (or being opened). Returns how many
    /// it started; fails with the first connect error.
    pub(crate) async fn refill(self: &Arc<Self>) -> Result<usize, PoolError> {
        let min = self.config.min_idle;
        let mut set = tokio::task::JoinSet::new();
        while self.core.slots.try_reserve_refill(min) {
            let inner = self.clone();
            set.spawn(async move { inner.refill_one().await });
        }
        let started = set.len();
        let mut first = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                // The connector panicked (its guard freed the slot): a failure too, so
                // refill backs off instead of panicking on every tick.
                Err(e) if e.is_panic() => {
                    first.get_or_insert(PoolError::Connect("the connector panicked".into()));
                }
                _ => {}
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
                    self.core.refilled(None);
                }
            }
        }
        let core = &*self.core;
        core.connecting.fetch_add(1, Relaxed);
        let mut reserved = Reserved { core, armed: true };
        let r = self.connect().await;
        match r {
            Ok(conn) => {
                // Still armed while `register` runs its event (user code).
                let e = core.register(conn);
                reserved.armed = false;
                core.connecting.fetch_sub(1, Relaxed);
                core.refilled(Some(e));
                Ok(())
            }
            Err(err) => {
                reserved.armed = false;
                core.connecting.fetch_sub(1, Relaxed);
                core.counters.failed.fetch_add(1, Relaxed);
                core.refilled(None);
                Err(PoolError::Connect(err))
            }
        }
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
            let Some(e) = batch.pop() else { return };
            seen.push(e.meta.id);
            // If this future is dropped mid-probe (the pool closes, the runtime shuts
            // down), the guard closes the connection and frees its slot.
            let mut probing = Probing::new(core, e);
            let conn = &mut probing.entry_mut().conn;
            let mut ok = core.check.as_ref().is_none_or(|check| check(conn));
            if ok && let Some(probe) = &self.probe {
                let limit = self.config.health_check_timeout;
                ok = matches!(
                    tokio::time::timeout(limit, probe.probe(conn)).await,
                    Ok(Ok(_))
                );
            }
            let e = probing.finish();
            if ok {
                if let Some(e) = core.slots.put(e) {
                    core.retire(e, core.surplus_reason(), false);
                }
            } else {
                let id = e.meta.id;
                core.retire(e, Reason::HealthCheck, true);
                tracing::debug!(pool = %core.name, id, "idle connection failed its health check");
            }
        }
    }
}

/// An idle connection taken out for a health check, holding its slot.
struct Probing<'a, X> {
    core: &'a Core<X>,
    entry: Option<Entry<X>>,
}

impl<'a, X> Probing<'a, X> {
    fn new(core: &'a Core<X>, e: Entry<X>) -> Self {
        core.probing.fetch_add(1, Relaxed);
        Probing {
            core,
            entry: Some(e),
        }
    }

    fn entry_mut(&mut self) -> &mut Entry<X> {
        self.entry.as_mut().expect("probe in progress")
    }

    fn finish(mut self) -> Entry<X> {
        self.core.probing.fetch_sub(1, Relaxed);
        self.entry.take().expect("probe in progress")
    }
}

impl<X> Drop for Probing<'_, X> {
    fn drop(&mut self) {
        if let Some(e) = self.entry.take() {
            self.core.probing.fetch_sub(1, Relaxed);
            self.core.retire(e, Reason::Closed, true);
        }
    }
}

/// The maintenance task, one per pool: refreshes the coarse clock, evicts expired idle
/// connections, health-checks idle ones, and refills to `min_idle` (backing off
/// exponentially, up to a minute, while connects fail). Ends when the pool closes,
/// which also abandons a refill in flight.
///
/// A panic in user code a tick runs (a probe, the checkout check, a tracing subscriber
/// or metrics recorder) ends that tick, not the task: the connection involved was closed
/// by its guard, and the next tick runs as usual (a refill that panicked backs off as if
/// it failed).
pub(crate) async fn maintain<C, T>(inner: Arc<Inner<C, T>>)
where
    C: Connector<T>,
    T: Target,
{
    let c = &inner.config;
    let mut tick = c.eviction_interval;
    if let Some(h) = c.health_check_interval {
        tick = tick.min(h);
    }
    if c.idle_timeout.is_some() || c.max_lifetime.is_some() {
        // The coarse clock that checkouts read is refreshed at least every second.
        tick = tick.min(Duration::from_secs(1));
    }
    let start = Instant::now();
    let mut plan = Plan {
        next_evict: start + c.eviction_interval,
        next_health: c.health_check_interval.map(|h| start + h),
        next_refill: start,
        backoff: Duration::ZERO,
        exhausted: false,
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let core = &inner.core;
    loop {
        let closing = core.closing.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if core.slots.is_closed() {
            return;
        }
        if !first(interval.tick(), closing.as_mut()).await {
            return;
        }
        match CatchUnwind::new(inner.tick(&mut plan, closing.as_mut())).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(_panic) => {
                plan.failed_refill();
                tracing::error!(pool = %core.name, "a pool maintenance step panicked; carrying on");
            }
        }
    }
}

/// When the maintenance task does what next.
struct Plan {
    next_evict: Instant,
    next_health: Option<Instant>,
    next_refill: Instant,
    backoff: Duration,
    /// Checkouts were queued at the last tick (every slot taken).
    exhausted: bool,
}

impl Plan {
    /// Backs the next refill off (a refill failed or panicked).
    fn failed_refill(&mut self) {
        self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.next_refill = Instant::now() + self.backoff;
    }
}

impl<C, T> Inner<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// One maintenance tick. False when the pool closed meanwhile.
    async fn tick(
        self: &Arc<Self>,
        plan: &mut Plan,
        mut closing: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> bool {
        let core = &self.core;
        let c = &self.config;
        core.clock.refresh();
        let now = Instant::now();
        if now >= plan.next_evict {
            plan.next_evict = now + c.eviction_interval;
            self.evict();
        }
        if let (Some(at), Some(every)) = (plan.next_health, c.health_check_interval)
            && now >= at
        {
            // Scheduled first, so a probe that panics does not run again at once.
            plan.next_health = Some(now + every);
            if !first(self.health_check(every), closing.as_mut()).await {
                return false;
            }
            plan.next_health = Some(Instant::now() + every);
        }
        if now >= plan.next_refill {
            // Backed off first, in case the refill panics; undone when it succeeds.
            plan.failed_refill();
            let mut result = None;
            if !first(
                async { result = Some(self.refill().await) },
                closing.as_mut(),
            )
            .await
            {
                return false;
            }
            match result {
                Some(Err(e)) => {
                    tracing::debug!(pool = %core.name, error = %e, retry_in = ?plan.backoff, "refill to min_idle failed");
                }
                _ => {
                    plan.backoff = Duration::ZERO;
                    plan.next_refill = now;
                }
            }
        }
        // Exhausted (checkouts queued: every slot taken) and back: events at the change
        // only, seen at the tick's granularity.
        let snap = core.slots.snapshot();
        let exhausted = snap.waiting > 0 && !snap.closed;
        if exhausted != plan.exhausted {
            plan.exhausted = exhausted;
            if exhausted {
                tracing::warn!(pool = %core.name, max_size = snap.max, waiting = snap.waiting, "pool exhausted: checkouts are waiting for a connection");
            } else {
                tracing::info!(pool = %core.name, "pool no longer exhausted");
            }
        }
        #[cfg(feature = "metrics")]
        {
            let s = core.stats();
            let m = &core.metrics;
            m.idle.set(s.idle as f64);
            m.active.set(s.active as f64);
            m.connecting.set(s.connecting as f64);
            m.waiting.set(s.waiting as f64);
        }
        true
    }
}
