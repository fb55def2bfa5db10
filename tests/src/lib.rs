//! Shared test support for marina: echo servers, scriptable connectors.
//!
//! - [`EchoServer`]: a real TCP echo server on `127.0.0.1` that counts accepted
//!   connections and can be shut down (closing every server-side connection) and
//!   restarted on the same port.
//! - [`MemConnector`]: an in-memory connector (`tower::Service<T>` for any target) whose
//!   connects are scripted ([`Step`]): immediate, failing, slow (tokio's clock, so paused
//!   time works), or never finishing. It counts connects started, finished and dropped,
//!   and its [`MemConn`] connections count themselves, so tests can assert that nothing
//!   leaked.
//! - Small helpers: [`echo_round`], [`refused_addr`], [`within`], [`eventually`],
//!   [`yield_until`], [`check_invariants`].
//! - [`tls::TestPki`]: a test CA (rcgen) that issues server certificates, for TLS
//!   echo servers ([`EchoServer::start_tls`]) and the clients that trust it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_pool::PoolStats;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::Service;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// Echo server
// ---------------------------------------------------------------------------------------

/// A TCP echo server on `127.0.0.1`: every byte a client sends is written back.
///
/// It counts accepted connections ([`accepts`](Self::accepts)) and the server-side
/// connections open now ([`open_connections`](Self::open_connections)).
/// [`shutdown`](Self::shutdown) stops accepting and closes every open server-side
/// connection (clients see EOF, or RST if they had unread data in flight);
/// [`restart`](Self::restart) listens again on the same address.
///
/// Dropping the server stops it too (without waiting).
pub struct EchoServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    running: Mutex<Option<Running>>,
    /// Set: every connection is TLS ([`start_tls`](Self::start_tls)).
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshakes: Arc<AtomicUsize>,
}

struct Running {
    accept: JoinHandle<()>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl fmt::Debug for EchoServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EchoServer")
            .field("addr", &self.addr)
            .field("accepts", &self.accepts())
            .field("open", &self.open_connections())
            .field("running", &self.is_running())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Decrements a counter when dropped (however the owning task ends).
struct CountGuard(Arc<AtomicUsize>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl EchoServer {
    /// Starts a server on `127.0.0.1:0` (a free port).
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts a TLS echo server on `127.0.0.1:0`: each connection's TLS handshake with
    /// `acceptor` (see [`tls::TestPki::acceptor`]), then echo inside TLS. Connections
    /// whose handshake fails are closed.
    pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self::start_with(Some(acceptor)).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an echo server on 127.0.0.1:0");
        let addr = listener.local_addr().expect("echo server address");
        let server = EchoServer {
            addr,
            accepts: Arc::new(AtomicUsize::new(0)),
            open: Arc::new(AtomicUsize::new(0)),
            running: Mutex::new(None),
            tls,
            handshakes: Arc::new(AtomicUsize::new(0)),
        };
        server.serve(listener);
        server
    }

    /// TLS handshakes completed (TLS servers only; restarts included). Once one is
    /// counted, what the server sends after its handshake (TLS 1.3 session tickets) is
    /// on the wire.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(SeqCst)
    }

