//! The stack on a fleet (the `redis` feature): its rate limits, per-key concurrency
//! limits and sticky sessions shared with the fleet's other instances through Redis,
//! by marina-redis's layers in place of the local ones.

use super::*;

use marina_limit::{Global, Keyed};
use marina_redis::{
    FleetConfig, FleetStats, Lease, RedisConcurrencyHandle, RedisConcurrencyLayer,
    RedisConcurrencyStats, RedisFleet, RedisRateHandle, RedisRateLimitLayer, RedisRateStats,
    RedisSessionStore, SessionConfig, SessionStoreStats, SharedSessionLayer, SharedSessionStats,
};
use tower::util::{Either, option_layer};

/// The name a stack's state has in Redis unless
/// [`StackBuilder::redis_name`] sets another: `"stack"`.
pub const DEFAULT_REDIS_NAME: &str = "stack";

/// The longest [`StackBuilder::redis_name`], in bytes: the layers' names add a suffix
/// to it, and marina-redis takes names of up to 64 bytes.
const MAX_NAME_LEN: usize = 48;

/// The fastest fleet rate limit marina-redis keeps: one request a microsecond.
const MAX_PER_SECOND: f64 = 1_000_000.0;

/// The builder's fleet settings.
#[derive(Clone, Default)]
pub(super) struct RedisSettings {
    fleet: Option<FleetSource>,
    lease: Lease,
    name: Option<String>,
    /// Sticky sessions kept in this instance's table even with a fleet.
    local_sessions: bool,
}

/// The fleet: opened by the caller, or to open at build.
#[derive(Clone)]
enum FleetSource {
    Open(RedisFleet),
    Config(FleetConfig),
}

/// A key extractor of the stack's requests with a name (the layers' type parameter).
type Extract<T> = Box<dyn Fn(&Request<T>) -> Option<String> + Send + Sync>;

fn extract<T: 'static>(key: &KeyFnBox<T>) -> Extract<T> {
    let f = key.0.clone();
    Box::new(move |r: &Request<T>| f(r))
}

/// The sticky table's settings as the shared store's: its idle timeout and size; its
/// local copies of pins kept up to 1 s (at most half the idle timeout).
fn session_config(table: &TableConfig) -> SessionConfig {
    SessionConfig::default()
        .idle_timeout(table.idle_timeout)
        .cache_ttl(Duration::from_secs(1).min(table.idle_timeout / 2))
        .max_cached(table.max_sessions)
}

/// A marina-redis setting out of range, at its path in a
/// [`StackConfig`](crate::StackConfig) file.
pub(crate) fn problem(e: &marina_redis::InvalidConfig) -> crate::ConfigProblem {
    let path = match e.field {
        "redis_url" => "redis.url".to_string(),
        "call_timeout" | "connect_timeout" | "probe_interval" => format!("redis.{}_ms", e.field),
        "fallback.expected_instances" | "lease.expected_instances" => {
            "redis.expected_instances".to_string()
        }
        "lease.tokens" => "redis.lease".to_string(),
        "rate_per_second" => "limits.rate_per_second".to_string(),
        "concurrency_per_key" => "limits.concurrency_per_key".to_string(),
        "idle_timeout" | "cache_ttl" | "max_cached" => "redis.sessions".to_string(),
        other => format!("redis.{other}"),
    };
    let message = match e.field {
        "idle_timeout" | "cache_ttl" | "max_cached" => {
            format!(
                "the sticky table's settings in Redis: {}: {}",
                e.field, e.message
            )
        }
        _ => e.message.clone(),
    };
    crate::ConfigProblem { path, message }
}

fn invalid(e: marina_redis::InvalidConfig) -> BoxError {
    crate::InvalidConfig(vec![problem(&e)]).into()
}

