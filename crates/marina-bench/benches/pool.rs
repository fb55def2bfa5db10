//! Checkout throughput of `marina_pool::Pool` beside deadpool, bb8 and a floor.
//!
//! Every pool holds `size` trivial in-memory connections ([`Conn`], a `u64` counter).
//! `tasks` tokio tasks, released together once all are spawned, loop *acquire → touch
//! (`+= 1`) → release* until a stop flag is set after `--secs` of wall clock. A cell
//! reports ns per op (wall ÷ total ops), ops/s and each task's share of the ops (min
//! and max task ops ÷ mean). The pools compared:
//!
//! - `marina`: `marina_pool::Pool` over a `tower::service_fn` connector, all `size`
//!   connections opened (`min_idle = max_size`, `ready_min`) before measuring, no
//!   expiry, `acquire_timeout` 60 s (`--marina-acquire-timeout none|SECS`);
//! - `deadpool`: deadpool 0.13 `managed::Pool` (no-op `recycle`), pre-warmed;
//! - `bb8`: bb8 0.9 with its defaults but `max_size` (so `is_valid` runs on every
//!   checkout, as `test_on_check_out` defaults to true), pre-warmed;
//! - `floor`: a tokio `Semaphore` (FIFO-fair, coop-budget aware) plus a lock-free
//!   `crossbeam_queue::ArrayQueue` of connections; the guard borrows the pool. It is
//!   the least a fair async pool has to do.
//!
//! Modes: `touch` holds the connection for the increment only; `hold-yield` also
//! awaits `tokio::task::yield_now()` once while holding, so checkouts overlap and the
//! waiter path runs whenever `tasks > size`.
//!
//! Each run builds a fresh pool; afterwards the bench checks out every connection and
//! asserts that the counters add up to the ops counted (a lost or duplicated
//! connection shows as `MISMATCH`). A run whose tasks have not finished 5 s after the
//! stop flag is reported as `HUNG` and its tasks are aborted.
//!
//! ```text
//! cargo bench -p marina-bench --bench pool -- [--quick] [--secs S] [--reps R]
//!     [--workers N] [--mode touch|hold-yield|both] [--pools marina,marina-fifo,deadpool,bb8,floor]
//!     [--sizes 4,16,64] [--tasks 1,16,256,1024] [--marina-acquire-timeout none|SECS]
//!     [--no-ambient-timer]
//! ```
//!
//! Without `--bench` in its arguments (as under `cargo test --benches`) it runs a short
//! smoke matrix instead, which fails on a hang or a counter mismatch.

// A benchmark measures real wall time across OS threads (and sleeps the main thread,
// which is not a runtime worker), so it uses std's clock and sleep on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::future::{Future, Ready, ready};
use std::hint::spin_loop;
use std::io;
use std::ops::{Deref, DerefMut};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio::task::AbortHandle;
use tower::util::ServiceFn;

/// How long a run may take after its stop flag before it counts as hung.
const HANG_GRACE: Duration = Duration::from_secs(5);

/// The pooled "connection": a counter every checkout increments.
#[derive(Debug)]
struct Conn(u64);

/// One pool under test, as the bench drives it.
trait Contender: Send + Sync + Sized + 'static {
    /// Column name.
    const NAME: &'static str;
    /// A checked-out connection; dropping it returns the connection.
    type Guard<'a>: DerefMut<Target = Conn> + Send
    where
        Self: 'a;
    /// Builds a pool of `size` connections, every one of them opened.
    fn build(size: usize) -> impl Future<Output = Self> + Send;
    /// Checks out a connection, waiting as long as it takes.
    fn acquire(&self) -> impl Future<Output = Self::Guard<'_>> + Send;
}

/// Checks out `size` connections at once (opening any the pool has not yet opened) and
/// returns the sum of their counters; they go back when this returns.
async fn check_out_all<P: Contender>(pool: &P, size: usize) -> u64 {
    let mut held = Vec::with_capacity(size);
    for _ in 0..size {
        held.push(pool.acquire().await);
    }
    held.iter().map(|c| c.0).sum()
}

// ---------------------------------------------------------------------------- marina

