//! `KeyedPool`: one pool per target.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use marina_core::BoxError;
use tower_service::Service;

use crate::pool::{Builder, Pool, PoolFuture};
use crate::{PoolError, PoolStats};

/// A `Service<T>` that keeps one [`Pool`] per target, all built from one [`Builder`] —
/// the pooled connector to hand to a `Service<Uri>` (or `Service<SocketAddr>`) slot.
///
/// The number of targets is bounded by [`max_targets`](Self::max_targets) (default 1024):
/// when a new target would exceed it, targets whose pools hold no connection and no
/// waiter (all closed by idle timeout, say) are dropped; if none can be, the call fails
/// with [`PoolError::TooManyTargets`]. Empty pools are also swept every 256 calls, so a
/// flood of distinct targets leaves nothing behind once its connections expire.
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
    max_targets: usize,
}

struct KeyedInner<C, T>
where
    C: Service<T>,
{
    builder: Builder,
    connector: C,
    map: Mutex<KeyedMap<C, T>>,
}

struct KeyedMap<C, T>
where
    C: Service<T>,
{
    pools: HashMap<T, Pool<C, T>>,
    calls: u64,
}

impl<C, T> Clone for KeyedPool<C, T>
where
    C: Service<T>,
{
    fn clone(&self) -> Self {
        KeyedPool {
            inner: self.inner.clone(),
            max_targets: self.max_targets,
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
            .field("max_targets", &self.max_targets)
            .finish_non_exhaustive()
    }
}

impl<C, T> KeyedPool<C, T>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    /// A keyed pool whose per-target pools are built by `builder` over `connector`.
    /// Fails with [`PoolError::Invalid`] if the builder's configuration has errors.
    pub fn new(builder: Builder, connector: C) -> Result<Self, PoolError> {
        let report = builder.config.validate();
        if !report.is_ok() {
            return Err(PoolError::Invalid(report.errors));
        }
        Ok(KeyedPool {
            inner: Arc::new(KeyedInner {
                builder,
                connector,
                map: Mutex::new(KeyedMap {
                    pools: HashMap::new(),
                    calls: 0,
                }),
            }),
            max_targets: 1024,
        })
    }

    /// Bounds the number of targets kept at once (at least 1).
    pub fn max_targets(mut self, n: usize) -> Self {
        self.max_targets = n.max(1);
        self
    }

    /// The pool for `target`, created if needed.
    pub fn pool(&self, target: &T) -> Result<Pool<C, T>, PoolError> {
        let mut map = crate::sync::lock_std(&self.inner.map);
        map.calls += 1;
        if map.calls % 256 == 0 {
            sweep(&mut map.pools);
        }
        if let Some(p) = map.pools.get(target) {
            return Ok(p.clone());
        }
        if map.pools.len() >= self.max_targets {
            sweep(&mut map.pools);
            if map.pools.len() >= self.max_targets {
                return Err(PoolError::TooManyTargets(self.max_targets));
            }
        }
        let pool = self
            .inner
            .builder
            .build(self.inner.connector.clone(), target.clone())?;
        map.pools.insert(target.clone(), pool.clone());
        Ok(pool)
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
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        pools.into_iter().map(|(t, p)| (t, p.stats())).collect()
    }

    /// Drops the pools of targets that hold no connection and no waiter.
    pub fn sweep(&self) {
        sweep(&mut crate::sync::lock_std(&self.inner.map).pools);
    }

    /// Closes every target's pool (see [`Pool::close`]) and forgets them.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: every pool is closed before the first await; dropping the future
    /// only stops waiting for checked-out connections to come back.
    pub async fn close(&self) {
        let pools: Vec<_> = crate::sync::lock_std(&self.inner.map)
            .pools
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in &pools {
            p.begin_close();
        }
        for p in pools {
            p.close().await;
        }
    }
}

fn sweep<C: Service<T>, T>(pools: &mut HashMap<T, Pool<C, T>>) {
    pools.retain(|_, p| !p.is_empty_and_unused());
}

impl<C, T> Service<T> for KeyedPool<C, T>
where
    C: Service<T> + Clone + Send + Sync + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    type Response = crate::Pooled<C::Response>;
    type Error = PoolError;
    type Future = PoolFuture<C::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: T) -> Self::Future {
        match self.pool(&target) {
            Ok(pool) => PoolFuture::new(async move { pool.get().await }),
            Err(e) => PoolFuture::new(async move { Err(e) }),
        }
    }
}
