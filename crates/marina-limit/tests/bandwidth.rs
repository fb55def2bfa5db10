//! `BandwidthLimit` on real loopback TCP, under paused time.
//!
//! Every test runs on a current-thread runtime with tokio's clock paused: the
//! throttle's sleeps take simulated time, and tokio auto-advances the clock to the next
//! timer whenever the runtime has nothing else to do. Loopback I/O is ready as soon as
//! the peer's syscall returns (the kernel delivers it inside `send`), and the time
//! driver polls I/O with a zero timeout before it advances, so socket readiness is
//! seen before the clock jumps; the simulated durations asserted here are therefore
//! the limiter's, not the machine's. Nothing sleeps on the wall clock and nothing
//! asserts how fast the machine is.
//!
//! What the limiter admitted is checked on the bytes that reach the socket: each
//! `TcpStream` is wrapped in a [`Recording`] adapter *under* the throttle (through
//! [`BandwidthLimit::wrap`]), which logs `(Instant, bytes)` for every read or write that
//! moves data. The throttle charges its bucket in the same poll that moves the bytes
//! (never after), so over any window `[t_i, t_j]` the logged bytes must stay within
//! `rate × (t_j − t_i) + burst` — GCRA's bound, with no extra chunk of slack; one byte
//! is allowed for floating-point rounding.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_limit::{BandwidthLimit, MinRate, Throttled, TooSlow};
use marina_pool::{Pool, socket_is_open};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Service, ServiceExt, service_fn};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// `(when, bytes)` of every I/O call that moved bytes.
type Log = Arc<Mutex<Vec<(Instant, usize)>>>;

/// A stream that logs the reads and writes that move bytes, into a shared [`Log`].
struct Recording<S> {
    inner: S,
    log: Log,
}

impl<S> Recording<S> {
    fn new(inner: S, log: &Log) -> Self {
        Recording {
            inner,
            log: log.clone(),
        }
    }

    fn note(&self, n: usize) {
        if n > 0 {
            self.log.lock().unwrap().push((Instant::now(), n));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let out = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = out {
            self.note(buf.filled().len() - before);
        }
        out
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let out = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = out {
            self.note(n);
        }
        out
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Asserts that over every window `[t_i, t_j]` of `log` the bytes moved stay within
/// `rate × (t_j − t_i) + burst` (plus one byte of float rounding). Returns the largest
/// amount moved in any window, to show the check was not vacuous.
fn assert_within_budget(log: &[(Instant, usize)], rate: f64, burst: usize) -> u64 {
    assert!(
        log.is_sorted_by_key(|&(t, _)| t),
        "the log is in time order"
    );
    // Everything moved at one instant counts together.
    let mut points: Vec<(Instant, u64)> = Vec::new();
    for &(t, n) in log {
        match points.last_mut() {
            Some((pt, pn)) if *pt == t => *pn += n as u64,
            _ => points.push((t, n as u64)),
        }
    }
    let mut largest = 0;
    for (i, &(start, _)) in points.iter().enumerate() {
        let mut moved = 0u64;
        for &(end, n) in &points[i..] {
            moved += n;
            largest = largest.max(moved);
            let allowed = rate * (end - start).as_secs_f64() + burst as f64;
            assert!(
                moved as f64 <= allowed + 1.0,
                "{moved} bytes moved in {:?} (from {:?} after the first I/O), \
                 over the budget of {allowed:.0}",
                end - start,
                start - points[0].0,
            );
        }
    }
    largest
}

/// Asserts that `actual` is within 10% of `expected` (both simulated time).
fn assert_about(actual: Duration, expected: Duration, what: &str) {
    let ratio = actual.as_secs_f64() / expected.as_secs_f64();
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: took {actual:?} of simulated time, expected {expected:?} ± 10%"
    );
}

/// How long `bytes` take at `rate` after a full bucket of `burst` went at once.
fn expected_time(bytes: usize, rate: f64, burst: usize) -> Duration {
    Duration::from_secs_f64((bytes - burst) as f64 / rate)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, streaming: the same hash however the bytes are split.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// `len` pseudo-random bytes, different for each `seed`.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Reads a connection to EOF: (bytes, checksum).
async fn drain(mut stream: TcpStream) -> (usize, u64) {
    let mut buf = vec![0; 64 * KIB];
    let (mut len, mut hash) = (0, FNV_OFFSET);
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            return (len, hash);
        }
        len += n;
        hash = fnv1a(hash, &buf[..n]);
    }
}

/// A sink for `conns` connections: reads each to EOF, and yields (bytes, checksum) of
/// each, sorted.
fn sink(listener: TcpListener, conns: usize) -> JoinHandle<Vec<(usize, u64)>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (stream, _) = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(drain(stream)));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        got.sort_unstable();
        got
    })
}

