//! The echo client: marina's main job, the whole stack end to end on loopback.
//!
//! Starts three line echo servers on 127.0.0.1 (random ports), builds the stack —
//! per-client concurrency limit and an optional rate limit → sticky sessions → round
//! robin (or another picker) with failover → health checks → a 300 ms request timeout →
//! a pool per backend over a bandwidth-limited TCP connector — and drives concurrent
//! clients for a few seconds. A third of the way in it kills one backend; two thirds
//! in it restarts it. With `--black-hole`, another backend stops answering a third of
//! the way in (it still accepts and reads): its requests time out, it is ejected, and
//! no client hangs.
//!
//! On a terminal it shows a live dashboard: a row per backend with requests/s and
//! their trend, health now and over the run, pool use (in use / idle / max) and
//! errors; sessions and limiter refusals; p50/p99 latency over time; ejections and
//! readmissions as they happen. `q` (or Esc, or Ctrl-C) stops early; the dashboard
//! also closes by itself at the end of `--duration`. Piped, or with `--no-tui`, it
//! prints one plain progress line a second instead, with no control characters. Then
//! a summary: the stack's table, requests and latency, each error the clients saw with
//! its causes, the errors failover absorbed, and the timeline of ejections.
//!
//! With `--metrics ADDR` it serves marina's metrics (the `metrics` feature) in the
//! Prometheus text format at `http://ADDR/metrics` for the length of the run; port 0
//! picks a free port, and the address is printed (`metrics: http://…/metrics`).
//!
//! ```text
//! cargo run --example echo -- [--clients N] [--duration SECS] [--picker rr|p2c|lc|lrt|hash]
//!                             [--rate REQ_PER_SEC] [--no-kill] [--black-hole]
//!                             [--backends HOST:PORT,...] [--no-tui] [--metrics ADDR]
//! cargo run --example echo -- --help
//! cargo run --example echo -- --no-tui --metrics 127.0.0.1:9100 --duration 60
//! ```

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use marina::affinity::TableConfig;
use marina::balance::{
    ConsistentHash, Failover, LeastConnections, LeastResponseTime, PowerOfTwoChoices, RoundRobin,
};
use marina::core::{BoxError, Request};
use marina::health::HealthConfig;
use marina::limit::{ConnectionLimit, Rate, RateLimited};
use marina::pool::Config;
use marina::{AffinityMode, KeyFnBox, Stack};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

#[path = "echo/dashboard.rs"]
mod dashboard;
#[path = "echo/live.rs"]
mod live;
#[path = "echo/prom.rs"]
mod prom;

use live::{LatencyWindow, Live, Timeline, What, error_chain, status_text};

/// Drive concurrent clients through marina's whole stack over local echo servers.
///
/// A third of the way in one backend is killed, two thirds in it is restarted; the
/// health checks eject it and take it back, and failover hides the failures from the
/// clients. On a terminal a live dashboard shows it (q quits); piped, or with
/// --no-tui, a plain progress line a second. A summary follows.
#[derive(Parser, Debug)]
#[command(name = "echo", version, max_term_width = 100)]
struct Args {
    /// Concurrent clients.
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// How long to run, in seconds (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "4", value_parser = parse_secs)]
    duration: Duration,
    /// How the balancer picks a backend for a new session.
    #[arg(long, value_enum, default_value_t = Picker::Rr)]
    picker: Picker,
    /// A global rate limit, in requests per second (default: none).
    #[arg(long, value_name = "REQ_PER_SEC")]
    rate: Option<u32>,
    /// Do not kill and restart a backend midway.
    #[arg(long)]
    no_kill: bool,
    /// Midway, another backend stops answering (it still accepts and reads): requests
    /// there time out, it is ejected, and no client hangs.
    #[arg(long)]
    black_hole: bool,
    /// Use these echo servers instead of starting three (nothing is killed then).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    backends: Vec<SocketAddr>,
    /// No dashboard even on a terminal: one plain progress line a second.
    #[arg(long)]
    no_tui: bool,
    /// Serve marina's metrics in the Prometheus text format at http://ADDR/metrics
    /// while the run lasts (port 0: any free port; the address is printed).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

/// The balancer's pickers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Picker {
    /// Round robin.
    Rr,
    /// Power of two choices (least loaded of two at random).
    P2c,
    /// Least connections.
    Lc,
    /// Least response time (peak EWMA).
    Lrt,
    /// Consistent hashing of the session key.
    Hash,
}

