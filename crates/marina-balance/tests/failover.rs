//! Tests of `Balance`'s failover, retry budget, panic threshold, weights from
//! `Weighted<S>` services and balancer-wide totals.
//!
//! - **Failover** (`Balance::failover`): a request whose endpoint fails with an error
//!   marked `NotSent` goes to another endpoint — never one already tried for it, only a
//!   ready one — up to `max_attempts`; other errors only with `Failover::retry_if`;
//!   the caller gets the last error when every attempt fails; the peers follow
//!   discovery; dropping the response future mid-failover leaves nothing in flight.
//! - **Retry budget** (`RetryBudget`): alone (ratio and floor over the window) and
//!   through the balancer (`retries_refused`, refilled once the window has passed).
//! - **Panic threshold**: real `marina_health::Health` around the mocks, joined to one
//!   `EjectionGate`: below the threshold the gate opens and ejected endpoints take
//!   requests again; above it (or with the threshold at 0) they do not; panic ends with
//!   the ejections.
//! - **Weights** from `Weighted<S>` services with `WeightedRoundRobin`, and
//!   `BalanceHandle::totals` against `BalanceHandle::stats`.
//!
//! Endpoints are `tower_test` mocks (readiness set with `Handle::allow`) in a
//! `tower::discover::ServiceList`, keyed by position; where a test must choose the
//! endpoint of a first attempt, the `Target` picker aims it. Time is paused; timers
//! (health ejections, the retry budget's window) move only with `tokio::time::advance`.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_balance::{
    Balance, BalanceHandle, ChangeStream, EndpointSnapshot, Endpoints, Failover, Pick, RetryBudget,
    RoundRobin, Weighted, WeightedRoundRobin,
};
use marina_core::{BoxError, EjectionGate, EndpointId, NotSent, RouteHint, find, is_not_sent};
#[path = "support/coop.rs"]
mod coop;
use coop::{Budgeted, spend_budget};
use marina_health::{Health, HealthConfig, HealthHandle, Status};
use tokio_test::task::{Spawn, spawn};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::Service;
use tower::discover::{Change, ServiceList};
use tower_test::mock::{self, SendResponse};

type Mock = mock::Mock<u32, u32>;
type Handle = mock::Handle<u32, u32>;
type ListBalance<S> = Balance<ServiceList<Vec<S>>, u32>;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `n` mock endpoints (ready by default) and their handles.
fn mocks(n: usize) -> (Vec<Mock>, Vec<Handle>) {
    (0..n).map(|_| mock::pair()).unzip()
}

/// A balancer over `n` mocks with failover `policy`, choosing with `picker`.
fn failover_balance(
    n: usize,
    picker: impl Pick,
    policy: Failover,
) -> (ListBalance<Mock>, Vec<Handle>) {
    let (svcs, handles) = mocks(n);
    let lb = Balance::new(ServiceList::new(svcs), picker).failover(policy);
    (lb, handles)
}

/// Polls `svc.poll_ready` once from `task`'s context.
fn poll_ready<S: Service<u32>>(task: &mut Spawn<()>, svc: &mut S) -> Poll<Result<(), S::Error>> {
    task.enter(|cx: &mut Context<'_>, _| svc.poll_ready(cx))
}

/// The one handle that has received a request: its index, the request and its responder.
/// Panics unless exactly one handle has one waiting.
fn take_request(handles: &mut [Handle]) -> (usize, u32, SendResponse<u32>) {
    let mut got = None;
    for (i, h) in handles.iter_mut().enumerate() {
        if let Poll::Ready(Some((req, tx))) = h.poll_request() {
            assert!(
                got.is_none(),
                "more than one endpoint received a request (also endpoint {i})"
            );
            got = Some((i, req, tx));
        }
    }
    got.expect("no endpoint received a request")
}

/// True if `handle` has a request waiting (a closed channel, the mock dropped, is not).
fn has_request(handle: &mut Handle) -> bool {
    matches!(handle.poll_request(), Poll::Ready(Some(_)))
}

/// Asserts that no handle has a request waiting.
fn assert_no_request(handles: &mut [Handle]) {
    for (i, h) in handles.iter_mut().enumerate() {
        assert!(
            !has_request(h),
            "endpoint {i} received an unexpected request"
        );
    }
}

/// The key text of a `ServiceList` endpoint (its index, `Debug`-formatted).
fn list_key(i: usize) -> String {
    format!("{i:?}")
}

/// The snapshot of the `ServiceList` endpoint at index `i`.
fn snap(handle: &BalanceHandle, i: usize) -> EndpointSnapshot {
    let key = list_key(i);
    handle
        .stats()
        .into_iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("no endpoint {key:?} in {:?}", handle.stats()))
}

/// A "connect refused" from endpoint `i`, marked as never sent.
fn refused(i: usize) -> NotSent {
    NotSent::new(format!("endpoint {i} refused the connection"))
}

/// The text of the error `NotSent` wraps in `err` (panics if none does).
fn not_sent_text(err: &BoxError) -> String {
    find::<NotSent>(&**err)
        .unwrap_or_else(|| panic!("not a NotSent error: {err}"))
        .inner()
        .to_string()
}

/// A response future of a balancer over mocks, polled by hand (so failover attempts
/// move only when the test polls).
type Call = Spawn<marina_balance::ResponseFuture<Mock, u32>>;

/// Polls the balancer ready and calls it with `req`.
fn start(task: &mut Spawn<()>, lb: &mut ListBalance<Mock>, req: u32) -> Call {
    assert_ready_ok!(poll_ready(task, lb));
    spawn(lb.call(req))
}

/// One full request answered by the endpoint that receives it with `req + 1000 *
/// index`; returns that index. (Futures here are polled by hand, never awaited: with
/// time paused and no timer, a future that never completes would hang the test.)
fn round_trip<S>(task: &mut Spawn<()>, lb: &mut S, handles: &mut [Handle], req: u32) -> usize
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    assert_ready_ok!(poll_ready(task, lb));
    let mut fut = spawn(lb.call(req));
    let (i, got, tx) = take_request(handles);
    assert_eq!(got, req);
    tx.send_response(req + 1000 * i as u32);
    assert_eq!(assert_ready_ok!(fut.poll()), req + 1000 * i as u32);
    i
}

/// The request waiting at `handle` (panics if none is).
fn next_request(handle: &mut Handle) -> (u32, SendResponse<u32>) {
    match handle.poll_request() {
        Poll::Ready(Some(r)) => r,
        _ => panic!("no request waiting"),
    }
}

/// A picker that chooses the ready endpoint last given to [`aim`](Self::aim) (and panics
/// if that endpoint is not ready), so tests decide where each first attempt goes; or,
/// after [`in_turn`](Self::in_turn) (and at first), each ready endpoint in turn, to show
/// which endpoints the balancer offers. Clones share the aim.
#[derive(Clone)]
struct Target {
    aim: Arc<AtomicU64>,
    next: usize,
}

/// `Target::aim` value: no aim, pick in turn.
const IN_TURN: u64 = u64::MAX;

