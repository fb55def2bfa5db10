//! Tests of `Failover::deadline`, retries of idempotent requests
//! (`Balance::idempotent_if`, `Balance::idempotent_from_extensions`,
//! `Failover::retry_idempotent_if`) and hedging (`Failover::hedge`).
//!
//! - **Deadline**: three endpoints that never answer, each behind a per-attempt
//!   timeout: an idempotent request fails with `DeadlineExceeded` at the deadline, not
//!   after three per-attempt timeouts; without a deadline it takes all three. A
//!   deadline that passes while a failover attempt waits for its endpoint, after only
//!   never-sent failures, says the request was never sent.
//! - **Per-attempt timeouts**: one that may have come after sending is not retried for
//!   a request not marked idempotent; one marked `NotSent` (a connect timeout) is.
//! - **Idempotent retries**: an endpoint that fails after reading the request: marked
//!   requests succeed elsewhere; unmarked ones fail, each delivered exactly once
//!   (counted per endpoint). The retry budget, `max_attempts`, `retry_idempotent_if`
//!   and `failover_unsent` (no copy, no retry) bound them.
//! - **Hedging**: a slow endpoint (200 ms) and a fast one, hedge after 20 ms: the fast
//!   reply wins and the slow attempt's future is dropped; no hedge for unmarked
//!   requests; the first attempt can still win (the hedge is dropped); a failed
//!   attempt does not end the request while the other is in flight; the budget and the
//!   deadline bound hedges.
//! - **Copies of idempotent requests only** (`Balance::failover_copy_idempotent`): a
//!   request not marked idempotent is never copied (a body that counts its copies
//!   says so), fails over when its endpoint gives it back with `NotSent::with_request`
//!   (through several endpoints, under a deadline, telling its route hint where it
//!   went, and still carried by the last error when no attempt is left), and is not
//!   retried after a never-sent error that kept it (`failover` would retry it from its
//!   copy); marked requests are still copied, retried after sending and hedged.
//!
//! Endpoints are `service_fn`s over a shared log of calls, completions and drops (a
//! guard inside each call's future), in a `ServiceList` keyed by position; the `First`
//! picker sends every first attempt to endpoint 0. Time is paused: timers fire when
//! the runtime is otherwise idle, so each test runs in no wall time and the clock
//! readings below are exact.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::Poll;
use std::time::Duration;

use marina_balance::{
    Balance, BalanceHandle, DeadlineExceeded, Endpoints, Failover, Pick, RetryBudget, RoundRobin,
};
use marina_core::{BoxError, EndpointId, Idempotent, NotSent, Request, RouteHint, find};
use tokio::time::Instant;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::discover::ServiceList;
use tower::{Service, ServiceExt, service_fn};
use tower_test::mock;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// What an endpoint does with each request.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Answers with its index after this long.
    Answer(Duration),
    /// Fails after this long with a connection reset (the request was read).
    Reset(Duration),
    /// Fails after this long with an `io::ErrorKind::TimedOut` (a per-attempt timeout
    /// that may have come after sending).
    TimedOut(Duration),
    /// Fails after this long with a connect timeout marked `NotSent`.
    ConnectTimeout(Duration),
    /// Fails after this long with a refused connect marked `NotSent`, giving the
    /// request back (`NotSent::with_request`, as marina-pool's `PoolService` does).
    GiveBack(Duration),
    /// Never answers.
    Hang,
}

/// Per endpoint: calls received, calls that ran to their end, call futures dropped
/// (whether they ended or not).
#[derive(Default)]
struct Log {
    calls: AtomicUsize,
    finished: AtomicUsize,
    dropped: AtomicUsize,
}

impl Log {
    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
    /// Calls whose future was dropped before it ended: cancelled by the balancer.
    fn cancelled(&self) -> usize {
        self.dropped.load(SeqCst) - self.finished.load(SeqCst)
    }
}

/// Counts a call future's drop.
struct DropGuard(Arc<Log>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, SeqCst);
    }
}

type Reply = Result<usize, BoxError>;
type Endpoint<R> = tower::util::BoxCloneService<R, usize, BoxError>;

/// An endpoint behaving as `behaviour`, logging into `log`.
fn endpoint<R: Send + 'static>(index: usize, behaviour: Behaviour, log: Arc<Log>) -> Endpoint<R> {
    let svc = service_fn(move |req: R| {
        let log = log.clone();
        log.calls.fetch_add(1, SeqCst);
        async move {
            let _guard = DropGuard(log.clone());
            let out: Reply = match behaviour {
                Behaviour::Answer(after) => {
                    tokio::time::sleep(after).await;
                    Ok(index)
                }
                Behaviour::Reset(after) => {
                    tokio::time::sleep(after).await;
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("endpoint {index} reset"),
                    )
                    .into())
                }
                Behaviour::TimedOut(after) => {
                    tokio::time::sleep(after).await;
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("endpoint {index}: attempt timed out"),
                    )
                    .into())
                }
                Behaviour::ConnectTimeout(after) => {
                    tokio::time::sleep(after).await;
                    Err(
                        NotSent::new(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                            .into(),
                    )
                }
                Behaviour::GiveBack(after) => {
                    tokio::time::sleep(after).await;
                    let refused = io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("endpoint {index} refused the connection"),
                    );
                    Err(NotSent::with_request(refused, req).into())
                }
                Behaviour::Hang => std::future::pending().await,
            };
            log.finished.fetch_add(1, SeqCst);
            out
        }
    });
    tower::util::BoxCloneService::new(svc)
}

