//! `StackHandle`: the stack's stats, backends at run time and shutdown.

use super::*;

pub(super) struct PoolEntry {
    pub(super) addr: SocketAddr,
    /// False once removed (its pool drains and closes).
    pub(super) active: bool,
    pub(super) stats: Box<dyn Fn() -> PoolStats + Send + Sync>,
    pub(super) close: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    pub(super) health: Option<HealthHandle>,
}

/// The backends the stack has made, current and removed (removed ones drain, then
/// their pools close at shutdown).
#[derive(Default)]
pub(super) struct Registry {
    pub(super) entries: std::sync::Mutex<Vec<PoolEntry>>,
}

impl Registry {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PoolEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(super) type AddFn = Arc<dyn Fn(SocketAddr) -> Result<(), BoxError> + Send + Sync>;
pub(super) type RemoveFn = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

pub(super) struct HandleInner {
    pub(super) registry: Arc<Registry>,
    pub(super) add: AddFn,
    pub(super) remove: RemoveFn,
    pub(super) balance: BalanceHandle,
    pub(super) affinity: Option<AffinityHandle>,
    pub(super) rate: Option<RateLimitHandle>,
    pub(super) rate_per_key: Option<RateLimitHandle>,
    pub(super) concurrency: Vec<ConcurrencyHandle>,
    pub(super) bandwidth: Option<Arc<Bucket>>,
    pub(super) state: Arc<ShutdownState>,
    /// The fleet and its layers' handles, with a fleet (then the local limits above
    /// are `None`).
    #[cfg(feature = "redis")]
    pub(super) redis: Option<super::fleet::RedisParts>,
}

/// The stack's stats and shutdown, readable from anywhere.
#[derive(Clone)]
pub struct StackHandle {
    pub(super) inner: Arc<HandleInner>,
}

impl fmt::Debug for StackHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackHandle").finish_non_exhaustive()
    }
}

/// One backend's figures in [`StackStats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BackendStats {
    /// Its address.
    pub addr: SocketAddr,
    /// Its pool.
    pub pool: PoolStats,
    /// Its health status (with health checks on).
    pub health: Option<Status>,
    /// The balancer's view of it.
    pub balance: Option<EndpointSnapshot>,
}

/// Everything the stack knows, in one snapshot; `Display` prints it as a table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StackStats {
    /// Per backend.
    pub backends: Vec<BackendStats>,
    /// The balancer's totals.
    pub balance: BalanceTotals,
    /// Sessions, with affinity on.
    pub affinity: Option<AffinityStats>,
    /// The global rate limiter, if any.
    pub rate: Option<RateStats>,
    /// The per-key rate limiter, if any.
    pub rate_per_key: Option<RateStats>,
    /// The per-key concurrency limiters.
    pub concurrency: Vec<ConcurrencyStats>,
    /// Bytes written through the bandwidth limit, the current rate and the limit.
    pub bandwidth: Option<(u64, u64, f64)>,
    /// Requests in flight through the stack.
    pub in_flight: usize,
    /// Requests that ended with an error returned to their caller, refusals (shutting
    /// down, an invalid request, a rate or concurrency limit) not counted. Compare with
    /// [`BalanceTotals::errors`], the errors the endpoints saw: failover absorbed the
    /// difference.
    pub client_errors: u64,
    /// The fleet (Redis) and its limits and sessions, with
    /// [`StackBuilder::redis`](crate::StackBuilder::redis) (the `redis` feature).
    #[cfg(feature = "redis")]
    pub redis: Option<super::fleet::RedisStackStats>,
}

