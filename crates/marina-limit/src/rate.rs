//! `RateLimit`: GCRA request-rate limits (governor), global or keyed.

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use marina_core::{BoxError, KeyExtractor};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::clock::TokioClock;
use crate::store::{BoundedStore, SharedStore, WhenKeysFull};

/// A request went over its rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// How long until the same request would be admitted (to the nanosecond; round
    /// up, not down, for a `Retry-After` header).
    pub retry_after: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited: retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}

/// The keyed limiter tracks its maximum number of keys and refuses new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyKeys {
    /// The cap.
    pub max_keys: usize,
}

impl fmt::Display for TooManyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limiter tracks its maximum of {} keys: new key refused",
            self.max_keys
        )
    }
}

impl std::error::Error for TooManyKeys {}

/// What happens to a request over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Fail it at once with [`RateLimited`].
    #[default]
    Reject,
    /// Delay it until the limit admits it, if that is within `max`; otherwise fail it
    /// with [`RateLimited`] at once.
    Wait {
        /// The longest delay.
        max: Duration,
    },
}

/// A rate: `per_second` requests each second on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    quota: Quota,
}

impl Rate {
    /// `n` requests per second, bursts of `n`.
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    pub fn per_second(n: u32) -> Self {
        Rate {
            quota: Quota::per_second(NonZeroU32::new(n).expect("a rate above 0")),
        }
    }

    /// One request every `period`, bursts of 1.
    ///
    /// # Panics
    ///
    /// If `period` is zero.
    pub fn every(period: Duration) -> Self {
        Rate {
            quota: Quota::with_period(period).expect("a period above 0"),
        }
    }

    /// Allows bursts of `burst` requests (at least 1).
    pub fn burst(self, burst: u32) -> Self {
        Rate {
            quota: self
                .quota
                .allow_burst(NonZeroU32::new(burst.max(1)).expect("at least 1")),
        }
    }

    /// The average requests per second.
    pub fn per_second_f64(&self) -> f64 {
        1.0 / self.quota.replenish_interval().as_secs_f64()
    }

