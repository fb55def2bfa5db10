//! `BandwidthLimit<C>`: throttled connections from any connector.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::instruments::{BandwidthMetrics, Meter, Name};
use crate::invalid::{InvalidLimit, check_rate, or_panic};

/// A connection moved data more slowly than the minimum rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TooSlow {
    /// Its rate over the last measured window, bytes/s.
    pub rate: f64,
    /// The minimum, bytes/s.
    pub min_rate: f64,
}

impl fmt::Display for TooSlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer too slow: {:.1} B/s while transferring, below the minimum {:.1} B/s",
            self.rate, self.min_rate
        )
    }
}

impl std::error::Error for TooSlow {}

/// A byte budget: GCRA over bytes (a token bucket), shared by the connections it
/// throttles. Bytes are charged before they move, at most a chunk (50 ms of rate, at
/// least 1 byte, at most the burst) at a time, so traffic is smooth; bytes charged but
/// not moved are refunded.
pub struct Bucket {
    /// Nanoseconds per byte.
    ns_per_byte: f64,
    /// The burst, in nanoseconds of credit.
    burst_ns: f64,
    chunk: usize,
    /// Theoretical arrival time, in ns since `origin`.
    tat: AtomicU64,
    origin: Instant,
    moved: AtomicU64,
    window: Window,
    rate: f64,
    burst: u64,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("bytes_per_sec", &self.rate)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

/// Bytes per second over the current and previous whole second.
#[derive(Default)]
struct Window {
    current: AtomicU64,
    count: AtomicU64,
    previous: AtomicU64,
}

impl Window {
    fn add(&self, sec: u64, n: u64) {
        let cur = self.current.load(Relaxed);
        if sec != cur {
            let c = self.count.swap(0, Relaxed);
            self.previous
                .store(if sec == cur + 1 { c } else { 0 }, Relaxed);
            self.current.store(sec, Relaxed);
        }
        self.count.fetch_add(n, Relaxed);
    }

    fn rate(&self, sec: u64) -> u64 {
        let cur = self.current.load(Relaxed);
        if sec == cur {
            self.previous.load(Relaxed)
        } else if sec == cur + 1 {
            self.count.load(Relaxed)
        } else {
            0
        }
    }
}

impl Bucket {
    /// `bytes_per_sec` on average, bursts of `burst` bytes.
    ///
    /// `bytes_per_sec` is in bytes per second, finite and at least 1 (fractions
    /// allowed). `burst` is in bytes, at least 1; one under 2 ms of rate is raised to
    /// 2 ms of rate, as waits are timed in milliseconds.
    ///
    /// # Panics
    ///
    /// If either is out of range, with [`try_new`](Self::try_new)'s message
    /// (`bandwidth_bytes_per_sec: must be above 0, got 0`).
    #[track_caller]
    pub fn new(bytes_per_sec: f64, burst: u64) -> Arc<Self> {
        or_panic(Self::try_new(bytes_per_sec, burst))
    }

    /// `bytes_per_sec` on average, bursts of `burst` bytes, or [`InvalidLimit`] on the
    /// field `bandwidth_bytes_per_sec` (NaN, not above 0, infinite, under 1) or
    /// `bandwidth_burst` (0).
    pub fn try_new(bytes_per_sec: f64, burst: u64) -> Result<Arc<Self>, InvalidLimit> {
        check_bandwidth(bytes_per_sec, burst)?;
        // Waits are timed by tokio's 1 ms timer: a burst under 2 ms of rate would cap
        // the real rate at about `burst` bytes per millisecond.
        let burst = burst.max((bytes_per_sec / 500.0).ceil() as u64);
        let ns_per_byte = 1e9 / bytes_per_sec;
        let chunk = ((bytes_per_sec / 20.0) as u64).clamp(1, burst) as usize;
        Ok(Arc::new(Bucket {
            ns_per_byte,
            burst_ns: burst as f64 * ns_per_byte,
            chunk,
            tat: AtomicU64::new(0),
            origin: Instant::now(),
            moved: AtomicU64::new(0),
            window: Window::default(),
            rate: bytes_per_sec,
            burst,
        }))
    }

    fn now_ns(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos() as u64
    }

