//! The echo client: marina's main job, the whole stack end to end on loopback.
//!
//! Starts three line echo servers on 127.0.0.1 (random ports), builds the stack —
//! per-client concurrency limit and an optional rate limit → sticky sessions → round
//! robin (or another picker) with failover → health checks → a 300 ms request timeout →
//! a pool per backend over a bandwidth-limited TCP connector — and drives concurrent
//! clients for a few seconds. A third of the way in it kills one backend; two thirds
//! in it restarts it. With `--black-hole`, another backend stops answering a third of
//! the way in (it still accepts and reads): its requests time out, it is ejected, and
//! no client hangs. A live
//! progress line runs meanwhile; then a summary: requests per backend, errors by kind,
//! when the killed backend was ejected and came back, pool stats, sessions, limits,
//! p50/p99 latency.
//!
//! ```text
//! cargo run --example echo -- [--clients N] [--duration SECS] [--picker rr|p2c|lc|lrt|hash]
//!                             [--rate REQ_PER_SEC] [--no-kill] [--black-hole]
//!                             [--backends host:port,...]
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina::affinity::TableConfig;
use marina::balance::{
    ConsistentHash, Failover, LeastConnections, LeastResponseTime, PowerOfTwoChoices, RoundRobin,
};
use marina::core::{BoxError, Request};
use marina::health::{HealthConfig, Status};
use marina::limit::{ConnectionLimit, Rate, RateLimited};
use marina::pool::Config;
use marina::{AffinityMode, KeyFnBox, Stack};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

struct Args {
    clients: usize,
    duration: Duration,
    picker: String,
    rate: Option<u32>,
    kill: bool,
    black_hole: bool,
    backends: Vec<SocketAddr>,
}

const HELP: &str = "\
echo: drive concurrent clients through marina's whole stack over local echo servers

usage: cargo run --example echo -- [options]
  --clients N            concurrent clients (default 32)
  --duration SECS        how long to run (default 4)
  --picker NAME          rr | p2c | lc | lrt | hash (default rr)
  --rate N               global rate limit in requests/s (default: none)
  --no-kill              do not kill and restart a backend midway
  --black-hole           midway, another backend stops answering (it still accepts and
                         reads): requests there time out, it is ejected, no client hangs
  --backends A,B,...     use these echo servers instead of starting three
  --help                 this text";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        clients: 32,
        duration: Duration::from_secs(4),
        picker: "rr".into(),
        rate: None,
        kill: true,
        black_hole: false,
        backends: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--clients" => a.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--duration" => {
                a.duration = Duration::from_secs_f64(
                    value()?.parse().map_err(|e| format!("--duration: {e}"))?,
                )
            }
            "--picker" => a.picker = value()?,
            "--rate" => a.rate = Some(value()?.parse().map_err(|e| format!("--rate: {e}"))?),
            "--no-kill" => a.kill = false,
            "--black-hole" => a.black_hole = true,
            "--backends" => {
                a.backends = value()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--backends {s}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other} (try --help)")),
        }
    }
    if a.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    Ok(a)
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

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    latencies_us: Mutex<Vec<u32>>,
}

impl Tally {
    fn error(&self, e: &BoxError) {
        let kind = if marina::core::find::<RateLimited>(&**e).is_some() {
            "rate limited".to_string()
        } else if marina::core::find::<ConnectionLimit>(&**e).is_some() {
            "per-client concurrency limit".to_string()
        } else {
            format!("other: {e}")
        };
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }
}

