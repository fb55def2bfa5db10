//! `Stack`: limits → affinity → balance → health → pool, as one `Service`.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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
use marina_health::{ActiveConfig, HealthConfig, HealthHandle, HealthLayer, Status};
use marina_limit::{
    BandwidthLimit, Bucket, ConcurrencyHandle, ConcurrencyPerKeyLayer, ConcurrencyStats, Rate,
    RateLimitHandle, RateLimitLayer, RateStats, Throttled,
};
use marina_pool::{Config, Pool, PoolService, PoolStats, TcpConnector};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tower::discover::Change;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};
use tower_service::Service;

/// The connection every pool holds before the protocol: TCP through the bandwidth
/// limiter.
pub type Conn = Throttled<TcpStream>;

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

type KeyFn<T> = Arc<dyn Fn(&Request<T>) -> Option<String> + Send + Sync>;

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

type EndpointLayerFn<T> = Arc<dyn Fn(EndpointService<T>) -> EndpointService<T> + Send + Sync>;

/// Adds an active probe of one backend's address to its health layer.
type ProbeSetup = Arc<dyn Fn(HealthLayer, SocketAddr) -> HealthLayer + Send + Sync>;
type ProtoFn<C> = Arc<dyn Fn(Conn) -> BoxFuture<'static, io::Result<C>> + Send + Sync>;
type CheckFn<C> = Arc<dyn Fn(&mut C) -> bool + Send + Sync>;

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

    /// The TCP connect timeout (default 5 s; above 0).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
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
    pub fn failover(mut self, failover: Option<Failover>) -> Self {
        self.failover = failover;
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
        if self.connect_timeout.is_zero() {
            bad("connect_timeout_ms".into(), "must be above 0".into());
        }
        if self.request_timeout.is_some_and(|t| t.is_zero()) {
            bad("request_timeout_ms".into(), "must be above 0".into());
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
            let line: String = t.clone().into();
            if line.contains('\n') {
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a line request may not hold '\\n'",
                )
                .into())
            } else {
                Ok(())
            }
        }));
        mapped.build(
            |conn: Conn| Box::pin(async move { Ok(crate::line::LineClient::new(conn)) }),
            Some(Arc::new(|c: &mut crate::line::LineClient<Conn>| {
                c.is_open_with(|io| marina_pool::socket_is_open(io.get_ref()))
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

/// A builder whose requests are converted before they reach a client.
struct MappedBuilder<T, T2> {
    inner: StackBuilder<T>,
    f: Arc<dyn Fn(T) -> T2 + Send + Sync>,
    /// Refuses bad requests at the top of the stack.
    validate: Option<ValidateFn<T>>,
}

type ValidateFn<T> = Arc<dyn Fn(&T) -> Result<(), BoxError> + Send + Sync>;

impl<T, T2> MappedBuilder<T, T2>
where
    T: Clone + Send + Sync + 'static,
    T2: Send + 'static,
{
    fn build<U, C>(
        self,
        protocol: impl Fn(Conn) -> BoxFuture<'static, io::Result<C>> + Send + Sync + 'static,
        check: Option<CheckFn<C>>,
    ) -> Result<(StackService<T, U>, StackHandle), BoxError>
    where
        C: Service<T2, Response = U> + Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
        U: Send + 'static,
    {
        let b = self.inner;
        let body = self.f;
        let problems = b.validate();
        if !problems.is_empty() {
            return Err(crate::InvalidConfig(problems).into());
        }
        let proto: ProtoFn<C> = Arc::new(protocol);
        let mut tcp =
            BandwidthLimit::new(TcpConnector::new().connect_timeout(Some(b.connect_timeout)));
        if let Some((rate, burst)) = b.bandwidth {
            tcp = tcp.shared_write(rate, burst);
        }
        let bandwidth = tcp.write_bucket().cloned();
        let connector = ProtocolConnector { tcp, proto };
        let gate = EjectionGate::new();
        let state = Arc::new(ShutdownState::default());
        let state_for_add = state.clone();
        let (changes, discover) = marina_balance::ChangeStream::channel();
        let changes_for_remove = changes.clone();
        // Makes one backend's endpoint (pool, health) and registers it with the
        // balancer; kept in the handle to add backends at run time.
        let registry = Arc::new(Registry::default());
        let add: AddFn = {
            // One connect timeout: the builder's (the pool's own would cap it).
            let pool_config = Config {
                connect_timeout: Some(b.connect_timeout),
                ..b.pool.clone()
            };
            let state = state_for_add.clone();
            let health_config = b.health.clone();
            let probe = b.probe.clone();
            let request_timeout = b.request_timeout;
            let endpoint_layers = b.endpoint_layers.clone();
            let registry = registry.clone();
            let gate = gate.clone();
            Arc::new(move |addr: SocketAddr| -> Result<(), BoxError> {
                if state.closed.load(Acquire) {
                    return Err(ShuttingDown.into());
                }
                if registry.lock().iter().any(|p| p.addr == addr && p.active) {
                    return Err(format!("backend {addr} is in the stack already").into());
                }
                let mut builder = Pool::builder().config(pool_config.clone());
                if let Some(check) = &check {
                    let check = check.clone();
                    builder = builder.check(move |c: &mut C| check(c));
                }
                let pool = builder.build(connector.clone(), addr)?;
                let body = body.clone();
                let endpoint = RequestTimeoutService::new(
                    PoolService::new(pool.clone())
                        .map_request(move |r: Request<T>| body(r.into_body()))
                        .map_response(Response::new),
                    request_timeout,
                );
                let endpoint = if endpoint_layers.is_empty() {
                    BoxCloneSyncService::new(endpoint)
                } else {
                    with_endpoint_layers(endpoint, &endpoint_layers)
                };
                let mut health = None;
                let endpoint: StackService<T, U> = match &health_config {
                    Some(cfg) => {
                        let mut layer = HealthLayer::new(cfg.clone())
                            .name(addr.to_string())
                            .ejection_gate(gate.clone());
                        if let Some(probe) = &probe {
                            layer = probe(layer, addr);
                        }
                        let h = layer.layer(endpoint);
                        health = Some(h.handle());
                        BoxCloneSyncService::new(h)
                    }
                    None => BoxCloneSyncService::new(endpoint),
                };
                changes
                    .send(Change::Insert(addr, endpoint))
                    .map_err(|_| "the stack's balancer is gone")?;
                let stats_pool = pool.clone();
                registry.lock().push(PoolEntry {
                    addr,
                    active: true,
                    stats: Box::new(move || stats_pool.stats()),
                    close: Box::new(move || {
                        let p = pool.clone();
                        Box::pin(async move { p.close().await })
                    }),
                    health,
                });
                Ok(())
            })
        };
        let remove: RemoveFn = {
            let changes = changes_for_remove;
            let registry = registry.clone();
            Arc::new(move |addr: SocketAddr| {
                let close = {
                    let mut entries = registry.lock();
                    let Some(entry) = entries.iter_mut().find(|p| p.addr == addr && p.active)
                    else {
                        return false;
                    };
                    entry.active = false;
                    (entry.close)()
                };
                let _ = changes.send(Change::Remove(addr));
                // The pool drains (requests in flight finish), closes, and leaves the
                // registry.
                let registry = registry.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        close.await;
                        registry.lock().retain(|p| p.active || p.addr != addr);
                    });
                }
                true
            })
        };
        for &addr in &b.endpoints {
            add(addr)?;
        }
        // Hash affinity routes by the key's hash, which only a consistent-hash picker
        // reads: it is the default then.
        let picker: Box<dyn Pick> = match (&b.picker, &b.affinity) {
            (Some(make), _) => make(),
            (None, Some(AffinityMode::Hash(_))) => Box::new(ConsistentHash::new()),
            (None, _) => Box::new(RoundRobin::new()),
        };
        let mut balance = Balance::new(discover, BoxedPick(picker))
            .failfast_timeout(b.failfast)
            .ejection_gate(gate)
            .panic_threshold(b.panic_threshold)
            .route_hints_from_extensions();
        if let Some(f) = b.failover {
            balance = balance.failover(f);
        }
        let balance_handle = balance.handle();
        let shared = Shared::new(balance);
        // With no layer above the balancer, the guard wraps it directly (one boxed
        // future fewer per request).
        let bare = b.affinity.is_none()
            && b.concurrency.is_empty()
            && b.rate.is_none()
            && b.rate_per_key.is_none();
        let mut svc: StackService<T, U> = BoxCloneSyncService::new(shared.clone());
        let mut affinity = None;
        match &b.affinity {
            Some(AffinityMode::Sticky(key, table)) => {
                let layer = AffinityLayer::sticky(key.extractor(), *table);
                affinity = Some(layer.handle());
                svc = BoxCloneSyncService::new(layer.layer(svc));
            }
            Some(AffinityMode::Hash(key)) => {
                let layer = AffinityLayer::hash(key.extractor());
                affinity = Some(layer.handle());
                svc = BoxCloneSyncService::new(layer.layer(svc));
            }
            None => {}
        }
        let mut concurrency = Vec::new();
        for (key, limit) in &b.concurrency {
            let layer = ConcurrencyPerKeyLayer::new(key.extractor(), *limit);
            concurrency.push(layer.handle());
            svc = BoxCloneSyncService::new(layer.layer(svc));
        }
        let mut rate = None;
        let mut rate_per_key = None;
        if let Some((key, r)) = &b.rate_per_key {
            let layer = RateLimitLayer::keyed(key.extractor(), *r);
            rate_per_key = Some(layer.handle());
            svc = BoxCloneSyncService::new(layer.layer(svc));
        }
        if let Some(r) = b.rate {
            let layer = RateLimitLayer::global(r);
            rate = Some(layer.handle());
            svc = BoxCloneSyncService::new(layer.layer(svc));
        }
        let svc = if bare {
            drop(svc);
            BoxCloneSyncService::new(Guarded {
                inner: shared,
                state: state.clone(),
                validate: self.validate.clone(),
            })
        } else {
            BoxCloneSyncService::new(Guarded {
                inner: svc,
                state: state.clone(),
                validate: self.validate.clone(),
            })
        };
        let handle = StackHandle {
            inner: Arc::new(HandleInner {
                registry,
                add,
                remove,
                balance: balance_handle,
                affinity,
                rate,
                rate_per_key,
                concurrency,
                bandwidth,
                state,
            }),
        };
        Ok((svc, handle))
    }
}

/// `endpoint` under the user's endpoint layers: replies type-erased on the way through
/// them, restored above.
fn with_endpoint_layers<T, U, S>(endpoint: S, layers: &[EndpointLayerFn<T>]) -> StackService<T, U>
where
    T: Send + 'static,
    U: Send + 'static,
    S: Service<Request<T>, Response = Response<U>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let erased: EndpointService<T> =
        BoxCloneSyncService::new(endpoint.map_response(|r: Response<U>| Response {
            body: Reply(Box::new(r.body)),
            extensions: r.extensions,
        }));
    let layered = layers.iter().fold(erased, |svc, layer| layer(svc));
    BoxCloneSyncService::new(layered.and_then(|r: Response<Reply>| async move {
        match r.body.0.downcast::<U>() {
            Ok(body) => Ok(Response {
                body: *body,
                extensions: r.extensions,
            }),
            Err(_) => Err(BoxError::from(
                "an endpoint layer replaced the reply with a value of another type",
            )),
        }
    }))
}

