//! `RateLimit`: GCRA request-rate limits (governor), global or keyed.

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use marina_core::{BoxError, KeyExtractor};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::clock::TokioClock;
use crate::invalid::{InvalidLimit, or_panic};
use crate::keyless::{MissingKey, WithoutKey};
use crate::store::{BoundedStore, GlobalState, SharedStore, WhenKeysFull};

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
    /// Queue it: first come, first served. On arrival the request takes the next free
    /// cell, now or later (its place in line), and learns when it will be admitted; it
    /// waits for that time and no longer, with no re-check, so later arrivals never
    /// overtake it. If its place in line is more than `max` away it fails at once with
    /// [`RateLimited`] (its `retry_after` is that wait), taking no cell.
    Wait {
        /// The longest delay. Any value: zero refuses every request that would have
        /// to wait, as `Reject` does; `Duration::MAX` waits however long the line is.
        max: Duration,
    },
}

/// A rate: `per_second` requests each second on average, bursts of up to `burst`.
///
/// Every `Rate` is valid: its constructors check their argument. Those named `try_`
/// return [`InvalidLimit`] for a value out of range (for values read from settings);
/// the others panic with the same message.
///
/// ```
/// use marina_limit::Rate;
/// use std::time::Duration;
///
/// let rate = Rate::try_per_second(100)?.try_burst(20)?;
/// assert_eq!((rate.per_second_f64(), rate.burst_size()), (100.0, 20));
///
/// let slow = Rate::try_every(Duration::from_secs(10))?;
/// assert_eq!(slow.per_second_f64(), 0.1);
///
/// let err = Rate::try_per_second(0).unwrap_err();
/// assert_eq!(err.to_string(), "rate_per_second: must be above 0, got 0");
/// # Ok::<(), marina_limit::InvalidLimit>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    quota: Quota,
}

impl Rate {
    /// The highest rate, requests per second: one a nanosecond, the limiter's
    /// resolution.
    pub const MAX_PER_SECOND: u32 = 1_000_000_000;

    /// The longest a full burst may take to refill (the period times the burst): 100
    /// years (of 365.25 days). Longer ones are mistakes, and would overflow the
    /// limiter's nanosecond arithmetic.
    pub const MAX_REFILL: Duration = Duration::from_secs(3_155_760_000);

    /// `n` requests per second, bursts of `n`.
    ///
    /// `n` is in requests per second, `1..=`[`MAX_PER_SECOND`](Self::MAX_PER_SECOND).
    ///
    /// # Panics
    ///
    /// If `n` is out of range, with [`try_per_second`](Self::try_per_second)'s
    /// message (`rate_per_second: must be above 0, got 0`).
    #[track_caller]
    pub fn per_second(n: u32) -> Self {
        or_panic(Self::try_per_second(n))
    }