    /// Charges up to `want` bytes now: how many, or how long until a chunk fits.
    fn reserve(&self, want: usize) -> Result<usize, Duration> {
        let want = want.min(self.chunk).max(1);
        let now = self.now_ns();
        let mut tat = self.tat.load(Acquire);
        loop {
            let base = tat.max(now);
            let debt = (base - now) as f64;
            let room = ((self.burst_ns - debt) / self.ns_per_byte).floor();
            if room < want as f64 {
                // Wait until the whole chunk fits (no dribbling of single bytes).
                let wait = debt + want as f64 * self.ns_per_byte - self.burst_ns;
                return Err(Duration::from_nanos(wait.max(1.0) as u64));
            }
            let next = base.saturating_add((want as f64 * self.ns_per_byte).round() as u64);
            match self.tat.compare_exchange_weak(tat, next, AcqRel, Acquire) {
                Ok(_) => return Ok(want),
                Err(t) => tat = t,
            }
        }
    }

    /// Gives back `n` bytes charged but not moved.
    fn refund(&self, n: usize) {
        if n == 0 {
            return;
        }
        let back = (n as f64 * self.ns_per_byte).round() as u64;
        let _ = self
            .tat
            .fetch_update(AcqRel, Acquire, |t| Some(t.saturating_sub(back)));
    }

    fn record(&self, n: usize) {
        self.moved.fetch_add(n as u64, Relaxed);
        self.window.add(self.now_ns() / 1_000_000_000, n as u64);
    }

    /// Bytes moved through this bucket so far.
    pub fn bytes(&self) -> u64 {
        self.moved.load(Relaxed)
    }

    /// Bytes moved in the last whole second.
    pub fn current_rate(&self) -> u64 {
        self.window.rate(self.now_ns() / 1_000_000_000)
    }

    /// The limit, bytes/s.
    pub fn limit(&self) -> f64 {
        self.rate
    }

    /// The burst, bytes.
    pub fn burst(&self) -> u64 {
        self.burst
    }
}

/// One line for people: the rate over the last whole second against the limit, and
/// the bytes moved so far.
///
/// ```
/// use marina_limit::Bucket;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bucket = Bucket::new(1_000_000.0, 64 * 1024);
/// assert_eq!(bucket.to_string(), "0 B/s of 1000000 B/s (burst 65536 B), 0 B moved");
/// # }
/// ```
impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} B/s of {} B/s (burst {} B), {} B moved",
            self.current_rate(),
            self.rate,
            self.burst,
            self.bytes()
        )
    }
}

/// Checks a bandwidth limit's rate and burst (see [`Bucket::new`]).
fn check_bandwidth(bytes_per_sec: f64, burst: u64) -> Result<(), InvalidLimit> {
    check_rate("bandwidth_bytes_per_sec", bytes_per_sec, Some(1.0))?;
    if burst == 0 {
        return Err(InvalidLimit::not_above_zero("bandwidth_burst", burst));
    }
    Ok(())
}

/// One direction's limit: none, one bucket per connection, or one shared.
#[derive(Clone, Debug)]
enum Limit {
    None,
    PerConnection { bytes_per_sec: f64, burst: u64 },
    Shared(Arc<Bucket>),
}

impl Limit {
    fn bucket(&self) -> Option<Arc<Bucket>> {
        match self {
            Limit::None => None,
            Limit::PerConnection {
                bytes_per_sec,
                burst,
            } => Some(Bucket::new(*bytes_per_sec, *burst)),
            Limit::Shared(b) => Some(b.clone()),
        }
    }
}

/// A minimum data rate for writes: a guard against slow peers (Kestrel's is 240 B/s
/// after 5 s). It is measured only while a write waits on the peer (a peer that reads too
/// slowly); a read waiting for a reply is not judged, however long the server takes to
/// answer (that is a request timeout's job), nor is an idle connection. Bytes already
/// in the socket's buffers count as moved, so the first window usually passes: a peer
/// that stops reading is cut off after one to two grace periods.
///
/// [`BandwidthLimit::min_rate`] checks its fields ([`validate`](Self::validate)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinRate {
    /// Bytes per second, measured while a write waits on the peer: finite and above 0
    /// (fractions allowed).
    pub bytes_per_sec: f64,
    /// How long a transfer may wait before the rate is enforced (and the window over
    /// which it is measured): above 0 (a zero grace would judge every write that has
    /// to wait at all). `Duration::MAX`: never enforced.
    pub grace: Duration,
}