impl<T> StackBuilder<T> {
    /// Shares the stack's limits and sticky sessions with every instance on `fleet`
    /// (the `redis` feature): a service running as N instances keeps one quota, not N.
    /// The layers above the balancer become marina-redis's:
    ///
    /// | set with | alone (default) | with a fleet | its Redis keys, under the fleet's `key_prefix` |
    /// |---|---|---|---|
    /// | [`rate_limit`](Self::rate_limit) | this instance's GCRA | one quota for the fleet ([`RedisRateLimitLayer::global`]) | `rate:{name}:rate:…` |
    /// | [`rate_limit_per_key`](Self::rate_limit_per_key) | this instance's, per key | one quota per key for the fleet ([`RedisRateLimitLayer::keyed`]) | `rate:{name}:rate-per-key:…` (one per key) |
    /// | [`concurrency_per_key`](Self::concurrency_per_key) (the `i`th) | in flight here | in flight in the fleet, permits leased so a crashed instance's come back ([`RedisConcurrencyLayer`]) | `conc:{name}:conc{i}:…` (one per key) |
    /// | [`AffinityMode::Sticky`] | this instance's table | pins in Redis, any instance routes a session alike ([`SharedSessionLayer`] over a [`RedisSessionStore`]; [`redis_sessions`](Self::redis_sessions)) | `session:{name}:{session key}` |
    ///
    /// `{name}` is [`redis_name`](Self::redis_name) (default
    /// [`DEFAULT_REDIS_NAME`], `"stack"`): stacks with the same name on the same fleet
    /// share their state, whatever process they run in. [`AffinityMode::Hash`] needs
    /// no shared state (every instance hashes alike) and stays as it is; so do the
    /// bandwidth limit and everything under the balancer. The limits keep their
    /// settings ([`without_key`](Self::without_key) included); sessions keep the
    /// table's idle timeout, Redis forgetting a session idle for that long.
    ///
    /// # When Redis is down or slow
    ///
    /// Every Redis call is bounded by the fleet's
    /// [`call_timeout`](marina_redis::FleetConfig::call_timeout) (default 5 ms); past
    /// it, or while Redis is marked down, the fleet's
    /// [`fallback`](marina_redis::FleetConfig::fallback) decides at once: fail open
    /// (the default: admit), fail closed (refuse with `RedisUnavailable`), or this
    /// instance's own limits at its share of the fleet's
    /// ([`Fallback::Local`](marina_redis::Fallback::Local)). A request never waits on a
    /// dead Redis beyond the timeout. Set the policy on the fleet's
    /// [`FleetConfig`](marina_redis::FleetConfig) (or `fallback` under `[redis]` in a
    /// [`StackConfig`](crate::StackConfig)); see [`Fallback`](marina_redis::Fallback)
    /// for what each does to each layer.
    ///
    /// [`StackHandle::redis`] and [`StackStats::redis`](crate::StackStats) read the
    /// fleet's figures and each Redis layer's; the stats' `Display` prints them.
    ///
    /// # Examples
    ///
    /// Two instances (here in one process; in practice one per machine) that admit
    /// 100 requests a second between them:
    ///
    /// ```no_run
    /// use marina::Stack;
    /// use marina::limit::Rate;
    /// use marina::redis::{Fallback, FleetConfig, Lease, RedisFleet};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), marina::core::BoxError> {
    /// let fleet = RedisFleet::with_config(
    ///     FleetConfig::new("redis://10.0.0.5:6379")
    ///         .key_prefix("shop")
    ///         .fallback(Fallback::Local { expected_instances: 2 }),
    /// )?;
    /// let instance = || {
    ///     Stack::builder::<String>()
    ///         .endpoints(["10.0.0.1:7000".parse().unwrap()])
    ///         .rate_limit(Rate::per_second(100))
    ///         .redis(fleet.clone())
    ///         .redis_lease(Lease::Auto { expected_instances: 2 })
    ///         .build_line()
    /// };
    /// let (a, a_handle) = instance()?;
    /// let (b, _) = instance()?;
    /// // ... send through `a` and `b`: 100 a second between them ...
    /// println!("{}", a_handle.stats());
    /// # drop((a, b));
    /// # Ok(()) }
    /// ```
    pub fn redis(mut self, fleet: RedisFleet) -> Self {
        self.redis.fleet = Some(FleetSource::Open(fleet));
        self
    }

    /// [`redis`](Self::redis) with a fleet opened at build from `url` (a `redis://`
    /// URL) with the default settings ([`FleetConfig::new`]); the URL is checked at
    /// build, under the path `redis.url`. Stacks built this way have a connection
    /// each: to share one, open a [`RedisFleet`] and pass it to
    /// [`redis`](Self::redis).
    pub fn redis_url(self, url: impl Into<String>) -> Self {
        self.redis_config(FleetConfig::new(url))
    }

    /// [`redis`](Self::redis) with a fleet opened at build with `config` (checked at
    /// build, under `redis.*` paths: `redis.url`, `redis.key_prefix`,
    /// `redis.call_timeout_ms`, `redis.expected_instances`, …).
    pub fn redis_config(mut self, config: FleetConfig) -> Self {
        self.redis.fleet = Some(FleetSource::Config(config));
        self
    }

