//! Tests of the `Balance` service: readiness (pending endpoints skipped, wake-ups, no
//! churn of the ready set), fail-fast, the pickers driven through it, per-endpoint
//! stats (the peak EWMA of response times decays with the time that passed, not the
//! number of responses), removal of failed endpoints and draining of endpoints removed
//! by discovery.
//!
//! Endpoints are `tower_test` mocks (their readiness set with `Handle::allow`); static
//! sets come from `tower::discover::ServiceList`, dynamic ones from
//! `tokio_test::stream_mock::StreamMock` (an item per discovery change, waits in paused
//! time between them).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_balance::{
    Balance, BalanceHandle, EndpointSnapshot, LeastConnections, NoReadyEndpoints, Pick, RoundRobin,
    WeightedRoundRobin,
};
use marina_core::{BoxError, EndpointId};
#[path = "support/coop.rs"]
mod coop;
use coop::{Budgeted, spend_budget};
use tokio_test::stream_mock::{StreamMock, StreamMockBuilder};
use tokio_test::task::{Spawn, spawn};
use tokio_test::{assert_pending, assert_ready_ok};
use tower::discover::{Change, ServiceList};
use tower::{Service, ServiceExt};
use tower_test::mock::{self, SendResponse};

type Mock = mock::Mock<u32, u32>;
type Handle = mock::Handle<u32, u32>;
type ListBalance = Balance<ServiceList<Vec<Mock>>, u32>;

/// A discovery stream of keyed mock endpoints.
type Changes = StreamMock<Result<Change<&'static str, Mock>, Infallible>>;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `n` mock endpoints (ready by default) and their handles.
fn mocks(n: usize) -> (Vec<Mock>, Vec<Handle>) {
    (0..n).map(|_| mock::pair()).unzip()
}

/// A balancer over `n` mocks, keyed `0..n` in order.
fn list_balance(n: usize, picker: impl Pick) -> (ListBalance, Vec<Handle>) {
    let (svcs, handles) = mocks(n);
    (Balance::new(ServiceList::new(svcs), picker), handles)
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

/// The snapshot of the endpoint whose key text is `key`.
fn snap(handle: &BalanceHandle, key: &str) -> EndpointSnapshot {
    handle
        .stats()
        .into_iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("no endpoint {key:?} in {:?}", handle.stats()))
}

/// The key texts of the endpoints the handle lists, sorted.
fn keys(handle: &BalanceHandle) -> Vec<String> {
    let mut keys: Vec<String> = handle.stats().into_iter().map(|s| s.key).collect();
    keys.sort();
    keys
}

/// The key text of a `ServiceList` endpoint (its index, `Debug`-formatted).
fn list_key(i: usize) -> String {
    format!("{i:?}")
}

/// The key text of a `&str`-keyed endpoint (`Debug`-formatted: quoted).
fn str_key(k: &str) -> String {
    format!("{k:?}")
}

/// One full request through `lb`, answered by the endpoint that receives it with
/// `req + 1000 * index`. Returns the index of that endpoint.
async fn round_trip<S>(lb: &mut S, handles: &mut [Handle], req: u32) -> usize
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, lb));
    let fut = lb.call(req);
    let (i, got, tx) = take_request(handles);
    assert_eq!(got, req);
    tx.send_response(req + 1000 * i as u32);
    assert_eq!(fut.await.expect("the call succeeds"), req + 1000 * i as u32);
    i
}

/// Asserts `picks` is one cycle over `n` distinct endpoints, repeated.
fn assert_cycles(picks: &[u32], n: usize) {
    let first: Vec<u32> = picks[..n].to_vec();
    let mut distinct = first.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), n, "first {n} picks not distinct: {picks:?}");
    for (k, p) in picks.iter().enumerate() {
        assert_eq!(*p, first[k % n], "pick {k} breaks the cycle: {picks:?}");
    }
}

/// A service answering with its own number, counting its `poll_ready` calls.
#[derive(Clone)]
struct Counted {
    n: u32,
    polls: Arc<AtomicUsize>,
}

impl Service<u32> for Counted {
    type Response = u32;
    type Error = Infallible;
    type Future = std::future::Ready<Result<u32, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: u32) -> Self::Future {
        std::future::ready(Ok(self.n))
    }
}

fn counted(n: u32) -> (Vec<Counted>, Vec<Arc<AtomicUsize>>) {
    (0..n)
        .map(|n| {
            let polls = Arc::new(AtomicUsize::new(0));
            (
                Counted {
                    n,
                    polls: polls.clone(),
                },
                polls,
            )
        })
        .unzip()
}