/// Boxes a picker made at run time.
struct BoxedPick(Box<dyn Pick>);

impl Pick for BoxedPick {
    fn pick(
        &mut self,
        endpoints: &dyn marina_balance::Endpoints,
        hint: Option<&marina_core::RouteHint>,
    ) -> usize {
        self.0.pick(endpoints, hint)
    }
}

/// TCP (through the bandwidth limiter), then the protocol.
struct ProtocolConnector<C> {
    tcp: BandwidthLimit<TcpConnector>,
    proto: ProtoFn<C>,
}

impl<C> Clone for ProtocolConnector<C> {
    fn clone(&self) -> Self {
        ProtocolConnector {
            tcp: self.tcp.clone(),
            proto: self.proto.clone(),
        }
    }
}

impl<C: Send + 'static> Service<SocketAddr> for ProtocolConnector<C> {
    type Response = C;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<C, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<SocketAddr>::poll_ready(&mut self.tcp, cx).map_err(Into::into)
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        let connect = self.tcp.call(addr);
        let proto = self.proto.clone();
        Box::pin(async move {
            let conn = connect.await?;
            Ok(proto(conn).await?)
        })
    }
}

/// The stack refuses new requests: it is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuttingDown;

impl fmt::Display for ShuttingDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the stack is shutting down")
    }
}

