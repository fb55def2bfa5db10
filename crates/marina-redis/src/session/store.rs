//! `RedisSessionStore`: sticky sessions in Redis, behind a short-lived local cache.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use marina_affinity::{Lookup, SessionStore};
use marina_core::{BoxError, EndpointId};
use tokio::time::Instant;

use crate::config::{Fallback, InvalidConfig, check_duration, check_name, or_panic};
use crate::error::RedisUnavailable;
use crate::fleet::{CallError, RedisFleet};
use crate::scripts::PIN;

/// The settings of a [`RedisSessionStore`]. [`RedisSessionStore::try_new`] checks
/// them ([`validate`](Self::validate)).
///
/// ```
/// use std::time::Duration;
/// use marina_redis::SessionConfig;
///
/// let config = SessionConfig::default()
///     .idle_timeout(Duration::from_secs(600))
///     .cache_ttl(Duration::from_millis(500));
/// assert!(config.validate().is_ok());
/// let err = config.cache_ttl(Duration::from_secs(600)).validate().unwrap_err();
/// assert_eq!(err.field, "cache_ttl");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// A session unused for this long is forgotten (default 30 minutes): the Redis
    /// key's TTL, refreshed whenever an instance reads it from Redis (at most once
    /// per `cache_ttl` while the session is used) or pins it. From 100 ms to 30 days.
    pub idle_timeout: Duration,
    /// How long an instance answers from its local copy of a pin before reading it
    /// from Redis again (default 1 s): a session moved by another instance is seen
    /// here within it, and a session expires between `idle_timeout - cache_ttl` and
    /// `idle_timeout` after its last request. Zero: every lookup reads Redis. At most
    /// half the idle timeout.
    pub cache_ttl: Duration,
    /// The most pins kept in the local cache (default 100,000). At least 1.
    pub max_cached: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout: Duration::from_secs(30 * 60),
            cache_ttl: Duration::from_secs(1),
            max_cached: 100_000,
        }
    }
}

impl SessionConfig {
    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Sets [`cache_ttl`](Self::cache_ttl).
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Sets [`max_cached`](Self::max_cached).
    pub fn max_cached(mut self, n: usize) -> Self {
        self.max_cached = n;
        self
    }

    /// Checks every field against its range: the first one out of range.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        check_duration(
            "idle_timeout",
            self.idle_timeout,
            Duration::from_millis(100),
            Duration::from_secs(30 * 24 * 3600),
        )?;
        check_duration(
            "cache_ttl",
            self.cache_ttl,
            Duration::ZERO,
            self.idle_timeout / 2,
        )?;
        if self.max_cached == 0 {
            return Err(InvalidConfig::new("max_cached", "must be above 0, got 0"));
        }
        Ok(())
    }
}

/// Sticky sessions shared by a fleet: a [`SessionStore`] for marina-affinity whose
/// pins (session key → endpoint id) live in Redis, so a session pinned through one
/// instance is routed to the same backend through any other, and survives the
/// restart of the instance that pinned it.
///
/// - A pin is one Redis string, `{prefix}:session:{name}:{key}` → the endpoint id,
///   with the idle timeout as its TTL: Redis forgets idle sessions by itself.
/// - A lookup answers from the local cache while its copy is younger than
///   `cache_ttl` (no call), and otherwise reads Redis with `GETEX` (one call, which
///   refreshes the idle timeout).
/// - A pin updates the cache at once and writes Redis in the background with a
///   compare-and-set script: when two instances pin a new session at once, or a
///   session moved meanwhile, the first pin wins and the other instance adopts it.
///
/// When Redis cannot answer within the fleet's call timeout, the
/// [`Fallback`] decides: `FailOpen` routes the request as a new session (fresh cache
/// entries still answer), `Local` answers from the cache even past its TTL,
/// `FailClosed` fails the request with [`RedisUnavailable`].
///
/// # Examples
///
/// ```no_run
/// use marina_affinity::{Lookup, SessionStore};
/// use marina_core::EndpointId;
/// use marina_redis::{RedisFleet, RedisSessionStore, SessionConfig};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let fleet = RedisFleet::open("redis://127.0.0.1:6379")?;
/// let store = RedisSessionStore::new(&fleet, "web", SessionConfig::default());
/// store.pin("session-1", EndpointId(42), None);
/// // Another instance (here: the store itself, past its cache) reads it from Redis.
/// assert_eq!(store.fetch("session-1").await?, Some(EndpointId(42)));
/// assert!(matches!(store.lookup("session-1"), Lookup::Pinned(EndpointId(42))));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    fleet: RedisFleet,
    name: String,
    /// `{prefix}:session:{name}`.
    base: String,
    config: SessionConfig,
    fallback: Fallback,
    cache: Mutex<HashMap<Box<str>, Cached, RandomState>>,
    counters: Counters,
}

#[derive(Clone, Copy)]
struct Cached {
    endpoint: EndpointId,
    at: Instant,
}

