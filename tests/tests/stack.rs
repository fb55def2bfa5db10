//! The whole `marina::Stack` (limits → sticky sessions → balance with failover → health
//! → a pool per backend → bandwidth-limited TCP) over real loopback line servers.
//!
//! - Two hundred clients, each running sessions of a few requests, while one of three
//!   backends is shut down and later restarted: no request is lost, the dead backend is
//!   ejected and later readmitted, each session that was on it moves once to a
//!   survivor and stays there, the others never move, and shutting the stack down
//!   leaves no connection open on either side. The backends tag their replies with
//!   their port, so the test sees where every request was really served.
//! - A global rate limit admits no more than its burst plus its rate over the time
//!   elapsed; the rest fail with `RateLimited`, and the stack's stats agree.
//! - `StackHandle::shutdown` refuses new requests at once with `ShuttingDown` and
//!   waits for the requests in flight (held by the backend until released), then closes
//!   the pools; with a short deadline it returns the requests still in flight.
//! - `StackConfig` from TOML: a good file builds a working stack over the test's
//!   servers; bad files fail with the path of each problem.
//!
//! Every wait is bounded by `within` or `eventually`; phases are driven by counters,
//! not by sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, LineServer, LineServerOptions, eventually, split_tag, within,
};
use marina::affinity::TableConfig;
use marina::balance::Failover;
use marina::core::{BoxError, Request, find};
use marina::health::{HealthConfig, Status};
use marina::limit::{Rate, RateLimited};
use marina::pool::Config;
use marina::{
    AffinityMode, InvalidConfig, KeyFnBox, ShuttingDown, Stack, StackConfig, StackHandle,
    StackService,
};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

/// The session a request belongs to, in its extensions: the stack's sticky key.
#[derive(Debug, Clone)]
struct Session(String);

fn session_key() -> KeyFnBox<String> {
    KeyFnBox::new(|r: &Request<String>| r.extensions.get::<Session>().map(|s| s.0.clone()))
}

/// One request through (a clone of) the stack; the reply line.
async fn send(
    svc: &mut StackService<String, String>,
    line: &str,
    session: Option<&str>,
) -> Result<String, BoxError> {
    let mut req = Request::new(line.to_string());
    if let Some(s) = session {
        req.extensions.insert(Session(s.to_string()));
    }
    let resp = svc.ready().await?.call(req).await?;
    Ok(resp.body)
}

/// Polls `f` once: its output if it is ready at once.
async fn poll_once<F: Future>(mut f: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(move |cx| {
        Poll::Ready(match f.as_mut().poll(cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        })
    })
    .await
}

/// Records every status a backend's health gate reports, the initial one included.
fn record_health(
    handle: &StackHandle,
    addr: SocketAddr,
    tasks: &mut JoinSet<()>,
) -> Arc<Mutex<Vec<Status>>> {
    let health = handle.health(addr).expect("health checks are on");
    let mut rx = health.subscribe();
    let seen = Arc::new(Mutex::new(vec![*rx.borrow_and_update()]));
    let log = seen.clone();
    tasks.spawn(async move {
        while rx.changed().await.is_ok() {
            let status = *rx.borrow_and_update();
            log.lock().unwrap().push(status);
        }
    });
    seen
}

fn is_ejected(s: &Status) -> bool {
    matches!(s, Status::Ejected { .. })
}

/// Shuts the stack down and checks that nothing is left: no request in flight, every
/// pool closed and empty.
async fn shut_down_clean(handle: &StackHandle) {
    let left = within(LIMIT, "stack shutdown", handle.shutdown(LIMIT)).await;
    assert_eq!(left, 0, "requests still in flight at shutdown");
    let stats = handle.stats();
    assert_eq!(stats.in_flight, 0, "{stats}");
    for b in &stats.backends {
        assert!(
            b.pool.closed,
            "pool of {} not closed: {:#?}",
            b.addr, b.pool
        );
        assert_eq!(
            b.pool.total, 0,
            "connections left in {}: {:#?}",
            b.addr, b.pool
        );
        assert_eq!(
            b.pool.connecting, 0,
            "connects left in {}: {:#?}",
            b.addr, b.pool
        );
    }
}

// ---------------------------------------------------------------------------------------
// A backend restart under load
// ---------------------------------------------------------------------------------------

