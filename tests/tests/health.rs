//! `marina-health` on real loopback TCP: active probes (`LineProbe`, `HttpProbe`,
//! `probe_fn`) against servers that answer, die, hang or hang up, ejection as a closed
//! readiness gate under tower's `p2c::Balance`, bad probes, and the probe task's lifetime.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use integration_tests::{EchoServer, LIMIT, eventually, within};
use marina_core::{BoxError, BoxFuture, probe_fn};
use marina_health::{
    ActiveConfig, CheckRound, Health, HealthConfig, HealthHandle, HealthLayer, HttpProbe,
    LineProbe, Status,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::Constant;
use tower::{Layer, Service, ServiceExt, service_fn};

// ---------------------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------------------

/// Fast active checks for real-socket tests: a round every 50 ms (no jitter, so rounds
/// are evenly spaced), two in a row to fall or rise.
fn fast_active(timeout: Duration) -> ActiveConfig {
    ActiveConfig {
        interval: Duration::from_millis(50),
        jitter: 0.0,
        timeout,
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

const PROBED_OUT: Status = Status::Ejected { until: None };

/// A line-echo client: per request, connects to its server, sends the line and returns
/// the line echoed back. Counts the requests it was given.
#[derive(Debug, Clone)]
struct EchoClient {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
}

impl EchoClient {
    fn new(addr: SocketAddr) -> Self {
        EchoClient {
            addr,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Service<String> for EchoClient {
    type Response = String;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<String>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: String) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        let addr = self.addr;
        Box::pin(async move {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(format!("{req}\n").as_bytes()).await?;
            let mut line = String::new();
            if BufReader::new(&mut stream).read_line(&mut line).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "echo server closed the connection",
                ));
            }
            Ok(line.trim_end().to_string())
        })
    }
}

type Endpoint = Constant<Health<EchoClient>, u32>;
type Bal = Balance<ServiceList<Vec<Endpoint>>, String>;

/// Three echo servers, each behind a `Health` endpoint probed with a `LineProbe`, under
/// one p2c balancer.
struct Cluster {
    servers: Vec<EchoServer>,
    calls: Vec<Arc<AtomicUsize>>,
    handles: Vec<HealthHandle>,
    balance: Bal,
}

impl Cluster {
    async fn start(config: HealthConfig) -> Self {
        let mut servers = Vec::new();
        let mut calls = Vec::new();
        let mut handles = Vec::new();
        let mut endpoints = Vec::new();
        for i in 0..3 {
            let server = EchoServer::start().await;
            let client = EchoClient::new(server.addr());
            calls.push(client.calls.clone());
            let svc = Health::builder(client)
                .name(format!("echo-{i}"))
                .config(config.clone())
                .probe(
                    fast_active(Duration::from_millis(200)),
                    LineProbe::new("ping", "ping"),
                    server.addr(),
                )
                .build();
            handles.push(svc.handle());
            endpoints.push(Constant::new(svc, 1));
            servers.push(server);
        }
        let cluster = Cluster {
            servers,
            calls,
            handles,
            balance: Balance::new(ServiceList::new(endpoints)),
        };
        assert!(
            eventually(LIMIT, || cluster
                .handles
                .iter()
                .all(|h| h.status() == Status::Healthy))
            .await,
            "all endpoints healthy after their first probe rounds: {:?}",
            cluster.statuses()
        );
        cluster
    }

    fn statuses(&self) -> Vec<Status> {
        self.handles.iter().map(HealthHandle::status).collect()
    }

    fn calls(&self) -> Vec<usize> {
        self.calls.iter().map(|c| c.load(SeqCst)).collect()
    }

    /// One request through the balancer; checks the echo.
    async fn send_one(&mut self, n: usize) -> Result<(), BoxError> {
        let req = format!("request-{n}");
        let reply = within(LIMIT, "a balanced echo request", async {
            self.balance.ready().await?.call(req.clone()).await
        })
        .await?;
        assert_eq!(reply, req, "the echo of the request");
        Ok(())
    }

    /// `n` requests, one after another; returns how many failed.
    async fn send(&mut self, n: usize) -> usize {
        let mut failed = 0;
        for i in 0..n {
            if self.send_one(i).await.is_err() {
                failed += 1;
            }
        }
        failed
    }
}

/// The named check of a probe round.
fn check<'a>(round: &'a CheckRound, name: &str) -> &'a marina_health::CheckResult {
    round
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name:?} check in {round:#?}"))
}