#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    cache_hits: AtomicU64,
    fetches: AtomicU64,
    calls: AtomicU64,
    pins: AtomicU64,
    adopted: AtomicU64,
    fallback: AtomicU64,
    write_failures: AtomicU64,
}

/// A [`RedisSessionStore`]'s figures on this instance, from
/// [`RedisSessionStore::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStoreStats {
    /// Lookups.
    pub lookups: u64,
    /// Lookups answered from the local cache, without a call.
    pub cache_hits: u64,
    /// Reads from Redis.
    pub fetches: u64,
    /// Redis round trips: reads, pins, ends.
    pub redis_calls: u64,
    /// Pins made here.
    pub pins: u64,
    /// Pins of this instance that lost to another instance's (a race for a new
    /// session, or a session moved meanwhile): the other's endpoint was adopted.
    pub adopted: u64,
    /// Lookups the fallback answered (Redis timed out, failed, or was down).
    pub fallback: u64,
    /// Pins and ends that did not reach Redis.
    pub write_failures: u64,
    /// Pins in the local cache now.
    pub cached: usize,
}

impl fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("name", &self.inner.name)
            .field("config", &self.inner.config)
            .field("fallback", &self.inner.fallback)
            .finish_non_exhaustive()
    }
}

impl RedisSessionStore {
    /// The sessions named `name` in the fleet's Redis, with `config`; the fleet's
    /// fallback.
    ///
    /// # Panics
    ///
    /// If `name` or `config` is out of range, with [`try_new`](Self::try_new)'s
    /// message.
    #[track_caller]
    pub fn new(fleet: &RedisFleet, name: &str, config: SessionConfig) -> Self {
        or_panic(Self::try_new(fleet, name, config))
    }

    /// The sessions named `name`, or [`InvalidConfig`]: `name` is not 1 to 64 bytes
    /// without whitespace (field `name`), or a field of `config` is out of range
    /// ([`SessionConfig::validate`]).
    pub fn try_new(
        fleet: &RedisFleet,
        name: &str,
        config: SessionConfig,
    ) -> Result<Self, InvalidConfig> {
        check_name("name", name)?;
        config.validate()?;
        Ok(RedisSessionStore {
            inner: Arc::new(Inner {
                fleet: fleet.clone(),
                name: name.to_owned(),
                base: fleet.key("session", name),
                config,
                fallback: fleet.config().fallback,
                cache: Mutex::default(),
                counters: Counters::default(),
            }),
        })
    }

    /// This store's fallback when Redis cannot answer (default: the fleet's).
    ///
    /// # Panics
    ///
    /// If `fallback` is out of range ([`Fallback::validate`]), or the store was
    /// already cloned.
    #[track_caller]
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        or_panic(fallback.validate());
        Arc::get_mut(&mut self.inner)
            .expect("configure the store before cloning it")
            .fallback = fallback;
        self
    }

    /// The settings.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// The counters.
    pub fn stats(&self) -> SessionStoreStats {
        let c = &self.inner.counters;
        SessionStoreStats {
            lookups: c.lookups.load(Relaxed),
            cache_hits: c.cache_hits.load(Relaxed),
            fetches: c.fetches.load(Relaxed),
            redis_calls: c.calls.load(Relaxed),
            pins: c.pins.load(Relaxed),
            adopted: c.adopted.load(Relaxed),
            fallback: c.fallback.load(Relaxed),
            write_failures: c.write_failures.load(Relaxed),
            cached: self.inner.cache().len(),
        }
    }

    /// Reads session `key`'s pin from Redis (refreshing its idle timeout) and caches
    /// it: `None` when there is no such session. No fallback: an unanswered call is
    /// an error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops the wait for the answer (the read may
    /// still refresh the session's expiry).
    pub async fn fetch(&self, key: &str) -> Result<Option<EndpointId>, RedisUnavailable> {
        self.inner.read(key).await.map_err(|e| e.unavailable())
    }

    /// Drops the local cache: the next lookup of every session reads Redis.
    pub fn clear_cache(&self) {
        self.inner.cache().clear();
    }
}