    fn serve(&self, listener: TcpListener) {
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let accepts = self.accepts.clone();
        let open = self.open.clone();
        let tls = self.tls.clone();
        let handshakes = self.handshakes.clone();
        let set = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Accept errors (EMFILE and friends) are transient: back off a little.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                accepts.fetch_add(1, SeqCst);
                open.fetch_add(1, SeqCst);
                let guard = CountGuard(open.clone());
                let mut set = lock(&set);
                // Reap finished connection tasks so the set does not grow for ever.
                while set.try_join_next().is_some() {}
                let tls = tls.clone();
                let handshakes = handshakes.clone();
                set.spawn(async move {
                    let _guard = guard;
                    match tls {
                        None => echo(stream).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                handshakes.fetch_add(1, SeqCst);
                                echo(stream).await;
                            }
                        }
                    }
                });
            }
        });
        *lock(&self.running) = Some(Running { accept, conns });
    }

    /// The address clients connect to (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since the server was first started (restarts included).
    pub fn accepts(&self) -> usize {
        self.accepts.load(SeqCst)
    }

    /// Server-side connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(SeqCst)
    }

    /// True while the server listens (between `start`/`restart` and `shutdown`).
    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Stops accepting and closes every open server-side connection; returns once the
    /// listener and all connection sockets are closed. Does nothing if not running.
    pub async fn shutdown(&self) {
        let Some(Running { accept, conns }) = lock(&self.running).take() else {
            return;
        };
        accept.abort();
        // The accept task owns the listener: once it has ended the port is free and no
        // new connection task can be spawned.
        let _ = accept.await;
        let mut set = std::mem::take(&mut *lock(&conns));
        set.abort_all();
        while set.join_next().await.is_some() {}
    }

    /// Listens again on the same address after [`shutdown`](Self::shutdown). Retries
    /// the bind a bounded number of times (the port may linger for a moment).
    pub async fn restart(&self) -> io::Result<()> {
        assert!(!self.is_running(), "restart() on a running EchoServer");
        let mut last = None;
        for _ in 0..200 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.serve(listener);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Err(last.expect("at least one bind attempt"))
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            r.accept.abort();
            lock(&r.conns).abort_all();
        }
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Writes `msg` to `conn` and reads exactly as many bytes back (one echo round trip).
/// Returns what was read.
pub async fn echo_round<S>(conn: &mut S, msg: &[u8]) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    conn.write_all(msg).await?;
    conn.flush().await?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back).await?;
    Ok(back)
}

/// An address on `127.0.0.1` where nothing listens, so connects to it are refused.
///
/// Returns the socket that holds the port: it is bound but not listening, which keeps
/// the port from being reused (or picked as a connecting socket's own port, a TCP
/// self-connect) while the test runs. Keep it alive as long as the address is used.
pub fn refused_addr() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("create a TCP socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("local address");
    (socket, addr)
}

// ---------------------------------------------------------------------------------------
// In-memory connector
// ---------------------------------------------------------------------------------------

/// What one connect of a [`MemConnector`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Succeeds at once.
    Ok,
    /// Fails at once.
    Fail,
    /// Succeeds after sleeping this long on tokio's clock.
    Slow(Duration),
    /// Fails after sleeping this long on tokio's clock.
    SlowFail(Duration),
    /// Never finishes (until dropped).
    Never,
}

type Behaviour = Arc<dyn Fn(u64) -> Step + Send + Sync>;

struct Shared {
    script: Mutex<VecDeque<Step>>,
    behaviour: Mutex<Behaviour>,
    attempts: AtomicU64,
    started: AtomicUsize,
    succeeded: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    live: Arc<AtomicUsize>,
    next_id: AtomicU64,
    generation: AtomicU64,
}

