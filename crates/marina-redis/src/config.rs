//! The settings of a fleet: where Redis is, how long a call may take, what happens
//! when it cannot answer; and the typed error a setting out of range gives.

use std::fmt;
use std::time::Duration;

use redis::IntoConnectionInfo;

/// What a fleet limit or session store does when Redis cannot answer in time (a call
/// timed out or failed, or Redis is marked down after
/// [`down_after`](FleetConfig::down_after) such calls in a row).
///
/// The decision is made at once: a request never waits on a dead Redis beyond the
/// [`call_timeout`](FleetConfig::call_timeout), and while Redis is marked down it
/// does not wait at all (one probe in the background looks for its return). Every
/// such decision is counted in the layer's stats (`fallback`), and the fleet logs a
/// `tracing` warning when Redis goes down and an info event when it is back.
///
/// | | rate limit | per-key concurrency | sticky sessions |
/// |---|---|---|---|
/// | `FailOpen` | admit | admit (no permit held) | route as a new session (the local cache still answers) |
/// | `FailClosed` | refuse: [`RedisUnavailable`] | refuse: [`RedisUnavailable`] | fail the request: [`RedisUnavailable`] |
/// | `Local` | this instance's own GCRA at the quota ÷ `expected_instances` | this instance's own limit: the limit ÷ `expected_instances`, rounded up | the local cache answers, entries kept past their TTL |
///
/// [`RedisUnavailable`]: crate::RedisUnavailable
///
/// ```
/// use marina_redis::Fallback;
///
/// // Three replicas: each allows a third of the quota on its own while Redis is away.
/// let fallback = Fallback::local(3)?;
/// assert_eq!(fallback, Fallback::Local { expected_instances: 3 });
/// assert!(Fallback::local(0).is_err());
/// # Ok::<(), marina_redis::InvalidConfig>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Let requests through unlimited (Envoy's global rate limit's default,
    /// `failure_mode_deny: false`): an outage of Redis is never an outage of the
    /// service, and the limits are off meanwhile.
    #[default]
    FailOpen,
    /// Refuse requests with [`RedisUnavailable`](crate::RedisUnavailable): no request
    /// passes a limit that cannot be checked.
    FailClosed,
    /// Enforce the limit on this instance alone, at its share of the fleet's: the
    /// rate quota (and its burst) divided by `expected_instances`, and the
    /// concurrency limit divided by it, rounded up. With the fleet's expected size,
    /// the fleet stays near its quota through the outage.
    Local {
        /// How many instances share the limit: at least 1.
        expected_instances: u32,
    },
}

impl Fallback {
    /// [`Fallback::Local`], or [`InvalidConfig`] on the field
    /// `fallback.expected_instances` if `expected_instances` is 0.
    pub fn local(expected_instances: u32) -> Result<Self, InvalidConfig> {
        let f = Fallback::Local { expected_instances };
        f.validate()?;
        Ok(f)
    }

    /// Checks `expected_instances` of [`Fallback::Local`].
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        match self {
            Fallback::Local {
                expected_instances: 0,
            } => Err(InvalidConfig::new(
                "fallback.expected_instances",
                "must be above 0, got 0",
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Fallback::FailOpen => "fail open",
            Fallback::FailClosed => "fail closed",
            Fallback::Local { .. } => "local limits",
        }
    }
}

/// A fleet's settings: see each field. [`RedisFleet::with_config`] checks them
/// ([`validate`](Self::validate)).
///
/// ```
/// use std::time::Duration;
/// use marina_redis::{Fallback, FleetConfig};
///
/// let config = FleetConfig::new("redis://127.0.0.1:6379")
///     .key_prefix("shop")
///     .call_timeout(Duration::from_millis(3))
///     .fallback(Fallback::Local { expected_instances: 4 });
/// assert!(config.validate().is_ok());
///
/// let err = FleetConfig::new("http://nope").validate().unwrap_err();
/// assert_eq!(err.field, "redis_url");
/// ```
///
/// [`RedisFleet::with_config`]: crate::RedisFleet::with_config
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FleetConfig {
    /// The Redis server: `redis://[user:password@]host[:port][/db]` (or `rediss://`
    /// where the `redis` crate was built with TLS).
    pub url: String,
    /// Prepended to every key marina writes (default `marina`), with a `:`: one Redis
    /// can serve several fleets, or tests, apart. Not empty, at most 64 bytes, no
    /// whitespace.
    pub key_prefix: String,
    /// The longest a request waits on one Redis decision (default 5 ms; a round trip
    /// on a LAN is 0.05–0.5 ms): past it the fallback decides. From 100 µs to 10 s.
    pub call_timeout: Duration,
    /// The longest one attempt to (re)connect may take (default 1 s), and the budget
    /// of [`RedisFleet::ping`](crate::RedisFleet::ping). From 1 ms to 60 s.
    pub connect_timeout: Duration,
    /// What the layers made from the fleet do when Redis cannot answer (default
    /// [`Fallback::FailOpen`]); each layer can set its own.
    pub fallback: Fallback,
    /// Failed or timed-out calls in a row after which Redis is marked down (default
    /// 3): requests then go to the fallback at once, without waiting on Redis, until
    /// a probe finds it back. At least 1.
    pub down_after: u32,
    /// While Redis is down, how often a probe (`PING`, within the call timeout)
    /// checks whether it is back (default 100 ms). From 1 ms to 60 s.
    pub probe_interval: Duration,
}

impl FleetConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        FleetConfig {
            url: url.into(),
            key_prefix: "marina".into(),
            call_timeout: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(1),
            fallback: Fallback::FailOpen,
            down_after: 3,
            probe_interval: Duration::from_millis(100),
        }
    }

    /// Sets [`key_prefix`](Self::key_prefix).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets [`call_timeout`](Self::call_timeout).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`fallback`](Self::fallback).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Sets [`down_after`](Self::down_after).
    pub fn down_after(mut self, calls: u32) -> Self {
        self.down_after = calls;
        self
    }

    /// Sets [`probe_interval`](Self::probe_interval).
    pub fn probe_interval(mut self, every: Duration) -> Self {
        self.probe_interval = every;
        self
    }

    /// Checks every field against its range: the first one out of range.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if let Err(e) = self.url.as_str().into_connection_info() {
            return Err(InvalidConfig::new(
                "redis_url",
                format!("must be a redis:// URL, got {:?}: {e}", self.url),
            ));
        }
        check_name("key_prefix", &self.key_prefix)?;
        check_duration(
            "call_timeout",
            self.call_timeout,
            Duration::from_micros(100),
            Duration::from_secs(10),
        )?;
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        self.fallback.validate()?;
        if self.down_after == 0 {
            return Err(InvalidConfig::new("down_after", "must be above 0, got 0"));
        }
        check_duration(
            "probe_interval",
            self.probe_interval,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )
    }
}

