//! Pool configuration: knobs, presets, Little's-law sizing and validation.

use std::fmt;
use std::time::Duration;

/// Which idle connection a checkout reuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reuse {
    /// The most recently returned connection (warm caches, and surplus connections
    /// stay idle long enough to be evicted). The default.
    #[default]
    Lifo,
    /// The least recently returned connection (spreads use evenly over connections).
    Fifo,
}

/// Whether [`Pool::get`](crate::Pool::get) retries a connect that failed for a
/// transient reason (refused, reset, timed out: see [`Manage::is_transient`] and
/// [`is_transient`](crate::is_transient)), with jittered exponential backoff (10 ms
/// doubling up to 500 ms), until `acquire_timeout` runs out.
///
/// A connect error the connector calls permanent (a wrong password, an unknown
/// database, a TLS failure) is returned at once as [`PoolError::Connect`], whatever this
/// says. When the time runs out while retrying, the error is a `PoolError::Connect`
/// too, whose source is a [`RetriesExhausted`](crate::RetriesExhausted) carrying the last
/// connect error (a backend that cannot be reached is not a busy pool: no
/// `PoolError::Timeout`).
///
/// [`PoolService`](crate::PoolService) never retries: it is what balancers (and the
/// `marina` stack) use, and failing over to another backend at once beats waiting on a
/// dead one.
///
/// [`Manage::is_transient`]: crate::Manage::is_transient
/// [`PoolError::Connect`]: crate::PoolError::Connect
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectRetry {
    /// Never retry: every failed connect is returned at once.
    Off,
    /// Retry once the pool has connected to its target at least once (the default): a
    /// restart, a failover or a network blip costs callers no errors, while a target
    /// never reached (a wrong address or port) is reported at once rather than after
    /// `acquire_timeout`.
    #[default]
    Reconnects,
    /// Retry always, also before the first connect succeeds (a service that may start
    /// before its database).
    Always,
}

/// Every knob of a [`Pool`](crate::Pool).
///
/// Build one from a preset ([`balanced`](Config::balanced), [`high_throughput`](Config::high_throughput),
/// [`low_latency`](Config::low_latency), [`resource_constrained`](Config::resource_constrained)),
/// from expected load ([`for_load`](Config::for_load)), or field by field; then check it
/// with [`validate`](Config::validate). [`Pool::builder`](crate::Pool::builder) has a
/// method per field.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use marina_pool::Config;
///
/// // 100 requests/s that each hold a connection for 50 ms: 5 in use on average.
/// let config = Config::for_load(100.0, Duration::from_millis(50));
/// assert_eq!((config.min_idle, config.max_size), (3, 10));
/// assert!(config.validate().is_ok());
///
/// let bad = Config { min_idle: 30, max_size: 20, ..Config::balanced() };
/// let report = bad.validate();
/// assert!(!report.is_ok());
/// assert_eq!(report.errors[0].field, "min_idle");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Idle connections the pool keeps ready (opened at build time and refilled in the
    /// background), as long as `max_size` allows. 0 opens connections only on demand.
    pub min_idle: usize,
    /// The most connections the pool holds at once: idle, checked out and connecting.
    pub max_size: usize,
    /// How long [`Pool::get`](crate::Pool::get) waits in all (queueing and connecting)
    /// before it fails with [`PoolError::Timeout`](crate::PoolError::Timeout).
    /// `None` waits for ever (not recommended: a stuck backend then stalls callers, and
    /// connects that keep failing for a transient reason are retried for ever).
    pub acquire_timeout: Option<Duration>,
    /// How long one connect may take before it fails with
    /// [`PoolError::Connect`](crate::PoolError::Connect).
    pub connect_timeout: Option<Duration>,
    /// Idle connections older than this (since they were last returned) are closed.
    /// Set it below the server's keep-alive timeout so no stale connection is reused.
    /// Checked at checkout and by the eviction pass with one-second granularity (the
    /// hot path reads a clock the background task refreshes every second), so keep it
    /// a few seconds below the server's limit.
    pub idle_timeout: Option<Duration>,
    /// Connections older than this (since they were opened) are closed: when idle, or
    /// when they come back from a checkout (one-second granularity, like `idle_timeout`).
    pub max_lifetime: Option<Duration>,
    /// How often idle connections are validated in the background (socket state, then
    /// the pool's [`Probe`](marina_core::Probe) if it has one). `None` disables it.
    pub health_check_interval: Option<Duration>,
    /// How long one background probe may take before its connection counts as broken.
    pub health_check_timeout: Duration,
    /// How often the background task closes idle connections past `idle_timeout` or
    /// `max_lifetime`. (Refill to `min_idle` runs on every tick of that task, at most a
    /// second apart when expiry is on, and backs off while connects fail.)
    pub eviction_interval: Duration,
    /// The most connects in flight at once (bounds reconnect storms after an outage).
    pub max_connecting: usize,
    /// Which idle connection a checkout reuses.
    pub reuse: Reuse,
    /// Whether [`Pool::get`](crate::Pool::get) retries transient connect failures
    /// within `acquire_timeout` ([`ConnectRetry::Reconnects`] by default).
    pub connect_retry: ConnectRetry,
}