/// Endpoints behaving as `behaviours`, and their logs.
fn endpoints<R: Send + 'static>(behaviours: &[Behaviour]) -> (Vec<Endpoint<R>>, Vec<Arc<Log>>) {
    behaviours
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let log = Arc::new(Log::default());
            (endpoint(i, b, log.clone()), log)
        })
        .unzip()
}

/// A balancer over such endpoints, for `marina_core::Request`s.
type MarkedBalance = Balance<ServiceList<Vec<Endpoint<Request<u32>>>>, Request<u32>>;

fn calls(logs: &[Arc<Log>]) -> Vec<usize> {
    logs.iter().map(|l| l.calls()).collect()
}

/// Sends every first attempt to `ServiceList` endpoint 0 (or, when it is not ready, the
/// first ready one), so tests know where each request starts.
struct First;

impl Pick for First {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let zero = EndpointId::of("0");
        (0..endpoints.len())
            .find(|&i| endpoints.id(i) == zero)
            .unwrap_or(0)
    }
}

/// A balancer over `svcs`, first attempts to endpoint 0, failover `policy`, requests
/// idempotent when they carry the `Idempotent` marker.
fn marked_balance(svcs: Vec<Endpoint<Request<u32>>>, policy: Failover) -> MarkedBalance {
    Balance::new(ServiceList::new(svcs), First)
        .failover(policy)
        .idempotent_from_extensions()
}

fn marked(body: u32) -> Request<u32> {
    let mut req = Request::new(body);
    Idempotent::mark(&mut req);
    req
}

fn unmarked(body: u32) -> Request<u32> {
    Request::new(body)
}

/// Sends one request; the reply and the (paused) time it took.
async fn send<S, R>(lb: &mut S, req: R) -> (Result<usize, BoxError>, Duration)
where
    S: Service<R, Response = usize, Error = BoxError>,
{
    let start = Instant::now();
    let out = match lb.ready().await {
        Ok(svc) => svc.call(req).await,
        Err(e) => Err(e),
    };
    (out, start.elapsed())
}

fn deadline_error(err: &BoxError) -> DeadlineExceeded {
    *find::<DeadlineExceeded>(&**err).unwrap_or_else(|| panic!("not a DeadlineExceeded: {err}"))
}

fn io_kind(err: &BoxError) -> Option<io::ErrorKind> {
    find::<io::Error>(&**err).map(io::Error::kind)
}

