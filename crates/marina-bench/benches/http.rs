//! Requests per second through marina's hyper client service (`marina_pool::http::HttpClient`)
//! beside hyper-util's legacy `Client`, over HTTP/1 and HTTP/2 (`h2c`), against the same
//! loopback hyper servers in the same run.
//!
//! The servers (one HTTP/1, one HTTP/2, hyper's defaults: 200 streams per connection)
//! run on their own thread and runtime (`--server-workers`, default 1) and answer every
//! `GET` with `hello`. The client side runs on another runtime (`--workers`, default 1):
//! `--tasks` tokio tasks (default 32), released together, each loop *send a `GET` →
//! read the response body to its end* until a stop flag is set after `--secs` of wall
//! clock, after `--warmup` seconds (default 0.3) of the same. A row reports requests/s
//! (requests ÷ wall time from the start signal to the last task's end), the CPU time
//! per request of the whole process (client and server threads, from
//! `/proc/self/task/*/schedstat`: steadier than the rate on a shared machine) and the
//! connections the server accepted. Rows run interleaved, one at a time, `--reps` times
//! (default 5); the table shows each row's median rep, its min–max, and marina's ratio to
//! hyper-util's median for the same protocol.
//!
//! - `h1 marina`: `HttpClient::builder().pool(Pool::builder().max_size(tasks))` —
//!   one pooled connection per request in flight, held until the body ends;
//! - `h1 hyper-util`: `Client::builder(TokioExecutor::new()).build_http()` — its own
//!   pool, a connection per request in flight;
//! - `h2 marina`: the same with `.http2()` — shared connections up to the server's
//!   stream limit (one here);
//! - `h2 marina, no pings`: the same with `.keep_alive(None)` (marina pings HTTP/2
//!   connections every 5 s by default; hyper then times every frame it reads);
//! - `h2 hyper-util`: `.http2_only(true)` — one multiplexed connection, no pings (its
//!   default).
//!
//! ```text
//! cargo bench -p marina-bench --bench http -- [--tasks N] [--secs S] [--warmup S]
//!     [--reps R] [--workers N] [--server-workers N]
//! ```
//!
//! Without `--bench` in its arguments (as under `cargo test --benches`) it runs every row
//! once, briefly (4 tasks, 0.1 s), and fails on an error or a hang.

// A benchmark measures real wall time across OS threads, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use marina_core::BoxError;
use marina_pool::Pool;
use marina_pool::http::HttpClient;
use tokio::net::TcpListener;
use tower::ServiceExt;

struct Args {
    tasks: usize,
    secs: f64,
    warmup: f64,
    reps: usize,
    workers: usize,
    server_workers: usize,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let get = |name: &str, default: f64| -> f64 {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    if !bench {
        return Args {
            tasks: 4,
            secs: 0.1,
            warmup: 0.0,
            reps: 1,
            workers: 1,
            server_workers: 1,
        };
    }
    Args {
        tasks: get("--tasks", 32.0) as usize,
        secs: get("--secs", 1.0),
        warmup: get("--warmup", 0.3),
        reps: get("--reps", 5.0) as usize,
        workers: get("--workers", 1.0) as usize,
        server_workers: get("--server-workers", 1.0) as usize,
    }
}

/// A hyper server answering `hello`; counts accepted connections.
async fn server(h2: bool, accepts: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            accepts.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
                });
                let io = TokioIo::new(stream);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    addr
}

#[derive(Clone)]
enum Sender {
    Marina(HttpClient<Empty<Bytes>>),
    HyperUtil(Box<Client<HttpConnector, Empty<Bytes>>>),
}

impl Sender {
    async fn get(&self, uri: &hyper::Uri) -> Result<(), BoxError> {
        let req = Request::get(uri.clone()).body(Empty::new())?;
        let body = match self {
            Sender::Marina(c) => c.clone().oneshot(req).await?.into_body().collect().await?,
            Sender::HyperUtil(c) => c.request(req).await?.into_body().collect().await?,
        };
        if body.to_bytes().len() != 5 {
            return Err("short body".into());
        }
        Ok(())
    }
}

struct Row {
    name: &'static str,
    h2: bool,
    marina: bool,
    /// marina's HTTP/2 keep-alive pings (its default: every 5 s, idle too).
    pings: bool,
}

const ROWS: [Row; 5] = [
    Row {
        name: "h1 marina",
        h2: false,
        marina: true,
        pings: true,
    },
    Row {
        name: "h1 hyper-util",
        h2: false,
        marina: false,
        pings: false,
    },
    Row {
        name: "h2 marina",
        h2: true,
        marina: true,
        pings: true,
    },
    Row {
        name: "h2 marina, no pings",
        h2: true,
        marina: true,
        pings: false,
    },
    Row {
        name: "h2 hyper-util",
        h2: true,
        marina: false,
        pings: false,
    },
];