// ---------------------------------------------------------------------------------------
// 1. Pending endpoints are skipped
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pending_endpoints_are_skipped() {
    let (mut lb, mut handles) = list_balance(3, RoundRobin::new());
    handles[0].allow(0);
    handles[2].allow(0);
    for req in 0..12 {
        assert_eq!(round_trip(&mut lb, &mut handles, req).await, 1);
    }
    let h = lb.handle();
    assert_eq!(snap(&h, &list_key(0)).requests, 0);
    assert_eq!(snap(&h, &list_key(1)).requests, 12);
    assert_eq!(snap(&h, &list_key(2)).requests, 0);
    assert!(!snap(&h, &list_key(0)).ready);
    assert!(snap(&h, &list_key(1)).ready);
    assert!(!snap(&h, &list_key(2)).ready);
}

#[tokio::test]
async fn endpoint_that_turns_pending_after_a_call_is_skipped() {
    // Endpoint 0 accepts exactly one request, then stays pending: the balancer must
    // re-poll it after calling it and stop sending to it.
    let (mut lb, mut handles) = list_balance(2, RoundRobin::new());
    handles[0].allow(1);
    let mut picks = Vec::new();
    for req in 0..8 {
        picks.push(round_trip(&mut lb, &mut handles, req).await);
    }
    assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 1, "{picks:?}");
    assert!(!snap(&lb.handle(), &list_key(0)).ready);
}

// ---------------------------------------------------------------------------------------
// 2. All pending: woken when one becomes ready
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn all_pending_wakes_when_one_becomes_ready() {
    let (mut lb, mut handles) = list_balance(3, RoundRobin::new());
    for h in &mut handles {
        h.allow(0);
    }
    let mut task = spawn(());
    assert_pending!(poll_ready(&mut task, &mut lb));
    assert!(!task.is_woken());
    assert!(lb.handle().stats().iter().all(|s| !s.ready));

    handles[2].allow(1);
    assert!(
        task.is_woken(),
        "the balancer's task was not woken by a ready endpoint"
    );
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert!(snap(&lb.handle(), &list_key(2)).ready);

    let fut = lb.call(7);
    let (i, req, tx) = take_request(&mut handles);
    assert_eq!((i, req), (2, 7));
    tx.send_response(70);
    assert_eq!(fut.await.unwrap(), 70);

    // Endpoint 2 used its one allowance: all pending again, and woken again.
    assert_pending!(poll_ready(&mut task, &mut lb));
    handles[0].allow(1);
    assert!(task.is_woken());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let _fut = lb.call(8);
    assert_eq!(take_request(&mut handles).0, 0);
}

#[tokio::test(start_paused = true)]
async fn discovery_wakes_the_balancer() {
    let (svc, mut h) = mock::pair::<u32, u32>();
    let changes: Changes = StreamMockBuilder::new()
        .wait(Duration::from_secs(1))
        .next(Ok(Change::Insert("a", svc)))
        .build();
    let mut lb = Balance::new(changes, RoundRobin::new()).failfast_timeout(Duration::from_secs(5));
    let mut task = spawn(());
    // The stream mock wakes its task at once when it starts waiting: poll past that.
    assert_pending!(poll_ready(&mut task, &mut lb));
    assert_pending!(poll_ready(&mut task, &mut lb));
    assert!(!task.is_woken());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(task.is_woken(), "not woken by the discovery stream");
    // The stream mock yields once after its wait, then the insert.
    let mut ready = false;
    for _ in 0..3 {
        if poll_ready(&mut task, &mut lb).is_ready() {
            ready = true;
            break;
        }
    }
    assert!(
        ready,
        "the discovered endpoint did not make the balancer ready"
    );
    let fut = lb.call(1);
    let (_, tx) = h.next_request().await.unwrap();
    tx.send_response(2);
    assert_eq!(fut.await.unwrap(), 2);
    assert_eq!(keys(&lb.handle()), [str_key("a")]);
}

