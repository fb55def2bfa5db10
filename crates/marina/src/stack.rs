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
pub type StackService<T, U> = BoxCloneSyncService<Request<T>, Response<U>, BoxError>;

type KeyFn<T> = Arc<dyn Fn(&Request<T>) -> Option<String> + Send + Sync>;

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

/// Builds a [`Stack`]; see [`Stack::builder`].
pub struct StackBuilder<T> {
    endpoints: Vec<SocketAddr>,
    pool: Config,
    connect_timeout: Duration,
    health: Option<HealthConfig>,
    probe: Option<ProbeSetup>,
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
        T: Clone + Send + Sync + 'static,
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
            picker: None,
            failover: Some(Failover::new()),
            failfast: Duration::from_secs(10),
            panic_threshold: 0.5,
            affinity: None,
            rate: None,
            rate_per_key: None,
            concurrency: Vec::new(),
            bandwidth: None,
        }
    }
}

impl<T> StackBuilder<T>
where
    T: Clone + Send + Sync + 'static,
{
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

    /// The TCP connect timeout (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Passive health checks with `config` (default on); `None` turns them off.
    pub fn health(mut self, config: Option<HealthConfig>) -> Self {
        self.health = config;
        self
    }

    /// Active health checks: `probe` (for example `marina::health::LineProbe`,
    /// `TcpConnectProbe`, `HttpProbe`) run against each backend's address every
    /// `active.interval`, besides the passive checks (turned on with defaults if they
    /// were off).
    pub fn probe<P>(mut self, active: ActiveConfig, probe: P) -> Self
    where
        P: Probe<SocketAddr> + Clone,
    {
        if self.health.is_none() {
            self.health = Some(HealthConfig::default());
        }
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
    /// backends, route to all of them.
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
    pub fn concurrency_per_key(mut self, key: KeyFnBox<T>, limit: usize) -> Self {
        self.concurrency.push((key, limit));
        self
    }

    /// All connections together write at most `bytes_per_sec` (bursts of `burst`).
    pub fn bandwidth(mut self, bytes_per_sec: f64, burst: u64) -> Self {
        self.bandwidth = Some((bytes_per_sec, burst));
        self
    }

    /// Builds the stack over the line protocol ([`LineClient`](crate::line::LineClient)):
    /// requests and responses are lines.
    pub fn build_line(self) -> Result<(StackService<T, String>, StackHandle), BoxError>
    where
        T: Into<String>,
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
            })),
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

    /// Builds the stack: each pooled connection becomes a client with `protocol` (a
    /// handshake, or just a wrapper), optionally checked with `check` at checkout.
    ///
    /// Needs a tokio runtime (pools and health checks spawn
    /// tasks).
    pub fn build<U, C>(
        self,
        protocol: impl Fn(Conn) -> BoxFuture<'static, io::Result<C>> + Send + Sync + 'static,
        check: Option<CheckFn<C>>,
    ) -> Result<(StackService<T, U>, StackHandle), BoxError>
    where
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
        .build(protocol, check)
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
        if b.endpoints.is_empty() {
            return Err("a stack needs at least one endpoint".into());
        }
        if let Some((rate, burst)) = b.bandwidth
            && !(rate.is_finite() && rate > 0.0 && burst > 0)
        {
            return Err(
                format!("bandwidth limit {rate} B/s, burst {burst}: both must be above 0").into(),
            );
        }
        if b.connect_timeout.is_zero() {
            return Err("connect_timeout must be above 0".into());
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
                let endpoint = PoolService::new(pool.clone())
                    .map_request(move |r: Request<T>| body(r.into_body()))
                    .map_response(Response::new)
                    .map_err(Into::<BoxError>::into);
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
    /// flight when it ran out (0: all finished).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after it started leaves the stack refusing new requests, with
    /// the pools open.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let st = &self.inner.state;
        let start = tokio::time::Instant::now();
        st.closed.store(true, std::sync::atomic::Ordering::Release);
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
        for close in self.inner.registry.lock().iter().map(|p| (p.close)()) {
            closes.spawn(close);
        }
        let _ =
            tokio::time::timeout(rest, async { while closes.join_next().await.is_some() {} }).await;
        left
    }
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
                b.health.map_or("-".to_string(), |h| format!("{h:?}")),
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
