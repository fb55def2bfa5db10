//! Many backends (issue #21): what marina-balance costs per request, per change and in
//! memory as the endpoint set grows, beside tower's `p2c::Balance` in the same run.
//!
//! 1. **Per request**, N = 8, 64, 512, 4096 always-ready in-memory endpoints (a
//!    `service_fn` that answers at once): `ready().await` then `call(req).await` in a
//!    loop on a current-thread runtime, as in `benches/balance.rs`; ns per request minus
//!    the direct-call floor, for tower's p2c (endpoints in `PendingRequests`) and
//!    marina's `Balance` with every picker and picker mode (weights 1–4 for the weighted
//!    ones; a consistent-hash key per request, hints made up front, for the hashed
//!    ones). Reps are interleaved: each rep times every row at every size once, in
//!    turn, so the machine's other work falls on all of them alike. Then each row's
//!    cost at N = 4096 over its own N = 8 cost, and over tower's at N = 4096.
//! 2. **Per change**, N = 4096, each picker: a discovery `Remove` then `Insert` of one
//!    endpoint (through a `ChangeStream`), and an ejection then readmission of one
//!    endpoint through an `EjectionGate` (the endpoint's readiness closes and opens, as
//!    marina-health's does, in a balancer linked to the gate as the marina stack links
//!    it). Each change is followed by a request (the one after a readmission aimed at the
//!    endpoint by a route hint, and the one after an ejection too, so it meets the
//!    ejected endpoint), and the same requests on an unchanged set are subtracted: the
//!    cell is what one change costs the balancer, whenever it pays it. Victims rotate
//!    over the set.
//! 3. **Per request with part of the set pending**, N = 4096 (the largest size), round
//!    robin and P2C: none, 1%, 10% or 50% of the endpoints with their readiness closed
//!    (as an ejection closes it; no gate here, so no panic mode), the others answering
//!    at once.
//! 4. **Heap bytes per endpoint** in a balancer holding N endpoints after a few hundred
//!    requests (so any picker table is built), counted with `allocation-counter`, beside
//!    tower's p2c. The counter sees the thread it measures only, and a Maglev picker
//!    under a balancer builds its tables on a thread of its own, so the Maglev row's
//!    balancer gets its picker without change reports (behind a wrapper that forwards
//!    picks only): it then builds its table at the first pick, on the measured thread,
//!    the same table.
//!
//! 5. **The whole `Stack`** (marina's umbrella) over N loopback line-echo backends
//!    (servers in a child process, on one worker thread; the stack and 16 client tasks
//!    on the bench's current-thread runtime), with round robin, least connections
//!    and least connections exact: requests per second after every backend has been
//!    reached, the client's CPU time per request (user + system, from
//!    `/proc/self/stat`: the stack and its side of the sockets; the servers run in a
//!    child process), `StackHandle::stats()` (median of 5 calls, after the traffic),
//!    the caller's time for `remove_endpoint` + `add_endpoint` of one backend (the
//!    next request applies the changes: table 2 measures that part), and the
//!    connections the pools hold after the traffic.
//!
//! Request counts adapt to each row's speed (`--ms` per rep, default 60; the median of
//! `--reps`, default 5); `--sizes 8,64,512,4096` picks the set sizes, `--rows a,b`
//! the marina rows whose names contain one of the words, `--tables 1,5` the tables.
//!
//! ```text
//! cargo bench -p marina-bench --bench many -- [--ms MS] [--reps R] [--sizes A,B,..] [--rows A,B,..] [--tables 1,2,3,4,5]
//! ```
//!
//! Without `--bench` (as under `cargo test --benches`) it runs every table briefly (the
//! Stack's over at most 64 backends) and fails on a wrong answer.

// A benchmark measures real wall time, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use marina_balance::{
    Balance, ChangeStream, ConsistentHash, LeastConnections, LeastResponseTime, Pick,
    PowerOfTwoChoices, Random, RoundRobin, WeightedRoundRobin,
};
use marina_core::{EjectionGate, EndpointId, GateMember, RouteHint};
use tower::discover::{Change, ServiceList};
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::ServiceFn;
use tower::{Service, ServiceExt, service_fn};

// The line echo servers, shared with the stack bench.
#[path = "common/rows.rs"]
mod rows;