// ---------------------------------------------------------------------------------------
// 3. Fail fast
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn fail_fast_after_timeout_then_recovers() {
    let (svcs, mut handles) = mocks(2);
    for h in &mut handles {
        h.allow(0);
    }
    let mut lb = Balance::new(ServiceList::new(svcs), RoundRobin::new())
        .failfast_timeout(Duration::from_secs(1));
    let mut task = spawn(());

    assert_pending!(poll_ready(&mut task, &mut lb));
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(!task.is_woken(), "woken before the fail-fast timeout");
    assert_pending!(poll_ready(&mut task, &mut lb));

    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(task.is_woken(), "not woken at the fail-fast timeout");
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let err = lb.call(1).await.expect_err("fails fast");
    let nre = err
        .downcast_ref::<NoReadyEndpoints>()
        .unwrap_or_else(|| panic!("not NoReadyEndpoints: {err}"));
    assert_eq!(nre.waited, Duration::from_secs(1));
    assert_no_request(&mut handles);

    // Still failing fast, at once, while nothing is ready.
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let err = lb.call(2).await.expect_err("still fails fast");
    assert!(err.is::<NoReadyEndpoints>());
    assert_no_request(&mut handles);
    assert!(lb.handle().stats().iter().all(|s| s.requests == 0));

    // An endpoint becomes ready: calls succeed again.
    handles[1].allow(1);
    assert!(task.is_woken());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let fut = lb.call(3);
    let (i, req, tx) = take_request(&mut handles);
    assert_eq!((i, req), (1, 3));
    tx.send_response(30);
    assert_eq!(fut.await.unwrap(), 30);

    // Nothing ready again: the fail-fast clock starts afresh rather than failing at once.
    assert_pending!(poll_ready(&mut task, &mut lb));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_pending!(poll_ready(&mut task, &mut lb));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert!(lb.call(4).await.unwrap_err().is::<NoReadyEndpoints>());
}

#[tokio::test(start_paused = true)]
async fn fail_fast_with_no_endpoints_at_all() {
    let mut lb: ListBalance = Balance::new(ServiceList::new(Vec::new()), RoundRobin::new())
        .failfast_timeout(Duration::from_millis(250));
    let mut task = spawn(());
    assert_pending!(poll_ready(&mut task, &mut lb));
    tokio::time::advance(Duration::from_millis(250)).await;
    assert!(task.is_woken());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let err = lb.call(1).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<NoReadyEndpoints>(),
        Some(&NoReadyEndpoints {
            waited: Duration::from_millis(250)
        })
    );
}

#[tokio::test(start_paused = true)]
async fn ready_await_fails_fast_with_default_timeout() {
    // Through `ServiceExt::ready`: paused time auto-advances to the 10 s default.
    let (svcs, mut handles) = mocks(1);
    handles[0].allow(0);
    let mut lb = Balance::new(ServiceList::new(svcs), RoundRobin::new());
    let start = tokio::time::Instant::now();
    let svc = lb.ready().await.expect("ready after fail-fast");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_millis(10_010),
        "{waited:?}"
    );
    let err = svc.call(1).await.unwrap_err();
    assert!(err.is::<NoReadyEndpoints>());
}

// ---------------------------------------------------------------------------------------
// 4. Round robin cycles; the ready set does not churn
// ---------------------------------------------------------------------------------------

async fn cycle_picks(picker: impl Pick, n: usize, calls: usize) -> Vec<u32> {
    let (svcs, _) = counted(n as u32);
    let mut lb = Balance::new(ServiceList::new(svcs), picker);
    let mut picks = Vec::new();
    for _ in 0..calls {
        picks.push(lb.ready().await.unwrap().call(0).await.unwrap());
    }
    picks
}

#[tokio::test]
async fn round_robin_cycles_exactly() {
    let picks = cycle_picks(RoundRobin::new(), 3, 30).await;
    assert_cycles(&picks, 3);
}

#[tokio::test]
async fn weighted_round_robin_equal_weights_cycles_exactly() {
    let picks = cycle_picks(WeightedRoundRobin::new(), 3, 30).await;
    assert_cycles(&picks, 3);
}

#[tokio::test]
async fn round_robin_over_mocks_cycles_exactly() {
    for picker in [
        Box::new(RoundRobin::new()) as Box<dyn Pick>,
        Box::new(WeightedRoundRobin::new()),
    ] {
        let (mut lb, mut handles) = list_balance(3, picker);
        let mut picks = Vec::new();
        for req in 0..15 {
            picks.push(round_trip(&mut lb, &mut handles, req).await as u32);
        }
        assert_cycles(&picks, 3);
        let h = lb.handle();
        for i in 0..3 {
            assert_eq!(snap(&h, &list_key(i)).requests, 5);
        }
    }
}

