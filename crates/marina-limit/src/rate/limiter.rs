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

use super::admissions::Admissions;
use super::config::{KeyTable, OnLimit, Rate};
use super::error::{RateLimited, TooManyKeys};
use crate::clock::TokioClock;
use crate::instruments::{KeysGauge, Name, RateMetrics};
use crate::keyless::{MissingKey, WithoutKey};
use crate::store::{BoundedStore, GlobalState};

type Direct = RateLimiter<NotKeyed, GlobalState, TokioClock, NoOpMiddleware<Nanos>>;

/// The limiter shared by a layer's services.
pub(crate) struct Limiter {
    pub(crate) kind: Kind,
    pub(crate) clock: TokioClock,
    /// The time origin of the states, a `clock` reading: they count nanoseconds from
    /// it (governor's own origin, for a global limiter; 0 for a keyed one).
    pub(crate) start: u64,
    pub(crate) gcra: Gcra,
    pub(crate) rate: Rate,
    pub(crate) on_limit: std::sync::Mutex<OnLimit>,
    /// A keyed limiter's [`WithoutKey`], as `without_key_code` writes it.
    pub(crate) without_key: AtomicU8,
    /// The state of the quota shared by requests without a key
    /// ([`WithoutKey::Shared`]), in the time of the keyed states (`start`).
    pub(crate) keyless: GlobalState,
    pub(crate) admissions: Arc<Admissions>,
    pub(crate) rejected: AtomicU64,
    /// Requests refused for want of a key (also in `rejected`).
    pub(crate) missing_key: AtomicU64,
    /// The last `stats()` reading: (clock ns, admitted then, rate computed then).
    pub(crate) last_reading: std::sync::Mutex<(u64, u64, u64)>,
    /// The limiter's name: its `limiter` label.
    pub(crate) name: Name,
    /// A keyed limiter's key table settings (to make it anew, renamed).
    pub(crate) table: Option<KeyTable>,
    /// The counts, exported (the `metrics` feature; nothing without it).
    pub(crate) metrics: RateMetrics,
}

pub(crate) enum Kind {
    /// Governor's direct limiter, over the state that reservations share.
    Global(Direct, GlobalState),
    /// The key table. Its checks are governor's GCRA step ([`Gcra::reserve`] with no
    /// wait) on the table, looked up by the borrowed key: governor's `check_key` takes
    /// the key type itself, a `String` per request.
    Keyed(BoundedStore),
}

/// What becomes of a keyed limiter's request.
pub(crate) enum Admission {
    /// Admitted now (not counted yet: the service counts it).
    Now,
    /// Admitted at the reservation's time (`Wait` mode).
    Later(Reservation),
    /// Refused (and counted).
    Refused(BoxError),
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
    /// A free cell now is governor's check exactly (its `test_and_update`). A later one
    /// is the cell that check would grant at that time if nothing else came first: it
    /// reserves it, so the next request's place is one period further on.
    #[inline]
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
    /// The default name of a global limiter.
    pub(crate) const GLOBAL: &'static str = "rate";
    /// The default name of a keyed limiter.
    pub(crate) const KEYED: &'static str = "rate_per_key";

    /// A global limiter: governor's, on a state that reservations share.
    pub(crate) fn global(rate: Rate, name: Name) -> Self {
        let clock = TokioClock::new();
        let gcra = Gcra::of(rate.quota);
        let state = GlobalState::default();
        let direct = RateLimiter::new(rate.quota, state.clone(), clock);
        let start = governor_start(gcra, &clock, |tat| state.set(tat), || direct.check());
        state.set(0);
        let metrics = RateMetrics::new(&name, false);
        Self::new(
            Kind::Global(direct, state),
            clock,
            start,
            rate,
            name,
            metrics,
        )
    }