/// marina's `acquire_timeout` (`--marina-acquire-timeout`): a waiting `get()` runs
/// under `tokio::time::timeout`, so it registers a timer, which the other pools skip
/// (bb8 wraps every `get()` in one, hit or miss).
static MARINA_ACQUIRE_TIMEOUT: OnceLock<Option<Duration>> = OnceLock::new();
const DEFAULT_TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));

/// marina's connector: a `tower::service_fn` that makes a fresh counter.
type MarinaConnector = ServiceFn<fn(()) -> Ready<io::Result<Conn>>>;

fn marina_connect(_: ()) -> Ready<io::Result<Conn>> {
    ready(Ok(Conn(0)))
}

/// `marina_pool::Pool` with `min_idle = max_size`, no expiry, default health checks,
/// reusing idle connections LIFO (marina's default).
struct Marina(marina_pool::Pool<MarinaConnector, ()>);

/// The same with FIFO reuse, the order deadpool, bb8 and the floor use by default.
struct MarinaFifo(marina_pool::Pool<MarinaConnector, ()>);

async fn build_marina(
    size: usize,
    reuse: marina_pool::Reuse,
) -> marina_pool::Pool<MarinaConnector, ()> {
    let connect: fn(()) -> Ready<io::Result<Conn>> = marina_connect;
    let pool = marina_pool::Pool::builder()
        .max_size(size)
        .min_idle(size)
        .no_expiry()
        .reuse(reuse)
        .acquire_timeout(*MARINA_ACQUIRE_TIMEOUT.get().unwrap_or(&DEFAULT_TIMEOUT))
        .build(tower::service_fn(connect), ())
        .expect("valid marina config");
    pool.ready_min().await.expect("marina warm-up");
    pool
}

impl Contender for Marina {
    const NAME: &'static str = "marina";
    type Guard<'a> = marina_pool::Pooled<Conn>;

    async fn build(size: usize) -> Self {
        Marina(build_marina(size, marina_pool::Reuse::Lifo).await)
    }

    async fn acquire(&self) -> Self::Guard<'_> {
        self.0.get().await.expect("marina checkout")
    }
}

impl Contender for MarinaFifo {
    const NAME: &'static str = "marina-fifo";
    type Guard<'a> = marina_pool::Pooled<Conn>;

    async fn build(size: usize) -> Self {
        MarinaFifo(build_marina(size, marina_pool::Reuse::Fifo).await)
    }

    async fn acquire(&self) -> Self::Guard<'_> {
        self.0.get().await.expect("marina-fifo checkout")
    }
}

// -------------------------------------------------------------------------- deadpool

/// deadpool manager: creation and recycling do nothing.
struct DeadpoolManager;

impl deadpool::managed::Manager for DeadpoolManager {
    type Type = Conn;
    type Error = io::Error;

    async fn create(&self) -> io::Result<Conn> {
        Ok(Conn(0))
    }

    async fn recycle(
        &self,
        _: &mut Conn,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<io::Error> {
        Ok(())
    }
}

/// deadpool 0.13 managed pool, default settings but `max_size`.
struct Deadpool(deadpool::managed::Pool<DeadpoolManager>);

impl Contender for Deadpool {
    const NAME: &'static str = "deadpool";
    type Guard<'a> = deadpool::managed::Object<DeadpoolManager>;

    async fn build(size: usize) -> Self {
        let pool = deadpool::managed::Pool::builder(DeadpoolManager)
            .max_size(size)
            .build()
            .expect("valid deadpool config");
        let pool = Deadpool(pool);
        check_out_all(&pool, size).await;
        pool
    }

    async fn acquire(&self) -> Self::Guard<'_> {
        self.0.get().await.expect("deadpool checkout")
    }
}

// ------------------------------------------------------------------------------- bb8

/// bb8 manager: connects at once, always valid, never broken.
struct Bb8Manager;

impl bb8::ManageConnection for Bb8Manager {
    type Connection = Conn;
    type Error = io::Error;

    async fn connect(&self) -> io::Result<Conn> {
        Ok(Conn(0))
    }

    async fn is_valid(&self, _: &mut Conn) -> io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut Conn) -> bool {
        false
    }
}

