//! Heap allocations per request through `Balance`, counted with `allocation-counter`
//! (its counting allocator replaces the global one for this test binary only, and
//! counts the current thread's allocations).
//!
//! Endpoints are `service_fn`s that answer `Ok` at once; requests are
//! `marina_core::Request`s built before counting starts (their extensions are the
//! caller's allocations, not the balancer's), sent one at a time on a current-thread
//! runtime with paused time.
//!
//! - **Failover copying only idempotent requests** (`failover_copy_idempotent`, what
//!   the marina stack uses): no allocation per request that is not marked idempotent,
//!   with or without a route hint; a marked one is copied (and its failover state
//!   kept), so it allocates.
//! - **Failover copying every request** (`failover`): the copy is kept in a boxed
//!   failover state, one allocation per request.
//! - **No failover**: none.

use std::convert::Infallible;
use std::future::{Ready, ready};

use marina_balance::{Balance, Failover, RoundRobin};
use marina_core::{HasExtensions, Idempotent, Request, RouteHint};
use tower::discover::ServiceList;
use tower::util::ServiceFn;
use tower::{Service, ServiceExt, service_fn};

type Endpoint = ServiceFn<fn(Request<u64>) -> Ready<Result<u64, Infallible>>>;
type Lb = Balance<ServiceList<Vec<Endpoint>>, Request<u64>>;

fn answer(req: Request<u64>) -> Ready<Result<u64, Infallible>> {
    ready(Ok(req.body))
}

fn balance() -> Lb {
    let endpoints = (0..3)
        .map(|_| service_fn(answer as fn(Request<u64>) -> Ready<Result<u64, Infallible>>))
        .collect::<Vec<_>>();
    Balance::new(ServiceList::new(endpoints), RoundRobin::new())
}

/// `count` requests of bodies 0.., marked idempotent when `idempotent`, each with its
/// own route hint when `hinted`.
fn requests(count: u64, idempotent: bool, hinted: bool) -> Vec<Request<u64>> {
    (0..count)
        .map(|n| {
            let mut req = Request::new(n);
            if idempotent {
                Idempotent::mark(&mut req);
            }
            if hinted {
                req.extensions_mut().insert(RouteHint::any());
            }
            req
        })
        .collect()
}

/// Heap allocations per request sending `reqs` through `lb` (after 100 requests of
/// warm-up, so the balancer's own tables have grown), asserting every answer.
fn allocations_per_request(mut lb: Lb, idempotent: bool, hinted: bool) -> f64 {
    const COUNT: u64 = 1000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let warm_up = requests(100, idempotent, hinted);
    let reqs = requests(COUNT, idempotent, hinted);
    let send = |lb: &mut Lb, reqs: Vec<Request<u64>>| {
        rt.block_on(async {
            for req in reqs {
                let n = req.body;
                let reply = lb.ready().await.unwrap().call(req).await.unwrap();
                assert_eq!(reply, n);
            }
        })
    };
    send(&mut lb, warm_up);
    let info = allocation_counter::measure(|| send(&mut lb, reqs));
    let totals = lb.handle().totals();
    assert_eq!(totals.requests, 100 + COUNT);
    assert_eq!(totals.retries, 0);
    info.count_total as f64 / COUNT as f64
}

#[test]
fn copy_idempotent_failover_allocates_nothing_per_unmarked_request() {
    let lb = balance()
        .failover_copy_idempotent(Failover::new())
        .idempotent_from_extensions();
    assert_eq!(allocations_per_request(lb, false, false), 0.0);
}

#[test]
fn copy_idempotent_failover_with_route_hints_allocates_nothing_per_unmarked_request() {
    let lb = balance()
        .failover_copy_idempotent(Failover::new())
        .idempotent_from_extensions()
        .route_hints_from_extensions();
    assert_eq!(allocations_per_request(lb, false, true), 0.0);
}

#[test]
fn copy_idempotent_failover_allocates_for_marked_requests() {
    // Each is copied (its extensions too) and the copy kept in a boxed failover state.
    let lb = balance()
        .failover_copy_idempotent(Failover::new())
        .idempotent_from_extensions();
    assert!(allocations_per_request(lb, true, false) >= 1.0);
}

#[test]
fn copying_failover_allocates_once_per_request() {
    // The copy of a `Request<u64>` without extensions allocates nothing; the boxed
    // failover state that keeps it does.
    let lb = balance().failover(Failover::new());
    assert_eq!(allocations_per_request(lb, false, false), 1.0);
}

#[test]
fn no_failover_allocates_nothing_per_request() {
    assert_eq!(allocations_per_request(balance(), false, false), 0.0);
}