impl Default for Config {
    /// Opens connections on demand (`min_idle` 0), at most 10; waits 30 s to acquire and
    /// 10 s to connect; closes connections idle for 10 min or open for 30 min; checks idle
    /// connections every 30 s; at most 8 connects at once; LIFO reuse; retries
    /// transient connect failures once the target was reached.
    fn default() -> Self {
        Config {
            min_idle: 0,
            max_size: 10,
            acquire_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            health_check_interval: Some(Duration::from_secs(30)),
            health_check_timeout: Duration::from_secs(5),
            eviction_interval: Duration::from_secs(30),
            max_connecting: 8,
            reuse: Reuse::Lifo,
            connect_retry: ConnectRetry::Reconnects,
        }
    }
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Config {
    /// A general-purpose pool: min 5, max 20, acquire timeout 5 s, idle timeout 300 s,
    /// lifetime 3600 s, health checks every 30 s, eviction every 60 s.
    pub fn balanced() -> Self {
        Config {
            min_idle: 5,
            max_size: 20,
            acquire_timeout: Some(secs(5)),
            connect_timeout: Some(secs(5)),
            idle_timeout: Some(secs(300)),
            max_lifetime: Some(secs(3600)),
            health_check_interval: Some(secs(30)),
            health_check_timeout: secs(5),
            eviction_interval: secs(60),
            max_connecting: 8,
            reuse: Reuse::Lifo,
            connect_retry: ConnectRetry::Reconnects,
        }
    }

    /// Many concurrent requests: min 10, max 50, acquire timeout 10 s, idle timeout
    /// 600 s, lifetime 3600 s, health checks every 60 s, eviction every 60 s, up to 16
    /// connects at once.
    pub fn high_throughput() -> Self {
        Config {
            min_idle: 10,
            max_size: 50,
            acquire_timeout: Some(secs(10)),
            connect_timeout: Some(secs(5)),
            idle_timeout: Some(secs(600)),
            max_lifetime: Some(secs(3600)),
            health_check_interval: Some(secs(60)),
            eviction_interval: secs(60),
            max_connecting: 16,
            ..Self::balanced()
        }
    }

    /// Fail fast and keep warm connections: min 10, max 30, acquire timeout 1 s,
    /// connect timeout 1 s, idle timeout 300 s, lifetime 1800 s, health checks every
    /// 15 s, eviction every 30 s.
    pub fn low_latency() -> Self {
        Config {
            min_idle: 10,
            max_size: 30,
            acquire_timeout: Some(secs(1)),
            connect_timeout: Some(secs(1)),
            idle_timeout: Some(secs(300)),
            max_lifetime: Some(secs(1800)),
            health_check_interval: Some(secs(15)),
            health_check_timeout: secs(1),
            eviction_interval: secs(30),
            ..Self::balanced()
        }
    }

    /// Few connections, released quickly: min 1, max 5, acquire timeout 10 s, idle
    /// timeout 60 s, lifetime 1800 s, health checks every 60 s, eviction every 30 s,
    /// 2 connects at once.
    pub fn resource_constrained() -> Self {
        Config {
            min_idle: 1,
            max_size: 5,
            acquire_timeout: Some(secs(10)),
            connect_timeout: Some(secs(5)),
            idle_timeout: Some(secs(60)),
            max_lifetime: Some(secs(1800)),
            health_check_interval: Some(secs(60)),
            eviction_interval: secs(30),
            max_connecting: 2,
            ..Self::balanced()
        }
    }

    /// Sizes a pool by Little's law for `requests_per_sec` requests that each hold a
    /// connection for `avg_latency`: with `L = requests_per_sec × avg_latency` connections
    /// in use on average, `min_idle = max(2, ⌈L/2⌉)` and `max_size = max(10, ⌈2L⌉)`.
    /// Other fields are [`balanced`](Config::balanced)'s. Negative or non-finite rates
    /// count as 0.
    pub fn for_load(requests_per_sec: f64, avg_latency: Duration) -> Self {
        let rate = if requests_per_sec.is_finite() && requests_per_sec > 0.0 {
            requests_per_sec
        } else {
            0.0
        };
        let in_use = rate * avg_latency.as_secs_f64();
        // Guard against float noise: 100 × 0.05 is 5.000000000000001.
        let ceil = |x: f64| (x - 1e-9).ceil().max(0.0) as usize;
        Config {
            min_idle: ceil(in_use * 0.5).max(2),
            max_size: ceil(in_use * 2.0).max(10),
            ..Self::balanced()
        }
    }

    /// Checks the configuration and returns every problem found: errors, which make
    /// [`Pool::builder`](crate::Pool::builder)'s `build` fail, apart from advisories,
    /// which are logged as warnings.
    pub fn validate(&self) -> Validation {
        let mut v = Validation::default();
        if self.max_size == 0 {
            v.error("max_size", "must be at least 1".into());
        }
        if self.min_idle > self.max_size {
            v.error(
                "min_idle",
                format!(
                    "{} is larger than max_size {}",
                    self.min_idle, self.max_size
                ),
            );
        }
        if self.max_connecting == 0 {
            v.error("max_connecting", "must be at least 1".into());
        }
        if self.eviction_interval.is_zero() {
            v.error("eviction_interval", "must not be zero".into());
        }
        if self.health_check_timeout.is_zero() {
            v.error("health_check_timeout", "must not be zero".into());
        }
        for (field, d) in [
            ("acquire_timeout", self.acquire_timeout),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("max_lifetime", self.max_lifetime),
            ("health_check_interval", self.health_check_interval),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                v.error(field, "must not be zero (use None to disable)".into());
            }
        }
        if let Some(d) = self
            .acquire_timeout
            .filter(|d| !d.is_zero() && *d < secs(1))
        {
            v.advise(
                "acquire_timeout",
                format!("{d:?} is under 1 s: short bursts will fail with Timeout"),
            );
        }
        if self.acquire_timeout.is_none() {
            v.advise(
                "acquire_timeout",
                "None waits for ever when the backend stalls".into(),
            );
        }
        if let Some(d) = self
            .health_check_interval
            .filter(|d| !d.is_zero() && *d < secs(10))
        {
            v.advise(
                "health_check_interval",
                format!("{d:?} is under 10 s: probes add load on the backend"),
            );
        }
        if let (Some(idle), Some(life)) = (self.idle_timeout, self.max_lifetime)
            && !idle.is_zero()
            && idle >= life
        {
            v.advise(
                "idle_timeout",
                format!("{idle:?} is not below max_lifetime {life:?}, so it never applies"),
            );
        }
        v
    }
}