    /// `n` requests per second, bursts of `n`, or [`InvalidLimit`] on the field
    /// `rate_per_second` if `n` is 0 or above [`MAX_PER_SECOND`](Self::MAX_PER_SECOND).
    pub fn try_per_second(n: u32) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "rate_per_second";
        let Some(nz) = NonZeroU32::new(n) else {
            return Err(InvalidLimit::not_above_zero(FIELD, n));
        };
        if n > Self::MAX_PER_SECOND {
            return Err(InvalidLimit::new(
                FIELD,
                format!(
                    "must be at most {} (one request a nanosecond), got {n}",
                    Self::MAX_PER_SECOND
                ),
            ));
        }
        Ok(Rate {
            quota: Quota::per_second(nz),
        })
    }

    /// One request every `period`, bursts of 1.
    ///
    /// `period` is above zero and at most [`MAX_REFILL`](Self::MAX_REFILL) (100
    /// years); its resolution is a nanosecond.
    ///
    /// # Panics
    ///
    /// If `period` is out of range, with [`try_every`](Self::try_every)'s message
    /// (`rate_period: must be above 0, got 0ns`).
    #[track_caller]
    pub fn every(period: Duration) -> Self {
        or_panic(Self::try_every(period))
    }

    /// One request every `period`, bursts of 1, or [`InvalidLimit`] on the field
    /// `rate_period` if `period` is zero or above [`MAX_REFILL`](Self::MAX_REFILL).
    pub fn try_every(period: Duration) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "rate_period";
        if period > Self::MAX_REFILL {
            return Err(InvalidLimit::new(
                FIELD,
                format!(
                    "must be at most {:?} (100 years), got {period:?}",
                    Self::MAX_REFILL
                ),
            ));
        }
        match Quota::with_period(period) {
            Some(quota) => Ok(Rate { quota }),
            None => Err(InvalidLimit::not_above_zero(
                FIELD,
                format_args!("{period:?}"),
            )),
        }
    }

    /// Allows bursts of `burst` requests: that many at once after a quiet spell, with
    /// the average rate unchanged.
    ///
    /// `burst` is in requests, at least 1, and at most as many as refill within
    /// [`MAX_REFILL`](Self::MAX_REFILL) at this rate (3,155,760,000 at one request a
    /// second; any `u32` at two or more).
    ///
    /// # Panics
    ///
    /// If `burst` is out of range, with [`try_burst`](Self::try_burst)'s message
    /// (`burst: must be above 0, got 0`).
    #[track_caller]
    pub fn burst(self, burst: u32) -> Self {
        or_panic(self.try_burst(burst))
    }

    /// Allows bursts of `burst` requests, or [`InvalidLimit`] on the field `burst` if
    /// it is 0, or so large that a full burst would take more than
    /// [`MAX_REFILL`](Self::MAX_REFILL) to refill.
    pub fn try_burst(self, burst: u32) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "burst";
        let Some(nz) = NonZeroU32::new(burst) else {
            return Err(InvalidLimit::not_above_zero(FIELD, burst));
        };
        let period = Gcra::of(self.quota).t;
        let max = Self::MAX_REFILL.as_nanos() as u64 / period;
        if u64::from(burst) > max {
            return Err(InvalidLimit::new(
                FIELD,
                format!(
                    "must be at most {max} at one request every {:?} (a full burst refills \
                     within 100 years), got {burst}",
                    Duration::from_nanos(period)
                ),
            ));
        }
        Ok(Rate {
            quota: self.quota.allow_burst(nz),
        })
    }

    /// The average requests per second.
    pub fn per_second_f64(&self) -> f64 {
        // One division, correctly rounded: exact for whole rates that divide 1e9.
        1e9 / self.quota.replenish_interval().as_nanos() as f64
    }

    /// The burst.
    pub fn burst_size(&self) -> u32 {
        self.quota.burst_size().get()
    }
}

type Direct = RateLimiter<NotKeyed, GlobalState, TokioClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter = RateLimiter<String, SharedStore<String>, TokioClock, NoOpMiddleware<Nanos>>;

/// The limiter shared by a layer's services.
struct Limiter {
    kind: Kind,
    clock: TokioClock,
    /// Governor's time origin, a `clock` reading: its states count nanoseconds from it.
    start: u64,
    gcra: Gcra,
    rate: Rate,
    on_limit: std::sync::Mutex<OnLimit>,
    /// A keyed limiter's [`WithoutKey`], as `without_key_code` writes it.
    without_key: AtomicU8,
    /// The state of the quota shared by requests without a key
    /// ([`WithoutKey::Shared`]), in the time of the keyed states (`start`).
    keyless: GlobalState,
    admitted: AtomicU64,
    rejected: AtomicU64,
    /// Requests refused for want of a key (also in `rejected`).
    missing_key: AtomicU64,
    /// The last `stats()` reading: (clock ns, admitted then, rate computed then).
    last_reading: std::sync::Mutex<(u64, u64, u64)>,
}

enum Kind {
    Global(Direct, GlobalState),
    Keyed(KeyedLimiter, Arc<BoundedStore<String>>),
}

/// The GCRA in governor's terms, for reservations: `t`, one cell's weight (the
/// period), and `tau`, the tolerance (the burst less one cell), in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    t: u64,
    tau: u64,
}

/// Where a reservation lands, in governor's nanoseconds.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// A cell is free now.
    Now,
    /// The next free cell is at this time.
    At(u64),
}