/// bb8 0.9 pool, default settings but `max_size`.
struct Bb8(bb8::Pool<Bb8Manager>);

impl Contender for Bb8 {
    const NAME: &'static str = "bb8";
    type Guard<'a> = bb8::PooledConnection<'a, Bb8Manager>;

    async fn build(size: usize) -> Self {
        let size32 = u32::try_from(size).expect("pool size fits u32");
        let pool = bb8::Pool::builder()
            .max_size(size32)
            .build(Bb8Manager)
            .await
            .expect("valid bb8 config");
        let pool = Bb8(pool);
        check_out_all(&pool, size).await;
        pool
    }

    async fn acquire(&self) -> Self::Guard<'_> {
        self.0.get().await.expect("bb8 checkout")
    }
}

// ----------------------------------------------------------------------------- floor

/// The floor: a fair tokio `Semaphore` with one permit per connection, and the idle
/// connections in a lock-free `ArrayQueue`. A permit guarantees a queued connection,
/// because a guard pushes its connection back before its permit is released.
struct Floor {
    permits: Semaphore,
    idle: ArrayQueue<Conn>,
}

/// A connection checked out of the [`Floor`]; borrows the pool (no refcount traffic).
struct FloorGuard<'a> {
    conn: Option<Conn>,
    floor: &'a Floor,
    // Declared last so it drops after `Drop::drop` has pushed the connection back.
    _permit: SemaphorePermit<'a>,
}

impl Deref for FloorGuard<'_> {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("present until drop")
    }
}

impl DerefMut for FloorGuard<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("present until drop")
    }
}

impl Drop for FloorGuard<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Cannot fail: at most `size` connections exist and the queue holds `size`.
            let _ = self.floor.idle.push(conn);
        }
    }
}

impl Contender for Floor {
    const NAME: &'static str = "floor";
    type Guard<'a> = FloorGuard<'a>;

    async fn build(size: usize) -> Self {
        let idle = ArrayQueue::new(size);
        for _ in 0..size {
            let _ = idle.push(Conn(0));
        }
        Floor {
            permits: Semaphore::new(size),
            idle,
        }
    }

    async fn acquire(&self) -> Self::Guard<'_> {
        let permit = self.permits.acquire().await.expect("never closed");
        let conn = self
            .idle
            .pop()
            .expect("a permit guarantees an idle connection");
        FloorGuard {
            conn: Some(conn),
            floor: self,
            _permit: permit,
        }
    }
}

// --------------------------------------------------------------------------- harness

/// What a task does while it holds a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Increment the counter only.
    Touch,
    /// Increment, then `yield_now().await` once.
    HoldYield,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Touch => "touch",
            Mode::HoldYield => "hold-yield",
        }
    }
}

/// The outcome of one run of one pool in one cell.
#[derive(Debug, Clone)]
enum Outcome {
    /// Finished; `mismatch` is `Some((counters, ops))` when the counters disagree.
    Done {
        ns_per_op: f64,
        ops_per_sec: f64,
        min_share: f64,
        max_share: f64,
        mismatch: Option<(u64, u64)>,
    },
    /// Tasks still running `HANG_GRACE` after the stop flag.
    Hung,
}

/// The loop every task runs; returns how many round trips it made.
async fn worker<P: Contender>(
    pool: Arc<P>,
    mut start: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
    mode: Mode,
) -> u64 {
    // Wait until every task is spawned, so early tasks do not run alone for a while.
    start.wait_for(|go| *go).await.expect("start signal");
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut conn = pool.acquire().await;
        conn.0 += 1;
        if mode == Mode::HoldYield {
            tokio::task::yield_now().await;
        }
        drop(conn);
        ops += 1;
    }
    ops
}