/// A setting out of its range: which setting, and why.
///
/// `field` names the setting path-style (`call_timeout`, `lease.tokens`,
/// `fallback.expected_instances`); its [`Display`](fmt::Display) is
/// `"{field}: {message}"`, as marina-limit's `InvalidLimit`.
///
/// | `field` | set by | valid range |
/// |---|---|---|
/// | `redis_url` | [`FleetConfig::url`] | a `redis://` URL the `redis` crate parses |
/// | `key_prefix` | [`FleetConfig::key_prefix`] | 1 to 64 bytes, no whitespace |
/// | `call_timeout` | [`FleetConfig::call_timeout`] | 100 µs to 10 s |
/// | `connect_timeout` | [`FleetConfig::connect_timeout`] | 1 ms to 60 s |
/// | `down_after` | [`FleetConfig::down_after`] | at least 1 |
/// | `probe_interval` | [`FleetConfig::probe_interval`] | 1 ms to 60 s |
/// | `fallback.expected_instances` | [`Fallback::Local`] | at least 1 |
/// | `name` | the layers' and the store's constructors | 1 to 64 bytes, no whitespace |
/// | `rate_per_second` | the rate limit's constructors | at most 1,000,000 requests/s |
/// | `lease.tokens`, `lease.expected_instances` | [`Lease`](crate::Lease) | 1 to the burst; at least 1 |
/// | `max_keys` | the rate limit's `try_max_keys` | at least 1 |
/// | `concurrency_per_key` | the concurrency layer's constructors | 1 to 1,000,000 |
/// | `lease_time` | the concurrency layer's `try_lease_time` | 100 ms to 1 hour, at least 4 call timeouts |
/// | `idle_timeout`, `cache_ttl`, `max_cached` | the session store's settings | see [`SessionConfig`](crate::SessionConfig) |
///
/// ```
/// use marina_redis::{FleetConfig, InvalidConfig};
/// use std::time::Duration;
///
/// let err: InvalidConfig = FleetConfig::new("redis://127.0.0.1")
///     .call_timeout(Duration::ZERO)
///     .validate()
///     .unwrap_err();
/// assert_eq!(err.to_string(), "call_timeout: must be at least 100µs, got 0ns");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidConfig {
    /// The setting at fault.
    pub field: &'static str,
    /// What is wrong: the range accepted and the value given.
    pub message: String,
}

impl InvalidConfig {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidConfig {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidConfig {}

/// The value, or a panic with the error's text (the infallible constructors).
#[track_caller]
pub(crate) fn or_panic<T>(checked: Result<T, InvalidConfig>) -> T {
    match checked {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// A name that goes into Redis keys: 1 to 64 bytes, no whitespace.
pub(crate) fn check_name(field: &'static str, name: &str) -> Result<(), InvalidConfig> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_whitespace) {
        return Err(InvalidConfig::new(
            field,
            format!("must be 1 to 64 bytes without whitespace, got {name:?}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_duration(
    field: &'static str,
    v: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), InvalidConfig> {
    if v < min {
        return Err(InvalidConfig::new(
            field,
            format!("must be at least {min:?}, got {v:?}"),
        ));
    }
    if v > max {
        return Err(InvalidConfig::new(
            field,
            format!("must be at most {max:?}, got {v:?}"),
        ));
    }
    Ok(())
}