impl Picker {
    fn name(self) -> &'static str {
        match self {
            Picker::Rr => "rr",
            Picker::P2c => "p2c",
            Picker::Lc => "lc",
            Picker::Lrt => "lrt",
            Picker::Hash => "hash",
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{e}"))
}

/// A line echo server that can be killed (listener closed, connections dropped) and
/// restarted on the same port.
struct EchoServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// Set: the server still accepts and reads, but answers nothing (a black hole).
    silent: Arc<AtomicBool>,
}

impl EchoServer {
    async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, _) = watch::channel(false);
        let s = EchoServer {
            addr,
            stop,
            silent: Arc::new(AtomicBool::new(false)),
        };
        s.serve(listener);
        Ok(s)
    }

    fn serve(&self, listener: TcpListener) {
        let mut stopped = self.stop.subscribe();
        let silent = self.silent.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = until_stopped(&mut stopped) => return, // drops the listener
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { return };
                        let mut stopped = stopped.clone();
                        let silent = silent.clone();
                        tokio::spawn(async move {
                            let (read, mut write) = stream.into_split();
                            let mut lines = BufReader::new(read).lines();
                            loop {
                                tokio::select! {
                                    _ = until_stopped(&mut stopped) => return,
                                    line = lines.next_line() => match line {
                                        Ok(Some(_)) if silent.load(Relaxed) => {}
                                        Ok(Some(line)) => {
                                            if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                                                return;
                                            }
                                        }
                                        _ => return,
                                    },
                                }
                            }
                        });
                    }
                }
            }
        });
    }

    fn kill(&self) {
        self.stop.send_replace(true);
    }

    /// Stops answering, and keeps accepting and reading.
    fn go_silent(&self) {
        self.silent.store(true, Relaxed);
    }

    async fn restart(&self) -> std::io::Result<()> {
        self.stop.send_replace(false);
        let mut last = None;
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Err(last.expect("a bind attempt"))
    }
}

/// Returns once the server is told to stop.
async fn until_stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The session a client's requests carry.
#[derive(Clone)]
struct Session(String);

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Of `failed`, those a limiter refused (not the endpoints' doing).
    refused: AtomicU64,
    /// Each error, as its chain of causes, with how often it was seen.
    errors: Mutex<BTreeMap<String, u64>>,
    latencies_us: Mutex<Vec<u32>>,
}

/// At most this many distinct error texts are kept; the rest are counted together.
const ERROR_KINDS: usize = 40;

impl Tally {
    fn error(&self, e: &BoxError) {
        self.failed.fetch_add(1, Relaxed);
        if marina::core::find::<RateLimited>(&**e).is_some()
            || marina::core::find::<ConnectionLimit>(&**e).is_some()
        {
            self.refused.fetch_add(1, Relaxed);
        }
        let text = live::vague_durations(&error_chain(&**e));
        let mut errors = self.errors.lock().unwrap();
        let key = if errors.len() < ERROR_KINDS || errors.contains_key(&text) {
            text
        } else {
            "(other errors)".to_string()
        };
        *errors.entry(key).or_default() += 1;
    }
}

/// The error a garbled echo counts as.
#[derive(Debug)]
struct Garbled(String);

impl std::fmt::Display for Garbled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "garbled echo {:?}", self.0)
    }
}

impl std::error::Error for Garbled {}

fn percentile(sorted: &[u32], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Duration::from_micros(u64::from(sorted[i]))
}

