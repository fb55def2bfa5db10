//! `StackConfig`: the stack from a file (TOML), validated with paths.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use marina_balance::{
    ConsistentHash, Failover, LeastConnections, LeastResponseTime, PowerOfTwoChoices, Random,
    RoundRobin, WeightedRoundRobin,
};
use marina_health::HealthConfig;
use marina_limit::Rate;
use marina_pool::Config;
use serde::Deserialize;

use crate::{ConfigProblem, InvalidConfig, StackBuilder};

/// The stack's settings as a file holds them. Every table and key is optional except
/// `endpoints`; unknown keys are errors (a typo must not silently fall back to a
/// default).
///
/// ```
/// use marina::{Stack, StackConfig};
///
/// let config = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
///     picker = "p2c"
///
///     [pool]
///     min_idle = 1
///     max_size = 16
///     acquire_timeout_ms = 2000
///
///     [health]
///     consecutive_failures = 3
///
///     [limits]
///     rate_per_second = 5000
/// "#).unwrap();
/// assert!(config.validate().is_empty());
/// let builder = Stack::from_config::<String>(&config).unwrap();
/// # drop(builder);
///
/// let bad = StackConfig::from_toml("endpoints = []\n[pool]\nmin_idle = 9\nmax_size = 2\n").unwrap();
/// let problems = bad.validate();
/// assert!(problems.iter().any(|p| p.path == "endpoints"));
/// assert!(problems.iter().any(|p| p.path == "pool.min_idle"));
///
/// let typo = StackConfig::from_toml("endpoints = [\"127.0.0.1:1\"]\n[pool]\nmax_szie = 2\n");
/// assert!(typo.unwrap_err().to_string().contains("max_szie"));
/// ```
///
/// # Many backends
///
/// Least connections and least response time scan every backend for each request up
/// to 16 backends, and above compare two random ones (power of two choices, O(1) per
/// request, as Envoy does); weighted round robin is nginx's smooth sequence up to 16
/// backends and an earliest-deadline-first schedule (O(log N)) above. The `picker_*`
/// keys move the thresholds or pin one mode; each applies to its pickers only (set for
/// another picker, it is a problem at its key). Idle connections are opened ahead of
/// traffic within `warm_connections` across all backends.
///
/// ```
/// use marina::StackConfig;
///
/// let config = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
///     picker = "least_connections"
///     picker_exact_up_to = 64    # full scan up to 64 backends (default 16)
///     picker_choice_count = 3    # then the least loaded of 3 random ones (default 2)
///     warm_connections = 128     # idle connections ahead of traffic, all backends
/// "#).unwrap();
/// assert!(config.validate().is_empty());
///
/// // The exact choice at any size (O(N) per request), or nginx's exact sequence.
/// let exact = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001"]
///     picker = "least_response_time"
///     picker_exact = true
/// "#).unwrap();
/// assert!(exact.validate().is_empty());
/// let smooth = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001"]
///     picker = "weighted_round_robin"
///     picker_smooth = true       # or picker_smooth_up_to = 100
/// "#).unwrap();
/// assert!(smooth.validate().is_empty());
///
/// let wrong = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001"]
///     picker = "round_robin"
///     picker_choice_count = 3
/// "#).unwrap();
/// assert_eq!(wrong.validate()[0].path, "picker_choice_count");
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// Backend addresses, `host:port` (IP addresses: no DNS here).
    pub endpoints: Vec<String>,
    /// `round_robin` (default), `weighted_round_robin`, `least_connections`,
    /// `least_response_time`, `random`, `p2c`, `consistent_hash`.
    pub picker: Option<String>,
    /// `least_connections` and `least_response_time` only: `true` scans every backend
    /// for each request whatever their number (the exact least loaded; O(N) per
    /// request), `false` always compares [`picker_choice_count`](Self::picker_choice_count)
    /// random ones (O(1)). Unset: [`picker_exact_up_to`](Self::picker_exact_up_to)
    /// decides. See [`LeastConnections::exact`].
    pub picker_exact: Option<bool>,
    /// `least_connections` and `least_response_time` only: scan every backend while
    /// there are at most this many, and above compare `picker_choice_count` random
    /// ones, Envoy's power of two choices (default 16; 0: always sample). See
    /// [`LeastConnections::exact_up_to`].
    pub picker_exact_up_to: Option<usize>,
    /// `least_connections` and `least_response_time` only: how many random backends a
    /// request compares when it does not scan them all (Envoy's `choice_count`; default
    /// 2, at most 16). See [`LeastConnections::choice_count`].
    pub picker_choice_count: Option<usize>,
    /// `weighted_round_robin` only: `true` keeps nginx's smooth sequence (exact over
    /// every window of Σweights requests; O(N) per request) whatever the number of
    /// backends, `false` always uses the earliest-deadline-first schedule (O(log N)).
    /// Unset: [`picker_smooth_up_to`](Self::picker_smooth_up_to) decides. See
    /// [`WeightedRoundRobin::smooth`].
    pub picker_smooth: Option<bool>,
    /// `weighted_round_robin` only: the smooth sequence while there are at most this
    /// many backends, the earliest-deadline-first schedule above (default 16; 0: always
    /// the schedule). See [`WeightedRoundRobin::smooth_up_to`].
    pub picker_smooth_up_to: Option<usize>,
    /// TCP connect timeout, ms (default 5000).
    pub connect_timeout_ms: Option<u64>,
    /// Each attempt's timeout, ms (default 15,000: see
    /// [`StackBuilder::request_timeout`]; above 0).
    pub request_timeout_ms: Option<u64>,
    /// One deadline for a request's attempts together, ms (default none; above 0).
    pub deadline_ms: Option<u64>,
    /// Hedge idempotent requests after this long, ms (default off; needs failover).
    pub hedge_ms: Option<u64>,
    /// Slow start window for backends that come back or are added, ms (default off).
    pub slow_start_ms: Option<u64>,
    /// Idle connections kept open ahead of traffic across all backends together
    /// (default [`DEFAULT_WARM_BUDGET`](crate::DEFAULT_WARM_BUDGET), 64): each
    /// backend's pool keeps `min(pool.min_idle, warm_connections / backends)` open, so
    /// a large set opens its connections on first use instead of `backends ×
    /// min_idle` at start-up. 0: none ahead of traffic; at least `backends ×
    /// pool.min_idle`: `min_idle` on every backend. See
    /// [`StackBuilder::warm_connections`].
    pub warm_connections: Option<usize>,
    /// Fail fast after nothing is ready for this long, ms (default 10000).
    pub failfast_timeout_ms: Option<u64>,
    /// Each backend's pool.
    #[serde(default)]
    pub pool: PoolSection,
    /// Passive health checks (on by default; `enabled = false` turns them off).
    #[serde(default)]
    pub health: HealthSection,
    /// Failover for requests not sent.
    #[serde(default)]
    pub failover: FailoverSection,
    /// Rate and bandwidth limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// TLS to every backend (marina's `tls` feature); absent: plain TCP. See
    /// [`TlsSection`].
    pub tls: Option<TlsSection>,
    /// The limits and sticky sessions shared by a fleet of instances through Redis
    /// (the `redis` feature); absent: each instance has its own. See [`RedisSection`].
    #[cfg(feature = "redis")]
    pub redis: Option<RedisSection>,
}

