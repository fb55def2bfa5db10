//! `Stack`: limits → affinity → balance → health → pool, as one `Service`.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::AcqRel, Ordering::Acquire};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_affinity::{AffinityHandle, AffinityLayer, AffinityStats, TableConfig};
use marina_balance::{
    Balance, BalanceHandle, BalanceTotals, ConsistentHash, EndpointSnapshot, Failover, Pick,
    RoundRobin, Shared,
};
use marina_core::Probe;
use marina_core::{BoxError, BoxFuture, EjectionGate, Request, Response};

use crate::timeout::RequestTimeoutService;

mod assemble;
#[cfg(feature = "redis")]
mod fleet;
mod guard;
mod handle;
mod transport;

use assemble::*;
#[cfg(feature = "redis")]
pub(crate) use fleet::problem as redis_problem;
#[cfg(feature = "redis")]
pub use fleet::{DEFAULT_REDIS_NAME, RedisStackStats};
pub use guard::ShuttingDown;
use guard::*;
use handle::*;
pub use handle::{BackendStats, StackHandle, StackStats};
use marina_health::{ActiveConfig, HealthConfig, HealthHandle, HealthLayer, Status};
use marina_limit::{
    BandwidthLimit, Bucket, ConcurrencyHandle, ConcurrencyPerKeyLayer, ConcurrencyStats, Rate,
    RateLimitHandle, RateLimitLayer, RateStats, Throttled, WithoutKey,
};
use marina_pool::{Config, Pool, PoolService, PoolStats, TcpConnector};
use tokio::sync::Notify;
use tower::discover::Change;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_service::Service;
pub use transport::{CustomStream, Transport};

/// The connection every pool holds before the protocol: TCP, or TLS over TCP with
/// [`StackBuilder::tls`], through the bandwidth limiter. `conn.get_mut().is_open()`
/// ([`Transport::is_open`]) is the socket check for a protocol's `check`.
pub type Conn = Throttled<Transport>;

/// The stack as one service: requests and responses carry extensions (route hints,
/// new sessions).
///
/// # Sharing
///
/// `Clone`, `Send` and `Sync`: every clone is a handle to the one stack (one balancer,
/// one set of pools, health checks and limits, the figures one [`StackHandle`]
/// reports); clone it into each task that sends.
///
/// # Cancel safety
///
/// Dropping a call's future cancels the request wherever it is, and leaves nothing
/// behind: waiting on a limit or for a ready backend, it gives up its place (a rate
/// limit's reserved slot, a concurrency slot); waiting for a pooled connection, it
/// leaves the pool's queue; once sent, it drops the client's future (the line client
/// then marks itself broken, and its pool closes it instead of reusing it, as the reply
/// may be half read; with [`StackBuilder::build`], the `check` decides), and the
/// in-flight counts (balancer, health, [`StackHandle::shutdown`]'s wait) go down.
pub type StackService<T, U> = BoxCloneSyncService<Request<T>, Response<U>, BoxError>;

pub(crate) type KeyFn<T> = Arc<dyn Fn(&Request<T>) -> Option<String> + Send + Sync>;

/// A reply on its way through the layers a user adds per backend
/// ([`StackBuilder::endpoint_layer`]): the protocol's reply, type-erased (downcast it to
/// read it: a `String` for [`StackBuilder::build_line`]).
pub struct Reply(pub Box<dyn std::any::Any + Send>);

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reply(..)")
    }
}

/// One backend's service as the layers added with [`StackBuilder::endpoint_layer`] see
/// it: below them the request timeout and the pool, above them the health checks.
///
/// # Sharing
///
/// `Clone`, `Send` and `Sync`: clones reach the same backend's pool. The stack clones
/// it (failover sends a retried request through a copy of the endpoint), so a layer's
/// service must be `Clone` too, and state its clones should share belongs behind an
/// `Arc`.
pub type EndpointService<T> = BoxCloneSyncService<Request<T>, Response<Reply>, BoxError>;

pub(crate) type EndpointLayerFn<T> =
    Arc<dyn Fn(EndpointService<T>) -> EndpointService<T> + Send + Sync>;

/// Adds an active probe of one backend's address to its health layer.
pub(crate) type ProbeSetup = Arc<dyn Fn(HealthLayer, SocketAddr) -> HealthLayer + Send + Sync>;
pub(crate) type ProtoFn<C> = Arc<dyn Fn(Conn) -> BoxFuture<'static, io::Result<C>> + Send + Sync>;
pub(crate) type CheckFn<C> = Arc<dyn Fn(&mut C) -> bool + Send + Sync>;