const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------
// 1. The deadline across failover attempts
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn deadline_ends_a_request_before_three_per_try_timeouts() {
    // Each endpoint's per-attempt timeout fires after 100 ms; the deadline is 250 ms.
    let (svcs, logs) = endpoints(&[Behaviour::TimedOut(100 * MS); 3]);
    let policy = Failover::new().max_attempts(5).deadline(250 * MS);
    let mut lb = marked_balance(svcs, policy);
    let h = lb.handle();
    let (out, took) = send(&mut lb, marked(1)).await;
    let err = out.expect_err("no endpoint answers");
    let d = deadline_error(&err);
    assert_eq!(
        d,
        DeadlineExceeded {
            after: 250 * MS,
            attempts: 3,
            maybe_sent: true
        }
    );
    assert_eq!(
        err.to_string(),
        "request deadline of 250ms exceeded after 3 attempts (the request may have been sent)"
    );
    assert!(took < 300 * MS, "took {took:?}: three per-attempt timeouts");
    assert!(took >= 250 * MS, "gave up at {took:?}, before the deadline");
    // One attempt per endpoint; the third was cancelled by the deadline.
    assert_eq!(calls(&logs), [1, 1, 1]);
    assert_eq!(
        logs[0].cancelled() + logs[1].cancelled() + logs[2].cancelled(),
        1
    );
    let t = h.totals();
    assert_eq!((t.retries, t.sent_retries, t.deadlines_exceeded), (2, 2, 1));
    assert_eq!(t.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn without_a_deadline_the_same_request_takes_every_per_try_timeout() {
    let (svcs, logs) = endpoints(&[Behaviour::TimedOut(100 * MS); 3]);
    let mut lb = marked_balance(svcs, Failover::new().max_attempts(5));
    let (out, took) = send(&mut lb, marked(1)).await;
    let err = out.expect_err("no endpoint answers");
    assert_eq!(io_kind(&err), Some(io::ErrorKind::TimedOut));
    assert!(find::<DeadlineExceeded>(&*err).is_none());
    assert_eq!(took, 300 * MS);
    assert_eq!(calls(&logs), [1, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_a_single_hanging_attempt() {
    // max_attempts(1): a plain timeout on the call.
    let (svcs, logs) = endpoints(&[Behaviour::Hang, Behaviour::Answer(MS)]);
    let mut lb = marked_balance(svcs, Failover::new().max_attempts(1).deadline(50 * MS));
    let (out, took) = send(&mut lb, unmarked(1)).await;
    let d = deadline_error(&out.expect_err("it hangs"));
    assert_eq!((d.attempts, d.maybe_sent), (1, true));
    assert_eq!(took, 50 * MS);
    assert_eq!(calls(&logs), [1, 0]);
    assert_eq!(
        logs[0].cancelled(),
        1,
        "the hanging attempt was not dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn answers_before_the_deadline_pass_through() {
    let (svcs, _logs) = endpoints(&[Behaviour::Answer(40 * MS)]);
    let mut lb = marked_balance(svcs, Failover::new().deadline(50 * MS));
    for body in 0..3 {
        let (out, took) = send(&mut lb, marked(body)).await;
        assert_eq!(out.unwrap(), 0);
        assert_eq!(took, 40 * MS);
    }
    assert_eq!(lb.handle().totals().deadlines_exceeded, 0);
}

#[tokio::test(start_paused = true)]
async fn deadline_while_waiting_for_a_failover_endpoint_says_never_sent() {
    // Endpoint 0 refuses (never sent); endpoint 1 was ready at the balancer's last look
    // but is at its limit when the failover attempt readies it: the attempt waits,
    // and the deadline passes first.
    let (svcs, mut handles): (Vec<mock::Mock<u32, u32>>, Vec<_>) =
        (0..2).map(|_| mock::pair()).unzip();
    let mut lb = Balance::new(ServiceList::new(svcs), RoundRobin::new())
        .failover(Failover::new().deadline(100 * MS));
    let h = lb.handle();
    let mut task = spawn(());
    task.enter(|cx, _| assert!(lb.poll_ready(cx).is_ready()));
    let mut fut = spawn(lb.call(7));
    let (req, tx) = match handles[0].poll_request() {
        Poll::Ready(Some(r)) => r,
        _ => panic!("endpoint 0 got no request"),
    };
    assert_eq!(req, 7);
    handles[1].allow(0);
    tx.send_error(NotSent::new("connection refused"));
    assert_pending!(fut.poll(), "waits for endpoint 1");
    tokio::time::advance(100 * MS).await;
    assert!(fut.is_woken(), "the deadline did not wake the request");
    let err = assert_ready!(fut.poll()).expect_err("the deadline passed");
    assert_eq!(
        deadline_error(&err),
        DeadlineExceeded {
            after: 100 * MS,
            attempts: 1,
            maybe_sent: false
        }
    );
    assert!(err.to_string().ends_with("(the request was never sent)"));
    assert!(matches!(handles[1].poll_request(), Poll::Pending));
    assert_eq!(h.totals().deadlines_exceeded, 1);
}

#[tokio::test(start_paused = true)]
async fn deadline_applies_to_strictly_pinned_requests() {
    use marina_core::HasExtensions;
    let (svcs, logs) = endpoints(&[Behaviour::Hang, Behaviour::Answer(MS)]);
    let mut lb = Balance::new(ServiceList::new(svcs), RoundRobin::new())
        .failover(Failover::new().deadline(30 * MS))
        .route_hints_from_extensions();
    let mut req = Request::new(1u32);
    req.extensions_mut()
        .insert(RouteHint::endpoint(EndpointId::of("0")).strict());
    let (out, took) = send(&mut lb, req).await;
    let d = deadline_error(&out.expect_err("endpoint 0 hangs"));
    assert_eq!(d.attempts, 1);
    assert_eq!(took, 30 * MS);
    assert_eq!(calls(&logs), [1, 0], "a strict hint went elsewhere");
}

// ---------------------------------------------------------------------------------------
// 2. Per-attempt timeouts: maybe sent, or never sent
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_per_try_timeout_after_sending_is_not_retried_unless_idempotent() {
    let (svcs, logs) = endpoints(&[Behaviour::TimedOut(100 * MS), Behaviour::Answer(MS)]);
    let mut lb = marked_balance(svcs, Failover::new().deadline(Duration::from_secs(1)));
    let (out, took) = send(&mut lb, unmarked(1)).await;
    assert_eq!(
        io_kind(&out.expect_err("not retried")),
        Some(io::ErrorKind::TimedOut)
    );
    assert_eq!(took, 100 * MS);
    assert_eq!(calls(&logs), [1, 0]);

    let (out, _) = send(&mut lb, marked(2)).await;
    assert_eq!(out.unwrap(), 1, "an idempotent request is retried");
    assert_eq!(calls(&logs), [2, 1]);
    let t = lb.handle().totals();
    assert_eq!((t.retries, t.sent_retries), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_never_sent_timeout_is_retried_for_any_request() {
    let (svcs, logs) = endpoints(&[Behaviour::ConnectTimeout(100 * MS), Behaviour::Answer(MS)]);
    let mut lb = marked_balance(svcs, Failover::new().deadline(Duration::from_secs(1)));
    let (out, took) = send(&mut lb, unmarked(1)).await;
    assert_eq!(out.unwrap(), 1);
    assert_eq!(took, 101 * MS);
    assert_eq!(calls(&logs), [1, 1]);
    let t = lb.handle().totals();
    assert_eq!((t.retries, t.sent_retries), (1, 0));
}

// ---------------------------------------------------------------------------------------
// 3. Retries of idempotent requests after sending
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn marked_requests_are_retried_elsewhere_and_unmarked_are_delivered_once() {
    let (svcs, logs) = endpoints(&[
        Behaviour::Reset(MS),
        Behaviour::Answer(MS),
        Behaviour::Answer(MS),
    ]);
    let mut lb = marked_balance(svcs, Failover::new());
    let h = lb.handle();
    for body in 0..10 {
        let (out, _) = send(&mut lb, marked(body)).await;
        let by = out.expect("a marked request is retried");
        assert_ne!(by, 0);
    }
    assert_eq!(logs[0].calls(), 10);
    assert_eq!(logs[1].calls() + logs[2].calls(), 10);
    let t = h.totals();
    assert_eq!((t.retries, t.sent_retries), (10, 10));

    for body in 0..10 {
        let (out, _) = send(&mut lb, unmarked(body)).await;
        let err = out.expect_err("an unmarked request is not retried after sending");
        assert_eq!(io_kind(&err), Some(io::ErrorKind::ConnectionReset));
    }
    // Each unmarked request reached endpoint 0 exactly once, and nothing else.
    assert_eq!(logs[0].calls(), 20);
    assert_eq!(logs[1].calls() + logs[2].calls(), 10);
    let t = h.totals();
    assert_eq!((t.retries, t.sent_retries), (10, 10));
}

#[tokio::test(start_paused = true)]
async fn idempotent_if_marks_by_predicate_and_predicates_combine() {
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS), Behaviour::Answer(MS)]);
    let mut lb = Balance::new(ServiceList::new(svcs), First)
        .failover(Failover::new())
        .idempotent_if(|req: &Request<u32>| req.body.is_multiple_of(2))
        .idempotent_from_extensions();
    assert_eq!(
        send(&mut lb, unmarked(2)).await.0.unwrap(),
        1,
        "even: idempotent"
    );
    assert!(send(&mut lb, unmarked(3)).await.0.is_err(), "odd: not");
    assert_eq!(
        send(&mut lb, marked(5)).await.0.unwrap(),
        1,
        "marked: idempotent"
    );
    assert_eq!(calls(&logs), [3, 2]);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_idempotent_by_default() {
    // The marker alone does nothing unless the balancer reads it.
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS), Behaviour::Answer(MS)]);
    let mut lb = Balance::new(ServiceList::new(svcs), First).failover(Failover::new());
    assert!(send(&mut lb, marked(1)).await.0.is_err());
    assert_eq!(calls(&logs), [1, 0]);
}

#[tokio::test(start_paused = true)]
async fn retry_idempotent_if_narrows_the_errors_retried() {
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS), Behaviour::Answer(MS)]);
    let policy =
        Failover::new().retry_idempotent_if(|e| io_kind(e) == Some(io::ErrorKind::TimedOut));
    let mut lb = marked_balance(svcs, policy);
    let err = send(&mut lb, marked(1))
        .await
        .0
        .expect_err("a reset is not retried");
    assert_eq!(io_kind(&err), Some(io::ErrorKind::ConnectionReset));
    assert_eq!(calls(&logs), [1, 0]);
}

