//! `RateLimitLayer`: builds a limiter, global or keyed, and the services that share it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tower_layer::Layer;

use super::config::{KeyTable, OnLimit, Rate};
use super::handle::RateLimitHandle;
use super::limiter::{Limiter, sweep, without_key_code};
use super::service::RateLimit;
use crate::invalid::{InvalidLimit, or_panic};
use crate::keyless::WithoutKey;

/// Limits the rate of requests, with governor's GCRA on tokio's clock.
///
/// - [`global`](Self::global): one quota for every request through the layer's
///   services (clones share it). Over the limit, `Reject` fails the call with
///   [`RateLimited`]; `Wait` holds `poll_ready` back (backpressure) until the
///   service's reserved cell comes, up to its bound.
/// - [`keyed`](Self::keyed): one quota per key (user, client IP: any
///   [`KeyExtractor`]). A request without a key is refused with [`MissingKey`]
///   unless [`without_key`](Self::without_key) says otherwise ([`WithoutKey`]: let
///   through unlimited, or one quota for all of them). The key table is bounded
///   (`max_keys`, default 100,000: evict the least active keys, or refuse new ones
///   with [`TooManyKeys`]) and swept every `sweep_interval` (default 60 s) of keys
///   whose quota has replenished (governor#171: rotating keys otherwise grow without
///   bound). `Wait` delays the request in its future: the service must be `Clone`
///   (wrap others in `tower::buffer::Buffer`). The table is looked up by the key as
///   the extractor lends it ([`KeyExtractor::with_key`]), compared in full (no two
///   keys share a quota): a known key costs no allocation with [`HeaderKey`],
///   [`CookieKey`] and [`ClientIp`]; a closure extractor's `String` costs one.
///
/// In `Wait` mode the waiters of one quota (the global one, or one key's) are served
/// first come, first served: a request that finds no free cell reserves the next one
/// (GCRA's theoretical arrival time moves one period on), so it knows on arrival when
/// it will be admitted, and no later request can take that cell. Its wait is its
/// place in line: with `n` waiters ahead, `n + 1` periods at most, however many
/// callers share the quota. It is refused only if that place is more than `max`
/// away, and then at once, reserving nothing. Admissions stay within the quota: the
/// reserved cells are the ones successive checks would have granted.
///
/// ```
/// use marina_limit::{OnLimit, Rate, RateLimitLayer, RateLimited};
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mut svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::global(Rate::per_second(2)))
///     .service(service_fn(|r: u32| async move { Ok::<_, std::io::Error>(r) }));
/// assert!(svc.ready().await.unwrap().call(1).await.is_ok());
/// assert!(svc.ready().await.unwrap().call(2).await.is_ok());
/// let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<RateLimited>().unwrap().retry_after, Duration::from_millis(500));
/// # }
/// ```
///
/// [`RateLimited`]: crate::RateLimited
/// [`KeyExtractor`]: marina_core::KeyExtractor
/// [`KeyExtractor::with_key`]: marina_core::KeyExtractor::with_key
/// [`HeaderKey`]: marina_core::HeaderKey
/// [`CookieKey`]: marina_core::CookieKey
/// [`ClientIp`]: marina_core::ClientIp
/// [`MissingKey`]: crate::MissingKey
/// [`TooManyKeys`]: crate::TooManyKeys
pub struct RateLimitLayer<X = Global> {
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) extractor: Arc<X>,
}

impl<X> Clone for RateLimitLayer<X> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<X> fmt::Debug for RateLimitLayer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("name", &self.limiter.name)
            .field("rate", &self.limiter.rate)
            .field("on_limit", &self.limiter.on_limit())
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer<Global> {
    /// One quota for all requests; `Reject` over the limit. Named `"rate"`
    /// ([`name`](Self::name)).
    pub fn global(rate: Rate) -> Self {
        RateLimitLayer {
            limiter: Arc::new(Limiter::global(rate, Limiter::GLOBAL.into())),
            extractor: Arc::new(Global),
        }
    }
}

/// The key type of a global limiter: no key.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

/// The key type of a keyed limiter: its extractor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keyed<X>(pub X);