type Endpoint = ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

fn answer(req: u64) -> Ready<Result<u64, Infallible>> {
    ready(Ok(req))
}

fn endpoint() -> Endpoint {
    service_fn(answer as fn(u64) -> Ready<Result<u64, Infallible>>)
}

/// Requests from here on carry a route hint naming endpoint `req - AIM` (the change
/// table's requests that meet the changed endpoint).
const AIM: u64 = 1 << 40;

/// How the rows route.
#[derive(Clone, Copy, PartialEq)]
enum Hints {
    /// No hint (a request at or above `AIM` still names its endpoint).
    None,
    /// A consistent-hash key per request.
    Hash,
}

/// A picker behind a wrapper that forwards picks only (no change reports): see the
/// memory table in the module docs.
struct PicksOnly(Box<dyn Pick>);

impl Pick for PicksOnly {
    fn pick(
        &mut self,
        endpoints: &dyn marina_balance::Endpoints,
        hint: Option<&RouteHint>,
    ) -> usize {
        self.0.pick(endpoints, hint)
    }

    fn reads_total_load(&self) -> bool {
        self.0.reads_total_load()
    }
}

/// One marina row: a name, a picker, weights, hints.
struct Row {
    name: &'static str,
    make: fn() -> Box<dyn Pick>,
    weighted: bool,
    hints: Hints,
}

fn rows() -> Vec<Row> {
    let row = |name, make, weighted, hints| Row {
        name,
        make,
        weighted,
        hints,
    };
    vec![
        row(
            "round robin",
            || Box::new(RoundRobin::new()),
            false,
            Hints::None,
        ),
        row(
            "random",
            || Box::new(Random::with_seed(1)),
            false,
            Hints::None,
        ),
        row(
            "P2C",
            || Box::new(PowerOfTwoChoices::with_seed(1)),
            false,
            Hints::None,
        ),
        row(
            "weighted RR",
            || Box::new(WeightedRoundRobin::new()),
            true,
            Hints::None,
        ),
        row(
            "weighted RR, smooth (exact)",
            || Box::new(WeightedRoundRobin::smooth()),
            true,
            Hints::None,
        ),
        row(
            "least conn.",
            || Box::new(LeastConnections::new()),
            false,
            Hints::None,
        ),
        row(
            "least conn., exact",
            || Box::new(LeastConnections::exact()),
            false,
            Hints::None,
        ),
        row(
            "least resp. time",
            || Box::new(LeastResponseTime::new()),
            false,
            Hints::None,
        ),
        row(
            "least resp. time, exact",
            || Box::new(LeastResponseTime::exact()),
            false,
            Hints::None,
        ),
        row(
            "consistent hash",
            || Box::new(ConsistentHash::new()),
            false,
            Hints::Hash,
        ),
        row(
            "CH bounded 1.25",
            || Box::new(ConsistentHash::new().bounded_load(1.25)),
            false,
            Hints::Hash,
        ),
        row(
            "CH Maglev",
            || Box::new(ConsistentHash::new().maglev()),
            false,
            Hints::Hash,
        ),
    ]
}

/// The route hints requests carry, made up front (building one is the affinity
/// layer's cost, and its allocation is not the balancer's).
struct HintTable {
    /// By key hash, for `Hints::Hash` rows.
    hashed: Vec<RouteHint>,
    /// Naming endpoint `k` (by its discovery key, a `usize`).
    aimed: Vec<RouteHint>,
}