    /// How many cells of a fleet rate limit's quota this instance takes from Redis in
    /// one call (default [`Lease::Off`]: one call per admission), for both rate
    /// limits. `Lease::Auto { expected_instances }` keeps the fleet within ±5% of its
    /// quota over any second with a call per several requests; see [`Lease`]. Checked
    /// at build against each limit's burst, under the path `redis.lease`.
    pub fn redis_lease(mut self, lease: Lease) -> Self {
        self.redis.lease = lease;
        self
    }

    /// The name of this stack's state in Redis (default [`DEFAULT_REDIS_NAME`],
    /// `"stack"`): stacks with the same name on the same fleet (and key prefix) share
    /// their quotas, permits and sessions; give stacks that talk to different services
    /// different names. 1 to 48 bytes without whitespace (checked at build, under the
    /// path `redis.name`).
    pub fn redis_name(mut self, name: &str) -> Self {
        self.redis.name = Some(name.to_owned());
        self
    }

    /// Whether [`AffinityMode::Sticky`] sessions are kept in Redis with a fleet
    /// (default `true`: any instance routes a session to the same backend, and
    /// sessions outlive the instance that pinned them); `false` keeps them in this
    /// instance's table.
    pub fn redis_sessions(mut self, shared: bool) -> Self {
        self.redis.local_sessions = !shared;
        self
    }

    /// The problems of the fleet settings (see [`validate`](Self::validate)).
    pub(super) fn validate_redis(&self, bad: &mut impl FnMut(String, String)) {
        let r = &self.redis;
        let Some(source) = &r.fleet else {
            if r.name.is_some() || r.lease != Lease::Off || r.local_sessions {
                bad(
                    "redis".into(),
                    "redis_name, redis_lease or redis_sessions set without a fleet \
                     (StackBuilder::redis, redis_url or redis_config)"
                        .into(),
                );
            }
            return;
        };
        let mut report = |e: &marina_redis::InvalidConfig| {
            let p = problem(e);
            bad(p.path, p.message);
        };
        if let FleetSource::Config(config) = source
            && let Err(e) = config.validate()
        {
            report(&e);
        }
        let rates = [self.rate, self.rate_per_key.as_ref().map(|(_, r)| *r)];
        if let Some(e) = rates
            .iter()
            .flatten()
            .find_map(|rate| r.lease.validate(rate).err())
        {
            report(&e);
        }
        if !r.local_sessions
            && let Some(AffinityMode::Sticky(_, table)) = &self.affinity
            && let Err(e) = session_config(table).validate()
        {
            report(&e);
        }
        if let Some(name) = &r.name
            && (name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(char::is_whitespace))
        {
            bad(
                "redis.name".into(),
                format!("must be 1 to {MAX_NAME_LEN} bytes without whitespace, got {name:?}"),
            );
        }
        for (path, rate) in [
            ("limits.rate_per_second", rates[0]),
            ("rate_limit_per_key", rates[1]),
        ] {
            if let Some(rate) = rate
                && rate.per_second_f64() > MAX_PER_SECOND
            {
                bad(
                    path.into(),
                    format!(
                        "must be at most {MAX_PER_SECOND} requests/s for a fleet limit (one a \
                         microsecond, Redis's TIME resolution), got {}",
                        rate.per_second_f64()
                    ),
                );
            }
        }
    }