impl Gcra {
    fn of(quota: Quota) -> Self {
        // As governor does: a period of at least 1 ns.
        let t = u64::try_from(quota.replenish_interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let tau = t.saturating_mul(u64::from(quota.burst_size().get() - 1));
        Gcra { t, tau }
    }

    /// Reserves the next free cell for a request arriving at `t0`, given the state
    /// `tat` (the theoretical arrival time): the cell's time and the state after, or
    /// how long until the cell when that is beyond `max` (nothing reserved).
    ///
    /// A free cell now is governor's check exactly. A later one is the cell that
    /// check would grant at that time if nothing else came first: it reserves it, so
    /// the next request's place is one period further on.
    fn reserve(self, tat: Option<Nanos>, t0: u64, max: u64) -> Result<((Slot, u64), Nanos), u64> {
        let tat = tat.map_or(t0, Nanos::as_u64);
        let earliest = tat.saturating_sub(self.tau);
        if t0 >= earliest {
            let next = tat.max(t0).saturating_add(self.t);
            Ok(((Slot::Now, next), Nanos::from(next)))
        } else if earliest - t0 <= max {
            let next = tat.saturating_add(self.t);
            Ok(((Slot::At(earliest), next), Nanos::from(next)))
        } else {
            Err(earliest - t0)
        }
    }
}

/// Governor counts its states' time from its clock's reading when the limiter is
/// made, and keeps that origin to itself; reservations share the states, so they need
/// it. One refusal tells it exactly: in a state `tat` far ahead, governor refuses
/// until `start + tat - tau`. `seed` sets the probe's state, `check` asks governor;
/// the caller clears the state after.
fn governor_start(
    gcra: Gcra,
    clock: &TokioClock,
    seed: impl FnOnce(u64),
    check: impl FnOnce() -> Result<(), NotUntil<Nanos>>,
) -> u64 {
    let far = u64::MAX / 2;
    seed(far);
    match check() {
        Err(nu) => nu
            .earliest_possible()
            .as_u64()
            .saturating_sub(far.saturating_sub(gcra.tau)),
        // A tolerance of over a century: no refusal to learn from, and no waiter will
        // ever need the origin to the nanosecond.
        Ok(()) => clock.now().as_u64(),
    }
}

impl Limiter {
    /// Governor's parts of a limiter over `kind`.
    fn new(kind: Kind, clock: TokioClock, rate: Rate) -> Self {
        let gcra = Gcra::of(rate.quota);
        let start = match &kind {
            Kind::Global(l, state) => {
                let start = governor_start(gcra, &clock, |tat| state.set(tat), || l.check());
                state.set(0);
                start
            }
            Kind::Keyed(l, store) => {
                let probe = String::new();
                let seed = |tat| {
                    let _ =
                        store.measure_and_replace(&probe, |_| Ok::<_, ()>(((), Nanos::from(tat))));
                };
                let start = governor_start(gcra, &clock, seed, || l.check_key(&probe));
                store.forget(&probe);
                start
            }
        };
        Limiter {
            kind,
            clock,
            start,
            gcra,
            rate,
            on_limit: std::sync::Mutex::new(OnLimit::Reject),
            without_key: AtomicU8::new(without_key_code(WithoutKey::default())),
            keyless: GlobalState::default(),
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            missing_key: AtomicU64::new(0),
            last_reading: std::sync::Mutex::new((0, 0, 0)),
        }
    }

    fn now(&self) -> Nanos {
        self.clock.now()
    }