impl MinRate {
    /// Checks both fields: the first one out of range, as [`InvalidLimit`] on the
    /// field `min_rate.bytes_per_sec` or `min_rate.grace`.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        check_rate("min_rate.bytes_per_sec", self.bytes_per_sec, None)?;
        if self.grace.is_zero() {
            return Err(InvalidLimit::not_above_zero(
                "min_rate.grace",
                format_args!("{:?}", self.grace),
            ));
        }
        Ok(())
    }
}

/// Throttles the connections a connector makes (any `Service<T>` whose responses are
/// tokio `AsyncRead + AsyncWrite`, so it stacks under marina-pool; the pool's built-in
/// liveness check knows plain `TcpStream`s only, so give it
/// `.check(|c: &mut Throttled<TcpStream>| marina_pool::socket_is_open(c.get_ref()))`):
/// reads and/or writes
/// in bytes/s with a burst, each connection on its own budget or all sharing one
/// ([`shared`](Self::shared): a cap on the whole client's bandwidth). A
/// [`MinRate`] cuts off peers that move data too slowly with [`TooSlow`].
///
/// ```
/// use marina_limit::BandwidthLimit;
/// use tower::service_fn;
///
/// // 1 MiB/s for writes, shared by every connection; reads not limited.
/// let connector = service_fn(|addr: std::net::SocketAddr| tokio::net::TcpStream::connect(addr));
/// let limited = BandwidthLimit::new(connector).shared_write(1024.0 * 1024.0, 64 * 1024);
/// assert_eq!(limited.write_bucket().unwrap().limit(), 1024.0 * 1024.0);
/// ```
///
/// # Sharing
///
/// `Clone` when the connector is. Clones share the budgets set with `shared`,
/// `shared_read` and `shared_write` (one [`Bucket`] behind an `Arc`): every connection
/// any clone makes or [`wrap`](Self::wrap)s draws on them. Per-connection budgets are
/// made afresh for each connection. A setter called on a clone changes that clone
/// only (the `shared` setters make a new bucket), so set the limits before cloning. It is
/// `Send + Sync` when the connector is; a pool clones its connector for each connect,
/// so all of a pool's connections draw on the one shared budget.
#[derive(Clone, Debug)]
pub struct BandwidthLimit<C> {
    inner: C,
    read: Limit,
    write: Limit,
    min_rate: Option<MinRate>,
    name: Name,
    metrics: Arc<BandwidthMetrics>,
}

impl<C> BandwidthLimit<C> {
    /// The default name.
    const NAME: &'static str = "bandwidth";

    /// Wraps `connector`; nothing limited yet. Named `"bandwidth"`
    /// ([`name`](Self::name)).
    pub fn new(connector: C) -> Self {
        let name = Cow::Borrowed(Self::NAME);
        BandwidthLimit {
            inner: connector,
            read: Limit::None,
            write: Limit::None,
            min_rate: None,
            metrics: Arc::new(BandwidthMetrics::new(&name)),
            name,
        }
    }