/// `[pool]`: starts from a preset, then overrides.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// `balanced` (default), `high_throughput`, `low_latency`, `resource_constrained`.
    pub preset: Option<String>,
    /// Idle connections kept ready.
    pub min_idle: Option<usize>,
    /// The most connections per backend.
    pub max_size: Option<usize>,
    /// How long a checkout may wait, ms.
    pub acquire_timeout_ms: Option<u64>,
    /// Idle connections older than this close, ms.
    pub idle_timeout_ms: Option<u64>,
    /// Connections older than this close, ms.
    pub max_lifetime_ms: Option<u64>,
}

/// `[health]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// Passive checks on (default true).
    pub enabled: Option<bool>,
    /// Consecutive failures that eject.
    pub consecutive_failures: Option<u32>,
    /// First ejection, ms.
    pub base_ejection_ms: Option<u64>,
    /// Longest ejection, ms.
    pub max_ejection_ms: Option<u64>,
    /// Below this share of healthy endpoints, route to all (default 0.5).
    pub panic_threshold: Option<f64>,
}

/// `[failover]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    /// On by default.
    pub enabled: Option<bool>,
    /// Attempts in all (default 3).
    pub max_attempts: Option<u32>,
    /// Requests are idempotent: retry any error, not only "not sent" ones.
    pub idempotent: Option<bool>,
}

/// `[limits]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// A global rate limit, requests per second.
    pub rate_per_second: Option<u32>,
    /// Its burst (default: one second's worth).
    pub burst: Option<u32>,
    /// All connections together write at most this, bytes per second.
    pub bandwidth_bytes_per_sec: Option<f64>,
    /// The bandwidth burst, bytes (default 64 KiB).
    pub bandwidth_burst: Option<u64>,
}

/// `[tls]`: connect to every backend over TLS (marina's `tls` feature). The table's
/// presence turns TLS on, even empty; problems are reported under `tls.*` paths.
///
/// ```toml
/// [tls]
/// server_name = "echo.internal"  # what the backends' certificates name (default: their IP)
/// ca_file = "/etc/marina/ca.pem" # the CAs to trust (default: the system's roots)
/// alpn = ["h2", "http/1.1"]      # protocols offered (default: none)
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The name every backend's certificate must carry, a DNS name or an IP address
    /// (default: each backend's IP address, which its certificate must then list).
    pub server_name: Option<String>,
    /// A PEM file of the CA certificates to trust. Unset: the system's roots, with
    /// marina's `tls-native-roots` feature (without it, `ca_file` is required).
    pub ca_file: Option<std::path::PathBuf>,
    /// Protocols offered by ALPN, most preferred first (each 1 to 255 bytes; default
    /// none).
    pub alpn: Option<Vec<String>>,
}

