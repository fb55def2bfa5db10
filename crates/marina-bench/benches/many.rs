//! Many backends (issue #21): what marina-balance costs per request, per change and in
//! memory as the endpoint set grows, beside tower's `p2c::Balance` in the same run.
//!
//! 1. **Per request**, N = 8, 64, 512, 4096 always-ready in-memory endpoints (a
//!    `service_fn` that answers at once): `ready().await` then `call(req).await` in a
//!    loop on a current-thread runtime, as in `benches/balance.rs`; ns per request minus
//!    the direct-call floor, for tower's p2c (endpoints in `PendingRequests`) and
//!    marina's `Balance` with every picker and picker mode (weights 1–4 for the weighted
//!    ones; a consistent-hash key per request, hints made up front, for the hashed
//!    ones). Then each row's cost at N = 4096 over its own N = 8 cost, and over tower's
//!    at N = 4096.
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
//! Request counts adapt to each row's speed (`--ms` per rep, default 60; the median of
//! `--reps`, default 5); `--sizes 8,64,512,4096` picks the set sizes, `--rows a,b`
//! the marina rows whose names contain one of the words.
//!
//! ```text
//! cargo bench -p marina-bench --bench many -- [--ms MS] [--reps R] [--sizes A,B,..] [--rows A,B,..]
//! ```
//!
//! Without `--bench` (as under `cargo test --benches`) it runs every table briefly and
//! fails on a wrong answer.

// A benchmark measures real wall time, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use marina_balance::{
    Balance, ChangeStream, ConsistentHash, LeastConnections, LeastResponseTime, Pick,
    PowerOfTwoChoices, Random, RoundRobin, WeightedRoundRobin,
};
use marina_core::{EjectionGate, EndpointId, GateMember, RouteHint};
use tower::discover::{Change, ServiceList};
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::ServiceFn;
use tower::{Service, ServiceExt, service_fn};

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

fn parse_args() -> (Budget, Vec<usize>, Vec<String>) {
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
    (budget, sizes, rows)
}

fn main() {
    let (budget, sizes, wanted) = parse_args();
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
    let small = *sizes.iter().min().unwrap();
    println!(
        "many bench: ~{:.0} ms × {} reps (median), current-thread runtime; direct call (floor): {floor:.1} ns/request\n",
        budget.secs * 1e3,
        budget.reps
    );

    // 1. Per request.
    println!("ns of overhead per request (minus the floor):\n");
    let head: Vec<String> = sizes.iter().map(|n| format!("N = {n}")).collect();
    println!("| row | {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(sizes.len()));
    let tower: Vec<f64> = sizes
        .iter()
        .map(|&n| per_request(&rt, tower_p2c(n), budget) - floor)
        .collect();
    let cells = |v: &[f64]| v.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>();
    println!("| tower p2c | {} |", cells(&tower).join(" | "));
    let mut costs = Vec::new();
    for row in &rows {
        let v: Vec<f64> = sizes
            .iter()
            .map(|&n| per_request(&rt, marina(n, row, &HintTable::new(n)), budget) - floor)
            .collect();
        println!("| {} | {} |", row.name, cells(&v).join(" | "));
        costs.push(v);
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

    // 2. Per change.
    println!("\nns per change at N = {big} (the change and what the next request pays for it):\n");
    println!("| row | discovery remove / insert | ejection / readmission (gate) |");
    println!("|---|---:|---:|");
    for row in &rows {
        let d = discovery_change(&rt, big, row, budget);
        let e = ejection_change(&rt, big, row, budget);
        println!("| {} | {d:.0} | {e:.0} |", row.name);
    }

    // 3. Per request with part of the set pending.
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
                format!("{:.1}", per_request(&rt, lb, budget) - floor)
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }

    // 4. Memory.
    println!("\nheap bytes per endpoint (allocation-counter, after 500 requests):\n");
    println!("| row | {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(sizes.len()));
    let t: Vec<String> = sizes
        .iter()
        .map(|&n| format!("{:.0}", heap_per_endpoint(&rt, n, || tower_p2c(n), 500)))
        .collect();
    println!("| tower p2c | {} |", t.join(" | "));
    for row in &rows {
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
                format!("{:.0}", heap_per_endpoint(&rt, n, make, 500))
            })
            .collect();
        println!("| {} | {} |", row.name, v.join(" | "));
    }
}