#[tokio::test]
async fn each_request_polls_at_most_three_endpoints() {
    let (svcs, polls) = counted(3);
    let mut lb = Balance::new(ServiceList::new(svcs), RoundRobin::new());
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let total = || {
        polls
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum::<usize>()
    };
    let first = total();
    assert!(first >= 3, "each endpoint polled at first");

    // Polling again with no call in between polls nobody.
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert_eq!(total(), first, "ready endpoints re-polled without a call");

    // Each request: the endpoint chosen for it, the one called last, and one more in
    // turn (the readiness sweep), whatever the number of endpoints.
    let mut before = total();
    for _ in 1..=9 {
        lb.call(0).await.unwrap();
        assert_ready_ok!(poll_ready(&mut task, &mut lb));
        assert!(total() - before <= 3, "more than three endpoints polled");
        assert!(total() > before, "the next endpoint was not checked");
        before = total();
    }
}

// ---------------------------------------------------------------------------------------
// 5. Least connections
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn least_connections_routes_away_from_busy_endpoint() {
    let (mut lb, mut handles) = list_balance(3, LeastConnections::new());
    let h = lb.handle();
    let mut task = spawn(());

    // The first request is held: its endpoint has one in flight.
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let held = lb.call(100);
    let (busy, _, held_tx) = take_request(&mut handles);
    assert_eq!(snap(&h, &list_key(busy)).in_flight, 1);

    let mut picks = Vec::new();
    for req in 0..10 {
        let i = round_trip(&mut lb, &mut handles, req).await;
        assert_ne!(i, busy, "sent to the endpoint with a request in flight");
        picks.push(i);
    }
    // Both idle endpoints got requests (ties rotate).
    assert!(picks.iter().any(|&i| i != picks[0]), "{picks:?}");
    for i in 0..3 {
        let s = snap(&h, &list_key(i));
        assert_eq!(s.in_flight, u64::from(i == busy), "endpoint {i}: {s:?}");
    }

    // Two more held on another endpoint: the next goes to the third one.
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let held2 = lb.call(200);
    let (second, _, held2_tx) = take_request(&mut handles);
    assert_ne!(second, busy);
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let fut = lb.call(300);
    let (third, _, tx) = take_request(&mut handles);
    assert!(
        third != busy && third != second,
        "third request went to {third}"
    );
    assert_eq!(snap(&h, &list_key(third)).in_flight, 1);
    tx.send_response(0);
    fut.await.unwrap();
    assert_eq!(snap(&h, &list_key(third)).in_flight, 0);

    // Responses bring in_flight back to 0; so does dropping a response future.
    held_tx.send_response(1);
    assert_eq!(held.await.unwrap(), 1);
    assert_eq!(snap(&h, &list_key(busy)).in_flight, 0);
    assert_eq!(snap(&h, &list_key(second)).in_flight, 1);
    drop(held2);
    assert_eq!(snap(&h, &list_key(second)).in_flight, 0);
    drop(held2_tx);
    assert!(
        h.stats().iter().all(|s| s.in_flight == 0),
        "{:?}",
        h.stats()
    );
}

// ---------------------------------------------------------------------------------------
// 6. Stats
// ---------------------------------------------------------------------------------------

fn close(a: Option<Duration>, b: Duration) -> bool {
    a.is_some_and(|a| a.abs_diff(b) <= Duration::from_micros(2))
}

/// Requests per phase of the stats test: a multiple of the balancer's timing sample
/// (one request in 8 is timed), so each phase contributes the same number of timed
/// requests whatever their alignment.
const PHASE: u32 = 8;