/// A scriptable in-memory connector: a `Clone` `tower::Service<T>` for any `Debug`
/// target, whose connections are [`MemConn`]s.
///
/// Each connect takes the next [`Step`] from the script ([`script`](Self::script)), or,
/// when the script is empty, asks the behaviour function ([`always`](Self::always),
/// [`behave`](Self::behave); default: [`Step::Ok`]) with the attempt number (from 0).
/// Clones share everything: script, behaviour and counters.
///
/// Counters: connects [`started`](Self::started), [`succeeded`](Self::succeeded),
/// [`failed`](Self::failed) and [`dropped`](Self::dropped) unfinished (cancelled), the
/// connects [`in_flight`](Self::in_flight) now and the most ever at once
/// ([`max_in_flight`](Self::max_in_flight)), and the connections [`live`](Self::live)
/// now (made and not yet dropped).
#[derive(Clone)]
pub struct MemConnector {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemConnector")
            .field("started", &self.started())
            .field("succeeded", &self.succeeded())
            .field("failed", &self.failed())
            .field("dropped", &self.dropped())
            .field("in_flight", &self.in_flight())
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

impl Default for MemConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl MemConnector {
    /// A connector whose connects all succeed at once.
    pub fn new() -> Self {
        MemConnector {
            shared: Arc::new(Shared {
                script: Mutex::new(VecDeque::new()),
                behaviour: Mutex::new(Arc::new(|_| Step::Ok)),
                attempts: AtomicU64::new(0),
                started: AtomicUsize::new(0),
                succeeded: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
                dropped: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                live: Arc::new(AtomicUsize::new(0)),
                next_id: AtomicU64::new(1),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// Every connect not covered by the script does `step`.
    pub fn always(&self, step: Step) -> &Self {
        self.behave(move |_| step.clone())
    }

    /// Every connect not covered by the script does what `f` returns for its attempt
    /// number (counting all connects from 0).
    pub fn behave(&self, f: impl Fn(u64) -> Step + Send + Sync + 'static) -> &Self {
        *lock(&self.shared.behaviour) = Arc::new(f);
        self
    }

    /// Queues steps for the next connects, before the behaviour function applies.
    pub fn script(&self, steps: impl IntoIterator<Item = Step>) -> &Self {
        lock(&self.shared.script).extend(steps);
        self
    }

    /// Connects started (the connector was called).
    pub fn started(&self) -> usize {
        self.shared.started.load(SeqCst)
    }

    /// Connects that produced a connection.
    pub fn succeeded(&self) -> usize {
        self.shared.succeeded.load(SeqCst)
    }

    /// Connects that failed with an error.
    pub fn failed(&self) -> usize {
        self.shared.failed.load(SeqCst)
    }

    /// Connects whose future was dropped before it finished (cancelled).
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(SeqCst)
    }

    /// Connects in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(SeqCst)
    }

    /// The most connects ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(SeqCst)
    }

    /// Connections made and not yet dropped.
    pub fn live(&self) -> usize {
        self.shared.live.load(SeqCst)
    }

    /// Marks every connection made so far as broken: their [`MemConn::is_open`] turns
    /// false (as a peer closing the socket would). Later connections are open.
    pub fn break_all(&self) {
        self.shared.generation.fetch_add(1, SeqCst);
    }

    fn next_step(&self) -> Step {
        let attempt = self.shared.attempts.fetch_add(1, SeqCst);
        if let Some(step) = lock(&self.shared.script).pop_front() {
            return step;
        }
        let f = lock(&self.shared.behaviour).clone();
        f(attempt)
    }
}

/// Counts a connect in flight; on drop before `done`, counts it as dropped.
struct ConnectGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl ConnectGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.started.fetch_add(1, SeqCst);
        let now = shared.in_flight.fetch_add(1, SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, SeqCst);
        ConnectGuard {
            shared,
            done: false,
        }
    }
}

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.dropped.fetch_add(1, SeqCst);
        }
        self.shared.in_flight.fetch_sub(1, SeqCst);
    }
}

/// The future of a [`MemConnector`] connect.
pub struct MemConnectFuture {
    inner: Pin<Box<dyn Future<Output = io::Result<MemConn>> + Send>>,
}

impl fmt::Debug for MemConnectFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemConnectFuture").finish_non_exhaustive()
    }
}

impl Future for MemConnectFuture {
    type Output = io::Result<MemConn>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T: fmt::Debug> Service<T> for MemConnector {
    type Response = MemConn;
    type Error = io::Error;
    type Future = MemConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: T) -> Self::Future {
        let step = self.next_step();
        let target = format!("{target:?}");
        let mut guard = ConnectGuard::new(self.shared.clone());
        MemConnectFuture {
            inner: Box::pin(async move {
                let ok = match step {
                    Step::Ok => true,
                    Step::Fail => false,
                    Step::Slow(d) => {
                        tokio::time::sleep(d).await;
                        true
                    }
                    Step::SlowFail(d) => {
                        tokio::time::sleep(d).await;
                        false
                    }
                    Step::Never => std::future::pending().await,
                };
                let shared = guard.shared.clone();
                guard.done = true;
                drop(guard);
                if ok {
                    shared.succeeded.fetch_add(1, SeqCst);
                    Ok(MemConn::new(shared))
                } else {
                    shared.failed.fetch_add(1, SeqCst);
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("in-memory connect to {target} refused (scripted)"),
                    ))
                }
            }),
        }
    }
}

/// A connection made by a [`MemConnector`]. Counts itself in the connector's
/// [`live`](MemConnector::live) counter until dropped.
///
/// It is also a `tower::Service<Duration>`: a request takes that long (tokio's clock) to
/// answer, and the answer is the connection's id — handy for request-level tests.
pub struct MemConn {
    id: u64,
    uses: u64,
    generation: u64,
    shared: Arc<Shared>,
}