fn percentile(sorted: &[u32], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Duration::from_micros(u64::from(sorted[i]))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("echo: {e}");
            std::process::exit(2);
        }
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
    builder = match args.picker.as_str() {
        "rr" => builder.picker(RoundRobin::new),
        "p2c" => builder.picker(PowerOfTwoChoices::new),
        "lc" => builder.picker(LeastConnections::new),
        "lrt" => builder.picker(LeastResponseTime::new),
        "hash" => builder.picker(ConsistentHash::new),
        other => {
            eprintln!("echo: unknown picker {other} (rr, p2c, lc, lrt, hash)");
            std::process::exit(2);
        }
    };
    if let Some(r) = args.rate {
        builder = builder.rate_limit(Rate::per_second(r.max(1)));
    }
    let (svc, handle) = builder.build_line()?;
    println!(
        "stack: limits → sticky sessions → {} with failover → health → 300 ms request timeout → pools (≤ 8 per backend) → 32 MiB/s TCP",
        args.picker
    );
    println!("{} clients for {:?}\n", args.clients, args.duration);

    // Clients.
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..args.clients {
        let mut svc = svc.clone();
        let tally = tally.clone();
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
                        lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    Ok(resp) => tally.error(&format!("garbled echo {:?}", resp.body).into()),
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

    // Health timelines of the backend we kill and of the one that goes silent.
    let victim = addrs
        .get(1)
        .copied()
        .filter(|_| args.kill && !servers.is_empty());
    let hole = addrs
        .get(2)
        .copied()
        .filter(|_| args.black_hole && servers.len() > 2);
    let timeline = Arc::new(Mutex::new(Vec::<(f64, String)>::new()));
    for addr in [victim, hole].into_iter().flatten() {
        let Some(h) = handle.health(addr) else {
            continue;
        };
        let timeline = timeline.clone();
        let mut rx = h.subscribe();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let status = *rx.borrow_and_update();
                let what = match status {
                    Status::Ejected { .. } => "ejected".to_string(),
                    other => format!("{other:?}").to_lowercase(),
                };
                timeline
                    .lock()
                    .unwrap()
                    .push((since(), format!("{addr} {what}")));
            }
        });
    }

    // Run, kill, restart, with a progress line.
    let deadline = start + args.duration;
    let kill_at = start + args.duration / 3;
    let restart_at = start + args.duration * 2 / 3;
    let (mut killed, mut restarted, mut silenced) = (false, false, false);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < deadline {
        tick.tick().await;
        if let Some(addr) = victim {
            let server = servers.iter().find(|s| s.addr == addr).expect("our server");
            if !killed && Instant::now() >= kill_at {
                server.kill();
                killed = true;
                timeline
                    .lock()
                    .unwrap()
                    .push((since(), format!("killed {addr}")));
            }
            if killed && !restarted && Instant::now() >= restart_at {
                server.restart().await?;
                restarted = true;
                timeline
                    .lock()
                    .unwrap()
                    .push((since(), format!("restarted {addr}")));
            }
        }
        if let Some(addr) = hole
            && !silenced
            && Instant::now() >= kill_at
        {
            let server = servers.iter().find(|s| s.addr == addr).expect("our server");
            server.go_silent();
            silenced = true;
            timeline
                .lock()
                .unwrap()
                .push((since(), format!("{addr} stopped answering (black hole)")));
        }
        let s = handle.stats();
        let per: Vec<String> = s
            .backends
            .iter()
            .map(|b| b.balance.as_ref().map_or(0, |e| e.requests).to_string())
            .collect();
        let errors: u64 = tally.errors.lock().unwrap().values().sum();
        print!(
            "\r  t={:>4.1}s  ok={:<8} errors={:<5} per backend=[{}]  in flight={:<4}",
            since(),
            tally.ok.load(Relaxed),
            errors,
            per.join(", "),
            s.in_flight
        );
        let _ = std::io::stdout().flush();
    }
    done.store(true, Relaxed);
    // Every client finishes its last request within the request timeout: none hangs.
    let mut hung = clients.len();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while clients.join_next().await.is_some() {
            hung -= 1;
        }
    })
    .await;
    clients.abort_all();
    println!("\n");

    // Summary.
    let stats = handle.stats();
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let ok = tally.ok.load(Relaxed);
    println!("{stats}");
    println!(
        "requests: {ok} echoed correctly in {:.1}s ({:.0}/s); latency p50 {:.2?}, p99 {:.2?}",
        args.duration.as_secs_f64(),
        ok as f64 / args.duration.as_secs_f64(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
    let errors = std::mem::take(&mut *tally.errors.lock().unwrap());
    if errors.is_empty() {
        println!("errors: none");
    } else {
        println!("errors by kind:");
        for (kind, n) in errors.iter() {
            println!("  {n:>6}  {kind}");
        }
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
    let timeline = std::mem::take(&mut *timeline.lock().unwrap());
    if !timeline.is_empty() {
        println!("killed / silent backends, timeline:");
        for (t, what) in timeline.iter() {
            println!("  {t:>5.2}s  {what}");
        }
    }
    let left = handle.shutdown(Duration::from_secs(2)).await;
    let open: usize = handle.stats().backends.iter().map(|b| b.pool.total).sum();
    println!("shutdown: {left} requests left in flight, {open} connections open after close");
    Ok(())
}