/// What failover did with the errors the endpoints saw, when they saw any: absorbed
/// them all, or not.
fn failover_line(endpoint_errors: u64, retries: u64, client_errors: u64) -> Option<String> {
    match (endpoint_errors, client_errors) {
        (0, _) => None,
        (e, 0) => Some(format!(
            "endpoints saw {e} errors; failover retried them elsewhere ({retries} retries), clients saw 0"
        )),
        (e, c) => Some(format!(
            "endpoints saw {e} errors; failover made {retries} retries elsewhere; clients saw {c}"
        )),
    }
}

/// Why the run stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Done,
    Quit,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let tui = !args.no_tui && std::io::stdout().is_terminal();

    // The recorder goes in before anything registers a metric.
    let metrics = match args.metrics {
        Some(addr) => {
            let handle = prom::install()?;
            let (bound, task) = prom::serve(addr, handle)
                .await
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            println!("metrics: http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };

    let start = Instant::now();
    let since = move || start.elapsed().as_secs_f64();

    // Backends.
    let mut servers = Vec::new();
    let addrs = if args.backends.is_empty() {
        for _ in 0..3 {
            servers.push(EchoServer::start("127.0.0.1:0".parse()?).await?);
        }
        servers.iter().map(|s| s.addr).collect::<Vec<_>>()
    } else {
        args.backends.clone()
    };
    println!(
        "backends: {}",
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The stack.
    let session =
        KeyFnBox::new(|r: &Request<String>| r.extensions.get::<Session>().map(|s| s.0.clone()));
    let mut builder = Stack::builder::<String>()
        .endpoints(addrs.clone())
        .pool(Config {
            min_idle: 1,
            max_size: 8,
            ..Config::balanced()
        })
        .connect_timeout(Duration::from_millis(500))
        // No request waits for ever: an attempt with no reply in 300 ms times out, and
        // the health checks count it (the default is 15 s; short here for the demo).
        .request_timeout(Duration::from_millis(300))
        .health(Some(HealthConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(700),
            ..HealthConfig::default()
        }))
        // Echo requests are idempotent: fail over on any error, not only "not sent".
        .failover(Some(Failover::new().retry_if(|_| true)))
        .failfast_timeout(Duration::from_secs(2))
        .affinity(AffinityMode::Sticky(
            session.clone(),
            TableConfig::default(),
        ))
        .concurrency_per_key(session, 4)
        .bandwidth(32.0 * 1024.0 * 1024.0, 1024 * 1024);
    builder = match args.picker {
        Picker::Rr => builder.picker(RoundRobin::new),
        Picker::P2c => builder.picker(PowerOfTwoChoices::new),
        Picker::Lc => builder.picker(LeastConnections::new),
        Picker::Lrt => builder.picker(LeastResponseTime::new),
        Picker::Hash => builder.picker(ConsistentHash::new),
    };
    if let Some(r) = args.rate {
        builder = builder.rate_limit(Rate::per_second(r.max(1)));
    }
    let (svc, handle) = builder.build_line()?;
    println!(
        "stack: limits → sticky sessions → {} with failover → health → 300 ms request timeout → pools (≤ 8 per backend) → 32 MiB/s TCP",
        args.picker.name()
    );
    println!("{} clients for {:?}\n", args.clients, args.duration);

    // Clients.
    let tally = Arc::new(Tally::default());
    let window = Arc::new(LatencyWindow::new());
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..args.clients {
        let mut svc = svc.clone();
        let tally = tally.clone();
        let window = window.clone();
        let done = done.clone();
        clients.spawn(async move {
            let mut n = 0u64;
            let mut lat = Vec::new();
            while !done.load(Relaxed) {
                let line = format!("client {c} line {n}");
                let mut req = Request::new(line.clone());
                // A client starts a new session every 500 requests (a user logging
                // in again), so new sessions keep being placed by the picker.
                req.extensions
                    .insert(Session(format!("client-{c}-{}", n / 500)));
                n += 1;
                let t0 = Instant::now();
                let out = match svc.ready().await {
                    Ok(s) => s.call(req).await,
                    Err(e) => Err(e),
                };
                match out {
                    Ok(resp) if resp.body == line => {
                        tally.ok.fetch_add(1, Relaxed);
                        let took = t0.elapsed();
                        window.record(took);
                        lat.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    Ok(resp) => tally.error(&(Box::new(Garbled(resp.body)) as BoxError)),
                    Err(e) => {
                        tally.error(&e);
                        // Back off a little after a refusal.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            tally.latencies_us.lock().unwrap().extend(lat);
        });
    }

    // Every backend's health, as it changes; and what the demo does to them.
    let timeline = Arc::new(Timeline::default());
    for &addr in &addrs {
        let Some(h) = handle.health(addr) else {
            continue;
        };
        let timeline = timeline.clone();
        let mut rx = h.subscribe();
        tokio::spawn(async move {
            let mut was = *rx.borrow_and_update();
            while rx.changed().await.is_ok() {
                let now = *rx.borrow_and_update();
                if now != was {
                    timeline.push(since(), addr, What::Health(was, now, status_text(&now)));
                    was = now;
                }
            }
        });
    }
    let victim = addrs
        .get(1)
        .copied()
        .filter(|_| !args.no_kill && !servers.is_empty());
    let hole = addrs
        .get(2)
        .copied()
        .filter(|_| args.black_hole && servers.len() > 2);

    // Run, kill, restart; with the dashboard or a progress line a second.
    let mut board = if tui {
        match dashboard::Dashboard::open() {
            Ok(board) => Some(board),
            Err(e) => {
                eprintln!("echo: no dashboard ({e}): plain progress lines instead");
                None
            }
        }
    } else {
        None
    };
    let setup = format!(
        "{} clients, {}{}",
        args.clients,
        args.picker.name(),
        args.rate.map_or(String::new(), |r| format!(", {r} req/s"))
    );
    let mut live = Live::new(addrs.clone());
    let deadline = start + args.duration;
    let kill_at = start + args.duration / 3;
    let restart_at = start + args.duration * 2 / 3;
    let (mut killed, mut restarted, mut silenced) = (false, false, false);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Plain mode: a progress line on each whole second.
    let mut progress =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let stop = loop {
        let print = tokio::select! {
            _ = tick.tick() => false,
            _ = progress.tick(), if board.is_none() => true,
            _ = tokio::time::sleep_until(deadline) => break Stop::Done,
            _ = &mut ctrl_c => break Stop::Quit,
            _ = async { match board.as_mut() {
                Some(b) => b.quit_pressed().await,
                None => std::future::pending().await,
            } } => break Stop::Quit,
        };
        if let Some(addr) = victim {
            let server = servers.iter().find(|s| s.addr == addr).expect("our server");
            if !killed && Instant::now() >= kill_at {
                server.kill();
                killed = true;
                timeline.push(since(), addr, What::Demo("killed".into()));
            }
            if killed && !restarted && Instant::now() >= restart_at {
                server.restart().await?;
                restarted = true;
                timeline.push(since(), addr, What::Demo("restarted".into()));
            }
        }
        if let Some(addr) = hole
            && !silenced
            && Instant::now() >= kill_at
        {
            let server = servers.iter().find(|s| s.addr == addr).expect("our server");
            server.go_silent();
            silenced = true;
            timeline.push(
                since(),
                addr,
                What::Demo("stopped answering (black hole)".into()),
            );
        }
        let t = since();
        let stats = handle.stats();
        if !print {
            live.sample(t, &stats, &window);
        }
        match board.as_mut() {
            Some(board) => {
                let events = timeline.events();
                board.draw(&dashboard::View {
                    t,
                    duration: args.duration.as_secs_f64(),
                    ok: tally.ok.load(Relaxed),
                    errors: tally.failed.load(Relaxed),
                    setup: &setup,
                    stats: &stats,
                    live: &live,
                    events: &events,
                })?;
            }
            None => {
                if print {
                    let per: Vec<String> = stats
                        .backends
                        .iter()
                        .map(|b| b.balance.as_ref().map_or(0, |e| e.requests).to_string())
                        .collect();
                    println!(
                        "t={:.1}s ok={} errors={} per backend=[{}] in flight={}",
                        t,
                        tally.ok.load(Relaxed),
                        tally.failed.load(Relaxed),
                        per.join(", "),
                        stats.in_flight
                    );
                }
            }
        }
    };
    let ran = start.elapsed();
    done.store(true, Relaxed);
    if let Some(board) = board.take() {
        board.close();
    }
    if stop == Stop::Quit {
        println!("stopped after {:.1}s", ran.as_secs_f64());
    }
    // Every client finishes its last request within the request timeout: none hangs.
    let mut hung = clients.len();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while clients.join_next().await.is_some() {
            hung -= 1;
        }
    })
    .await;
    clients.abort_all();
    println!();

    // Summary.
    let stats = handle.stats();
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let ok = tally.ok.load(Relaxed);
    let secs = ran.as_secs_f64().max(1e-3);
    println!("{stats}");
    println!(
        "requests: {ok} echoed correctly in {secs:.1}s ({:.0}/s); latency p50 {:.2?}, p99 {:.2?}",
        ok as f64 / secs,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
    let errors = std::mem::take(&mut *tally.errors.lock().unwrap());
    // Failover can absorb the endpoints' errors, not the limiters' refusals.
    let client_errors = tally.failed.load(Relaxed) - tally.refused.load(Relaxed);
    if errors.is_empty() {
        println!("errors the clients saw: none");
    } else {
        println!("errors the clients saw, with their causes:");
        let mut by_count: Vec<_> = errors.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (text, n) in by_count {
            println!("  {n:>6}  {text}");
        }
    }
    let endpoint_errors: u64 = stats
        .backends
        .iter()
        .filter_map(|b| b.balance.as_ref())
        .map(|e| e.errors)
        .sum();
    if let Some(line) = failover_line(endpoint_errors, stats.balance.retries, client_errors) {
        println!("{line}");
    }
    if let Some(addr) = hole
        && let Some(b) = stats.backends.iter().find(|b| b.addr == addr)
    {
        let failed = b.balance.as_ref().map_or(0, |e| e.errors);
        println!(
            "black hole {addr}: {failed} attempts timed out after 300 ms (echo lines are idempotent: each was sent again elsewhere)"
        );
    }
    println!("hung clients: {hung}");
    let events: Vec<_> = timeline
        .events()
        .into_iter()
        .filter(|e| e.notable())
        .collect();
    if !events.is_empty() {
        println!("ejections and readmissions, timeline:");
        for e in &events {
            println!("  {:>5.2}s  {}", e.t, e.text());
        }
    }
    let left = handle.shutdown(Duration::from_secs(2)).await;
    let open: usize = handle.stats().backends.iter().map(|b| b.pool.total).sum();
    println!("shutdown: {left} requests left in flight, {open} connections open after close");
    if let Some(server) = metrics {
        server.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_line_says_when_clients_saw_nothing() {
        assert_eq!(failover_line(0, 0, 5), None);
        assert_eq!(
            failover_line(12, 12, 0).as_deref(),
            Some(
                "endpoints saw 12 errors; failover retried them elsewhere (12 retries), clients saw 0"
            )
        );
        assert_eq!(
            failover_line(12, 4, 8).as_deref(),
            Some("endpoints saw 12 errors; failover made 4 retries elsewhere; clients saw 8")
        );
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "echo",
            "--clients",
            "3",
            "--duration",
            "1.5",
            "--picker",
            "p2c",
            "--no-tui",
            "--metrics",
            "127.0.0.1:0",
            "--backends",
            "127.0.0.1:1,127.0.0.1:2",
            "--no-kill",
        ])
        .unwrap();
        assert_eq!(a.clients, 3);
        assert_eq!(a.duration, Duration::from_millis(1500));
        assert_eq!(a.picker, Picker::P2c);
        assert!(a.no_tui && a.no_kill && !a.black_hole);
        assert_eq!(a.metrics, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(a.backends.len(), 2);
        assert!(Args::try_parse_from(["echo", "--clients", "0"]).is_err());
        assert!(Args::try_parse_from(["echo", "--picker", "nope"]).is_err());
        assert!(Args::try_parse_from(["echo", "--duration", "-1"]).is_err());
    }
}