/// An echo server: echoes every connection until EOF.
fn echo(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// 4 connections × 2 MiB through one 1 MiB/s write budget: every window stays within
/// the budget, the transfer takes 8 MiB / (1 MiB/s) of simulated time less the burst,
/// and all bytes arrive intact.
#[tokio::test(start_paused = true)]
async fn shared_limit_four_connections() {
    const RATE: f64 = MIB as f64;
    const BURST: usize = 64 * KIB;
    const CONNS: usize = 4;
    const EACH: usize = 2 * MIB;

    let (listener, addr) = bind().await;
    let server = sink(listener, CONNS);
    let limit = BandwidthLimit::new(()).shared_write(RATE, BURST as u64);
    let log = Log::default();

    let mut streams = Vec::new();
    for _ in 0..CONNS {
        let tcp = TcpStream::connect(addr).await.unwrap();
        streams.push(limit.wrap(Recording::new(tcp, &log)));
    }
    let start = Instant::now();
    let mut expected = Vec::new();
    let mut writers = Vec::new();
    for (i, mut conn) in streams.into_iter().enumerate() {
        let data = payload(i as u64, EACH);
        expected.push((EACH, fnv1a(FNV_OFFSET, &data)));
        writers.push(tokio::spawn(async move {
            conn.write_all(&data).await.unwrap();
            conn.shutdown().await.unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let got = server.await.unwrap();
    let took = start.elapsed();

    expected.sort_unstable();
    assert_eq!(got, expected, "every connection's bytes arrive intact");

    let log = log.lock().unwrap();
    let total: usize = log.iter().map(|&(_, n)| n).sum();
    assert_eq!(total, CONNS * EACH);
    let largest = assert_within_budget(&log, RATE, BURST);
    assert_eq!(largest, (CONNS * EACH) as u64);

    let bucket = limit.write_bucket().unwrap();
    assert_eq!(bucket.bytes(), (CONNS * EACH) as u64);
    assert_eq!(bucket.limit(), RATE);
    assert_eq!(bucket.burst(), BURST as u64);
    // The transfer ends in its 8th second: the last whole second ran at the limit.
    let last_second = bucket.current_rate() as f64;
    assert!(
        (0.9 * RATE..=RATE + BURST as f64).contains(&last_second),
        "current_rate {last_second} B/s, limit {RATE} B/s"
    );
    assert_about(
        took,
        expected_time(CONNS * EACH, RATE, BURST),
        "8 MiB at 1 MiB/s",
    );
}

/// Per-connection write budgets are independent: two connections at 256 KiB/s each
/// finish in their own time, not in the time they would take sharing one budget.
#[tokio::test(start_paused = true)]
async fn per_connection_write_limits_are_independent() {
    const RATE: f64 = (256 * KIB) as f64;
    const BURST: usize = 16 * KIB;
    const SIZES: [usize; 2] = [256 * KIB, 768 * KIB];

    let (listener, addr) = bind().await;
    let server = sink(listener, SIZES.len());
    let limit = BandwidthLimit::new(()).per_connection_write(RATE, BURST as u64);
    assert!(limit.write_bucket().is_none(), "no shared bucket");

    let logs = [Log::default(), Log::default()];
    let mut streams = Vec::new();
    for log in &logs {
        let tcp = TcpStream::connect(addr).await.unwrap();
        streams.push(limit.wrap(Recording::new(tcp, log)));
    }
    let start = Instant::now();
    let mut expected = Vec::new();
    let mut writers = Vec::new();
    for (i, (mut conn, size)) in streams.into_iter().zip(SIZES).enumerate() {
        let data = payload(10 + i as u64, size);
        expected.push((size, fnv1a(FNV_OFFSET, &data)));
        writers.push(tokio::spawn(async move {
            conn.write_all(&data).await.unwrap();
            let took = start.elapsed();
            conn.shutdown().await.unwrap();
            took
        }));
    }
    let mut took = Vec::new();
    for w in writers {
        took.push(w.await.unwrap());
    }
    expected.sort_unstable();
    assert_eq!(server.await.unwrap(), expected);

    for ((log, size), took) in logs.iter().zip(SIZES).zip(took) {
        let log = log.lock().unwrap();
        assert_within_budget(&log, RATE, BURST);
        // Sharing one 256 KiB/s budget, the small one would take about twice as long.
        assert_about(took, expected_time(size, RATE, BURST), "its own budget");
    }
    // Both moved at once: together, more than one budget allows.
    let mut all: Vec<_> = logs
        .iter()
        .flat_map(|l| l.lock().unwrap().clone())
        .collect();
    all.sort_by_key(|&(t, _)| t);
    let first_second: usize = all
        .iter()
        .filter(|&&(t, _)| t - start < Duration::from_millis(900))
        .map(|&(_, n)| n)
        .sum();
    assert!(
        first_second as f64 > 1.5 * RATE * 0.9,
        "{first_second} bytes in the first 0.9 s"
    );
}

/// A server that floods us is read no faster than the per-connection read limit.
#[tokio::test(start_paused = true)]
async fn per_connection_read_limit_bounds_a_flood() {
    const RATE: f64 = (256 * KIB) as f64;
    const BURST: usize = 16 * KIB;
    const SIZE: usize = MIB;

    let (listener, addr) = bind().await;
    let data = payload(20, SIZE);
    let sent = fnv1a(FNV_OFFSET, &data);
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(&data).await.unwrap();
        stream.shutdown().await.unwrap();
    });

    let limit = BandwidthLimit::new(()).per_connection_read(RATE, BURST as u64);
    let log = Log::default();
    let mut conn = limit.wrap(Recording::new(
        TcpStream::connect(addr).await.unwrap(),
        &log,
    ));
    let start = Instant::now();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    let took = start.elapsed();
    server.await.unwrap();

    assert_eq!(got.len(), SIZE);
    assert_eq!(fnv1a(FNV_OFFSET, &got), sent);
    assert_within_budget(&log.lock().unwrap(), RATE, BURST);
    assert_about(
        took,
        expected_time(SIZE, RATE, BURST),
        "1 MiB read at 256 KiB/s",
    );
}

/// `shared`: one budget for both directions. Echoing 256 KiB at 256 KiB/s moves 512 KiB
/// through it: twice the time of one direction.
#[tokio::test(start_paused = true)]
async fn shared_budget_counts_both_directions() {
    const RATE: f64 = (256 * KIB) as f64;
    const BURST: usize = 16 * KIB;
    const SIZE: usize = 256 * KIB;

    let (listener, addr) = bind().await;
    let server = echo(listener);
    let limit = BandwidthLimit::new(()).shared(RATE, BURST as u64);
    let (read, write) = (limit.read_bucket().unwrap(), limit.write_bucket().unwrap());
    assert!(Arc::ptr_eq(read, write), "one bucket for both directions");

    let log = Log::default();
    let conn = limit.wrap(Recording::new(
        TcpStream::connect(addr).await.unwrap(),
        &log,
    ));
    let (mut r, mut w) = tokio::io::split(conn);
    let data = payload(30, SIZE);
    let start = Instant::now();
    let mut back = vec![0; SIZE];
    let (wrote, read_back) = tokio::join!(
        async {
            w.write_all(&data).await?;
            w.flush().await
        },
        r.read_exact(&mut back)
    );
    wrote.unwrap();
    read_back.unwrap();
    let took = start.elapsed();
    server.abort();

    assert_eq!(back, data);
    assert_eq!(read.bytes(), 2 * SIZE as u64);
    assert_within_budget(&log.lock().unwrap(), RATE, BURST);
    assert_about(
        took,
        expected_time(2 * SIZE, RATE, BURST),
        "echo on one budget",
    );
}

/// A listener whose connections have a small receive buffer, so a peer that reads
/// slowly soon blocks our writes.
fn small_buffer_listener() -> (TcpListener, SocketAddr) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4 * KIB as u32).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Connects with a small send buffer.
async fn connect_small(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.set_send_buffer_size(4 * KIB as u32)?;
    sock.connect(addr).await
}

const KESTREL: MinRate = MinRate {
    bytes_per_sec: 240.0,
    grace: Duration::from_secs(5),
};

/// A peer that reads 1 byte per second is cut off with `TooSlow`, after the grace
/// period and not before; a connection with no I/O pending is never cut off.
#[tokio::test(start_paused = true)]
async fn slow_reader_is_cut_off() {
    let (listener, addr) = small_buffer_listener();
    let slow = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut byte = [0; 1];
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match stream.read(&mut byte).await {
                Ok(1) => {}
                _ => return,
            }
        }
    });

    let mut connector = BandwidthLimit::new(service_fn(connect_small)).min_rate(KESTREL);
    let mut conn = connector.ready().await.unwrap().call(addr).await.unwrap();
    let start = Instant::now();
    let err = conn.write_all(&vec![7; 4 * MIB]).await.unwrap_err();
    let took = start.elapsed();
    slow.abort();

    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    let too_slow = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<TooSlow>())
        .unwrap_or_else(|| panic!("not TooSlow: {err:?}"));
    assert!(too_slow.rate < 240.0, "{too_slow:?}");
    assert_eq!(too_slow.min_rate, 240.0);
    // Not before the grace period. The first window also counts the bytes that filled
    // the socket buffers at once, so the cut may come at the end of the second one.
    assert!(took >= KESTREL.grace, "cut off after {took:?}");
    assert!(
        took <= 2 * KESTREL.grace + Duration::from_secs(1),
        "cut off only after {took:?}"
    );

    // An idle connection: nothing pending, however long.
    let (listener, addr) = bind().await;
    let server = sink(listener, 1);
    let mut idle = connector.ready().await.unwrap().call(addr).await.unwrap();
    idle.write_all(b"hello").await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    idle.write_all(b", world").await.unwrap();
    idle.shutdown().await.unwrap();
    assert_eq!(
        server.await.unwrap(),
        vec![(12, fnv1a(FNV_OFFSET, b"hello, world"))]
    );
}

