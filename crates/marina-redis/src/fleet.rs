//! `RedisFleet`: the one Redis connection a process's fleet limits and session store
//! share, with the call timeout, the down/up state and its probe, and the counters.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Cmd, FromRedisValue, RedisError};
use tokio::time::Instant;

use crate::config::{FleetConfig, InvalidConfig};
use crate::error::{Outage, RedisUnavailable};
use crate::scripts::{self, Script};

/// A Redis server shared by a fleet of instances, and this instance's one connection
/// to it: what [`RedisRateLimitLayer`], [`RedisConcurrencyLayer`] and
/// [`RedisSessionStore`] are made from. Clones share the connection, the state and
/// the counters.
///
/// The connection is the `redis` crate's [`ConnectionManager`]: one multiplexed
/// connection that every call pipelines onto, reconnecting by itself with backoff
/// (10 ms doubling to 500 ms, each attempt bounded by
/// [`connect_timeout`](FleetConfig::connect_timeout)). Opening does not wait for
/// Redis: the first call connects, so an instance starts while Redis is away, under
/// its fallback.
///
/// # When Redis is down or slow
///
/// Every call has the fleet's [`call_timeout`](FleetConfig::call_timeout) (default 5
/// ms): past it, or on an error, the layer's [`Fallback`](crate::Fallback) decides
/// the request. After [`down_after`](FleetConfig::down_after) failed calls in a row
/// (default 3) Redis is marked down: requests go to the fallback at once, with no
/// call and no wait, and a probe (`PING`) runs every
/// [`probe_interval`](FleetConfig::probe_interval) (default 100 ms) until one answers
/// within the call timeout; then Redis is up again and the limits are enforced by it
/// again. Going down is logged as a `tracing` warning, coming back as an info event;
/// [`stats`](Self::stats) counts both, the timeouts, the errors, and the requests
/// decided without a call.
///
/// # Examples
///
/// ```no_run
/// use marina_redis::{FleetConfig, RedisFleet};
/// use std::time::Duration;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let fleet = RedisFleet::with_config(
///     FleetConfig::new("redis://127.0.0.1:6379").call_timeout(Duration::from_millis(3)),
/// )?;
/// // Optional: fail at startup if Redis is not there.
/// let rtt = fleet.ping().await?;
/// println!("redis answers in {rtt:?}");
/// # Ok(()) }
/// ```
///
/// [`RedisRateLimitLayer`]: crate::RedisRateLimitLayer
/// [`RedisConcurrencyLayer`]: crate::RedisConcurrencyLayer
/// [`RedisSessionStore`]: crate::RedisSessionStore
#[derive(Clone)]
pub struct RedisFleet {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    conn: ConnectionManager,
    pub(crate) config: FleetConfig,
    /// This instance's id: 64 random bits, hex. Names its semaphore permits.
    pub(crate) instance: String,
    down: AtomicBool,
    failures: AtomicU32,
    counters: Counters,
    /// Numbers this instance's semaphore permits: with the instance id, a member no
    /// other permit of the fleet has, whatever layer (or stack) of this fleet took it.
    permits: AtomicU64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    script_loads: AtomicU64,
    outages: AtomicU64,
    recoveries: AtomicU64,
    skipped: AtomicU64,
    probes: AtomicU64,
}

/// A fleet's figures, from [`RedisFleet::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FleetStats {
    /// Whether Redis is taken to be up (calls are made).
    pub available: bool,
    /// Commands sent (round trips; a pipeline counts one), every layer together,
    /// probes and script loads included.
    pub calls: u64,
    /// Calls that took longer than the call timeout.
    pub timeouts: u64,
    /// Calls that failed (connection refused or lost, server errors).
    pub errors: u64,
    /// `SCRIPT LOAD`s: when the fleet opened, and after a `NOSCRIPT`.
    pub script_loads: u64,
    /// Times Redis was marked down.
    pub outages: u64,
    /// Times a probe found it back.
    pub recoveries: u64,
    /// Decisions made while Redis was down, without a call.
    pub skipped: u64,
    /// Probes sent while down.
    pub probes: u64,
}

/// Why a call gave no answer.
#[derive(Debug)]
pub(crate) enum CallError {
    Down,
    TimedOut(Duration),
    Failed(RedisError),
}

impl CallError {
    pub(crate) fn outage(&self) -> Outage {
        match self {
            CallError::Down => Outage::Down,
            CallError::TimedOut(after) => Outage::TimedOut { after: *after },
            CallError::Failed(e) => Outage::Failed {
                message: e.to_string(),
            },
        }
    }

    pub(crate) fn unavailable(&self) -> RedisUnavailable {
        RedisUnavailable {
            outage: self.outage(),
        }
    }
}