/// The last probe round, once one exists.
async fn last_round(handle: &HealthHandle) -> CheckRound {
    assert!(
        eventually(LIMIT, || handle.report().last.is_some()).await,
        "a probe round within {LIMIT:?}"
    );
    handle.report().last.expect("checked above")
}

/// Checks that the endpoint serves again: `Healthy`, or `Degraded` exactly when the last
/// round's error-rate check fails (failed rounds still in the history).
#[track_caller]
fn assert_serving(handle: &HealthHandle) {
    let report = handle.report();
    let last = report.last.as_ref().expect("a probe round");
    assert!(last.passed, "{report:#?}");
    let expected = if check(last, "error_rate").passed {
        Status::Healthy
    } else {
        Status::Degraded
    };
    assert_eq!(report.status, expected, "{report:#?}");
    assert!(report.status.is_ready());
}

/// Waits until active probes have taken the endpoint out.
async fn until_probed_out(handle: &HealthHandle) {
    assert!(
        eventually(LIMIT, || handle.status() == PROBED_OUT).await,
        "probed out within {LIMIT:?}: {:#?}",
        handle.report()
    );
}

/// True if `svc` does not become ready within `wait` (the gate is closed).
async fn stays_unready<S: Service<R>, R>(svc: &mut S, wait: Duration) -> bool {
    tokio::time::timeout(wait, svc.ready()).await.is_err()
}

/// A listener that counts accepted connections and hands each to `conn` in a task of
/// its own. Dropping the returned handle's task stops accepting (connections go on).
async fn serve<F, Fut>(conn: F) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, SeqCst);
            tokio::spawn(conn(stream));
        }
    });
    (addr, accepts, task)
}

/// Decrements a counter when dropped.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, SeqCst);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// An inner service that answers every request at once and counts them.
fn counting_ok(
    calls: &Arc<AtomicUsize>,
) -> impl Service<(), Response = (), Error = io::Error, Future: Send> + Clone + use<> {
    let calls = calls.clone();
    service_fn(move |()| {
        calls.fetch_add(1, SeqCst);
        async { Ok::<_, io::Error>(()) }
    })
}

// ---------------------------------------------------------------------------------------
// 1. Under tower's p2c balancer
// ---------------------------------------------------------------------------------------

/// A dead endpoint is taken out by its active probes before any request reaches it: p2c
/// only picks ready endpoints, so every request succeeds on the other two; when the
/// server comes back, the probes bring the endpoint back within a few intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_routes_around_a_probed_out_endpoint_and_back() {
    let mut c = Cluster::start(HealthConfig {
        consecutive_failures: 2,
        ..HealthConfig::default()
    })
    .await;

    // Everyone serves.
    assert_eq!(c.send(90).await, 0, "no failures while all are up");
    let calls = c.calls();
    assert!(
        calls.iter().all(|&n| n > 0),
        "p2c spreads requests over all three endpoints: {calls:?}"
    );

    // Kill endpoint 1; its probes (2 failing rounds) take it out. No requests meanwhile,
    // so only the active checks see it.
    c.servers[1].shutdown().await;
    until_probed_out(&c.handles[1]).await;
    let last = c.handles[1].report().last.expect("a probe round");
    assert!(!last.passed, "{last:#?}");
    assert!(!check(&last, "socket").passed, "{last:#?}");

    let before = c.calls();
    assert_eq!(
        c.send(200).await,
        0,
        "every request succeeds on the live endpoints"
    );
    let after = c.calls();
    assert_eq!(
        after[1], before[1],
        "no request is routed to the ejected endpoint: {before:?} -> {after:?}"
    );
    assert_eq!(
        (after[0] - before[0]) + (after[2] - before[2]),
        200,
        "all 200 went to the live endpoints: {before:?} -> {after:?}"
    );
    assert_eq!(c.statuses()[1], PROBED_OUT, "still out while dead");

    // Restart it: two passing rounds (about 100 ms) bring it back, and p2c routes to it
    // again. The bound is generous; the point is that it is not a 30 s ejection.
    c.servers[1].restart().await.unwrap();
    let restarted = Instant::now();
    let back = within(
        Duration::from_secs(5),
        "requests reach the restarted endpoint",
        async {
            let mut n = 0;
            while c.calls()[1] == before[1] {
                c.send_one(n).await.expect("requests succeed throughout");
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            restarted.elapsed()
        },
    )
    .await;
    assert_serving(&c.handles[1]);
    assert_eq!(c.send(60).await, 0, "all succeed after the return");
    tracing::info!(?back, "endpoint back");

    // Dropping the balancer (the only owner of the endpoints) ends the probe tasks: the
    // servers see no more probe connections.
    let servers = std::mem::take(&mut c.servers);
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let accepts: Vec<usize> = servers.iter().map(EchoServer::accepts).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later: Vec<usize> = servers.iter().map(EchoServer::accepts).collect();
    assert_eq!(
        accepts, later,
        "no probe rounds after the endpoints were dropped"
    );
}