impl TlsSection {
    /// Every problem with these settings (the CA file is read).
    fn validate(&self, bad: &mut impl FnMut(String, String)) {
        #[cfg(not(feature = "tls"))]
        bad(
            "tls".into(),
            "this build has no TLS: turn on marina's `tls` feature".into(),
        );
        #[cfg(feature = "tls")]
        {
            if let Err(p) = self.roots() {
                bad(p.path, p.message);
            }
            if let Some(name) = &self.server_name
                && marina_pool::tls::rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                bad(
                    "tls.server_name".into(),
                    format!("{name:?} is neither a DNS name nor an IP address"),
                );
            }
        }
        for (i, p) in self.alpn.iter().flatten().enumerate() {
            if p.is_empty() || p.len() > 255 {
                bad(
                    format!("tls.alpn[{i}]"),
                    format!("a protocol name is 1 to 255 bytes, got {}", p.len()),
                );
            }
        }
    }

    /// The trusted roots: the CA file's, or the system's.
    #[cfg(feature = "tls")]
    fn roots(&self) -> Result<marina_pool::tls::TlsConfig, ConfigProblem> {
        let problem = |message: String| ConfigProblem {
            path: "tls.ca_file".into(),
            message,
        };
        match &self.ca_file {
            Some(path) => {
                marina_pool::tls::TlsConfig::from_ca_file(path).map_err(|e| problem(e.to_string()))
            }
            #[cfg(feature = "tls-native-roots")]
            None => marina_pool::tls::TlsConfig::native_roots().map_err(|e| {
                problem(format!(
                    "not set, and the system's roots cannot be used: {e}"
                ))
            }),
            #[cfg(not(feature = "tls-native-roots"))]
            None => Err(problem(
                "required: this build has no system roots (marina's `tls-native-roots` feature)"
                    .into(),
            )),
        }
    }

    /// The settings for [`StackBuilder::tls`](crate::StackBuilder::tls).
    #[cfg(feature = "tls")]
    fn tls_config(&self) -> Result<marina_pool::tls::TlsConfig, InvalidConfig> {
        let mut problems = Vec::new();
        self.validate(&mut |path, message| problems.push(ConfigProblem { path, message }));
        if !problems.is_empty() {
            return Err(InvalidConfig(problems));
        }
        let invalid = |p: ConfigProblem| InvalidConfig(vec![p]);
        let mut tls = self.roots().map_err(invalid)?;
        if let Some(name) = &self.server_name {
            tls = tls.server_name(name).map_err(|e| {
                invalid(ConfigProblem {
                    path: "tls.server_name".into(),
                    message: e.to_string(),
                })
            })?;
        }
        if let Some(alpn) = &self.alpn {
            tls = tls.alpn(alpn);
        }
        Ok(tls)
    }
}

/// `[redis]`: the stack's limits and sticky sessions shared by every instance of a
/// fleet through Redis (the `redis` feature; see
/// [`StackBuilder::redis`](crate::StackBuilder::redis) for what changes). Only `url` is
/// needed; problems are reported under `redis.*` paths.
///
/// ```
/// use marina::{Stack, StackConfig};
///
/// let config = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
///
///     [limits]
///     rate_per_second = 200       # for the whole fleet, not per instance
///
///     [redis]
///     url = "redis://127.0.0.1:6379"
///     key_prefix = "shop"         # every key under shop:… (default "marina")
///     name = "checkout"           # stacks with the same name share their state (default "stack")
///     call_timeout_ms = 3         # the longest a request waits on Redis (default 5)
///     fallback = "local"          # Redis down or slow: "open" (default), "closed", "local"
///     expected_instances = 3      # "local": each enforces a third; lease = "auto": sized for 3
///     lease = "auto"              # "off" (default), "auto", or cells per Redis call
///     sessions = true             # sticky sessions in Redis (default true)
/// "#).unwrap();
/// assert!(config.validate().is_empty());
/// # drop(Stack::from_config::<String>(&config).unwrap());
///
/// let bad = StackConfig::from_toml(r#"
///     endpoints = ["127.0.0.1:7001"]
///     [redis]
///     url = "http://127.0.0.1"
///     fallback = "local"
///     lease = "sometimes"
/// "#).unwrap();
/// let paths: Vec<_> = bad.validate().into_iter().map(|p| p.path).collect();
/// assert_eq!(paths, ["redis.url", "redis.expected_instances", "redis.lease"]);
/// ```
#[cfg(feature = "redis")]
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// The Redis server, `redis://[user:password@]host[:port][/db]`. Needed.
    pub url: Option<String>,
    /// Prepended to every key (default `marina`): 1 to 64 bytes, no whitespace.
    pub key_prefix: Option<String>,
    /// The name of this stack's state in Redis (default `stack`; 1 to 48 bytes, no
    /// whitespace): stacks with the same name and prefix share quotas and sessions.
    pub name: Option<String>,
    /// The longest one Redis decision may take, ms (default 5; at most 10,000): past
    /// it, the fallback decides.
    pub call_timeout_ms: Option<u64>,
    /// What happens while Redis is down or slow: `open` (default: admit), `closed`
    /// (refuse), `local` (each instance enforces its share, the limits ÷
    /// `expected_instances`). See [`Fallback`](marina_redis::Fallback).
    pub fallback: Option<String>,
    /// How many instances share the limits: needed by `fallback = "local"` and
    /// `lease = "auto"`, and only there. At least 1.
    pub expected_instances: Option<u32>,
    /// Cells of a rate quota taken per Redis call: `"off"` (default: a call per
    /// admission), `"auto"` (sized to keep the fleet within ±5% of its quota), or a
    /// number from 1 to the burst. See [`Lease`](marina_redis::Lease).
    pub lease: Option<RedisLease>,
    /// Sticky sessions (set in code with `AffinityMode::Sticky`) kept in Redis
    /// (default `true`); `false`: in each instance's table.
    pub sessions: Option<bool>,
}