    /// Names the limit: the value of its `limiter` label in metrics (the `metrics`
    /// feature). Default `"bandwidth"`, so a stack with one bandwidth limit needs no
    /// name. Use a fixed name, never one made from a user's key. Connections made
    /// (or wrapped) from now on count under it; the metrics registered under the
    /// previous name stay.
    ///
    /// ```
    /// use marina_limit::BandwidthLimit;
    ///
    /// let uploads = BandwidthLimit::new(()).shared_write(1e6, 64 * 1024).name("uploads");
    /// assert!(format!("{uploads:?}").contains("uploads"));
    /// ```
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self.metrics = Arc::new(BandwidthMetrics::new(&self.name));
        self
    }

    /// Each connection reads at most `bytes_per_sec` (bursts of `burst` bytes); the
    /// ranges and units are [`Bucket::new`]'s.
    ///
    /// # Panics
    ///
    /// If either is out of range, with [`Bucket::try_new`]'s message.
    #[track_caller]
    pub fn per_connection_read(self, bytes_per_sec: f64, burst: u64) -> Self {
        or_panic(self.try_per_connection_read(bytes_per_sec, burst))
    }

    /// Each connection reads at most `bytes_per_sec`, or [`InvalidLimit`] as
    /// [`Bucket::try_new`] returns it.
    pub fn try_per_connection_read(
        mut self,
        bytes_per_sec: f64,
        burst: u64,
    ) -> Result<Self, InvalidLimit> {
        check_bandwidth(bytes_per_sec, burst)?;
        self.read = Limit::PerConnection {
            bytes_per_sec,
            burst,
        };
        Ok(self)
    }

    /// Each connection writes at most `bytes_per_sec` (bursts of `burst` bytes); the
    /// ranges and units are [`Bucket::new`]'s.
    ///
    /// # Panics
    ///
    /// If either is out of range, with [`Bucket::try_new`]'s message.
    #[track_caller]
    pub fn per_connection_write(self, bytes_per_sec: f64, burst: u64) -> Self {
        or_panic(self.try_per_connection_write(bytes_per_sec, burst))
    }

    /// Each connection writes at most `bytes_per_sec`, or [`InvalidLimit`] as
    /// [`Bucket::try_new`] returns it.
    pub fn try_per_connection_write(
        mut self,
        bytes_per_sec: f64,
        burst: u64,
    ) -> Result<Self, InvalidLimit> {
        check_bandwidth(bytes_per_sec, burst)?;
        self.write = Limit::PerConnection {
            bytes_per_sec,
            burst,
        };
        Ok(self)
    }

    /// All connections together read at most `bytes_per_sec` (bursts of `burst`
    /// bytes); the ranges and units are [`Bucket::new`]'s.
    ///
    /// # Panics
    ///
    /// If either is out of range, with [`Bucket::try_new`]'s message.
    #[track_caller]
    pub fn shared_read(self, bytes_per_sec: f64, burst: u64) -> Self {
        or_panic(self.try_shared_read(bytes_per_sec, burst))
    }

    /// All connections together read at most `bytes_per_sec`, or [`InvalidLimit`] as
    /// [`Bucket::try_new`] returns it.
    pub fn try_shared_read(mut self, bytes_per_sec: f64, burst: u64) -> Result<Self, InvalidLimit> {
        self.read = Limit::Shared(Bucket::try_new(bytes_per_sec, burst)?);
        Ok(self)
    }

    /// All connections together write at most `bytes_per_sec` (bursts of `burst`
    /// bytes): a cap on the whole client's upload bandwidth, what marina's
    /// `limits.bandwidth_bytes_per_sec` setting sets. The ranges and units are
    /// [`Bucket::new`]'s.
    ///
    /// # Panics
    ///
    /// If either is out of range, with [`Bucket::try_new`]'s message.
    #[track_caller]
    pub fn shared_write(self, bytes_per_sec: f64, burst: u64) -> Self {
        or_panic(self.try_shared_write(bytes_per_sec, burst))
    }

    /// All connections together write at most `bytes_per_sec`, or [`InvalidLimit`] as
    /// [`Bucket::try_new`] returns it.
    ///
    /// ```
    /// use marina_limit::BandwidthLimit;
    ///
    /// let err = BandwidthLimit::new(()).try_shared_write(f64::NAN, 64 * 1024).unwrap_err();
    /// assert_eq!(err.to_string(), "bandwidth_bytes_per_sec: must be above 0, got NaN");
    /// let err = BandwidthLimit::new(()).try_shared_write(1e6, 0).unwrap_err();
    /// assert_eq!(err.to_string(), "bandwidth_burst: must be above 0, got 0");
    /// ```
    pub fn try_shared_write(
        mut self,
        bytes_per_sec: f64,
        burst: u64,
    ) -> Result<Self, InvalidLimit> {
        self.write = Limit::Shared(Bucket::try_new(bytes_per_sec, burst)?);
        Ok(self)
    }

    /// All connections together move at most `bytes_per_sec`, reads and writes on one
    /// budget (bursts of `burst` bytes); the ranges and units are [`Bucket::new`]'s.
    ///
    /// # Panics
    ///
    /// If either is out of range, with [`Bucket::try_new`]'s message.
    #[track_caller]
    pub fn shared(self, bytes_per_sec: f64, burst: u64) -> Self {
        or_panic(self.try_shared(bytes_per_sec, burst))
    }

    /// All connections together move at most `bytes_per_sec`, reads and writes on one
    /// budget, or [`InvalidLimit`] as [`Bucket::try_new`] returns it.
    pub fn try_shared(mut self, bytes_per_sec: f64, burst: u64) -> Result<Self, InvalidLimit> {
        let b = Bucket::try_new(bytes_per_sec, burst)?;
        self.read = Limit::Shared(b.clone());
        self.write = Limit::Shared(b);
        Ok(self)
    }

    /// Cuts off connections whose writes move data below `min` while waiting on the
    /// peer.
    ///
    /// # Panics
    ///
    /// If a field of `min` is out of range (see [`MinRate`]), with
    /// [`try_min_rate`](Self::try_min_rate)'s message
    /// (`min_rate.grace: must be above 0, got 0ns`).
    #[track_caller]
    pub fn min_rate(self, min: MinRate) -> Self {
        or_panic(self.try_min_rate(min))
    }

    /// Cuts off connections whose writes move data below `min` while waiting on the
    /// peer, or [`InvalidLimit`] if a field of `min` is out of range
    /// ([`MinRate::validate`]).
    pub fn try_min_rate(mut self, min: MinRate) -> Result<Self, InvalidLimit> {
        min.validate()?;
        self.min_rate = Some(min);
        Ok(self)
    }

    /// The shared read budget, if any (its byte count, current rate and limit).
    pub fn read_bucket(&self) -> Option<&Arc<Bucket>> {
        match &self.read {
            Limit::Shared(b) => Some(b),
            _ => None,
        }
    }

    /// The shared write budget, if any.
    pub fn write_bucket(&self) -> Option<&Arc<Bucket>> {
        match &self.write {
            Limit::Shared(b) => Some(b),
            _ => None,
        }
    }

    /// Wraps an existing connection the same way.
    pub fn wrap<IO>(&self, io: IO) -> Throttled<IO> {
        Throttled::new(
            io,
            self.read.bucket(),
            self.write.bucket(),
            self.min_rate,
            Meter::new(&self.metrics),
        )
    }
}