/// Runs one pool in one cell once, on a freshly built pool.
fn run_once<P: Contender>(
    rt: &Runtime,
    size: usize,
    tasks: usize,
    mode: Mode,
    secs: Duration,
) -> Outcome {
    let pool = Arc::new(rt.block_on(P::build(size)));
    let stop = Arc::new(AtomicBool::new(false));
    let (go, start_rx) = watch::channel(false);

    let handles: Vec<_> = (0..tasks)
        .map(|_| rt.spawn(worker(pool.clone(), start_rx.clone(), stop.clone(), mode)))
        .collect();
    let aborts: Vec<AbortHandle> = handles.iter().map(|h| h.abort_handle()).collect();
    let start = Instant::now();
    go.send_replace(true);
    // The main thread is not a worker: it sleeps here even when every worker is busy.
    std::thread::sleep(secs.saturating_sub(start.elapsed()));
    stop.store(true, Ordering::Relaxed);

    let joined = rt.block_on(async {
        tokio::time::timeout(HANG_GRACE, async {
            let mut counts = Vec::with_capacity(handles.len());
            for h in handles {
                counts.push(h.await.expect("bench task panicked"));
            }
            counts
        })
        .await
    });
    let wall = start.elapsed();
    let outcome = match joined {
        Err(_) => {
            for a in &aborts {
                a.abort();
            }
            Outcome::Hung
        }
        Ok(counts) => {
            let total: u64 = counts.iter().sum();
            let counted = rt.block_on(async {
                tokio::time::timeout(HANG_GRACE, check_out_all(&*pool, size)).await
            });
            let mismatch = match counted {
                Ok(sum) if sum == total => None,
                Ok(sum) => Some((sum, total)),
                // Could not check every connection out again: some went missing.
                Err(_) => Some((u64::MAX, total)),
            };
            let mean = total as f64 / tasks as f64;
            let min = counts.iter().copied().min().unwrap_or(0) as f64;
            let max = counts.iter().copied().max().unwrap_or(0) as f64;
            let wall_ns = wall.as_nanos() as f64;
            Outcome::Done {
                ns_per_op: wall_ns / total.max(1) as f64,
                ops_per_sec: total as f64 / wall.as_secs_f64(),
                min_share: if mean > 0.0 { min / mean } else { 0.0 },
                max_share: if mean > 0.0 { max / mean } else { 0.0 },
                mismatch,
            }
        }
    };
    // Drop inside the runtime: pools may hold handles to background tasks.
    let _guard = rt.enter();
    drop(pool);
    outcome
}

/// Cache-line round trip between two OS threads: the median over batches of 64 round
/// trips, for about 5 ms. About 50 ns when the two threads' vCPUs share a core complex,
/// several hundred when they do not (the machine-regime indicator of the anchors).
fn cross_core_rtt() -> Duration {
    const DONE: u64 = u64::MAX;
    const BATCH: u32 = 64;
    let line = Arc::new(AtomicU64::new(0));
    let echo = {
        let line = line.clone();
        std::thread::spawn(move || {
            loop {
                let v = line.load(Ordering::Acquire);
                if v == DONE {
                    break;
                }
                if v % 2 == 1 {
                    line.store(v + 1, Ordering::Release);
                } else {
                    spin_loop();
                }
            }
        })
    };
    let start = Instant::now();
    let mut batches = Vec::new();
    let mut ping = 1u64;
    while batches.len() < 1_000 && start.elapsed() < Duration::from_millis(5) {
        let t = Instant::now();
        for _ in 0..BATCH {
            line.store(ping, Ordering::Release);
            while line.load(Ordering::Acquire) == ping {
                spin_loop();
            }
            ping += 2;
        }
        batches.push(t.elapsed() / BATCH);
    }
    line.store(DONE, Ordering::Release);
    echo.join().expect("echo thread");
    batches.sort_unstable();
    batches[batches.len() / 2]
}

/// The pools in column order.
const POOLS: [&str; 5] = ["floor", "marina", "marina-fifo", "deadpool", "bb8"];
/// The order runs are interleaved in within a cell.
const RUN_ORDER: [&str; 5] = ["marina", "deadpool", "marina-fifo", "bb8", "floor"];

/// Results of one cell: per pool (in `POOLS` order), every rep's outcome.
#[derive(Debug)]
struct Cell {
    size: usize,
    tasks: usize,
    rtt: Duration,
    runs: [Vec<Outcome>; 5],
}