/// `lease` under `[redis]`: a word or a number of cells.
#[cfg(feature = "redis")]
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RedisLease {
    /// `"off"` or `"auto"`.
    Mode(String),
    /// Cells per Redis call.
    Cells(u32),
}

#[cfg(feature = "redis")]
impl RedisSection {
    const FALLBACKS: &[&str] = &["open", "closed", "local"];

    /// The problems of the section; `rate` is `[limits]`'s rate, if any.
    fn validate(&self, rate: Option<Rate>, bad: &mut impl FnMut(String, String)) {
        let report = |bad: &mut dyn FnMut(String, String), e: &marina_redis::InvalidConfig| {
            let p = crate::stack::redis_problem(e);
            bad(p.path, p.message);
        };
        if self.url.is_none() {
            bad(
                "redis.url".into(),
                "is needed: the Redis server, redis://host:port".into(),
            );
        }
        if let Err(e) = self.fleet_config().validate()
            && (self.url.is_some() || e.field != "redis_url")
        {
            report(bad, &e);
        }
        let fallback = self.fallback.as_deref().unwrap_or("open");
        let auto = self.lease == Some(RedisLease::Mode("auto".into()));
        if !Self::FALLBACKS.contains(&fallback) {
            bad(
                "redis.fallback".into(),
                format!(
                    "unknown fallback {fallback:?}; one of {:?}",
                    Self::FALLBACKS
                ),
            );
        }
        match self.expected_instances {
            None if fallback == "local" || auto => bad(
                "redis.expected_instances".into(),
                "is needed by fallback = \"local\" and lease = \"auto\" (how many instances share the limits)"
                    .into(),
            ),
            Some(_) if fallback != "local" && !auto => bad(
                "redis.expected_instances".into(),
                "applies to fallback = \"local\" and lease = \"auto\" only".into(),
            ),
            Some(0) => bad(
                "redis.expected_instances".into(),
                "must be above 0, got 0".into(),
            ),
            _ => {}
        }
        match &self.lease {
            Some(RedisLease::Mode(m)) if m != "off" && m != "auto" => bad(
                "redis.lease".into(),
                format!("unknown lease {m:?}; \"off\", \"auto\" or a number of cells"),
            ),
            Some(RedisLease::Cells(0)) => {
                bad("redis.lease".into(), "must be at least 1, got 0".into())
            }
            Some(RedisLease::Cells(_)) => {
                if let Some(rate) = rate
                    && let Err(e) = self.lease_setting().validate(&rate)
                {
                    report(bad, &e);
                }
            }
            _ => {}
        }
        if let Some(name) = &self.name
            && (name.is_empty() || name.len() > 48 || name.contains(char::is_whitespace))
        {
            bad(
                "redis.name".into(),
                format!("must be 1 to 48 bytes without whitespace, got {name:?}"),
            );
        }
    }

    /// The fleet's settings (the section validated: its fallback and lease known).
    fn fleet_config(&self) -> marina_redis::FleetConfig {
        let mut c = marina_redis::FleetConfig::new(self.url.clone().unwrap_or_default());
        if let Some(p) = &self.key_prefix {
            c = c.key_prefix(p.clone());
        }
        if let Some(ms) = self.call_timeout_ms {
            c = c.call_timeout(Duration::from_millis(ms));
        }
        c.fallback(match self.fallback.as_deref() {
            Some("closed") => marina_redis::Fallback::FailClosed,
            Some("local") => marina_redis::Fallback::Local {
                expected_instances: self.expected_instances.unwrap_or(1).max(1),
            },
            _ => marina_redis::Fallback::FailOpen,
        })
    }

