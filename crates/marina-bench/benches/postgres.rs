//! `SELECT 1` per second through a pool of `tokio-postgres` clients against a real
//! PostgreSQL server: marina-pool's `postgres` adapter beside deadpool-postgres and
//! bb8-postgres.
//!
//! The server is `MARINA_PG_URL` (default `host=127.0.0.1 user=postgres dbname=test`).
//! `--tasks` tokio tasks (default 64), released together, each loop *check a client out
//! → `simple_query("SELECT 1")` → return it* until a stop flag is set after `--secs` of
//! wall clock. Every pool holds `--pool` clients (default 16), all opened before
//! measuring, and runs `--warmup` seconds (default 0.3) before the measured run. A row
//! reports queries/s (queries ÷ wall time from the start signal to the last task's end),
//! the p50/p99 latency of a checkout plus its query, and each task's share of the
//! queries (fewest and most, ÷ the mean: a pool whose waiters barge starves some tasks,
//! whose long waits then count as few latency samples). The rows run interleaved, one
//! pool at a time, `--reps` times (default 5); the table shows each row's median rep,
//! its min–max, and its ratio to deadpool's median.
//!
//! - `marina`: `marina_pool::postgres::PgPool` (`Managed<PgConnector<NoTls>>`, default
//!   configuration: `Client::is_closed` checked at checkout, no query);
//! - `deadpool`: deadpool-postgres 0.14 `Pool` with `RecyclingMethod::Fast` (its
//!   default: `is_closed` checked at recycle, no query);
//! - `bb8`: bb8-postgres 0.9 with bb8's defaults (`test_on_check_out`: an empty query,
//!   one round trip, on every checkout);
//! - `bb8-nocheck`: the same with `test_on_check_out(false)` (only `has_broken`, i.e.
//!   `is_closed`, on return).
//!
//! ```text
//! cargo bench -p marina-bench --bench postgres -- [--tasks N] [--pool N] [--secs S]
//!     [--warmup S] [--reps R] [--workers N] [--rows marina,deadpool,bb8,bb8-nocheck]
//! ```
//!
//! Without `--bench` in its arguments (as under `cargo test --benches`) it runs every row
//! once, briefly (8 tasks, pools of 4, 0.2 s), and fails on an error or a hang.

// A benchmark measures real wall time across OS threads, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bb8_postgres::PostgresConnectionManager;
use deadpool_postgres::{ManagerConfig, RecyclingMethod};
use marina_pool::postgres::{PgConnector, PgPool};
use marina_pool::{Config, Managed, Pool};
use tokio_postgres::NoTls;

const ROWS: [&str; 4] = ["marina", "deadpool", "bb8", "bb8-nocheck"];

/// How long the tasks may take to stop before the run counts as hung.
const HANG_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Opts {
    tasks: usize,
    pool: usize,
    secs: f64,
    warmup: f64,
    reps: usize,
    workers: usize,
    rows: Vec<String>,
    smoke: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut o = Opts {
        tasks: if smoke { 8 } else { 64 },
        pool: if smoke { 4 } else { 16 },
        secs: if smoke { 0.2 } else { 2.0 },
        warmup: if smoke { 0.05 } else { 0.3 },
        reps: if smoke { 1 } else { 5 },
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        rows: ROWS.iter().map(|r| r.to_string()).collect(),
        smoke,
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--tasks" => o.tasks = value()?.parse().map_err(|e| format!("--tasks: {e}"))?,
            "--pool" => o.pool = value()?.parse().map_err(|e| format!("--pool: {e}"))?,
            "--secs" => o.secs = value()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--warmup" => o.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--reps" => o.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--workers" => o.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--rows" => {
                o.rows = value()?.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = o.rows.iter().find(|r| !ROWS.contains(&r.as_str())) {
                    return Err(format!("unknown row {bad} (rows: {})", ROWS.join(",")));
                }
            }
            // cargo bench passes `--bench`, filters and libtest flags through.
            _ => {}
        }
    }
    if o.tasks == 0 || o.pool == 0 || o.reps == 0 || o.workers == 0 || o.secs <= 0.0 {
        return Err("--tasks, --pool, --reps, --workers and --secs must be above 0".into());
    }
    Ok(o)
}