impl MemConn {
    fn new(shared: Arc<Shared>) -> Self {
        shared.live.fetch_add(1, SeqCst);
        MemConn {
            id: shared.next_id.fetch_add(1, SeqCst),
            uses: 0,
            generation: shared.generation.load(SeqCst),
            shared,
        }
    }

    /// The connector's id for this connection (from 1, increasing).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Records one use of the connection; returns how many there were, this one included.
    pub fn use_it(&mut self) -> u64 {
        self.uses += 1;
        self.uses
    }

    /// Uses recorded with [`use_it`](Self::use_it), plus requests served as a `Service`.
    pub fn uses(&self) -> u64 {
        self.uses
    }

    /// False once [`MemConnector::break_all`] was called after this connection was made.
    pub fn is_open(&self) -> bool {
        self.shared.generation.load(SeqCst) == self.generation
    }
}

impl fmt::Debug for MemConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemConn")
            .field("id", &self.id)
            .field("uses", &self.uses)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for MemConn {
    fn drop(&mut self) {
        self.shared.live.fetch_sub(1, SeqCst);
    }
}

impl Service<Duration> for MemConn {
    type Response = u64;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<u64>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, took: Duration) -> Self::Future {
        self.uses += 1;
        let id = self.id;
        Box::pin(async move {
            tokio::time::sleep(took).await;
            Ok(id)
        })
    }
}

// ---------------------------------------------------------------------------------------
// Waiting and checking
// ---------------------------------------------------------------------------------------

/// Awaits `f`, panicking with `what` if it takes longer than `limit` (tokio's clock).
/// Keeps every test bounded even when the code under test hangs.
pub async fn within<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

