//! A fleet of three marina stacks sharing one quota through Redis.
//!
//! Starts three line echo servers on 127.0.0.1 and builds three independent client
//! stacks over them (as three replicas of a service would, each with its own Redis
//! connection), each with the same rate limit on the same fleet (`StackBuilder::redis`,
//! marina's `redis` feature): one quota for the three. Clients hammer every instance
//! (a refused client waits the `retry_after` it is told); each second a line shows
//! every instance's admitted rate and the fleet's, which stays at the quota however
//! the load is spread. Then a summary: admissions, Redis calls per request, fallbacks,
//! and one instance's stats table.
//!
//! Needs a Redis server (`MARINA_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! ```text
//! cargo run --example fleet -- [--rate REQ_PER_SEC] [--duration SECS] [--clients N]
//!                              [--lease off|auto|N] [--url redis://...]
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use marina::Stack;
use marina::core::{BoxError, Request, find};
use marina::limit::{Rate, RateLimited};
use marina::redis::{Fallback, FleetConfig, Lease, RedisFleet};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

const HELP: &str = "\
fleet: three marina stacks sharing one quota through Redis

usage: cargo run --example fleet -- [options]
  --rate N           the fleet's quota, requests/s (default 200)
  --duration SECS    how long to run (default 5, at most 60)
  --clients N        clients per instance (default 8)
  --lease MODE       off | auto | N cells per Redis call (default auto)
  --url URL          the Redis server (default $MARINA_REDIS_URL or redis://127.0.0.1:6379)
  --help             this text";

struct Args {
    rate: u32,
    duration: Duration,
    clients: usize,
    lease: Lease,
    url: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        rate: 200,
        duration: Duration::from_secs(5),
        clients: 8,
        lease: Lease::Auto {
            expected_instances: 3,
        },
        url: std::env::var("MARINA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--rate" => a.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => {
                let secs: f64 = value()?.parse().map_err(|e| format!("--duration: {e}"))?;
                a.duration = Duration::from_secs_f64(secs.clamp(1.0, 60.0));
            }
            "--clients" => a.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--lease" => {
                a.lease = match value()?.as_str() {
                    "off" => Lease::Off,
                    "auto" => Lease::Auto {
                        expected_instances: 3,
                    },
                    n => Lease::Tokens(n.parse().map_err(|e| format!("--lease: {e}"))?),
                }
            }
            "--url" => a.url = value()?,
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other} (try --help)")),
        }
    }
    if a.clients == 0 || a.rate == 0 {
        return Err("--clients and --rate must be at least 1".into());
    }
    Ok(a)
}

/// A line echo server on loopback.
async fn echo_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleet: {e}");
            std::process::exit(2);
        }
    };
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(echo_server().await?);
    }
    let rate = Rate::try_per_second(args.rate)?.try_burst((args.rate / 20).max(1))?;
    // A quota of this run's own: runs never share leftovers.
    let prefix = format!(
        "marina-fleet-example:{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );

    // Three instances: each its own Redis connection and its own marina stack.
    let mut instances = Vec::new();
    for i in 0..3 {
        // A call timeout for a demo on a busy laptop (the default, 5 ms, suits a
        // production LAN); while Redis cannot answer, each instance keeps a third of
        // the quota on its own.
        let fleet = RedisFleet::with_config(
            FleetConfig::new(&args.url)
                .key_prefix(&prefix)
                .call_timeout(Duration::from_millis(50))
                .fallback(Fallback::Local {
                    expected_instances: 3,
                }),
        )?;
        if i == 0
            && let Err(e) = fleet.ping().await
        {
            eprintln!(
                "fleet: no Redis at {} ({e}). Start one (redis-server --port 6379 --save '' \
                 --appendonly no) or pass --url.",
                args.url
            );
            std::process::exit(1);
        }
        // The same stack on each instance; with the fleet, its rate limit is the
        // fleet's (named "echo" in Redis).
        let (svc, handle) = Stack::builder::<String>()
            .endpoints(backends.clone())
            .rate_limit(rate)
            .redis(fleet)
            .redis_lease(args.lease)
            .redis_name("echo")
            .build_line()?;
        instances.push((handle, svc));
    }
    let limit =
        |h: &marina::StackHandle| h.redis().and_then(|r| r.rate).expect("a fleet rate limit");
    println!(
        "3 instances × {} clients, one fleet quota of {}/s (burst {}), lease {:?} ({} cells a call), {:?}\n",
        args.clients,
        args.rate,
        rate.burst_size(),
        args.lease,
        limit(&instances[0].0).lease_size,
        args.duration
    );

    let start = Instant::now();
    let end = start + args.duration;
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let mut clients = tokio::task::JoinSet::new();
    for (i, (_, svc)) in instances.iter().enumerate() {
        for c in 0..args.clients {
            let mut svc = svc.clone();
            let admitted = admitted.clone();
            clients.spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    n += 1;
                    let req = Request::new(format!("instance {i} client {c} #{n}"));
                    match svc.ready().await?.call(req).await {
                        Ok(_) => {
                            admitted[i].fetch_add(1, Relaxed);
                        }
                        Err(e) => match find::<RateLimited>(&*e) {
                            Some(limited) => {
                                let wait = limited.retry_after.max(Duration::from_micros(200));
                                tokio::time::sleep(wait.min(end - Instant::now().min(end))).await;
                            }
                            None => return Err(e),
                        },
                    }
                }
                Ok::<_, BoxError>(())
            });
        }
    }

    // One line a second: each instance's admitted rate and the fleet's.
    let mut last = [0u64; 3];
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    for second in 1..=args.duration.as_secs() {
        tick.tick().await;
        let now: Vec<u64> = admitted.iter().map(|a| a.load(Relaxed)).collect();
        let per: Vec<u64> = (0..3).map(|i| now[i] - last[i]).collect();
        last.copy_from_slice(&now);
        println!(
            "t={second:>2}s  A {:>5}/s  B {:>5}/s  C {:>5}/s  fleet {:>5}/s  (quota {}/s)",
            per[0],
            per[1],
            per[2],
            per.iter().sum::<u64>(),
            args.rate
        );
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }

    println!();
    let mut total = 0;
    for (name, (handle, _)) in ["A", "B", "C"].iter().zip(&instances) {
        let s = limit(handle);
        let fleet = handle.redis().expect("a fleet").fleet;
        total += s.admitted;
        println!(
            "{name}: admitted {} ({} from leased cells), refused {} ({} without a Redis call), \
             {} Redis calls = {:.3} per request; fallback decisions {}, Redis timeouts {}, \
             outages {}",
            s.admitted,
            s.from_lease,
            s.rejected,
            s.refused_locally,
            s.redis_calls,
            s.calls_per_request(),
            s.fallback,
            fleet.timeouts,
            fleet.outages,
        );
    }
    let secs = args.duration.as_secs_f64();
    println!(
        "fleet: {total} admitted in {secs:.0} s = {:.1}/s against a quota of {}/s (+ a burst of {})",
        total as f64 / secs,
        args.rate,
        rate.burst_size()
    );
    println!("\nA's stack:\n{}", instances[0].0.stats());
    for (handle, _) in &instances {
        handle.shutdown(Duration::from_secs(1)).await;
    }
    Ok(())
}
