//! `KeyedPool`: one pool per target.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower_service::Service;

use crate::builder::Builder;
use crate::pool::{Connector, Pool, PoolFuture, Target};
use crate::{PoolError, PoolStats};

/// A `Service<T>` that keeps one [`Pool`] per target, all built from one [`Builder`] —
/// the pooled connector to hand to a `Service<Uri>` (or `Service<SocketAddr>`) slot.
///
/// The number of targets is bounded by [`max_targets`](Self::max_targets) (default 1024).
/// A target is *unused* when nothing is checked out from its pool, being connected or
/// waited for, and no handle to it is held outside the map (a `call` future not yet
/// polled, a clone from [`pool`](Self::pool)): so dropping it never leaves a second
/// pool for the same target behind. Unused targets are dropped (their idle connections closed):
///
/// - by a sweep, every 256 calls and on [`sweep`](Self::sweep), once unused for
///   [`target_idle_timeout`](Self::target_idle_timeout) (default: the builder's
///   `idle_timeout`, or 60 s);
/// - when a new target would exceed `max_targets`: the least recently used unused
///   target makes room. If every target is in use, the call fails with
///   [`PoolError::TooManyTargets`].
///
/// So a flood of distinct targets leaves at most `max_targets` pools behind, and those
/// go away once idle. The map is keyed with std's randomly seeded hasher.
///
/// Under hyper-util's legacy `Client`, hyper keeps each connection it gets for as long
/// as it lives (it pools them itself): this pool's idle timeout, lifetime and health
/// checks then never see them, and only `max_size` bounds connections per target.
/// Compiled examples of it as the connector of hyper-util's legacy `Client` and of
/// tonic's `Endpoint::connect_with_connector` are in the `http` module's docs
/// (`marina_pool::http`, feature `http`).
///
/// # Sharing
///
/// `Clone`, and cheap to clone (one `Arc`): clones share the map of per-target pools,
/// its bounds and its sweeps, so every clone checks out of the same pools
/// ([`max_targets`](Self::max_targets) and
/// [`target_idle_timeout`](Self::target_idle_timeout) set them for every clone). It is
/// `Send + Sync` and always ready: clone it into each task, or into each client that
/// takes it as its connector. When the last clone is dropped, each target's pool closes
/// once no [`Pool`] from [`pool`](Self::pool) and no pending call still holds it.
///
/// # Examples
///
/// ```
/// use std::net::SocketAddr;
/// use marina_pool::{KeyedPool, Pool, TcpConnector};
/// use tower::{Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_pool::PoolError> {
/// # let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// # let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// # let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
/// let mut pools = KeyedPool::new(Pool::builder().max_size(4), TcpConnector::new())?
///     .max_targets(64);
/// let conn_a = pools.ready().await?.call(addr_a).await?;
/// let conn_b = pools.ready().await?.call(addr_b).await?;
/// assert_eq!(pools.len(), 2);
/// # drop((conn_a, conn_b));
/// # Ok(()) }
/// ```
pub struct KeyedPool<C, T>
where
    C: Service<T>,
{
    inner: Arc<KeyedInner<C, T>>,
}

struct KeyedInner<C, T>
where
    C: Service<T>,
{
    builder: Builder,
    /// Locked only to clone it for a new target's pool, so it need not be `Sync`.
    connector: Mutex<C>,
    max_targets: AtomicUsize,
    target_idle_ms: AtomicUsize,
    map: Mutex<KeyedMap<C, T>>,
}

struct KeyedMap<C, T>
where
    C: Service<T>,
{
    pools: HashMap<T, TargetPool<C, T>>,
    calls: u64,
    closed: bool,
}

/// One target's pool and when it was last asked for.
struct TargetPool<C, T>
where
    C: Service<T>,
{
    pool: Pool<C, T>,
    last_used: Instant,
    /// The call count when it was last asked for: recency, even when the clock stands
    /// still (paused time) or two calls share an instant.
    last_call: u64,
}

impl<C, T> Clone for KeyedPool<C, T>
where
    C: Service<T>,
{
    fn clone(&self) -> Self {
        KeyedPool {
            inner: self.inner.clone(),
        }
    }
}

