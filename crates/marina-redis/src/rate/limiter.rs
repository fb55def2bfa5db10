//! The limiter a layer's services share: the local lease and refusal state per key in
//! front of Redis's GCRA script, and the fallback when Redis cannot answer.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::{MissingKey, OnLimit, Rate, RateLimited, WithoutKey};
use tokio::time::Instant;

use super::config::{LEASE_MAX_AGE, Lease};
use crate::config::{Fallback, InvalidConfig};
use crate::fleet::{CallError, RedisFleet};
use crate::scripts::GCRA;

/// The most keys whose local state a keyed limiter keeps by default.
pub(crate) const DEFAULT_MAX_KEYS: usize = 100_000;

/// The highest rate a fleet limit takes: one request a microsecond (Redis's `TIME`
/// resolution).
pub(crate) const MAX_PER_SECOND: f64 = 1_000_000.0;

/// How a request fares.
pub(crate) enum Decision {
    /// Admitted now (counted).
    Admit,
    /// Admitted at this time, its cell reserved (`Wait` mode; counted).
    AdmitAt(Instant),
    /// Refused (counted).
    Refuse(BoxError),
}

/// What a request's check found without waiting.
pub(crate) enum Check {
    /// Decided at once: a leased cell, a known refusal, the fallback while Redis is
    /// down, or no key.
    Now(Decision),
    /// Redis has to be asked about this key.
    Ask(Arc<KeyState>),
}

/// One quota's local state: the cells leased and not spent yet, and until when Redis
/// is known to have no free cell.
pub(crate) struct KeyState {
    /// The quota's Redis key.
    redis_key: Box<str>,
    local: Mutex<Local>,
    /// Held while this instance asks Redis for a lease of this key, so that requests
    /// arriving meanwhile share its cells rather than each take a lease.
    refill: tokio::sync::Mutex<()>,
    /// Requests waiting for `refill`: the call holding it asks for a cell for each of
    /// them too (they spend theirs at once, so it holds nothing back).
    waiting: AtomicU32,
}

/// Counts a request as waiting for a key's refill lock until dropped (cancellation
/// included).
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[derive(Clone, Copy)]
struct Local {
    tokens: u32,
    leased_at: Instant,
    /// Redis has no free cell before this time (its answer to the last call).
    fleet_next: Option<Instant>,
    /// The last answer left no free cell: the quota is contended, so requests that
    /// find no cell here share one call rather than race each other to Redis for the
    /// next.
    contended: bool,
}

