//! Ten thousand concurrent clients through the whole `marina::Stack` over real loopback
//! TCP: three line echo backends, pools of at most 64 connections each, sticky sessions
//! (one per client), a per-session concurrency limit and a generous global rate limit.
//!
//! Every request completes or fails with a typed error, counted by kind (with these
//! generous timeouts none is expected); the pools never hold more than 64 connections
//! (sampled from the stack's stats, and exactly from the servers' side); and the
//! client side's peak heap is printed.
//!
//! This file is its own test binary because `allocation-counter` installs a global
//! allocator. It counts per thread, so the client side runs on a current-thread runtime
//! made inside `allocation_counter::measure` (every task of the stack, the pools'
//! maintenance and the balancer's buffer included), while the backends run on a
//! runtime of their own, on other threads, whose allocations are not counted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use integration_tests::{LineServer, within};
use marina::affinity::TableConfig;
use marina::balance::NoReadyEndpoints;
use marina::core::{BoxError, Request, find};
use marina::limit::{ConnectionLimit, Rate, RateLimited};
use marina::pool::{Config, PoolError};
use marina::{AffinityMode, KeyFnBox, ShuttingDown, Stack, StackService};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

const CLIENTS: usize = 10_000;
const MAX_CONNS: usize = 64;
const BACKENDS: usize = 3;
/// How often the pools' sizes are sampled. Not every millisecond: `stats()` walks the
/// per-key concurrency table (a copy of every active key, sorted), which with thousands
/// of keys in flight costs milliseconds in a debug build.
const SAMPLE_MS: u64 = 10;

/// The session a request belongs to, in its extensions.
#[derive(Debug, Clone)]
struct Session(String);

/// What went wrong with a request, by kind.
fn kind(e: &BoxError) -> String {
    if let Some(p) = find::<PoolError>(&**e) {
        return if p.is_timeout() {
            "pool acquire timeout".into()
        } else {
            format!("pool: {p}")
        };
    }
    if find::<NoReadyEndpoints>(&**e).is_some() {
        "no ready endpoints".into()
    } else if find::<RateLimited>(&**e).is_some() {
        "rate limited".into()
    } else if find::<ConnectionLimit>(&**e).is_some() {
        "per-session concurrency limit".into()
    } else if find::<ShuttingDown>(&**e).is_some() {
        "shutting down".into()
    } else {
        format!("other: {e}")
    }
}

/// One backend's figures.
#[derive(Debug, Default, Clone, Copy)]
struct Backend {
    /// The most open connections in its pool, sampled.
    peak_open: usize,
    /// The most open and connecting, sampled.
    peak_held: usize,
    /// Connections its pool opened.
    created: u64,
    /// Requests the balancer sent it.
    served: u64,
}

/// What one run saw.
#[derive(Debug, Default)]
struct Report {
    requests: usize,
    ok: usize,
    garbled: Vec<String>,
    errors: BTreeMap<String, usize>,
    /// Per backend.
    backends: BTreeMap<SocketAddr, Backend>,
    elapsed: Duration,
    shutdown_left: usize,
    closed_total: usize,
    stats: String,
}