    /// The fleet's layers, with a fleet; opens it if it was given as settings.
    pub(super) fn fleet_layers(&self) -> Result<Option<FleetLayers<T>>, BoxError>
    where
        T: Send + Sync + 'static,
    {
        let r = &self.redis;
        let fleet = match &r.fleet {
            None => return Ok(None),
            Some(FleetSource::Open(fleet)) => fleet.clone(),
            Some(FleetSource::Config(config)) => {
                RedisFleet::with_config(config.clone()).map_err(invalid)?
            }
        };
        let name = r.name.as_deref().unwrap_or(DEFAULT_REDIS_NAME);
        let global = self
            .rate
            .map(|rate| {
                RedisRateLimitLayer::try_global(&fleet, &format!("{name}:rate"), rate)?
                    .try_lease(r.lease)
            })
            .transpose()
            .map_err(invalid)?;
        let keyed = self
            .rate_per_key
            .as_ref()
            .map(|(key, rate)| {
                RedisRateLimitLayer::try_keyed(
                    &fleet,
                    &format!("{name}:rate-per-key"),
                    extract(key),
                    *rate,
                )?
                .without_key(self.without_key)
                .try_lease(r.lease)
            })
            .transpose()
            .map_err(invalid)?;
        let concurrency = self
            .concurrency
            .iter()
            .enumerate()
            .map(|(i, (key, limit))| {
                Ok(RedisConcurrencyLayer::try_new(
                    &fleet,
                    &format!("{name}:conc{i}"),
                    extract(key),
                    *limit,
                )?
                .without_key(self.without_key))
            })
            .collect::<Result<Vec<_>, marina_redis::InvalidConfig>>()
            .map_err(invalid)?;
        let mut store = None;
        let affinity = match &self.affinity {
            Some(AffinityMode::Sticky(key, table)) if !r.local_sessions => {
                let s = RedisSessionStore::try_new(&fleet, name, session_config(table))
                    .map_err(invalid)?;
                store = Some(s.clone());
                Some(Either::Right(SharedSessionLayer::new(extract(key), s)))
            }
            Some(AffinityMode::Sticky(key, table)) => {
                Some(Either::Left(AffinityLayer::sticky(extract(key), *table)))
            }
            Some(AffinityMode::Hash(key)) => Some(Either::Left(AffinityLayer::hash(extract(key)))),
            None => None,
        };
        Ok(Some(FleetLayers {
            fleet,
            global,
            keyed,
            concurrency,
            affinity,
            store,
        }))
    }
}

/// Local affinity (hash, or a sticky table kept local), or shared sessions.
type AffinityEither<T> = Either<AffinityLayer<Extract<T>>, SharedSessionLayer<Extract<T>>>;

/// The layers a stack on a fleet puts above its balancer.
pub(super) struct FleetLayers<T> {
    fleet: RedisFleet,
    global: Option<RedisRateLimitLayer<Global>>,
    keyed: Option<RedisRateLimitLayer<Keyed<Extract<T>>>>,
    concurrency: Vec<RedisConcurrencyLayer<Extract<T>>>,
    /// Local affinity (hash, or a sticky table kept local), or shared sessions.
    affinity: Option<AffinityEither<T>>,
    store: Option<RedisSessionStore>,
}

impl<T: Clone + Send + Sync + 'static> FleetLayers<T> {
    /// The stack: the layers over `balancer`, in the stack's order (rate, per-key rate,
    /// per-key concurrency, affinity) under the shutdown guard (boxed once, there), and
    /// their handles.
    pub(super) fn layer<U, S>(
        self,
        balancer: S,
        state: Arc<ShutdownState>,
        validate: Option<ValidateFn<T>>,
    ) -> (StackService<T, U>, RedisParts)
    where
        U: Send + 'static,
        S: Service<Request<T>, Response = Response<U>, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let mut affinity = None;
        let mut sessions = None;
        match &self.affinity {
            Some(Either::Left(local)) => affinity = Some(local.handle()),
            Some(Either::Right(shared)) => {
                let shared = shared.clone();
                sessions = Some(Box::new(move || shared.stats()) as SessionStatsFn);
            }
            None => {}
        }
        let svc = option_layer(self.affinity).layer(balancer);
        // Per-key concurrency limits: any number of them (boxed when there are some).
        let concurrency: Vec<_> = self.concurrency.iter().map(|l| l.handle()).collect();
        let svc = if self.concurrency.is_empty() {
            Either::Right(svc)
        } else {
            let mut boxed: StackService<T, U> = BoxCloneSyncService::new(svc);
            for layer in self.concurrency {
                boxed = BoxCloneSyncService::new(layer.layer(boxed));
            }
            Either::Left(boxed)
        };
        let rate_per_key = self.keyed.as_ref().map(RedisRateLimitLayer::handle);
        let svc = option_layer(self.keyed).layer(svc);
        let rate = self.global.as_ref().map(RedisRateLimitLayer::handle);
        let svc = option_layer(self.global).layer(svc);
        let parts = RedisParts {
            fleet: self.fleet,
            rate,
            rate_per_key,
            concurrency,
            sessions,
            store: self.store,
            affinity,
        };
        let guarded = Guarded {
            inner: svc,
            state,
            validate,
        };
        (BoxCloneSyncService::new(guarded), parts)
    }
}

type SessionStatsFn = Box<dyn Fn() -> SharedSessionStats + Send + Sync>;