impl Cell {
    /// The median run by ns/op (`None` if not run; `Hung` if any rep hung).
    fn median(&self, pool: usize) -> Option<Outcome> {
        let runs = &self.runs[pool];
        if runs.is_empty() {
            return None;
        }
        if runs.iter().any(|r| matches!(r, Outcome::Hung)) {
            return Some(Outcome::Hung);
        }
        let mut sorted = runs.clone();
        sorted.sort_by(|a, b| ns(a).total_cmp(&ns(b)));
        Some(sorted[sorted.len() / 2].clone())
    }

    fn range(&self, pool: usize) -> Option<(f64, f64)> {
        let done: Vec<f64> = self.runs[pool]
            .iter()
            .filter(|r| matches!(r, Outcome::Done { .. }))
            .map(ns)
            .collect();
        let lo = done.iter().copied().reduce(f64::min)?;
        let hi = done.iter().copied().reduce(f64::max)?;
        Some((lo, hi))
    }
}

fn ns(o: &Outcome) -> f64 {
    match o {
        Outcome::Done { ns_per_op, .. } => *ns_per_op,
        Outcome::Hung => f64::INFINITY,
    }
}

fn pool_index(name: &str) -> usize {
    POOLS.iter().position(|p| *p == name).expect("known pool")
}

fn fmt_rate(ops_per_sec: f64) -> String {
    if ops_per_sec >= 1e6 {
        format!("{:.2} M/s", ops_per_sec / 1e6)
    } else {
        format!("{:.0} k/s", ops_per_sec / 1e3)
    }
}

fn fmt_cell(o: &Option<Outcome>) -> String {
    match o {
        None => "–".into(),
        Some(Outcome::Hung) => "HUNG".into(),
        Some(Outcome::Done {
            ns_per_op,
            ops_per_sec,
            mismatch,
            ..
        }) => {
            let flag = if mismatch.is_some() { " MISMATCH" } else { "" };
            format!("{ns_per_op:.0} ns · {}{flag}", fmt_rate(*ops_per_sec))
        }
    }
}

fn fmt_ratio(a: &Option<Outcome>, b: &Option<Outcome>) -> String {
    match (a, b) {
        (Some(a @ Outcome::Done { .. }), Some(b @ Outcome::Done { .. })) => {
            format!("{:.2}", ns(a) / ns(b))
        }
        _ => "–".into(),
    }
}

fn fmt_share(o: &Option<Outcome>) -> String {
    match o {
        None => "–".into(),
        Some(Outcome::Hung) => "HUNG".into(),
        Some(Outcome::Done {
            min_share,
            max_share,
            ..
        }) => format!("{min_share:.2} / {max_share:.2}"),
    }
}

fn print_tables(mode: Mode, cells: &[Cell], reps: usize) {
    let [floor, marina, fifo, deadpool, bb8] = [0, 1, 2, 3, 4];
    println!(
        "\n### `{}`: ns per acquire → touch → release (median of {reps})\n",
        mode.name()
    );
    println!(
        "| pool size | tasks | floor | marina | marina-fifo | deadpool | bb8 | marina/floor | marina-fifo/floor | marina/deadpool | marina/bb8 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        let m: Vec<Option<Outcome>> = (0..POOLS.len()).map(|i| c.median(i)).collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.size,
            c.tasks,
            fmt_cell(&m[floor]),
            fmt_cell(&m[marina]),
            fmt_cell(&m[fifo]),
            fmt_cell(&m[deadpool]),
            fmt_cell(&m[bb8]),
            fmt_ratio(&m[marina], &m[floor]),
            fmt_ratio(&m[fifo], &m[floor]),
            fmt_ratio(&m[marina], &m[deadpool]),
            fmt_ratio(&m[marina], &m[bb8]),
        );
    }

    println!(
        "\n### `{}`: per-task share of ops (min / max task ops ÷ mean)\n",
        mode.name()
    );
    println!("| pool size | tasks | floor | marina | marina-fifo | deadpool | bb8 | x-core RTT |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} ns |",
            c.size,
            c.tasks,
            fmt_share(&c.median(floor)),
            fmt_share(&c.median(marina)),
            fmt_share(&c.median(fifo)),
            fmt_share(&c.median(deadpool)),
            fmt_share(&c.median(bb8)),
            c.rtt.as_nanos(),
        );
    }

    if reps > 1 {
        println!(
            "\n### `{}`: ns/op min–max over the {reps} reps\n",
            mode.name()
        );
        println!("| pool size | tasks | floor | marina | marina-fifo | deadpool | bb8 |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for c in cells {
            let r = |i: usize| match c.range(i) {
                Some((lo, hi)) => format!("{lo:.0}–{hi:.0}"),
                None if c.runs[i].is_empty() => "–".into(),
                None => "HUNG".into(),
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.size,
                c.tasks,
                r(floor),
                r(marina),
                r(fifo),
                r(deadpool),
                r(bb8)
            );
        }
    }
}