impl std::error::Error for ShuttingDown {}

#[derive(Default)]
struct ShutdownState {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Counts requests in flight and refuses new ones once shutting down (and bad ones
/// always).
struct Guarded<S, T> {
    inner: S,
    state: Arc<ShutdownState>,
    validate: Option<ValidateFn<T>>,
}

impl<S: Clone, T> Clone for Guarded<S, T> {
    fn clone(&self) -> Self {
        Guarded {
            inner: self.inner.clone(),
            state: self.state.clone(),
            validate: self.validate.clone(),
        }
    }
}

struct InFlight(Arc<ShutdownState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl<S, T> Service<Request<T>> for Guarded<S, T>
where
    S: Service<Request<T>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = GuardedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.state.closed.load(Acquire) {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<T>) -> Self::Future {
        // Counted before the check: a shutdown starting in between sees this request.
        self.state.in_flight.fetch_add(1, AcqRel);
        let guard = InFlight(self.state.clone());
        let failed = |error: BoxError| GuardedFuture {
            inner: None,
            error: Some(error),
            guard: None,
        };
        if self.state.closed.load(Acquire) {
            return failed(ShuttingDown.into());
        }
        if let Some(validate) = &self.validate
            && let Err(e) = validate(&req.body)
        {
            return failed(e);
        }
        GuardedFuture {
            inner: Some(self.inner.call(req)),
            error: None,
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request through the shutdown guard: counted in flight until it completes or
    /// is dropped.
    struct GuardedFuture<F> {
        #[pin]
        inner: Option<F>,
        error: Option<BoxError>,
        guard: Option<InFlight>,
    }
}

impl<F, R> Future for GuardedFuture<F>
where
    F: Future<Output = Result<R, BoxError>>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        match this.inner.as_mut().as_pin_mut() {
            Some(f) => {
                let out = std::task::ready!(f.poll(cx));
                this.inner.set(None);
                drop(this.guard.take());
                Poll::Ready(out)
            }
            None => Poll::Ready(Err(this
                .error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
    }
}

struct PoolEntry {
    addr: SocketAddr,
    /// False once removed (its pool drains and closes).
    active: bool,
    stats: Box<dyn Fn() -> PoolStats + Send + Sync>,
    close: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    health: Option<HealthHandle>,
}

/// The backends the stack has made, current and removed (removed ones drain, then
/// their pools close at shutdown).
#[derive(Default)]
struct Registry {
    entries: std::sync::Mutex<Vec<PoolEntry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PoolEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

type AddFn = Arc<dyn Fn(SocketAddr) -> Result<(), BoxError> + Send + Sync>;
type RemoveFn = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

struct HandleInner {
    registry: Arc<Registry>,
    add: AddFn,
    remove: RemoveFn,
    balance: BalanceHandle,
    affinity: Option<AffinityHandle>,
    rate: Option<RateLimitHandle>,
    rate_per_key: Option<RateLimitHandle>,
    concurrency: Vec<ConcurrencyHandle>,
    bandwidth: Option<Arc<Bucket>>,
    state: Arc<ShutdownState>,
}

/// The stack's stats and shutdown, readable from anywhere.
#[derive(Clone)]
pub struct StackHandle {
    inner: Arc<HandleInner>,
}

impl fmt::Debug for StackHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackHandle").finish_non_exhaustive()
    }
}

/// One backend's figures in [`StackStats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BackendStats {
    /// Its address.
    pub addr: SocketAddr,
    /// Its pool.
    pub pool: PoolStats,
    /// Its health status (with health checks on).
    pub health: Option<Status>,
    /// The balancer's view of it.
    pub balance: Option<EndpointSnapshot>,
}

/// Everything the stack knows, in one snapshot; `Display` prints it as a table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StackStats {
    /// Per backend.
    pub backends: Vec<BackendStats>,
    /// The balancer's totals.
    pub balance: BalanceTotals,
    /// Sessions, with affinity on.
    pub affinity: Option<AffinityStats>,
    /// The global rate limiter, if any.
    pub rate: Option<RateStats>,
    /// The per-key rate limiter, if any.
    pub rate_per_key: Option<RateStats>,
    /// The per-key concurrency limiters.
    pub concurrency: Vec<ConcurrencyStats>,
    /// Bytes written through the bandwidth limit, the current rate and the limit.
    pub bandwidth: Option<(u64, u64, f64)>,
    /// Requests in flight through the stack.
    pub in_flight: usize,
}

impl StackHandle {
    /// Gathers pool, health, balance, session and limiter stats.
    pub fn stats(&self) -> StackStats {
        let i = &self.inner;
        let eps = i.balance.stats();
        let backends = i
            .registry
            .lock()
            .iter()
            .map(|p| BackendStats {
                addr: p.addr,
                pool: (p.stats)(),
                health: p.health.as_ref().map(HealthHandle::status),
                balance: eps
                    .iter()
                    .find(|e| e.key == format!("{:?}", p.addr))
                    .cloned(),
            })
            .collect();
        StackStats {
            backends,
            balance: i.balance.totals(),
            affinity: i.affinity.as_ref().map(AffinityHandle::stats),
            rate: i.rate.as_ref().map(RateLimitHandle::stats),
            rate_per_key: i.rate_per_key.as_ref().map(RateLimitHandle::stats),
            concurrency: i.concurrency.iter().map(ConcurrencyHandle::stats).collect(),
            bandwidth: i
                .bandwidth
                .as_ref()
                .map(|b| (b.bytes(), b.current_rate(), b.limit())),
            in_flight: i.state.in_flight.load(Acquire),
        }
    }

    /// The health handle of the backend at `addr` (the latest one added there).
    pub fn health(&self, addr: SocketAddr) -> Option<HealthHandle> {
        self.inner
            .registry
            .lock()
            .iter()
            .rev()
            .find(|p| p.addr == addr)
            .and_then(|p| p.health.clone())
    }

    /// Adds a backend at run time (service discovery): a pool and health checks for it,
    /// then the balancer picks it up on its next request. Fails for a backend already
    /// in the stack, and after [`shutdown`](Self::shutdown).
    pub fn add_endpoint(&self, addr: SocketAddr) -> Result<(), BoxError> {
        (self.inner.add)(addr)
    }

    /// Follows a discovery stream of backend addresses (`Change::Insert(addr, ())`,
    /// `Change::Remove(addr)`, as any `tower::discover::Discover` of addresses yields):
    /// a task applies each change with [`add_endpoint`](Self::add_endpoint) /
    /// [`remove_endpoint`](Self::remove_endpoint) until the stream ends or the stack
    /// shuts down. Needs a tokio runtime.
    pub fn follow<D>(&self, discovery: D) -> tokio::task::JoinHandle<()>
    where
        D: futures_core::Stream<Item = Change<SocketAddr, ()>> + Send + 'static,
    {
        let handle = self.clone();
        tokio::spawn(async move {
            let mut discovery = std::pin::pin!(discovery);
            while let Some(change) =
                std::future::poll_fn(|cx| discovery.as_mut().poll_next(cx)).await
            {
                if handle.inner.state.closed.load(Acquire) {
                    return;
                }
                match change {
                    Change::Insert(addr, ()) => {
                        if let Err(e) = handle.add_endpoint(addr) {
                            tracing::warn!(%addr, error = %e, "discovered backend not added");
                        }
                    }
                    Change::Remove(addr) => {
                        handle.remove_endpoint(addr);
                    }
                }
            }
        })
    }

    /// Removes a backend: it gets no new requests, its requests in flight complete,
    /// then its pool closes and it leaves [`stats`](Self::stats). False if no such
    /// backend is in the stack.
    pub fn remove_endpoint(&self, addr: SocketAddr) -> bool {
        (self.inner.remove)(addr)
    }

    /// Graceful shutdown: new requests fail with [`ShuttingDown`] at once; requests in
    /// flight get until `deadline` to finish; then every pool closes (idle connections
    /// dropped, their maintenance tasks ended; connections still checked out close when
    /// they come back). Returns within about `deadline`, with the requests still in
    /// flight when it ran out (0: all finished). Calling it again waits again (the
    /// stack stays closed), with the new deadline.
    ///
    /// Needs a tokio runtime (the shutdown runs on a task of its own).
    ///
    /// # Cancel safety
    ///
    /// Safe to drop: the shutdown runs on its own task and completes in the background
    /// (the stack refuses new requests from the first poll, and its pools close by the
    /// deadline), whether or not anyone still awaits it.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let st = self.inner.state.clone();
        st.closed.store(true, std::sync::atomic::Ordering::Release);
        let work = tokio::spawn(shut_down(st, self.inner.registry.clone(), deadline));
        // Dropping the join handle detaches the task: it completes anyway.
        match work.await {
            Ok(left) => left,
            // The task ended without an answer (its runtime is shutting down).
            Err(_) => self.inner.state.in_flight.load(Acquire),
        }
    }
}

/// A backend's health in the stats table: `healthy`, `ejected (12.3 s left)`, …
fn health_text(status: Status) -> String {
    match status {
        Status::Ejected { until: Some(until) } => {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            format!("ejected ({:.1} s left)", left.as_secs_f64())
        }
        Status::Ejected { until: None } => "ejected (until a probe passes)".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The shutdown's work, on its own task (see [`StackHandle::shutdown`]).
async fn shut_down(st: Arc<ShutdownState>, registry: Arc<Registry>, deadline: Duration) -> usize {
    let start = tokio::time::Instant::now();
    let wait = async {
        loop {
            let idle = st.idle.notified();
            if st.in_flight.load(Acquire) == 0 {
                return;
            }
            idle.await;
        }
    };
    let _ = tokio::time::timeout(deadline, wait).await;
    let left = st.in_flight.load(Acquire);
    // Pools close in the time left (at least a moment, to drop idle connections):
    // `close` waits for checked-out connections to come back.
    let rest = deadline
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(10));
    // Every pool starts closing now (a pool waiting for a stuck connection must not
    // keep the others open).
    let mut closes = tokio::task::JoinSet::new();
    for close in registry.lock().iter().map(|p| (p.close)()) {
        closes.spawn(close);
    }
    let _ = tokio::time::timeout(rest, async { while closes.join_next().await.is_some() {} }).await;
    left
}

impl fmt::Display for StackStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<22} {:>9} {:>7} {:>9} {:>6} {:>5} {:>7} {:>8}  health",
            "backend", "requests", "errors", "in flight", "conns", "idle", "created", "ewma",
        )?;
        for b in &self.backends {
            let (req, err, inf, ewma) = b.balance.as_ref().map_or((0, 0, 0, None), |e| {
                (e.requests, e.errors, e.in_flight, e.ewma_latency)
            });
            writeln!(
                f,
                "{:<22} {:>9} {:>7} {:>9} {:>6} {:>5} {:>7} {:>8}  {}",
                b.addr.to_string(),
                req,
                err,
                inf,
                b.pool.total,
                b.pool.idle,
                b.pool.created,
                ewma.map_or("-".to_string(), |d| format!("{:.2?}", d)),
                b.health.map_or("-".to_string(), health_text),
            )?;
        }
        let t = &self.balance;
        writeln!(
            f,
            "balance: {} requests, {} errors, {} failovers ({} refused by the budget), panic mode {}",
            t.requests, t.errors, t.retries, t.retries_refused, t.panicking
        )?;
        if let Some(a) = &self.affinity {
            writeln!(
                f,
                "sessions: {} now, {} created, {} re-pinned, {} expired, {} purged",
                a.sessions, a.created, a.repinned, a.expired, a.purged
            )?;
        }
        for (what, r) in [
            ("rate limit", &self.rate),
            ("per-key rate limit", &self.rate_per_key),
        ] {
            if let Some(r) = r {
                writeln!(
                    f,
                    "{what}: {} admitted, {} refused, {}/s now, limit {:.0}/s (burst {})",
                    r.admitted, r.rejected, r.current_rate, r.limit_per_second, r.burst
                )?;
            }
        }
        for c in &self.concurrency {
            writeln!(
                f,
                "per-key concurrency (limit {}): {} in flight over {} keys, {} refused, top {:?}",
                c.limit, c.in_flight, c.active_keys, c.rejected, c.top
            )?;
        }
        if let Some((bytes, now, limit)) = self.bandwidth {
            writeln!(
                f,
                "bandwidth: {bytes} bytes written, {now} B/s now, limit {limit:.0} B/s ({:.0}% used)",
                100.0 * now as f64 / limit
            )?;
        }
        Ok(())
    }
}
