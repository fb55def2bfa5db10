//! Per-request overhead of marina-balance's `Balance` beside tower's `p2c::Balance`.
//!
//! N = 2, 16, 256 always-ready in-memory endpoints (a `service_fn` that answers at
//! once). Each measurement drives `ready().await` then `call(req).await` in a loop on a
//! current-thread runtime; ns per request minus the direct-call floor (the same loop
//! over one endpoint, no balancer) is the balancer's overhead. tower's balancer gets
//! `PendingRequests` load, as its docs use; marina's counts in-flight requests itself.
//!
//! Every picker is measured, plus round robin with failover on — `failover`, a copy of
//! each request kept in a boxed failover state, and `failover_copy_idempotent` (meant
//! for the marina stack), where requests not marked idempotent (all of them here) are
//! not copied and nothing is kept until an attempt fails; both with a retry-budget
//! deposit per request — and consistent hash with a route hint per request. The size of
//! marina's response future is printed too (it is moved on every request). A
//! second, shorter pass counts heap allocations per request with `allocation-counter`
//! (its counting allocator is installed for the whole binary; when not counting it
//! costs a thread-local check per allocation).
//!
//! ```text
//! cargo bench -p marina-bench --bench balance -- [--iters N] [--reps R]
//! ```
//!
//! Without `--bench` (as under `cargo test --benches`) it runs a few iterations.

// A benchmark measures real wall time, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::time::Instant;

use marina_balance::{
    Balance, ConsistentHash, Failover, LeastConnections, LeastResponseTime, Pick,
    PowerOfTwoChoices, Random, RoundRobin, WeightedRoundRobin,
};
use marina_core::RouteHint;
use tower::discover::ServiceList;
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

/// Sends `count` requests through `svc`, one at a time.
async fn drive<S>(svc: &mut S, count: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    for i in 0..count {
        let r = svc.ready().await.unwrap().call(i).await.unwrap();
        std::hint::black_box(r);
    }
}

/// ns per request through `svc`, median of `reps` runs of `iters` requests.
fn measure<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64, reps: usize) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        drive(&mut svc, 1000).await;
        let mut runs = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            drive(&mut svc, iters).await;
            runs.push(start.elapsed().as_nanos() as f64 / iters as f64);
        }
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    })
}

type Marina = Balance<ServiceList<Vec<Endpoint>>, u64>;

fn marina(n: usize, picker: impl Pick) -> Marina {
    Balance::new(
        ServiceList::new((0..n).map(|_| endpoint()).collect::<Vec<_>>()),
        picker,
    )
}

/// Heap allocations per request through `svc` (after a warm-up).
fn allocs<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(drive(&mut svc, 1000));
    let info = allocation_counter::measure(|| rt.block_on(drive(&mut svc, iters)));
    info.count_total as f64 / iters as f64
}

/// The marina configurations measured, by column name.
fn configs(n: usize) -> Vec<(&'static str, Marina)> {
    // Hints made up front: a route hint is built by the affinity layer, and its
    // allocation is not the balancer's.
    let hints: Vec<RouteHint> = (0..1024u64).map(RouteHint::hash).collect();
    vec![
        ("P2C", marina(n, PowerOfTwoChoices::with_seed(1))),
        ("round robin", marina(n, RoundRobin::new())),
        ("weighted RR", marina(n, WeightedRoundRobin::new())),
        ("least conn.", marina(n, LeastConnections::new())),
        ("least resp. time", marina(n, LeastResponseTime::new())),
        ("random", marina(n, Random::with_seed(1))),
        (
            "consistent hash",
            marina(n, ConsistentHash::new())
                .route_hint(move |req: &u64| Some(hints[(*req % 1024) as usize].clone())),
        ),
        (
            "RR + failover",
            marina(n, RoundRobin::new()).failover(Failover::new()),
        ),
        (
            "RR + failover (copy idem.)",
            marina(n, RoundRobin::new()).failover_copy_idempotent(Failover::new()),
        ),
    ]
}

fn tower_p2c(
    n: usize,
) -> tower::balance::p2c::Balance<
    ServiceList<Vec<PendingRequests<Endpoint, CompleteOnResponse>>>,
    u64,
> {
    tower::balance::p2c::Balance::new(ServiceList::new(
        (0..n)
            .map(|_| PendingRequests::new(endpoint(), CompleteOnResponse::default()))
            .collect::<Vec<_>>(),
    ))
}

fn main() {
    let marina_bench::RunLength { iters, reps } = marina_bench::RunLength::from_args(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let floor = measure(&rt, endpoint(), iters, reps);
    println!("balance bench: {iters} requests × {reps} reps (median), current-thread runtime");
    println!("direct call (floor): {floor:.1} ns/request");
    println!(
        "marina's response future: {} bytes\n",
        std::mem::size_of::<marina_balance::ResponseFuture<Endpoint, u64>>()
    );
    let names: Vec<&str> = configs(2).iter().map(|(name, _)| *name).collect();
    println!("ns of overhead per request (minus the floor):\n");
    println!(
        "| N | tower p2c | {} | P2C ÷ tower | RR ÷ tower |",
        names.join(" | ")
    );
    println!("|---:|---:|{}---:|---:|", "---:|".repeat(names.len()));
    for n in [2usize, 16, 256] {
        let t = measure(&rt, tower_p2c(n), iters, reps) - floor;
        let cells: Vec<f64> = configs(n)
            .into_iter()
            .map(|(_, lb)| measure(&rt, lb, iters, reps) - floor)
            .collect();
        let text: Vec<String> = cells.iter().map(|c| format!("{c:.1}")).collect();
        println!(
            "| {n} | {t:.1} | {} | {:.2} | {:.2} |",
            text.join(" | "),
            cells[0] / t,
            cells[1] / t
        );
    }
    let count = (iters / 10).max(1);
    println!("\nheap allocations per request ({count} requests):\n");
    println!("| N | tower p2c | {} |", names.join(" | "));
    println!("|---:|---:|{}", "---:|".repeat(names.len()));
    for n in [2usize, 16, 256] {
        let t = allocs(&rt, tower_p2c(n), count);
        let cells: Vec<String> = configs(n)
            .into_iter()
            .map(|(_, lb)| format!("{:.2}", allocs(&rt, lb, count)))
            .collect();
        println!("| {n} | {t:.2} | {} |", cells.join(" | "));
    }
}