    /// The burst.
    pub fn burst_size(&self) -> u32 {
        self.quota.burst_size().get()
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter = RateLimiter<String, SharedStore<String>, TokioClock, NoOpMiddleware<Nanos>>;

/// The limiter shared by a layer's services.
struct Limiter {
    kind: Kind,
    clock: TokioClock,
    rate: Rate,
    on_limit: std::sync::Mutex<OnLimit>,
    admitted: AtomicU64,
    rejected: AtomicU64,
    /// The last `stats()` reading: (clock ns, admitted then, rate computed then).
    last_reading: std::sync::Mutex<(u64, u64, u64)>,
}

enum Kind {
    Global(Direct),
    Keyed(KeyedLimiter, Arc<BoundedStore<String>>),
}

impl Limiter {
    fn now(&self) -> Nanos {
        self.clock.now()
    }

    fn admit(&self) {
        self.admitted.fetch_add(1, Relaxed);
    }

    fn on_limit(&self) -> OnLimit {
        *self
            .on_limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admissions per second since the previous reading at least a second ago.
    fn current_rate(&self) -> u64 {
        let now = self.now().as_u64();
        let admitted = self.admitted.load(Relaxed);
        let mut last = self
            .last_reading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (t, a, rate) = *last;
        let dt = now.saturating_sub(t);
        if dt >= 1_000_000_000 {
            let r = ((admitted - a) as f64 / (dt as f64 / 1e9)).round() as u64;
            *last = (now, admitted, r);
            r
        } else {
            rate
        }
    }

    /// Takes a cell for `key` (or the global one): `Ok`, or how long until one.
    fn check(&self, key: Option<&String>) -> Result<(), Check> {
        let out = match (&self.kind, key) {
            (Kind::Global(l), _) => l.check(),
            (Kind::Keyed(l, store), key) => {
                // Requests without a key share the empty key's quota.
                let empty = String::new();
                let k = key.unwrap_or(&empty);
                if !store.admit(k, || self.now().as_u64()) {
                    return Err(Check::Full(store.max_keys()));
                }
                l.check_key(k)
            }
        };
        match out {
            Ok(()) => {
                self.admit();
                Ok(())
            }
            Err(nu) => Err(Check::Wait(self.wait_of(&nu))),
        }
    }

    fn wait_of(&self, nu: &NotUntil<Nanos>) -> Duration {
        nu.wait_time_from(self.now())
    }

    fn reject(&self, wait: Duration) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        RateLimited { retry_after: wait }.into()
    }
}

enum Check {
    Wait(Duration),
    Full(usize),
}

/// A [`RateLimitLayer`]'s figures, from [`RateLimitHandle::stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateStats {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests refused (over the limit, or a new key when the key table refuses).
    pub rejected: u64,
    /// Requests admitted per second, averaged since the previous `stats()` reading at
    /// least a second earlier (or since the limiter was made): a scraper reading every
    /// 15 s sees the rate over those 15 s. (Counting per request costs one atomic add;
    /// no clock read.)
    pub current_rate: u64,
    /// The limit's average rate, requests per second.
    pub limit_per_second: f64,
    /// The limit's burst.
    pub burst: u32,
    /// Keys tracked now (keyed limiters).
    pub keys: usize,
    /// Keys forgotten to make room (keyed limiters).
    pub evicted_keys: u64,
}

/// The figures of a rate limiter, readable from anywhere.
#[derive(Clone)]
pub struct RateLimitHandle {
    limiter: Arc<Limiter>,
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl RateLimitHandle {
    /// The counters.
    pub fn stats(&self) -> RateStats {
        let l = &self.limiter;
        let (keys, evicted_keys) = match &l.kind {
            Kind::Global(_) => (0, 0),
            Kind::Keyed(_, store) => (store.len(), store.evicted.load(Relaxed)),
        };
        RateStats {
            admitted: l.admitted.load(Relaxed),
            rejected: l.rejected.load(Relaxed),
            current_rate: l.current_rate(),
            limit_per_second: l.rate.per_second_f64(),
            burst: l.rate.burst_size(),
            keys,
            evicted_keys,
        }
    }

    /// Forgets keys whose quota has fully replenished, as the sweep does; returns how
    /// many.
    pub fn retain_recent(&self) -> usize {
        match &self.limiter.kind {
            Kind::Global(_) => 0,
            Kind::Keyed(_, store) => store.retain_recent(self.limiter.now().as_u64()),
        }
    }
}

/// Limits the rate of requests, with governor's GCRA on tokio's clock.
///
/// - [`global`](Self::global): one quota for every request through the layer's
///   services (clones share it). Over the limit, `Reject` fails the call with
///   [`RateLimited`]; `Wait` holds `poll_ready` back (backpressure) until a cell is
///   free, up to its bound.
/// - [`keyed`](Self::keyed): one quota per key (user, client IP: any
///   [`KeyExtractor`]); requests without a key share one. The key table is bounded
///   (`max_keys`, default 100,000: evict the least active keys, or refuse new ones
///   with [`TooManyKeys`]) and swept every `sweep_interval` (default 60 s) of keys
///   whose quota has replenished (governor#171: rotating keys otherwise grow without
///   bound). `Wait` delays the request in its future: the service must be `Clone`
///   (wrap others in `tower::buffer::Buffer`).
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
pub struct RateLimitLayer<X = Global> {
    limiter: Arc<Limiter>,
    extractor: Arc<X>,
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
            .field("rate", &self.limiter.rate)
            .field("on_limit", &self.limiter.on_limit())
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer<Global> {
    /// One quota for all requests; `Reject` over the limit.
    pub fn global(rate: Rate) -> Self {
        let clock = TokioClock::new();
        RateLimitLayer {
            limiter: Arc::new(Limiter {
                kind: Kind::Global(RateLimiter::direct_with_clock(rate.quota, clock)),
                clock,
                rate,
                on_limit: std::sync::Mutex::new(OnLimit::Reject),
                admitted: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                last_reading: std::sync::Mutex::new((0, 0, 0)),
            }),
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

/// Settings of a keyed limiter's key table.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct KeyTable {
    /// The most keys tracked (default 100,000).
    pub max_keys: usize,
    /// What happens to a new key when full.
    pub when_full: WhenKeysFull,
    /// How often replenished keys are dropped (default 60 s).
    pub sweep_interval: Duration,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            max_keys: 100_000,
            when_full: WhenKeysFull::EvictOldest,
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl KeyTable {
    /// Room for `max_keys`.
    pub fn with_capacity(max_keys: usize) -> Self {
        KeyTable {
            max_keys,
            ..Self::default()
        }
    }

    /// What happens to a new key when full.
    pub fn when_full(mut self, when_full: WhenKeysFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// How often replenished keys are dropped.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }
}

impl<X> RateLimitLayer<Keyed<X>> {
    /// One quota per key read by `extractor`, with the default key table.
    pub fn keyed(extractor: X, rate: Rate) -> Self {
        Self::keyed_with(extractor, rate, KeyTable::default())
    }

    /// One quota per key, with `table`'s bound and sweep. Starts the sweep task on
    /// the current tokio runtime, if any; it ends when the layer and its services are
    /// gone.
    pub fn keyed_with(extractor: X, rate: Rate, table: KeyTable) -> Self {
        let clock = TokioClock::new();
        let store = Arc::new(BoundedStore::new(table.max_keys, table.when_full));
        let limiter = Arc::new(Limiter {
            kind: Kind::Keyed(
                RateLimiter::new(rate.quota, SharedStore(store.clone()), clock),
                store,
            ),
            clock,
            rate,
            on_limit: std::sync::Mutex::new(OnLimit::Reject),
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_reading: std::sync::Mutex::new((0, 0, 0)),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&limiter), table.sweep_interval));
        }
        RateLimitLayer {
            limiter,
            extractor: Arc::new(Keyed(extractor)),
        }
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

    /// The handle to the counters.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            limiter: self.limiter.clone(),
        }
    }
}

async fn sweep(limiter: std::sync::Weak<Limiter>, every: Duration) {
    let every = every.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(l) = limiter.upgrade() else {
            return;
        };
        if let Kind::Keyed(_, store) = &l.kind {
            let n = store.retain_recent(l.now().as_u64());
            if n > 0 {
                tracing::debug!(dropped = n, "rate limiter: replenished keys dropped");
            }
        }
    }
}

impl<S, X> Layer<S> for RateLimitLayer<X> {
    type Service = RateLimit<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            state: Ready::Idle,
            sleep: None,
            waited: Duration::ZERO,
        }
    }
}

/// Readiness of a global limiter's service.
enum Ready {
    /// No cell taken.
    Idle,
    /// A cell is taken for the next call.
    Permit,
    /// Over the limit: the next call fails with this wait.
    Denied(Duration),
}

/// The service of a [`RateLimitLayer`].
pub struct RateLimit<S, X = Global> {
    inner: S,
    limiter: Arc<Limiter>,
    extractor: Arc<X>,
    state: Ready,
    sleep: Option<Pin<Box<Sleep>>>,
    /// How long this service has waited for the current cell (`Wait` mode).
    waited: Duration,
}

impl<S: Clone, X> Clone for RateLimit<S, X> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            state: Ready::Idle,
            sleep: None,
            waited: Duration::ZERO,
        }
    }
}