/// Affinity for the stack.
#[derive(Clone)]
pub enum AffinityMode<T> {
    /// Sticky table keyed by the extractor's key.
    Sticky(KeyFnBox<T>, TableConfig),
    /// Consistent hash of the extractor's key (the stack's default picker is then
    /// `ConsistentHash`, which reads it; another picker ignores the hash).
    Hash(KeyFnBox<T>),
}

impl<T> fmt::Debug for AffinityMode<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AffinityMode::Sticky(_, c) => f.debug_tuple("Sticky").field(c).finish(),
            AffinityMode::Hash(_) => f.write_str("Hash"),
        }
    }
}

/// A key extractor for the stack's requests.
#[derive(Clone)]
pub struct KeyFnBox<T>(KeyFn<T>);

impl<T> fmt::Debug for KeyFnBox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyFnBox")
    }
}

impl<T> KeyFnBox<T> {
    /// Reads a key with `f`.
    pub fn new(f: impl Fn(&Request<T>) -> Option<String> + Send + Sync + 'static) -> Self {
        KeyFnBox(Arc::new(f))
    }

    fn extractor(&self) -> impl Fn(&Request<T>) -> Option<String> + Send + Sync + 'static
    where
        T: 'static,
    {
        let f = self.0.clone();
        move |r: &Request<T>| f(r)
    }
}

/// The request timeout a stack starts with: 15 s, Envoy's route timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How many connections a stack opens ahead of traffic across all its backends, by
/// default ([`StackBuilder::warm_connections`]).
pub const DEFAULT_WARM_BUDGET: usize = 64;

/// Builds a [`Stack`]; see [`Stack::builder`].
pub struct StackBuilder<T> {
    endpoints: Vec<SocketAddr>,
    pool: Config,
    connect_timeout: Duration,
    health: Option<HealthConfig>,
    probe: Option<ProbeSetup>,
    /// The active checks' settings (validated at build).
    active: Option<ActiveConfig>,
    /// `None`: round robin, or consistent hash with hash affinity.
    picker: Option<Box<dyn Fn() -> Box<dyn Pick> + Send + Sync>>,
    failover: Option<Failover>,
    failfast: Duration,
    panic_threshold: f64,
    affinity: Option<AffinityMode<T>>,
    rate: Option<Rate>,
    rate_per_key: Option<(KeyFnBox<T>, Rate)>,
    concurrency: Vec<(KeyFnBox<T>, usize)>,
    bandwidth: Option<(f64, u64)>,
    request_timeout: Option<Duration>,
    endpoint_layers: Vec<EndpointLayerFn<T>>,
    without_key: WithoutKey,
    deadline: Option<Duration>,
    hedge: Option<Duration>,
    slow_start: Option<Duration>,
    warm_budget: usize,
    #[cfg(feature = "tls")]
    tls: Option<marina_pool::tls::TlsConfig>,
    /// A connector of the user's in place of TCP (and TLS).
    connector: Option<transport::CustomConnect>,
    /// The fleet (Redis) the limits and sticky sessions are shared through (fleet.rs).
    #[cfg(feature = "redis")]
    redis: fleet::RedisSettings,
}

impl<T> fmt::Debug for StackBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackBuilder")
            .field("endpoints", &self.endpoints)
            .field("pool", &self.pool)
            .field("health", &self.health)
            .field("affinity", &self.affinity)
            .field("rate", &self.rate)
            .field("bandwidth", &self.bandwidth)
            .field("connector", &self.connector.as_ref().map(|_| "custom"))
            .finish_non_exhaustive()
    }
}

/// The whole client stack in one service: see [`Stack::builder`].
#[derive(Debug)]
pub struct Stack;

impl Stack {
    /// A builder from a validated [`StackConfig`](crate::StackConfig) (the `serde`
    /// feature).
    #[cfg(feature = "serde")]
    pub fn from_config<T>(
        config: &crate::StackConfig,
    ) -> Result<StackBuilder<T>, crate::InvalidConfig>
    where
        T: StackRequest,
    {
        config.builder()
    }

    /// Starts a stack: no endpoints yet, `Config::balanced()` pools, default health
    /// checks, round robin, failover on, no affinity, no limits.
    pub fn builder<T>() -> StackBuilder<T> {
        StackBuilder {
            endpoints: Vec::new(),
            pool: Config::balanced(),
            connect_timeout: Duration::from_secs(5),
            health: Some(HealthConfig::default()),
            probe: None,
            active: None,
            picker: None,
            failover: Some(Failover::new()),
            failfast: Duration::from_secs(10),
            panic_threshold: 0.5,
            affinity: None,
            rate: None,
            rate_per_key: None,
            concurrency: Vec::new(),
            bandwidth: None,
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            endpoint_layers: Vec::new(),
            without_key: WithoutKey::Refuse,
            deadline: None,
            hedge: None,
            slow_start: None,
            warm_budget: DEFAULT_WARM_BUDGET,
            #[cfg(feature = "tls")]
            tls: None,
            connector: None,
            #[cfg(feature = "redis")]
            redis: fleet::RedisSettings::default(),
        }
    }
}