impl HintTable {
    /// `aimed` hints for endpoints `0..n`.
    fn new(n: usize) -> Arc<Self> {
        Arc::new(HintTable {
            hashed: (0..1024u64)
                .map(|k| RouteHint::hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect(),
            aimed: (0..n)
                .map(|k| RouteHint::endpoint(EndpointId::of(&format!("{k:?}"))))
                .collect(),
        })
    }
}

/// Reads each request's route hint from `table`: by key hash (`Hints::Hash`) below
/// `AIM`, naming endpoint `req - AIM` from `AIM` on.
fn hinted<D>(lb: Balance<D, u64>, hints: Hints, table: Arc<HintTable>) -> Balance<D, u64>
where
    D: tower::discover::Discover,
{
    lb.route_hint(move |req: &u64| {
        if *req >= AIM {
            return table.aimed.get((*req - AIM) as usize).cloned();
        }
        match hints {
            Hints::None => None,
            Hints::Hash => Some(table.hashed[(*req % 1024) as usize].clone()),
        }
    })
}

type ListBalance<S> = Balance<ServiceList<Vec<S>>, u64>;

fn marina(n: usize, row: &Row, table: &Arc<HintTable>) -> ListBalance<Endpoint> {
    let lb = Balance::new(
        ServiceList::new((0..n).map(|_| endpoint()).collect::<Vec<_>>()),
        (row.make)(),
    );
    let lb = if row.weighted {
        lb.weights(|k: &usize| 1 + (*k % 4) as u32)
    } else {
        lb
    };
    hinted(lb, row.hints, table.clone())
}

type TowerP2c = tower::balance::p2c::Balance<
    ServiceList<Vec<PendingRequests<Endpoint, CompleteOnResponse>>>,
    u64,
>;

fn tower_p2c(n: usize) -> TowerP2c {
    tower::balance::p2c::Balance::new(ServiceList::new(
        (0..n)
            .map(|_| PendingRequests::new(endpoint(), CompleteOnResponse::default()))
            .collect::<Vec<_>>(),
    ))
}

/// Sends one request and checks the answer.
async fn one<S>(svc: &mut S, req: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let r = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(r, req, "wrong answer");
}

/// Sends requests `from..from + count`, one at a time.
async fn drive<S>(svc: &mut S, from: u64, count: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    for i in from..from + count {
        let r = svc.ready().await.unwrap().call(i).await.unwrap();
        std::hint::black_box(r);
    }
}

/// How long each rep runs, how many reps.
#[derive(Clone, Copy)]
struct Budget {
    /// Seconds per rep.
    secs: f64,
    reps: usize,
    /// A smoke run: one short rep.
    smoke: bool,
}

impl Budget {
    /// Operations per rep, from a first timed batch of `probe` taking `took`.
    fn count(&self, probe: u64, took: f64) -> u64 {
        if self.smoke {
            return probe;
        }
        ((self.secs / took.max(1e-9)) * probe as f64).clamp(probe as f64, 50e6) as u64
    }
}

/// ns per request through `svc`: median of the reps.
fn per_request<S>(rt: &tokio::runtime::Runtime, mut svc: S, budget: Budget) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        drive(&mut svc, 0, 1000).await;
        let probe = if budget.smoke { 200 } else { 2000 };
        let start = Instant::now();
        drive(&mut svc, 0, probe).await;
        let iters = budget.count(probe, start.elapsed().as_secs_f64());
        let mut runs = Vec::with_capacity(budget.reps);
        for _ in 0..budget.reps {
            let start = Instant::now();
            drive(&mut svc, 0, iters).await;
            runs.push(start.elapsed().as_nanos() as f64 / iters as f64);
        }
        median(runs)
    })
}

/// A service under measurement, its type erased: sends `count` requests, returns ns per
/// request.
type Timed = Box<dyn FnMut(&tokio::runtime::Runtime, u64) -> f64>;

fn timed<S>(mut svc: S) -> Timed
where
    S: Service<u64, Response = u64> + 'static,
    S::Error: std::fmt::Debug,
{
    Box::new(move |rt, count| {
        rt.block_on(async {
            let start = Instant::now();
            drive(&mut svc, 0, count).await;
            start.elapsed().as_nanos() as f64 / count as f64
        })
    })
}