/// Sends `PHASE` requests through `lb` at once (all must reach endpoint 0), then after
/// `delay` answers them all, successfully or with an error.
async fn phase(
    lb: &mut ListBalance,
    handles: &mut [Handle],
    task: &mut Spawn<()>,
    delay: Duration,
    ok: bool,
) {
    let h = lb.handle();
    let before = snap(&h, &list_key(0)).requests;
    let mut sent = Vec::new();
    for k in 0..PHASE {
        assert_ready_ok!(poll_ready(task, lb));
        let fut = lb.call(k);
        let (i, _, tx) = take_request(handles);
        assert_eq!(i, 0, "a request reached the pending endpoint");
        sent.push((fut, tx));
    }
    let s = snap(&h, &list_key(0));
    assert_eq!(s.in_flight, u64::from(PHASE));
    assert_eq!(s.requests, before + u64::from(PHASE));
    tokio::time::advance(delay).await;
    for (fut, tx) in sent {
        if ok {
            tx.send_response(0);
            fut.await.unwrap();
        } else {
            tx.send_error("boom");
            assert_eq!(fut.await.unwrap_err().to_string(), "boom");
        }
    }
    assert_eq!(snap(&h, &list_key(0)).in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn stats_count_requests_errors_and_latency() {
    let (mut lb, mut handles) = list_balance(2, RoundRobin::new());
    handles[1].allow(0); // endpoint 1 stays pending: everything goes to 0
    let h = lb.handle();
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));

    assert_eq!(h.stats().len(), 2);
    let s0 = snap(&h, &list_key(0));
    assert_eq!(s0.id, EndpointId::of(&list_key(0)));
    assert_eq!(s0.requests, 0);
    assert_eq!(s0.errors, 0);
    assert_eq!(s0.error_rate, 0.0);
    assert_eq!(s0.avg_latency, None);
    assert_eq!(s0.ewma_latency, None);
    assert!(s0.ready);
    assert!(!snap(&h, &list_key(1)).ready);

    let ms = Duration::from_millis;
    phase(&mut lb, &mut handles, &mut task, ms(100), true).await;
    let s = snap(&h, &list_key(0));
    assert_eq!((s.requests, s.errors, s.error_rate), (8, 0, 0.0));
    assert!(close(s.avg_latency, ms(100)), "{s:?}");
    assert!(close(s.ewma_latency, ms(100)), "{s:?}");

    phase(&mut lb, &mut handles, &mut task, ms(300), true).await;
    let s = snap(&h, &list_key(0));
    assert!(close(s.avg_latency, ms(200)), "{s:?}");
    // Peak-sensitive: jumps to the slower responses at once.
    assert!(close(s.ewma_latency, ms(300)), "{s:?}");

    phase(&mut lb, &mut handles, &mut task, ms(100), true).await;
    let s = snap(&h, &list_key(0));
    assert!(
        close(s.avg_latency, Duration::from_micros(166_666)),
        "{s:?}"
    );
    // Decays slowly (one timed request: 0.9 × 300 + 0.1 × 100 = 280 ms).
    let ewma = s.ewma_latency.unwrap();
    assert!(ewma > ms(100) && ewma < ms(300), "{s:?}");
    assert_eq!((s.requests, s.errors, s.error_rate), (24, 0, 0.0));

    phase(&mut lb, &mut handles, &mut task, ms(500), false).await;
    let s = snap(&h, &list_key(0));
    assert_eq!((s.requests, s.errors, s.in_flight), (32, 8, 0));
    assert_eq!(s.error_rate, 0.25);
    assert!(close(s.avg_latency, ms(250)), "{s:?}");
    assert!(close(s.ewma_latency, ms(500)), "{s:?}");

    // The pending endpoint saw nothing.
    let s1 = snap(&h, &list_key(1));
    assert_eq!(
        (s1.requests, s1.errors, s1.in_flight, s1.avg_latency),
        (0, 0, 0, None)
    );

    // Requests dropped before their responses count as sent, not as completed: they
    // change neither the error rate nor the latencies.
    for k in 0..PHASE {
        assert_ready_ok!(poll_ready(&mut task, &mut lb));
        let fut = lb.call(k);
        let _req = take_request(&mut handles);
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(fut);
    }
    let s = snap(&h, &list_key(0));
    assert_eq!((s.requests, s.errors, s.in_flight), (40, 8, 0));
    assert_eq!(s.error_rate, 0.25);
    assert!(close(s.avg_latency, ms(250)), "{s:?}");
    assert!(close(s.ewma_latency, ms(500)), "{s:?}");

    // Ready flags follow readiness.
    handles[0].allow(0);
    handles[1].allow(5);
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert!(!snap(&h, &list_key(0)).ready);
    assert!(snap(&h, &list_key(1)).ready);
}