impl KeyState {
    fn new(redis_key: String) -> Arc<Self> {
        Arc::new(KeyState {
            redis_key: redis_key.into(),
            local: Mutex::new(Local {
                tokens: 0,
                leased_at: Instant::now(),
                fleet_next: None,
                contended: false,
            }),
            refill: tokio::sync::Mutex::new(()),
            waiting: AtomicU32::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The GCRA in the script's units: the period `T` and the tolerance
/// `tau = (burst - 1) × T`, in microseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    pub(crate) period_us: f64,
    pub(crate) tau_us: f64,
}

impl Gcra {
    pub(crate) fn of(rate: &Rate) -> Self {
        // `per_second_f64` is 1e9 / the period in ns, correctly rounded: its inverse,
        // rounded, is the period in ns exactly.
        let period_ns = (1e9 / rate.per_second_f64()).round();
        let period_us = period_ns / 1000.0;
        Gcra {
            period_us,
            tau_us: period_us * f64::from(rate.burst_size() - 1),
        }
    }
}

/// Checks that Redis can keep `rate`: at most one request a microsecond.
pub(crate) fn check_rate(rate: &Rate) -> Result<(), InvalidConfig> {
    if rate.per_second_f64() > MAX_PER_SECOND {
        return Err(InvalidConfig::new(
            "rate_per_second",
            format!(
                "must be at most {MAX_PER_SECOND} for a fleet limit (one request a \
                 microsecond, Redis's TIME resolution), got {}",
                rate.per_second_f64()
            ),
        ));
    }
    Ok(())
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) admitted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) missing_key: AtomicU64,
    pub(crate) calls: AtomicU64,
    pub(crate) from_lease: AtomicU64,
    pub(crate) refused_locally: AtomicU64,
    pub(crate) fallback: AtomicU64,
    pub(crate) expired_tokens: AtomicU64,
}

/// The limiter a layer's services share.
pub(crate) struct Limiter {
    pub(crate) fleet: RedisFleet,
    pub(crate) name: String,
    /// `{prefix}:rate:{name}`.
    base: String,
    pub(crate) rate: Rate,
    gcra: Gcra,
    pub(crate) lease: Lease,
    pub(crate) lease_size: u32,
    pub(crate) on_limit: OnLimit,
    pub(crate) fallback: Fallback,
    pub(crate) without_key: WithoutKey,
    pub(crate) max_keys: usize,
    /// A keyed limiter's keys (a randomly seeded hasher: keys come from clients).
    keys: Mutex<HashMap<Box<str>, Arc<KeyState>>>,
    /// The global quota, or (keyed) the one shared by requests without a key.
    pub(crate) shared: Arc<KeyState>,
    local: LocalGcra,
    pub(crate) counters: Counters,
    /// A keyed limiter (its table is swept).
    pub(crate) keyed: bool,
    /// The sweep task is started (by the first service).
    pub(crate) sweeping: AtomicBool,
}

impl Limiter {
    pub(crate) fn new(
        fleet: &RedisFleet,
        name: &str,
        rate: Rate,
        keyed: bool,
    ) -> Result<Self, InvalidConfig> {
        crate::config::check_name("name", name)?;
        check_rate(&rate)?;
        let base = fleet.key("rate", name);
        let shared = KeyState::new(if keyed {
            format!("{base}:nokey")
        } else {
            format!("{base}:global")
        });
        Ok(Limiter {
            fleet: fleet.clone(),
            name: name.to_owned(),
            gcra: Gcra::of(&rate),
            base,
            rate,
            lease: Lease::Off,
            lease_size: 1,
            on_limit: OnLimit::Reject,
            fallback: fleet.config().fallback,
            without_key: WithoutKey::default(),
            max_keys: DEFAULT_MAX_KEYS,
            keys: Mutex::new(HashMap::with_hasher(RandomState::new())),
            shared,
            local: LocalGcra::default(),
            counters: Counters::default(),
            keyed,
            sweeping: AtomicBool::new(false),
        })
    }