/// What [`Config::validate`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    /// Problems that make the configuration unusable.
    pub errors: Vec<Problem>,
    /// Settings that work but are likely mistakes.
    pub advisories: Vec<Problem>,
}

impl Validation {
    /// True when there are no errors (advisories may remain).
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    fn error(&mut self, field: &'static str, message: String) {
        self.errors.push(Problem { field, message });
    }

    fn advise(&mut self, field: &'static str, message: String) {
        self.advisories.push(Problem { field, message });
    }
}

/// One problem found by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The [`Config`] field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_load_follows_littles_law() {
        // An example: 100 req/s × 50 ms = 5 in flight.
        let c = Config::for_load(100.0, Duration::from_millis(50));
        assert_eq!(c.min_idle, 3);
        assert_eq!(c.max_size, 10);
        // 1000 req/s × 100 ms = 100 in flight.
        let c = Config::for_load(1000.0, Duration::from_millis(100));
        assert_eq!(c.min_idle, 50);
        assert_eq!(c.max_size, 200);
        // Tiny and nonsensical loads fall back to the floors.
        let c = Config::for_load(1.0, Duration::from_millis(1));
        assert_eq!((c.min_idle, c.max_size), (2, 10));
        let c = Config::for_load(f64::NAN, Duration::from_secs(1));
        assert_eq!((c.min_idle, c.max_size), (2, 10));
        let c = Config::for_load(-5.0, Duration::from_secs(1));
        assert_eq!((c.min_idle, c.max_size), (2, 10));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn presets_are_valid_and_balanced_has_the_seed_numbers() {
        for c in [
            Config::default(),
            Config::balanced(),
            Config::high_throughput(),
            Config::low_latency(),
            Config::resource_constrained(),
        ] {
            let v = c.validate();
            assert!(v.is_ok(), "{c:?}: {v:?}");
            assert!(v.advisories.is_empty(), "{c:?}: {v:?}");
        }
        let b = Config::balanced();
        assert_eq!((b.min_idle, b.max_size), (5, 20));
        assert_eq!(b.acquire_timeout, Some(secs(5)));
        assert_eq!(b.idle_timeout, Some(secs(300)));
        assert_eq!(b.max_lifetime, Some(secs(3600)));
        assert_eq!(b.health_check_interval, Some(secs(30)));
        assert_eq!(b.eviction_interval, secs(60));
    }

    #[test]
    fn validate_reports_every_error_apart_from_advisories() {
        let c = Config {
            min_idle: 4,
            max_size: 0,
            max_connecting: 0,
            acquire_timeout: Some(Duration::from_millis(200)),
            health_check_interval: Some(secs(2)),
            connect_timeout: Some(Duration::ZERO),
            ..Config::balanced()
        };
        let v = c.validate();
        let errors: Vec<_> = v.errors.iter().map(|p| p.field).collect();
        assert_eq!(
            errors,
            ["max_size", "min_idle", "max_connecting", "connect_timeout"]
        );
        let advisories: Vec<_> = v.advisories.iter().map(|p| p.field).collect();
        assert_eq!(advisories, ["acquire_timeout", "health_check_interval"]);
        assert!(!v.is_ok());
        assert!(v.errors[1].to_string().contains("larger than max_size"));
    }

    #[test]
    fn min_above_max_is_an_error_and_advisories_alone_are_ok() {
        let v = Config {
            min_idle: 21,
            ..Config::balanced()
        }
        .validate();
        assert_eq!(v.errors.len(), 1);
        let v = Config {
            acquire_timeout: Some(Duration::from_millis(500)),
            ..Config::balanced()
        }
        .validate();
        assert!(v.is_ok());
        assert_eq!(v.advisories.len(), 1);
    }
}