const CLIENTS: usize = 200;
const PER_CLIENT: usize = 30;
const PER_SESSION: usize = 5;
const TOTAL: usize = CLIENTS * PER_CLIENT;

/// One client's view: each session's serving ports in order, and what went wrong.
#[derive(Debug, Default)]
struct ClientLog {
    sessions: Vec<(String, Vec<u16>)>,
    failures: Vec<String>,
    bytes: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_stack_survives_a_backend_restart() {
    let servers = vec![
        LineServer::tagged().await,
        LineServer::tagged().await,
        LineServer::tagged().await,
    ];
    let addrs: Vec<SocketAddr> = servers.iter().map(LineServer::addr).collect();
    let victim = &servers[1];
    let victim_port = victim.addr().port();

    let (svc, handle) = Stack::builder::<String>()
        .endpoints(addrs.clone())
        .pool(Config {
            min_idle: 1,
            max_size: 16,
            acquire_timeout: Some(Duration::from_secs(10)),
            ..Config::balanced()
        })
        .connect_timeout(Duration::from_millis(500))
        .health(Some(HealthConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(300),
            max_ejection: Duration::from_millis(600),
            ..HealthConfig::default()
        }))
        // Echoes are idempotent: fail over on any error, not only "not sent" ones.
        .failover(Some(Failover::new().retry_if(|_| true)))
        .failfast_timeout(Duration::from_secs(5))
        .affinity(AffinityMode::Sticky(session_key(), TableConfig::default()))
        .rate_limit(Rate::per_second(1_000_000))
        .bandwidth(64.0 * 1024.0 * 1024.0, 1024 * 1024)
        .build_line()
        .expect("the stack builds");

    let mut watchers = JoinSet::new();
    let timelines: Vec<Arc<Mutex<Vec<Status>>>> = addrs
        .iter()
        .map(|&a| record_health(&handle, a, &mut watchers))
        .collect();
    let victim_timeline = timelines[1].clone();
    let victim_health = handle.health(victim.addr()).expect("health checks are on");

    // The clients: sessions of PER_SESSION requests, one after another.
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    for c in 0..CLIENTS {
        let mut svc = svc.clone();
        let done = done.clone();
        clients.spawn(async move {
            let mut log = ClientLog::default();
            // Session boundaries are staggered across clients, so that whenever the
            // backend goes down, sessions are at every stage.
            let shift = c % PER_SESSION;
            for n in 0..PER_CLIENT {
                if n == 0 || (n + shift).is_multiple_of(PER_SESSION) {
                    let s = (n + shift) / PER_SESSION;
                    log.sessions.push((format!("c{c}-s{s}"), Vec::new()));
                }
                let (session, ports) = log.sessions.last_mut().expect("a session");
                let line = format!("client {c} request {n}");
                match send(&mut svc, &line, Some(session)).await {
                    Ok(reply) => match split_tag(&reply) {
                        Some((port, echoed)) if echoed == line => {
                            ports.push(port);
                            log.bytes += line.len() as u64 + 1;
                        }
                        _ => log.failures.push(format!("{line:?}: garbled {reply:?}")),
                    },
                    Err(e) => log.failures.push(format!("{line:?}: {e}")),
                }
                done.fetch_add(1, SeqCst);
            }
            log
        });
    }

    // A third of the way in, the victim goes down; once it is ejected and two thirds
    // are done, it comes back.
    assert!(
        eventually(LIMIT, || done.load(SeqCst) >= TOTAL / 3).await,
        "a third of the requests done"
    );
    within(LIMIT, "victim shutdown", victim.shutdown()).await;
    let killed_at = done.load(SeqCst);
    assert!(
        eventually(LIMIT, || victim_timeline
            .lock()
            .unwrap()
            .iter()
            .any(is_ejected))
        .await,
        "the dead backend was never ejected: {:?}\n{}",
        victim_timeline.lock().unwrap(),
        handle.stats()
    );
    assert!(
        eventually(LIMIT, || done.load(SeqCst) >= 2 * TOTAL / 3).await,
        "two thirds of the requests done"
    );
    victim
        .restart()
        .await
        .expect("restart the victim on its port");
    let restarted_at = done.load(SeqCst);

    let mut logs = Vec::new();
    within(3 * LIMIT, "clients finish", async {
        while let Some(log) = clients.join_next().await {
            logs.push(log.expect("client task"));
        }
    })
    .await;