async fn drive(addrs: Vec<SocketAddr>) -> Report {
    let session =
        KeyFnBox::new(|r: &Request<String>| r.extensions.get::<Session>().map(|s| s.0.clone()));
    let (svc, handle) = Stack::builder::<String>()
        .endpoints(addrs)
        .pool(Config {
            min_idle: 0,
            max_size: MAX_CONNS,
            acquire_timeout: Some(Duration::from_secs(60)),
            ..Config::high_throughput()
        })
        .failfast_timeout(Duration::from_secs(60))
        // Generous like the others: a request's time in the pool's queue counts
        // towards it, and 10,000 clients queue for 192 connections (a loaded CI machine
        // running a debug build can keep the last of them waiting for seconds).
        .request_timeout(Duration::from_secs(60))
        .affinity(AffinityMode::Sticky(
            session.clone(),
            TableConfig::with_capacity(2 * CLIENTS),
        ))
        .concurrency_per_key(session, 4)
        .rate_limit(Rate::per_second(1_000_000))
        .build_line()
        .expect("the stack builds");

    // Samples the pools' sizes until the clients are done.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let handle = handle.clone();
        let done = done.clone();
        async move {
            let mut peaks: BTreeMap<SocketAddr, Backend> = BTreeMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(SAMPLE_MS));
            while !done.load(SeqCst) {
                tick.tick().await;
                for b in handle.stats().backends {
                    let p = peaks.entry(b.addr).or_default();
                    p.peak_open = p.peak_open.max(b.pool.total);
                    p.peak_held = p.peak_held.max(b.pool.total + b.pool.connecting);
                }
            }
            peaks
        }
    });

    let start = Instant::now();
    let mut rng = fastrand::Rng::with_seed(10_000);
    let mut report = Report::default();
    let mut clients = JoinSet::new();
    for c in 0..CLIENTS {
        let n = rng.usize(1..=3);
        report.requests += n;
        let mut svc: StackService<String, String> = svc.clone();
        clients.spawn(async move {
            let mut out: Vec<Result<(), String>> = Vec::with_capacity(n);
            for i in 0..n {
                let line = format!("client {c} request {i}");
                let mut req = Request::new(line.clone());
                req.extensions.insert(Session(format!("client-{c}")));
                let res = match svc.ready().await {
                    Ok(s) => s.call(req).await,
                    Err(e) => Err(e),
                };
                out.push(match res {
                    Ok(resp) if resp.body == line => Ok(()),
                    Ok(resp) => Err(format!("garbled: {line:?} came back as {:?}", resp.body)),
                    Err(e) => Err(kind(&e)),
                });
            }
            out
        });
    }
    drop(svc);
    while let Some(out) = clients.join_next().await {
        for r in out.expect("client task") {
            match r {
                Ok(()) => report.ok += 1,
                Err(g) if g.starts_with("garbled") => report.garbled.push(g),
                Err(k) => *report.errors.entry(k).or_default() += 1,
            }
        }
    }
    report.elapsed = start.elapsed();
    done.store(true, SeqCst);
    report.backends = sampler.await.expect("sampler");

    let stats = handle.stats();
    report.stats = stats.to_string();
    for b in &stats.backends {
        let r = report.backends.entry(b.addr).or_default();
        r.created = b.pool.created;
        r.served = b.balance.as_ref().map_or(0, |e| e.requests);
    }
    report.shutdown_left = handle.shutdown(Duration::from_secs(10)).await;
    report.closed_total = handle.stats().backends.iter().map(|b| b.pool.total).sum();
    report
}

#[test]
fn ten_thousand_clients() {
    let backends = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the backends' runtime");
    let servers: Vec<LineServer> = backends.block_on(async {
        let mut v = Vec::new();
        for _ in 0..BACKENDS {
            v.push(LineServer::echo().await);
        }
        v
    });
    let addrs: Vec<SocketAddr> = servers.iter().map(LineServer::addr).collect();

    let mut report = None;
    let memory = allocation_counter::measure(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the clients' runtime");
        report = Some(rt.block_on(within(
            Duration::from_secs(120),
            "ten thousand clients",
            drive(addrs),
        )));
    });
    let r = report.expect("a report");

    println!("{}", r.stats);
    println!(
        "{CLIENTS} clients, {} requests in {:.2?}: {} ok, errors by kind {:?}",
        r.requests, r.elapsed, r.ok, r.errors
    );
    for s in &servers {
        println!(
            "{}: pool {:?}; server: {} connections at most, {} accepted",
            s.addr(),
            r.backends.get(&s.addr()),
            s.max_open_connections(),
            s.accepts(),
        );
    }
    println!(
        "client-side heap: peak {:.1} MiB ({} bytes, {} bytes per client) in {} live \
         allocations at most; {} allocations, {:.1} MiB in all; {} bytes left after the \
         runtime was dropped",
        memory.bytes_max as f64 / (1024.0 * 1024.0),
        memory.bytes_max,
        memory.bytes_max / CLIENTS as u64,
        memory.count_max,
        memory.count_total,
        memory.bytes_total as f64 / (1024.0 * 1024.0),
        memory.bytes_current,
    );

    // Every request completed; none failed, with these timeouts.
    assert!(
        r.garbled.is_empty(),
        "garbled echoes: {:?}",
        &r.garbled[..r.garbled.len().min(5)]
    );
    assert_eq!(r.ok + r.errors.values().sum::<usize>(), r.requests);
    assert!(r.errors.is_empty(), "errors by kind: {:?}", r.errors);
    assert_eq!(r.backends.len(), BACKENDS, "{:?}", r.backends);
    let served: u64 = r.backends.values().map(|b| b.served).sum();
    assert_eq!(served as usize, r.requests);

    // The pools never exceeded their size, seen from both ends.
    for server in &servers {
        let b = r.backends[&server.addr()];
        assert!(b.served > 0, "{} got nothing: {b:?}", server.addr());
        assert!(b.peak_held <= MAX_CONNS, "{}: {b:?}", server.addr());
        assert!(b.peak_open > 1, "{} never got busy: {b:?}", server.addr());
        assert!(
            server.max_open_connections() <= MAX_CONNS,
            "{server:?} saw more than {MAX_CONNS} connections at once"
        );
        assert_eq!(server.accepts() as u64, b.created, "{server:?}: {b:?}");
    }

    // Shutdown: nothing in flight, every connection closed.
    assert_eq!(r.shutdown_left, 0);
    assert_eq!(r.closed_total, 0);
    drop(servers);
    drop(backends);
}