impl<C, T> fmt::Debug for KeyedPool<C, T>
where
    C: Service<T>,
    T: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = crate::sync::lock_std(&self.inner.map);
        f.debug_struct("KeyedPool")
            .field("targets", &map.pools.keys().collect::<Vec<_>>())
            .field("max_targets", &self.inner.max_targets.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C, T> KeyedPool<C, T>
where
    C: Connector<T>,
    T: Target + Eq + Hash,
{
    /// A keyed pool whose per-target pools are built by `builder` over `connector`.
    /// Fails with [`PoolError::Invalid`] if the builder's configuration has errors or a
    /// hook was written for another connection type.
    pub fn new(builder: Builder, connector: C) -> Result<Self, PoolError> {
        let report = builder.config.validate();
        if !report.is_ok() {
            return Err(PoolError::Invalid(report.errors));
        }
        builder.hooks::<C::Response>()?;
        let idle = builder
            .config
            .idle_timeout
            .unwrap_or(Duration::from_secs(60));
        Ok(KeyedPool {
            inner: Arc::new(KeyedInner {
                builder,
                connector: Mutex::new(connector),
                max_targets: AtomicUsize::new(1024),
                target_idle_ms: AtomicUsize::new(idle.as_millis().min(usize::MAX as u128) as usize),
                map: Mutex::new(KeyedMap {
                    pools: HashMap::new(),
                    calls: 0,
                    closed: false,
                }),
            }),
        })
    }

    /// Bounds the number of targets kept at once (at least 1), for every clone.
    pub fn max_targets(self, n: usize) -> Self {
        self.inner.max_targets.store(n.max(1), Relaxed);
        self
    }

    /// How long a target must be unused before a sweep drops it, for every clone.
    pub fn target_idle_timeout(self, idle: Duration) -> Self {
        let ms = idle.as_millis().min(usize::MAX as u128) as usize;
        self.inner.target_idle_ms.store(ms, Relaxed);
        self
    }

    /// The pool for `target`, created if needed.
    pub fn pool(&self, target: &T) -> Result<Pool<C, T>, PoolError> {
        let now = Instant::now();
        let mut map = crate::sync::lock_std(&self.inner.map);
        if map.closed {
            return Err(PoolError::Closed);
        }
        map.calls += 1;
        if map.calls.is_multiple_of(256) {
            self.sweep_locked(&mut map, now);
        }
        let call = map.calls;
        if let Some(t) = map.pools.get_mut(target) {
            // A pool someone closed through a clone is replaced, not served forever.
            if !t.pool.is_closed() {
                t.last_used = now;
                t.last_call = call;
                return Ok(t.pool.clone());
            }
            map.pools.remove(target);
        }
        let max = self.inner.max_targets.load(Relaxed);
        if map.pools.len() >= max {
            self.sweep_locked(&mut map, now);
        }
        if map.pools.len() >= max {
            // Make room: the least recently used target nobody is using.
            let lru = map
                .pools
                .iter()
                .filter(|(_, t)| !t.pool.in_use())
                .min_by_key(|(_, t)| t.last_call)
                .map(|(k, _)| k.clone());
            match lru {
                Some(k) => {
                    map.pools.remove(&k);
                }
                None => return Err(PoolError::TooManyTargets(max)),
            }
        }
        let connector = crate::sync::lock_std(&self.inner.connector).clone();
        let pool = self.inner.builder.build(connector, target.clone())?;
        map.pools.insert(
            target.clone(),
            TargetPool {
                pool: pool.clone(),
                last_used: now,
                last_call: call,
            },
        );
        Ok(pool)
    }

    fn sweep_locked(&self, map: &mut KeyedMap<C, T>, now: Instant) {
        let idle = Duration::from_millis(self.inner.target_idle_ms.load(Relaxed) as u64);
        map.pools
            .retain(|_, t| t.pool.in_use() || now.saturating_duration_since(t.last_used) < idle);
    }

    /// The number of targets with a pool now.
    pub fn len(&self) -> usize {
        crate::sync::lock_std(&self.inner.map).pools.len()
    }

    /// True when no target has a pool.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stats of every target's pool.
    pub fn stats(&self) -> Vec<(T, PoolStats)> {
        let pools: Vec<_> = crate::sync::lock_std(&self.inner.map)
            .pools
            .iter()
            .map(|(k, t)| (k.clone(), t.pool.clone()))
            .collect();
        pools.into_iter().map(|(k, p)| (k, p.stats())).collect()
    }

    /// Drops the pools of targets unused for at least the target idle timeout.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.sweep_locked(&mut crate::sync::lock_std(&self.inner.map), now);
    }

    /// Closes every target's pool (see [`Pool::close`]) and the keyed pool itself:
    /// later calls fail with [`PoolError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: everything is closed before the first await; dropping the future
    /// only stops waiting for checked-out connections to come back.
    pub async fn close(&self) {
        let pools: Vec<_> = {
            let mut map = crate::sync::lock_std(&self.inner.map);
            map.closed = true;
            map.pools.drain().map(|(_, t)| t.pool).collect()
        };
        for p in &pools {
            p.begin_close();
        }
        for p in pools {
            p.close().await;
        }
    }
}

impl<C, T> Service<T> for KeyedPool<C, T>
where
    C: Connector<T>,
    T: Target + Eq + Hash,
{
    type Response = crate::Pooled<C::Response>;
    type Error = PoolError;
    type Future = PoolFuture<C::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// The future is cancel safe, like [`Pool::get`].
    fn call(&mut self, target: T) -> Self::Future {
        match self.pool(&target) {
            Ok(pool) => PoolFuture::new(async move { pool.get().await }),
            Err(e) => PoolFuture::new(async move { Err(e) }),
        }
    }
}
