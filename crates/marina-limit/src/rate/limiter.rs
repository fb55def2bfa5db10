//! The limiter a layer's services share: governor's GCRA, the reservations of `Wait`
//! mode, the key table and its sweep, the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use marina_core::BoxError;
use tokio::time::Instant;

use super::config::{OnLimit, Rate};
use super::error::RateLimited;
use crate::clock::TokioClock;
use crate::keyless::{MissingKey, WithoutKey};
use crate::store::{BoundedStore, GlobalState, SharedStore};

type Direct = RateLimiter<NotKeyed, GlobalState, TokioClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter = RateLimiter<String, SharedStore<String>, TokioClock, NoOpMiddleware<Nanos>>;

/// The limiter shared by a layer's services.
pub(crate) struct Limiter {
    pub(crate) kind: Kind,
    pub(crate) clock: TokioClock,
    /// Governor's time origin, a `clock` reading: its states count nanoseconds from it.
    pub(crate) start: u64,
    pub(crate) gcra: Gcra,
    pub(crate) rate: Rate,
    pub(crate) on_limit: std::sync::Mutex<OnLimit>,
    /// A keyed limiter's [`WithoutKey`], as `without_key_code` writes it.
    pub(crate) without_key: AtomicU8,
    /// The state of the quota shared by requests without a key
    /// ([`WithoutKey::Shared`]), in the time of the keyed states (`start`).
    pub(crate) keyless: GlobalState,
    pub(crate) admitted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// Requests refused for want of a key (also in `rejected`).
    pub(crate) missing_key: AtomicU64,
    /// The last `stats()` reading: (clock ns, admitted then, rate computed then).
    pub(crate) last_reading: std::sync::Mutex<(u64, u64, u64)>,
}

pub(crate) enum Kind {
    Global(Direct, GlobalState),
    Keyed(KeyedLimiter, Arc<BoundedStore<String>>),
}

/// The GCRA in governor's terms, for reservations: `t`, one cell's weight (the
/// period), and `tau`, the tolerance (the burst less one cell), in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    pub(crate) t: u64,
    pub(crate) tau: u64,
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
    pub(crate) fn of(quota: Quota) -> Self {
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
    pub(crate) fn new(kind: Kind, clock: TokioClock, rate: Rate) -> Self {
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
    pub(crate) fn state_now(&self) -> u64 {
        self.clock.now().as_u64().saturating_sub(self.start)
    }

    fn admit(&self) {
        self.admitted.fetch_add(1, Relaxed);
    }

    pub(crate) fn on_limit(&self) -> OnLimit {
        *self
            .on_limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admissions per second since the previous reading at least a second ago.
    pub(crate) fn current_rate(&self) -> u64 {
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
    pub(crate) fn check(&self, key: Option<&String>) -> Result<(), Check> {
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
    pub(crate) fn reserve(self: &Arc<Self>, key: Option<String>, max: Duration) -> Reserved {
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

    pub(crate) fn reject(&self, wait: Duration) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        RateLimited { retry_after: wait }.into()
    }

    pub(crate) fn refuse_missing_key(&self) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        self.missing_key.fetch_add(1, Relaxed);
        MissingKey.into()
    }
}

/// How [`Limiter::without_key`] is stored.
pub(crate) fn without_key_code(w: WithoutKey) -> u8 {
    match w {
        WithoutKey::Refuse => 0,
        WithoutKey::Unlimited => 1,
        WithoutKey::Shared => 2,
    }
}

pub(crate) enum Check {
    Wait(Duration),
    Full(usize),
    /// A keyed limiter's request without a key, refused ([`WithoutKey::Refuse`]).
    Missing,
}

/// The outcome of a reservation.
pub(crate) enum Reserved {
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
pub(crate) struct Reservation {
    /// When the request is admitted.
    pub(crate) at: Instant,
    pub(crate) limiter: Arc<Limiter>,
    /// `None`: the global quota, or the one shared by requests without a key.
    pub(crate) key: Option<String>,
    /// The state this reservation left (none once used).
    pub(crate) tat: Option<u64>,
}

impl Reservation {
    /// Its time has come: the request is admitted, the cell used.
    pub(crate) fn admit(mut self) {
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

pub(crate) async fn sweep(limiter: std::sync::Weak<Limiter>, every: Duration) {
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