impl StackHandle {
    /// Gathers pool, health, balance, session and limiter stats.
    pub fn stats(&self) -> StackStats {
        let i = &self.inner;
        // O(N): the balancer's figures indexed once by key.
        // The key moves into the map and back into its snapshot when found: no copy.
        let mut eps: std::collections::HashMap<String, EndpointSnapshot> = i
            .balance
            .stats()
            .into_iter()
            .map(|mut e| (std::mem::take(&mut e.key), e))
            .collect();
        let mut key = String::new();
        let backends = i
            .registry
            .lock()
            .iter()
            .map(|p| BackendStats {
                addr: p.addr,
                pool: (p.stats)(),
                health: p.health.as_ref().map(HealthHandle::status),
                balance: if p.active {
                    use std::fmt::Write as _;
                    key.clear();
                    let _ = write!(key, "{:?}", p.addr);
                    eps.remove_entry(key.as_str()).map(|(k, mut e)| {
                        e.key = k;
                        e
                    })
                } else {
                    None
                },
            })
            .collect();
        StackStats {
            backends,
            balance: i.balance.totals(),
            affinity: i.affinity.as_ref().map(AffinityHandle::stats),
            rate: i.rate.as_ref().map(RateLimitHandle::stats),
            rate_per_key: i.rate_per_key.as_ref().map(RateLimitHandle::stats),
            concurrency: i.concurrency.iter().map(ConcurrencyHandle::stats).collect(),
            bandwidth: i
                .bandwidth
                .as_ref()
                .map(|b| (b.bytes(), b.current_rate(), b.limit())),
            in_flight: i.state.in_flight.load(Acquire),
            client_errors: i.state.failed.load(Acquire),
            #[cfg(feature = "redis")]
            redis: i.redis.as_ref().map(super::fleet::RedisParts::stats),
        }
    }

    /// The health handle of the backend at `addr` (the latest one added there).
    pub fn health(&self, addr: SocketAddr) -> Option<HealthHandle> {
        self.inner
            .registry
            .lock()
            .iter()
            .rev()
            .find(|p| p.addr == addr)
            .and_then(|p| p.health.clone())
    }

    /// Adds a backend at run time (service discovery): a pool and health checks for it,
    /// then the balancer picks it up on its next request. Fails for a backend already
    /// in the stack, and after [`shutdown`](Self::shutdown). Callable from any thread,
    /// inside a tokio runtime or not: the backend's tasks run on the stack's runtime.
    pub fn add_endpoint(&self, addr: SocketAddr) -> Result<(), BoxError> {
        (self.inner.add)(addr)
    }

    /// Follows a discovery stream of backend addresses (`Change::Insert(addr, ())`,
    /// `Change::Remove(addr)`, as any `tower::discover::Discover` of addresses yields):
    /// a task applies each change with [`add_endpoint`](Self::add_endpoint) /
    /// [`remove_endpoint`](Self::remove_endpoint) until the stream ends or the stack
    /// shuts down. Needs a tokio runtime.
    pub fn follow<D>(&self, discovery: D) -> tokio::task::JoinHandle<()>
    where
        D: futures_core::Stream<Item = Change<SocketAddr, ()>> + Send + 'static,
    {
        let handle = self.clone();
        tokio::spawn(async move {
            let mut discovery = std::pin::pin!(discovery);
            while let Some(change) =
                std::future::poll_fn(|cx| discovery.as_mut().poll_next(cx)).await
            {
                if handle.inner.state.closed.load(Acquire) {
                    return;
                }
                match change {
                    Change::Insert(addr, ()) => {
                        if let Err(e) = handle.add_endpoint(addr) {
                            tracing::warn!(%addr, error = %e, "discovered backend not added");
                        }
                    }
                    Change::Remove(addr) => {
                        handle.remove_endpoint(addr);
                    }
                }
            }
        })
    }

    /// Removes a backend: it gets no new requests, its requests in flight complete,
    /// then its pool closes and it leaves [`stats`](Self::stats). False if no such
    /// backend is in the stack. Callable from any thread, inside a tokio runtime or not:
    /// the drain and close run on the stack's runtime.
    pub fn remove_endpoint(&self, addr: SocketAddr) -> bool {
        (self.inner.remove)(addr)
    }

    /// Graceful shutdown: new requests fail with [`ShuttingDown`] at once; requests in
    /// flight get until `deadline` to finish; then every pool closes (idle connections
    /// dropped, their maintenance tasks ended; connections still checked out close when
    /// they come back). Returns within about `deadline`, with the requests still in
    /// flight when it ran out (0: all finished). Calling it again waits again (the
    /// stack stays closed), with the new deadline.
    ///
    /// Needs a tokio runtime (the shutdown runs on a task of its own).
    ///
    /// # Cancel safety
    ///
    /// Safe to drop: the shutdown runs on its own task and completes in the background
    /// (the stack refuses new requests from the first poll, and its pools close by the
    /// deadline), whether or not anyone still awaits it.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let st = self.inner.state.clone();
        st.closed.store(true, std::sync::atomic::Ordering::Release);
        let work = tokio::spawn(shut_down(st, self.inner.registry.clone(), deadline));
        // Dropping the join handle detaches the task: it completes anyway.
        match work.await {
            Ok(left) => left,
            // The task ended without an answer (its runtime is shutting down).
            Err(_) => self.inner.state.in_flight.load(Acquire),
        }
    }
}

