//! Echo requests per second through marina's whole stack, beside a connection per
//! request, deadpool, and marina's pool alone.
//!
//! Three line echo servers run in the bench, on 127.0.0.1, on the same tokio runtime as
//! the clients. `--clients` tasks (default 64), released together, each loop *send a
//! line → read the reply → check it is the line* until a stop flag is set after `--secs`
//! of wall clock. A row reports requests/s (echoes checked ÷ wall time from the start
//! signal to the last task's end), the median of `--reps` interleaved reps, with p50 and
//! p99 latency of that rep. The rows (`--rows`, default all):
//!
//! - `connect`: a new TCP connection per request (`TcpStream::connect`, `TCP_NODELAY`,
//!   write the line, read the reply, close), backends taken in round robin;
//! - `deadpool`: three deadpool 0.13 `managed::Pool`s of
//!   [`LineClient`](marina::line::LineClient)s (a `Manager` that connects and, on
//!   recycle, refuses a client a failed call left broken), a hand-written round robin;
//! - `pool`: three `marina_pool::Pool`s of `LineClient`s over `TcpConnector`, with the
//!   checkout check the stack uses (the client is usable and its socket open: one
//!   `recv(MSG_PEEK)` per checkout), the same round robin;
//! - `pool-nocheck`: the same, checking only that the client is usable (no syscall);
//! - `marina`: `Stack::builder().endpoints(..).pool(..).build_line()`: default health
//!   checks and failover, round robin, no affinity, no limits;
//! - `marina-bare`: the same with health checks and failover off (balance + pool);
//! - `marina-sticky-rate`: `marina` plus sticky sessions (one session per client task,
//!   carried in the request's extensions) and a global rate limit of 10M requests/s
//!   (never reached), to show what those layers cost.
//!
//! Every pool holds `--pool` connections per backend (default 16), all opened before
//! measuring (deadpool's by checking them all out once; marina's by
//! `min_idle = max_size`). Each rep builds its row afresh and runs it for a short warm-up
//! (`--warmup`, default 0.3 s) before the measured run.
//!
//! Besides requests/s and latency, a row shows the CPU the bench process used (user +
//! system, all threads: clients, servers and the kernel's TCP work for both) as cores
//! busy and µs per request, and the CPU other processes used meanwhile (both from
//! `/proc`, Linux only). On a shared machine a rep during which other processes kept
//! more than `--max-others` cores busy (default 0.25) is run again, up to `--retries`
//! times in all (default 8).
//!
//! ```text
//! cargo bench -p marina-bench --bench stack -- [--clients N] [--secs S] [--reps R]
//!     [--pool N] [--workers N] [--warmup S] [--max-others CORES] [--retries N]
//!     [--rows connect,deadpool,pool,pool-nocheck,marina,marina-bare,marina-sticky-rate]
//! ```
//!
//! Without `--bench` in its arguments (as under `cargo test --benches`) it runs every row
//! briefly (8 clients, pools of 4, 0.1 s) and fails on an error, a wrong echo or a hang.

// A benchmark measures real wall time across OS threads (and sleeps the main thread,
// which is not a runtime worker), so it uses std's clock and sleep on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use marina::core::BoxError;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

/// How long a run may take after its stop flag before it counts as hung.
const HANG_GRACE: Duration = Duration::from_secs(10);

/// Every row, in the order they run.
const ROWS: [&str; 7] = [
    "connect",
    "deadpool",
    "pool",
    "pool-nocheck",
    "marina",
    "marina-bare",
    "marina-sticky-rate",
];

#[derive(Debug, Clone)]
struct Opts {
    clients: usize,
    secs: f64,
    warmup: f64,
    reps: usize,
    pool: usize,
    workers: usize,
    rows: Vec<String>,
    /// A rep during which other processes kept more than this many cores busy is run
    /// again, while `retries` last.
    max_others: f64,
    retries: usize,
    smoke: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    // A smoke run (no `--bench`) is short and small, and never retries.
    let mut o = Opts {
        clients: if smoke { 8 } else { 64 },
        secs: if smoke { 0.1 } else { 1.5 },
        warmup: if smoke { 0.05 } else { 0.3 },
        reps: if smoke { 1 } else { 3 },
        pool: if smoke { 4 } else { 16 },
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        rows: ROWS.iter().map(|r| r.to_string()).collect(),
        max_others: 0.25,
        retries: if smoke { 0 } else { 8 },
        smoke,
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bench" => {}
            "--clients" => o.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--secs" => o.secs = value()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--warmup" => o.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--reps" => o.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--pool" => o.pool = value()?.parse().map_err(|e| format!("--pool: {e}"))?,
            "--workers" => o.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--max-others" => {
                o.max_others = value()?.parse().map_err(|e| format!("--max-others: {e}"))?
            }
            "--retries" => o.retries = value()?.parse().map_err(|e| format!("--retries: {e}"))?,
            "--rows" => {
                o.rows = value()?.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = o.rows.iter().find(|r| !ROWS.contains(&r.as_str())) {
                    return Err(format!("unknown row {bad} (rows: {})", ROWS.join(",")));
                }
            }
            // cargo bench passes filters and libtest flags through; ignore them.
            _ => {}
        }
    }
    if o.clients == 0 || o.reps == 0 || o.pool == 0 || o.workers == 0 || o.secs <= 0.0 {
        return Err("--clients, --reps, --pool, --workers and --secs must be above 0".into());
    }
    Ok(o)
}