/// The hyper-util row a row compares with.
fn peer(row: &Row) -> usize {
    if row.h2 { 4 } else { 1 }
}

/// `tasks` tasks sending until `secs` pass: requests per second, and requests.
async fn drive(
    sender: &Sender,
    uri: &hyper::Uri,
    tasks: usize,
    secs: f64,
) -> Result<(f64, u64), BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (sender, uri, stop, start) = (sender.clone(), uri.clone(), stop.clone(), start.clone());
        set.spawn(async move {
            start.wait().await;
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                sender.get(&uri).await?;
                n += 1;
            }
            Ok::<_, BoxError>(n)
        });
    }
    start.wait().await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Relaxed);
    let mut total = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(30), set.join_next())
        .await
        .map_err(|_| "a task hung")?
    {
        total += r??;
    }
    Ok((total as f64 / t0.elapsed().as_secs_f64(), total))
}

/// CPU time of every thread of this process (client and server), from
/// `/proc/self/task/*/schedstat` (nanoseconds on CPU; Linux): less disturbed by other
/// work on the machine than wall-clock rates. `None` elsewhere.
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> ExitCode {
    let a = args();
    let accepts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server_workers = a.server_workers;
    let acc = accepts.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(server_workers)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let h1 = server(false, acc[0].clone()).await;
            let h2 = server(true, acc[1].clone()).await;
            addr_tx.send((h1, h2)).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let (h1, h2) = addr_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.workers)
        .enable_all()
        .build()
        .unwrap();
    let result: Result<(), BoxError> = rt.block_on(async {
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
        let mut conns = vec![0usize; ROWS.len()];
        for _ in 0..a.reps {
            for (i, row) in ROWS.iter().enumerate() {
                let addr = if row.h2 { h2 } else { h1 };
                let uri: hyper::Uri = format!("http://{addr}/").parse()?;
                let counter = &accepts[row.h2 as usize];
                let before = counter.load(Relaxed);
                let sender = if row.marina {
                    let b = HttpClient::builder().pool(Pool::builder().max_size(a.tasks.max(1)));
                    let b = if row.h2 { b.http2() } else { b };
                    let b = if row.pings { b } else { b.keep_alive(None) };
                    Sender::Marina(b.build(addr)?)
                } else {
                    let mut connector = HttpConnector::new();
                    connector.set_nodelay(true);
                    let mut b = Client::builder(TokioExecutor::new());
                    b.http2_only(row.h2);
                    Sender::HyperUtil(Box::new(b.build(connector)))
                };
                if a.warmup > 0.0 {
                    drive(&sender, &uri, a.tasks, a.warmup).await?;
                }
                let cpu0 = cpu_ns();
                let (rate, n) = drive(&sender, &uri, a.tasks, a.secs).await?;
                if let (Some(c0), Some(c1)) = (cpu0, cpu_ns()) {
                    cpu[i].push((c1 - c0) as f64 / 1e3 / n.max(1) as f64);
                }
                results[i].push(rate);
                conns[i] = counter.load(Relaxed) - before;
                drop(sender);
                tokio::time::sleep(Duration::from_millis(50)).await; // connections close
            }
        }
        println!(
            "HTTP requests/s, {} tasks, {} s × {} reps interleaved, client workers {}, server workers {}",
            a.tasks, a.secs, a.reps, a.workers, a.server_workers
        );
        println!(
            "| client | requests/s (median) | min–max | marina ÷ hyper-util | CPU µs/request (client + server) | ÷ hyper-util | connections |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
        let cpu: Vec<f64> = cpu
            .iter_mut()
            .map(|c| if c.is_empty() { f64::NAN } else { median(c) })
            .collect();
        for (i, row) in ROWS.iter().enumerate() {
            let r = &results[i];
            let base = medians[peer(row)];
            let ratio = if row.marina {
                format!("{:.2}", medians[i] / base)
            } else {
                "1.00".into()
            };
            println!(
                "| {} | {:.0} | {:.0}–{:.0} | {} | {:.1} | {:.2} | {} |",
                row.name,
                medians[i],
                r.first().copied().unwrap_or(0.0),
                r.last().copied().unwrap_or(0.0),
                ratio,
                cpu[i],
                cpu[i] / cpu[peer(row)],
                conns[i]
            );
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("http bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