impl<C, T> Service<T> for BandwidthLimit<C>
where
    C: Service<T>,
{
    type Response = Throttled<C::Response>;
    type Error = C::Error;
    type Future = ConnectFuture<C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, target: T) -> Self::Future {
        ConnectFuture {
            inner: self.inner.call(target),
            read: self.read.clone(),
            write: self.write.clone(),
            min_rate: self.min_rate,
            metrics: self.metrics.clone(),
        }
    }
}

pin_project! {
    /// The future of [`BandwidthLimit`]'s connects.
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops the inner connect.
    pub struct ConnectFuture<F> {
        #[pin]
        inner: F,
        read: Limit,
        write: Limit,
        min_rate: Option<MinRate>,
        metrics: Arc<BandwidthMetrics>,
    }
}

impl<F> fmt::Debug for ConnectFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectFuture").finish_non_exhaustive()
    }
}

impl<F, IO, E> Future for ConnectFuture<F>
where
    F: Future<Output = Result<IO, E>>,
{
    type Output = Result<Throttled<IO>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let io = ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(Throttled::new(
            io,
            this.read.bucket(),
            this.write.bucket(),
            *this.min_rate,
            Meter::new(this.metrics),
        )))
    }
}

/// The slow-peer monitor: time counts only while a read or write waits on the peer.
struct Monitor {
    min: MinRate,
    waiting_since: Option<Instant>,
    waited: Duration,
    bytes: u64,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Monitor {
    /// Before an I/O poll: count the time waited since the last `Pending`.
    fn resume(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += Instant::now().saturating_duration_since(since);
        }
    }

    /// After an I/O poll: `moved` bytes, and whether it is waiting on the peer now.
    fn after(&mut self, moved: usize, pending: bool, cx: &mut Context<'_>) -> io::Result<()> {
        self.bytes += moved as u64;
        if self.waited >= self.min.grace {
            let rate = self.bytes as f64 / self.waited.as_secs_f64();
            if rate < self.min.bytes_per_sec {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    TooSlow {
                        rate,
                        min_rate: self.min.bytes_per_sec,
                    },
                ));
            }
            // A new window.
            self.waited = Duration::ZERO;
            self.bytes = 0;
        }
        if pending {
            let now = Instant::now();
            self.waiting_since = Some(now);
            // Wake up to judge the rate when the window would end (never, for a
            // grace too long to schedule).
            if let Some(at) = now.checked_add(self.min.grace - self.waited) {
                match self.timer.as_mut() {
                    Some(t) => t.as_mut().reset(at),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                if let Some(t) = self.timer.as_mut() {
                    let _ = t.as_mut().poll(cx);
                }
            }
        }
        Ok(())
    }
}