    fn lease_setting(&self) -> marina_redis::Lease {
        match &self.lease {
            Some(RedisLease::Cells(n)) => marina_redis::Lease::Tokens(*n),
            Some(RedisLease::Mode(m)) if m == "auto" => marina_redis::Lease::Auto {
                expected_instances: self.expected_instances.unwrap_or(1).max(1),
            },
            _ => marina_redis::Lease::Off,
        }
    }

    /// `b` on this fleet (opened at build).
    fn apply<T>(&self, mut b: StackBuilder<T>) -> StackBuilder<T> {
        b = b
            .redis_config(self.fleet_config())
            .redis_lease(self.lease_setting())
            .redis_sessions(self.sessions.unwrap_or(true));
        if let Some(name) = &self.name {
            b = b.redis_name(name);
        }
        b
    }
}

/// A file that is not valid TOML for a [`StackConfig`] (its message names the key and
/// line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSyntax(pub String);

impl fmt::Display for ConfigSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stack configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigSyntax {}

const PICKERS: &[&str] = &[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "least_response_time",
    "random",
    "p2c",
    "consistent_hash",
];

/// The pickers `picker_exact`, `picker_exact_up_to` and `picker_choice_count` apply to.
const LEAST_PICKERS: &[&str] = &["least_connections", "least_response_time"];

/// The picker `picker_smooth` and `picker_smooth_up_to` apply to.
const WEIGHTED_PICKERS: &[&str] = &["weighted_round_robin"];

const PRESETS: &[&str] = &[
    "balanced",
    "high_throughput",
    "low_latency",
    "resource_constrained",
];

impl StackConfig {
    /// Parses TOML (unknown keys are errors).
    pub fn from_toml(text: &str) -> Result<Self, ConfigSyntax> {
        toml::from_str(text).map_err(|e| ConfigSyntax(e.to_string()))
    }