/// Yields to the scheduler up to `max_yields` times until `pred` holds; returns whether
/// it did. Does not touch the clock, so it is safe under paused time.
pub async fn yield_until(max_yields: usize, mut pred: impl FnMut() -> bool) -> bool {
    for _ in 0..max_yields {
        if pred() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    pred()
}

/// Polls `pred` (yielding, then sleeping 1 ms between tries) until it holds or `limit`
/// has passed on tokio's clock; returns whether it held. For real-time tests (sockets,
/// multi-threaded runtimes); under paused time each sleep advances the clock.
pub async fn eventually(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..8 {
            if pred() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        if start.elapsed() >= limit {
            return pred();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Asserts the bookkeeping identities a pool's stats must satisfy when no checkout or
/// connect is in progress: `acquired == released + active`,
/// `created == destroyed + total`, `total == idle + active`, `total <= max_size` (when
/// the pool was not shrunk below its open connections), and one [`ConnStats`] entry
/// per open connection.
///
/// [`ConnStats`]: marina_pool::ConnStats
#[track_caller]
pub fn check_invariants(s: &PoolStats) {
    assert_eq!(
        s.acquired,
        s.released + s.active as u64,
        "acquired == released + active: {s:#?}"
    );
    assert_eq!(
        s.created,
        s.destroyed + s.total as u64,
        "created == destroyed + total: {s:#?}"
    );
    assert_eq!(s.total, s.idle + s.active, "total == idle + active: {s:#?}");
    assert!(s.total <= s.max_size, "total <= max_size: {s:#?}");
    assert_eq!(
        s.connections.len(),
        s.total,
        "one ConnStats per open connection: {s:#?}"
    );
}

/// A generous real-time bound for anything that should be quick.
pub const LIMIT: Duration = Duration::from_secs(10);

/// A configuration for paused-time tests over [`MemConnector`]: no health checks, no
/// expiry, eviction every second, 30 s acquire timeout.
pub fn mem_config(max_size: usize) -> marina_pool::Config {
    marina_pool::Config {
        min_idle: 0,
        max_size,
        acquire_timeout: Some(Duration::from_secs(30)),
        idle_timeout: None,
        max_lifetime: None,
        health_check_interval: None,
        eviction_interval: Duration::from_secs(1),
        ..marina_pool::Config::default()
    }
}

// ---------------------------------------------------------------------------------------
// Line client over TCP (request-level services for PoolService and balancers)
// ---------------------------------------------------------------------------------------

/// Opens [`LineClient`]s over TCP: a `Clone` `tower::Service<SocketAddr>` wrapping
/// [`TcpConnector`](marina_pool::TcpConnector), so a `Pool` of them can back a
/// [`PoolService`](marina_pool::PoolService) whose requests are lines.
#[derive(Debug, Clone, Default)]
pub struct LineConnector {
    tcp: marina_pool::TcpConnector,
}

impl LineConnector {
    /// Connects with `TcpConnector::new()` (no connect timeout of its own: the pool's
    /// `connect_timeout` bounds it).
    pub fn new() -> Self {
        Self::default()
    }
}

/// The future of a [`LineConnector`] connect.
pub struct LineConnectFuture {
    inner: Pin<Box<dyn Future<Output = Result<LineClient, marina_pool::ConnectError>> + Send>>,
}

impl fmt::Debug for LineConnectFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineConnectFuture").finish_non_exhaustive()
    }
}

impl Future for LineConnectFuture {
    type Output = Result<LineClient, marina_pool::ConnectError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<SocketAddr> for LineConnector {
    type Response = LineClient;
    type Error = marina_pool::ConnectError;
    type Future = LineConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<SocketAddr>::poll_ready(&mut self.tcp, cx)
    }

    fn call(&mut self, addr: SocketAddr) -> Self::Future {
        let connect = self.tcp.call(addr);
        LineConnectFuture {
            inner: Box::pin(async move { Ok(LineClient::new(connect.await?)) }),
        }
    }
}

/// A client of a line protocol on one TCP connection, for an echo server: marina's
/// [`marina::line::LineClient`] (one line out, one line back; a failed or cancelled
/// call leaves it broken).
pub type LineClient = marina::line::LineClient<TcpStream>;

/// A pool configuration for [`LineClient`]s: at most `max_size` connections, 2 s to
/// acquire, 1 s to connect, no background health checks, no expiry, and no checkout
/// check (a client whose peer went away is handed out, and fails when used).
pub fn line_pool_builder(max_size: usize) -> marina_pool::Builder {
    marina_pool::Pool::builder()
        .max_size(max_size)
        .acquire_timeout(Some(Duration::from_secs(2)))
        .connect_timeout(Some(Duration::from_secs(1)))
        .health_check_interval(None)
        .no_expiry()
}

/// A pool of [`LineClient`]s to `addr` configured by [`line_pool_builder`], plus a
/// checkout check (`LineClient::is_open_with`) that closes clients whose peer went away
/// instead of handing them out.
pub fn line_pool(
    addr: SocketAddr,
    max_size: usize,
) -> marina_pool::Pool<LineConnector, SocketAddr> {
    line_pool_builder(max_size)
        .check(|c: &mut LineClient| c.is_open_with(marina_pool::socket_is_open))
        .build(LineConnector::new(), addr)
        .expect("a valid line pool configuration")
}

/// Binds (without listening) the port of `addr`, once the server that listened there
/// has shut down, so connects to it are refused and the port is neither reused nor
/// picked as a connecting socket's own port (a TCP self-connect) while the returned
/// socket lives. Sets `SO_REUSEADDR`, so server-side connections lingering in
/// `TIME_WAIT` do not block it.
pub fn hold_port(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

// ---------------------------------------------------------------------------------------
// Line endpoints with extensions (affinity and balancer stacks)
// ---------------------------------------------------------------------------------------

/// In a response's extensions: the backend that served it (the index given to
/// [`line_endpoint`]). Set by the endpoint that produced the response, so it names
/// where a request really went, failovers included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServedBy(pub usize);

/// A boxed line endpoint taking and giving extensions: what [`line_endpoint`] returns.
pub type LineEndpoint = tower::util::BoxCloneService<
    marina_core::Request<String>,
    marina_core::Response<String>,
    marina_core::BoxError,
>;

/// A `PoolService` over `pool` adapted to `marina_core::Request<String>` and
/// `marina_core::Response<String>` (the extensions the affinity layer and the balancer's
/// route hints need): the request's body is the line sent; the response carries the
/// line read back and [`ServedBy(backend)`](ServedBy).
pub fn line_endpoint(
    pool: marina_pool::Pool<LineConnector, SocketAddr>,
    backend: usize,
) -> LineEndpoint {
    use tower::ServiceExt;
    marina_pool::PoolService::new(pool)
        .map_request(|req: marina_core::Request<String>| req.into_body())
        .map_response(move |line: String| {
            let mut resp = marina_core::Response::new(line);
            resp.extensions.insert(ServedBy(backend));
            resp
        })
        .boxed_clone()
}

// ---------------------------------------------------------------------------------------
// Line server (tagged, slow or held replies)
// ---------------------------------------------------------------------------------------

/// How a [`LineServer`] answers each line it reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineServerOptions {
    /// Reply `"<port> <line>"` instead of `"<line>"`, so a client sees which backend
    /// answered (read it back with [`split_tag`]).
    pub tag: bool,
    /// Wait this long (tokio's clock) before each reply.
    pub delay: Duration,
    /// Hold every reply until [`LineServer::release`] is called.
    pub hold: bool,
}

/// A line server on `127.0.0.1`: reads `\n`-terminated lines and answers each with one
/// line, as [`LineServerOptions`] say (by default, the line itself: an echo).
///
/// Like [`EchoServer`] it counts accepted connections and open server-side connections,
/// and can be shut down (closing every server-side connection) and restarted on the
/// same port. It also counts the lines it read ([`lines`](Self::lines)) and keeps the
/// most server-side connections ever open at once
/// ([`max_open_connections`](Self::max_open_connections)).
pub struct LineServer {
    addr: SocketAddr,
    options: LineServerOptions,
    accepts: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    lines: Arc<AtomicUsize>,
    released: tokio::sync::watch::Sender<bool>,
    running: Mutex<Option<Running>>,
}

impl fmt::Debug for LineServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineServer")
            .field("addr", &self.addr)
            .field("options", &self.options)
            .field("accepts", &self.accepts())
            .field("open", &self.open_connections())
            .field("max_open", &self.max_open_connections())
            .field("lines", &self.lines())
            .field("running", &self.is_running())
            .finish()
    }
}