#[tokio::test(start_paused = true)]
async fn idempotent_retries_stop_at_max_attempts_and_the_budget() {
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS); 4]);
    let mut lb = marked_balance(svcs, Failover::new().max_attempts(3));
    assert!(send(&mut lb, marked(1)).await.0.is_err());
    assert_eq!(calls(&logs).iter().sum::<usize>(), 3, "3 attempts in all");

    // A budget of exactly one retry: the second request is not retried.
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS), Behaviour::Answer(MS)]);
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
    let mut lb = marked_balance(svcs, Failover::new().budget(budget));
    assert!(
        send(&mut lb, marked(1)).await.0.is_err(),
        "a zero budget allows no retry"
    );
    assert_eq!(calls(&logs), [1, 0]);
    assert_eq!(lb.handle().totals().retries_refused, 1);
}

#[tokio::test(start_paused = true)]
async fn failover_unsent_never_retries_sent_requests() {
    // No copy is kept: a request that may have been sent cannot be sent again.
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS), Behaviour::Answer(MS)]);
    let mut lb = Balance::new(ServiceList::new(svcs), First)
        .failover_unsent(Failover::new())
        .idempotent_from_extensions();
    assert!(send(&mut lb, marked(1)).await.0.is_err());
    assert_eq!(calls(&logs), [1, 0]);
}