    // New sessions until the victim is readmitted and serves again.
    let mut svc_after = svc.clone();
    let mut driver_requests = 0usize;
    let mut driver_bytes = 0u64;
    within(LIMIT, "the restarted backend is readmitted", async {
        let mut served_by_victim = false;
        for n in 0.. {
            if served_by_victim && victim_health.status() == Status::Healthy {
                break;
            }
            let line = format!("after restart {n}");
            let reply = send(&mut svc_after, &line, Some(&format!("after-{n}")))
                .await
                .unwrap_or_else(|e| panic!("{line:?} failed after the restart: {e}"));
            let (port, echoed) = split_tag(&reply).expect("a tagged reply");
            assert_eq!(echoed, line);
            served_by_victim |= port == victim_port;
            driver_requests += 1;
            driver_bytes += line.len() as u64 + 1;
            // Pacing only: the ejection runs out on its own clock.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;

    let stats = handle.stats();
    println!("{stats}");
    println!(
        "victim {} killed after {killed_at} requests, restarted after {restarted_at}; \
         {driver_requests} requests after the clients until it served again; health: {:?}",
        victim.addr(),
        victim_timeline.lock().unwrap()
    );

    // No request lost, every echo right.
    let failures: Vec<&String> = logs.iter().flat_map(|l| &l.failures).collect();
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} requests failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let served: usize = logs
        .iter()
        .flat_map(|l| &l.sessions)
        .map(|(_, p)| p.len())
        .sum();
    assert_eq!(served, TOTAL);

    // Sessions: at most one move each, and only away from the victim.
    let mut moved = 0u64;
    let mut first_backends = BTreeSet::new();
    for (session, ports) in logs.iter().flat_map(|l| &l.sessions) {
        let mut runs = ports.clone();
        runs.dedup();
        first_backends.insert(runs[0]);
        match runs.as_slice() {
            [_] => {}
            [from, to] if *from == victim_port && *to != victim_port => moved += 1,
            _ => panic!("session {session} moved other than once off the victim: {ports:?}"),
        }
    }
    assert_eq!(
        first_backends.len(),
        3,
        "sessions were placed on every backend"
    );
    assert!(moved > 0, "no session was on the victim when it went down");
    let affinity = stats.affinity.expect("affinity is on");
    assert_eq!(
        affinity.repinned, moved,
        "every move off the victim is one re-pin, and nothing else re-pins"
    );
    let sessions: usize = logs.iter().map(|l| l.sessions.len()).sum();
    assert_eq!(affinity.created as usize, sessions + driver_requests);

    // The victim was ejected, then readmitted; the survivors were never ejected.
    let victim_seen = victim_timeline.lock().unwrap().clone();
    let last_ejected = victim_seen
        .iter()
        .rposition(is_ejected)
        .expect("an ejection");
    assert!(
        victim_seen[last_ejected..].contains(&Status::Healthy),
        "the victim was not readmitted: {victim_seen:?}"
    );
    assert_eq!(victim_health.status(), Status::Healthy);
    for (i, t) in timelines.iter().enumerate().filter(|(i, _)| *i != 1) {
        let seen = t.lock().unwrap();
        assert!(
            !seen.iter().any(is_ejected),
            "survivor {} was ejected: {seen:?}",
            addrs[i]
        );
    }
    assert!(stats.balance.retries > 0, "no request failed over: {stats}");
    assert_eq!(stats.balance.retries_refused, 0, "{stats}");

    // Limits saw every request; the bandwidth limiter every byte (more with retries).
    let rate = stats.rate.expect("a rate limit");
    assert_eq!(rate.admitted as usize, TOTAL + driver_requests);
    assert_eq!(rate.rejected, 0);
    let (written, _, limit) = stats.bandwidth.expect("a bandwidth limit");
    assert_eq!(limit, 64.0 * 1024.0 * 1024.0);
    let sent: u64 = logs.iter().map(|l| l.bytes).sum::<u64>() + driver_bytes;
    assert!(written >= sent, "{written} bytes written for {sent} sent");

    // No leak: the stack closes every pool, and the servers see every connection close.
    drop((svc, svc_after));
    shut_down_clean(&handle).await;
    assert!(
        eventually(LIMIT, || servers.iter().all(|s| s.open_connections() == 0)).await,
        "server-side connections left open: {servers:?}"
    );
    watchers.abort_all();
}

// ---------------------------------------------------------------------------------------
// Rate limit
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_honoured() {
    const RATE: u32 = 50;
    const TASKS: usize = 8;
    const ATTEMPTS: usize = 60;
    let servers = [EchoServer::start().await, EchoServer::start().await];
    let start = Instant::now();
    let (svc, handle) = Stack::builder::<String>()
        .endpoints(servers.iter().map(EchoServer::addr))
        .rate_limit(Rate::per_second(RATE))
        .build_line()
        .expect("the stack builds");

    let mut tasks = JoinSet::new();
    for t in 0..TASKS {
        let mut svc = svc.clone();
        tasks.spawn(async move {
            let (mut ok, mut limited, mut other) = (0usize, 0usize, Vec::new());
            for n in 0..ATTEMPTS {
                let line = format!("task {t} request {n}");
                match send(&mut svc, &line, None).await {
                    Ok(reply) if reply == line => ok += 1,
                    Ok(reply) => other.push(format!("{line:?}: garbled {reply:?}")),
                    Err(e) => match find::<RateLimited>(&*e) {
                        Some(r) => {
                            assert!(
                                r.retry_after > Duration::ZERO
                                    && r.retry_after <= Duration::from_secs(1) / RATE,
                                "retry_after {:?} for a {RATE}/s limit",
                                r.retry_after
                            );
                            limited += 1;
                        }
                        None => other.push(format!("{line:?}: {e}")),
                    },
                }
            }
            (ok, limited, other)
        });
    }
    let (mut ok, mut limited) = (0, 0);
    within(LIMIT, "the flood", async {
        while let Some(r) = tasks.join_next().await {
            let (o, l, other) = r.expect("task");
            assert!(other.is_empty(), "not rate limits: {other:?}");
            ok += o;
            limited += l;
        }
    })
    .await;
    let elapsed = start.elapsed();

    assert_eq!(ok + limited, TASKS * ATTEMPTS);
    let bound = RATE as usize + (f64::from(RATE) * elapsed.as_secs_f64()) as usize + 1;
    assert!(
        ok <= bound,
        "{ok} admitted in {elapsed:?}: more than burst + rate × elapsed ({bound})"
    );
    assert!(
        ok >= RATE as usize,
        "the burst of {RATE} was not admitted: {ok}"
    );
    assert!(limited > 0, "nothing was limited");

    let stats = handle.stats();
    println!("{stats}");
    let rate = stats.rate.expect("a rate limit");
    assert_eq!(rate.admitted as usize, ok);
    assert_eq!(rate.rejected as usize, limited);
    assert_eq!(rate.limit_per_second, f64::from(RATE));
    assert_eq!(rate.burst, RATE);
    let sent: u64 = stats
        .backends
        .iter()
        .map(|b| b.balance.as_ref().map_or(0, |e| e.requests))
        .sum();
    assert_eq!(sent as usize, ok, "only admitted requests reach a backend");

    drop(svc);
    shut_down_clean(&handle).await;
}

// ---------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------

const HELD: usize = 8;

/// A stack over one server that holds every reply until released, with `HELD`
/// requests sent and held there; the tasks count requests finished in `finished`.
async fn held_requests() -> (
    LineServer,
    StackService<String, String>,
    StackHandle,
    JoinSet<(String, Result<String, BoxError>)>,
    Arc<AtomicUsize>,
) {
    let server = LineServer::start(LineServerOptions {
        hold: true,
        ..LineServerOptions::default()
    })
    .await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .pool(Config {
            min_idle: 0,
            max_size: 2 * HELD,
            ..Config::balanced()
        })
        .build_line()
        .expect("the stack builds");
    let finished = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for n in 0..HELD {
        let mut svc = svc.clone();
        let finished = finished.clone();
        tasks.spawn(async move {
            let line = format!("held {n}");
            let out = send(&mut svc, &line, None).await;
            finished.fetch_add(1, SeqCst);
            (line, out)
        });
    }
    assert!(
        eventually(LIMIT, || server.lines() == HELD).await,
        "the requests reached the server: {server:?}"
    );
    assert_eq!(handle.stats().in_flight, HELD);
    (server, svc, handle, tasks, finished)
}

// A current-thread runtime: a request's task finishes in the same poll that ends its
// in-flight count, so once `shutdown` returns every finished request is counted.
#[tokio::test]
async fn shutdown_refuses_new_requests_and_waits_for_in_flight() {
    let (server, svc, handle, mut tasks, finished) = held_requests().await;

    let shutdown = handle.shutdown(LIMIT);
    tokio::pin!(shutdown);
    assert!(
        poll_once(shutdown.as_mut()).await.is_none(),
        "shutdown returned with {HELD} requests in flight"
    );

    // New requests are refused at once, and never reach the backend.
    for n in 0..3 {
        let mut late = svc.clone();
        let err = within(
            LIMIT,
            "a late request",
            send(&mut late, &format!("late {n}"), None),
        )
        .await
        .expect_err("a request after shutdown began");
        assert!(
            find::<ShuttingDown>(&*err).is_some(),
            "not ShuttingDown: {err}"
        );
    }
    assert_eq!(server.lines(), HELD);
    assert_eq!(finished.load(SeqCst), 0, "held requests finished early");
    assert!(
        poll_once(shutdown.as_mut()).await.is_none(),
        "shutdown returned with {HELD} requests in flight"
    );

    server.release();
    let left = within(LIMIT, "shutdown", shutdown).await;
    assert_eq!(left, 0);
    assert_eq!(
        finished.load(SeqCst),
        HELD,
        "shutdown returned before the requests in flight finished"
    );
    while let Some(r) = tasks.join_next().await {
        let (line, out) = r.expect("task");
        assert_eq!(out.expect("a request in flight at shutdown"), line);
    }
    drop(svc);
    shut_down_clean(&handle).await;
    assert!(
        eventually(LIMIT, || server.open_connections() == 0).await,
        "server-side connections left open: {server:?}"
    );
}

#[tokio::test]
async fn shutdown_deadline_returns_requests_still_in_flight() {
    let (server, svc, handle, mut tasks, finished) = held_requests().await;

    // The replies are held for as long as the test likes: at the deadline all are in
    // flight, and shutdown says so.
    let left = within(
        Duration::from_secs(3),
        "shutdown with a 100 ms deadline",
        handle.shutdown(Duration::from_millis(100)),
    )
    .await;
    assert_eq!(left, HELD, "requests in flight at the deadline");
    assert_eq!(finished.load(SeqCst), 0);

    server.release();
    within(LIMIT, "held requests", async {
        while let Some(r) = tasks.join_next().await {
            let _ = r.expect("task");
        }
    })
    .await;
    drop(svc);
    shut_down_clean(&handle).await;
}

// ---------------------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------------------

/// The problems' paths, sorted.
fn paths(problems: &InvalidConfig) -> BTreeSet<&str> {
    problems.0.iter().map(|p| p.path.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_files() {
    // A good file: the stack it builds serves the test's servers.
    let servers = [
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    ];
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect();
    let text = format!(
        r#"
endpoints = [{}]
picker = "p2c"
connect_timeout_ms = 1000
failfast_timeout_ms = 2000

[pool]
preset = "low_latency"
min_idle = 1
max_size = 4
acquire_timeout_ms = 2000

[health]
consecutive_failures = 3
base_ejection_ms = 300
max_ejection_ms = 3000
panic_threshold = 0.3

[failover]
max_attempts = 2
idempotent = true

[limits]
rate_per_second = 5000
burst = 100
bandwidth_bytes_per_sec = 1048576.0
"#,
        list.join(", ")
    );
    let config = StackConfig::from_toml(&text).expect("a good file parses");
    assert_eq!(config.validate(), vec![]);
    let (mut svc, handle) = Stack::from_config::<String>(&config)
        .expect("a good file is valid")
        .build_line()
        .expect("the stack builds");
    for n in 0..30 {
        let line = format!("configured {n}");
        let reply = within(LIMIT, "a request", send(&mut svc, &line, None))
            .await
            .expect("a request through the configured stack");
        assert_eq!(reply, line);
    }
    // Each pool opened its `min_idle` connection to its own server.
    assert!(
        eventually(LIMIT, || servers.iter().all(|s| s.accepts() >= 1)).await,
        "{servers:?}"
    );
    let stats = handle.stats();
    println!("{stats}");
    let backends: BTreeSet<SocketAddr> = stats.backends.iter().map(|b| b.addr).collect();
    let expected: BTreeSet<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
    assert_eq!(backends, expected);
    for b in &stats.backends {
        assert_eq!(b.pool.max_size, 4, "{}", b.addr);
        assert!(b.health.is_some(), "health checks on");
    }
    let requests: u64 = stats
        .backends
        .iter()
        .map(|b| b.balance.as_ref().map_or(0, |e| e.requests))
        .sum();
    assert_eq!(requests, 30);
    let rate = stats.rate.expect("limits.rate_per_second");
    assert_eq!((rate.limit_per_second, rate.burst), (5000.0, 100));
    assert_eq!(rate.admitted, 30);
    assert_eq!(
        stats.bandwidth.map(|b| b.2),
        Some(1_048_576.0),
        "limits.bandwidth_bytes_per_sec"
    );
    drop(svc);
    shut_down_clean(&handle).await;

    // Syntax: unknown keys, missing and mistyped fields, broken TOML.
    let syntax = |text: &str| {
        StackConfig::from_toml(text)
            .expect_err("a file that should not parse")
            .to_string()
    };
    let typo = syntax("endpoints = [\"127.0.0.1:7001\"]\n\n[pool]\nmax_szie = 2\n");
    assert!(typo.contains("max_szie"), "{typo}");
    assert!(typo.contains("line 4"), "{typo}");
    let missing = syntax("picker = \"p2c\"\n");
    assert!(missing.contains("endpoints"), "{missing}");
    let mistyped = syntax("endpoints = \"127.0.0.1:7001\"\n");
    assert!(mistyped.contains("endpoints"), "{mistyped}");
    let broken = syntax("endpoints = [\"127.0.0.1:7001\"\n");
    assert!(broken.contains("line"), "{broken}");

    // Validation: each bad setting by its path.
    let one = "endpoints = [\"127.0.0.1:7001\"]\n";
    let cases = [
        ("endpoints = []".to_string(), "endpoints"),
        ("endpoints = [\"nonsense\"]".to_string(), "endpoints[0]"),
        (
            "endpoints = [\"127.0.0.1:7001\", \"localhost:80\"]".to_string(),
            "endpoints[1]",
        ),
        (
            format!("{one}[pool]\nmin_idle = 9\nmax_size = 2\n"),
            "pool.min_idle",
        ),
        (format!("picker = \"fastest\"\n{one}"), "picker"),
        (
            format!("{one}[limits]\nrate_per_second = 0\n"),
            "limits.rate_per_second",
        ),
        (
            format!("{one}[health]\npanic_threshold = 2.0\n"),
            "health.panic_threshold",
        ),
        (
            format!("{one}[failover]\nmax_attempts = 0\n"),
            "failover.max_attempts",
        ),
    ];
    for (text, path) in &cases {
        let config =
            StackConfig::from_toml(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"));
        let problems = config.validate();
        assert_eq!(
            problems.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
            vec![*path],
            "{text:?}: {problems:?}"
        );
        assert!(!problems[0].message.is_empty());
        let err = Stack::from_config::<String>(&config).expect_err("an invalid file");
        assert_eq!(err.0, problems);
        let shown = err.to_string();
        assert!(shown.contains(&format!("{path}: ")), "{shown}");
    }

    // Every problem at once.
    let text = r#"
endpoints = ["nonsense", "127.0.0.1:7001", "also nonsense"]
picker = "fastest"

[pool]
min_idle = 9
max_size = 2

[health]
panic_threshold = 2.0

[failover]
max_attempts = 0

[limits]
rate_per_second = 0
"#;
    let config = StackConfig::from_toml(text).expect("parses");
    let err = Stack::from_config::<String>(&config).expect_err("an invalid file");
    assert_eq!(
        paths(&err),
        BTreeSet::from([
            "endpoints[0]",
            "endpoints[2]",
            "picker",
            "pool.min_idle",
            "health.panic_threshold",
            "failover.max_attempts",
            "limits.rate_per_second",
        ])
    );
    let shown = err.to_string();
    println!("{shown}");
    assert_eq!(shown.lines().count(), 1 + err.0.len(), "{shown}");
    let by_path: BTreeMap<&str, &str> = err
        .0
        .iter()
        .map(|p| (p.path.as_str(), p.message.as_str()))
        .collect();
    assert!(by_path["endpoints[0]"].contains("nonsense"), "{shown}");
    assert!(by_path["picker"].contains("fastest"), "{shown}");
}
