//! `RedisRateLimitLayer`: builds a fleet limiter, global or keyed, and the services
//! that share it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use marina_limit::{Global, Keyed, OnLimit, Rate, WithoutKey};
use tower_layer::Layer;

use super::config::Lease;
use super::handle::RedisRateHandle;
use super::limiter::{Limiter, sweep};
use super::service::RedisRateLimit;
use crate::config::{Fallback, InvalidConfig, or_panic};
use crate::fleet::RedisFleet;

/// How often a keyed limiter drops the local state of idle keys.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// A rate limit shared by every instance of a fleet, on Redis: marina-limit's
/// [`RateLimitLayer`](marina_limit::RateLimitLayer) with one quota for all the
/// instances that use the same fleet key prefix and limiter `name`.
///
/// Same vocabulary as marina-limit's: a [`Rate`] (average and burst), global or keyed
/// by any [`KeyExtractor`](marina_core::KeyExtractor), requests without a key as
/// [`WithoutKey`] says, and over the limit [`RateLimited`](marina_limit::RateLimited)
/// with the exact `retry_after` or a bounded wait ([`OnLimit`]) in the fleet's line,
/// first come first served.
///
/// The GCRA step runs in Redis, one Lua script (`EVALSHA`) with Redis's own clock, on
/// one key per quota (`{prefix}:rate:{name}:k:{key}`, `…:global`, `…:nokey`) that
/// expires when its state is in the past. What stays local:
///
/// - refusals: Redis says when its next cell frees, and requests of the key are refused
///   on this instance until then without a call;
/// - with a [`Lease`], cells taken several at a time (one call for `n` admissions);
///   requests that find none while a lease call is in flight share its cells.
///
/// When Redis does not answer within the fleet's call timeout, or is down, the
/// [`Fallback`] decides at once (the fleet's, unless [`fallback`](Self::fallback) sets
/// this limiter's own).
///
/// Setters configure the layer before it is cloned or used: they panic otherwise.
///
/// # Examples
///
/// 100 requests a second per user across the fleet, leased for 4 instances:
///
/// ```no_run
/// use marina_core::HeaderKey;
/// use marina_limit::{Rate, RateLimited};
/// use marina_redis::{Lease, RedisFleet, RedisRateLimitLayer};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let fleet = RedisFleet::open("redis://127.0.0.1:6379")?;
/// let limit = RedisRateLimitLayer::keyed(&fleet, "api", HeaderKey::new("x-user"), Rate::per_second(100))
///     .lease(Lease::Auto { expected_instances: 4 });
/// let handle = limit.handle();
/// let mut svc = ServiceBuilder::new()
///     .layer(limit)
///     .service(service_fn(|_req: http::Request<()>| async { Ok::<_, std::io::Error>("ok") }));
///
/// let req = http::Request::builder().header("x-user", "alice").body(())?;
/// match svc.ready().await?.call(req).await {
///     Ok(body) => println!("{body}"),
///     Err(e) if e.is::<RateLimited>() => println!("over the fleet's limit: {e}"),
///     Err(e) => return Err(e),
/// }
/// println!("{:?}", handle.stats());
/// # Ok(()) }
/// ```
pub struct RedisRateLimitLayer<X = Global> {
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) extractor: Arc<X>,
}

impl<X> Clone for RedisRateLimitLayer<X> {
    fn clone(&self) -> Self {
        RedisRateLimitLayer {
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X> fmt::Debug for RedisRateLimitLayer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.limiter;
        f.debug_struct("RedisRateLimitLayer")
            .field("name", &l.name)
            .field("rate", &l.rate)
            .field("lease", &l.lease)
            .field("on_limit", &l.on_limit)
            .field("fallback", &l.fallback)
            .finish_non_exhaustive()
    }
}

impl RedisRateLimitLayer<Global> {
    /// One quota named `name` for every request of every instance.
    ///
    /// # Panics
    ///
    /// If `name` or `rate` is out of range, with [`try_global`](Self::try_global)'s
    /// message.
    #[track_caller]
    pub fn global(fleet: &RedisFleet, name: &str, rate: Rate) -> Self {
        or_panic(Self::try_global(fleet, name, rate))
    }