    /// A keyed limiter over `table`'s key table.
    pub(crate) fn keyed(rate: Rate, table: KeyTable, name: Name) -> Self {
        let store = BoundedStore::new(table.max_keys, table.when_full, KeysGauge::new(&name));
        let metrics = RateMetrics::new(&name, true);
        let mut l = Self::new(
            Kind::Keyed(store),
            TokioClock::new(),
            0,
            rate,
            name,
            metrics,
        );
        l.table = Some(table);
        l
    }

    /// A new limiter with the same settings, named `name` (and registered under it).
    pub(crate) fn renamed(&self, name: Name) -> Self {
        let l = match self.table {
            None => Self::global(self.rate, name),
            Some(table) => Self::keyed(self.rate, table, name),
        };
        *l.on_limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = self.on_limit();
        l.without_key.store(self.without_key.load(Relaxed), Relaxed);
        l
    }

    fn new(
        kind: Kind,
        clock: TokioClock,
        start: u64,
        rate: Rate,
        name: Name,
        metrics: RateMetrics,
    ) -> Self {
        Limiter {
            kind,
            clock,
            start,
            gcra: Gcra::of(rate.quota),
            rate,
            on_limit: std::sync::Mutex::new(OnLimit::Reject),
            without_key: AtomicU8::new(without_key_code(WithoutKey::default())),
            keyless: GlobalState::default(),
            admissions: Arc::default(),
            rejected: AtomicU64::new(0),
            missing_key: AtomicU64::new(0),
            last_reading: std::sync::Mutex::new((0, 0, 0)),
            name,
            table: None,
            metrics,
        }
    }

    fn now(&self) -> Nanos {
        self.clock.now()
    }

