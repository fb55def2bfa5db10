//! `RedisConcurrencyLayer` and its handle.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use marina_limit::WithoutKey;
use tower_layer::Layer;

use super::semaphore::{MAX_LIMIT, Semaphore};
use super::service::RedisConcurrency;
use crate::config::{Fallback, InvalidConfig, or_panic};
use crate::fleet::RedisFleet;

/// At most `limit` requests in flight per key across every instance of a fleet, on
/// Redis: marina-limit's [`ConcurrencyPerKeyLayer`](marina_limit::ConcurrencyPerKeyLayer)
/// for a fleet (a cap on connections per user that holds for all replicas together).
///
/// A permit is a member of the key's sorted set in Redis (`{prefix}:conc:{name}:k:{key}`)
/// with a lease: taken by one Lua script that first drops the expired leases, renewed
/// every third of the lease while its request is in flight (one pipeline for all of
/// this instance's permits), released when the response completes or its future is
/// dropped. An instance that dies without releasing (a crash, a partition) stops
/// renewing: its permits come back to the fleet when their lease ends
/// ([`lease_time`](Self::lease_time), default 10 s).
///
/// Over the limit, a request fails with [`ConnectionLimit`](marina_limit::ConnectionLimit)
/// at once, or with [`wait`](Self::wait) asks again (when a permit of this instance is
/// released, or as the earliest lease in the set ends, backing off up to 50 ms) until
/// the wait is over. Without a key: as [`WithoutKey`] says ([`MissingKey`](marina_limit::MissingKey)
/// by default). When Redis cannot answer within the fleet's call timeout, the
/// [`Fallback`] decides.
///
/// Costs two Redis calls per request (take, release) plus the renewals: a limit of
/// requests in flight cannot be leased without letting the fleet exceed it.
///
/// Setters configure the layer before it is cloned or used: they panic otherwise.
///
/// # Examples
///
/// ```no_run
/// use marina_core::HeaderKey;
/// use marina_limit::ConnectionLimit;
/// use marina_redis::{RedisConcurrencyLayer, RedisFleet};
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let fleet = RedisFleet::open("redis://127.0.0.1:6379")?;
/// let layer = RedisConcurrencyLayer::new(&fleet, "per-user", HeaderKey::new("x-user"), 4)
///     .lease_time(Duration::from_secs(5))
///     .wait(Duration::from_millis(200));
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|_req: http::Request<()>| async { Ok::<_, std::io::Error>("ok") }));
/// let req = http::Request::builder().header("x-user", "alice").body(())?;
/// match svc.ready().await?.call(req).await {
///     Ok(body) => println!("{body}"),
///     Err(e) if e.is::<ConnectionLimit>() => println!("alice has 4 requests in flight already"),
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
pub struct RedisConcurrencyLayer<X> {
    pub(crate) sem: Arc<Semaphore>,
    pub(crate) extractor: Arc<X>,
}

impl<X> Clone for RedisConcurrencyLayer<X> {
    fn clone(&self) -> Self {
        RedisConcurrencyLayer {
            sem: self.sem.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X> fmt::Debug for RedisConcurrencyLayer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.sem;
        f.debug_struct("RedisConcurrencyLayer")
            .field("name", &s.name)
            .field("limit", &s.limit)
            .field("lease_time", &s.lease)
            .field("wait", &s.wait)
            .field("fallback", &s.fallback)
            .finish_non_exhaustive()
    }
}

impl<X> RedisConcurrencyLayer<X> {
    /// The highest per-key limit: 1,000,000.
    pub const MAX_LIMIT: usize = MAX_LIMIT;

    /// At most `limit` requests in flight per key read by `extractor`, fleet-wide,
    /// under the name `name`.
    ///
    /// # Panics
    ///
    /// If `name` or `limit` is out of range, with [`try_new`](Self::try_new)'s
    /// message.
    #[track_caller]
    pub fn new(fleet: &RedisFleet, name: &str, extractor: X, limit: usize) -> Self {
        or_panic(Self::try_new(fleet, name, extractor, limit))
    }

    /// At most `limit` requests in flight per key, or [`InvalidConfig`]: `name` is not
    /// 1 to 64 bytes without whitespace (field `name`), `limit` is 0 or above
    /// [`MAX_LIMIT`](Self::MAX_LIMIT) (field `concurrency_per_key`), or the fleet's
    /// call timeout is too long for the default lease (field `lease_time`).
    pub fn try_new(
        fleet: &RedisFleet,
        name: &str,
        extractor: X,
        limit: usize,
    ) -> Result<Self, InvalidConfig> {
        let sem = Semaphore::new(fleet, name, limit)?;
        sem.check_lease(sem.lease)?;
        Ok(RedisConcurrencyLayer {
            sem: Arc::new(sem),
            extractor: Arc::new(extractor),
        })
    }

