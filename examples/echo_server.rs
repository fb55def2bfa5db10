//! A standalone line echo server, to try the echo client against separate processes.
//!
//! Every line it reads (bytes up to and including `\n`) it writes back, optionally after
//! a delay. With `--fail-rate F` it closes the connection instead of answering a line,
//! with probability F per line, so the client's failover and health checks have
//! something to do. It listens on 127.0.0.1, prints the address, and prints a line of
//! counts every `--report N` connections.
//!
//! Three servers (three terminals, or `&` in one shell), then the echo client against
//! them:
//!
//! ```text
//! cargo run --example echo_server -- --port 7000
//! cargo run --example echo_server -- --port 7001 --delay 5
//! cargo run --example echo_server -- --port 7002 --fail-rate 0.01
//! cargo run --example echo -- --no-kill --backends 127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002
//! ```
//!
//! (`--no-kill`: the client can only kill and restart backends it started itself.)
//!
//! Stopping: the examples' tokio has no `signal` feature, so there is no Ctrl-C handler;
//! the server runs until it is killed, and Ctrl-C (SIGINT's default action) or `kill`
//! ends the process at once, open connections with it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const HELP: &str = "\
echo_server: a line echo server on 127.0.0.1 (for the echo client's --backends)

usage: cargo run --example echo_server -- [options]
  --port N          port to listen on (default 7000; 0 = a free port, printed)
  --delay MS        wait this many milliseconds before each reply (default 0)
  --fail-rate F     probability (0..1) of closing the connection instead of
                    answering a line (default 0)
  --report N        print counts every N connections (default 100; 0 = never)
  --seed S          seed of the random failures (default: from the clock and port)
  --help            this text

Runs until killed (Ctrl-C ends it).";

#[derive(Debug, Clone)]
struct Args {
    port: u16,
    delay: Duration,
    fail_rate: f64,
    report: u64,
    seed: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 7000,
        delay: Duration::ZERO,
        fail_rate: 0.0,
        report: 100,
        seed: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => a.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--delay" => {
                let ms: f64 = value()?.parse().map_err(|e| format!("--delay: {e}"))?;
                if !(ms.is_finite() && ms >= 0.0) {
                    return Err("--delay must be 0 or more milliseconds".into());
                }
                a.delay = Duration::from_secs_f64(ms / 1000.0);
            }
            "--fail-rate" => {
                a.fail_rate = value()?.parse().map_err(|e| format!("--fail-rate: {e}"))?;
                if !(0.0..=1.0).contains(&a.fail_rate) {
                    return Err("--fail-rate must be between 0 and 1".into());
                }
            }
            "--report" => a.report = value()?.parse().map_err(|e| format!("--report: {e}"))?,
            "--seed" => a.seed = Some(value()?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other} (try --help)")),
        }
    }
    Ok(a)
}

/// xorshift64* (Vigna): small, fast, and good enough to decide which lines fail.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    /// A generator for stream `stream` of `seed` (the seed is scrambled with
    /// splitmix64, so nearby seeds and streams give unrelated sequences).
    fn new(seed: u64, stream: u64) -> Self {
        let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Counts across connections.
#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicU64,
    open: AtomicU64,
    lines: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn line(&self) -> String {
        format!(
            "connections: {} accepted, {} open; lines: {} echoed, {} connections closed on purpose",
            self.accepted.load(Relaxed),
            self.open.load(Relaxed),
            self.lines.load(Relaxed),
            self.failed.load(Relaxed),
        )
    }
}

/// Decrements the open-connection count when a connection task ends, however it ends.
struct Open(Arc<Counts>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// Echoes lines on `stream` until EOF, an I/O error, or a random failure.
async fn serve(stream: TcpStream, args: Arc<Args>, mut rng: XorShift, counts: Arc<Counts>) {
    let _open = Open(counts.clone());
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            // EOF (a last line without `\n` is dropped: the client is gone).
            Ok(0) | Err(_) => return,
            Ok(_) if line.last() != Some(&b'\n') => return,
            Ok(_) => {}
        }
        if args.fail_rate > 0.0 && rng.next_f64() < args.fail_rate {
            counts.failed.fetch_add(1, Relaxed);
            return; // drops both halves: the client sees EOF instead of a reply
        }
        if !args.delay.is_zero() {
            tokio::time::sleep(args.delay).await;
        }
        if write.write_all(&line).await.is_err() {
            return;
        }
        counts.lines.fetch_add(1, Relaxed);
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("echo_server: {e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port))).await
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("echo_server: cannot listen on 127.0.0.1:{}: {e}", args.port);
            std::process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(addr.port()) << 48)
    });
    println!("echo_server: listening on {addr}");
    println!(
        "echo_server: delay {} ms per reply, fail rate {}, seed {seed}",
        args.delay.as_secs_f64() * 1000.0,
        args.fail_rate
    );

    let counts = Arc::new(Counts::default());
    let mut conn_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: say so, wait a little, go on.
                eprintln!("echo_server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        conn_id += 1;
        counts.accepted.fetch_add(1, Relaxed);
        counts.open.fetch_add(1, Relaxed);
        let rng = XorShift::new(seed, conn_id);
        tokio::spawn(serve(stream, args.clone(), rng, counts.clone()));
        if args.report > 0 && conn_id.is_multiple_of(args.report) {
            println!("echo_server: {}", counts.line());
        }
    }
}