    /// Now in governor's nanoseconds (those of the states).
    fn state_now(&self) -> u64 {
        self.clock.now().as_u64().saturating_sub(self.start)
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

    fn without_key(&self) -> WithoutKey {
        match self.without_key.load(Relaxed) {
            0 => WithoutKey::Refuse,
            1 => WithoutKey::Unlimited,
            _ => WithoutKey::Shared,
        }
    }

    /// Takes a cell for `key` (or the global one): `Ok`, or how long until one.
    fn check(&self, key: Option<&String>) -> Result<(), Check> {
        let out = match (&self.kind, key) {
            (Kind::Global(l, _), _) => l.check(),
            (Kind::Keyed(l, store), Some(k)) => {
                if !store.admit(k, || self.state_now()) {
                    return Err(Check::Full(store.max_keys()));
                }
                l.check_key(k)
            }
            (Kind::Keyed(..), None) => return self.check_keyless(),
        };
        match out {
            Ok(()) => {
                self.admit();
                Ok(())
            }
            Err(nu) => Err(Check::Wait(self.wait_of(&nu))),
        }
    }

    /// A keyed limiter's request without a key, as [`WithoutKey`] says.
    fn check_keyless(&self) -> Result<(), Check> {
        match self.without_key() {
            WithoutKey::Refuse => return Err(Check::Missing),
            WithoutKey::Unlimited => {}
            WithoutKey::Shared => {
                // Governor's check exactly: a reservation that may not wait.
                let (gcra, t0) = (self.gcra, self.state_now());
                self.keyless
                    .measure_and_replace(&NotKeyed::NonKey, |tat| gcra.reserve(tat, t0, 0))
                    .map_err(|wait| Check::Wait(Duration::from_nanos(wait)))?;
            }
        }
        self.admit();
        Ok(())
    }

    fn wait_of(&self, nu: &NotUntil<Nanos>) -> Duration {
        nu.wait_time_from(self.now())
    }

    /// Takes the next free cell for `key` (or the global one), now or within `max`
    /// (`Wait` mode): the request's place in line.
    fn reserve(self: &Arc<Self>, key: Option<String>, max: Duration) -> Reserved {
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let t0 = self.state_now();
        let gcra = self.gcra;
        let reserve = |tat| gcra.reserve(tat, t0, max);
        let out = match (&self.kind, &key) {
            (Kind::Global(_, state), _) => state.measure_and_replace(&NotKeyed::NonKey, reserve),
            (Kind::Keyed(_, store), Some(k)) => {
                if !store.admit(k, || t0) {
                    return Reserved::Full(store.max_keys());
                }
                store.measure_and_replace(k, reserve)
            }
            // Only `WithoutKey::Shared` lets a request without a key wait.
            (Kind::Keyed(..), None) => self.keyless.measure_and_replace(&NotKeyed::NonKey, reserve),
        };
        match out {
            Ok((Slot::Now, _)) => {
                self.admit();
                Reserved::Now
            }
            Ok((Slot::At(at), tat)) => Reserved::Later(Reservation {
                at: self
                    .clock
                    .instant_of(Nanos::from(self.start.saturating_add(at))),
                limiter: self.clone(),
                key,
                tat: Some(tat),
            }),
            Err(wait) => Reserved::Refused(Duration::from_nanos(wait)),
        }
    }

    /// Gives back the cell reserved as state `tat` if it is still the last one
    /// reserved for `key` (`None`: the global quota, or the one shared by requests
    /// without a key): the state goes back one period, as if it had never been taken.
    /// (Once a later cell is reserved, the line keeps its times.)
    fn give_back(&self, key: Option<&String>, tat: u64) {
        let t = self.gcra.t;
        let back = |now: Option<Nanos>| match now {
            Some(now) if now.as_u64() == tat => Ok(((), Nanos::from(tat - t))),
            _ => Err(()),
        };
        let _ = match (&self.kind, key) {
            (Kind::Global(_, state), _) => state.measure_and_replace(&NotKeyed::NonKey, back),
            (Kind::Keyed(_, store), Some(k)) => store.measure_and_replace(k, back),
            (Kind::Keyed(..), None) => self.keyless.measure_and_replace(&NotKeyed::NonKey, back),
        };
    }

    fn reject(&self, wait: Duration) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        RateLimited { retry_after: wait }.into()
    }

    fn refuse_missing_key(&self) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        self.missing_key.fetch_add(1, Relaxed);
        MissingKey.into()
    }
}

/// How [`Limiter::without_key`] is stored.
fn without_key_code(w: WithoutKey) -> u8 {
    match w {
        WithoutKey::Refuse => 0,
        WithoutKey::Unlimited => 1,
        WithoutKey::Shared => 2,
    }
}

enum Check {
    Wait(Duration),
    Full(usize),
    /// A keyed limiter's request without a key, refused ([`WithoutKey::Refuse`]).
    Missing,
}

/// The outcome of a reservation.
enum Reserved {
    /// Admitted now.
    Now,
    /// Admitted at the reservation's time.
    Later(Reservation),
    /// Its place in line is beyond the bound, this far away: refused.
    Refused(Duration),
    /// The key table is full and refuses the key.
    Full(usize),
}

/// A cell reserved for a waiting request. Dropped before its request is admitted (a
/// cancelled wait), it gives the cell back if it is still the last one reserved;
/// otherwise the cell goes unused, and the requests behind keep their places.
struct Reservation {
    /// When the request is admitted.
    at: Instant,
    limiter: Arc<Limiter>,
    /// `None`: the global quota, or the one shared by requests without a key.
    key: Option<String>,
    /// The state this reservation left (none once used).
    tat: Option<u64>,
}