impl<S: fmt::Debug, X> fmt::Debug for RateLimit<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("rate", &self.limiter.rate)
            .finish_non_exhaustive()
    }
}

impl<S, X> RateLimit<S, X> {
    /// The handle to the counters.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            limiter: self.limiter.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Global: the cell is taken in `poll_ready` (backpressure in `Wait` mode).
impl<S, Req> Service<Req> for RateLimit<S, Global>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match self.state {
                Ready::Denied(_) => return Poll::Ready(Ok(())),
                Ready::Permit => return self.inner.poll_ready(cx).map_err(Into::into),
                Ready::Idle => {}
            }
            if let Some(sleep) = self.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match self.limiter.check(None) {
                Ok(()) => {
                    self.state = Ready::Permit;
                    self.waited = Duration::ZERO;
                }
                Err(Check::Full(_)) => unreachable!("a global limiter has no key table"),
                Err(Check::Wait(wait)) => match self.limiter.on_limit() {
                    // The bound is on the whole wait, re-checks included.
                    OnLimit::Wait { max } if self.waited + wait <= max => {
                        // Re-check after the delay: another caller may take the cell.
                        self.waited += wait;
                        self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                    }
                    _ => {
                        self.state = Ready::Denied(wait);
                        self.waited = Duration::ZERO;
                    }
                },
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, Ready::Idle) {
            Ready::Permit => ResponseFuture::call(self.inner.call(req)),
            Ready::Denied(wait) => ResponseFuture::failed(self.limiter.reject(wait)),
            Ready::Idle => ResponseFuture::failed("RateLimit called before poll_ready".into()),
        }
    }
}