/// Command-line options.
#[derive(Debug)]
struct Options {
    workers: usize,
    secs: Duration,
    reps: usize,
    modes: Vec<Mode>,
    pools: Vec<&'static str>,
    sizes: Vec<usize>,
    tasks: Vec<usize>,
    marina_timeout: Option<Duration>,
    ambient_timer: bool,
    smoke: bool,
}

fn parse_list(v: &str) -> Result<Vec<usize>, String> {
    v.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|e| format!("bad number {s:?}: {e}"))
        })
        .collect()
}

fn parse_args() -> Result<Options, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Options {
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        secs: Duration::from_millis(500),
        reps: 3,
        modes: vec![Mode::Touch, Mode::HoldYield],
        pools: RUN_ORDER.to_vec(),
        sizes: vec![4, 16, 64],
        tasks: vec![1, 16, 256, 1024],
        marina_timeout: DEFAULT_TIMEOUT,
        ambient_timer: true,
        // `cargo bench` passes `--bench`; `cargo test --benches` does not.
        smoke: !args.iter().any(|a| a == "--bench"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {}
            "--no-ambient-timer" => o.ambient_timer = false,
            "--quick" => {
                o.secs = Duration::from_millis(200);
                o.reps = 1;
            }
            "--workers" => o.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--secs" => {
                let s: f64 = value()?.parse().map_err(|e| format!("--secs: {e}"))?;
                o.secs = Duration::try_from_secs_f64(s).map_err(|e| format!("--secs: {e}"))?;
            }
            "--reps" => o.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--mode" => {
                o.modes = match value()?.as_str() {
                    "touch" => vec![Mode::Touch],
                    "hold-yield" => vec![Mode::HoldYield],
                    "both" => vec![Mode::Touch, Mode::HoldYield],
                    m => return Err(format!("--mode: unknown mode {m:?}")),
                }
            }
            "--pools" => {
                let wanted = value()?;
                let mut pools = Vec::new();
                for w in wanted.split(',') {
                    let p = RUN_ORDER
                        .iter()
                        .find(|p| **p == w.trim())
                        .ok_or_else(|| format!("--pools: unknown pool {w:?}"))?;
                    pools.push(*p);
                }
                // Keep the interleaving order fixed whatever order was asked for.
                o.pools = RUN_ORDER
                    .iter()
                    .copied()
                    .filter(|p| pools.contains(p))
                    .collect();
            }
            "--sizes" => o.sizes = parse_list(value()?)?,
            "--marina-acquire-timeout" => {
                o.marina_timeout = match value()?.as_str() {
                    "none" => None,
                    v => {
                        let s: f64 = v
                            .parse()
                            .map_err(|e| format!("--marina-acquire-timeout: {e}"))?;
                        Some(
                            Duration::try_from_secs_f64(s)
                                .map_err(|e| format!("--marina-acquire-timeout: {e}"))?,
                        )
                    }
                }
            }
            "--tasks" => o.tasks = parse_list(value()?)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.smoke {
        o.secs = Duration::from_millis(50);
        o.reps = 1;
        o.sizes = vec![4];
        o.tasks = vec![1, 64];
    }
    if o.workers == 0 || o.reps == 0 || o.sizes.contains(&0) || o.tasks.contains(&0) {
        return Err("--workers, --reps, --sizes and --tasks must be at least 1".into());
    }
    Ok(o)
}