/// What a [`Stack`]'s request body must be: `Clone` (failover keeps a copy of each
/// request to send it to another backend when it never reached its own), `Send + Sync +
/// 'static` (the stack is one service shared by tasks). Implemented for every such
/// type; it only gives a clearer error than the four bounds would.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the request of a marina `Stack`: it must be `Clone + Send + Sync + 'static`",
    label = "`{Self}` is not `Clone + Send + Sync + 'static`",
    note = "the stack keeps a copy of each request so failover can re-send one that never reached its backend; derive or implement `Clone`, or wrap the body in an `Arc`"
)]
pub trait StackRequest: Clone + Send + Sync + 'static {}

impl<T: Clone + Send + Sync + 'static> StackRequest for T {}

impl<T> StackBuilder<T> {
    /// The backends.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.endpoints = endpoints.into_iter().collect();
        self
    }

    /// How many idle connections the stack keeps open ahead of traffic, across all its
    /// backends together (default [`DEFAULT_WARM_BUDGET`], 64): each backend's pool
    /// keeps `min(pool.min_idle, total / backends)` warm. With a few backends that is
    /// the pool's `min_idle`; with hundreds it is 0, and a backend's connections are
    /// opened by its first requests (512 backends × `min_idle` 5 would otherwise be
    /// 2,560 connections and connects from every client instance at start-up).
    /// `usize::MAX` keeps `min_idle` warm on every backend.
    pub fn warm_connections(mut self, total: usize) -> Self {
        self.warm_budget = total;
        self
    }

    /// Each backend's pool configuration.
    pub fn pool(mut self, config: Config) -> Self {
        self.pool = config;
        self
    }

    /// Each attempt's timeout (default [`DEFAULT_REQUEST_TIMEOUT`], 15 s; above 0;
    /// `None` for none): an attempt with no reply by then fails with
    /// [`RequestTimeout`](crate::RequestTimeout), and the backend's health checks count
    /// it as a failure (so a backend that accepts and never answers is ejected). It
    /// covers the whole attempt below the health checks: waiting for a pooled
    /// connection, connecting, sending and reading the reply. A timed-out request may
    /// have been sent: failover does not re-send it unless it is marked idempotent.
    pub fn request_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.request_timeout = timeout.into();
        self
    }

    /// Adds a layer of your own to every backend, inside its health checks (which see
    /// its failures) and above the request timeout and the pool: tower's
    /// `ConcurrencyLimit`, your logging or metrics, a circuit breaker. Layers added
    /// later sit further out. The layer sees [`EndpointService`]s: requests as sent to
    /// the stack, replies type-erased as [`Reply`]s (boxed: one allocation per request,
    /// only with such a layer). It must keep the reply it gets (a layer that replaces a
    /// reply's body with another type fails that request).
    ///
    /// ```
    /// use std::time::Duration;
    /// use marina::Stack;
    /// use tower::limit::ConcurrencyLimitLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina::core::BoxError> {
    /// let (_svc, handle) = Stack::builder::<String>()
    ///     .endpoints(["127.0.0.1:7000".parse()?])
    ///     .endpoint_layer(ConcurrencyLimitLayer::new(64)) // at most 64 in flight per backend
    ///     .build_line()?;
    /// # handle.shutdown(Duration::from_millis(10)).await;
    /// # Ok(()) }
    /// ```
    pub fn endpoint_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<EndpointService<T>> + Send + Sync + 'static,
        L::Service: Service<Request<T>, Response = Response<Reply>> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<T>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<T>>>::Future: Send + 'static,
        T: 'static,
    {
        self.endpoint_layers
            .push(Arc::new(move |svc: EndpointService<T>| {
                BoxCloneSyncService::new(layer.layer(svc).map_err(Into::into))
            }));
        self
    }

    /// The connect timeout (default 5 s; above 0): the TCP connect and, with
    /// [`tls`](Self::tls), the TLS handshake together.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects to every backend over TLS with `tls` (the `tls` feature): roots, ALPN,
    /// and the server name to verify. Backends are addressed by IP, so their
    /// certificates must list that IP address, or set the name they carry with
    /// [`TlsConfig::server_name`](marina_pool::tls::TlsConfig::server_name).
    ///
    /// The handshake counts in [`connect_timeout`](Self::connect_timeout). A failed one
    /// (an untrusted certificate, a name mismatch) is a connect error, a
    /// [`TlsError`](marina_pool::tls::TlsError) inside the request's error: the request
    /// was never sent, so failover sends it to another backend, and the backend's
    /// health checks count the failure. Pooled connections are checked at checkout
    /// through TLS ([`Transport::is_open`]).
    ///
    /// ```no_run
    /// use marina::Stack;
    /// use marina::pool::tls::TlsConfig;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina::core::BoxError> {
    /// let tls = TlsConfig::from_ca_file("ca.pem")?.server_name("echo.internal")?;
    /// let (svc, handle) = Stack::builder::<String>()
    ///     .endpoints(["10.0.0.1:7443".parse()?, "10.0.0.2:7443".parse()?])
    ///     .tls(tls)
    ///     .build_line()?;
    /// # drop((svc, handle));
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: marina_pool::tls::TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Opens the stack's connections with `connector` instead of TCP: a tower
    /// `Service<SocketAddr>` whose response is the stream (a simulated network such as
    /// turmoil's, a Unix socket, a tunnel, a connector that counts or traces). Every
    /// connection the stack's pools open goes through it, within
    /// [`connect_timeout`](Self::connect_timeout) (past it, the connect fails with
    /// `marina::pool::ConnectTimeout`); a connect error counts as never sent, so
    /// failover sends the request to another backend, as for TCP. The bandwidth limit
    /// and the protocol sit on top as usual.
    ///
    /// Its streams are [`Transport::Custom`]: [`Transport::is_open`] checks one by a
    /// read that does not wait (nothing to read: open; end of stream, an error or
    /// unread bytes: not reusable), and [`Transport::try_tcp`] is `None` (
    /// [`Transport::tcp`] and `Deref` to `TcpStream` panic: a `check` written against
    /// the TCP socket, such as `socket_is_open(conn.get_ref())`, must use
    /// [`Transport::is_open`] with a custom connector; [`build_line`](Self::build_line)
    /// and [`build_line_bytes`](Self::build_line_bytes) do).
    ///
    /// The connector replaces TLS too: [`tls`](Self::tls) together with a connector is
    /// refused at build (path `tls`); do TLS inside the connector. An active probe
    /// ([`probe`](Self::probe)) is yours and opens its own connections: give it the
    /// same connector if it must use the same network.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use marina::Stack;
    /// use marina::core::Request;
    /// use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina::core::BoxError> {
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let addr = listener.local_addr()?;
    /// # tokio::spawn(async move {
    /// #     use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    /// #     while let Ok((s, _)) = listener.accept().await {
    /// #         tokio::spawn(async move {
    /// #             let (r, mut w) = s.into_split();
    /// #             let mut lines = BufReader::new(r).lines();
    /// #             while let Ok(Some(l)) = lines.next_line().await {
    /// #                 if w.write_all(format!("{l}\n").as_bytes()).await.is_err() { return; }
    /// #             }
    /// #         });
    /// #     }
    /// # });
    /// // A connector that counts the connections it opens (over TCP here).
    /// let opened = Arc::new(AtomicUsize::new(0));
    /// let counting = {
    ///     let opened = opened.clone();
    ///     tower::service_fn(move |addr: SocketAddr| {
    ///         opened.fetch_add(1, Ordering::Relaxed);
    ///         tokio::net::TcpStream::connect(addr)
    ///     })
    /// };
    /// let (svc, handle) = Stack::builder::<String>()
    ///     .endpoints([addr]) // `addr`: an echo server
    ///     .connector(counting)
    ///     .build_line()?;
    /// let reply = svc.oneshot(Request::new("ping".to_string())).await?;
    /// assert_eq!(reply.into_body(), "ping");
    /// assert!(opened.load(Ordering::Relaxed) >= 1);
    /// handle.shutdown(std::time::Duration::from_secs(1)).await;
    /// # Ok(()) }
    /// ```
    pub fn connector<C>(mut self, connector: C) -> Self
    where
        C: Service<SocketAddr> + Clone + Send + Sync + 'static,
        C::Response: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
    {
        self.connector = Some(transport::custom_connect(connector));
        self
    }

    /// Passive health checks with `config` (default on); `None` turns them off. The
    /// settings are checked at build (a failure rate is a share within `0.0..1.0`, an
    /// ejection time above 0 and at most `max_ejection`, …: see `HealthConfig`'s
    /// fields), problems reported under `health.<field>`.
    pub fn health(mut self, config: Option<HealthConfig>) -> Self {
        self.health = config;
        self
    }

    /// Active health checks: `probe` (for example `marina::health::LineProbe`,
    /// `TcpConnectProbe`, `HttpProbe`) run against each backend's address every
    /// `active.interval`, besides the passive checks (turned on with defaults if they
    /// were off). `active` is checked at build (an interval of at least 10 ms, a
    /// timeout above 0, thresholds of at least 1: see `ActiveConfig`'s fields), problems
    /// reported under `probe.<field>`.
    pub fn probe<P>(mut self, active: ActiveConfig, probe: P) -> Self
    where
        P: Probe<SocketAddr> + Clone,
    {
        if self.health.is_none() {
            self.health = Some(HealthConfig::default());
        }
        self.active = Some(active);
        self.probe = Some(Arc::new(move |layer: HealthLayer, addr: SocketAddr| {
            layer.probe(active, probe.clone(), addr)
        }));
        self
    }

    /// The picker, made by `make` (default round robin; consistent hash with
    /// [`AffinityMode::Hash`], which needs one).
    pub fn picker<P: Pick>(mut self, make: impl Fn() -> P + Send + Sync + 'static) -> Self {
        self.picker = Some(Box::new(move || Box::new(make())));
        self
    }

    /// Failover for requests not sent (default `Failover::new()`); `None` turns it off.
    ///
    /// What is sent again, and what never is: a request that never reached its backend
    /// (a refused or failed connect, a pool checkout that timed out) goes to another
    /// backend, within the policy's attempts and retry budget. A request that may have
    /// been sent (it timed out waiting for its reply, the connection broke mid-reply) is
    /// sent again only when it is marked idempotent
    /// ([`Idempotent::mark`](marina_core::Idempotent::mark) on the request's
    /// extensions): never by default.
    pub fn failover(mut self, failover: Option<Failover>) -> Self {
        self.failover = failover;
        self
    }

    /// One deadline for the whole request, every failover attempt included (default
    /// none: each attempt has its own [`request_timeout`](Self::request_timeout), so
    /// a request lasts at most attempts × timeout). Past it the request fails with
    /// `marina::balance::DeadlineExceeded`, which says whether it may have been sent.
    /// Above 0.
    ///
    /// It counts from `call`: the wait in `poll_ready` before it (for a ready backend,
    /// bounded by [`failfast_timeout`](Self::failfast_timeout)) is not part of it, so a
    /// `oneshot` with every backend down can take fail-fast time + deadline. To bound
    /// the whole thing, wrap the readiness wait and the call in one
    /// `tokio::time::timeout`.
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.deadline = deadline.into();
        self
    }

    /// Hedging for requests marked idempotent
    /// ([`Idempotent::mark`](marina_core::Idempotent::mark)): when the first attempt
    /// has not answered after `delay`, a copy goes to another ready backend and the
    /// first reply wins (the other is cancelled; its connection is closed, not reused).
    /// Draws on the failover's retry budget and attempts, so it needs failover on.
    /// Counted in the balancer's totals (`hedges`, `hedges_won`). Off by default; above
    /// 0.
    pub fn hedge(mut self, delay: impl Into<Option<Duration>>) -> Self {
        self.hedge = delay.into();
        self
    }

    /// Slow start (Envoy's `slow_start_window`, HAProxy's `slowstart`): a backend that
    /// comes back after an ejection, or is added while the stack runs, gets a share of
    /// its picks that ramps up over `window`, whatever the picker. Off by default; above
    /// 0.
    pub fn slow_start(mut self, window: impl Into<Option<Duration>>) -> Self {
        self.slow_start = window.into();
        self
    }

    /// How long nothing may be ready before calls fail fast (default 10 s).
    pub fn failfast_timeout(mut self, timeout: Duration) -> Self {
        self.failfast = timeout;
        self
    }

    /// The balancer's panic threshold (default 0.5): below this share of healthy
    /// backends, route to all of them. A share within `0.0..=1.0` (0.5 for 50%; 0
    /// turns panic mode off); anything else is refused at build, under the path
    /// `health.panic_threshold`.
    pub fn panic_threshold(mut self, healthy_share: f64) -> Self {
        self.panic_threshold = healthy_share;
        self
    }

    /// Session affinity.
    pub fn affinity(mut self, mode: AffinityMode<T>) -> Self {
        self.affinity = Some(mode);
        self
    }

    /// A global rate limit (rejects over the limit).
    pub fn rate_limit(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// A rate limit per key (user, client IP).
    pub fn rate_limit_per_key(mut self, key: KeyFnBox<T>, rate: Rate) -> Self {
        self.rate_per_key = Some((key, rate));
        self
    }

    /// What the per-key limits ([`rate_limit_per_key`](Self::rate_limit_per_key),
    /// [`concurrency_per_key`](Self::concurrency_per_key)) do with a request whose key
    /// extractor finds no key (default [`WithoutKey::Refuse`]: it fails at once with
    /// `MissingKey`, so a missing header or a misconfigured extractor shows on the first
    /// request instead of silently lifting the limit). `Unlimited` lets such requests
    /// through; `Shared` limits them together as one key of their own.
    pub fn without_key(mut self, without_key: WithoutKey) -> Self {
        self.without_key = without_key;
        self
    }

    /// At most `limit` requests in flight per key (add one per kind of key: user, IP).
    /// `limit` is at least 1 (0 is refused at build, under the path
    /// `limits.concurrency_per_key[i]`).
    pub fn concurrency_per_key(mut self, key: KeyFnBox<T>, limit: usize) -> Self {
        self.concurrency.push((key, limit));
        self
    }

    /// All connections together write at most `bytes_per_sec` (bursts of `burst`
    /// bytes); both above 0 (refused at build otherwise, under the paths
    /// `limits.bandwidth_bytes_per_sec` and `limits.bandwidth_burst`).
    pub fn bandwidth(mut self, bytes_per_sec: f64, burst: u64) -> Self {
        self.bandwidth = Some((bytes_per_sec, burst));
        self
    }

    /// Every problem with these settings, each with its path as a
    /// [`StackConfig`](crate::StackConfig) file names it (`endpoints`,
    /// `connect_timeout_ms`, `pool.max_size`, `health.panic_threshold`, …); empty when
    /// they can build a stack. [`build`](Self::build) and
    /// [`build_line`](Self::build_line) refuse settings with problems, returning them
    /// all as an [`InvalidConfig`](crate::InvalidConfig).
    ///
    /// ```
    /// use marina::Stack;
    ///
    /// let problems = Stack::builder::<String>()
    ///     .endpoints(["127.0.0.1:7000".parse().unwrap()])
    ///     .panic_threshold(50.0) // meant 50%
    ///     .validate();
    /// assert_eq!(problems.len(), 1);
    /// assert_eq!(problems[0].path, "health.panic_threshold");
    /// ```
    pub fn validate(&self) -> Vec<crate::ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |path: String, message: String| {
            out.push(crate::ConfigProblem { path, message });
        };
        if self.endpoints.is_empty() {
            bad(
                "endpoints".into(),
                "at least one backend address is needed".into(),
            );
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Some(j) = self.endpoints[..i].iter().position(|o| o == e) {
                bad(
                    format!("endpoints[{i}]"),
                    format!("{e} is listed twice (as endpoints[{j}] too)"),
                );
            }
        }
        #[cfg(feature = "tls")]
        if self.tls.is_some() && self.connector.is_some() {
            bad(
                "tls".into(),
                "TLS with a custom connector (StackBuilder::connector): do TLS inside the connector".into(),
            );
        }
        if self.connect_timeout.is_zero() {
            bad("connect_timeout_ms".into(), "must be above 0".into());
        }
        if self.request_timeout.is_some_and(|t| t.is_zero()) {
            bad("request_timeout_ms".into(), "must be above 0".into());
        }
        if self.deadline.is_some_and(|t| t.is_zero()) {
            bad("deadline_ms".into(), "must be above 0".into());
        }
        if self.hedge.is_some_and(|t| t.is_zero()) {
            bad("hedge_ms".into(), "must be above 0".into());
        }
        if self.hedge.is_some() && self.failover.is_none() {
            bad(
                "hedge_ms".into(),
                "hedging needs failover on (a hedge is a second attempt)".into(),
            );
        }
        if self.slow_start.is_some_and(|t| t.is_zero()) {
            bad("slow_start_ms".into(), "must be above 0".into());
        }
        for problem in self.pool.validate().errors {
            let key = match problem.field {
                "acquire_timeout" | "idle_timeout" | "max_lifetime" | "connect_timeout" => {
                    format!("{}_ms", problem.field)
                }
                other => other.to_string(),
            };
            bad(format!("pool.{key}"), problem.message);
        }
        if !(0.0..=1.0).contains(&self.panic_threshold) {
            bad(
                "health.panic_threshold".into(),
                format!(
                    "must be within 0.0..=1.0 (a share, not a percentage), got {}",
                    self.panic_threshold
                ),
            );
        }
        // The health checks' own ranges (a failure rate is a share, a probe interval at
        // least 10 ms, …), under the file's names (durations in ms).
        let health_path = |p: &str| match p {
            "base_ejection" | "max_ejection" | "reset_after" => format!("health.{p}_ms"),
            other => format!("health.{other}"),
        };
        if let Some(Err(invalid)) = self.health.as_ref().map(HealthConfig::validate) {
            for p in invalid.problems {
                bad(health_path(&p.path), p.message);
            }
        }
        if let Some(Err(invalid)) = self.active.as_ref().map(ActiveConfig::validate) {
            for p in invalid.problems {
                bad(format!("probe.{}", p.path), p.message);
            }
        }
        if let Some((rate, burst)) = self.bandwidth {
            // Each setting on its own, so both are reported.
            if let Err(e) = Bucket::try_new(rate, burst.max(1)) {
                bad(format!("limits.{}", e.field), e.message);
            }
            if burst == 0 {
                bad(
                    "limits.bandwidth_burst".into(),
                    "must be above 0, got 0".into(),
                );
            }
        }
        for (i, (_, limit)) in self.concurrency.iter().enumerate() {
            if *limit == 0 || *limit > ConcurrencyPerKeyLayer::<()>::MAX_LIMIT {
                bad(
                    format!("limits.concurrency_per_key[{i}]"),
                    format!(
                        "must be within 1..={}, got {limit}",
                        ConcurrencyPerKeyLayer::<()>::MAX_LIMIT
                    ),
                );
            }
        }
        #[cfg(feature = "redis")]
        self.validate_redis(&mut bad);
        out
    }

    /// Builds the stack over the line protocol ([`LineClient`](crate::line::LineClient)):
    /// requests and responses are lines.
    ///
    /// Fails with [`InvalidConfig`](crate::InvalidConfig) (inside the `BoxError`) when
    /// [`validate`](Self::validate) finds problems. Needs a tokio runtime (pools and
    /// health checks spawn tasks).
    pub fn build_line(self) -> Result<(StackService<T, String>, StackHandle), BoxError>
    where
        T: StackRequest + Into<String>,
    {
        let mut mapped = self.map_body(|t: T| t.into());
        // A line holding '\n' is the caller's mistake: refuse it before it enters the
        // stack, where the health checks would count it against a backend.
        mapped.validate = Some(Arc::new(|t: &T| {
            // A `String` (or `&str`) body is read in place; other bodies are converted
            // on a copy.
            let any: &dyn std::any::Any = t;
            let bad = if let Some(line) = any.downcast_ref::<String>() {
                line.contains('\n')
            } else if let Some(line) = any.downcast_ref::<&'static str>() {
                line.contains('\n')
            } else {
                let line: String = t.clone().into();
                line.contains('\n')
            };
            line_check(bad)
        }));
        mapped.build(
            |conn: Conn| Box::pin(async move { Ok(crate::line::LineClient::new(conn)) }),
            Some(line_checkout()),
        )
    }

    /// Builds the stack over the line protocol with raw bytes for requests and replies
    /// ([`BytesLineClient`](crate::line::BytesLineClient)): as
    /// [`build_line`](Self::build_line), without checking replies for UTF-8.
    ///
    /// Fails with [`InvalidConfig`](crate::InvalidConfig) (inside the `BoxError`) when
    /// [`validate`](Self::validate) finds problems. Needs a tokio runtime.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), marina::core::BoxError> {
    /// use bytes::Bytes;
    /// use marina::Stack;
    /// use tower::{Service, ServiceExt};
    ///
    /// let (mut svc, _handle) = Stack::builder::<Bytes>()
    ///     .endpoints(["127.0.0.1:7000".parse()?])
    ///     .build_line_bytes()?;
    /// let ping = marina::core::Request::new(Bytes::from_static(b"ping"));
    /// let reply = svc.ready().await?.call(ping).await?;
    /// println!("{:?}", reply.into_body());
    /// # Ok(()) }
    /// ```
    pub fn build_line_bytes(self) -> Result<(StackService<T, bytes::Bytes>, StackHandle), BoxError>
    where
        T: StackRequest + Into<bytes::Bytes>,
    {
        let mut mapped = self.map_body(|t: T| t.into());
        mapped.validate = Some(Arc::new(|t: &T| {
            let any: &dyn std::any::Any = t;
            let bad = if let Some(line) = any.downcast_ref::<bytes::Bytes>() {
                line.contains(&b'\n')
            } else {
                let line: bytes::Bytes = t.clone().into();
                line.contains(&b'\n')
            };
            line_check(bad)
        }));
        mapped.build(
            |conn: Conn| Box::pin(async move { Ok(crate::line::BytesLineClient::new(conn)) }),
            Some(Arc::new(|c: &mut crate::line::BytesLineClient<Conn>| {
                c.is_open_with_mut(|io| io.get_mut().is_open())
            }) as CheckFn<_>),
        )
    }

    /// The same stack with the body converted by `f` before it reaches a client.
    fn map_body<T2>(self, f: impl Fn(T) -> T2 + Send + Sync + 'static) -> MappedBuilder<T, T2> {
        MappedBuilder {
            inner: self,
            f: Arc::new(f),
            validate: None,
        }
    }

    /// Builds the stack over any protocol: each pooled connection (TCP through the
    /// bandwidth limiter, a [`Conn`]) becomes a client with `protocol` (a handshake, or
    /// just a wrapper: an async closure), and `check` tells at checkout whether a pooled
    /// client can still be used (`|_| true` for no check). The client is a
    /// `Service<T>`: one request at a time, as a pooled client is used.
    ///
    /// `T` must be [`StackRequest`]: `Clone`, since failover keeps a copy of each
    /// request to re-send one that never reached its backend.
    ///
    /// Fails with [`InvalidConfig`](crate::InvalidConfig) (inside the `BoxError`) when
    /// [`validate`](Self::validate) finds problems. Needs a tokio runtime (pools and
    /// health checks spawn tasks).
    ///
    /// # Examples
    ///
    /// A length-prefixed protocol (a 4-byte big-endian length, then the bytes) over two
    /// backends:
    ///
    /// ```
    /// use std::io;
    /// use std::sync::Arc;
    /// use marina::{Conn, Stack};
    /// use marina::core::{BoxError, Request};
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// use tower::{Service, ServiceExt};
    ///
    /// /// One connection's client: a frame out, a frame back.
    /// #[derive(Clone)]
    /// struct FrameClient {
    ///     conn: Arc<tokio::sync::Mutex<Conn>>,
    /// }
    ///
    /// impl Service<Vec<u8>> for FrameClient {
    ///     type Response = Vec<u8>;
    ///     type Error = io::Error;
    ///     type Future = marina::core::BoxFuture<'static, io::Result<Vec<u8>>>;
    ///
    ///     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
    ///         std::task::Poll::Ready(Ok(()))
    ///     }
    ///
    ///     fn call(&mut self, frame: Vec<u8>) -> Self::Future {
    ///         let conn = self.conn.clone();
    ///         Box::pin(async move {
    ///             let mut conn = conn.lock().await;
    ///             conn.write_all(&(frame.len() as u32).to_be_bytes()).await?;
    ///             conn.write_all(&frame).await?;
    ///             let len = conn.read_u32().await? as usize;
    ///             let mut reply = vec![0; len];
    ///             conn.read_exact(&mut reply).await?;
    ///             Ok(reply)
    ///         })
    ///     }
    /// }
    ///
    /// # async fn frame_echo_server() -> std::net::SocketAddr {
    /// #     let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// #     let addr = l.local_addr().unwrap();
    /// #     tokio::spawn(async move { loop {
    /// #         let (mut s, _) = l.accept().await.unwrap();
    /// #         tokio::spawn(async move { loop {
    /// #             let Ok(len) = s.read_u32().await else { return };
    /// #             let mut buf = vec![0; len as usize];
    /// #             if s.read_exact(&mut buf).await.is_err() { return }
    /// #             let _ = s.write_all(&len.to_be_bytes()).await;
    /// #             let _ = s.write_all(&buf).await;
    /// #         } });
    /// #     } });
    /// #     addr
    /// # }
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), BoxError> {
    /// # let (a, b) = (frame_echo_server().await, frame_echo_server().await);
    /// let (svc, handle) = Stack::builder::<Vec<u8>>()
    ///     .endpoints([a, b])
    ///     .build(
    ///         |conn: Conn| async move { Ok(FrameClient { conn: Arc::new(tokio::sync::Mutex::new(conn)) }) },
    ///         |_: &mut FrameClient| true,
    ///     )?;
    /// let reply = svc.oneshot(Request::new(b"ping".to_vec())).await?;
    /// assert_eq!(reply.into_body(), b"ping");
    /// handle.shutdown(std::time::Duration::from_secs(1)).await;
    /// # Ok(()) }
    /// ```
    pub fn build<U, C, F, Fut>(
        self,
        protocol: F,
        check: impl Fn(&mut C) -> bool + Send + Sync + 'static,
    ) -> Result<(StackService<T, U>, StackHandle), BoxError>
    where
        T: StackRequest,
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<C>> + Send + 'static,
        C: Service<T, Response = U> + Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
        U: Send + 'static,
    {
        MappedBuilder {
            inner: self,
            f: Arc::new(|t: T| t),
            validate: None,
        }
        .build(
            move |conn: Conn| -> BoxFuture<'static, io::Result<C>> { Box::pin(protocol(conn)) },
            Some(Arc::new(check)),
        )
    }
}

/// The line builders' request check: a line may not hold `\n`.
fn line_check(holds_newline: bool) -> Result<(), BoxError> {
    if holds_newline {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a line request may not hold '\\n'",
        )
        .into())
    } else {
        Ok(())
    }
}

/// The line builders' checkout check: the client is usable and its socket open.
fn line_checkout() -> CheckFn<crate::line::LineClient<Conn>> {
    Arc::new(|c: &mut crate::line::LineClient<Conn>| {
        c.is_open_with_mut(|io| io.get_mut().is_open())
    })
}