/// Sends `lb` one request answered after `rtt` — a timed one, as the first of every 8
/// an endpoint gets is — then the 7 untimed ones, answered at once.
async fn timed_sample<S>(lb: &mut S, rtt: Duration)
where
    S: Service<Duration, Error = BoxError>,
{
    for rtt in std::iter::once(rtt).chain(std::iter::repeat_n(Duration::ZERO, 7)) {
        lb.ready().await.unwrap().call(rtt).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_decays_with_the_time_that_passed_not_the_number_of_responses() {
    let ms = Duration::from_millis;
    // One endpoint that answers each request (a response time) after that long.
    let endpoint = tower::service_fn(|rtt: Duration| async move {
        tokio::time::sleep(rtt).await;
        Ok::<_, Infallible>(())
    });
    let mut lb = Balance::from_services([endpoint], RoundRobin::new());
    let h = lb.handle();
    let ewma = || h.stats()[0].ewma_latency.expect("timed responses");

    // A burst of slow responses: the estimate is the peak.
    for _ in 0..5 {
        timed_sample(&mut lb, ms(1000)).await;
    }
    assert!(close(Some(ewma()), ms(1000)), "{:?}", ewma());
    // 40 fast responses within 0.4 s hardly move it (a per-response 0.9/0.1 rule
    // would be down to about 25 ms).
    for _ in 0..40 {
        timed_sample(&mut lb, ms(10)).await;
    }
    let burst = ewma();
    assert!(burst > ms(950), "{burst:?}");
    // Idle for τ (10 s), then one fast response: about e^-1 of the peak is left.
    tokio::time::sleep(Duration::from_secs(10)).await;
    timed_sample(&mut lb, ms(10)).await;
    let after_gap = ewma();
    assert!(after_gap > ms(330) && after_gap < ms(380), "{after_gap:?}");
    // Idle for 3 τ more: the next response all but replaces it.
    tokio::time::sleep(Duration::from_secs(30)).await;
    timed_sample(&mut lb, ms(10)).await;
    let later = ewma();
    assert!(later > ms(10) && later < ms(40), "{later:?}");
}

// ---------------------------------------------------------------------------------------
// 7. Endpoints whose poll_ready fails are removed
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pending_endpoint_that_errors_is_removed() {
    let (mut lb, mut handles) = list_balance(3, RoundRobin::new());
    handles[0].allow(0);
    let h = lb.handle();
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert_eq!(h.stats().len(), 3);

    handles[0].send_error("broken");
    assert!(task.is_woken(), "not woken by the failing endpoint");
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert_eq!(keys(&h), [list_key(1), list_key(2)]);

    for req in 0..6 {
        assert_ne!(round_trip(&mut lb, &mut handles, req).await, 0);
    }
}

#[tokio::test]
async fn called_endpoint_that_errors_is_removed() {
    let (mut lb, mut handles) = list_balance(3, RoundRobin::new());
    let h = lb.handle();
    let mut task = spawn(());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    let fut = lb.call(1);
    let (bad, _, tx) = take_request(&mut handles);
    handles[bad].send_error("broken");

    // No request goes to it again: the endpoint chosen for each request is checked
    // first, and the failed one leaves the set when it is chosen or swept.
    for req in 0..6 {
        assert_ne!(round_trip(&mut lb, &mut handles, req).await, bad);
    }
    assert!(
        h.stats().iter().all(|s| s.key != list_key(bad)),
        "failed endpoint {bad} still listed: {:?}",
        h.stats()
    );
    assert_eq!(h.stats().len(), 2);

    // Its request in flight still completes.
    tx.send_response(11);
    assert_eq!(fut.await.unwrap(), 11);

    let mut picks = Vec::new();
    for req in 0..6 {
        picks.push(round_trip(&mut lb, &mut handles, req).await);
    }
    assert!(picks.iter().all(|&i| i != bad), "{picks:?}");
    assert!(picks.iter().any(|&i| i != picks[0]), "{picks:?}");
}

#[tokio::test(start_paused = true)]
async fn all_endpoints_failing_leaves_none_and_fails_fast() {
    let (svcs, mut handles) = mocks(2);
    let mut lb = Balance::new(ServiceList::new(svcs), RoundRobin::new())
        .failfast_timeout(Duration::from_secs(1));
    for h in &mut handles {
        h.allow(0);
    }
    let mut task = spawn(());
    assert_pending!(poll_ready(&mut task, &mut lb));
    // A dropped handle closes its mock: poll_ready errors.
    handles.pop();
    handles[0].send_error("broken");
    assert!(task.is_woken());
    assert_pending!(poll_ready(&mut task, &mut lb));
    assert!(lb.handle().stats().is_empty(), "{:?}", lb.handle().stats());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
    assert!(lb.call(1).await.unwrap_err().is::<NoReadyEndpoints>());
}

// ---------------------------------------------------------------------------------------
// 8. Removal by discovery drains
// ---------------------------------------------------------------------------------------

/// Polls until ready, at most a few times (the stream mock yields once per wait).
fn poll_until_ready<S: Service<u32>>(task: &mut Spawn<()>, svc: &mut S)
where
    S::Error: std::fmt::Debug,
{
    for _ in 0..4 {
        if let Poll::Ready(r) = poll_ready(task, svc) {
            r.expect("poll_ready succeeds");
            return;
        }
    }
    panic!("not ready");
}

#[tokio::test(start_paused = true)]
async fn removed_endpoint_drains() {
    let (a, mut ha) = mock::pair::<u32, u32>();
    let (b, mut hb) = mock::pair::<u32, u32>();
    let changes: Changes = StreamMockBuilder::new()
        .next(Ok(Change::Insert("a", a)))
        .next(Ok(Change::Insert("b", b)))
        .wait(Duration::from_secs(1))
        .next(Ok(Change::Remove("a")))
        .build();
    let mut lb = Balance::new(changes, LeastConnections::new());
    let h = lb.handle();
    let mut task = spawn(());
    poll_until_ready(&mut task, &mut lb);
    assert_eq!(keys(&h), [str_key("a"), str_key("b")]);

    // Find the request that lands on "a" and hold it (LeastConnections: the next
    // request then goes to "b"; answer those at once).
    let mut held = None;
    for req in 0..2 {
        poll_until_ready(&mut task, &mut lb);
        let fut = lb.call(req);
        if let Poll::Ready(Some((r, tx))) = ha.poll_request() {
            held = Some((fut, r, tx));
        } else {
            let (_, tx) = hb.next_request().await.unwrap();
            tx.send_response(req);
            fut.await.unwrap();
        }
    }
    let (held_fut, held_req, held_tx) = held.expect("one of two requests went to \"a\"");
    assert_eq!(snap(&h, &str_key("a")).in_flight, 1);

    // Discovery removes "a".
    tokio::time::advance(Duration::from_secs(1)).await;
    poll_until_ready(&mut task, &mut lb);
    assert_eq!(keys(&h), [str_key("b")]);

    // New requests go to "b" only.
    for req in 10..16 {
        poll_until_ready(&mut task, &mut lb);
        let fut = lb.call(req);
        assert!(!has_request(&mut ha), "request sent to removed \"a\"");
        let (r, tx) = hb.next_request().await.unwrap();
        assert_eq!(r, req);
        tx.send_response(r * 2);
        assert_eq!(fut.await.unwrap(), req * 2);
    }

    // The request in flight on "a" still completes.
    held_tx.send_response(held_req + 500);
    assert_eq!(held_fut.await.unwrap(), held_req + 500);
}

#[tokio::test(start_paused = true)]
async fn reinserted_key_replaces_the_endpoint() {
    let (a1, mut h1) = mock::pair::<u32, u32>();
    let (a2, mut h2) = mock::pair::<u32, u32>();
    let changes: Changes = StreamMockBuilder::new()
        .next(Ok(Change::Insert("a", a1)))
        .wait(Duration::from_secs(1))
        .next(Ok(Change::Insert("a", a2)))
        .build();
    let mut lb = Balance::new(changes, RoundRobin::new());
    let h = lb.handle();
    let mut task = spawn(());
    poll_until_ready(&mut task, &mut lb);
    let old = lb.call(1);
    let (_, old_tx) = h1.next_request().await.unwrap();
    assert_eq!(snap(&h, &str_key("a")).requests, 1);

    tokio::time::advance(Duration::from_secs(1)).await;
    poll_until_ready(&mut task, &mut lb);
    // One entry for "a", with fresh counters.
    assert_eq!(keys(&h), [str_key("a")]);
    let s = snap(&h, &str_key("a"));
    assert_eq!((s.requests, s.in_flight), (0, 0));

    let new = lb.call(2);
    assert!(!has_request(&mut h1), "sent to the replaced service");
    let (r, tx) = h2.next_request().await.unwrap();
    assert_eq!(r, 2);
    tx.send_response(20);
    assert_eq!(new.await.unwrap(), 20);
    assert_eq!(snap(&h, &str_key("a")).requests, 1);

    old_tx.send_response(10);
    assert_eq!(old.await.unwrap(), 10);
}

#[tokio::test(start_paused = true)]
async fn every_endpoint_gets_latency_stats_under_round_robin() {
    // Round robin over 2 endpoints, 32 requests of 10 ms each: both endpoints served
    // 16, so both must report a response time.
    let (mut lb, mut handles) = list_balance(2, RoundRobin::new());
    let h = lb.handle();
    let mut task = spawn(());
    for req in 0..32 {
        assert_ready_ok!(poll_ready(&mut task, &mut lb));
        let fut = lb.call(req);
        let (_, _, tx) = take_request(&mut handles);
        tokio::time::advance(Duration::from_millis(10)).await;
        tx.send_response(req);
        fut.await.unwrap();
    }
    for i in 0..2 {
        let s = snap(&h, &list_key(i));
        assert_eq!(s.requests, 16, "{s:?}");
        assert!(
            close(s.avg_latency, Duration::from_millis(10)),
            "endpoint {i} has no latency after 16 requests: {s:?}"
        );
        assert!(close(s.ewma_latency, Duration::from_millis(10)), "{s:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn failfast_timeout_max_never_fails_fast() {
    // `Duration::MAX` reads as "never fail fast": poll_ready stays pending (no panic).
    let (svcs, mut handles) = mocks(1);
    handles[0].allow(0);
    let mut lb =
        Balance::new(ServiceList::new(svcs), RoundRobin::new()).failfast_timeout(Duration::MAX);
    let mut task = spawn(());
    assert_pending!(poll_ready(&mut task, &mut lb));
    tokio::time::advance(Duration::from_secs(365 * 24 * 3600)).await;
    assert_pending!(poll_ready(&mut task, &mut lb));
    handles[0].allow(1);
    assert!(task.is_woken());
    assert_ready_ok!(poll_ready(&mut task, &mut lb));
}

/// A hint naming a ready endpoint is honoured whatever the picker, and the balancer
/// reports the endpoint it chose back through the hint.
#[tokio::test]
async fn endpoint_hints_are_honoured_and_the_choice_reported() {
    use marina_core::{EndpointId, RouteHint};
    use tower::ServiceExt;
    let endpoints = (0..3usize).map(|n| {
        tower::service_fn(move |_: RouteHint| async move { Ok::<_, std::convert::Infallible>(n) })
    });
    let mut lb = marina_balance::Balance::new(
        tower::discover::ServiceList::new(endpoints),
        marina_balance::RoundRobin::new(),
    )
    .route_hint(|req: &RouteHint| Some(req.clone()));
    // ServiceList keys endpoints by index; ids hash the key's Debug text.
    let want = EndpointId::of(&format!("{:?}", 1usize));
    for _ in 0..5 {
        let hint = RouteHint::endpoint(want);
        let got = lb.ready().await.unwrap().call(hint.clone()).await.unwrap();
        assert_eq!(got, 1);
        assert_eq!(hint.chosen(), Some(want));
    }
    // A hash hint goes to the picker (round robin here) and is reported too.
    let hint = RouteHint::hash(9);
    lb.ready().await.unwrap().call(hint.clone()).await.unwrap();
    assert!(hint.chosen().is_some());
}

#[test]
#[should_panic(
    expected = "panic_threshold: must be within 0.0..=1.0 (a share, not a percentage), got 50"
)]
fn a_panic_threshold_given_as_a_percentage_is_refused() {
    let endpoints = vec![tower::service_fn(|r: u32| async move {
        Ok::<_, std::io::Error>(r)
    })];
    let _ = Balance::from_services(endpoints, RoundRobin::new()).panic_threshold(50.0);
}

// ---------------------------------------------------------------------------------------
// Tokio's cooperative budget
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_spent_coop_budget_does_not_move_a_hashed_key() {
    use marina_balance::ConsistentHash;
    use marina_core::RouteHint;

    let endpoints = (0..5u32)
        .map(|i| {
            Budgeted(tower::service_fn(move |_: u32| {
                std::future::ready(Ok::<_, Infallible>(i))
            }))
        })
        .collect::<Vec<_>>();
    let mut lb = Balance::new(ServiceList::new(endpoints), ConsistentHash::new())
        .route_hint(|key: &u32| Some(RouteHint::hash(u64::from(*key))));
    for key in 0..200u32 {
        // Where the key goes with budget to spare ...
        let home = lb.ready().await.unwrap().call(key).await.unwrap();
        // ... and where it goes when the task's budget runs out between `poll_ready`
        // and `call` (a task that did much work in one poll): the picker's choice is
        // re-checked with a no-op waker in `call`, and a pending there is the budget
        // speaking, not the endpoint.
        tokio::task::yield_now().await;
        let fut = std::future::poll_fn(|cx| {
            assert!(lb.poll_ready(cx).is_ready(), "ready with a fresh budget");
            spend_budget(cx);
            Poll::Ready(lb.call(key))
        })
        .await;
        let served = fut.await.unwrap();
        assert_eq!(
            served, home,
            "key {key} moved when the task's budget ran out"
        );
    }
}