    pub(crate) fn set_lease(&mut self, lease: Lease) -> Result<(), InvalidConfig> {
        lease.validate(&self.rate)?;
        self.lease = lease;
        self.lease_size = lease.size(&self.rate);
        Ok(())
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<Box<str>, Arc<KeyState>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn tracked_keys(&self) -> usize {
        self.keys().len()
    }

    /// A request of the global quota (or of the requests without a key that share
    /// one).
    #[inline]
    pub(crate) fn check_shared(&self) -> Check {
        self.check(&self.shared)
    }

    /// A request with key `key`: its state looked up by the borrowed key (a known key
    /// allocates nothing).
    #[inline]
    pub(crate) fn check_key(&self, key: &str) -> Check {
        let found = self.keys().get(key).cloned();
        let st = match found {
            Some(st) => st,
            None => self.new_key(key),
        };
        self.check(&st)
    }

    /// A new key's state, kept in the table if there is room (otherwise used once:
    /// every request of the key then asks Redis).
    #[cold]
    fn new_key(&self, key: &str) -> Arc<KeyState> {
        let st = KeyState::new(format!("{}:k:{key}", self.base));
        let mut keys = self.keys();
        if keys.len() < self.max_keys {
            keys.entry(key.into()).or_insert(st).clone()
        } else {
            st
        }
    }

    /// A request without a key, as [`WithoutKey`] says.
    pub(crate) fn check_keyless(&self) -> Check {
        match self.without_key {
            WithoutKey::Refuse => {
                self.counters.rejected.fetch_add(1, Relaxed);
                self.counters.missing_key.fetch_add(1, Relaxed);
                Check::Now(Decision::Refuse(MissingKey.into()))
            }
            WithoutKey::Unlimited => {
                self.counters.admitted.fetch_add(1, Relaxed);
                Check::Now(Decision::Admit)
            }
            WithoutKey::Shared => self.check(&self.shared),
        }
    }

    #[inline]
    fn check(&self, st: &Arc<KeyState>) -> Check {
        if let Some(d) = self.try_local(st, Instant::now()) {
            return Check::Now(d);
        }
        if !self.fleet.is_available() {
            let down = self.fleet.skip();
            return Check::Now(self.fall_back(st, down));
        }
        Check::Ask(st.clone())
    }

    /// Decides from the local state alone: a leased cell, or a refusal while Redis is
    /// known to have no free cell. `None`: Redis has to be asked.
    fn try_local(&self, st: &KeyState, now: Instant) -> Option<Decision> {
        let mut l = st.lock();
        if l.tokens > 0 {
            if now.saturating_duration_since(l.leased_at) < LEASE_MAX_AGE {
                l.tokens -= 1;
                drop(l);
                self.counters.from_lease.fetch_add(1, Relaxed);
                self.counters.admitted.fetch_add(1, Relaxed);
                return Some(Decision::Admit);
            }
            self.counters
                .expired_tokens
                .fetch_add(u64::from(l.tokens), Relaxed);
            l.tokens = 0;
        }
        let next = l.fleet_next?;
        if now >= next {
            l.fleet_next = None;
            return None;
        }
        drop(l);
        let wait = next - now;
        if let OnLimit::Wait { max } = self.on_limit
            && wait <= max
        {
            // A place in the fleet's line: Redis reserves it.
            return None;
        }
        self.counters.refused_locally.fetch_add(1, Relaxed);
        Some(self.reject(wait))
    }

    /// Asks Redis for `st`'s quota: a lease of cells now, a reserved cell
    /// (`Wait`), or a refusal; the fallback when it cannot answer in time.
    pub(crate) async fn ask(self: Arc<Self>, st: Arc<KeyState>) -> Decision {
        let timeout = self.fleet.config().call_timeout;
        let deadline = Instant::now() + timeout;
        // One call at a time per key when it can serve several requests: a lease, or
        // a contended quota (an answer that takes the only free cell tells everyone
        // waiting for it when the next frees). Waiting for it counts against the
        // same deadline.
        //
        // A reservation (`Wait`, no free cell known) is one cell per waiting request,
        // nothing to share: those never queue here.
        let _refill = if self.shares_calls(&st) {
            let waiting = Waiting::new(&st.waiting);
            let locked = tokio::time::timeout_at(deadline, st.refill.lock()).await;
            drop(waiting);
            let Ok(guard) = locked else {
                return self.fall_back(&st, CallError::TimedOut(timeout));
            };
            if let Some(d) = self.try_local(&st, Instant::now()) {
                return d;
            }
            // Free cells and no lease (or a reservation): no reason to queue.
            self.shares_calls(&st).then_some(guard)
        } else {
            None
        };
        let max_wait_us = match self.on_limit {
            OnLimit::Reject => 0,
            OnLimit::Wait { max } => max.as_micros().min(1 << 50) as u64,
        };
        // A cell for this request, one for each request queued behind it (spent at
        // once), and the lease's others to keep.
        let want = self
            .lease_size
            .saturating_add(st.waiting.load(Relaxed))
            .min(self.rate.burst_size());
        let mut cmd = GCRA.cmd(&st.redis_key);
        cmd.arg(self.gcra.period_us)
            .arg(self.gcra.tau_us)
            .arg(want)
            .arg(max_wait_us);
        let out = self
            .fleet
            .eval::<(i64, i64, i64)>(&GCRA, &cmd, deadline, &self.counters.calls)
            .await;
        match out {
            Ok((granted, wait, next)) => self.apply(&st, granted, wait, next),
            Err(e) => self.fall_back(&st, e),
        }
    }

    /// Whether requests of `st` that find no cell here should share one call: with a
    /// lease, or when the quota is contended; not for a reservation (`Wait` mode and
    /// Redis known to have no free cell now).
    fn shares_calls(&self, st: &KeyState) -> bool {
        let l = st.lock();
        let reserving = matches!(self.on_limit, OnLimit::Wait { .. })
            && l.fleet_next.is_some_and(|t| t > Instant::now());
        !reserving && (self.lease_size > 1 || l.contended)
    }

    /// Redis's answer: `granted` cells, the first after `wait` µs, the next free one
    /// after `next` µs.
    fn apply(&self, st: &KeyState, granted: i64, wait: i64, next: i64) -> Decision {
        let now = Instant::now();
        let mut l = st.lock();
        l.fleet_next = (next > 0).then(|| now + micros(next));
        l.contended = next > 0;
        if granted >= 1 && wait <= 0 {
            let extra = u32::try_from(granted - 1).unwrap_or(0);
            if extra > 0 {
                l.tokens = l.tokens.saturating_add(extra);
                l.leased_at = now;
            }
            drop(l);
            self.counters.admitted.fetch_add(1, Relaxed);
            Decision::Admit
        } else if granted >= 1 {
            drop(l);
            self.counters.admitted.fetch_add(1, Relaxed);
            Decision::AdmitAt(now + micros(wait))
        } else {
            drop(l);
            self.reject(micros(wait))
        }
    }

    pub(crate) fn reject(&self, retry_after: Duration) -> Decision {
        self.counters.rejected.fetch_add(1, Relaxed);
        Decision::Refuse(RateLimited { retry_after }.into())
    }

    /// Redis could not decide: the fallback does.
    #[cold]
    fn fall_back(&self, st: &KeyState, why: CallError) -> Decision {
        self.counters.fallback.fetch_add(1, Relaxed);
        tracing::debug!(limiter = %self.name, fallback = self.fallback.name(), outage = %why.outage(), "fleet rate limit: fallback decides");
        match self.fallback {
            Fallback::FailOpen => {
                self.counters.admitted.fetch_add(1, Relaxed);
                Decision::Admit
            }
            Fallback::FailClosed => {
                self.counters.rejected.fetch_add(1, Relaxed);
                Decision::Refuse(why.unavailable().into())
            }
            Fallback::Local { expected_instances } => {
                let max_wait = match self.on_limit {
                    OnLimit::Reject => Duration::ZERO,
                    OnLimit::Wait { max } => max,
                };
                let share = LocalShare::of(self.gcra, self.rate.burst_size(), expected_instances);
                match self
                    .local
                    .reserve(&st.redis_key, share, max_wait, self.max_keys)
                {
                    Ok(None) => {
                        self.counters.admitted.fetch_add(1, Relaxed);
                        Decision::Admit
                    }
                    Ok(Some(at)) => {
                        self.counters.admitted.fetch_add(1, Relaxed);
                        Decision::AdmitAt(at)
                    }
                    Err(wait) => self.reject(wait),
                }
            }
        }
    }

    /// Forgets the keys with nothing to remember: no cells left, no refusal pending,
    /// no call in flight. Returns how many.
    pub(crate) fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut keys = self.keys();
        let before = keys.len();
        keys.retain(|_, st| {
            if Arc::strong_count(st) > 1 {
                return true;
            }
            let l = *st.lock();
            let tokens = l.tokens > 0 && now.saturating_duration_since(l.leased_at) < LEASE_MAX_AGE;
            tokens || l.fleet_next.is_some_and(|t| t > now)
        });
        let gone = before - keys.len();
        if keys.is_empty() && keys.capacity() > 1024 {
            keys.shrink_to_fit();
        }
        drop(keys);
        self.local.sweep(now);
        gone
    }
}

/// Sweeps a keyed limiter's table every `every` until the limiter is gone.
pub(crate) async fn sweep(limiter: Weak<Limiter>, every: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(l) = limiter.upgrade() else {
            return;
        };
        let n = l.sweep();
        if n > 0 {
            tracing::trace!(limiter = %l.name, dropped = n, "fleet rate limit: idle keys dropped");
        }
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// This instance's share of a quota, for [`Fallback::Local`]: the period times the
/// instances, the burst divided by them (at least 1), in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct LocalShare {
    period: u64,
    tau: u64,
}

impl LocalShare {
    fn of(gcra: Gcra, burst: u32, instances: u32) -> Self {
        let n = u64::from(instances.max(1));
        let period = ((gcra.period_us * 1000.0).round() as u64).max(1) * n;
        let burst = (u64::from(burst) / n).max(1);
        LocalShare {
            period,
            tau: period * (burst - 1),
        }
    }
}

/// The fallback's GCRA on this instance: one theoretical arrival time per quota, in
/// nanoseconds since the table's origin, with reservations as marina-limit's `Wait`
/// mode makes them.
struct LocalGcra {
    origin: Instant,
    tats: Mutex<HashMap<Box<str>, u64>>,
}

impl Default for LocalGcra {
    fn default() -> Self {
        LocalGcra {
            origin: Instant::now(),
            tats: Mutex::new(HashMap::with_hasher(RandomState::new())),
        }
    }
}

impl LocalGcra {
    fn now(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// A cell of `key`'s share now (`Ok(None)`), or reserved at a time within
    /// `max_wait` (`Ok(Some)`), or how long until one frees (`Err`). A new key finds
    /// no room in a full table (`max_keys`, after dropping the replenished ones): it
    /// is admitted untracked.
    fn reserve(
        &self,
        key: &str,
        share: LocalShare,
        max_wait: Duration,
        max_keys: usize,
    ) -> Result<Option<Instant>, Duration> {
        let at = Instant::now();
        let now = self.now(at);
        let mut tats = self.tats.lock().unwrap_or_else(PoisonError::into_inner);
        if !tats.contains_key(key) && tats.len() >= max_keys {
            tats.retain(|_, t| *t > now);
            if tats.len() >= max_keys {
                return Ok(None);
            }
        }
        let tat = tats.get(key).copied().unwrap_or(now).max(now);
        let earliest = tat.saturating_sub(share.tau);
        let max = max_wait.as_nanos().min(u128::from(u64::MAX)) as u64;
        if earliest <= now {
            tats.insert(key.into(), tat + share.period);
            Ok(None)
        } else if earliest - now <= max {
            tats.insert(key.into(), tat + share.period);
            Ok(Some(at + Duration::from_nanos(earliest - now)))
        } else {
            Err(Duration::from_nanos(earliest - now))
        }
    }

    fn sweep(&self, at: Instant) {
        let now = self.now(at);
        self.tats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, t| *t > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_s_units_are_the_rate_s_exactly() {
        let g = Gcra::of(&Rate::per_second(200).burst(5));
        assert_eq!((g.period_us, g.tau_us), (5000.0, 20000.0));
        let g = Gcra::of(&Rate::per_second(3));
        assert_eq!(g.period_us, 333_333.333);
        let g = Gcra::of(&Rate::every(Duration::from_secs(10)));
        assert_eq!((g.period_us, g.tau_us), (10_000_000.0, 0.0));
        assert!(check_rate(&Rate::per_second(1_000_000)).is_ok());
        let err = check_rate(&Rate::per_second(1_000_001)).unwrap_err();
        assert_eq!(err.field, "rate_per_second");
    }

    #[test]
    fn an_instance_s_share_divides_the_rate_and_the_burst() {
        let g = Gcra::of(&Rate::per_second(100).burst(10));
        let s = LocalShare::of(g, 10, 4);
        // 25/s: a cell every 40 ms, bursts of 2.
        assert_eq!((s.period, s.tau), (40_000_000, 40_000_000));
        // Never below one cell of burst.
        let s = LocalShare::of(g, 10, 20);
        assert_eq!(s.tau, 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_local_fallback_admits_the_share_and_reserves_in_line() {
        let local = LocalGcra::default();
        let share = LocalShare::of(Gcra::of(&Rate::per_second(100).burst(4)), 4, 2);
        // 50/s, bursts of 2.
        assert_eq!(local.reserve("k", share, Duration::ZERO, 10), Ok(None));
        assert_eq!(local.reserve("k", share, Duration::ZERO, 10), Ok(None));
        assert_eq!(
            local.reserve("k", share, Duration::ZERO, 10),
            Err(Duration::from_millis(20))
        );
        // Waiting: the next two cells, 20 ms apart.
        let now = Instant::now();
        let max = Duration::from_millis(50);
        assert_eq!(
            local.reserve("k", share, max, 10),
            Ok(Some(now + Duration::from_millis(20)))
        );
        assert_eq!(
            local.reserve("k", share, max, 10),
            Ok(Some(now + Duration::from_millis(40)))
        );
        assert_eq!(
            local.reserve("k", share, max, 10),
            Err(Duration::from_millis(60))
        );
        // Another key has its own share; a full table admits new keys untracked.
        assert_eq!(local.reserve("j", share, Duration::ZERO, 2), Ok(None));
        assert_eq!(local.reserve("i", share, Duration::ZERO, 2), Ok(None));
        assert_eq!(local.reserve("i", share, Duration::ZERO, 2), Ok(None));
        assert_eq!(local.reserve("i", share, Duration::ZERO, 2), Ok(None));
        tokio::time::advance(Duration::from_secs(1)).await;
        local.sweep(Instant::now());
        assert!(local.tats.lock().unwrap().is_empty());
    }
}