impl LineServer {
    /// Starts a server on `127.0.0.1:0` (a free port) answering as `options` say.
    pub async fn start(options: LineServerOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a line server on 127.0.0.1:0");
        let addr = listener.local_addr().expect("line server address");
        let server = LineServer {
            addr,
            options,
            accepts: Arc::new(AtomicUsize::new(0)),
            open: Arc::new(AtomicUsize::new(0)),
            max_open: Arc::new(AtomicUsize::new(0)),
            lines: Arc::new(AtomicUsize::new(0)),
            released: tokio::sync::watch::channel(false).0,
            running: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    /// A plain line echo server.
    pub async fn echo() -> Self {
        Self::start(LineServerOptions::default()).await
    }

    /// A line echo server whose replies carry its port: `"<port> <line>"`.
    pub async fn tagged() -> Self {
        Self::start(LineServerOptions {
            tag: true,
            ..LineServerOptions::default()
        })
        .await
    }

    fn serve(&self, listener: TcpListener) {
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let set = conns.clone();
        let (accepts, open, max_open) = (
            self.accepts.clone(),
            self.open.clone(),
            self.max_open.clone(),
        );
        let lines = self.lines.clone();
        let options = self.options;
        let port = self.addr.port();
        let released = self.released.subscribe();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                accepts.fetch_add(1, SeqCst);
                let now = open.fetch_add(1, SeqCst) + 1;
                max_open.fetch_max(now, SeqCst);
                let guard = CountGuard(open.clone());
                let lines = lines.clone();
                let released = released.clone();
                let mut set = lock(&set);
                while set.try_join_next().is_some() {}
                set.spawn(async move {
                    let _guard = guard;
                    serve_lines(stream, options, port, lines, released).await;
                });
            }
        });
        *lock(&self.running) = Some(Running { accept, conns });
    }

    /// The address clients connect to (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since the server was first started (restarts included).
    pub fn accepts(&self) -> usize {
        self.accepts.load(SeqCst)
    }

    /// Server-side connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(SeqCst)
    }

    /// The most server-side connections ever open at once.
    pub fn max_open_connections(&self) -> usize {
        self.max_open.load(SeqCst)
    }

    /// Lines read (each answered, or being answered).
    pub fn lines(&self) -> usize {
        self.lines.load(SeqCst)
    }

    /// True while the server listens.
    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Lets held replies go (with [`LineServerOptions::hold`]), now and from then on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Stops accepting and closes every open server-side connection; returns once the
    /// listener and all connection sockets are closed. Does nothing if not running.
    pub async fn shutdown(&self) {
        let Some(Running { accept, conns }) = lock(&self.running).take() else {
            return;
        };
        accept.abort();
        let _ = accept.await;
        let mut set = std::mem::take(&mut *lock(&conns));
        set.abort_all();
        while set.join_next().await.is_some() {}
    }

    /// Listens again on the same address after [`shutdown`](Self::shutdown), retrying
    /// the bind a bounded number of times.
    pub async fn restart(&self) -> io::Result<()> {
        assert!(!self.is_running(), "restart() on a running LineServer");
        let mut last = None;
        for _ in 0..200 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.serve(listener);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Err(last.expect("at least one bind attempt"))
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.running).take() {
            r.accept.abort();
            lock(&r.conns).abort_all();
        }
    }
}