// ---------------------------------------------------------------------------------------
// 4. Hedging
// ---------------------------------------------------------------------------------------

/// Endpoint 0 answers after `slow`, endpoint 1 after `fast`; hedge after 20 ms.
fn hedged(
    slow: Behaviour,
    fast: Behaviour,
    policy: Failover,
) -> (MarkedBalance, Vec<Arc<Log>>, BalanceHandle) {
    let (svcs, logs) = endpoints(&[slow, fast]);
    let lb = marked_balance(svcs, policy.hedge(20 * MS));
    let h = lb.handle();
    (lb, logs, h)
}

#[tokio::test(start_paused = true)]
async fn the_hedge_to_a_fast_endpoint_wins_and_the_slow_attempt_is_dropped() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(200 * MS),
        Behaviour::Answer(5 * MS),
        Failover::new(),
    );
    let (out, took) = send(&mut lb, marked(1)).await;
    assert_eq!(out.unwrap(), 1, "the fast reply wins");
    assert_eq!(took, 25 * MS, "hedged at 20 ms, answered 5 ms later");
    assert_eq!(calls(&logs), [1, 1]);
    assert_eq!(logs[0].cancelled(), 1, "the slow attempt was not dropped");
    assert_eq!(logs[1].cancelled(), 0);
    let t = h.totals();
    assert_eq!((t.hedges, t.hedges_won, t.retries), (1, 1, 0));
    assert_eq!(t.in_flight, 0);
    assert_eq!((t.requests, t.errors), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn unmarked_requests_are_never_hedged() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(200 * MS),
        Behaviour::Answer(5 * MS),
        Failover::new(),
    );
    let (out, took) = send(&mut lb, unmarked(1)).await;
    assert_eq!(out.unwrap(), 0);
    assert_eq!(took, 200 * MS);
    assert_eq!(calls(&logs), [1, 0]);
    assert_eq!(h.totals().hedges, 0);
}

#[tokio::test(start_paused = true)]
async fn a_reply_before_the_hedge_delay_sends_no_hedge() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(15 * MS),
        Behaviour::Answer(5 * MS),
        Failover::new(),
    );
    for body in 0..5 {
        assert_eq!(send(&mut lb, marked(body)).await.0.unwrap(), 0);
    }
    assert_eq!(calls(&logs), [5, 0]);
    assert_eq!(h.totals().hedges, 0);
}