    /// Now in governor's nanoseconds (those of the states).
    pub(crate) fn state_now(&self) -> u64 {
        self.clock.now().as_u64().saturating_sub(self.start)
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
        let admitted = self.admissions.total();
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

    /// The global quota's check (governor's): `Ok` when a cell is taken, or when the
    /// next one frees.
    #[inline]
    pub(crate) fn check_global(&self) -> Result<(), NotUntil<Nanos>> {
        match &self.kind {
            Kind::Global(direct, _) => direct.check(),
            Kind::Keyed(_) => unreachable!("a keyed limiter has no global quota"),
        }
    }

    /// How long until the cell `nu` says frees.
    pub(crate) fn wait_of(&self, nu: &NotUntil<Nanos>) -> Duration {
        nu.wait_time_from(self.now())
    }

    /// A keyed limiter's request with key `key`: a cell now; or, over the limit, a
    /// refusal or a place in line, as `on_limit` says. A key already in the table
    /// costs no allocation.
    #[inline]
    pub(crate) fn admit_key(self: &Arc<Self>, key: &str) -> Admission {
        let Kind::Keyed(store) = &self.kind else {
            unreachable!("a global limiter has no keys")
        };
        let (gcra, t0) = (self.gcra, self.state_now());
        if !store.admit(key, || t0) {
            return Admission::Refused(self.too_many_keys(store.max_keys()));
        }
        match store.measure_and_replace(key, |tat| gcra.reserve(tat, t0, 0)) {
            Ok(_) => Admission::Now,
            Err(wait) => self.over_limit(Some(key), Duration::from_nanos(wait)),
        }
    }

    /// A keyed limiter's request without a key, as [`WithoutKey`] says.
    pub(crate) fn admit_keyless(self: &Arc<Self>) -> Admission {
        match self.without_key() {
            WithoutKey::Refuse => Admission::Refused(self.refuse_missing_key()),
            WithoutKey::Unlimited => Admission::Now,
            WithoutKey::Shared => {
                // Governor's check exactly: a reservation that may not wait.
                let (gcra, t0) = (self.gcra, self.state_now());
                match self
                    .keyless
                    .measure_and_replace(&NotKeyed::NonKey, |tat| gcra.reserve(tat, t0, 0))
                {
                    Ok(_) => Admission::Now,
                    Err(wait) => self.over_limit(None, Duration::from_nanos(wait)),
                }
            }
        }
    }

    /// A keyed limiter's request over its limit by `wait`: refused, or (`Wait` mode) a
    /// place in the line of its key (`None`: of the requests without one).
    #[cold]
    fn over_limit(self: &Arc<Self>, key: Option<&str>, wait: Duration) -> Admission {
        let OnLimit::Wait { max } = self.on_limit() else {
            return Admission::Refused(self.reject(wait));
        };
        match self.reserve(key, max) {
            Reserved::Now => Admission::Now,
            Reserved::Later(reservation) => Admission::Later(reservation),
            Reserved::Refused(wait) => Admission::Refused(self.reject(wait)),
            Reserved::Full(max_keys) => Admission::Refused(self.too_many_keys(max_keys)),
        }
    }

    /// Takes the next free cell for `key` (or the global one), now or within `max`
    /// (`Wait` mode): the request's place in line.
    pub(crate) fn reserve(self: &Arc<Self>, key: Option<&str>, max: Duration) -> Reserved {
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let t0 = self.state_now();
        let gcra = self.gcra;
        let reserve = |tat| gcra.reserve(tat, t0, max);
        let out = match (&self.kind, key) {
            (Kind::Global(_, state), _) => state.measure_and_replace(&NotKeyed::NonKey, reserve),
            (Kind::Keyed(store), Some(k)) => {
                if !store.admit(k, || t0) {
                    return Reserved::Full(store.max_keys());
                }
                store.measure_and_replace(k, reserve)
            }
            // Only `WithoutKey::Shared` lets a request without a key wait.
            (Kind::Keyed(..), None) => self.keyless.measure_and_replace(&NotKeyed::NonKey, reserve),
        };
        match out {
            Ok((Slot::Now, _)) => Reserved::Now,
            Ok((Slot::At(at), tat)) => {
                self.metrics.delayed();
                Reserved::Later(Reservation {
                    at: self
                        .clock
                        .instant_of(Nanos::from(self.start.saturating_add(at))),
                    limiter: self.clone(),
                    key: key.map(str::to_owned),
                    tat: Some(tat),
                })
            }
            Err(wait) => Reserved::Refused(Duration::from_nanos(wait)),
        }
    }

    /// Gives back the cell reserved as state `tat` if it is still the last one
    /// reserved for `key` (`None`: the global quota, or the one shared by requests
    /// without a key): the state goes back one period, as if it had never been taken.
    /// (Once a later cell is reserved, the line keeps its times.)
    fn give_back(&self, key: Option<&str>, tat: u64) {
        let t = self.gcra.t;
        let back = |now: Option<Nanos>| match now {
            Some(now) if now.as_u64() == tat => Ok(((), Nanos::from(tat - t))),
            _ => Err(()),
        };
        let _ = match (&self.kind, key) {
            (Kind::Global(_, state), _) => state.measure_and_replace(&NotKeyed::NonKey, back),
            (Kind::Keyed(store), Some(k)) => store.measure_and_replace(k, back),
            (Kind::Keyed(..), None) => self.keyless.measure_and_replace(&NotKeyed::NonKey, back),
        };
    }

    pub(crate) fn reject(&self, wait: Duration) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        self.metrics.rejected();
        RateLimited { retry_after: wait }.into()
    }

    fn refuse_missing_key(&self) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        self.missing_key.fetch_add(1, Relaxed);
        self.metrics.missing_key();
        MissingKey.into()
    }

    /// Refuses a new key the full table will not take.
    fn too_many_keys(&self, max_keys: usize) -> BoxError {
        self.rejected.fetch_add(1, Relaxed);
        self.metrics.too_many_keys();
        TooManyKeys { max_keys }.into()
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
        self.limiter.admissions.add_shared();
        self.limiter.metrics.admitted();
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tat) = self.tat {
            self.limiter.give_back(self.key.as_deref(), tat);
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
        if let Kind::Keyed(store) = &l.kind {
            let n = store.retain_recent(l.state_now());
            if n > 0 {
                tracing::debug!(dropped = n, "rate limiter: replenished keys dropped");
            }
        }
    }
}