impl fmt::Debug for RedisFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisFleet")
            .field("config", &self.inner.config)
            .field("instance", &self.inner.instance)
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisFleet {
    /// The fleet at `url`, with the default settings ([`FleetConfig::new`]). Does not
    /// wait for Redis (see [`ping`](Self::ping)).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (the connection lives on it).
    pub fn open(url: &str) -> Result<Self, InvalidConfig> {
        Self::with_config(FleetConfig::new(url))
    }

    /// The fleet with `config`, or [`InvalidConfig`] if a setting is out of range
    /// ([`FleetConfig::validate`]). Does not wait for Redis; loads the scripts in the
    /// background.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (the connection lives on it).
    pub fn with_config(config: FleetConfig) -> Result<Self, InvalidConfig> {
        config.validate()?;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            panic!("marina_redis::RedisFleet must be opened within a tokio runtime");
        };
        let client = Client::open(config.url.as_str())
            .map_err(|e| InvalidConfig::new("redis_url", e.to_string()))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(6)
            .set_connection_timeout(Some(config.connect_timeout));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| InvalidConfig::new("redis_url", e.to_string()))?;
        let fleet = RedisFleet {
            inner: Arc::new(Inner {
                conn,
                config,
                instance: format!("{:016x}", instance_id()),
                down: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                counters: Counters::default(),
                permits: AtomicU64::new(0),
            }),
        };
        let weak = Arc::downgrade(&fleet.inner);
        rt.spawn(async move {
            if let Some(inner) = weak.upgrade() {
                let fleet = RedisFleet { inner };
                let budget = fleet.inner.config.connect_timeout;
                if let Err(e) = fleet.load_scripts(Instant::now() + budget).await {
                    tracing::debug!(error = ?e, "redis: scripts not loaded at open (loaded on first use)");
                }
            }
        });
        Ok(fleet)
    }

    /// The settings.
    pub fn config(&self) -> &FleetConfig {
        &self.inner.config
    }

    /// This instance's id in the fleet (64 random bits, hex): it names the
    /// semaphore permits this instance holds.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance
    }

    /// Whether Redis is taken to be up: false from the moment it is marked down until
    /// a probe finds it back.
    pub fn is_available(&self) -> bool {
        !self.inner.down.load(Relaxed)
    }

    /// The counters.
    pub fn stats(&self) -> FleetStats {
        let c = &self.inner.counters;
        FleetStats {
            available: self.is_available(),
            calls: c.calls.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            errors: c.errors.load(Relaxed),
            script_loads: c.script_loads.load(Relaxed),
            outages: c.outages.load(Relaxed),
            recoveries: c.recoveries.load(Relaxed),
            skipped: c.skipped.load(Relaxed),
            probes: c.probes.load(Relaxed),
        }
    }

    /// Sends `PING` and returns the round trip, within the
    /// [`connect_timeout`](FleetConfig::connect_timeout) (a first call also
    /// connects). Use it at startup to fail early when Redis is not there; it does
    /// not change whether Redis is marked down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops the wait for the answer.
    pub async fn ping(&self) -> Result<Duration, RedisUnavailable> {
        let start = Instant::now();
        let budget = self.inner.config.connect_timeout;
        let mut conn = self.inner.conn.clone();
        self.inner.counters.calls.fetch_add(1, Relaxed);
        match tokio::time::timeout(budget, redis::cmd("PING").query_async::<String>(&mut conn))
            .await
        {
            Ok(Ok(_)) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(CallError::Failed(e).unavailable()),
            Err(_) => Err(CallError::TimedOut(budget).unavailable()),
        }
    }

    /// A number for a new semaphore permit, unique on this fleet connection.
    pub(crate) fn next_permit(&self) -> u64 {
        self.inner.permits.fetch_add(1, Relaxed)
    }

    /// The key of `kind` named `name`, for layers: `{prefix}:{kind}:{name}`.
    pub(crate) fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.inner.config.key_prefix)
    }

    /// Counts a decision made without a call because Redis is down.
    pub(crate) fn skip(&self) -> CallError {
        self.inner.counters.skipped.fetch_add(1, Relaxed);
        CallError::Down
    }

    /// Runs `script` as `cmd` (made by [`Script::cmd`]) by `EVALSHA`, loading it on
    /// `NOSCRIPT` and running it again, before `deadline`; `calls` counts the round
    /// trips for the caller. While Redis is down: [`CallError::Down`] at once.
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        cmd: &Cmd,
        deadline: Instant,
        calls: &AtomicU64,
    ) -> Result<T, CallError> {
        self.run(deadline, async |conn| {
            match self.send::<T>(conn, cmd, calls).await {
                Err(e) if is_noscript(&e) => {
                    self.load(conn, script, calls).await?;
                    self.send(conn, cmd, calls).await
                }
                out => out,
            }
        })
        .await
    }

    /// Sends `cmd` (not a script) before `deadline`.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        deadline: Instant,
        calls: &AtomicU64,
    ) -> Result<T, CallError> {
        self.run(deadline, async |conn| self.send(conn, cmd, calls).await)
            .await
    }

    /// Sends the `EVALSHA`s of `script` in `pipe` as one pipeline before `deadline`
    /// (loading the script and sending again on `NOSCRIPT`).
    pub(crate) async fn eval_pipeline<T: FromRedisValue>(
        &self,
        script: &Script,
        pipe: &redis::Pipeline,
        deadline: Instant,
        calls: &AtomicU64,
    ) -> Result<T, CallError> {
        self.run(deadline, async |conn| {
            calls.fetch_add(1, Relaxed);
            self.inner.counters.calls.fetch_add(1, Relaxed);
            match pipe.query_async::<T>(conn).await {
                Err(e) if is_noscript(&e) => {
                    self.load(conn, script, calls).await?;
                    calls.fetch_add(1, Relaxed);
                    self.inner.counters.calls.fetch_add(1, Relaxed);
                    pipe.query_async(conn).await
                }
                out => out,
            }
        })
        .await
    }

    /// Runs `op` on the connection before `deadline`, keeping the down/up state.
    async fn run<T>(
        &self,
        deadline: Instant,
        op: impl AsyncFnOnce(&mut ConnectionManager) -> Result<T, RedisError>,
    ) -> Result<T, CallError> {
        if !self.is_available() {
            return Err(self.skip());
        }
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.config.call_timeout;
        match tokio::time::timeout_at(deadline, op(&mut conn)).await {
            Ok(Ok(v)) => {
                if self.inner.failures.load(Relaxed) != 0 {
                    self.inner.failures.store(0, Relaxed);
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.inner.counters.errors.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "redis call failed");
                self.failed();
                Err(CallError::Failed(e))
            }
            Err(_) => {
                self.inner.counters.timeouts.fetch_add(1, Relaxed);
                tracing::debug!(?timeout, "redis call timed out");
                self.failed();
                Err(CallError::TimedOut(timeout))
            }
        }
    }

    async fn send<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
        cmd: &Cmd,
        calls: &AtomicU64,
    ) -> Result<T, RedisError> {
        calls.fetch_add(1, Relaxed);
        self.inner.counters.calls.fetch_add(1, Relaxed);
        cmd.query_async(conn).await
    }

    async fn load(
        &self,
        conn: &mut ConnectionManager,
        script: &Script,
        calls: &AtomicU64,
    ) -> Result<(), RedisError> {
        self.inner.counters.script_loads.fetch_add(1, Relaxed);
        tracing::debug!(sha = %script.hash, "redis: NOSCRIPT, loading the script");
        self.send::<String>(
            conn,
            redis::cmd("SCRIPT").arg("LOAD").arg(script.code),
            calls,
        )
        .await
        .map(drop)
    }

    /// Loads every script (one pipeline).
    async fn load_scripts(&self, deadline: Instant) -> Result<(), CallError> {
        let mut pipe = redis::pipe();
        for s in scripts::all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(s.code);
        }
        let mut conn = self.inner.conn.clone();
        self.inner.counters.calls.fetch_add(1, Relaxed);
        match tokio::time::timeout_at(deadline, pipe.query_async::<Vec<String>>(&mut conn)).await {
            Ok(Ok(_)) => {
                self.inner
                    .counters
                    .script_loads
                    .fetch_add(scripts::all().len() as u64, Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(CallError::Failed(e)),
            Err(_) => Err(CallError::TimedOut(self.inner.config.connect_timeout)),
        }
    }

    /// A call failed: marks Redis down after `down_after` in a row, and starts the
    /// probe.
    fn failed(&self) {
        let n = self.inner.failures.fetch_add(1, Relaxed) + 1;
        if n < self.inner.config.down_after || self.inner.down.swap(true, Relaxed) {
            return;
        }
        self.inner.counters.outages.fetch_add(1, Relaxed);
        tracing::warn!(
            failed_calls = n,
            call_timeout = ?self.inner.config.call_timeout,
            "redis unavailable: fleet limits and sessions follow their fallback until it answers again"
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(probe(Arc::downgrade(&self.inner)));
        }
    }
}

/// Probes a down Redis until it answers within the call timeout, then marks it up.
async fn probe(inner: Weak<Inner>) {
    let since = Instant::now();
    loop {
        let every = match inner.upgrade() {
            Some(i) => i.config.probe_interval,
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.counters.probes.fetch_add(1, Relaxed);
        inner.counters.calls.fetch_add(1, Relaxed);
        let mut conn = inner.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        if let Ok(Ok(_)) = tokio::time::timeout(inner.config.call_timeout, ping).await {
            inner.failures.store(0, Relaxed);
            inner.down.store(false, Relaxed);
            inner.counters.recoveries.fetch_add(1, Relaxed);
            tracing::info!(down_for = ?since.elapsed(), "redis is back: fleet limits and sessions enforced by it again");
            return;
        }
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// 64 random bits from the OS, for this instance's id.
fn instance_id() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the time and the address of a local are unique enough for
        // an id that only has to differ between live instances.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let here = &t as *const u64 as u64;
        t ^ here.rotate_left(32) ^ u64::from(std::process::id())
    })
}