impl Reservation {
    /// Its time has come: the request is admitted, the cell used.
    fn admit(mut self) {
        self.tat = None;
        self.limiter.admit();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tat) = self.tat {
            self.limiter.give_back(self.key.as_ref(), tat);
        }
    }
}

/// A [`RateLimitLayer`]'s figures, from [`RateLimitHandle::stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateStats {
    /// Requests admitted (with those without a key let through by
    /// [`WithoutKey::Unlimited`]).
    pub admitted: u64,
    /// Requests refused (over the limit, a new key when the key table refuses, or a
    /// request without a key: [`WithoutKey::Refuse`]).
    pub rejected: u64,
    /// Requests refused because they had no key ([`WithoutKey::Refuse`]; keyed
    /// limiters), also counted in `rejected`.
    pub missing_key: u64,
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
            Kind::Global(..) => (0, 0),
            Kind::Keyed(_, store) => (store.len(), store.evicted.load(Relaxed)),
        };
        RateStats {
            admitted: l.admitted.load(Relaxed),
            rejected: l.rejected.load(Relaxed),
            missing_key: l.missing_key.load(Relaxed),
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
            Kind::Global(..) => 0,
            Kind::Keyed(_, store) => store.retain_recent(self.limiter.state_now()),
        }
    }
}

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
///   (wrap others in `tower::buffer::Buffer`).
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
        let state = GlobalState::default();
        let kind = Kind::Global(RateLimiter::new(rate.quota, state.clone(), clock), state);
        RateLimitLayer {
            limiter: Arc::new(Limiter::new(kind, clock, rate)),
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
///
/// Its fields can be set directly; [`RateLimitLayer::keyed_with`] checks them
/// ([`validate`](Self::validate)), as the setters do.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct KeyTable {
    /// The most keys tracked (default 100,000): at least 1.
    pub max_keys: usize,
    /// What happens to a new key when full.
    pub when_full: WhenKeysFull,
    /// How often replenished keys are dropped (default 60 s): at least
    /// [`MIN_SWEEP_INTERVAL`](Self::MIN_SWEEP_INTERVAL). Over 100 years
    /// ([`Rate::MAX_REFILL`]; `Duration::MAX`, say): no sweep task at all, and a full
    /// table still drops replenished keys before it evicts or refuses.
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
    /// The shortest sweep interval: 10 ms (a sweep scans every key under the table's
    /// lock).
    pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);

    /// Room for `max_keys` keys (at least 1).
    ///
    /// # Panics
    ///
    /// If `max_keys` is 0: `key_table.max_keys: must be above 0, got 0`.
    #[track_caller]
    pub fn with_capacity(max_keys: usize) -> Self {
        or_panic(Self::try_with_capacity(max_keys))
    }

    /// Room for `max_keys` keys, or [`InvalidLimit`] on the field `key_table.max_keys`
    /// if it is 0.
    pub fn try_with_capacity(max_keys: usize) -> Result<Self, InvalidLimit> {
        let table = KeyTable {
            max_keys,
            ..Self::default()
        };
        table.check_max_keys()?;
        Ok(table)
    }

    /// What happens to a new key when full.
    pub fn when_full(mut self, when_full: WhenKeysFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// How often replenished keys are dropped: at least
    /// [`MIN_SWEEP_INTERVAL`](Self::MIN_SWEEP_INTERVAL) (10 ms); over 100 years, never.
    ///
    /// # Panics
    ///
    /// If `every` is shorter:
    /// `key_table.sweep_interval: must be at least 10ms, got 0ns`.
    #[track_caller]
    pub fn sweep_interval(self, every: Duration) -> Self {
        or_panic(self.try_sweep_interval(every))
    }

    /// How often replenished keys are dropped, or [`InvalidLimit`] on the field
    /// `key_table.sweep_interval` if `every` is shorter than
    /// [`MIN_SWEEP_INTERVAL`](Self::MIN_SWEEP_INTERVAL).
    pub fn try_sweep_interval(mut self, every: Duration) -> Result<Self, InvalidLimit> {
        self.sweep_interval = every;
        self.check_sweep_interval()?;
        Ok(self)
    }

    /// Checks every field against its range: the first one out of range.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        self.check_max_keys()?;
        self.check_sweep_interval()
    }

    fn check_max_keys(&self) -> Result<(), InvalidLimit> {
        if self.max_keys == 0 {
            return Err(InvalidLimit::not_above_zero("key_table.max_keys", 0));
        }
        Ok(())
    }

    fn check_sweep_interval(&self) -> Result<(), InvalidLimit> {
        if self.sweep_interval < Self::MIN_SWEEP_INTERVAL {
            return Err(InvalidLimit::new(
                "key_table.sweep_interval",
                format!(
                    "must be at least {:?}, got {:?}",
                    Self::MIN_SWEEP_INTERVAL,
                    self.sweep_interval
                ),
            ));
        }
        Ok(())
    }
}