/// A read waiting for a slow reply is not judged by the minimum rate (that is a request
/// timeout's job): a server answering after 30 s is read in full.
#[tokio::test(start_paused = true)]
async fn a_slow_reply_is_not_a_slow_peer() {
    let (listener, addr) = bind().await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = [0u8; 7];
        s.read_exact(&mut req).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        s.write_all(b"answer\n").await.unwrap();
    });
    let mut connector = BandwidthLimit::new(service_fn(TcpStream::connect)).min_rate(KESTREL);
    let mut conn = connector.ready().await.unwrap().call(addr).await.unwrap();
    conn.write_all(b"request").await.unwrap();
    let mut reply = [0u8; 7];
    conn.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"answer\n");
    server.await.unwrap();
}

/// Waiting on our own throttle is not the peer's slowness: writing at 100 B/s, below a
/// 240 B/s minimum, to a peer that reads everything at once is not cut off.
#[tokio::test(start_paused = true)]
async fn own_throttle_is_not_a_slow_peer() {
    let (listener, addr) = bind().await;
    let server = sink(listener, 1);
    let mut connector = BandwidthLimit::new(service_fn(TcpStream::connect))
        .per_connection_write(100.0, 1)
        .min_rate(KESTREL);
    let mut conn = connector.ready().await.unwrap().call(addr).await.unwrap();
    let data = payload(40, 1200);
    let start = Instant::now();
    conn.write_all(&data).await.unwrap();
    let took = start.elapsed();
    conn.shutdown().await.unwrap();

    assert_eq!(
        server.await.unwrap(),
        vec![(data.len(), fnv1a(FNV_OFFSET, &data))]
    );
    assert!(
        took > 2 * KESTREL.grace,
        "took {took:?}: the rate was judged"
    );
    assert_about(took, Duration::from_secs(12), "1200 B at 100 B/s");
}