/// With requests flowing when an endpoint dies, the passive detector (2 consecutive
/// failures) takes it out after at most 2 failed requests; the rest all succeed (the
/// probes take it out too before its 1 s ejection ends, so no half-open trial request
/// reaches the dead server), and it comes back once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_passive_ejection_bounds_failed_requests() {
    let mut c = Cluster::start(HealthConfig {
        consecutive_failures: 2,
        base_ejection: Duration::from_secs(1),
        ..HealthConfig::default()
    })
    .await;
    assert_eq!(c.send(30).await, 0);

    c.servers[2].shutdown().await;
    let failed = c.send(200).await;
    assert!(
        failed <= 2,
        "at most consecutive_failures (2) requests fail before the dead endpoint is out, \
         got {failed}; statuses {:?}",
        c.statuses()
    );
    assert!(
        !c.statuses()[2].is_ready(),
        "dead endpoint out: {:#?}",
        c.handles[2].report()
    );
    let before = c.calls();
    assert_eq!(c.send(100).await, 0, "no failures once it is out");
    assert_eq!(
        c.calls()[2],
        before[2],
        "nothing routed to the dead endpoint"
    );

    c.servers[2].restart().await.unwrap();
    within(
        Duration::from_secs(5),
        "requests reach the restarted endpoint",
        async {
            let mut n = 0;
            while c.calls()[2] == before[2] {
                c.send_one(n).await.expect("requests succeed throughout");
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
    )
    .await;
    assert!(
        eventually(LIMIT, || c.handles[2].status().is_ready()
            && c.handles[2].report().last.is_some_and(|r| r.passed))
        .await,
        "{:#?}",
        c.handles[2].report()
    );
    assert_serving(&c.handles[2]);
}

// ---------------------------------------------------------------------------------------
// 2.–4. Servers that hang, hang up, or answer HTTP
// ---------------------------------------------------------------------------------------

/// A server that accepts and reads but never answers: each round times out, and after
/// `unhealthy_threshold` rounds the endpoint is out (untimed) and its gate is closed.
/// Timed-out probes close their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_server_that_never_answers_times_out() {
    let open = Arc::new(AtomicUsize::new(0));
    let tracked = open.clone();
    let (addr, accepts, server) = serve(move |mut stream| {
        let live = Live::new(&tracked);
        async move {
            let _live = live;
            let mut buf = [0u8; 256];
            // Swallow everything; never answer.
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    })
    .await;

    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = Health::builder(counting_ok(&calls))
        .probe(
            fast_active(Duration::from_millis(100)),
            LineProbe::new("ping", "ping"),
            addr,
        )
        .build();
    let handle = svc.handle();

    let mut changes = handle.subscribe();
    within(
        LIMIT,
        "a status change to probed out",
        changes.wait_for(|s| *s == PROBED_OUT),
    )
    .await
    .expect("the status channel stays open while the service lives");
    let report = handle.report();
    assert!(report.unhealthy >= 2, "{report:#?}");
    assert_eq!(report.healthy, 0, "{report:#?}");
    assert_eq!(report.health_percent, 0.0, "{report:#?}");
    let last = report.last.expect("a round");
    assert!(!last.passed);
    assert_eq!(last.response_time, None);
    let socket = check(&last, "socket");
    assert!(!socket.passed, "{last:#?}");
    assert!(
        socket.message.contains("timed out"),
        "the socket check says it timed out: {last:#?}"
    );
    assert!(!check(&last, "response_time").passed, "{last:#?}");
    assert!(
        !check(&last, "error_rate").passed,
        "100% failing: {last:#?}"
    );
    assert!(!check(&last, "age").passed, "{last:#?}");
    assert_eq!(check(&last, "age").value, "never", "{last:#?}");

    assert!(
        stays_unready(&mut svc, Duration::from_millis(150)).await,
        "the gate is closed while probed out"
    );
    assert_eq!(calls.load(SeqCst), 0);
    assert!(accepts.load(SeqCst) >= 2, "the probes connected");
    // Each timed-out round drops its connection: at most the round in flight is open.
    assert!(
        eventually(LIMIT, || open.load(SeqCst) <= 1).await,
        "timed-out probe connections are closed, {} open",
        open.load(SeqCst)
    );
    server.abort();
}

/// A server that accepts and hangs up at once fails `LineProbe`'s socket check, with a
/// message about the closed connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_server_that_hangs_up_fails() {
    // Half-closes at once (sends FIN) and drains what the client sent: the client reads
    // a clean EOF, deterministically.
    let (fin_addr, fin_accepts, fin_server) = serve(|mut stream| async move {
        let _ = stream.shutdown().await;
        let mut buf = [0u8; 256];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    // Drops the socket at once: the client sees EOF, or a reset if its line arrived
    // after the close.
    let (drop_addr, _, drop_server) = serve(|stream| async move { drop(stream) }).await;

    let calls = Arc::new(AtomicUsize::new(0));
    let active = fast_active(Duration::from_millis(200));
    let fin = Health::builder(counting_ok(&calls))
        .probe(active, LineProbe::new("ping", "ping"), fin_addr)
        .build();
    let dropped = Health::builder(counting_ok(&calls))
        .probe(active, LineProbe::new("ping", "ping"), drop_addr)
        .build();

    let last = last_round(&fin.handle()).await;
    assert!(!last.passed, "{last:#?}");
    let socket = check(&last, "socket");
    assert!(!socket.passed, "{last:#?}");
    let msg = socket.message.to_lowercase();
    assert!(
        msg.contains("closed") || msg.contains("eof"),
        "the socket check says the connection was closed: {last:#?}"
    );
    until_probed_out(&fin.handle()).await;
    assert!(fin_accepts.load(SeqCst) >= 2);

    let last = last_round(&dropped.handle()).await;
    let socket = check(&last, "socket");
    assert!(!socket.passed, "{last:#?}");
    let msg = socket.message.to_lowercase();
    assert!(
        ["closed", "eof", "reset", "broken pipe"]
            .iter()
            .any(|m| msg.contains(m)),
        "the socket check says the connection was closed or reset: {last:#?}"
    );
    until_probed_out(&dropped.handle()).await;

    fin_server.abort();
    drop_server.abort();
}

/// A tiny HTTP/1.1 server: `200 OK` on `/healthz`, `503` otherwise. Records each
/// request's path and `Host` header.
async fn http_server() -> (
    SocketAddr,
    Arc<Mutex<Vec<(String, String)>>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (addr, _, task) = serve(move |stream| {
        let log = log.clone();
        async move {
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                return;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            let mut host = String::new();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("host")
                {
                    host = value.trim().to_string();
                }
            }
            log.lock().unwrap().push((path.clone(), host));
            let (status, body) = if path == "/healthz" {
                ("200 OK", "ok")
            } else {
                ("503 Service Unavailable", "down")
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut stream = reader.into_inner();
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    })
    .await;
    (addr, seen, task)
}

/// `HttpProbe` passes on a 2xx status and fails, naming the status, on a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe_passes_on_2xx_and_fails_on_503() {
    let (addr, seen, server) = http_server().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let active = fast_active(Duration::from_millis(200));
    let good = Health::builder(counting_ok(&calls))
        .probe(active, HttpProbe::new("/healthz"), addr)
        .build();
    let bad = Health::builder(counting_ok(&calls))
        .probe(active, HttpProbe::new("/other").host("api.internal"), addr)
        .build();
    let (good_h, bad_h) = (good.handle(), bad.handle());

    until_probed_out(&bad_h).await;
    assert!(
        eventually(LIMIT, || good_h.report().healthy >= 2).await,
        "{:#?}",
        good_h.report()
    );

    let report = good_h.report();
    assert_eq!(report.status, Status::Healthy, "{report:#?}");
    assert_eq!(report.unhealthy, 0, "{report:#?}");
    let last = report.last.expect("a round");
    assert!(last.passed, "{last:#?}");
    assert!(last.response_time.is_some(), "{last:#?}");
    assert!(
        last.checks.iter().all(|c| c.passed),
        "all checks pass: {last:#?}"
    );
    let names: Vec<&str> = last.checks.iter().map(|c| c.name).collect();
    assert_eq!(names, ["socket", "response_time", "error_rate", "age"]);

    let report = bad_h.report();
    assert_eq!(report.healthy, 0, "{report:#?}");
    let last = report.last.expect("a round");
    assert!(!last.passed, "{last:#?}");
    let socket = check(&last, "socket");
    assert!(!socket.passed, "{last:#?}");
    assert!(
        socket.message.contains("503"),
        "the socket check names the status: {last:#?}"
    );

    let seen = seen.lock().unwrap().clone();
    let host = addr.to_string();
    assert!(
        seen.iter().any(|(p, h)| p == "/healthz" && *h == host),
        "GET /healthz with the address as Host: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(p, h)| p == "/other" && h == "api.internal"),
        "GET /other with the configured Host: {seen:?}"
    );
    assert!(
        seen.iter().all(|(p, _)| p == "/healthz" || p == "/other"),
        "{seen:?}"
    );
    server.abort();
}

/// A failing round below `unhealthy_threshold` leaves the endpoint serving, but not
/// `Healthy`: `Status::Degraded` is documented as "serving, but something is off: the
/// last probe round was slow or the recent error rate is high", and the round's own
/// error-rate check fails.
#[tokio::test(start_paused = true)]
async fn failing_rounds_below_the_threshold_degrade_the_endpoint() {
    let probe = probe_fn(|_: &mut ()| Box::pin(async { Err(BoxError::from("down")) }));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = Health::builder(counting_ok(&calls))
        .probe(
            ActiveConfig {
                unhealthy_threshold: 1000,
                ..fast_active(Duration::from_millis(100))
            },
            probe,
            (),
        )
        .build();
    let handle = svc.handle();
    let last = last_round(&handle).await;
    assert!(!check(&last, "socket").passed, "{last:#?}");
    assert_eq!(check(&last, "socket").message, "down", "{last:#?}");
    assert!(!check(&last, "error_rate").passed, "{last:#?}");
    // Still serving: below the fall threshold the gate stays open.
    within(LIMIT, "ready below the threshold", svc.ready())
        .await
        .unwrap();
    within(LIMIT, "a call", svc.call(())).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1);
    let report = handle.report();
    assert_eq!(
        report.status,
        Status::Degraded,
        "every probe round fails (error rate {}%), yet: {report:#?}",
        100.0 - report.health_percent
    );
}

// ---------------------------------------------------------------------------------------
// 5. Bad probes
// ---------------------------------------------------------------------------------------

/// A probe that panics fails its round ("probe panicked") without ending the prober;
/// once it passes again, the gate opens and calls reach the inner service.
#[tokio::test(start_paused = true)]
async fn panicking_probe_fails_its_round_and_the_prober_goes_on() {
    let pass = Arc::new(AtomicBool::new(false));
    let flag = pass.clone();
    let probe = probe_fn(move |_: &mut ()| {
        let pass = flag.load(SeqCst);
        Box::pin(async move {
            if !pass {
                panic!("intentional probe panic (health.rs test)");
            }
            Ok(())
        })
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = Health::builder(counting_ok(&calls))
        .probe(fast_active(Duration::from_millis(100)), probe, ())
        .build();
    let handle = svc.handle();

    until_probed_out(&handle).await;
    let last = handle.report().last.expect("a round");
    assert_eq!(
        check(&last, "socket").message,
        "probe panicked",
        "{last:#?}"
    );
    assert!(stays_unready(&mut svc, Duration::from_millis(100)).await);
    assert_eq!(calls.load(SeqCst), 0, "nothing reached the inner service");

    // The prober survives its panics: more rounds happen.
    let recent = handle.report().recent;
    assert!(
        eventually(LIMIT, || handle.report().recent >= recent + 3).await,
        "rounds go on after panics: {recent} -> {}",
        handle.report().recent
    );

    // The probe heals; two passing rounds open the gate and calls go through.
    pass.store(true, SeqCst);
    within(LIMIT, "ready once the probe passes", svc.ready())
        .await
        .unwrap();
    within(LIMIT, "a call", svc.call(())).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1, "the call reached the inner service");
    assert_serving(&handle);
    let report = handle.report();
    assert!(report.healthy >= 2 && report.unhealthy >= 2, "{report:#?}");
}

/// A probe that never finishes fails its round on the timeout ("timed out"), its future
/// is dropped, and the prober goes on; once it answers again, calls go through.
#[tokio::test(start_paused = true)]
async fn hanging_probe_times_out_and_the_prober_goes_on() {
    let pass = Arc::new(AtomicBool::new(false));
    let hanging = Arc::new(AtomicUsize::new(0));
    let (flag, live) = (pass.clone(), hanging.clone());
    let probe = probe_fn(move |_: &mut ()| {
        let pass = flag.load(SeqCst);
        let live = live.clone();
        Box::pin(async move {
            if !pass {
                let _hanging = Live::new(&live);
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = Health::builder(counting_ok(&calls))
        .probe(fast_active(Duration::from_millis(100)), probe, ())
        .build();
    let handle = svc.handle();

    until_probed_out(&handle).await;
    let last = handle.report().last.expect("a round");
    let socket = check(&last, "socket");
    assert!(!socket.passed);
    assert!(socket.message.contains("timed out"), "{last:#?}");
    assert!(stays_unready(&mut svc, Duration::from_millis(100)).await);
    assert!(
        hanging.load(SeqCst) <= 1,
        "timed-out probe futures are dropped: {} alive",
        hanging.load(SeqCst)
    );

    let recent = handle.report().recent;
    assert!(
        eventually(LIMIT, || handle.report().recent >= recent + 2).await,
        "rounds go on after timeouts: {recent} -> {}",
        handle.report().recent
    );

    pass.store(true, SeqCst);
    within(LIMIT, "ready once the probe answers", svc.ready())
        .await
        .unwrap();
    within(LIMIT, "a call", svc.call(())).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1);
    assert_serving(&handle);
    assert!(
        eventually(LIMIT, || hanging.load(SeqCst) == 0).await,
        "every hanging probe future was dropped: {} alive",
        hanging.load(SeqCst)
    );
}

/// Polls `svc.poll_ready` once.
async fn poll_ready_once<S: Service<R>, R>(svc: &mut S) -> Poll<Result<(), S::Error>> {
    std::future::poll_fn(|cx| Poll::Ready(svc.poll_ready(cx))).await
}

/// When a probe round decides a half-open endpoint, a clone's unused claim on the trial
/// is settled with it: at the next half-open only one clone gets the trial ("exactly one
/// trial request (or probe round) decides"). Paused time; the probe round is released
/// by hand.
#[tokio::test(start_paused = true)]
async fn a_trial_claim_does_not_outlive_a_half_open_decided_by_a_probe() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let probe = probe_fn(move |_: &mut ()| {
        let gate = gate.clone();
        Box::pin(async move {
            gate.acquire().await?.forget();
            Ok(())
        })
    });
    let fail = Arc::new(AtomicBool::new(true));
    let failing = fail.clone();
    let inner = service_fn(move |()| {
        let fail = failing.load(SeqCst);
        async move {
            if fail {
                Err(io::Error::other("down"))
            } else {
                Ok(())
            }
        }
    });
    let mut a = Health::builder(inner)
        .config(HealthConfig {
            consecutive_failures: 1,
            failure_rate: None,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(10),
            // The held probe round is slow on purpose: not a reason to degrade.
            response_time_threshold: Duration::from_secs(60),
            ..HealthConfig::default()
        })
        .probe(
            ActiveConfig {
                interval: Duration::from_secs(60),
                jitter: 0.0,
                timeout: Duration::from_secs(30),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            },
            probe,
            (),
        )
        .build();
    let mut b = a.clone();
    let handle = a.handle();
    // The first probe round has started; it waits for `release`.

    // A fails a request: ejected for 1 s.
    a.ready().await.unwrap();
    a.call(()).await.unwrap_err();
    assert!(matches!(
        handle.status(),
        Status::Ejected { until: Some(_) }
    ));

    // Half-open: A claims the trial (and does not use it yet); B must wait.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(poll_ready_once(&mut a).await, Poll::Ready(Ok(()))));
    assert_eq!(handle.status(), Status::Degraded);
    assert!(poll_ready_once(&mut b).await.is_pending(), "one trial");

    // The probe round passes and decides the half-open: serving again.
    release.add_permits(1);
    assert!(
        eventually(LIMIT, || handle.status() == Status::Healthy).await,
        "{:#?}",
        handle.report()
    );
    assert!(matches!(poll_ready_once(&mut b).await, Poll::Ready(Ok(()))));

    // B fails a request: ejected again (2 s), then half-open again. B claims the trial
    // first, so A — whose claim the probe round settled — must wait.
    b.call(()).await.unwrap_err();
    assert!(matches!(
        handle.status(),
        Status::Ejected { until: Some(_) }
    ));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(poll_ready_once(&mut b).await, Poll::Ready(Ok(()))));
    assert_eq!(handle.status(), Status::Degraded);
    assert!(
        poll_ready_once(&mut a).await.is_pending(),
        "a second trial request was let through (A's stale claim from the first \
         half-open): {:#?}",
        handle.report()
    );
}

// ---------------------------------------------------------------------------------------
// 6. The probe task's lifetime
// ---------------------------------------------------------------------------------------

/// The probe task runs while any clone of the service lives (a handle does not count),
/// and ends — dropping the probe — when the last clone goes.
#[tokio::test(start_paused = true)]
async fn probe_task_ends_with_the_last_clone() {
    let rounds = Arc::new(AtomicUsize::new(0));
    let marker = Arc::new(());
    let (count, held) = (rounds.clone(), marker.clone());
    let probe = probe_fn(move |_: &mut ()| {
        count.fetch_add(1, SeqCst);
        let _held = &held;
        Box::pin(async { Ok(()) })
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = HealthLayer::new(HealthConfig::default())
        .name("lifetime")
        .probe(fast_active(Duration::from_millis(100)), probe, ());
    let svc = layer.layer(counting_ok(&calls));
    drop(layer); // the layer holds the probe too
    let clone = svc.clone();
    let handle = svc.handle();

    assert!(
        eventually(LIMIT, || rounds.load(SeqCst) >= 2).await,
        "the prober runs"
    );
    drop(svc);
    let n = rounds.load(SeqCst);
    assert!(
        eventually(LIMIT, || rounds.load(SeqCst) >= n + 2).await,
        "it goes on while a clone lives"
    );

    drop(clone);
    assert!(
        eventually(LIMIT, || Arc::strong_count(&marker) == 1).await,
        "the probe task ended and dropped its probe ({} refs left)",
        Arc::strong_count(&marker)
    );
    let n = rounds.load(SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await; // twenty intervals
    assert_eq!(
        rounds.load(SeqCst),
        n,
        "no rounds after the last clone dropped"
    );
    // The handle outlives the service and still reads the state.
    assert_eq!(handle.status(), Status::Healthy);
    assert!(handle.report().recent >= 4);
}