/// Runs `P` once in `cell`, logs the result to stderr and records it.
fn measure<P: Contender>(
    rt: &Runtime,
    cell: &mut Cell,
    mode: Mode,
    secs: Duration,
    problems: &mut Vec<String>,
) {
    let (size, tasks) = (cell.size, cell.tasks);
    let outcome = run_once::<P>(rt, size, tasks, mode, secs);
    let what = format!("{} size {size} tasks {tasks} {}", mode.name(), P::NAME);
    match &outcome {
        Outcome::Hung => {
            eprintln!("  {what}: HUNG (aborted {HANG_GRACE:?} after the stop flag)");
            problems.push(format!("HUNG: {what}"));
        }
        Outcome::Done {
            ns_per_op,
            mismatch: Some((sum, ops)),
            ..
        } => {
            let sum = if *sum == u64::MAX {
                "connections missing".to_string()
            } else {
                sum.to_string()
            };
            eprintln!(
                "  {what}: {ns_per_op:.0} ns/op, COUNTER MISMATCH: counters {sum} != ops {ops}"
            );
            problems.push(format!("MISMATCH: {what}: counters {sum} != ops {ops}"));
        }
        Outcome::Done {
            ns_per_op,
            min_share,
            max_share,
            ..
        } => eprintln!("  {what}: {ns_per_op:.0} ns/op, share {min_share:.2} / {max_share:.2}"),
    }
    cell.runs[pool_index(P::NAME)].push(outcome);
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pool bench: {e}");
            return ExitCode::from(2);
        }
    };
    MARINA_ACQUIRE_TIMEOUT.get_or_init(|| opts.marina_timeout);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers)
        .enable_time()
        .build()
        .expect("tokio runtime");
    // Every real service has timers pending in its runtime, and marina's pool always
    // has one (its maintenance tick). A tokio worker with a pending timer parks and
    // wakes differently, which alone moves the `hold-yield` one-task cells by ~60 ns
    // (they mostly measure `yield_now`). Keep one idle timer registered for every pool
    // alike, so the cells compare pools rather than runtime states.
    let ambient = opts
        .ambient_timer
        .then(|| rt.spawn(async { tokio::time::sleep(Duration::from_secs(24 * 3600)).await }));

    println!(
        "pool bench: {} tokio workers, {:?} per run, {} rep(s), pools {:?}, marina acquire_timeout {:?}, ambient timer {}{}",
        opts.workers,
        opts.secs,
        opts.reps,
        opts.pools,
        opts.marina_timeout,
        opts.ambient_timer,
        if opts.smoke {
            " (smoke test: no --bench flag)"
        } else {
            ""
        },
    );
    let mut problems = Vec::new();
    for &mode in &opts.modes {
        let mut cells = Vec::new();
        for &size in &opts.sizes {
            for &tasks in &opts.tasks {
                let mut cell = Cell {
                    size,
                    tasks,
                    rtt: cross_core_rtt(),
                    runs: Default::default(),
                };
                for _ in 0..opts.reps {
                    for &p in &opts.pools {
                        match p {
                            "marina" => {
                                measure::<Marina>(&rt, &mut cell, mode, opts.secs, &mut problems)
                            }
                            "marina-fifo" => measure::<MarinaFifo>(
                                &rt,
                                &mut cell,
                                mode,
                                opts.secs,
                                &mut problems,
                            ),
                            "deadpool" => {
                                measure::<Deadpool>(&rt, &mut cell, mode, opts.secs, &mut problems)
                            }
                            "bb8" => measure::<Bb8>(&rt, &mut cell, mode, opts.secs, &mut problems),
                            _ => measure::<Floor>(&rt, &mut cell, mode, opts.secs, &mut problems),
                        }
                    }
                }
                cells.push(cell);
            }
        }
        print_tables(mode, &cells, opts.reps);
    }
    if let Some(t) = ambient {
        t.abort();
    }
    rt.shutdown_timeout(Duration::from_secs(1));

    if problems.is_empty() {
        println!("\nAll touch counters matched the ops counted; no run hung.");
        ExitCode::SUCCESS
    } else {
        println!("\nPROBLEMS:");
        for p in &problems {
            println!("- {p}");
        }
        // Hangs of other pools are findings, not failures; a counter mismatch or any
        // marina problem fails the run.
        let fatal = problems
            .iter()
            .any(|p| p.starts_with("MISMATCH") || p.contains(" marina"));
        if fatal {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}