/// Keyed: the cell is taken in `call`, where the key is known.
impl<S, X, Req> Service<Req> for RateLimit<S, Keyed<X>>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = KeyedFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = self.extractor.0.extract(&req);
        match self.limiter.check(key.as_ref()) {
            Ok(()) => KeyedState::Call {
                fut: self.inner.call(req),
            }
            .into(),
            Err(Check::Full(max_keys)) => {
                self.limiter.rejected.fetch_add(1, Relaxed);
                KeyedState::Failed {
                    error: Some(TooManyKeys { max_keys }.into()),
                }
                .into()
            }
            Err(Check::Wait(wait)) => match self.limiter.on_limit() {
                OnLimit::Wait { max } if wait <= max => {
                    // Take the readied service into the future; keep a fresh clone.
                    let clone = self.inner.clone();
                    let svc = std::mem::replace(&mut self.inner, clone);
                    KeyedState::Waiting {
                        sleep: Box::pin(tokio::time::sleep(wait)),
                        waited: wait,
                        max,
                        svc: Some(svc),
                        req: Some(req),
                        key,
                        limiter: self.limiter.clone(),
                    }
                    .into()
                }
                _ => KeyedState::Failed {
                    error: Some(self.limiter.reject(wait)),
                }
                .into(),
            },
        }
    }
}

pin_project! {
    /// The future of a global [`RateLimit`]'s calls.
    ///
    /// # Cancel safety
    ///
    /// Dropping it cancels the inner request; the rate-limit cell stays spent.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        error: Option<BoxError>,
    }
}

impl<F> ResponseFuture<F> {
    fn call(inner: F) -> Self {
        ResponseFuture {
            inner: Some(inner),
            error: None,
        }
    }

    fn failed(error: BoxError) -> Self {
        ResponseFuture {
            inner: None,
            error: Some(error),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(f) => f.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(this
                .error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
    }
}

pin_project! {
    /// The future of a keyed [`RateLimit`]'s calls: the inner response, after a
    /// bounded wait in `Wait` mode.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it waits drops the request unsent.
    pub struct KeyedFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: KeyedState<S, Req>,
    }
}

pin_project! {
    #[project = KeyedProj]
    enum KeyedState<S, Req>
    where
        S: Service<Req>,
    {
        /// Admitted: the inner call.
        Call { #[pin] fut: S::Future },
        /// Over the limit, waiting for a cell.
        Waiting {
            sleep: Pin<Box<Sleep>>,
            waited: Duration,
            max: Duration,
            svc: Option<S>,
            req: Option<Req>,
            key: Option<String>,
            limiter: Arc<Limiter>,
        },
        /// Refused.
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> From<KeyedState<S, Req>> for KeyedFuture<S, Req> {
    fn from(state: KeyedState<S, Req>) -> Self {
        KeyedFuture { state }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for KeyedFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for KeyedFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                KeyedProj::Call { fut } => return fut.poll(cx).map_err(Into::into),
                KeyedProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into())));
                }
                KeyedProj::Waiting {
                    sleep,
                    waited,
                    max,
                    svc,
                    req,
                    key,
                    limiter,
                } => {
                    ready!(sleep.as_mut().poll(cx));
                    // Re-check: other requests of the key may have taken the cell.
                    match limiter.check(key.as_ref()) {
                        Ok(()) => {
                            let mut svc = svc.take().expect("the readied service");
                            let req = req.take().expect("the request");
                            KeyedState::Call { fut: svc.call(req) }
                        }
                        Err(Check::Wait(more)) if *waited + more <= *max => {
                            *waited += more;
                            sleep.as_mut().reset(Instant::now() + more);
                            continue;
                        }
                        Err(Check::Wait(more)) => KeyedState::Failed {
                            error: Some(limiter.reject(more)),
                        },
                        Err(Check::Full(max_keys)) => {
                            limiter.rejected.fetch_add(1, Relaxed);
                            KeyedState::Failed {
                                error: Some(TooManyKeys { max_keys }.into()),
                            }
                        }
                    }
                }
            };
            state.set(next);
        }
    }
}