// --------------------------------------------------------------------------- servers

// The rows' clients and servers, shared with the instruction-count bench.
#[path = "common/rows.rs"]
mod rows;
use rows::{Client, build, echo_server};

// ------------------------------------------------------------------------- measuring

/// One run of one row.
#[derive(Debug, Clone, Default)]
struct Run {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    wall: Duration,
    /// Sorted latencies, µs.
    latencies: Vec<u32>,
    /// Process CPU time (user + system, all threads: clients, servers and the
    /// kernel's TCP work on their behalf) during the run, where readable.
    cpu: Option<Duration>,
    /// CPU time the rest of the machine used meanwhile (other processes), where
    /// readable: a run beside a busy neighbour is not comparable.
    others: Option<Duration>,
    hung: bool,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64()
    }

    /// CPU cores busy on average (CPU time ÷ wall time).
    fn cores(&self) -> Option<f64> {
        self.cpu.map(|c| c.as_secs_f64() / self.wall.as_secs_f64())
    }

    /// Other processes' CPU cores busy on average.
    fn others_cores(&self) -> Option<f64> {
        self.others
            .map(|c| c.as_secs_f64() / self.wall.as_secs_f64())
    }

    /// CPU µs per request.
    fn cpu_us_per_request(&self) -> Option<f64> {
        self.cpu
            .filter(|_| self.ok > 0)
            .map(|c| c.as_secs_f64() * 1e6 / self.ok as f64)
    }

    fn percentile_us(&self, p: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize]
    }
}

/// What one task did.
#[derive(Default)]
struct TaskTally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<u32>,
}

/// This process's CPU time so far (user + system, all threads), from
/// `/proc/self/stat` (Linux; in clock ticks, taken as the usual 100 per second).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The whole machine's busy CPU time so far (all but idle and iowait), from the first
/// line of `/proc/stat` (Linux; clock ticks taken as 100 per second).
fn machine_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let t: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let busy = t.get(..8)?.iter().sum::<u64>() - t[3] - t[4];
    Some(Duration::from_millis(busy * 10))
}

/// Runs `clients` tasks over `client` for `secs` of wall clock.
fn run(rt: &Runtime, client: &Client, clients: usize, secs: f64) -> Run {
    let go = Arc::new(Semaphore::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut client = client.clone();
            if let Client::Stack {
                session: Some(s), ..
            } = &mut client
            {
                s.0 = format!("client-{c}");
            }
            let go = go.clone();
            let stop = stop.clone();
            rt.spawn(async move {
                go.acquire().await.expect("open").forget();
                let mut t = TaskTally::default();
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    let line = format!("client {c} request {n}");
                    n += 1;
                    let t0 = Instant::now();
                    match client.exchange(line.clone()).await {
                        Ok(reply) if reply == line => {
                            t.ok += 1;
                            let us = t0.elapsed().as_micros();
                            t.latencies.push(us.min(u128::from(u32::MAX)) as u32);
                        }
                        other => {
                            t.errors += 1;
                            if t.first_error.is_none() {
                                t.first_error = Some(match other {
                                    Ok(reply) => format!("wrong echo {reply:?} for {line:?}"),
                                    Err(e) => e.to_string(),
                                });
                            }
                            // Do not spin on a refusal.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                t
            })
        })
        .collect();
    let cpu0 = process_cpu();
    let machine0 = machine_cpu();
    let start = Instant::now();
    go.add_permits(clients);
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Relaxed);
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let joined = rt.block_on(async {
        tokio::time::timeout(HANG_GRACE, async {
            let mut all = Vec::with_capacity(tasks.len());
            for t in tasks {
                all.push(t.await.expect("a client task panicked"));
            }
            all
        })
        .await
    });
    let wall = start.elapsed();
    let cpu = process_cpu()
        .zip(cpu0)
        .map(|(end, begin)| end.saturating_sub(begin));
    let others = machine_cpu()
        .zip(machine0)
        .zip(cpu)
        .map(|((end, begin), own)| end.saturating_sub(begin).saturating_sub(own));
    let mut out = Run {
        wall,
        cpu,
        others,
        ..Run::default()
    };
    match joined {
        Ok(tallies) => {
            for t in tallies {
                out.ok += t.ok;
                out.errors += t.errors;
                if out.first_error.is_none() {
                    out.first_error = t.first_error;
                }
                out.latencies.extend(t.latencies);
            }
            out.latencies.sort_unstable();
        }
        Err(_) => {
            out.hung = true;
            aborts.iter().for_each(|a| a.abort());
        }
    }
    out
}