fn pg_config() -> tokio_postgres::Config {
    let url = std::env::var("MARINA_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    url.parse()
        .unwrap_or_else(|e| panic!("MARINA_PG_URL {url:?} does not parse: {e}"))
}

type Bb8Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

/// One row's pool.
enum AnyPool {
    Marina(PgPool),
    Deadpool(deadpool_postgres::Pool),
    Bb8(Bb8Pool),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl AnyPool {
    /// Builds the row's pool with `size` clients, all opened.
    async fn build(row: &str, size: usize) -> Result<AnyPool, BoxError> {
        let config = pg_config();
        let pool = match row {
            "marina" => {
                let pool: PgPool = Pool::builder()
                    .config(Config {
                        min_idle: size,
                        max_size: size,
                        acquire_timeout: Some(Duration::from_secs(30)),
                        ..Config::default()
                    })
                    .build(Managed::new(PgConnector::new(NoTls)), config)?;
                pool.ready_min().await?;
                AnyPool::Marina(pool)
            }
            "deadpool" => {
                let manager = deadpool_postgres::Manager::from_config(
                    config,
                    NoTls,
                    ManagerConfig {
                        recycling_method: RecyclingMethod::Fast,
                    },
                );
                let pool = deadpool_postgres::Pool::builder(manager)
                    .max_size(size)
                    .build()?;
                // Open every client: check them all out at once.
                let mut held = Vec::new();
                for _ in 0..size {
                    held.push(pool.get().await?);
                }
                AnyPool::Deadpool(pool)
            }
            "bb8" | "bb8-nocheck" => {
                let pool = bb8::Pool::builder()
                    .max_size(size as u32)
                    .min_idle(Some(size as u32))
                    .test_on_check_out(row == "bb8")
                    .build(PostgresConnectionManager::new(config, NoTls))
                    .await?;
                {
                    let mut held = Vec::new();
                    for _ in 0..size {
                        held.push(pool.get().await?);
                    }
                }
                AnyPool::Bb8(pool)
            }
            other => return Err(format!("unknown row {other}").into()),
        };
        Ok(pool)
    }

    /// One checkout and `SELECT 1`.
    async fn select_one(&self) -> Result<(), BoxError> {
        match self {
            AnyPool::Marina(p) => {
                p.get().await?.simple_query("SELECT 1").await?;
            }
            AnyPool::Deadpool(p) => {
                p.get().await?.simple_query("SELECT 1").await?;
            }
            AnyPool::Bb8(p) => {
                p.get().await?.simple_query("SELECT 1").await?;
            }
        }
        Ok(())
    }

    async fn close(self) {
        match self {
            AnyPool::Marina(p) => p.close().await,
            AnyPool::Deadpool(p) => p.close(),
            AnyPool::Bb8(p) => drop(p),
        }
    }
}

/// One measured run of one row.
#[derive(Debug, Default)]
struct Run {
    ok: u64,
    wall: Duration,
    /// Sorted latencies, µs.
    latencies: Vec<u32>,
    /// Queries per task, smallest and largest, as shares of the mean.
    share: (f64, f64),
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64()
    }

    fn percentile_us(&self, p: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize]
    }
}

/// Runs `tasks` tasks over `pool` for `secs`.
async fn measure(pool: &Arc<AnyPool>, tasks: usize, secs: f64) -> Result<Run, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let (pool, stop, start) = (pool.clone(), stop.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 14);
            start.wait().await;
            while !stop.load(Relaxed) {
                let t = Instant::now();
                pool.select_one().await.map_err(|e| e.to_string())?;
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok::<_, String>(lat)
        }));
    }
    start.wait().await;
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Relaxed);
    let mut run = Run::default();
    let joined = tokio::time::timeout(HANG_GRACE, async {
        let mut all = Vec::new();
        for h in handles {
            all.push(h.await);
        }
        all
    })
    .await
    .map_err(|_| "HUNG: tasks did not stop".to_string())?;
    run.wall = began.elapsed();
    let mut per_task = Vec::with_capacity(tasks);
    for r in joined {
        let lat = r.map_err(|e| format!("task panicked: {e}"))??;
        run.ok += lat.len() as u64;
        per_task.push(lat.len() as f64);
        run.latencies.extend(lat);
    }
    let mean = run.ok as f64 / tasks as f64;
    if mean > 0.0 {
        run.share = per_task.iter().fold((f64::MAX, 0f64), |(lo, hi), &n| {
            (lo.min(n / mean), hi.max(n / mean))
        });
    }
    run.latencies.sort_unstable();
    Ok(run)
}

async fn run_row(row: &str, o: &Opts) -> Result<Run, String> {
    let pool = Arc::new(AnyPool::build(row, o.pool).await.map_err(|e| {
        format!("{row}: building the pool failed (is PostgreSQL at MARINA_PG_URL running?): {e}")
    })?);
    measure(&pool, o.tasks, o.warmup).await?;
    let run = measure(&pool, o.tasks, o.secs).await?;
    if let Ok(pool) = Arc::try_unwrap(pool) {
        pool.close().await;
    }
    Ok(run)
}

fn main() -> ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "postgres: {} tasks, pools of {}, {} s per rep after {} s warm-up, {} reps interleaved, {} workers",
        o.tasks, o.pool, o.secs, o.warmup, o.reps, o.workers
    );
    let mut results: Vec<(String, Vec<Run>)> =
        o.rows.iter().map(|r| (r.clone(), Vec::new())).collect();
    for rep in 0..o.reps {
        for (row, runs) in results.iter_mut() {
            match rt.block_on(run_row(row, &o)) {
                Ok(run) => {
                    eprintln!("rep {rep} {row}: {:.0} queries/s", run.per_sec());
                    runs.push(run);
                }
                Err(e) => {
                    eprintln!("rep {rep} {row}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let median = |runs: &mut Vec<Run>| -> usize {
        let mut idx: Vec<usize> = (0..runs.len()).collect();
        idx.sort_by(|&a, &b| runs[a].per_sec().total_cmp(&runs[b].per_sec()));
        idx[idx.len() / 2]
    };
    let deadpool = results
        .iter_mut()
        .find(|(r, _)| r == "deadpool")
        .map(|(_, runs)| {
            let m = median(runs);
            runs[m].per_sec()
        });
    println!();
    println!(
        "| row | queries/s (median) | min–max | p50 µs | p99 µs | task share min / max | × deadpool |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (row, runs) in results.iter_mut() {
        let m = median(runs);
        let (lo, hi) = runs.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
            (lo.min(r.per_sec()), hi.max(r.per_sec()))
        });
        let r = &runs[m];
        let ratio = deadpool.map_or("–".to_string(), |d| format!("{:.2}", r.per_sec() / d));
        println!(
            "| {row} | {:.0} | {:.0}–{:.0} | {} | {} | {:.2} / {:.2} | {ratio} |",
            r.per_sec(),
            lo,
            hi,
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            r.share.0,
            r.share.1
        );
    }
    if o.smoke {
        println!("(smoke run: pass --bench for the real one)");
    }
    ExitCode::SUCCESS
}