/// A stack's fleet and its Redis layers' handles, kept by its [`StackHandle`].
pub(super) struct RedisParts {
    fleet: RedisFleet,
    rate: Option<RedisRateHandle>,
    rate_per_key: Option<RedisRateHandle>,
    concurrency: Vec<RedisConcurrencyHandle>,
    sessions: Option<SessionStatsFn>,
    store: Option<RedisSessionStore>,
    /// The local affinity layer's handle (hash affinity, or a sticky table kept local).
    pub(super) affinity: Option<AffinityHandle>,
}

impl RedisParts {
    pub(super) fn stats(&self) -> RedisStackStats {
        RedisStackStats {
            fleet: self.fleet.stats(),
            rate: self.rate.as_ref().map(RedisRateHandle::stats),
            rate_per_key: self.rate_per_key.as_ref().map(RedisRateHandle::stats),
            concurrency: self
                .concurrency
                .iter()
                .map(RedisConcurrencyHandle::stats)
                .collect(),
            sessions: self.sessions.as_ref().map(|f| f()),
            session_store: self.store.as_ref().map(RedisSessionStore::stats),
        }
    }
}

/// A stack's fleet figures on this instance, in [`StackStats::redis`](crate::StackStats)
/// (with [`StackBuilder::redis`]); `Display` prints them as lines of the stack's table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisStackStats {
    /// The fleet's connection: whether Redis is up, calls, timeouts, outages (every
    /// stack and layer on the same [`RedisFleet`] together).
    pub fleet: FleetStats,
    /// The fleet-wide global rate limit ([`StackBuilder::rate_limit`]).
    pub rate: Option<RedisRateStats>,
    /// The fleet-wide per-key rate limit ([`StackBuilder::rate_limit_per_key`]).
    pub rate_per_key: Option<RedisRateStats>,
    /// The fleet-wide per-key concurrency limits, in the order they were added.
    pub concurrency: Vec<RedisConcurrencyStats>,
    /// Sticky sessions shared through Redis: created and re-pinned here.
    pub sessions: Option<SharedSessionStats>,
    /// Their store: lookups, cache hits, Redis calls, pins.
    pub session_store: Option<SessionStoreStats>,
}

impl fmt::Display for RedisStackStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.fleet;
        writeln!(
            f,
            "redis: {}, {} calls ({} timed out, {} failed), {} outages, {} decided without a call",
            if s.available { "up" } else { "down" },
            s.calls,
            s.timeouts,
            s.errors,
            s.outages,
            s.skipped
        )?;
        for (what, r) in [
            ("fleet rate limit", &self.rate),
            ("fleet per-key rate limit", &self.rate_per_key),
        ] {
            if let Some(r) = r {
                writeln!(
                    f,
                    "{what}: {} admitted here, {} refused, limit {:.0}/s for the fleet (burst {}), \
                     lease {}, {:.2} redis calls a request, {} by the fallback",
                    r.admitted,
                    r.rejected,
                    r.limit_per_second,
                    r.burst,
                    r.lease_size,
                    r.calls_per_request(),
                    r.fallback
                )?;
            }
        }
        for c in &self.concurrency {
            writeln!(
                f,
                "fleet per-key concurrency (limit {}): {} in flight here, {} admitted, {} refused, \
                 {} by the fallback",
                c.limit, c.in_flight, c.admitted, c.rejected, c.fallback
            )?;
        }
        if let (Some(s), Some(st)) = (&self.sessions, &self.session_store) {
            writeln!(
                f,
                "fleet sessions: {} created here, {} re-pinned, {} lookups ({} from the cache), \
                 {} adopted from another instance",
                s.created, s.repinned, st.lookups, st.cache_hits, st.adopted
            )?;
        }
        Ok(())
    }
}

impl StackHandle {
    /// The stack's fleet figures, with [`StackBuilder::redis`]: the fleet's
    /// connection ([`FleetStats`]: up or down, calls, timeouts, outages) and each Redis
    /// layer's (admitted, refused, Redis calls a request, fallback decisions); `None`
    /// without a fleet. Also in [`stats`](Self::stats).
    pub fn redis(&self) -> Option<RedisStackStats> {
        self.inner.redis.as_ref().map(RedisParts::stats)
    }

    /// The fleet the stack's limits and sessions are shared through, with
    /// [`StackBuilder::redis`] (or opened from its settings): to
    /// [`ping`](RedisFleet::ping) it, or to build more layers on it.
    pub fn redis_fleet(&self) -> Option<&RedisFleet> {
        self.inner.redis.as_ref().map(|r| &r.fleet)
    }
}