async fn serve_lines(
    stream: TcpStream,
    options: LineServerOptions,
    port: u16,
    lines: Arc<AtomicUsize>,
    mut released: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::AsyncBufReadExt;
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = read.next_line().await {
        lines.fetch_add(1, SeqCst);
        if !options.delay.is_zero() {
            tokio::time::sleep(options.delay).await;
        }
        if options.hold && released.wait_for(|r| *r).await.is_err() {
            return;
        }
        let reply = if options.tag {
            format!("{port} {line}\n")
        } else {
            format!("{line}\n")
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Splits a tagged [`LineServer`] reply `"<port> <line>"` into the port and the line.
pub fn split_tag(reply: &str) -> Option<(u16, &str)> {
    let (port, line) = reply.split_once(' ')?;
    Some((port.parse().ok()?, line))
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

/// Certificates made in the test (rcgen), and the rustls configurations around them.
pub mod tls {
    use std::sync::Arc;

    use marina_pool::tls::TlsConfig;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use rustls::RootCertStore;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A test certificate authority: issues server certificates for any names, and
    /// gives the client settings that trust it.
    pub struct TestPki {
        ca: CertifiedIssuer<'static, KeyPair>,
    }

    impl std::fmt::Debug for TestPki {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestPki").finish_non_exhaustive()
        }
    }

    impl TestPki {
        /// A new CA named `name` (its own key pair: two `TestPki`s do not trust each
        /// other's certificates).
        pub fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("CA key");
            TestPki {
                ca: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
            }
        }

        /// The CA certificate, PEM.
        pub fn ca_pem(&self) -> String {
            self.ca.pem()
        }

        /// A root store holding this CA.
        pub fn roots(&self) -> RootCertStore {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).expect("add the test CA");
            roots
        }

        /// Client settings that trust this CA (and nothing else).
        pub fn client(&self) -> TlsConfig {
            TlsConfig::with_roots(self.roots())
        }

        /// A server configuration with a certificate for `names` (DNS names or IP
        /// addresses) issued by this CA, offering `alpn`.
        pub fn server_config(&self, names: &[&str], alpn: &[&str]) -> rustls::ServerConfig {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let key = KeyPair::generate().expect("server key");
            let cert = CertificateParams::new(names)
                .expect("server params")
                .signed_by(&key, &self.ca)
                .expect("sign the server certificate");
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            #[allow(deprecated)] // ring's provider: see marina_pool::tls ("Why ring").
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .expect("server certificate and key");
            config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            config
        }

        /// A TLS acceptor with a certificate for `names`, for
        /// [`EchoServer::start_tls`](crate::EchoServer::start_tls).
        pub fn acceptor(&self, names: &[&str]) -> tokio_rustls::TlsAcceptor {
            tokio_rustls::TlsAcceptor::from(Arc::new(self.server_config(names, &[])))
        }
    }
}