/// With no limits, `BandwidthLimit` passes 8 MiB through untouched and never sleeps.
#[tokio::test(start_paused = true)]
async fn unthrottled_passes_through() {
    let (listener, addr) = bind().await;
    let server = sink(listener, 1);
    let mut connector = BandwidthLimit::new(service_fn(TcpStream::connect));
    assert!(connector.read_bucket().is_none() && connector.write_bucket().is_none());

    let mut conn = connector.ready().await.unwrap().call(addr).await.unwrap();
    let data = payload(50, 8 * MIB);
    let start = Instant::now();
    conn.write_all(&data).await.unwrap();
    conn.shutdown().await.unwrap();
    let got = server.await.unwrap();

    assert_eq!(got, vec![(data.len(), fnv1a(FNV_OFFSET, &data))]);
    // No timer was ever set, so the paused clock never moved.
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Through the `Service` impl: a connector function becomes a connector of
/// `Throttled<TcpStream>`.
#[tokio::test(start_paused = true)]
async fn service_yields_throttled_streams() {
    let (listener, addr) = bind().await;
    let server = echo(listener);
    let mut connector =
        BandwidthLimit::new(service_fn(|addr: SocketAddr| TcpStream::connect(addr)))
            .per_connection_write((64 * KIB) as f64, (8 * KIB) as u64)
            .per_connection_read((64 * KIB) as f64, (8 * KIB) as u64);

    let mut conn: Throttled<TcpStream> = connector.ready().await.unwrap().call(addr).await.unwrap();
    assert_eq!(conn.get_ref().peer_addr().unwrap(), addr);
    conn.write_all(b"ping\n").await.unwrap();
    let mut reply = [0; 5];
    conn.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"ping\n");

    // A connect error is the connector's, untouched.
    drop(server);
    let (closed, closed_addr) = bind().await;
    drop(closed);
    let err = connector
        .ready()
        .await
        .unwrap()
        .call(closed_addr)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
}