impl Target {
    fn new() -> Self {
        Target {
            aim: Arc::new(AtomicU64::new(IN_TURN)),
            next: 0,
        }
    }

    /// The next picks choose the endpoint with the key text `key`.
    fn aim_key(&self, key: &str) {
        self.aim.store(EndpointId::of(key).0, Ordering::Relaxed);
    }

    /// The next picks choose `ServiceList` endpoint `i`.
    fn aim(&self, i: usize) {
        self.aim_key(&list_key(i));
    }

    /// The next picks choose each ready endpoint in turn.
    fn in_turn(&self) {
        self.aim.store(IN_TURN, Ordering::Relaxed);
    }
}

impl Pick for Target {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let aim = self.aim.load(Ordering::Relaxed);
        if aim == IN_TURN {
            let i = self.next % endpoints.len();
            self.next = i + 1;
            return i;
        }
        let want = EndpointId(aim);
        (0..endpoints.len())
            .find(|&i| endpoints.id(i) == want)
            .unwrap_or_else(|| panic!("the target endpoint {want:?} is not ready"))
    }
}

// ---------------------------------------------------------------------------------------
// 1. Failover to a different endpoint
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn not_sent_error_fails_over_to_another_endpoint() {
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), Failover::new());
    let h = lb.handle();
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 7);
    let (first, req, tx) = take_request(&mut handles);
    assert_eq!(req, 7);
    assert_pending!(fut.poll());

    tx.send_error(refused(first));
    assert!(fut.is_woken());
    assert_pending!(fut.poll(), "the second attempt waits for its answer");
    let (second, req, tx) = take_request(&mut handles);
    assert_ne!(second, first, "failed over to the endpoint that refused");
    assert_eq!(req, 7, "the same request is sent again");
    assert_eq!(h.totals().in_flight, 1);
    assert_eq!(snap(&h, second).in_flight, 1);

    tx.send_response(70);
    assert_eq!(assert_ready_ok!(fut.poll()), 70);
    assert_no_request(&mut handles);

    let totals = h.totals();
    assert_eq!(totals.retries, 1);
    assert_eq!(totals.retries_refused, 0);
    assert_eq!(totals.requests, 2, "both attempts count as requests");
    assert_eq!(totals.errors, 1);
    assert_eq!(totals.in_flight, 0);
    let failed = snap(&h, first);
    assert_eq!((failed.requests, failed.errors), (1, 1));
    assert_eq!(failed.error_rate, 1.0);
    let answered = snap(&h, second);
    assert_eq!((answered.requests, answered.errors), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn not_sent_anywhere_in_the_error_chain_fails_over() {
    /// A wrapper (as a pool or a connector might add) whose source is the `NotSent`.
    #[derive(Debug)]
    struct Wrapped(NotSent);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("checkout failed")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    let (mut lb, mut handles) = failover_balance(2, RoundRobin::new(), Failover::new());
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 1);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(Wrapped(refused(first)));
    assert_pending!(fut.poll());
    let (second, _, tx) = take_request(&mut handles);
    assert_ne!(second, first);
    tx.send_response(2);
    assert_eq!(assert_ready_ok!(fut.poll()), 2);
    assert_eq!(lb.handle().totals().retries, 1);
}

// ---------------------------------------------------------------------------------------
// 2. Which errors are retried
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn plain_errors_are_not_retried_by_default() {
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), Failover::new());
    let h = lb.handle();
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 1);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "reset mid-reply",
    ));
    let err = assert_ready!(fut.poll()).expect_err("the error reaches the caller");
    assert!(!is_not_sent(&*err));
    assert_eq!(
        find::<io::Error>(&*err).map(io::Error::kind),
        Some(io::ErrorKind::ConnectionReset)
    );
    assert_no_request(&mut handles);
    let totals = h.totals();
    assert_eq!((totals.retries, totals.retries_refused), (0, 0));
    assert_eq!((totals.requests, totals.errors), (1, 1));
    assert_eq!(snap(&h, first).errors, 1);
}

#[tokio::test(start_paused = true)]
async fn retry_if_accepts_any_error() {
    let policy = Failover::new().retry_if(|_| true);
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), policy);
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 5);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
    assert_pending!(fut.poll());
    let (second, req, tx) = take_request(&mut handles);
    assert_ne!(second, first);
    assert_eq!(req, 5);
    tx.send_response(50);
    assert_eq!(assert_ready_ok!(fut.poll()), 50);
    assert_eq!(lb.handle().totals().retries, 1);
}

#[tokio::test(start_paused = true)]
async fn retry_if_replaces_the_not_sent_rule() {
    // Only connection resets are retried: a NotSent error no longer is.
    let policy = Failover::new().retry_if(|e: &BoxError| {
        find::<io::Error>(&**e).is_some_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
    });
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), policy);
    let h = lb.handle();
    let mut task = spawn(());

    let mut fut = start(&mut task, &mut lb, 1);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
    assert_pending!(fut.poll());
    let (second, _, tx) = take_request(&mut handles);
    assert_ne!(second, first);
    tx.send_response(1);
    assert_eq!(assert_ready_ok!(fut.poll()), 1);
    assert_eq!(h.totals().retries, 1);

    let mut fut = start(&mut task, &mut lb, 2);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(refused(first));
    let err = assert_ready!(fut.poll()).expect_err("not retried");
    assert!(is_not_sent(&*err));
    assert_no_request(&mut handles);
    assert_eq!(h.totals().retries, 1);
}

// ---------------------------------------------------------------------------------------
// 3. max_attempts
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn max_attempts_bounds_the_endpoints_tried() {
    let policy = Failover::new().max_attempts(2);
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), policy);
    let h = lb.handle();
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 9);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(refused(first));
    assert_pending!(fut.poll());
    let (second, req, tx) = take_request(&mut handles);
    assert_ne!(second, first);
    assert_eq!(req, 9);
    tx.send_error(refused(second));
    let err = assert_ready!(fut.poll()).expect_err("every attempt failed");
    assert!(is_not_sent(&*err));
    assert_eq!(
        not_sent_text(&err),
        format!("endpoint {second} refused the connection"),
        "the caller gets the last attempt's error"
    );
    // The third endpoint never saw the request.
    assert_no_request(&mut handles);
    let third = (0..3).find(|&i| i != first && i != second).unwrap();
    assert_eq!(snap(&h, third).requests, 0);
    let totals = h.totals();
    assert_eq!(totals.retries, 1);
    assert_eq!(
        (totals.requests, totals.errors, totals.in_flight),
        (2, 2, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn max_attempts_one_never_retries() {
    // 0 counts as 1: no retry either.
    for attempts in [1, 0] {
        let policy = Failover::new().max_attempts(attempts);
        let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), policy);
        let mut task = spawn(());
        let mut fut = start(&mut task, &mut lb, 1);
        let (first, _, tx) = take_request(&mut handles);
        tx.send_error(refused(first));
        let err = assert_ready!(fut.poll()).expect_err("no second attempt");
        assert_eq!(
            not_sent_text(&err),
            format!("endpoint {first} refused the connection")
        );
        assert_no_request(&mut handles);
        let totals = lb.handle().totals();
        assert_eq!((totals.retries, totals.retries_refused), (0, 0));
        assert_eq!(totals.requests, 1);
    }
}