impl<X> RateLimitLayer<Keyed<X>> {
    /// One quota per key read by `extractor`, with the default key table. Requests
    /// without a key are refused ([`without_key`](Self::without_key)).
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
        let clock = TokioClock::new();
        let store = Arc::new(BoundedStore::new(table.max_keys, table.when_full));
        let kind = Kind::Keyed(
            RateLimiter::new(rate.quota, SharedStore(store.clone()), clock),
            store,
        );
        let limiter = Arc::new(Limiter::new(kind, clock, rate));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&limiter), table.sweep_interval));
        }
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

    /// The handle to the counters.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            limiter: self.limiter.clone(),
        }
    }
}

async fn sweep(limiter: std::sync::Weak<Limiter>, every: Duration) {
    // Checked at build: at least `MIN_SWEEP_INTERVAL`. Over 100 years: never (and no
    // `Instant` overflow on the way).
    if every > Rate::MAX_REFILL {
        return;
    }
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(l) = limiter.upgrade() else {
            return;
        };
        if let Kind::Keyed(_, store) = &l.kind {
            let n = store.retain_recent(l.state_now());
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
            reservation: None,
            sleep: None,
        }
    }
}

/// Readiness of a global limiter's service.
enum Ready {
    /// No cell taken.
    Idle,
    /// A cell is reserved for later (`Wait` mode): waiting for its time.
    Waiting,
    /// A cell is taken for the next call.
    Permit,
    /// Over the limit: the next call fails with this wait.
    Denied(Duration),
}

/// The service of a [`RateLimitLayer`].
///
/// # Sharing
///
/// `Clone` when the inner service is. The quota lives in the layer: every clone, and
/// every service made by the same [`RateLimitLayer`] or a clone of it, draws on one
/// quota (for a keyed limiter, one key table) and counts in one [`RateLimitHandle`]; a
/// layer built once per service gives each its own. Each clone calls its own clone of
/// the inner service and starts with no cell taken. It is `Send + Sync` when the inner
/// service and the key extractor are: clone it into each task. A global limiter takes
/// its cell in `poll_ready`, so a clone made ready and then not called has spent one.
///
/// # Cancel safety
///
/// A global service in `Wait` mode holds its reserved cell while `poll_ready` is
/// pending. Dropped then, it gives the cell back if no later one has been reserved
/// since (the next arrival takes it); otherwise that cell goes unused, and the
/// requests behind it keep their places and times: nobody waits longer for it.
pub struct RateLimit<S, X = Global> {
    inner: S,
    limiter: Arc<Limiter>,
    extractor: Arc<X>,
    state: Ready,
    /// The cell reserved while `Waiting`.
    reservation: Option<Reservation>,
    /// The reservation's timer, kept for the next one.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S: Clone, X> Clone for RateLimit<S, X> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            state: Ready::Idle,
            reservation: None,
            sleep: None,
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
                Ready::Permit => return self.inner.poll_ready(cx).map_err(Into::into),
                Ready::Denied(_) => return Poll::Ready(Ok(())),
                Ready::Waiting => {
                    let sleep = self.sleep.as_mut().expect("a reservation's timer");
                    ready!(sleep.as_mut().poll(cx));
                    if let Some(r) = self.reservation.take() {
                        r.admit();
                    }
                    self.state = Ready::Permit;
                    continue;
                }
                Ready::Idle => {}
            }
            self.state = match self.limiter.check(None) {
                Ok(()) => Ready::Permit,
                Err(Check::Full(_) | Check::Missing) => {
                    unreachable!("a global limiter has no keys")
                }
                Err(Check::Wait(wait)) => match self.limiter.on_limit() {
                    OnLimit::Reject => Ready::Denied(wait),
                    // Take a place in line; refused at once if it is too far back.
                    OnLimit::Wait { max } => self.wait_for(max),
                },
            };
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, Ready::Idle) {
            Ready::Permit => ResponseFuture::call(self.inner.call(req)),
            Ready::Denied(wait) => ResponseFuture::failed(self.limiter.reject(wait)),
            state @ (Ready::Idle | Ready::Waiting) => {
                // Not ready (a reservation keeps its place).
                self.state = state;
                ResponseFuture::failed("RateLimit called before poll_ready".into())
            }
        }
    }
}