/// ns per request through each of `cells`, reps interleaved: each rep times every cell
/// once, in turn (after a few requests to warm its caches), so that whatever else the
/// machine does meanwhile falls on every cell alike. The median of the reps per cell.
fn per_request_interleaved(
    rt: &tokio::runtime::Runtime,
    cells: &mut [Timed],
    budget: Budget,
) -> Vec<f64> {
    let probe = if budget.smoke { 200 } else { 2000 };
    let counts: Vec<u64> = cells
        .iter_mut()
        .map(|cell| {
            cell(rt, 1000);
            let ns = cell(rt, probe);
            budget.count(probe, ns * probe as f64 / 1e9)
        })
        .collect();
    let mut runs = vec![Vec::with_capacity(budget.reps); cells.len()];
    for _ in 0..budget.reps {
        for ((cell, &count), runs) in cells.iter_mut().zip(&counts).zip(&mut runs) {
            cell(rt, count.min(1000));
            runs.push(cell(rt, count));
        }
    }
    runs.into_iter().map(median).collect()
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// The endpoint a change hits in cycle `c` (spread over the set).
fn victim(c: u64, n: usize) -> usize {
    (c.wrapping_mul(7919) % n as u64) as usize
}

/// ns per change: median over reps of (a cycle of two changes, each followed by a
/// request, minus the same requests on a set that does not change) / 2. `cycle(c)`
/// runs cycle `c`; `steady(c)` its requests alone.
fn per_change<F, G>(
    rt: &tokio::runtime::Runtime,
    budget: Budget,
    mut cycle: F,
    mut steady: G,
) -> f64
where
    F: AsyncFnMut(u64),
    G: AsyncFnMut(u64),
{
    rt.block_on(async {
        for c in 0..16 {
            cycle(c).await;
            steady(c).await;
        }
        let probe = if budget.smoke { 4 } else { 32 };
        let start = Instant::now();
        for c in 0..probe {
            cycle(c).await;
        }
        let cycles = budget.count(probe, start.elapsed().as_secs_f64());
        let mut runs = Vec::with_capacity(budget.reps);
        let mut c = 0;
        for _ in 0..budget.reps {
            let start = Instant::now();
            for _ in 0..cycles {
                cycle(c).await;
                c += 1;
            }
            let changing = start.elapsed().as_nanos() as f64 / cycles as f64;
            let start = Instant::now();
            for k in 0..cycles {
                steady(k).await;
            }
            let still = start.elapsed().as_nanos() as f64 / cycles as f64;
            runs.push(((changing - still) / 2.0).max(0.0));
        }
        median(runs)
    })
}

/// Discovery: `Remove` one endpoint, a request, `Insert` it again (a new service), a
/// request aimed at it.
fn discovery_change(rt: &tokio::runtime::Runtime, n: usize, row: &Row, budget: Budget) -> f64 {
    let (tx, changes) = ChangeStream::channel();
    let lb = Balance::new(changes, (row.make)());
    let lb = if row.weighted {
        lb.weights(|k: &usize| 1 + (*k % 4) as u32)
    } else {
        lb
    };
    let lb = Arc::new(tokio::sync::Mutex::new(hinted(
        lb,
        row.hints,
        HintTable::new(n),
    )));
    for k in 0..n {
        tx.send(Change::Insert(k, endpoint())).unwrap();
    }
    let (lb2, tx2) = (lb.clone(), tx.clone());
    per_change(
        rt,
        budget,
        async move |c| {
            let mut lb = lb2.lock().await;
            let k = victim(c, n);
            tx2.send(Change::Remove(k)).unwrap();
            one(&mut *lb, c).await;
            tx2.send(Change::Insert(k, endpoint())).unwrap();
            one(&mut *lb, AIM + k as u64).await;
        },
        async move |c| {
            let mut lb = lb.lock().await;
            one(&mut *lb, c).await;
            one(&mut *lb, AIM + victim(c, n) as u64).await;
        },
    )
}

/// An endpoint whose readiness a health check closes (ejected, unless the gate is
/// open) and opens, as marina-health's does.
#[derive(Clone)]
struct Gated {
    state: Arc<GatedState>,
}

struct GatedState {
    member: GateMember,
    ejected: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Gated {
    fn new(gate: &EjectionGate) -> Self {
        Gated {
            state: Arc::new(GatedState {
                member: gate.join(),
                ejected: AtomicBool::new(false),
                waker: Mutex::new(None),
            }),
        }
    }

    fn eject(&self, ejected: bool) {
        let s = &self.state;
        s.ejected.store(ejected, Relaxed);
        s.member.set_ejected(ejected);
        if !ejected && let Some(w) = s.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl Service<u64> for Gated {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let s = &self.state;
        if s.ejected.load(Relaxed) && !s.member.gate_open() {
            *s.waker.lock().unwrap() = Some(cx.waker().clone());
            if s.ejected.load(Relaxed) {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u64) -> Self::Future {
        ready(Ok(req))
    }
}

/// Ejection: eject one endpoint, a request aimed at it (it goes elsewhere), readmit it,
/// a request aimed at it (it gets it).
fn ejection_change(rt: &tokio::runtime::Runtime, n: usize, row: &Row, budget: Budget) -> f64 {
    let gate = EjectionGate::new();
    let eps: Vec<Gated> = (0..n).map(|_| Gated::new(&gate)).collect();
    let lb = Balance::new(ServiceList::new(eps.clone()), (row.make)()).ejection_gate(gate);
    let lb = if row.weighted {
        lb.weights(|k: &usize| 1 + (*k % 4) as u32)
    } else {
        lb
    };
    let lb = Arc::new(tokio::sync::Mutex::new(hinted(
        lb,
        row.hints,
        HintTable::new(n),
    )));
    let lb2 = lb.clone();
    per_change(
        rt,
        budget,
        async move |c| {
            let mut lb = lb2.lock().await;
            let k = victim(c, n);
            eps[k].eject(true);
            one(&mut *lb, AIM + k as u64).await;
            eps[k].eject(false);
            one(&mut *lb, AIM + k as u64).await;
        },
        async move |c| {
            let mut lb = lb.lock().await;
            let k = victim(c, n) as u64;
            one(&mut *lb, AIM + k).await;
            one(&mut *lb, AIM + k).await;
        },
    )
}

/// Heap bytes a balancer over `n` endpoints holds per endpoint, after `warm` requests.
fn heap_per_endpoint<S>(
    rt: &tokio::runtime::Runtime,
    n: usize,
    make: impl FnOnce() -> S,
    warm: u64,
) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let mut kept = None;
    let info = allocation_counter::measure(|| {
        let mut svc = make();
        rt.block_on(drive(&mut svc, 0, warm));
        kept = Some(svc);
    });
    drop(kept);
    info.bytes_current as f64 / n as f64
}

/// This process's CPU time (user + system, all threads), from `/proc/self/stat`
/// (Linux; clock ticks taken as the usual 100 per second), opened once: at N = 4096 the
/// sockets take most of the process's file descriptors.
struct ProcessCpu(Option<std::fs::File>);

impl ProcessCpu {
    fn new() -> Self {
        ProcessCpu(std::fs::File::open("/proc/self/stat").ok())
    }

    fn now(&mut self) -> Option<Duration> {
        use std::io::{Read, Seek};
        let file = self.0.as_mut()?;
        file.rewind().ok()?;
        let mut stat = String::new();
        file.read_to_string(&mut stat).ok()?;
        // Fields after the command name (in parentheses, may hold spaces): utime is
        // field 14, stime field 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Duration::from_millis(ticks * 10))
    }
}

/// Waits (up to 5 s) until the process holds at most `max` file descriptors: the
/// servers' ends of the last row's connections close after the row.
fn settle_fds(max: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let open = std::fs::read_dir("/proc/self/fd").map(Iterator::count);
        if open.is_ok_and(|n| n > max) {
            std::thread::sleep(Duration::from_millis(20));
        } else {
            return;
        }
    }
}

/// Table 5's echo servers, in a child process (this bench run with `--echo-servers N`):
/// the client's CPU time is then the process's, and the sockets of 4096 backends (a
/// listener and the server's end of each connection) do not count against the client's
/// limit of open files.
struct EchoServers {
    child: std::process::Child,
    addrs: Vec<SocketAddr>,
}

impl EchoServers {
    fn start(n: usize) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--echo-servers", &n.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the echo server process");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let addrs: Vec<SocketAddr> = out
            .lines()
            .take(n)
            .map(|l| l.expect("an address").parse().expect("an address"))
            .collect();
        assert_eq!(
            addrs.len(),
            n,
            "the echo server process started {}",
            addrs.len()
        );
        EchoServers { child, addrs }
    }

    /// The child's side: `n` echo servers on a one-worker runtime, their addresses
    /// printed a line each, until stdin closes (the parent is gone).
    fn serve(n: usize) {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut out = std::io::stdout().lock();
        rt.block_on(async {
            for _ in 0..n {
                let addr = rows::echo_server().await.expect("an echo server");
                writeln!(out, "{addr}").unwrap();
            }
        });
        out.flush().unwrap();
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Concurrent client tasks in table 5.
const STACK_CLIENTS: usize = 16;

/// Sends `count` echo requests through `svc` from `STACK_CLIENTS` tasks; the wall time.
async fn stack_drive(svc: &marina::StackService<String, String>, count: u64) -> Duration {
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..STACK_CLIENTS)
        .map(|_| {
            let (mut svc, sent) = (svc.clone(), sent.clone());
            tokio::spawn(async move {
                while sent.fetch_add(1, Relaxed) < count {
                    let line = "many backends".to_string();
                    let reply = svc
                        .ready()
                        .await
                        .expect("ready")
                        .call(marina::core::Request::new(line))
                        .await
                        .expect("an echo");
                    assert_eq!(reply.body, "many backends", "wrong answer");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client task");
    }
    start.elapsed()
}

/// One row of table 5 at one size.
struct StackCell {
    per_sec: f64,
    cpu_us: Option<f64>,
    stats_ms: f64,
    change_us: f64,
    /// Connections open after the traffic, and connects that failed, over all pools.
    open: usize,
    failed: u64,
}

/// Table 5's measures for a stack over `addrs` choosing with `make`.
fn stack_cell(addrs: &[SocketAddr], make: fn() -> Box<dyn Pick>, budget: Budget) -> StackCell {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = addrs.len();
    rt.block_on(async {
        let (svc, handle) = marina::Stack::builder::<String>()
            .endpoints(addrs.iter().copied())
            .picker(make)
            .build_line()
            .expect("a stack");
        // Every backend reached (and its pool's first connection open) before measuring.
        stack_drive(&svc, 2 * n as u64 + 1000).await;
        let probe = if budget.smoke { 200 } else { 2000 };
        let took = stack_drive(&svc, probe).await;
        // Requests take tens of µs here: reps 5× longer than the in-memory tables'.
        let count = Budget {
            secs: budget.secs * 5.0,
            ..budget
        }
        .count(probe, took.as_secs_f64());
        let mut rates = Vec::new();
        let mut cpus = Vec::new();
        let mut clock = ProcessCpu::new();
        for _ in 0..budget.reps {
            let cpu = clock.now();
            let wall = stack_drive(&svc, count).await;
            rates.push(count as f64 / wall.as_secs_f64());
            if let (Some(a), Some(b)) = (cpu, clock.now()) {
                cpus.push((b - a).as_secs_f64() * 1e6 / count as f64);
            }
        }
        let mut stats = Vec::new();
        let (mut open, mut failed) = (0, 0);
        for _ in 0..5 {
            let start = Instant::now();
            let s = handle.stats();
            stats.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(s.backends.len(), n, "stats lists every backend");
            open = s.backends.iter().map(|b| b.pool.total).sum();
            failed = s.backends.iter().map(|b| b.pool.failed).sum();
        }
        let cycles = if budget.smoke { 4 } else { 200 };
        let mut changes = Vec::new();
        for c in 0..cycles {
            let addr = addrs[victim(c, n)];
            let start = Instant::now();
            assert!(handle.remove_endpoint(addr));
            handle.add_endpoint(addr).expect("added again");
            changes.push(start.elapsed().as_secs_f64() * 1e6);
            // The balancer applies both, and the removed pool's close runs.
            stack_drive(&svc, 1).await;
            tokio::task::yield_now().await;
        }
        handle.shutdown(Duration::from_secs(5)).await;
        StackCell {
            per_sec: median(rates),
            cpu_us: (!cpus.is_empty()).then(|| median(cpus)),
            stats_ms: median(stats),
            change_us: median(changes),
            open,
            failed,
        }
    })
}

/// Table 5: the whole stack.
fn stack_table(sizes: &[usize], wanted: &[String], budget: Budget) {
    // A smoke run checks the answers over a few dozen backends, not thousands (a debug
    // build takes most of a minute to serve 4096).
    let small: Vec<usize> = sizes.iter().copied().filter(|&n| n <= 64).collect();
    let sizes = if budget.smoke && !small.is_empty() {
        &small[..]
    } else {
        sizes
    };
    type MakePicker = fn() -> Box<dyn Pick>;
    let rows: [(&str, MakePicker); 3] = [
        ("round robin", || Box::new(RoundRobin::new())),
        ("least conn.", || Box::new(LeastConnections::new())),
        ("least conn., exact", || Box::new(LeastConnections::exact())),
    ];
    let big = *sizes.iter().max().unwrap();
    let servers = EchoServers::start(big);
    let addrs = &servers.addrs;
    println!(
        "\nthe Stack over N loopback echo backends ({STACK_CLIENTS} client tasks; servers in another process):\n"
    );
    println!(
        "| picker | N | requests/s | ÷ its smallest N | client CPU µs/request | stats() ms | remove + add µs (caller) | connections open (connects failed) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, make) in rows {
        if !(wanted.is_empty() || wanted.iter().any(|w| name.contains(w.as_str()))) {
            continue;
        }
        let mut first = None;
        for &n in sizes {
            settle_fds(256);
            let cell = stack_cell(&addrs[..n], make, budget);
            let base = *first.get_or_insert(cell.per_sec);
            println!(
                "| {name} | {n} | {:.0} | {:.2} | {} | {:.2} | {:.1} | {} ({}) |",
                cell.per_sec,
                cell.per_sec / base,
                cell.cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
                cell.stats_ms,
                cell.change_us,
                cell.open,
                cell.failed
            );
        }
    }
}

fn parse_args() -> (Budget, Vec<usize>, Vec<String>, Vec<u32>) {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let smoke = !args.iter().any(|a| a == "--bench");
    let budget = Budget {
        secs: value("--ms")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(60.0)
            / 1e3,
        reps: if smoke {
            1
        } else {
            value("--reps").and_then(|v| v.parse().ok()).unwrap_or(5)
        },
        smoke,
    };
    let sizes = value("--sizes")
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![8, 64, 512, 4096]);
    let rows = value("--rows")
        .map(|s| s.split(',').map(|w| w.trim().to_string()).collect())
        .unwrap_or_default();
    let tables = value("--tables")
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3, 4, 5]);
    (budget, sizes, rows, tables)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--echo-servers") {
        return EchoServers::serve(args[i + 1].parse().expect("--echo-servers N"));
    }
    let (budget, sizes, wanted, tables) = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let floor = per_request(&rt, endpoint(), budget);
    let rows: Vec<Row> = rows()
        .into_iter()
        .filter(|r| wanted.is_empty() || wanted.iter().any(|w| r.name.contains(w.as_str())))
        .collect();
    let big = *sizes.iter().max().unwrap();
    println!(
        "many bench: ~{:.0} ms × {} reps (median), current-thread runtime; direct call (floor): {floor:.1} ns/request\n",
        budget.secs * 1e3,
        budget.reps
    );

    if tables.contains(&1) {
        per_request_table(&rt, &sizes, &rows, floor, budget);
    }
    if tables.contains(&2) {
        per_change_table(&rt, big, &rows, budget);
    }
    if tables.contains(&3) {
        pending_table(&rt, big, floor, budget);
    }
    if tables.contains(&4) {
        memory_table(&rt, &sizes, &rows);
    }
    if tables.contains(&5) {
        stack_table(&sizes, &wanted, budget);
    }
}

/// Table 1: per request.
fn per_request_table(
    rt: &tokio::runtime::Runtime,
    sizes: &[usize],
    rows: &[Row],
    floor: f64,
    budget: Budget,
) {
    let big = *sizes.iter().max().unwrap();
    let small = *sizes.iter().min().unwrap();
    let head: Vec<String> = sizes.iter().map(|n| format!("N = {n}")).collect();
    println!("ns of overhead per request (minus the floor):\n");
    println!("| row | {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(sizes.len()));
    // Every cell built first, then timed rep by rep in turn: the direct call (the
    // floor), tower at each size, each row at each size.
    let mut timers: Vec<Timed> = vec![timed(endpoint())];
    timers.extend(sizes.iter().map(|&n| timed(tower_p2c(n))));
    for row in rows {
        timers.extend(
            sizes
                .iter()
                .map(|&n| timed(marina(n, row, &HintTable::new(n)))),
        );
    }
    let all = per_request_interleaved(rt, &mut timers, budget);
    drop(timers);
    // The lower of this table's floor and the one measured at the start: a floor is a
    // lower bound.
    let floor = all[0].min(floor);
    let mut by_row = all[1..]
        .chunks(sizes.len())
        .map(|v| v.iter().map(|c| c - floor).collect::<Vec<f64>>());
    let tower = by_row.next().unwrap();
    let costs: Vec<Vec<f64>> = by_row.collect();
    let cells = |v: &[f64]| v.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>();
    println!("| tower p2c | {} |", cells(&tower).join(" | "));
    for (row, v) in rows.iter().zip(&costs) {
        println!("| {} | {} |", row.name, cells(v).join(" | "));
    }
    let at = |v: &[f64], n: usize| v[sizes.iter().position(|&s| s == n).unwrap()];
    println!(
        "\nratios: N = {big} over the row's own N = {small}, and over tower p2c at N = {big}:\n"
    );
    println!("| row | N = {big} ÷ N = {small} | ÷ tower p2c at N = {big} |");
    println!("|---|---:|---:|");
    println!(
        "| tower p2c | {:.2} | 1.00 |",
        at(&tower, big) / at(&tower, small)
    );
    for (row, v) in rows.iter().zip(&costs) {
        println!(
            "| {} | {:.2} | {:.2} |",
            row.name,
            at(v, big) / at(v, small),
            at(v, big) / at(&tower, big)
        );
    }
}

/// Table 2: per change.
fn per_change_table(rt: &tokio::runtime::Runtime, big: usize, rows: &[Row], budget: Budget) {
    println!("\nns per change at N = {big} (the change and what the next request pays for it):\n");
    println!("| row | discovery remove / insert | ejection / readmission (gate) |");
    println!("|---|---:|---:|");
    for row in rows {
        let d = discovery_change(rt, big, row, budget);
        let e = ejection_change(rt, big, row, budget);
        println!("| {} | {d:.0} | {e:.0} |", row.name);
    }
}

/// Table 3: per request with part of the set pending.
fn pending_table(rt: &tokio::runtime::Runtime, big: usize, floor: f64, budget: Budget) {
    let shares = [0.0, 0.01, 0.1, 0.5];
    println!("\nns of overhead per request at N = {big} with part of the set pending:\n");
    println!(
        "| row | {} |",
        shares
            .iter()
            .map(|s| format!("{:.0}% pending", s * 100.0))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---:|".repeat(shares.len()));
    type MakePicker = fn() -> Box<dyn Pick>;
    let pending_rows: [(&str, MakePicker); 2] = [
        ("round robin", || Box::new(RoundRobin::new())),
        ("P2C", || Box::new(PowerOfTwoChoices::with_seed(1))),
    ];
    for (name, make) in pending_rows {
        let cells: Vec<String> = shares
            .iter()
            .map(|&share| {
                let gate = EjectionGate::new();
                let eps: Vec<Gated> = (0..big).map(|_| Gated::new(&gate)).collect();
                for ep in &eps[..(share * big as f64) as usize] {
                    ep.eject(true);
                }
                let lb: ListBalance<Gated> = Balance::new(ServiceList::new(eps), make());
                format!("{:.1}", per_request(rt, lb, budget) - floor)
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}

/// Table 4: memory.
fn memory_table(rt: &tokio::runtime::Runtime, sizes: &[usize], rows: &[Row]) {
    let head: Vec<String> = sizes.iter().map(|n| format!("N = {n}")).collect();
    println!("\nheap bytes per endpoint (allocation-counter, after 500 requests):\n");
    println!("| row | {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(sizes.len()));
    let t: Vec<String> = sizes
        .iter()
        .map(|&n| format!("{:.0}", heap_per_endpoint(rt, n, || tower_p2c(n), 500)))
        .collect();
    println!("| tower p2c | {} |", t.join(" | "));
    for row in rows {
        let v: Vec<String> = sizes
            .iter()
            .map(|&n| {
                let table = HintTable::new(n);
                let make = || {
                    if !row.name.contains("Maglev") {
                        return marina(n, row, &table);
                    }
                    let eps = (0..n).map(|_| endpoint()).collect::<Vec<_>>();
                    let lb = Balance::new(ServiceList::new(eps), PicksOnly((row.make)()));
                    hinted(lb, row.hints, table.clone())
                };
                format!("{:.0}", heap_per_endpoint(rt, n, make, 500))
            })
            .collect();
        println!("| {} | {} |", row.name, v.join(" | "));
    }
}