    fn sem_mut(&mut self) -> &mut Semaphore {
        Arc::get_mut(&mut self.sem).expect("configure the layer before cloning or using it")
    }

    /// How long a permit lasts without renewal (default 10 s): how long a crashed
    /// instance's permits stay taken. Renewed every third of it while held.
    ///
    /// # Panics
    ///
    /// If out of range, with [`try_lease_time`](Self::try_lease_time)'s message; if
    /// the layer was already cloned or used.
    #[track_caller]
    pub fn lease_time(self, lease: Duration) -> Self {
        or_panic(self.try_lease_time(lease))
    }

    /// How long a permit lasts without renewal, or [`InvalidConfig`] on `lease_time`
    /// if it is under 100 ms or 4 call timeouts, or over an hour.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn try_lease_time(mut self, lease: Duration) -> Result<Self, InvalidConfig> {
        self.sem.check_lease(lease)?;
        self.sem_mut().lease = lease;
        Ok(self)
    }

    /// Waits up to `max` for a permit instead of failing at once. Any `max`: zero
    /// fails as without a wait.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn wait(mut self, max: Duration) -> Self {
        self.sem_mut().wait = Some(max);
        self
    }

    /// What happens to a request whose key `extractor` finds none (default
    /// [`WithoutKey::Refuse`]); with [`WithoutKey::Shared`] those requests share one
    /// fleet-wide set of `limit` permits.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn without_key(mut self, without_key: WithoutKey) -> Self {
        self.sem_mut().without_key = without_key;
        self
    }

    /// This layer's fallback when Redis cannot answer (default: the fleet's).
    ///
    /// # Panics
    ///
    /// If `fallback` is out of range ([`Fallback::validate`]), or the layer was
    /// already cloned or used.
    #[track_caller]
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        or_panic(fallback.validate());
        self.sem_mut().fallback = fallback;
        self
    }

    /// The handle to the counters.
    pub fn handle(&self) -> RedisConcurrencyHandle {
        RedisConcurrencyHandle {
            sem: self.sem.clone(),
        }
    }
}

impl<S, X> Layer<S> for RedisConcurrencyLayer<X> {
    type Service = RedisConcurrency<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisConcurrency::new(inner, self.sem.clone(), self.extractor.clone())
    }
}

/// A [`RedisConcurrencyLayer`]'s figures on this instance, from
/// [`RedisConcurrencyHandle::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConcurrencyStats {
    /// Permits this instance holds now (in Redis, or of the local fallback).
    pub in_flight: usize,
    /// The per-key limit, fleet-wide.
    pub limit: usize,
    /// Requests admitted here.
    pub admitted: u64,
    /// Requests refused here (over the limit, without a key, failing closed).
    pub rejected: u64,
    /// Requests refused because they had no key (also in `rejected`).
    pub missing_key: u64,
    /// Redis round trips this layer made: takes, releases, renewal pipelines.
    pub redis_calls: u64,
    /// Requests the fallback decided.
    pub fallback: u64,
    /// Permit leases renewed.
    pub renewals: u64,
    /// Permits whose lease ended while held (Redis unreachable for longer than the
    /// lease): the fleet may have exceeded its limit meanwhile.
    pub lost: u64,
    /// Releases that did not reach Redis: those permits came back when their lease
    /// ended.
    pub release_failures: u64,
}

/// The figures of a fleet concurrency limit on this instance, readable from anywhere.
#[derive(Clone)]
pub struct RedisConcurrencyHandle {
    pub(crate) sem: Arc<Semaphore>,
}

impl fmt::Debug for RedisConcurrencyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConcurrencyHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisConcurrencyHandle {
    /// The counters.
    pub fn stats(&self) -> RedisConcurrencyStats {
        let s = &self.sem;
        let c = &s.counters;
        RedisConcurrencyStats {
            in_flight: s.in_flight(),
            limit: s.limit,
            admitted: c.admitted.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            missing_key: c.missing_key.load(Relaxed),
            redis_calls: c.calls.load(Relaxed),
            fallback: c.fallback.load(Relaxed),
            renewals: c.renewals.load(Relaxed),
            lost: c.lost.load(Relaxed),
            release_failures: c.release_failures.load(Relaxed),
        }
    }
}