    /// Every problem, each with its path; empty when the configuration can build a
    /// stack.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |path: String, message: String| out.push(ConfigProblem { path, message });
        if self.endpoints.is_empty() {
            bad(
                "endpoints".into(),
                "at least one backend address is needed".into(),
            );
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.parse::<SocketAddr>().is_err() {
                bad(
                    format!("endpoints[{i}]"),
                    format!("{e:?} is not an ip:port address"),
                );
            }
        }
        if let Some(p) = &self.picker
            && !PICKERS.contains(&p.as_str())
        {
            bad(
                "picker".into(),
                format!("unknown picker {p:?}; one of {PICKERS:?}"),
            );
        }
        self.validate_picker_options(&mut bad);
        if self.connect_timeout_ms == Some(0) {
            bad("connect_timeout_ms".into(), "must be above 0".into());
        }
        for (key, v) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("deadline_ms", self.deadline_ms),
            ("hedge_ms", self.hedge_ms),
            ("slow_start_ms", self.slow_start_ms),
        ] {
            if v == Some(0) {
                bad(key.into(), "must be above 0".into());
            }
        }
        if self.hedge_ms.is_some() && self.failover.enabled == Some(false) {
            bad(
                "hedge_ms".into(),
                "hedging needs failover on (a hedge is a second attempt)".into(),
            );
        }
        if let Some(p) = &self.pool.preset
            && !PRESETS.contains(&p.as_str())
        {
            bad(
                "pool.preset".into(),
                format!("unknown preset {p:?}; one of {PRESETS:?}"),
            );
        }
        for problem in self.pool_config().validate().errors {
            // The file's key for the pool field at fault.
            let key = match problem.field {
                "acquire_timeout" | "idle_timeout" | "max_lifetime" => {
                    format!("{}_ms", problem.field)
                }
                other => other.to_string(),
            };
            bad(format!("pool.{key}"), problem.message);
        }
        if let Some(t) = self.health.panic_threshold
            && !(0.0..=1.0).contains(&t)
        {
            bad(
                "health.panic_threshold".into(),
                format!("must be within 0.0..=1.0 (a share, not a percentage), got {t}"),
            );
        }
        if let Some(Err(invalid)) = self.health_config().as_ref().map(HealthConfig::validate) {
            for p in invalid.problems {
                let path = match p.path.as_str() {
                    "base_ejection" | "max_ejection" => format!("health.{}_ms", p.path),
                    other => format!("health.{other}"),
                };
                bad(path, p.message);
            }
        }
        if self.failover.max_attempts == Some(0) {
            bad("failover.max_attempts".into(), "must be at least 1".into());
        }
        if let Some(r) = self.limits.rate_per_second
            && let Err(e) = Rate::try_per_second(r)
        {
            bad(format!("limits.{}", e.field), e.message);
        }
        if let Some(b) = self.limits.burst
            && let Err(e) = Rate::per_second(1).try_burst(b)
        {
            bad(format!("limits.{}", e.field), e.message);
        }
        if self.limits.burst.is_some() && self.limits.rate_per_second.is_none() {
            bad(
                "limits.burst".into(),
                "set without limits.rate_per_second".into(),
            );
        }
        if let Some(b) = self.limits.bandwidth_bytes_per_sec
            && let Err(e) = marina_limit::Bucket::try_new(b, 1)
        {
            bad(format!("limits.{}", e.field), e.message);
        }
        if self.limits.bandwidth_burst == Some(0) {
            bad(
                "limits.bandwidth_burst".into(),
                "must be above 0, got 0".into(),
            );
        }
        #[cfg(feature = "redis")]
        if let Some(r) = &self.redis {
            let rate = self.limits.rate_per_second.map(|r| {
                let rate = Rate::per_second(r);
                self.limits.burst.map_or(rate, |b| rate.burst(b))
            });
            r.validate(rate, &mut bad);
        }
        if let Some(t) = &self.tls {
            t.validate(&mut bad);
        }
        let mut seen = std::collections::HashMap::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Ok(addr) = e.parse::<SocketAddr>()
                && let Some(j) = seen.insert(addr, i)
            {
                bad(
                    format!("endpoints[{i}]"),
                    format!("{addr} is listed twice (as endpoints[{j}] too)"),
                );
            }
        }
        out
    }

    /// The problems of the picker's options: each set for the picker it applies to,
    /// within range, and not set twice over.
    fn validate_picker_options(&self, bad: &mut impl FnMut(String, String)) {
        let picker = self.picker.as_deref().unwrap_or("round_robin");
        let keys = [
            ("picker_exact", self.picker_exact.is_some(), LEAST_PICKERS),
            (
                "picker_exact_up_to",
                self.picker_exact_up_to.is_some(),
                LEAST_PICKERS,
            ),
            (
                "picker_choice_count",
                self.picker_choice_count.is_some(),
                LEAST_PICKERS,
            ),
            (
                "picker_smooth",
                self.picker_smooth.is_some(),
                WEIGHTED_PICKERS,
            ),
            (
                "picker_smooth_up_to",
                self.picker_smooth_up_to.is_some(),
                WEIGHTED_PICKERS,
            ),
        ];
        for (key, set, pickers) in keys {
            // An unknown picker is reported as such; its options are not judged.
            if set && PICKERS.contains(&picker) && !pickers.contains(&picker) {
                bad(
                    key.into(),
                    format!("applies to picker {pickers:?} only, not {picker:?}"),
                );
            }
        }
        let max = LeastConnections::MAX_CHOICE_COUNT;
        if let Some(c) = self.picker_choice_count
            && !(2..=max).contains(&c)
        {
            bad(
                "picker_choice_count".into(),
                format!("must be within 2..={max} (random backends compared per request), got {c}"),
            );
        }
        if self.picker_exact.is_some() && self.picker_exact_up_to.is_some() {
            bad(
                "picker_exact_up_to".into(),
                "set with picker_exact: give one (picker_exact = true scans at any size, false never)"
                    .into(),
            );
        }
        if self.picker_exact == Some(true) && self.picker_choice_count.is_some() {
            bad(
                "picker_choice_count".into(),
                "has no effect with picker_exact = true (every request scans all backends)".into(),
            );
        }
        if self.picker_smooth.is_some() && self.picker_smooth_up_to.is_some() {
            bad(
                "picker_smooth_up_to".into(),
                "set with picker_smooth: give one (picker_smooth = true is smooth at any size, false never)"
                    .into(),
            );
        }
    }

    /// The picker's options as the file sets them.
    fn picker_options(&self) -> PickerOptions {
        PickerOptions {
            exact_up_to: match self.picker_exact {
                Some(true) => Some(usize::MAX),
                Some(false) => Some(0),
                None => self.picker_exact_up_to,
            },
            choice_count: self.picker_choice_count,
            smooth_up_to: match self.picker_smooth {
                Some(true) => Some(usize::MAX),
                Some(false) => Some(0),
                None => self.picker_smooth_up_to,
            },
        }
    }

    /// The passive health checks the file sets (`None`: turned off).
    fn health_config(&self) -> Option<HealthConfig> {
        let h = &self.health;
        if h.enabled == Some(false) {
            return None;
        }
        let d = HealthConfig::default();
        Some(HealthConfig {
            consecutive_failures: h.consecutive_failures.unwrap_or(d.consecutive_failures),
            base_ejection: h
                .base_ejection_ms
                .map_or(d.base_ejection, Duration::from_millis),
            max_ejection: h
                .max_ejection_ms
                .map_or(d.max_ejection, Duration::from_millis),
            ..d
        })
    }

    fn pool_config(&self) -> Config {
        let p = &self.pool;
        let mut c = match p.preset.as_deref() {
            Some("high_throughput") => Config::high_throughput(),
            Some("low_latency") => Config::low_latency(),
            Some("resource_constrained") => Config::resource_constrained(),
            _ => Config::balanced(),
        };
        if let Some(v) = p.min_idle {
            c.min_idle = v;
        }
        if let Some(v) = p.max_size {
            c.max_size = v;
            // A preset's min_idle never exceeds a max_size set alone.
            if p.min_idle.is_none() {
                c.min_idle = c.min_idle.min(v);
            }
        }
        if let Some(v) = p.acquire_timeout_ms {
            c.acquire_timeout = Some(Duration::from_millis(v));
        }
        if let Some(v) = p.idle_timeout_ms {
            c.idle_timeout = Some(Duration::from_millis(v));
        }
        if let Some(v) = p.max_lifetime_ms {
            c.max_lifetime = Some(Duration::from_millis(v));
        }
        c
    }

    /// A [`StackBuilder`] with these settings (add affinity and keyed limits in code:
    /// their key extractors are functions).
    pub fn builder<T>(&self) -> Result<StackBuilder<T>, InvalidConfig>
    where
        T: crate::StackRequest,
    {
        let problems = self.validate();
        if !problems.is_empty() {
            return Err(InvalidConfig(problems));
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| e.parse::<SocketAddr>().expect("validated"));
        let mut b = crate::Stack::builder::<T>()
            .endpoints(endpoints)
            .pool(self.pool_config())
            .connect_timeout(Duration::from_millis(
                self.connect_timeout_ms.unwrap_or(5000),
            ))
            .failfast_timeout(Duration::from_millis(
                self.failfast_timeout_ms.unwrap_or(10_000),
            ))
            .request_timeout(
                self.request_timeout_ms
                    .map_or(crate::DEFAULT_REQUEST_TIMEOUT, Duration::from_millis),
            )
            .deadline(self.deadline_ms.map(Duration::from_millis))
            .hedge(self.hedge_ms.map(Duration::from_millis))
            .slow_start(self.slow_start_ms.map(Duration::from_millis))
            .warm_connections(self.warm_connections.unwrap_or(crate::DEFAULT_WARM_BUDGET));
        let options = self.picker_options();
        b = match self.picker.as_deref().unwrap_or("round_robin") {
            "weighted_round_robin" => b.picker(move || options.weighted_round_robin()),
            "least_connections" => b.picker(move || options.least_connections()),
            "least_response_time" => b.picker(move || options.least_response_time()),
            "random" => b.picker(Random::new),
            "p2c" => b.picker(PowerOfTwoChoices::new),
            "consistent_hash" => b.picker(ConsistentHash::new),
            _ => b.picker(RoundRobin::new),
        };
        let h = &self.health;
        b = b.health(self.health_config());
        if let Some(t) = h.panic_threshold {
            b = b.panic_threshold(t);
        }
        let f = &self.failover;
        b = if f.enabled == Some(false) {
            b.failover(None)
        } else {
            let mut failover = Failover::new().max_attempts(f.max_attempts.unwrap_or(3));
            if f.idempotent == Some(true) {
                failover = failover.retry_if(|_| true);
            }
            b.failover(Some(failover))
        };
        let l = &self.limits;
        if let Some(r) = l.rate_per_second {
            let mut rate = Rate::per_second(r);
            if let Some(burst) = l.burst {
                rate = rate.burst(burst);
            }
            b = b.rate_limit(rate);
        }
        if let Some(bw) = l.bandwidth_bytes_per_sec {
            b = b.bandwidth(bw, l.bandwidth_burst.unwrap_or(64 * 1024));
        }
        #[cfg(feature = "redis")]
        if let Some(r) = &self.redis {
            b = r.apply(b);
        }
        #[cfg(feature = "tls")]
        if let Some(t) = &self.tls {
            b = b.tls(t.tls_config()?);
        }
        Ok(b)
    }
}