// ---------------------------------------------------------------------------------------
// 4. Never the same endpoint twice
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn no_endpoint_is_tried_twice_for_one_request() {
    let policy = Failover::new().max_attempts(5);
    let (mut lb, mut handles) = failover_balance(2, RoundRobin::new(), policy);
    let h = lb.handle();
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 3);
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(refused(first));
    assert_pending!(fut.poll());
    let (second, _, tx) = take_request(&mut handles);
    assert_ne!(second, first);
    tx.send_error(refused(second));
    let err = assert_ready!(fut.poll()).expect_err("both endpoints refused");
    assert_eq!(
        not_sent_text(&err),
        format!("endpoint {second} refused the connection")
    );
    assert_no_request(&mut handles);
    assert_eq!(snap(&h, 0).requests, 1);
    assert_eq!(snap(&h, 1).requests, 1);
    assert_eq!(h.totals().retries, 1);
}

// ---------------------------------------------------------------------------------------
// 5. Retry budget
// ---------------------------------------------------------------------------------------

#[test]
fn retry_budget_allows_its_ratio_of_requests() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
    assert!(!budget.withdraw(), "no requests yet, no floor: no retry");
    for _ in 0..10 {
        budget.deposit();
    }
    assert!(budget.withdraw());
    assert!(budget.withdraw());
    assert!(!budget.withdraw(), "20% of 10 requests is 2 retries");
    // Clones share one budget.
    let clone = budget.clone();
    for _ in 0..5 {
        clone.deposit();
    }
    assert!(budget.withdraw());
    assert!(!clone.withdraw(), "20% of 15 requests is 3 retries");
}