/// The shutdown's work, on its own task (see [`StackHandle::shutdown`]).
pub(super) async fn shut_down(
    st: Arc<ShutdownState>,
    registry: Arc<Registry>,
    deadline: Duration,
) -> usize {
    let start = tokio::time::Instant::now();
    let wait = async {
        loop {
            let idle = st.idle.notified();
            if st.in_flight.load(Acquire) == 0 {
                return;
            }
            idle.await;
        }
    };
    let _ = tokio::time::timeout(deadline, wait).await;
    let left = st.in_flight.load(Acquire);
    // Pools close in the time left (at least a moment, to drop idle connections):
    // `close` waits for checked-out connections to come back.
    let rest = deadline
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(10));
    // Every pool starts closing now (a pool waiting for a stuck connection must not
    // keep the others open).
    let mut closes = tokio::task::JoinSet::new();
    for close in registry.lock().iter().map(|p| (p.close)()) {
        closes.spawn(close);
    }
    let _ = tokio::time::timeout(rest, async { while closes.join_next().await.is_some() {} }).await;
    left
}

/// A table, a row per backend, then a line per layer. The `requests` and `errors`
/// columns are attempts at each backend (failover attempts and hedges included), as
/// the endpoints saw them; the `errors` line below compares them with the errors
/// returned to callers.
impl fmt::Display for StackStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<22} {:>9} {:>7} {:>9} {:>6} {:>5} {:>7} {:>8}  health",
            "backend", "attempts", "errors", "in flight", "conns", "idle", "created", "ewma",
        )?;
        for b in &self.backends {
            let (req, err, inf, ewma) = b.balance.as_ref().map_or((0, 0, 0, None), |e| {
                (e.requests, e.errors, e.in_flight, e.ewma_latency)
            });
            writeln!(
                f,
                "{:<22} {:>9} {:>7} {:>9} {:>6} {:>5} {:>7} {:>8}  {}",
                b.addr.to_string(),
                req,
                err,
                inf,
                b.pool.total,
                b.pool.idle,
                b.pool.created,
                ewma.map_or("-".to_string(), |d| format!("{:.2?}", d)),
                b.health.map_or("-".to_string(), |h| h.to_string()),
            )?;
        }
        let t = &self.balance;
        writeln!(
            f,
            "balance: {} attempts, {} errors at endpoints, {} failovers ({} refused by the budget), panic mode {}",
            t.requests, t.errors, t.retries, t.retries_refused, t.panicking
        )?;
        // Endpoint errors the callers never saw: failover sent those requests elsewhere.
        let absorbed = t.errors.saturating_sub(self.client_errors);
        writeln!(
            f,
            "errors: {} seen by endpoints, {} returned to callers ({} absorbed by failover)",
            t.errors, self.client_errors, absorbed
        )?;
        if let Some(a) = &self.affinity {
            writeln!(
                f,
                "sessions: {} now, {} created, {} re-pinned, {} expired, {} purged",
                a.sessions, a.created, a.repinned, a.expired, a.purged
            )?;
        }
        for (what, r) in [
            ("rate limit", &self.rate),
            ("per-key rate limit", &self.rate_per_key),
        ] {
            if let Some(r) = r {
                writeln!(
                    f,
                    "{what}: {} admitted, {} refused, {}/s now, limit {:.0}/s (burst {})",
                    r.admitted, r.rejected, r.current_rate, r.limit_per_second, r.burst
                )?;
            }
        }
        for c in &self.concurrency {
            writeln!(
                f,
                "per-key concurrency (limit {}): {} in flight over {} keys, {} refused, top {:?}",
                c.limit, c.in_flight, c.active_keys, c.rejected, c.top
            )?;
        }
        if let Some((bytes, now, limit)) = self.bandwidth {
            writeln!(
                f,
                "bandwidth: {bytes} bytes written, {now} B/s now, limit {limit:.0} B/s ({:.0}% used)",
                100.0 * now as f64 / limit
            )?;
        }
        #[cfg(feature = "redis")]
        if let Some(r) = &self.redis {
            write!(f, "{r}")?;
        }
        Ok(())
    }
}