/// Builds `row`, warms it up, measures it, closes it.
fn rep(rt: &Runtime, row: &str, addrs: &[SocketAddr], o: &Opts) -> Result<Run, BoxError> {
    let built = rt.block_on(build(row, addrs, o.pool))?;
    if o.warmup > 0.0 {
        run(rt, &built.client, o.clients, o.warmup);
    }
    let measured = run(rt, &built.client, o.clients, o.secs);
    if let Some(handle) = built.stack {
        rt.block_on(handle.shutdown(Duration::from_secs(1)));
    }
    drop(built.client);
    // Let closed connections' server tasks end before the next row.
    std::thread::sleep(Duration::from_millis(50));
    Ok(measured)
}

fn main() -> ExitCode {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("stack bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.workers)
        .enable_all()
        .build()
        .expect("a runtime");
    let addrs = rt.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(echo_server().await.expect("an echo server"));
        }
        addrs
    });
    println!(
        "stack bench: {} clients, pools of {} per backend, 3 echo servers on 127.0.0.1, \
         {} s per run (after {} s of warm-up), {} reps interleaved (median), {} tokio workers\n",
        o.clients, o.pool, o.secs, o.warmup, o.reps, o.workers
    );

    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); o.rows.len()];
    let mut failed = false;
    let mut retries_left = o.retries;
    for r in 0..o.reps {
        for (i, row) in o.rows.iter().enumerate() {
            loop {
                let run = match rep(&rt, row, &addrs, &o) {
                    Ok(run) => run,
                    Err(e) => {
                        eprintln!("rep {}/{} {row}: could not build: {e}", r + 1, o.reps);
                        failed = true;
                        break;
                    }
                };
                let noisy = run.others_cores().is_some_and(|c| c > o.max_others);
                eprintln!(
                    "rep {}/{} {row:<20} {:>9.0} req/s  {} cores busy (others: {})  errors {}{}{}{}",
                    r + 1,
                    o.reps,
                    run.per_sec(),
                    run.cores().map_or("-".into(), |c| format!("{c:.2}")),
                    run.others_cores().map_or("-".into(), |c| format!("{c:.2}")),
                    run.errors,
                    run.first_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" (first: {e})")),
                    if run.hung { "  HUNG" } else { "" },
                    match (noisy, retries_left > 0) {
                        (false, _) => "",
                        (true, true) => "  (busy machine: again)",
                        (true, false) => "  (busy machine, kept: no retries left)",
                    },
                );
                if noisy && retries_left > 0 && !run.hung {
                    retries_left -= 1;
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                failed |= run.hung || (o.smoke && (run.errors > 0 || run.ok == 0));
                runs[i].push(run);
                break;
            }
        }
    }

    // Median rep per row, and the spread over the reps.
    let medians: Vec<Option<(Run, f64, f64)>> = runs
        .into_iter()
        .map(|mut rs| {
            rs.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
            let lo = rs.first()?.per_sec();
            let hi = rs.last()?.per_sec();
            let mid = rs.len() / 2;
            Some((rs.swap_remove(mid), lo, hi))
        })
        .collect();
    println!(
        "| row | requests/s (median) | min–max | p50 µs | p99 µs | CPU cores busy | others' cores | CPU µs/request | errors | ÷ deadpool | ÷ connect |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rate_of = |name: &str| {
        o.rows
            .iter()
            .position(|r| r == name)
            .and_then(|i| medians[i].as_ref())
            .map(|(m, _, _)| m.per_sec())
    };
    let (deadpool, connect) = (rate_of("deadpool"), rate_of("connect"));
    let ratio =
        |x: f64, base: Option<f64>| base.map_or("-".to_string(), |b| format!("{:.2}", x / b));
    for (row, m) in o.rows.iter().zip(&medians) {
        let Some((m, lo, hi)) = m else {
            println!("| {row} | - | - | - | - | - | - | - | - | - | - |");
            continue;
        };
        println!(
            "| {row} | {:.0} | {lo:.0}–{hi:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.per_sec(),
            m.percentile_us(0.50),
            m.percentile_us(0.99),
            m.cores().map_or("-".into(), |c| format!("{c:.2}")),
            m.others_cores().map_or("-".into(), |c| format!("{c:.2}")),
            m.cpu_us_per_request()
                .map_or("-".into(), |c| format!("{c:.1}")),
            m.errors,
            ratio(m.per_sec(), deadpool),
            ratio(m.per_sec(), connect),
        );
    }
    if let Some(c) = rate_of("marina") {
        println!();
        if let Some(b) = deadpool {
            let r = c / b;
            println!(
                "marina ÷ deadpool = {r:.2} (goal ≥ 0.9: {})",
                if r >= 0.9 { "met" } else { "NOT met" }
            );
        }
        if let Some(a) = connect {
            let r = c / a;
            println!(
                "marina ÷ connect  = {r:.2} (goal ≥ 5: {})",
                if r >= 5.0 { "met" } else { "NOT met" }
            );
        }
    }
    if failed {
        eprintln!("stack bench: a row failed (errors, a hang, or a build failure)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