impl Inner {
    fn cache(&self) -> MutexGuard<'_, HashMap<Box<str>, Cached, RandomState>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}:{key}", self.base)
    }

    fn idle_ms(&self) -> u64 {
        self.config.idle_timeout.as_millis() as u64
    }

    fn remember(&self, key: &str, endpoint: EndpointId) {
        let now = Instant::now();
        let mut cache = self.cache();
        if let Some(c) = cache.get_mut(key) {
            *c = Cached { endpoint, at: now };
            return;
        }
        if cache.len() >= self.config.max_cached {
            let ttl = self.config.cache_ttl;
            cache.retain(|_, c| now.saturating_duration_since(c.at) < ttl);
            if cache.len() >= self.config.max_cached {
                return;
            }
        }
        cache.insert(key.into(), Cached { endpoint, at: now });
    }

    /// `GETEX key PX idle`: the pin, its expiry refreshed.
    async fn read(&self, key: &str) -> Result<Option<EndpointId>, CallError> {
        self.counters.fetches.fetch_add(1, Relaxed);
        let mut cmd = redis::cmd("GETEX");
        cmd.arg(self.redis_key(key)).arg("PX").arg(self.idle_ms());
        let deadline = Instant::now() + self.fleet.config().call_timeout;
        let value: Option<String> = self
            .fleet
            .query(&cmd, deadline, &self.counters.calls)
            .await?;
        let endpoint = value.and_then(|v| v.parse().ok()).map(EndpointId);
        match endpoint {
            Some(ep) => self.remember(key, ep),
            None => {
                self.cache().remove(key);
            }
        }
        Ok(endpoint)
    }

    /// A lookup Redis could not answer: the fallback's answer.
    #[cold]
    fn fall_back(&self, key: &str, why: CallError) -> Result<Option<EndpointId>, BoxError> {
        self.counters.fallback.fetch_add(1, Relaxed);
        tracing::debug!(store = %self.name, fallback = self.fallback.name(), outage = %why.outage(), "shared sessions: fallback answers");
        match self.fallback {
            Fallback::FailOpen => Ok(None),
            Fallback::FailClosed => Err(why.unavailable().into()),
            Fallback::Local { .. } => Ok(self.cache().get(key).map(|c| c.endpoint)),
        }
    }

    /// Runs a write in the background (pins and ends never wait).
    fn write<F>(self: &Arc<Self>, work: impl FnOnce(Arc<Inner>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(work(self.clone()));
            }
            Err(_) => {
                self.counters.write_failures.fetch_add(1, Relaxed);
            }
        }
    }
}

impl SessionStore for RedisSessionStore {
    fn lookup(&self, key: &str) -> Lookup {
        let inner = &self.inner;
        inner.counters.lookups.fetch_add(1, Relaxed);
        let now = Instant::now();
        if let Some(c) = inner.cache().get(key).copied()
            && now.saturating_duration_since(c.at) < inner.config.cache_ttl
        {
            inner.counters.cache_hits.fetch_add(1, Relaxed);
            return Lookup::Pinned(c.endpoint);
        }
        if !inner.fleet.is_available() {
            let down = inner.fleet.skip();
            return match inner.fall_back(key, down) {
                Ok(Some(ep)) => Lookup::Pinned(ep),
                Ok(None) => Lookup::Absent,
                Err(e) => Lookup::Fetch(Box::pin(std::future::ready(Err(e)))),
            };
        }
        let inner = inner.clone();
        let key = key.to_owned();
        Lookup::Fetch(Box::pin(async move {
            match inner.read(&key).await {
                Ok(found) => Ok(found),
                Err(e) => inner.fall_back(&key, e),
            }
        }))
    }

    fn pin(&self, key: &str, endpoint: EndpointId, previous: Option<EndpointId>) {
        let inner = &self.inner;
        inner.counters.pins.fetch_add(1, Relaxed);
        inner.remember(key, endpoint);
        let redis_key = inner.redis_key(key);
        let key = key.to_owned();
        let deadline_after = inner.fleet.config().call_timeout * 4;
        inner.write(move |inner: Arc<Inner>| async move {
            let mut cmd = PIN.cmd(&redis_key);
            cmd.arg(endpoint.0)
                .arg(previous.map_or_else(String::new, |p| p.0.to_string()))
                .arg(inner.idle_ms());
            let deadline = Instant::now() + deadline_after;
            match inner
                .fleet
                .eval::<String>(&PIN, &cmd, deadline, &inner.counters.calls)
                .await
            {
                Ok(kept) => {
                    if let Ok(kept) = kept.parse::<u64>()
                        && kept != endpoint.0
                    {
                        inner.counters.adopted.fetch_add(1, Relaxed);
                        tracing::debug!(store = %inner.name, session = %key, ours = ?endpoint, kept = ?EndpointId(kept), "shared sessions: another instance's pin kept");
                        inner.remember(&key, EndpointId(kept));
                    }
                }
                Err(e) => {
                    inner.counters.write_failures.fetch_add(1, Relaxed);
                    tracing::debug!(store = %inner.name, session = %key, outage = %e.outage(), "shared sessions: pin not written");
                }
            }
        });
    }

    fn end_session(&self, key: &str) {
        let inner = &self.inner;
        inner.cache().remove(key);
        let redis_key = inner.redis_key(key);
        let budget = inner.fleet.config().call_timeout * 4;
        inner.write(move |inner: Arc<Inner>| async move {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&redis_key);
            let deadline = Instant::now() + budget;
            if inner
                .fleet
                .query::<i64>(&cmd, deadline, &inner.counters.calls)
                .await
                .is_err()
            {
                inner.counters.write_failures.fetch_add(1, Relaxed);
            }
        });
    }
}