pin_project! {
    /// A connection from [`BandwidthLimit`]: reads and writes go through its budgets.
    ///
    /// # Cancel safety
    ///
    /// A read or write waiting for its budget has charged nothing, and bytes charged
    /// but not moved are refunded at once, so dropping a read or write on it (in a
    /// `select!`, under a timeout) loses no budget: its reads and writes are as cancel
    /// safe as the connection's own.
    pub struct Throttled<IO> {
        #[pin]
        io: IO,
        read: Option<Arc<Bucket>>,
        write: Option<Arc<Bucket>>,
        read_sleep: Option<Pin<Box<Sleep>>>,
        write_sleep: Option<Pin<Box<Sleep>>>,
        monitor: Option<Monitor>,
        meter: Meter,
    }
}

impl<IO> fmt::Debug for Throttled<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttled")
            .field("read", &self.read)
            .field("write", &self.write)
            .finish_non_exhaustive()
    }
}

impl<IO> Throttled<IO> {
    fn new(
        io: IO,
        read: Option<Arc<Bucket>>,
        write: Option<Arc<Bucket>>,
        min_rate: Option<MinRate>,
        meter: Meter,
    ) -> Self {
        Throttled {
            meter,
            io,
            read,
            write,
            read_sleep: None,
            write_sleep: None,
            monitor: min_rate.map(|min| Monitor {
                min,
                waiting_since: None,
                waited: Duration::ZERO,
                bytes: 0,
                timer: None,
            }),
        }
    }

    /// The connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The connection, mutably.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Unwraps the connection.
    pub fn into_inner(self) -> IO {
        self.io
    }
}

/// Waits out `wait` on `slot`'s timer; `Pending` until then.
fn wait_on(slot: &mut Option<Pin<Box<Sleep>>>, wait: Duration, cx: &mut Context<'_>) -> Poll<()> {
    let at = Instant::now() + wait;
    let sleep = match slot {
        Some(s) => {
            s.as_mut().reset(at);
            s
        }
        None => slot.insert(Box::pin(tokio::time::sleep_until(at))),
    };
    sleep.as_mut().poll(cx)
}

impl<IO: AsyncRead> AsyncRead for Throttled<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let Some(bucket) = this.read.as_ref() else {
            return this.io.poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match bucket.reserve(buf.remaining()) {
                Err(wait) => {
                    this.meter.waiting(false, wait);
                    ready!(wait_on(this.read_sleep, wait, cx));
                }
                Ok(n) => {
                    this.meter.granted(false);
                    let dst = buf.initialize_unfilled_to(n);
                    let mut sub = ReadBuf::new(dst);
                    let out = this.io.as_mut().poll_read(cx, &mut sub);
                    let got = sub.filled().len();
                    bucket.refund(n - got);
                    if let Poll::Ready(Ok(())) = out {
                        buf.advance(got);
                        bucket.record(got);
                        this.meter.bytes(got);
                    }
                    return out;
                }
            }
        }
    }
}

impl<IO: AsyncWrite> AsyncWrite for Throttled<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if let Some(m) = this.monitor.as_mut() {
            m.resume();
        }
        let Some(bucket) = this.write.as_ref() else {
            let out = this.io.poll_write(cx, buf);
            if let Some(m) = this.monitor.as_mut() {
                let moved = match &out {
                    Poll::Ready(Ok(n)) => *n,
                    _ => 0,
                };
                m.after(moved, out.is_pending(), cx)?;
            }
            return out;
        };
        if buf.is_empty() {
            return this.io.poll_write(cx, buf);
        }
        loop {
            match bucket.reserve(buf.len()) {
                Err(wait) => {
                    this.meter.waiting(true, wait);
                    ready!(wait_on(this.write_sleep, wait, cx));
                }
                Ok(n) => {
                    this.meter.granted(true);
                    let out = this.io.as_mut().poll_write(cx, &buf[..n]);
                    let wrote = match &out {
                        Poll::Ready(Ok(w)) => *w,
                        _ => 0,
                    };
                    bucket.refund(n - wrote);
                    bucket.record(wrote);
                    this.meter.bytes(wrote);
                    if let Some(m) = this.monitor.as_mut() {
                        m.after(wrote, out.is_pending(), cx)?;
                    }
                    return out;
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_reads_as_one_line() {
        let bucket = Bucket::new(1000.0, 500);
        bucket.record(700);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            bucket.to_string(),
            "700 B/s of 1000 B/s (burst 500 B), 700 B moved"
        );
    }
}