impl<S> RateLimit<S, Global> {
    /// Takes a place in line (`Wait` mode): the readiness it gives.
    fn wait_for(&mut self, max: Duration) -> Ready {
        match self.limiter.reserve(None, max) {
            Reserved::Now => Ready::Permit,
            Reserved::Later(r) => {
                match self.sleep.as_mut() {
                    Some(sleep) => sleep.as_mut().reset(r.at),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(r.at))),
                }
                self.reservation = Some(r);
                Ready::Waiting
            }
            Reserved::Refused(wait) => Ready::Denied(wait),
            Reserved::Full(_) => unreachable!("a global limiter has no key table"),
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
        let wait = match self.limiter.check(key.as_ref()) {
            Ok(()) => {
                return KeyedState::Call {
                    fut: self.inner.call(req),
                }
                .into();
            }
            Err(Check::Full(max_keys)) => return self.too_many_keys(max_keys),
            Err(Check::Missing) => {
                return KeyedState::Failed {
                    error: Some(self.limiter.refuse_missing_key()),
                }
                .into();
            }
            Err(Check::Wait(wait)) => wait,
        };
        let OnLimit::Wait { max } = self.limiter.on_limit() else {
            return KeyedState::Failed {
                error: Some(self.limiter.reject(wait)),
            }
            .into();
        };
        // Take a place in the key's line; refused at once if it is too far back.
        match self.limiter.reserve(key, max) {
            Reserved::Now => KeyedState::Call {
                fut: self.inner.call(req),
            }
            .into(),
            Reserved::Later(reservation) => {
                // Take the readied service into the future; keep a fresh clone.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                KeyedState::Waiting {
                    sleep: Box::pin(tokio::time::sleep_until(reservation.at)),
                    reservation: Some(reservation),
                    svc: Some(svc),
                    req: Some(req),
                }
                .into()
            }
            Reserved::Refused(wait) => KeyedState::Failed {
                error: Some(self.limiter.reject(wait)),
            }
            .into(),
            Reserved::Full(max_keys) => self.too_many_keys(max_keys),
        }
    }
}

impl<S, X> RateLimit<S, Keyed<X>> {
    /// Refuses a new key the full table will not take.
    fn too_many_keys<Req>(&self, max_keys: usize) -> KeyedFuture<S, Req>
    where
        S: Service<Req>,
    {
        self.limiter.rejected.fetch_add(1, Relaxed);
        KeyedState::Failed {
            error: Some(TooManyKeys { max_keys }.into()),
        }
        .into()
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
    /// bounded wait for the request's place in line in `Wait` mode.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it waits drops the request unsent. Its reserved cell is given
    /// back if no later request of the key has reserved one since (the next arrival
    /// takes it); otherwise that cell goes unused, and the requests behind it keep
    /// their places and times: nobody waits longer for it. Dropping it after
    /// admission cancels the inner request; the cell stays spent.
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
        /// Over the limit, waiting for its reserved cell.
        Waiting {
            sleep: Pin<Box<Sleep>>,
            reservation: Option<Reservation>,
            svc: Option<S>,
            req: Option<Req>,
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
                    reservation,
                    svc,
                    req,
                } => {
                    // The cell is reserved: at its time, no re-check.
                    ready!(sleep.as_mut().poll(cx));
                    if let Some(r) = reservation.take() {
                        r.admit();
                    }
                    let mut svc = svc.take().expect("the readied service");
                    let req = req.take().expect("the request");
                    KeyedState::Call { fut: svc.call(req) }
                }
            };
            state.set(next);
        }
    }
}