/// The options of the file's picker (`None`: the picker's default).
#[derive(Debug, Clone, Copy)]
struct PickerOptions {
    /// Least-load pickers scan every endpoint up to this many.
    exact_up_to: Option<usize>,
    /// Least-load pickers compare this many random endpoints above.
    choice_count: Option<usize>,
    /// Weighted round robin is smooth up to this many endpoints.
    smooth_up_to: Option<usize>,
}

impl PickerOptions {
    fn least_connections(self) -> LeastConnections {
        let mut p = LeastConnections::new();
        if let Some(n) = self.exact_up_to {
            p = p.exact_up_to(n);
        }
        if let Some(n) = self.choice_count {
            p = p.choice_count(n);
        }
        p
    }

    fn least_response_time(self) -> LeastResponseTime {
        let mut p = LeastResponseTime::new();
        if let Some(n) = self.exact_up_to {
            p = p.exact_up_to(n);
        }
        if let Some(n) = self.choice_count {
            p = p.choice_count(n);
        }
        p
    }

    fn weighted_round_robin(self) -> WeightedRoundRobin {
        let p = WeightedRoundRobin::new();
        match self.smooth_up_to {
            Some(n) => p.smooth_up_to(n),
            None => p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> StackConfig {
        let text = format!("endpoints = [\"127.0.0.1:7001\"]\n{text}");
        StackConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn paths(c: &StackConfig) -> Vec<String> {
        c.validate().into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn picker_options_make_the_picker_they_name() {
        let least = |text: &str| {
            let c = config(text);
            assert_eq!(paths(&c), Vec::<String>::new(), "{text}");
            let o = c.picker_options();
            let (lc, lrt) = (o.least_connections(), o.least_response_time());
            (format!("{lc:?}"), format!("{lrt:?}"))
        };
        let (lc, lrt) = least("picker = \"least_connections\"");
        assert_eq!(lc, "LeastConnections { exact_up_to: 16, choice_count: 2 }");
        assert!(lrt.ends_with("exact_up_to: 16, choice_count: 2 }"), "{lrt}");
        let (lc, _) = least("picker = \"least_connections\"\npicker_exact = true");
        assert_eq!(lc, "LeastConnections { exact: true }");
        let (_, lrt) = least("picker = \"least_response_time\"\npicker_exact = true");
        assert!(lrt.ends_with("exact: true }"), "{lrt}");
        let (lc, _) = least("picker = \"least_connections\"\npicker_exact = false");
        assert_eq!(lc, "LeastConnections { exact_up_to: 0, choice_count: 2 }");
        let (lc, lrt) = least(
            "picker = \"least_response_time\"\npicker_exact_up_to = 64\npicker_choice_count = 3",
        );
        assert_eq!(lc, "LeastConnections { exact_up_to: 64, choice_count: 3 }");
        assert!(lrt.ends_with("exact_up_to: 64, choice_count: 3 }"), "{lrt}");
        let (lc, _) = least("picker = \"least_connections\"\npicker_choice_count = 16");
        assert_eq!(lc, "LeastConnections { exact_up_to: 16, choice_count: 16 }");

        let wrr = |text: &str| {
            let c = config(&format!("picker = \"weighted_round_robin\"\n{text}"));
            assert_eq!(paths(&c), Vec::<String>::new(), "{text}");
            let p = c.picker_options().weighted_round_robin();
            format!("{p:?}")
        };
        assert!(wrr("").contains("smooth_up_to: 16,"), "{}", wrr(""));
        let always = format!("smooth_up_to: {},", usize::MAX);
        assert!(wrr("picker_smooth = true").contains(&always));
        assert!(wrr("picker_smooth = false").contains("smooth_up_to: 0,"));
        assert!(wrr("picker_smooth_up_to = 100").contains("smooth_up_to: 100,"));
    }

    #[test]
    fn picker_options_are_checked_with_their_keys() {
        let cases: &[(&str, &[&str])] = &[
            ("picker_exact = true", &["picker_exact"]),
            (
                "picker = \"p2c\"\npicker_exact_up_to = 4",
                &["picker_exact_up_to"],
            ),
            (
                "picker = \"weighted_round_robin\"\npicker_choice_count = 3",
                &["picker_choice_count"],
            ),
            (
                "picker = \"least_connections\"\npicker_smooth = true",
                &["picker_smooth"],
            ),
            (
                "picker = \"least_response_time\"\npicker_smooth_up_to = 8",
                &["picker_smooth_up_to"],
            ),
            (
                "picker = \"least_connections\"\npicker_choice_count = 1",
                &["picker_choice_count"],
            ),
            (
                "picker = \"least_connections\"\npicker_choice_count = 17",
                &["picker_choice_count"],
            ),
            (
                "picker = \"least_connections\"\npicker_exact = true\npicker_exact_up_to = 4",
                &["picker_exact_up_to"],
            ),
            (
                "picker = \"least_connections\"\npicker_exact = true\npicker_choice_count = 3",
                &["picker_choice_count"],
            ),
            (
                "picker = \"weighted_round_robin\"\npicker_smooth = false\npicker_smooth_up_to = 4",
                &["picker_smooth_up_to"],
            ),
            // An unknown picker is the problem, not its options.
            ("picker = \"fastest\"\npicker_exact = true", &["picker"]),
        ];
        for (text, want) in cases {
            let c = config(text);
            assert_eq!(paths(&c), *want, "{text}");
            let err = c.builder::<String>().map(drop).expect_err(text);
            assert_eq!(
                err.0.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
                *want,
                "{text}"
            );
            assert!(err.to_string().contains(&format!("{}: ", want[0])), "{err}");
        }
        // A negative count is not a number of backends: the file does not parse.
        let e = StackConfig::from_toml("endpoints = [\"127.0.0.1:1\"]\npicker_exact_up_to = -1\n")
            .expect_err("negative");
        assert!(e.to_string().contains("picker_exact_up_to"), "{e}");
    }

    #[test]
    fn warm_connections_is_read() {
        assert_eq!(config("").warm_connections, None);
        assert_eq!(config("warm_connections = 0").warm_connections, Some(0));
        let c = config("warm_connections = 100000");
        assert_eq!(c.warm_connections, Some(100_000));
        assert!(c.validate().is_empty());
        assert!(c.builder::<String>().is_ok());
    }
}