    /// One quota named `name` for every request of every instance, or
    /// [`InvalidConfig`]: `name` is not 1 to 64 bytes without whitespace (field
    /// `name`), or `rate` is above 1,000,000 requests a second (field
    /// `rate_per_second`: Redis's clock counts microseconds).
    pub fn try_global(fleet: &RedisFleet, name: &str, rate: Rate) -> Result<Self, InvalidConfig> {
        Ok(RedisRateLimitLayer {
            limiter: Arc::new(Limiter::new(fleet, name, rate, false)?),
            extractor: Arc::new(Global),
        })
    }
}

impl<X> RedisRateLimitLayer<Keyed<X>> {
    /// One quota per key read by `extractor`, named `name` across the fleet. Its first
    /// service starts a task on the current tokio runtime, if any, that drops idle
    /// keys' local state every 10 s (it ends with the layer and its services).
    ///
    /// # Panics
    ///
    /// If `name` or `rate` is out of range, with [`try_keyed`](Self::try_keyed)'s
    /// message.
    #[track_caller]
    pub fn keyed(fleet: &RedisFleet, name: &str, extractor: X, rate: Rate) -> Self {
        or_panic(Self::try_keyed(fleet, name, extractor, rate))
    }

    /// One quota per key, or [`InvalidConfig`] as [`try_global`](RedisRateLimitLayer::try_global)
    /// says.
    pub fn try_keyed(
        fleet: &RedisFleet,
        name: &str,
        extractor: X,
        rate: Rate,
    ) -> Result<Self, InvalidConfig> {
        Ok(RedisRateLimitLayer {
            limiter: Arc::new(Limiter::new(fleet, name, rate, true)?),
            extractor: Arc::new(Keyed(extractor)),
        })
    }

    /// What happens to a request whose key `extractor` finds none (default
    /// [`WithoutKey::Refuse`]), as in marina-limit; with [`WithoutKey::Shared`] they
    /// share one fleet-wide quota of their own.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn without_key(mut self, without_key: WithoutKey) -> Self {
        self.limiter_mut().without_key = without_key;
        self
    }

    /// The most keys whose local state (leased cells, known refusals) this instance
    /// keeps (default 100,000; idle ones are dropped every 10 s). Keys past it are
    /// still limited: each of their requests asks Redis.
    ///
    /// # Panics
    ///
    /// If `max_keys` is 0, with [`try_max_keys`](Self::try_max_keys)'s message; if the
    /// layer was already cloned or used.
    #[track_caller]
    pub fn max_keys(self, max_keys: usize) -> Self {
        or_panic(self.try_max_keys(max_keys))
    }

    /// The most keys whose local state this instance keeps, or [`InvalidConfig`] on
    /// `max_keys` if it is 0.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn try_max_keys(mut self, max_keys: usize) -> Result<Self, InvalidConfig> {
        if max_keys == 0 {
            return Err(InvalidConfig::new("max_keys", "must be above 0, got 0"));
        }
        self.limiter_mut().max_keys = max_keys;
        Ok(self)
    }
}

impl<X> RedisRateLimitLayer<X> {
    fn limiter_mut(&mut self) -> &mut Limiter {
        Arc::get_mut(&mut self.limiter).expect("configure the layer before cloning or using it")
    }

    /// What happens over the limit (default `Reject`). With `Wait`, a request that
    /// finds no free cell reserves the fleet's next one (one call) and waits for it,
    /// or is refused at once if it is more than `max` away.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn on_limit(mut self, on_limit: OnLimit) -> Self {
        self.limiter_mut().on_limit = on_limit;
        self
    }

    /// Takes cells from Redis several at a time (default [`Lease::Off`]).
    ///
    /// # Panics
    ///
    /// If `lease` is out of range for the rate, with [`try_lease`](Self::try_lease)'s
    /// message; if the layer was already cloned or used.
    #[track_caller]
    pub fn lease(self, lease: Lease) -> Self {
        or_panic(self.try_lease(lease))
    }

    /// Takes cells several at a time, or [`InvalidConfig`] if `lease` is out of range
    /// for the rate ([`Lease::validate`]).
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used.
    pub fn try_lease(mut self, lease: Lease) -> Result<Self, InvalidConfig> {
        self.limiter_mut().set_lease(lease)?;
        Ok(self)
    }

    /// This limiter's fallback when Redis cannot answer (default: the fleet's).
    ///
    /// # Panics
    ///
    /// If `fallback` is out of range ([`Fallback::validate`]), or the layer was
    /// already cloned or used.
    #[track_caller]
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        or_panic(fallback.validate());
        self.limiter_mut().fallback = fallback;
        self
    }

    /// The handle to the counters.
    pub fn handle(&self) -> RedisRateHandle {
        RedisRateHandle {
            limiter: self.limiter.clone(),
        }
    }
}

impl<S, X> Layer<S> for RedisRateLimitLayer<X> {
    type Service = RedisRateLimit<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        if self.limiter.keyed
            && !self.limiter.sweeping.swap(true, Relaxed)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(sweep(Arc::downgrade(&self.limiter), SWEEP_EVERY));
        }
        RedisRateLimit::new(inner, self.limiter.clone(), self.extractor.clone())
    }
}
