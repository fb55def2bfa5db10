//! Per-request overhead of marina-balance's `Balance` beside tower's `p2c::Balance`.
//!
//! N = 2, 16, 256 always-ready in-memory endpoints (a `service_fn` that answers at
//! once). Each measurement drives `ready().await` then `call(req).await` in a loop on a
//! current-thread runtime; ns per request minus the direct-call floor (the same loop
//! over one endpoint, no balancer) is the balancer's overhead. tower's balancer gets
//! `PendingRequests` load, as its docs use; marina's counts in-flight requests itself.
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

use marina_balance::{Balance, LeastConnections, Pick, PowerOfTwoChoices, RoundRobin};
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

/// ns per request through `svc`, median of `reps` runs of `iters` requests.
fn measure<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64, reps: usize) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        for i in 0..1000 {
            svc.ready().await.unwrap().call(i).await.unwrap();
        }
        let mut runs = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            for i in 0..iters {
                let r = svc.ready().await.unwrap().call(i).await.unwrap();
                std::hint::black_box(r);
            }
            runs.push(start.elapsed().as_nanos() as f64 / iters as f64);
        }
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    })
}

fn marina(n: usize, picker: impl Pick) -> Balance<ServiceList<Vec<Endpoint>>, u64> {
    Balance::new(
        ServiceList::new((0..n).map(|_| endpoint()).collect::<Vec<_>>()),
        picker,
    )
}

fn main() {
    let marina_bench::RunLength { iters, reps } = marina_bench::RunLength::from_args(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let floor = measure(&rt, endpoint(), iters, reps);
    println!("balance bench: {iters} requests × {reps} reps (median), current-thread runtime");
    println!("direct call (floor): {floor:.1} ns/request\n");
    println!(
        "| N | tower p2c | marina P2C | marina round robin | marina least connections | marina P2C ÷ tower | marina RR ÷ tower |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in [2usize, 16, 256] {
        let tower_p2c = tower::balance::p2c::Balance::new(ServiceList::new(
            (0..n)
                .map(|_| PendingRequests::new(endpoint(), CompleteOnResponse::default()))
                .collect::<Vec<_>>(),
        ));
        let t = measure(&rt, tower_p2c, iters, reps) - floor;
        let p = measure(&rt, marina(n, PowerOfTwoChoices::with_seed(1)), iters, reps) - floor;
        let r = measure(&rt, marina(n, RoundRobin::new()), iters, reps) - floor;
        let l = measure(&rt, marina(n, LeastConnections::new()), iters, reps) - floor;
        println!(
            "| {n} | {t:.1} | {p:.1} | {r:.1} | {l:.1} | {:.2} | {:.2} |",
            p / t,
            r / t
        );
    }
}