#[tokio::test(start_paused = true)]
async fn the_first_attempt_can_still_win_and_the_hedge_is_dropped() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(30 * MS),
        Behaviour::Answer(50 * MS),
        Failover::new(),
    );
    let (out, took) = send(&mut lb, marked(1)).await;
    assert_eq!(out.unwrap(), 0);
    assert_eq!(took, 30 * MS);
    assert_eq!(calls(&logs), [1, 1]);
    assert_eq!(logs[1].cancelled(), 1, "the losing hedge was not dropped");
    let t = h.totals();
    assert_eq!((t.hedges, t.hedges_won), (1, 0));
    assert_eq!(t.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_waits_for_the_hedge_in_flight() {
    // Endpoint 0 fails at 30 ms, after the hedge went out at 20 ms; the hedge answers
    // at 70 ms: the request succeeds, with no further attempt.
    let (mut lb, logs, h) = hedged(
        Behaviour::Reset(30 * MS),
        Behaviour::Answer(50 * MS),
        Failover::new(),
    );
    let (out, took) = send(&mut lb, marked(1)).await;
    assert_eq!(out.unwrap(), 1);
    assert_eq!(took, 70 * MS);
    assert_eq!(calls(&logs), [1, 1]);
    let t = h.totals();
    assert_eq!((t.hedges, t.hedges_won, t.retries), (1, 1, 0));
    assert_eq!(t.errors, 1);
}

#[tokio::test(start_paused = true)]
async fn both_attempts_failing_fails_the_request_with_the_last_error() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Reset(30 * MS),
        Behaviour::TimedOut(50 * MS),
        Failover::new().max_attempts(2),
    );
    let (out, took) = send(&mut lb, marked(1)).await;
    assert_eq!(
        io_kind(&out.expect_err("both fail")),
        Some(io::ErrorKind::TimedOut)
    );
    assert_eq!(took, 70 * MS);
    assert_eq!(calls(&logs), [1, 1]);
    let t = h.totals();
    assert_eq!((t.hedges, t.hedges_won, t.retries), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn hedges_draw_on_the_retry_budget() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(200 * MS),
        Behaviour::Answer(5 * MS),
        Failover::new().budget(budget),
    );
    let (out, took) = send(&mut lb, marked(1)).await;
    assert_eq!(out.unwrap(), 0);
    assert_eq!(took, 200 * MS);
    assert_eq!(calls(&logs), [1, 0]);
    let t = h.totals();
    assert_eq!((t.hedges, t.retries_refused), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn hedges_count_toward_max_attempts() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(200 * MS),
        Behaviour::Answer(5 * MS),
        Failover::new().max_attempts(1),
    );
    assert_eq!(send(&mut lb, marked(1)).await.0.unwrap(), 0);
    assert_eq!(calls(&logs), [1, 0]);
    assert_eq!(h.totals().hedges, 0);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_hedged_request_and_drops_both_attempts() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(200 * MS),
        Behaviour::Answer(200 * MS),
        Failover::new().deadline(100 * MS),
    );
    let (out, took) = send(&mut lb, marked(1)).await;
    let d = deadline_error(&out.expect_err("both are too slow"));
    assert_eq!((d.attempts, d.maybe_sent), (2, true));
    assert_eq!(took, 100 * MS);
    assert_eq!(calls(&logs), [1, 1]);
    assert_eq!((logs[0].cancelled(), logs[1].cancelled()), (1, 1));
    let t = h.totals();
    assert_eq!((t.hedges, t.hedges_won, t.deadlines_exceeded), (1, 0, 1));
    assert_eq!(t.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_hedged_request_drops_both_attempts() {
    let (mut lb, logs, h) = hedged(
        Behaviour::Answer(200 * MS),
        Behaviour::Answer(200 * MS),
        Failover::new(),
    );
    lb.ready().await.unwrap();
    let fut = lb.call(marked(1));
    let out = tokio::time::timeout(50 * MS, fut).await;
    assert!(out.is_err(), "nobody answered within 50 ms");
    assert_eq!(calls(&logs), [1, 1], "the hedge went out at 20 ms");
    assert_eq!((logs[0].cancelled(), logs[1].cancelled()), (1, 1));
    assert_eq!(h.totals().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_reports_where_it_went_to_the_route_hint_when_it_wins() {
    use marina_core::HasExtensions;
    let (svcs, _logs) = endpoints(&[Behaviour::Answer(200 * MS), Behaviour::Answer(5 * MS)]);
    let mut lb = Balance::new(ServiceList::new(svcs), First)
        .failover(Failover::new().hedge(20 * MS))
        .idempotent_from_extensions()
        .route_hints_from_extensions();
    let hint = RouteHint::any();
    let mut req = marked(1);
    req.extensions_mut().insert(hint.clone());
    assert_eq!(send(&mut lb, req).await.0.unwrap(), 1);
    assert_eq!(hint.chosen(), Some(EndpointId::of("1")));
}

#[tokio::test(start_paused = true)]
async fn a_keyed_request_hedges_where_its_key_would_fail_over() {
    use marina_core::HasExtensions;
    // Endpoint 0 (where `First` sends every request) is slow, the others fast: each
    // request is answered by its hedge.
    let mut behaviours = vec![Behaviour::Answer(200 * MS)];
    behaviours.extend([Behaviour::Answer(5 * MS); 5]);
    let (svcs, _logs) = endpoints(&behaviours);
    let mut lb = Balance::new(ServiceList::new(svcs), First)
        .failover(Failover::new().hedge(20 * MS))
        .idempotent_from_extensions()
        .route_hints_from_extensions();
    let pinned = EndpointId::of("0");
    let mut hedged_to = Vec::new();
    for key in 0..40u64 {
        let mut req = marked(1);
        req.extensions_mut()
            .insert(RouteHint::endpoint(pinned).with_failover_key(key));
        hedged_to.push(send(&mut lb, req).await.0.unwrap());
    }
    // By key, not by load (with equal loads the least loaded is always the first).
    let spread: std::collections::BTreeSet<_> = hedged_to.iter().collect();
    assert!(spread.len() >= 3, "hedges of 40 keys went to {spread:?}");
    for key in 0..40u64 {
        let mut req = marked(1);
        req.extensions_mut()
            .insert(RouteHint::endpoint(pinned).with_failover_key(key));
        let again = send(&mut lb, req).await.0.unwrap();
        assert_eq!(again, hedged_to[key as usize], "key {key} hedged elsewhere");
    }
}

#[tokio::test(start_paused = true)]
async fn no_hedge_without_another_ready_endpoint() {
    let (svcs, logs) = endpoints(&[Behaviour::Answer(100 * MS)]);
    let mut lb = marked_balance(svcs, Failover::new().hedge(20 * MS));
    let (out, took) = send(&mut lb, marked(1)).await;
    assert_eq!(out.unwrap(), 0);
    assert_eq!(took, 100 * MS);
    assert_eq!(calls(&logs), [1]);
    assert_eq!(lb.handle().totals().hedges, 0);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_attempt_is_hand_polled_through_mocks() {
    // The same with tower-test mocks, polled by hand: the hedge is sent only once the
    // delay has passed, and the loser's request is dropped at its mock.
    let (svcs, mut handles): (Vec<mock::Mock<Request<u32>, u32>>, Vec<_>) =
        (0..2).map(|_| mock::pair()).unzip();
    let mut lb = Balance::new(ServiceList::new(svcs), First)
        .failover(Failover::new().hedge(20 * MS))
        .idempotent_from_extensions();
    let mut task = spawn(());
    task.enter(|cx, _| assert!(lb.poll_ready(cx).is_ready()));
    let mut fut = spawn(lb.call(marked(9)));
    assert_pending!(fut.poll());
    let (_, slow_tx) = match handles[0].poll_request() {
        Poll::Ready(Some(r)) => r,
        _ => panic!("endpoint 0 got no request"),
    };
    tokio::time::advance(19 * MS).await;
    assert_pending!(fut.poll());
    assert!(
        matches!(handles[1].poll_request(), Poll::Pending),
        "hedged too early"
    );
    tokio::time::advance(MS).await;
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    let (req, fast_tx) = match handles[1].poll_request() {
        Poll::Ready(Some(r)) => r,
        _ => panic!("no hedge at 20 ms"),
    };
    assert_eq!(req.body, 9);
    assert!(Idempotent::is_marked(&req), "the copy keeps the marker");
    fast_tx.send_response(90);
    assert_eq!(assert_ready_ok!(fut.poll()), 90);
    // The slow attempt was dropped: nothing is in flight, though endpoint 0 never
    // answered.
    let t = lb.handle().totals();
    assert_eq!((t.in_flight, t.hedges, t.hedges_won), (0, 1, 1));
    drop(slow_tx);
}

// ---------------------------------------------------------------------------------------
// 5. Copies of idempotent requests only (`failover_copy_idempotent`)
// ---------------------------------------------------------------------------------------

/// A request body that counts its copies.
#[derive(Debug)]
struct Tally {
    n: u32,
    copies: Arc<AtomicUsize>,
}

impl Clone for Tally {
    fn clone(&self) -> Self {
        self.copies.fetch_add(1, SeqCst);
        Tally {
            n: self.n,
            copies: self.copies.clone(),
        }
    }
}

type TallyBalance = Balance<ServiceList<Vec<Endpoint<Request<Tally>>>>, Request<Tally>>;

/// A request of body `n` counting its copies into `copies`, marked idempotent when
/// `idempotent`.
fn tally(n: u32, copies: &Arc<AtomicUsize>, idempotent: bool) -> Request<Tally> {
    let mut req = Request::new(Tally {
        n,
        copies: copies.clone(),
    });
    if idempotent {
        Idempotent::mark(&mut req);
    }
    req
}

/// A balancer over `svcs` that copies only idempotent requests, first attempts to
/// endpoint 0, requests idempotent when they carry the `Idempotent` marker.
fn copy_idempotent_balance(svcs: Vec<Endpoint<Request<Tally>>>, policy: Failover) -> TallyBalance {
    Balance::new(ServiceList::new(svcs), First)
        .failover_copy_idempotent(policy)
        .idempotent_from_extensions()
}

#[tokio::test(start_paused = true)]
async fn copy_idempotent_fails_over_requests_given_back_without_copying_them() {
    let (svcs, logs) = endpoints(&[
        Behaviour::GiveBack(MS),
        Behaviour::GiveBack(MS),
        Behaviour::Answer(MS),
    ]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new());
    let copies = Arc::new(AtomicUsize::new(0));
    for n in 0..5 {
        let (out, took) = send(&mut lb, tally(n, &copies, false)).await;
        assert_eq!(out.unwrap(), 2, "given back by endpoints 0 and 1");
        assert_eq!(took, 3 * MS);
    }
    assert_eq!(copies.load(SeqCst), 0, "a request was copied");
    assert_eq!(calls(&logs), [5, 5, 5]);
    let t = lb.handle().totals();
    assert_eq!((t.retries, t.sent_retries, t.in_flight), (10, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn copy_idempotent_does_not_retry_a_never_sent_error_that_kept_its_request() {
    // A connect timeout marked `NotSent` without the request: nothing to send again.
    let (svcs, logs) = endpoints(&[Behaviour::ConnectTimeout(MS), Behaviour::Answer(MS)]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new());
    let copies = Arc::new(AtomicUsize::new(0));
    let err = send(&mut lb, tally(1, &copies, false))
        .await
        .0
        .expect_err("not retried");
    assert!(find::<NotSent>(&*err).is_some(), "{err}");
    assert_eq!(io_kind(&err), Some(io::ErrorKind::TimedOut));
    assert_eq!(calls(&logs), [1, 0]);
    assert_eq!(copies.load(SeqCst), 0);
    assert_eq!(lb.handle().totals().retries, 0);

    // A marked request is copied, and retried from its copy.
    assert_eq!(send(&mut lb, tally(2, &copies, true)).await.0.unwrap(), 1);
    assert_eq!(calls(&logs), [2, 1]);
    assert!(copies.load(SeqCst) >= 1);
    assert_eq!(lb.handle().totals().retries, 1);

    // `failover` copies every request, and retries this one from its copy.
    let (svcs, logs) = endpoints(&[Behaviour::ConnectTimeout(MS), Behaviour::Answer(MS)]);
    let mut lb = Balance::new(ServiceList::new(svcs), First).failover(Failover::new());
    let copies = Arc::new(AtomicUsize::new(0));
    assert_eq!(send(&mut lb, tally(3, &copies, false)).await.0.unwrap(), 1);
    assert_eq!(calls(&logs), [1, 1]);
    assert!(copies.load(SeqCst) >= 1);
}

#[tokio::test(start_paused = true)]
async fn copy_idempotent_still_retries_marked_requests_after_sending_and_hedges_them() {
    let (svcs, logs) = endpoints(&[Behaviour::Reset(MS), Behaviour::Answer(MS)]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new());
    let copies = Arc::new(AtomicUsize::new(0));
    assert_eq!(send(&mut lb, tally(1, &copies, true)).await.0.unwrap(), 1);
    let err = send(&mut lb, tally(2, &copies, false))
        .await
        .0
        .expect_err("an unmarked request is not retried after sending");
    assert_eq!(io_kind(&err), Some(io::ErrorKind::ConnectionReset));
    assert_eq!(calls(&logs), [2, 1]);
    let t = lb.handle().totals();
    assert_eq!((t.retries, t.sent_retries), (1, 1));

    let (svcs, logs) = endpoints(&[Behaviour::Answer(200 * MS), Behaviour::Answer(5 * MS)]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new().hedge(20 * MS));
    let (out, took) = send(&mut lb, tally(3, &copies, true)).await;
    assert_eq!(
        (out.unwrap(), took),
        (1, 25 * MS),
        "hedged, the fast reply wins"
    );
    assert_eq!(logs[0].cancelled(), 1);
    let (out, took) = send(&mut lb, tally(4, &copies, false)).await;
    assert_eq!(
        (out.unwrap(), took),
        (0, 200 * MS),
        "not marked: not hedged"
    );
    assert_eq!(calls(&logs), [2, 1]);
    let t = lb.handle().totals();
    assert_eq!((t.hedges, t.hedges_won, t.in_flight), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn copy_idempotent_reports_the_failover_endpoint_and_keeps_the_deadline() {
    use marina_core::HasExtensions;
    let (svcs, _logs) = endpoints(&[Behaviour::GiveBack(MS), Behaviour::Answer(MS)]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new()).route_hints_from_extensions();
    let copies = Arc::new(AtomicUsize::new(0));
    let hint = RouteHint::any();
    let mut req = tally(1, &copies, false);
    req.extensions_mut().insert(hint.clone());
    assert_eq!(send(&mut lb, req).await.0.unwrap(), 1);
    assert_eq!(hint.chosen(), Some(EndpointId::of("1")));
    assert_eq!(copies.load(SeqCst), 0);
    // The same with the hint reader set before failover, and with `failover_unsent`.
    for unsent in [false, true] {
        let (svcs, _logs) = endpoints(&[Behaviour::GiveBack(MS), Behaviour::Answer(MS)]);
        let lb = Balance::new(ServiceList::new(svcs), First).route_hints_from_extensions();
        let mut lb = if unsent {
            lb.failover_unsent(Failover::new())
        } else {
            lb.failover_copy_idempotent(Failover::new())
        };
        let hint = RouteHint::any();
        let mut req = tally(1, &copies, false);
        req.extensions_mut().insert(hint.clone());
        assert_eq!(send(&mut lb, req).await.0.unwrap(), 1);
        assert_eq!(hint.chosen(), Some(EndpointId::of("1")), "unsent: {unsent}");
    }

    // Under a deadline: given back by endpoint 0 at 1 ms, sent to endpoint 1, which
    // never answers.
    let (svcs, logs) = endpoints(&[Behaviour::GiveBack(MS), Behaviour::Hang]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new().deadline(100 * MS));
    let (out, took) = send(&mut lb, tally(2, &copies, false)).await;
    let d = deadline_error(&out.expect_err("endpoint 1 hangs"));
    assert_eq!((d.attempts, d.maybe_sent), (2, true));
    assert_eq!(took, 100 * MS);
    assert_eq!(calls(&logs), [1, 1]);
    assert_eq!(logs[1].cancelled(), 1);
    assert_eq!(copies.load(SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn copy_idempotent_leaves_the_request_in_the_last_error() {
    let (svcs, logs) = endpoints(&[Behaviour::GiveBack(MS); 3]);
    let mut lb = copy_idempotent_balance(svcs, Failover::new().max_attempts(2));
    let copies = Arc::new(AtomicUsize::new(0));
    let err = send(&mut lb, tally(7, &copies, false))
        .await
        .0
        .expect_err("every endpoint gives it back");
    assert_eq!(calls(&logs).iter().sum::<usize>(), 2, "2 attempts in all");
    let back: Request<Tally> =
        marina_core::take_unsent_request(&*err).expect("the request comes back to the caller");
    assert_eq!(back.body.n, 7);
    assert_eq!(copies.load(SeqCst), 0);
}