/// Under a `marina_pool::Pool`: pooled connections are throttled, and a reused
/// connection keeps drawing on the same shared budget.
#[tokio::test(start_paused = true)]
async fn stacks_under_a_pool() {
    const RATE: f64 = (128 * KIB) as f64;
    const BURST: usize = 16 * KIB;
    const SIZE: usize = 64 * KIB;

    let (listener, addr) = bind().await;
    let server = echo(listener);
    let connector =
        BandwidthLimit::new(service_fn(TcpStream::connect)).shared_write(RATE, BURST as u64);
    let bucket = connector.write_bucket().unwrap().clone();
    let pool = Pool::builder()
        .max_size(1)
        .acquire_timeout(None)
        .connect_timeout(None)
        .health_check_interval(None)
        // The default socket check knows `TcpStream`, not a wrapper of it.
        .check(|c: &mut Throttled<TcpStream>| socket_is_open(c.get_ref()))
        .build(connector, addr)
        .unwrap();

    let start = Instant::now();
    for round in 0..2u64 {
        let mut conn = pool.get().await.unwrap();
        let data = payload(60 + round, SIZE);
        let mut back = vec![0; SIZE];
        let (mut r, mut w) = tokio::io::split(&mut *conn);
        let (wrote, read_back) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
        wrote.unwrap();
        read_back.unwrap();
        assert_eq!(back, data);
    }
    let took = start.elapsed();

    let stats = pool.stats();
    assert_eq!(stats.created, 1, "the connection was reused: {stats:?}");
    assert_eq!(stats.acquired, 2, "{stats:?}");
    assert_eq!(bucket.bytes(), 2 * SIZE as u64);
    assert_about(
        took,
        expected_time(2 * SIZE, RATE, BURST),
        "128 KiB at 128 KiB/s",
    );
    pool.close().await;
    server.abort();
}