#[tokio::test(start_paused = true)]
async fn retry_budget_floor_refills_after_its_window() {
    let budget = RetryBudget::new(Duration::from_secs(2), 1, 0.0);
    assert!(budget.withdraw());
    assert!(budget.withdraw());
    assert!(!budget.withdraw(), "1 per second over 2 seconds");
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(
        budget.withdraw(),
        "the window has passed: the floor is back"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_budget_counts_requests_made_after_an_idle_window() {
    // 20% of the requests of the last 10 s, no floor.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
    for _ in 0..10 {
        budget.deposit();
    }
    assert!(budget.withdraw());
    assert!(budget.withdraw());
    assert!(!budget.withdraw());
    // Quiet for longer than the window: the old requests and retries expire...
    tokio::time::advance(Duration::from_secs(11)).await;
    // ...and 10 new requests allow 2 retries again.
    for _ in 0..10 {
        budget.deposit();
    }
    assert!(
        budget.withdraw(),
        "10 requests in the last second, yet no retry allowed"
    );
    assert!(budget.withdraw());
    assert!(!budget.withdraw());
}

/// Sends one request that the first endpoint refuses (NotSent); answers a failover
/// attempt, if one is made, with `req`. Returns whether it failed over.
fn refused_request(
    task: &mut Spawn<()>,
    lb: &mut ListBalance<Mock>,
    handles: &mut [Handle],
    req: u32,
) -> bool {
    let mut fut = start(task, lb, req);
    let (first, _, tx) = take_request(handles);
    tx.send_error(refused(first));
    match fut.poll() {
        Poll::Ready(Err(err)) => {
            assert!(is_not_sent(&*err));
            assert_no_request(handles);
            false
        }
        Poll::Ready(Ok(v)) => panic!("answered {v} without a second attempt"),
        Poll::Pending => {
            let (second, got, tx) = take_request(handles);
            assert_ne!(second, first);
            assert_eq!(got, req);
            tx.send_response(req);
            assert_eq!(assert_ready_ok!(fut.poll()), req);
            true
        }
    }
}

#[tokio::test(start_paused = true)]
async fn budget_refuses_retries_until_its_window_passes() {
    // One retry per second over a one-second window, no share of requests.
    let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
    let policy = Failover::new().budget(budget);
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), policy);
    let h = lb.handle();
    let mut task = spawn(());

    assert!(refused_request(&mut task, &mut lb, &mut handles, 1));
    assert_eq!((h.totals().retries, h.totals().retries_refused), (1, 0));

    assert!(
        !refused_request(&mut task, &mut lb, &mut handles, 2),
        "the budget is spent: not retried"
    );
    assert_eq!((h.totals().retries, h.totals().retries_refused), (1, 1));

    // A request that succeeds at once draws nothing from the budget.
    let i = round_trip(&mut task, &mut lb, &mut handles, 3);
    assert!(i < 3);
    assert_eq!((h.totals().retries, h.totals().retries_refused), (1, 1));

    // Past the window (the budget reads the clock when asked for a retry, and moves
    // its window by whole seconds): allowed again.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(refused_request(&mut task, &mut lb, &mut handles, 4));
    assert_eq!((h.totals().retries, h.totals().retries_refused), (2, 1));
    assert!(!refused_request(&mut task, &mut lb, &mut handles, 5));
    assert_eq!((h.totals().retries, h.totals().retries_refused), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn balancers_sharing_a_budget_share_its_retries() {
    let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
    let (mut a, mut ha) =
        failover_balance(2, RoundRobin::new(), Failover::new().budget(budget.clone()));
    let (mut b, mut hb) = failover_balance(2, RoundRobin::new(), Failover::new().budget(budget));
    let mut task = spawn(());
    assert!(refused_request(&mut task, &mut a, &mut ha, 1));
    assert!(
        !refused_request(&mut task, &mut b, &mut hb, 2),
        "the other balancer spent the shared budget"
    );
    assert_eq!(b.handle().totals().retries_refused, 1);
    assert_eq!(a.handle().totals().retries_refused, 0);
}

// ---------------------------------------------------------------------------------------
// 6. Failover goes to ready endpoints only
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn failover_skips_pending_endpoints() {
    // Endpoint 1 is pending (and idle: the least loaded, were it considered); endpoint 2
    // is busy with one request. The retry must go to 2.
    let target = Target::new();
    let (mut lb, mut handles) = failover_balance(3, target.clone(), Failover::new());
    handles[1].allow(0);
    let h = lb.handle();
    let mut task = spawn(());

    target.aim(2);
    let _busy = start(&mut task, &mut lb, 100);
    let (i, _, busy_tx) = take_request(&mut handles);
    assert_eq!(i, 2);
    assert!(!snap(&h, 1).ready);

    target.aim(0);
    let mut fut = start(&mut task, &mut lb, 1);
    let (i, _, tx) = take_request(&mut handles);
    assert_eq!(i, 0);
    tx.send_error(refused(0));
    assert_pending!(fut.poll());
    let (i, req, tx) = take_request(&mut handles);
    assert_eq!(i, 2, "failed over to a pending endpoint");
    assert_eq!(req, 1);
    tx.send_response(11);
    assert_eq!(assert_ready_ok!(fut.poll()), 11);
    assert_eq!(snap(&h, 1).requests, 0);
    drop(busy_tx);
}

#[tokio::test(start_paused = true)]
async fn failover_picks_the_least_loaded_untried_endpoint() {
    let target = Target::new();
    let (mut lb, mut handles) = failover_balance(3, target.clone(), Failover::new());
    let mut task = spawn(());
    // Endpoint 0 holds two requests, endpoint 2 none.
    target.aim(0);
    let mut held = Vec::new();
    for req in 0..2 {
        let fut = start(&mut task, &mut lb, req);
        held.push((fut, take_request(&mut handles)));
    }
    target.aim(1);
    let mut fut = start(&mut task, &mut lb, 9);
    let (i, _, tx) = take_request(&mut handles);
    assert_eq!(i, 1);
    tx.send_error(refused(1));
    assert_pending!(fut.poll());
    let (i, _, tx) = take_request(&mut handles);
    assert_eq!(i, 2, "not the least loaded endpoint");
    tx.send_response(0);
    assert_ready_ok!(fut.poll());
}

#[tokio::test(start_paused = true)]
async fn failover_waits_for_the_only_other_endpoint_to_be_ready() {
    let target = Target::new();
    let (mut lb, mut handles) = failover_balance(2, target.clone(), Failover::new());
    let mut task = spawn(());
    target.aim(0);
    let mut fut = start(&mut task, &mut lb, 4);
    let (_, _, tx) = take_request(&mut handles);
    // Endpoint 1 was ready when the balancer last looked, and is full now.
    handles[1].allow(0);
    tx.send_error(refused(0));
    assert_pending!(fut.poll());
    assert_no_request(&mut handles);
    handles[1].allow(1);
    assert!(fut.is_woken(), "not woken when the endpoint became ready");
    assert_pending!(fut.poll());
    let (i, req, tx) = take_request(&mut handles);
    assert_eq!((i, req), (1, 4));
    tx.send_response(44);
    assert_eq!(assert_ready_ok!(fut.poll()), 44);
}

#[tokio::test(start_paused = true)]
async fn failover_does_not_wait_on_an_endpoint_ejected_since_the_last_look() {
    // Health-checked endpoints: one failure ejects for 30 s.
    let target = Target::new();
    let config = HealthConfig {
        consecutive_failures: 1,
        failure_rate: None,
        ..HealthConfig::default()
    };
    let (svcs, mut handles) = mocks(3);
    let svcs: Vec<_> = svcs
        .into_iter()
        .map(|m| Health::builder(m).config(config.clone()).build())
        .collect();
    let health: Vec<HealthHandle> = svcs.iter().map(Health::handle).collect();
    let mut lb = Balance::new(ServiceList::new(svcs), target.clone()).failover(Failover::new());
    let mut task = spawn(());

    // Endpoint 2 busy with one request; endpoint 0 with another, which will fail.
    target.aim(2);
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let _busy = lb.call(100);
    let (_, _, busy_tx) = take_request(&mut handles);
    target.aim(0);
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let mut doomed = spawn(lb.call(101));
    let (_, _, doomed_tx) = take_request(&mut handles);
    // The balancer looks at endpoint 0 (still healthy) and sends the next request to 1.
    target.aim(1);
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let mut fut = spawn(lb.call(1));
    let (i, _, tx) = take_request(&mut handles);
    assert_eq!(i, 1);
    // Endpoint 0's request fails (not retried: a plain error): ejected.
    doomed_tx.send_error(io::Error::other("boom"));
    assert!(assert_ready!(doomed.poll()).is_err());
    assert!(matches!(health[0].status(), Status::Ejected { .. }));
    // Endpoint 1 refuses: endpoint 2 is the only ready one left. (Observed instead: the
    // failover picks endpoint 0, idle and still flagged ready, waits the 30 s of its
    // ejection, then sends the request there as its half-open trial.)
    tx.send_error(refused(1));
    assert_pending!(fut.poll());
    let Poll::Ready(Some((req, tx))) = handles[2].poll_request() else {
        panic!("the retry waits on ejected endpoint 0 instead of going to ready endpoint 2");
    };
    assert_eq!(req, 1);
    tx.send_response(12);
    assert_eq!(assert_ready_ok!(fut.poll()), 12);
    drop(busy_tx);
}

// ---------------------------------------------------------------------------------------
// Failover peers follow discovery
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn failover_peers_follow_discovery() {
    let (tx, changes) = ChangeStream::<&'static str, Mock>::channel();
    let target = Target::new();
    let mut lb = Balance::new(changes, target.clone()).failover(Failover::new());
    let h = lb.handle();
    let (a, mut ha) = mock::pair::<u32, u32>();
    let (b, mut hb) = mock::pair::<u32, u32>();
    let (c, mut hc) = mock::pair::<u32, u32>();
    tx.send(Change::Insert("a", a)).unwrap();
    tx.send(Change::Insert("b", b)).unwrap();
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert_eq!(h.totals().endpoints, 2);

    // "b" leaves and "c" arrives; a request refused by "a" goes to "c", never "b" (the
    // idle peer that came first).
    tx.send(Change::Remove("b")).unwrap();
    tx.send(Change::Insert("c", c)).unwrap();
    target.aim_key(&format!("{:?}", "a"));
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert_eq!(h.totals().endpoints, 2);
    let mut fut = spawn(lb.call(1));
    let (req, a_tx) = next_request(&mut ha);
    assert_eq!(req, 1);
    a_tx.send_error(refused(0));
    assert_pending!(fut.poll());
    assert!(!has_request(&mut hb), "failed over to a removed endpoint");
    let (req, c_tx) = next_request(&mut hc);
    assert_eq!(req, 1);
    c_tx.send_response(3);
    assert_eq!(assert_ready_ok!(fut.poll()), 3);
    assert_eq!(h.totals().retries, 1);
}

// ---------------------------------------------------------------------------------------
// 7. Cancel safety
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn dropping_during_the_failover_attempt_leaves_nothing_in_flight() {
    let (mut lb, mut handles) = failover_balance(3, RoundRobin::new(), Failover::new());
    let h = lb.handle();
    let mut task = spawn(());
    let mut fut = start(&mut task, &mut lb, 1);
    let (first, _, tx) = take_request(&mut handles);
    assert_eq!(h.totals().in_flight, 1);
    tx.send_error(refused(first));
    assert_pending!(fut.poll());
    let (second, _, second_tx) = take_request(&mut handles);
    assert_eq!(h.totals().in_flight, 1);
    assert_eq!(snap(&h, second).in_flight, 1);

    drop(fut);
    let totals = h.totals();
    assert_eq!(totals.in_flight, 0);
    assert_eq!(totals.requests, 2);
    assert_eq!(snap(&h, second).in_flight, 0);
    assert_eq!(
        snap(&h, second).errors,
        0,
        "a cancelled attempt is no error"
    );
    // The endpoint's answer, too late, goes nowhere.
    second_tx.send_response(0);
    assert_eq!(h.totals().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_while_the_failover_endpoint_is_readied_abandons_the_attempt() {
    let target = Target::new();
    let (mut lb, mut handles) = failover_balance(2, target.clone(), Failover::new());
    let h = lb.handle();
    let mut task = spawn(());
    target.aim(0);
    let mut fut = start(&mut task, &mut lb, 1);
    let (_, _, tx) = take_request(&mut handles);
    handles[1].allow(0);
    tx.send_error(refused(0));
    assert_pending!(fut.poll(), "waits for endpoint 1 to be ready");
    assert_eq!(h.totals().retries, 1);
    assert_eq!(h.totals().in_flight, 0);

    drop(fut);
    assert_eq!(h.totals().in_flight, 0);
    // Endpoint 1 turns ready: the abandoned attempt is not sent.
    handles[1].allow(1);
    assert_no_request(&mut handles);
    assert_eq!(h.totals().requests, 1);

    // The balancer still serves.
    target.aim(1);
    let mut fut = start(&mut task, &mut lb, 2);
    let (i, _, tx) = take_request(&mut handles);
    assert_eq!(i, 1);
    tx.send_response(2);
    assert_eq!(assert_ready_ok!(fut.poll()), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_first_attempt_leaves_nothing_in_flight() {
    let (mut lb, mut handles) = failover_balance(2, RoundRobin::new(), Failover::new());
    let h = lb.handle();
    let mut task = spawn(());
    let fut = start(&mut task, &mut lb, 1);
    let (_, _, tx) = take_request(&mut handles);
    assert_eq!(h.totals().in_flight, 1);
    drop(fut);
    assert_eq!(h.totals().in_flight, 0);
    // A refusal after the caller left is not failed over.
    tx.send_error(refused(0));
    assert_no_request(&mut handles);
    assert_eq!(h.totals().retries, 0);
}

// ---------------------------------------------------------------------------------------
// 8. Panic threshold, with marina-health
// ---------------------------------------------------------------------------------------

/// `n` mocks behind `Health` (one failure ejects, for `base_ejection` = 30 s), joined to
/// `gate`, in a balancer choosing with a `Target`.
struct HealthSetup {
    lb: ListBalance<Health<Mock>>,
    handles: Vec<Handle>,
    health: Vec<HealthHandle>,
    target: Target,
    task: Spawn<()>,
}

const EJECTION: Duration = Duration::from_secs(30);

fn health_setup(n: usize, gate: &EjectionGate, panic_threshold: Option<f64>) -> HealthSetup {
    let config = HealthConfig {
        consecutive_failures: 1,
        failure_rate: None,
        base_ejection: EJECTION,
        ..HealthConfig::default()
    };
    let (svcs, handles) = mocks(n);
    let svcs: Vec<Health<Mock>> = svcs
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            Health::builder(m)
                .name(format!("e{i}"))
                .config(config.clone())
                .ejection_gate(gate.clone())
                .build()
        })
        .collect();
    let health = svcs.iter().map(Health::handle).collect();
    let target = Target::new();
    let mut lb = Balance::new(ServiceList::new(svcs), target.clone()).ejection_gate(gate.clone());
    if let Some(t) = panic_threshold {
        lb = lb.panic_threshold(t);
    }
    HealthSetup {
        lb,
        handles,
        health,
        target,
        task: spawn(()),
    }
}

impl HealthSetup {
    /// Sends a request to endpoint `i` and answers it (`Ok(req)`, or an error when
    /// `fail`).
    fn request(&mut self, i: usize, req: u32, fail: bool) {
        self.target.aim(i);
        assert_ready_ok!(poll_ready(&mut self.task, &mut self.lb));
        let mut fut = spawn(self.lb.call(req));
        let (got, r, tx) = take_request(&mut self.handles);
        assert_eq!((got, r), (i, req), "the request went to the wrong endpoint");
        if fail {
            tx.send_error(io::Error::other("boom"));
            assert!(assert_ready!(fut.poll()).is_err());
        } else {
            tx.send_response(req);
            assert_eq!(assert_ready_ok!(fut.poll()), req);
        }
    }

    /// Fails one request on endpoint `i`: ejected.
    fn eject(&mut self, i: usize) {
        self.request(i, 1000 + i as u32, true);
        assert!(
            matches!(self.health[i].status(), Status::Ejected { until: Some(_) }),
            "endpoint {i} not ejected: {:?}",
            self.health[i].status()
        );
    }

    fn poll_ready(&mut self) -> Poll<Result<(), BoxError>> {
        poll_ready(&mut self.task, &mut self.lb)
    }

    /// Whether each endpoint is ready, by index.
    fn ready(&self) -> Vec<bool> {
        let h = self.lb.handle();
        (0..self.handles.len()).map(|i| snap(&h, i).ready).collect()
    }
}

#[tokio::test(start_paused = true)]
async fn panic_below_threshold_routes_to_ejected_endpoints_until_they_return() {
    let gate = EjectionGate::new();
    let mut s = health_setup(4, &gate, None);
    let h = s.lb.handle();
    assert_ready_ok!(s.poll_ready());
    assert_eq!(gate.counts(), (4, 0));

    // Half ejected: 50% healthy is not below the default threshold (0.5).
    s.eject(0);
    s.eject(1);
    assert_ready_ok!(s.poll_ready());
    assert_eq!(gate.counts(), (4, 2));
    assert!(!h.totals().panicking);
    assert!(!gate.is_open());
    assert_eq!(s.ready(), [false, false, true, true]);

    // Three of four: panic.
    s.eject(2);
    assert_ready_ok!(s.poll_ready());
    assert_eq!(gate.counts(), (4, 3));
    let totals = h.totals();
    assert!(totals.panicking, "not panicking at 25% healthy");
    assert!(gate.is_open());
    assert_eq!((totals.ready, totals.pending), (4, 0));
    assert_eq!(s.ready(), [true; 4]);
    // The ejected endpoints take requests again: in turn, every endpoint gets its share.
    s.target.in_turn();
    let mut seen = [0; 4];
    for req in 0..8 {
        seen[round_trip(&mut s.task, &mut s.lb, &mut s.handles, req)] += 1;
    }
    assert_eq!(seen, [2; 4]);
    // Answered, but still ejected (a late answer does not end an ejection).
    assert!(matches!(s.health[0].status(), Status::Ejected { .. }));
    assert_eq!(snap(&h, 0).requests, 3);

    // The ejections end (their timers run at `EJECTION`): half-open, not ejected.
    tokio::time::advance(EJECTION + Duration::from_secs(1)).await;
    for _ in 0..10 {
        if gate.counts().1 == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(gate.counts(), (4, 0), "the ejections did not end");
    assert_ready_ok!(s.poll_ready());
    assert!(
        !h.totals().panicking,
        "still panicking with every endpoint back"
    );
    assert!(!gate.is_open());
    // Each half-open endpoint's trial succeeds: healthy again.
    for i in 0..3 {
        assert_eq!(s.health[i].status(), Status::Degraded);
        s.request(i, 20 + i as u32, false);
        assert_eq!(s.health[i].status(), Status::Healthy);
    }
    assert_ready_ok!(s.poll_ready());
    assert_eq!(s.ready(), [true; 4]);
    assert!(!h.totals().panicking);
}

#[tokio::test(start_paused = true)]
async fn panic_ends_when_an_endpoint_recovers_above_the_threshold() {
    // Panic at 1 of 4 healthy; one ejection ending (2 of 4) is enough to end it.
    let gate = EjectionGate::new();
    let mut s = health_setup(4, &gate, None);
    let h = s.lb.handle();
    assert_ready_ok!(s.poll_ready());
    s.eject(0);
    // Later ejections: endpoint 0's ends first.
    tokio::time::advance(Duration::from_secs(10)).await;
    s.eject(1);
    s.eject(2);
    assert_ready_ok!(s.poll_ready());
    assert!(h.totals().panicking);

    tokio::time::advance(Duration::from_secs(21)).await;
    for _ in 0..10 {
        if gate.counts().1 == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(gate.counts(), (4, 2));
    assert_ready_ok!(s.poll_ready());
    assert!(!h.totals().panicking);
    assert!(!gate.is_open());
    // Endpoints 1 and 2, still ejected, get no request: each leaves the ready set when
    // it is polled, before a request would go to it or in turn after one (issue #21:
    // the balancer no longer re-polls every ready endpoint when the gate moves).
    s.target.in_turn();
    for req in 0..8 {
        let i = round_trip(&mut s.task, &mut s.lb, &mut s.handles, req);
        assert!(
            i == 0 || i == 3,
            "request {req} went to ejected endpoint {i}"
        );
    }
    assert_eq!(s.ready(), [true, false, false, true]);
    for _ in 0..4 {
        for i in [0, 3] {
            s.request(i, 1, false);
        }
    }
    assert_eq!(snap(&h, 1).requests, 1);
    assert_eq!(snap(&h, 2).requests, 1);
}

#[tokio::test(start_paused = true)]
async fn no_panic_above_threshold_and_ejected_endpoint_gets_nothing() {
    let gate = EjectionGate::new();
    let mut s = health_setup(4, &gate, None);
    let h = s.lb.handle();
    assert_ready_ok!(s.poll_ready());
    s.eject(3);
    // 75% healthy: no panic; in turn over what the balancer offers, never endpoint 3.
    s.target.in_turn();
    let mut seen = [0; 4];
    for req in 0..12 {
        seen[round_trip(&mut s.task, &mut s.lb, &mut s.handles, req)] += 1;
    }
    assert_eq!(seen, [4, 4, 4, 0]);
    let totals = h.totals();
    assert!(!totals.panicking);
    assert!(!gate.is_open());
    assert_eq!((totals.ready, totals.pending), (3, 1));
    assert_eq!(s.ready(), [true, true, true, false]);
    assert_eq!(snap(&h, 3).requests, 1, "only the request that ejected it");
}

#[tokio::test(start_paused = true)]
async fn panic_threshold_zero_disables_panic() {
    let gate = EjectionGate::new();
    let mut s = health_setup(4, &gate, Some(0.0));
    let h = s.lb.handle();
    assert_ready_ok!(s.poll_ready());
    for i in 0..3 {
        s.eject(i);
    }
    assert_ready_ok!(s.poll_ready());
    assert_eq!(gate.counts(), (4, 3));
    assert!(!h.totals().panicking);
    assert!(!gate.is_open());
    assert_eq!(s.ready(), [false, false, false, true]);
    for req in 0..4 {
        s.request(3, req, false);
    }
    for i in 0..3 {
        assert_eq!(
            snap(&h, i).requests,
            1,
            "endpoint {i} got traffic while ejected"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn higher_panic_threshold_panics_sooner() {
    // Threshold 0.9: one ejection of four (75% healthy) is panic already.
    let gate = EjectionGate::new();
    let mut s = health_setup(4, &gate, Some(0.9));
    let h = s.lb.handle();
    assert_ready_ok!(s.poll_ready());
    assert!(!h.totals().panicking);
    s.eject(0);
    assert_ready_ok!(s.poll_ready());
    assert!(h.totals().panicking);
    assert!(gate.is_open());
    s.request(0, 5, false);
}

#[tokio::test(start_paused = true)]
async fn panic_wakes_a_balancer_with_nothing_ready() {
    // Two endpoints: 0 ejected, 1 full (pending): nothing ready, 50% healthy, no panic;
    // the balancer waits. When 1 is ejected too (0% healthy), the gate wakes the
    // balancer, and panic makes the ejected 0 ready.
    let gate = EjectionGate::new();
    let mut s = health_setup(2, &gate, None);
    let h = s.lb.handle();
    assert_ready_ok!(s.poll_ready());
    // Endpoint 1 takes a request that will fail, then is full.
    s.target.aim(1);
    assert_ready_ok!(s.poll_ready());
    let mut doomed = spawn(s.lb.call(1));
    let (_, _, doomed_tx) = take_request(&mut s.handles);
    s.handles[1].allow(0);
    s.eject(0);
    assert_pending!(s.poll_ready(), "nothing ready: 0 ejected, 1 full");
    assert!(!h.totals().panicking);
    // Endpoint 1's request fails: ejected too; the gate wakes the balancer.
    doomed_tx.send_error(io::Error::other("boom"));
    assert!(assert_ready!(doomed.poll()).is_err());
    assert!(s.task.is_woken(), "the ejection did not wake the balancer");
    assert_ready_ok!(s.poll_ready());
    assert!(h.totals().panicking);
    assert_eq!(
        s.ready(),
        [true, false],
        "0 ready (ejected, panic), 1 still full"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Weights from Weighted<S>
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn weighted_services_set_weights_for_weighted_round_robin() {
    let (svcs, mut handles) = mocks(3);
    let weights = [1, 2, 3];
    let svcs: Vec<Weighted<Mock>> = svcs
        .into_iter()
        .zip(weights)
        .map(|(m, w)| Weighted::new(m, w))
        .collect();
    let mut lb = Balance::new(ServiceList::new(svcs), WeightedRoundRobin::new())
        .service_weights(Weighted::weight);
    let h = lb.handle();
    let mut task = spawn(());
    // Smooth WRR: exact proportions over every window of Σweights = 6 picks.
    for window in 0..4u32 {
        let mut seen = [0u32; 3];
        for k in 0..6 {
            seen[round_trip(&mut task, &mut lb, &mut handles, window * 6 + k)] += 1;
        }
        assert_eq!(seen, weights, "window {window}");
    }
    for (i, w) in weights.into_iter().enumerate() {
        let s = snap(&h, i);
        assert_eq!(s.weight, w);
        assert_eq!(s.requests, 4 * u64::from(w));
    }
}

#[tokio::test(start_paused = true)]
async fn key_weights_win_over_service_weights_and_zero_counts_as_one() {
    let (svcs, _handles) = mocks(3);
    let svcs: Vec<Weighted<Mock>> = svcs
        .into_iter()
        .zip([0, 4, 7])
        .map(|(m, w)| Weighted::new(m, w))
        .collect();
    assert_eq!(svcs[0].weight(), 1);
    let mut lb = Balance::new(ServiceList::new(svcs), WeightedRoundRobin::new())
        .service_weights(Weighted::weight)
        .weights(|i: &usize| if *i == 2 { 5 } else { 0 });
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let h = lb.handle();
    assert_eq!(
        (0..3).map(|i| snap(&h, i).weight).collect::<Vec<_>>(),
        [1, 1, 5]
    );
}

#[tokio::test(start_paused = true)]
async fn weighted_services_fail_over() {
    let (svcs, mut handles) = mocks(2);
    let svcs: Vec<Weighted<Mock>> = svcs.into_iter().map(|m| Weighted::new(m, 2)).collect();
    let mut lb = Balance::new(ServiceList::new(svcs), WeightedRoundRobin::new())
        .service_weights(Weighted::weight)
        .failover(Failover::new());
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let mut fut = spawn(lb.call(1));
    let (first, _, tx) = take_request(&mut handles);
    tx.send_error(refused(first));
    assert_pending!(fut.poll());
    let (second, _, tx) = take_request(&mut handles);
    assert_ne!(first, second);
    tx.send_response(8);
    assert_eq!(assert_ready_ok!(fut.poll()), 8);
}

// ---------------------------------------------------------------------------------------
// 10. Totals
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn totals_sum_the_endpoint_stats() {
    let target = Target::new();
    let (mut lb, mut handles) = failover_balance(3, target.clone(), Failover::new());
    handles[2].allow(0);
    let h = lb.handle();
    let mut task = spawn(());
    let empty = h.totals();
    assert_eq!(
        (empty.endpoints, empty.requests),
        (0, 0),
        "nothing discovered yet"
    );

    // Endpoint 0: two answered, one plain error. Endpoint 1: one refused (failed over
    // to 0), one held in flight.
    for (req, fail) in [(1, false), (2, true), (3, false)] {
        target.aim(0);
        let mut fut = start(&mut task, &mut lb, req);
        let (_, _, tx) = take_request(&mut handles);
        if fail {
            tx.send_error(io::Error::other("boom"));
            assert!(assert_ready!(fut.poll()).is_err());
        } else {
            tx.send_response(req);
            assert_ready_ok!(fut.poll());
        }
    }
    target.aim(1);
    let mut fut = start(&mut task, &mut lb, 4);
    let (_, _, tx) = take_request(&mut handles);
    tx.send_error(refused(1));
    assert_pending!(fut.poll());
    let (i, _, tx) = take_request(&mut handles);
    assert_eq!(i, 0);
    tx.send_response(4);
    assert_ready_ok!(fut.poll());
    let _held = start(&mut task, &mut lb, 5);
    let (_, _, _held_tx) = take_request(&mut handles);

    let stats = h.stats();
    let totals = h.totals();
    assert_eq!(totals.endpoints, stats.len());
    assert_eq!(totals.ready, stats.iter().filter(|s| s.ready).count());
    assert_eq!(totals.pending, stats.iter().filter(|s| !s.ready).count());
    assert_eq!(
        totals.requests,
        stats.iter().map(|s| s.requests).sum::<u64>()
    );
    assert_eq!(totals.errors, stats.iter().map(|s| s.errors).sum::<u64>());
    assert_eq!(
        totals.in_flight,
        stats.iter().map(|s| s.in_flight).sum::<u64>()
    );
    // And the figures themselves.
    assert_eq!((totals.endpoints, totals.ready, totals.pending), (3, 2, 1));
    assert_eq!(
        (totals.requests, totals.errors, totals.in_flight),
        (6, 2, 1)
    );
    assert_eq!((totals.retries, totals.retries_refused), (1, 0));
    assert!(!totals.panicking);
    let per: Vec<(u64, u64, u64)> = (0..3)
        .map(|i| {
            let s = snap(&h, i);
            (s.requests, s.errors, s.in_flight)
        })
        .collect();
    assert_eq!(per, [(4, 1, 0), (2, 1, 1), (0, 0, 0)]);
}

/// An endpoint ejected by an active probe (not by a request the balancer sent) leaves
/// the ready set at once when its health check shares the balancer's gate: it gets no
/// further request.
#[tokio::test]
async fn probe_ejection_leaves_the_ready_set_at_once() {
    use marina_core::probe_fn;
    use marina_health::ActiveConfig;
    use std::sync::atomic::AtomicBool;
    use tower::{ServiceExt, service_fn};

    let down = Arc::new(AtomicBool::new(false));
    let gate = EjectionGate::new();
    let mut handles = Vec::new();
    let eps: Vec<_> = (0..2u32)
        .map(|n| {
            let down = down.clone();
            let probe = probe_fn(move |_: &mut ()| {
                let fail = n == 1 && down.load(Ordering::SeqCst);
                Box::pin(async move {
                    if fail {
                        Err(BoxError::from("down"))
                    } else {
                        Ok(())
                    }
                })
            });
            let h = Health::builder(service_fn(move |_: ()| async move { Ok::<_, BoxError>(n) }))
                .probe(
                    ActiveConfig {
                        interval: Duration::from_millis(10),
                        unhealthy_threshold: 1,
                        ..ActiveConfig::default()
                    },
                    probe,
                    (),
                )
                .ejection_gate(gate.clone())
                .build();
            handles.push(h.handle());
            h
        })
        .collect();
    // One of two ejected is a healthy share of 0.5: not below the panic threshold.
    let mut lb = Balance::from_services(eps, RoundRobin::new()).ejection_gate(gate);
    // Three calls: endpoint 0 was called last, endpoint 1 sits in the ready set.
    for _ in 0..3 {
        lb.ready().await.unwrap().call(()).await.unwrap();
    }
    down.store(true, Ordering::SeqCst);
    let mut rx = handles[1].subscribe();
    rx.wait_for(|s| matches!(s, Status::Ejected { .. }))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(lb.ready().await.unwrap().call(()).await.unwrap());
    }
    assert_eq!(seen, [0, 0, 0, 0], "the ejected endpoint got a request");
}

// ---------------------------------------------------------------------------------------
// Failover keys: a session's requests fail over together
// ---------------------------------------------------------------------------------------

/// A request of session `key`, pinned to endpoint 0; not `Clone`.
#[derive(Debug)]
struct Pinned {
    key: u64,
}

/// A balancer over `n` endpoints keyed `0..n`: endpoint 0 refuses every request and
/// gives it back (a dead backend under a pinned session); the others answer their
/// index after a while (paused time), so requests pile up in flight on them. Each
/// request is pinned to endpoint 0 with its session as failover key (`keyed`) or
/// without one.
fn pinned_balance(
    n: usize,
    keyed: bool,
) -> impl Service<Pinned, Response = usize, Error = BoxError, Future: Send + 'static> + Send {
    let endpoints = (0..n).map(|i| {
        tower::service_fn(move |req: Pinned| async move {
            if i == 0 {
                return Err(NotSent::with_request("endpoint 0 refused", req));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(i)
        })
    });
    let dead = EndpointId::of(&list_key(0));
    Balance::from_services(endpoints, RoundRobin::new())
        .route_hint(move |req: &Pinned| {
            let hint = RouteHint::endpoint(dead);
            Some(if keyed {
                hint.with_failover_key(req.key)
            } else {
                hint
            })
        })
        .failover_unsent(
            // Every request fails over here: a budget that allows it.
            Failover::new().budget(RetryBudget::new(Duration::from_secs(10), 1000, 1.0)),
        )
}

/// Sends `per_key` concurrent requests of each session in `keys` through `lb`; the
/// endpoints that served each session.
async fn fail_over_sessions(
    lb: &mut (impl Service<Pinned, Response = usize, Error = BoxError, Future: Send + 'static> + Send),
    keys: std::ops::Range<u64>,
    per_key: usize,
) -> Vec<Vec<usize>> {
    use tower::ServiceExt;
    let mut tasks = Vec::new();
    for key in keys {
        for _ in 0..per_key {
            tasks.push(tokio::spawn(
                lb.ready().await.expect("ready").call(Pinned { key }),
            ));
        }
    }
    let mut served = Vec::new();
    for task in tasks {
        let answer = task.await.expect("no panic");
        served.push(answer.expect("every request fails over and is answered"));
    }
    served.chunks(per_key).map(<[usize]>::to_vec).collect()
}

#[tokio::test(start_paused = true)]
async fn requests_sharing_a_failover_key_fail_over_to_one_endpoint() {
    let mut lb = pinned_balance(6, true);
    let sessions = fail_over_sessions(&mut lb, 0..40, 5).await;
    let mut used = std::collections::BTreeSet::new();
    for (key, served) in sessions.iter().enumerate() {
        assert!(
            served.iter().all(|&e| e == served[0] && e != 0),
            "session {key}'s concurrent requests failed over to several endpoints: {served:?}"
        );
        used.insert(served[0]);
    }
    // Different sessions spread over the survivors.
    assert!(
        used.len() >= 4,
        "40 sessions went to only {used:?} of endpoints 1..6"
    );

    // The same keys again, with other loads in flight: same endpoints.
    let again = fail_over_sessions(&mut lb, 0..40, 1).await;
    for (key, (before, now)) in sessions.iter().zip(&again).enumerate() {
        assert_eq!(before[0], now[0], "session {key} failed over elsewhere");
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_failover_key_failover_spreads_by_load() {
    // The contrast: the least loaded endpoint for each request, so one session's
    // concurrent requests land on several endpoints.
    let mut lb = pinned_balance(6, false);
    let sessions = fail_over_sessions(&mut lb, 0..1, 5).await;
    let distinct = sessions[0]
        .iter()
        .collect::<std::collections::BTreeSet<_>>();
    assert!(distinct.len() > 1, "least loaded: {:?}", sessions[0]);
}

/// A request routed by a consistent hash of `key`; not `Clone`.
#[derive(Debug)]
struct Hashed {
    key: u64,
}

/// An endpoint answering its index, that can be turned into a dead backend whose
/// connects are refused (`REFUSING`: each request given back, never sent) and then
/// into one the balancer sees go (`GONE`: pending, as behind an ejection).
#[derive(Clone)]
struct Switchable {
    index: usize,
    state: Arc<AtomicU64>,
}

const ALIVE: u64 = 0;
const REFUSING: u64 = 1;
const GONE: u64 = 2;

impl Service<Hashed> for Switchable {
    type Response = usize;
    type Error = BoxError;
    type Future = std::future::Ready<Result<usize, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.state.load(Ordering::Relaxed) {
            GONE => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Hashed) -> Self::Future {
        std::future::ready(match self.state.load(Ordering::Relaxed) {
            ALIVE => Ok(self.index),
            _ => Err(NotSent::with_request(refused(self.index), req).into()),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_hashed_key_fails_over_to_where_the_hash_sends_it_once_its_endpoint_is_gone() {
    use marina_balance::ConsistentHash;
    use tower::ServiceExt;

    let states: Vec<_> = (0..6).map(|_| Arc::new(AtomicU64::new(ALIVE))).collect();
    let endpoints = states.iter().enumerate().map(|(index, state)| Switchable {
        index,
        state: state.clone(),
    });
    let mut lb = Balance::from_services(endpoints, ConsistentHash::new())
        .route_hint(|req: &Hashed| Some(RouteHint::hash(req.key)))
        .failover_unsent(Failover::new().budget(RetryBudget::new(
            Duration::from_secs(10),
            1000,
            1.0,
        )));
    let mut send = async |key: u64| -> usize {
        let fut = lb.ready().await.expect("ready").call(Hashed { key });
        fut.await.expect("answered")
    };
    let mut home = Vec::new();
    for key in 0..300 {
        home.push(send(key).await);
    }
    let dead = home[0];
    // The dead endpoint still looks ready: its keys fail over.
    states[dead].store(REFUSING, Ordering::Relaxed);
    let mut failed_over = Vec::new();
    for key in 0..300u64 {
        let served = send(key).await;
        if home[key as usize] == dead {
            assert_ne!(served, dead);
            failed_over.push((key, served));
        } else {
            assert_eq!(
                served, home[key as usize],
                "key {key} of a live endpoint moved"
            );
        }
    }
    assert!(
        failed_over.len() > 10,
        "{} keys on the dead endpoint",
        failed_over.len()
    );
    // Then it leaves the ready set: the hash sends each of its keys where the failover
    // did (every client computes the same).
    states[dead].store(GONE, Ordering::Relaxed);
    for (key, then) in failed_over {
        assert_eq!(
            send(key).await,
            then,
            "key {key}: failover and hash disagree"
        );
    }
}

#[tokio::test]
async fn a_spent_coop_budget_does_not_move_a_failover() {
    use tower::ServiceExt;

    let dead = EndpointId::of(&list_key(0));
    // Endpoint 0 refuses every request and gives it back; the others answer their index.
    let endpoints = (0..6usize).map(|i| {
        Budgeted(tower::service_fn(move |req: Pinned| {
            std::future::ready(match i {
                0 => Err::<usize, BoxError>(NotSent::with_request(refused(0), req).into()),
                i => Ok(i),
            })
        }))
    });
    let mut lb = Balance::from_services(endpoints, RoundRobin::new())
        .route_hint(move |req: &Pinned| Some(RouteHint::endpoint(dead).with_failover_key(req.key)))
        .failover_unsent(Failover::new().budget(RetryBudget::new(
            Duration::from_secs(10),
            1000,
            1.0,
        )));
    for key in 0..50u64 {
        // Where the key fails over with budget to spare ...
        let home = lb
            .ready()
            .await
            .unwrap()
            .call(Pinned { key })
            .await
            .unwrap();
        // ... and when the task's budget runs out as the failover attempt is readied.
        tokio::task::yield_now().await;
        let mut fut = std::pin::pin!(lb.ready().await.unwrap().call(Pinned { key }));
        let mut first = true;
        let served = std::future::poll_fn(|cx| {
            if std::mem::take(&mut first) {
                spend_budget(cx);
            }
            fut.as_mut().poll(cx)
        })
        .await
        .unwrap();
        assert_eq!(
            served, home,
            "key {key} failed over elsewhere on a spent budget"
        );
    }
}