impl<X> RateLimitLayer<Keyed<X>> {
    /// One quota per key read by `extractor`, with the default key table. Requests
    /// without a key are refused ([`without_key`](Self::without_key)). Named
    /// `"rate_per_key"` ([`name`](Self::name)).
    pub fn keyed(extractor: X, rate: Rate) -> Self {
        Self::build_keyed(extractor, rate, KeyTable::default())
    }

    /// One quota per key, with `table`'s bound and sweep. Starts the sweep task on
    /// the current tokio runtime, if any; it ends when the layer and its services are
    /// gone.
    ///
    /// # Panics
    ///
    /// If a field of `table` is out of range (see [`KeyTable`]), with
    /// [`try_keyed_with`](Self::try_keyed_with)'s message.
    #[track_caller]
    pub fn keyed_with(extractor: X, rate: Rate, table: KeyTable) -> Self {
        or_panic(Self::try_keyed_with(extractor, rate, table))
    }

    /// One quota per key, with `table`'s bound and sweep, or [`InvalidLimit`] if a
    /// field of `table` is out of range ([`KeyTable::validate`]).
    pub fn try_keyed_with(extractor: X, rate: Rate, table: KeyTable) -> Result<Self, InvalidLimit> {
        table.validate()?;
        Ok(Self::build_keyed(extractor, rate, table))
    }

    fn build_keyed(extractor: X, rate: Rate, table: KeyTable) -> Self {
        let limiter = Arc::new(Limiter::keyed(rate, table, Limiter::KEYED.into()));
        start_sweep(&limiter);
        RateLimitLayer {
            limiter,
            extractor: Arc::new(Keyed(extractor)),
        }
    }

    /// What happens to a request whose key `extractor` finds none (default
    /// [`WithoutKey::Refuse`]: it fails with [`MissingKey`]; see [`WithoutKey`] for
    /// why). Applies to every service of the layer, from their next request.
    ///
    /// With [`WithoutKey::Shared`], all those requests share one quota at the
    /// layer's rate, apart from every key's (the empty key's included); over it they
    /// fail with [`RateLimited`] or wait, as [`on_limit`](Self::on_limit) says.
    ///
    /// [`MissingKey`]: crate::MissingKey
    /// [`RateLimited`]: crate::RateLimited
    pub fn without_key(self, without_key: WithoutKey) -> Self {
        self.limiter
            .without_key
            .store(without_key_code(without_key), Relaxed);
        self
    }
}

impl<K> RateLimitLayer<K> {
    /// What happens over the limit (default `Reject`); applies to every service of
    /// the layer, from their next request.
    pub fn on_limit(self, on_limit: OnLimit) -> Self {
        *self
            .limiter
            .on_limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = on_limit;
        self
    }

    /// Names the limiter: the value of its `limiter` label in metrics (the `metrics`
    /// feature) and the name its handle reports. Defaults: `"rate"` for a global
    /// limiter, `"rate_per_key"` for a keyed one, so a stack with one of each needs no
    /// names; give each its own when a stack has several (`"per_user"`,
    /// `"per_ip"`). Use a fixed name, never one made from a user's key.
    ///
    /// The limiter's metrics are registered under the new name now (the ones
    /// registered at construction under the default name stay, at 0).
    ///
    /// ```
    /// use marina_limit::{Rate, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::global(Rate::per_second(100)).name("outbound");
    /// assert_eq!(layer.handle().name(), "outbound");
    /// ```
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used (name it first): its services and
    /// handles would keep the old limiter.
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        assert!(
            Arc::strong_count(&self.limiter) == 1,
            "name the rate limit before cloning or using the layer"
        );
        let limiter = Arc::new(self.limiter.renamed(name.into()));
        if limiter.table.is_some() {
            start_sweep(&limiter);
        }
        self.limiter = limiter;
        self
    }

    /// The handle to the counters.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            limiter: self.limiter.clone(),
        }
    }
}

/// Starts a keyed limiter's sweep on the current tokio runtime, if any; it ends when
/// the limiter is gone.
fn start_sweep(limiter: &Arc<Limiter>) {
    if let (Some(table), Ok(rt)) = (limiter.table, tokio::runtime::Handle::try_current()) {
        rt.spawn(sweep(Arc::downgrade(limiter), table.sweep_interval));
    }
}

impl<S, X> Layer<S> for RateLimitLayer<X> {
    type Service = RateLimit<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limiter.clone(), self.extractor.clone())
    }
}
