//! Passive outlier detection: detectors, the ejection gate, half-open trials, ejection
//! times, classifiers, status subscriptions and error pass-through.
//!
//! Every test runs on a paused clock and polls `poll_ready` by hand (tokio-test's mock
//! task), so wake-ups and ejection times are checked exactly.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_health::{
    Classify, FailureRate, Health, HealthConfig, HealthHandle, Status, classify_fn,
};
use tokio::time::{Instant, advance};
use tokio_test::task::{self, Spawn};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::Service;
use tower_test::mock;

// ---------------------------------------------------------------------------------------
// Test doubles and helpers
// ---------------------------------------------------------------------------------------

/// The backend's error: carries the request, so pass-through is checked by value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Boom(u32);

impl fmt::Display for Boom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "boom {}", self.0)
    }
}

impl std::error::Error for Boom {}

/// An always-ready backend that echoes the request, or fails with `Boom(request)` while
/// `fail` is set.
#[derive(Debug, Clone)]
struct Backend {
    fail: Arc<AtomicBool>,
}

impl Service<u32> for Backend {
    type Response = u32;
    type Error = Boom;
    type Future = Ready<Result<u32, Boom>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u32) -> Self::Future {
        ready(if self.fail.load(Ordering::SeqCst) {
            Err(Boom(req))
        } else {
            Ok(req)
        })
    }
}

/// A backend, and the switch that makes it fail.
fn backend() -> (Backend, Arc<AtomicBool>) {
    let fail = Arc::new(AtomicBool::new(false));
    (Backend { fail: fail.clone() }, fail)
}

fn health(config: HealthConfig) -> (Health<Backend>, Arc<AtomicBool>) {
    let (b, fail) = backend();
    (Health::new(b, config), fail)
}

/// `HealthConfig` with the failure-rate detector off (only consecutive failures).
fn consecutive_only() -> HealthConfig {
    HealthConfig {
        failure_rate: None,
        ..HealthConfig::default()
    }
}

/// Polls `svc`'s readiness once, from `task`.
fn poll_ready<K>(task: &mut Spawn<()>, svc: &mut Health<Backend, K>) -> Poll<Result<(), Boom>>
where
    K: Classify<u32, Boom>,
{
    task.enter(|cx, _| svc.poll_ready(cx))
}

/// Sends one request, which must be ready at once (never waits for the clock).
async fn send<K>(svc: &mut Health<Backend, K>, req: u32) -> Result<u32, Boom>
where
    K: Classify<u32, Boom>,
{
    let mut t = task::spawn(());
    match poll_ready(&mut t, svc) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => panic!("poll_ready failed: {e}"),
        Poll::Pending => panic!("not ready (status {:?})", svc.handle().status()),
    }
    svc.call(req).await
}

/// Sends `n` requests with the backend failing.
async fn fail_n<K>(svc: &mut Health<Backend, K>, fail: &AtomicBool, n: u32)
where
    K: Classify<u32, Boom>,
{
    fail.store(true, Ordering::SeqCst);
    for i in 0..n {
        assert_eq!(send(svc, i).await, Err(Boom(i)));
    }
}

/// Sends `n` requests with the backend succeeding.
async fn succeed_n<K>(svc: &mut Health<Backend, K>, fail: &AtomicBool, n: u32)
where
    K: Classify<u32, Boom>,
{
    fail.store(false, Ordering::SeqCst);
    for i in 0..n {
        assert_eq!(send(svc, i).await, Ok(i));
    }
}

/// How long the current ejection lasts from now; panics unless ejected for a time.
fn ejected_for(h: &HealthHandle) -> Duration {
    match h.status() {
        Status::Ejected { until: Some(until) } => until.duration_since(Instant::now()),
        other => panic!("expected a timed ejection, got {other:?}"),
    }
}

/// Waits out the current ejection, then runs the half-open trial on `svc`.
async fn trial(svc: &mut Health<Backend>, fail: &AtomicBool, fails: bool) {
    let h = svc.handle();
    advance(ejected_for(&h)).await;
    let mut t = task::spawn(());
    assert_ready_ok!(poll_ready(&mut t, svc));
    assert_eq!(h.status(), Status::Degraded);
    fail.store(fails, Ordering::SeqCst);
    let out = svc.call(1).await;
    assert_eq!(out.is_err(), fails);
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

type MockHealth = Health<mock::Mock<&'static str, &'static str>>;
type MockHandle = mock::Handle<&'static str, &'static str>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn mock_poll_ready(task: &mut Spawn<()>, svc: &mut MockHealth) -> Poll<Result<(), BoxError>> {
    task.enter(|cx, _| svc.poll_ready(cx))
}

/// One request through the mock that the mock answers with an error.
async fn mock_fail(svc: &mut MockHealth, handle: &mut MockHandle) {
    let mut t = task::spawn(());
    assert_ready_ok!(mock_poll_ready(&mut t, svc));
    let fut = svc.call("fail");
    let (req, send) = handle.next_request().await.expect("request");
    assert_eq!(req, "fail");
    send.send_error(Boom(0));
    assert!(fut.await.is_err());
}

// ---------------------------------------------------------------------------------------
// 1. Consecutive failures
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn five_consecutive_failures_eject_for_base() {
    let (mut svc, fail) = health(HealthConfig::default());
    let h = svc.handle();
    assert_eq!(h.status(), Status::Unknown);

    fail_n(&mut svc, &fail, 4).await;
    assert_eq!(h.status(), Status::Healthy, "4 failures must not eject");
    assert_eq!(h.report().consecutive_failures, 4);

    let before = Instant::now();
    fail_n(&mut svc, &fail, 1).await;
    assert_eq!(
        h.status(),
        Status::Ejected {
            until: Some(before + secs(30))
        }
    );
    assert_eq!(h.report().ejections, 1);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_count() {
    let (mut svc, fail) = health(HealthConfig::default());
    let h = svc.handle();

    fail_n(&mut svc, &fail, 4).await;
    succeed_n(&mut svc, &fail, 1).await;
    assert_eq!(h.report().consecutive_failures, 0);
    fail_n(&mut svc, &fail, 4).await;
    assert_eq!(
        h.status(),
        Status::Healthy,
        "4 + 4 failures split by a success must not eject"
    );
    assert_eq!(h.report().consecutive_failures, 4);

    fail_n(&mut svc, &fail, 1).await;
    assert!(matches!(h.status(), Status::Ejected { until: Some(_) }));
}

#[tokio::test(start_paused = true)]
async fn custom_consecutive_threshold() {
    let (mut svc, fail) = health(HealthConfig {
        consecutive_failures: 2,
        ..consecutive_only()
    });
    let h = svc.handle();
    fail_n(&mut svc, &fail, 1).await;
    assert_eq!(h.status(), Status::Healthy);
    fail_n(&mut svc, &fail, 1).await;
    assert_eq!(ejected_for(&h), secs(30));
}

// ---------------------------------------------------------------------------------------
// 2. The readiness gate and its wake-up
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ejected_gate_is_pending_and_wakes_when_the_ejection_ends() {
    let (mut svc, fail) = health(HealthConfig::default());
    let h = svc.handle();
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(ejected_for(&h), secs(30));

    let mut t = task::spawn(());
    assert_pending!(poll_ready(&mut t, &mut svc));
    assert!(!t.is_woken());

    advance(Duration::from_millis(29_900)).await;
    assert!(!t.is_woken(), "woken before the ejection ended");
    assert_pending!(poll_ready(&mut t, &mut svc));
    assert!(h.status() != Status::Degraded);

    advance(Duration::from_millis(200)).await;
    assert!(t.is_woken(), "not woken when the ejection ended");
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
    assert_eq!(h.status(), Status::Degraded, "half-open after the ejection");
}

#[tokio::test(start_paused = true)]
async fn ejected_gate_never_errors() {
    let (mut svc, fail) = health(HealthConfig::default());
    fail_n(&mut svc, &fail, 5).await;
    let mut t = task::spawn(());
    for _ in 0..30 {
        assert_pending!(poll_ready(&mut t, &mut svc));
        advance(secs(1)).await;
    }
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
}

// ---------------------------------------------------------------------------------------
// 3. Half-open: one trial, its outcome, ejection times
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_one_trial_and_success_wakes_the_others() {
    let (mut a, fail) = health(HealthConfig::default());
    let mut b = a.clone();
    let h = a.handle();
    fail_n(&mut a, &fail, 5).await;

    let (mut ta, mut tb) = (task::spawn(()), task::spawn(()));
    assert_pending!(poll_ready(&mut ta, &mut a));
    assert_pending!(poll_ready(&mut tb, &mut b));
    advance(secs(30)).await;
    assert!(ta.is_woken() && tb.is_woken());

    assert_ready_ok!(poll_ready(&mut ta, &mut a));
    assert_eq!(h.status(), Status::Degraded);
    assert_pending!(poll_ready(&mut tb, &mut b));
    // The holder stays ready; the other stays out, however long it waits.
    assert_ready_ok!(poll_ready(&mut ta, &mut a));
    advance(secs(600)).await;
    assert!(!tb.is_woken());
    assert_pending!(poll_ready(&mut tb, &mut b));

    fail.store(false, Ordering::SeqCst);
    assert_eq!(a.call(7).await, Ok(7));
    assert_eq!(h.status(), Status::Healthy);
    assert!(
        tb.is_woken(),
        "the waiting clone was not woken by the trial's success"
    );
    assert_ready_ok!(poll_ready(&mut tb, &mut b));
    assert_eq!(h.report().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn failed_trials_eject_for_n_times_base() {
    let (mut svc, fail) = health(consecutive_only());
    let h = svc.handle();
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(ejected_for(&h), secs(30));

    trial(&mut svc, &fail, true).await;
    assert_eq!(ejected_for(&h), secs(60), "second ejection: 2 x base");
    assert_eq!(h.report().ejections, 2);

    // Still closed just before the end of the longer ejection.
    let mut t = task::spawn(());
    advance(secs(59)).await;
    assert_pending!(poll_ready(&mut t, &mut svc));
    advance(secs(1)).await;
    assert!(t.is_woken());

    trial(&mut svc, &fail, true).await;
    assert_eq!(ejected_for(&h), secs(90), "third ejection: 3 x base");
}

#[tokio::test(start_paused = true)]
async fn ejection_time_is_capped_at_max() {
    let (mut svc, fail) = health(HealthConfig {
        max_ejection: secs(60),
        ..consecutive_only()
    });
    let h = svc.handle();
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(ejected_for(&h), secs(30));
    trial(&mut svc, &fail, true).await;
    assert_eq!(ejected_for(&h), secs(60));
    trial(&mut svc, &fail, true).await;
    assert_eq!(ejected_for(&h), secs(60), "capped at max_ejection");
    trial(&mut svc, &fail, true).await;
    assert_eq!(ejected_for(&h), secs(60), "capped at max_ejection");
}

#[tokio::test(start_paused = true)]
async fn waiting_clone_is_woken_when_a_reejection_ends() {
    let (mut a, fail) = health(consecutive_only());
    let mut b = a.clone();
    let h = a.handle();
    fail_n(&mut a, &fail, 5).await;

    let (mut ta, mut tb) = (task::spawn(()), task::spawn(()));
    assert_pending!(poll_ready(&mut tb, &mut b));
    advance(secs(30)).await;
    assert!(tb.is_woken());
    assert_ready_ok!(poll_ready(&mut ta, &mut a)); // a holds the trial
    assert_pending!(poll_ready(&mut tb, &mut b)); // b waits for it

    fail.store(true, Ordering::SeqCst);
    assert_eq!(a.call(3).await, Err(Boom(3)));
    assert_eq!(ejected_for(&h), secs(60));
    if tb.is_woken() {
        // Woken at the re-ejection: it must see the gate closed and arm its timer.
        assert_pending!(poll_ready(&mut tb, &mut b));
    }

    // Nobody polls `a` again: `b` alone must learn that the second ejection ended.
    advance(secs(60) + Duration::from_millis(1)).await;
    assert!(
        tb.is_woken(),
        "a clone waiting for the half-open trial is never woken after the trial fails and the \
         re-ejection ends"
    );
    assert_ready_ok!(poll_ready(&mut tb, &mut b));
    assert_eq!(h.status(), Status::Degraded);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_clone_that_holds_the_trial_hands_it_on() {
    let (mut a, fail) = health(HealthConfig::default());
    let mut b = a.clone();
    let h = a.handle();
    fail_n(&mut a, &fail, 5).await;
    advance(secs(30)).await;

    let (mut ta, mut tb) = (task::spawn(()), task::spawn(()));
    assert_ready_ok!(poll_ready(&mut ta, &mut a));
    assert_pending!(poll_ready(&mut tb, &mut b));
    assert!(!tb.is_woken());

    drop(a);
    assert!(
        tb.is_woken(),
        "dropping the trial holder did not wake the waiter"
    );
    assert_ready_ok!(poll_ready(&mut tb, &mut b));
    assert_eq!(h.status(), Status::Degraded);

    // `b` now holds the trial, and its outcome decides.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(b.call(5).await, Ok(5));
    assert_eq!(h.status(), Status::Healthy);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_trial_response_future_hands_the_trial_on() {
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    let mut a: MockHealth = Health::new(inner, HealthConfig::default());
    let mut b = a.clone();
    let h = a.handle();
    for _ in 0..5 {
        mock_fail(&mut a, &mut handle).await;
    }
    assert_eq!(ejected_for(&h), secs(30));
    advance(secs(30)).await;

    let (mut ta, mut tb) = (task::spawn(()), task::spawn(()));
    assert_ready_ok!(mock_poll_ready(&mut ta, &mut a));
    let fut = a.call("trial");
    let (req, _pending_response) = handle.next_request().await.expect("request");
    assert_eq!(req, "trial");
    // `a` gave the trial to its call: polling `a` again does not admit a second one.
    assert_pending!(mock_poll_ready(&mut ta, &mut a));
    assert_pending!(mock_poll_ready(&mut tb, &mut b));

    drop(fut);
    assert!(
        tb.is_woken(),
        "dropping the trial's future did not wake the waiter"
    );
    assert_ready_ok!(mock_poll_ready(&mut tb, &mut b));
    assert_eq!(
        h.status(),
        Status::Degraded,
        "a cancelled trial decides nothing"
    );
    assert_pending!(mock_poll_ready(&mut ta, &mut a), "only one trial at a time");

    let mut fut = task::spawn(b.call("trial 2"));
    let (req, send) = handle.next_request().await.expect("request");
    assert_eq!(req, "trial 2");
    assert_pending!(fut.poll());
    send.send_response("ok");
    assert_eq!(assert_ready_ok!(fut.poll()), "ok");
    assert_eq!(h.status(), Status::Healthy);
    assert!(ta.is_woken());
}

// ---------------------------------------------------------------------------------------
// 4. The failure-rate detector
// ---------------------------------------------------------------------------------------

fn rate_only() -> HealthConfig {
    HealthConfig {
        consecutive_failures: 0,
        failure_rate: Some(FailureRate {
            threshold: 0.5,
            min_requests: 20,
            window: secs(10),
        }),
        ..HealthConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn failure_rate_needs_min_requests() {
    let (mut svc, fail) = health(rate_only());
    let h = svc.handle();

    // 10 of 12 fail (83 %), but 12 < 20 requests: not enough to judge. Also checks that
    // `consecutive_failures: 0` disables that detector.
    fail_n(&mut svc, &fail, 10).await;
    succeed_n(&mut svc, &fail, 2).await;
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(h.report().window, (12, 10));

    // 12 of 19: still short of the volume.
    fail_n(&mut svc, &fail, 2).await;
    succeed_n(&mut svc, &fail, 5).await;
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(h.report().window, (19, 12));

    // The 20th request: 12 of 20 (60 %) fail: ejected.
    let before = Instant::now();
    succeed_n(&mut svc, &fail, 1).await;
    assert_eq!(
        h.status(),
        Status::Ejected {
            until: Some(before + secs(30))
        }
    );
}

#[tokio::test(start_paused = true)]
async fn failure_rate_below_threshold_does_not_eject() {
    let (mut svc, fail) = health(rate_only());
    let h = svc.handle();
    // 40 requests, 15 failing (37.5 %), interleaved.
    for _ in 0..5 {
        fail_n(&mut svc, &fail, 3).await;
        succeed_n(&mut svc, &fail, 5).await;
    }
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(h.report().window, (40, 15));
}

#[tokio::test(start_paused = true)]
async fn failures_older_than_the_window_do_not_count() {
    let (mut svc, fail) = health(rate_only());
    let h = svc.handle();

    fail_n(&mut svc, &fail, 10).await;
    advance(secs(11)).await;
    assert_eq!(h.report().window, (0, 0), "the first batch left the window");

    // 8 of 20 fail now (40 %); with the old batch it would be 18 of 30 (60 %).
    succeed_n(&mut svc, &fail, 12).await;
    fail_n(&mut svc, &fail, 8).await;
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(h.report().window, (20, 8));
}

#[tokio::test(start_paused = true)]
async fn failures_within_the_window_do_count() {
    // The control for the test above: the same traffic 5 s apart ejects.
    let (mut svc, fail) = health(rate_only());
    let h = svc.handle();

    fail_n(&mut svc, &fail, 10).await;
    advance(secs(5)).await;
    assert_eq!(h.report().window, (10, 10));
    succeed_n(&mut svc, &fail, 12).await;
    assert_eq!(h.status(), Status::Healthy, "10 of 22");
    fail.store(true, Ordering::SeqCst);
    // 11 of 23: not over half; 12 of 24: not over half; 13 of 25: over half.
    for (i, ejected) in [(0, false), (1, false), (2, true)] {
        assert_eq!(send(&mut svc, i).await, Err(Boom(i)));
        assert_eq!(!h.status().is_ready(), ejected, "after failure {i}");
    }
}

// ---------------------------------------------------------------------------------------
// 5. reset_after
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ejection_count_resets_after_a_healthy_period() {
    let (mut svc, fail) = health(consecutive_only());
    let h = svc.handle();
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(ejected_for(&h), secs(30));
    trial(&mut svc, &fail, false).await;
    assert_eq!(h.status(), Status::Healthy);

    advance(secs(300)).await; // reset_after (default 300 s) healthy
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(
        ejected_for(&h),
        secs(30),
        "the count started again: base, not 2 x base"
    );
    assert_eq!(h.report().ejections, 1);
}

#[tokio::test(start_paused = true)]
async fn ejection_count_holds_within_reset_after() {
    let (mut svc, fail) = health(consecutive_only());
    let h = svc.handle();
    fail_n(&mut svc, &fail, 5).await;
    trial(&mut svc, &fail, false).await;
    assert_eq!(h.status(), Status::Healthy);

    advance(secs(299)).await;
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(
        ejected_for(&h),
        secs(60),
        "healthy for less than reset_after: 2 x base"
    );
    assert_eq!(h.report().ejections, 2);
}

#[tokio::test(start_paused = true)]
async fn custom_reset_after() {
    let (mut svc, fail) = health(HealthConfig {
        reset_after: secs(10),
        ..consecutive_only()
    });
    let h = svc.handle();
    fail_n(&mut svc, &fail, 5).await;
    trial(&mut svc, &fail, true).await;
    assert_eq!(ejected_for(&h), secs(60));
    trial(&mut svc, &fail, false).await;
    advance(secs(10)).await;
    fail_n(&mut svc, &fail, 5).await;
    assert_eq!(ejected_for(&h), secs(30));
}

// ---------------------------------------------------------------------------------------
// 6. Classifiers
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn custom_classifier_ejects_on_ok_responses() {
    let (b, fail) = backend();
    // Responses >= 500 are failures too.
    let mut svc = Health::builder(b)
        .config(consecutive_only())
        .classify(classify_fn(|outcome: Result<&u32, &Boom>| match outcome {
            Ok(code) => *code >= 500,
            Err(_) => true,
        }))
        .build();
    let h = svc.handle();
    fail.store(false, Ordering::SeqCst);

    for _ in 0..4 {
        assert_eq!(
            send(&mut svc, 503).await,
            Ok(503),
            "the response itself passes through"
        );
    }
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(h.report().consecutive_failures, 4);
    assert_eq!(send(&mut svc, 200).await, Ok(200));
    assert_eq!(
        h.report().consecutive_failures,
        0,
        "a good response resets the count"
    );

    for _ in 0..5 {
        assert_eq!(send(&mut svc, 500).await, Ok(500));
    }
    assert_eq!(ejected_for(&h), secs(30));
}

#[tokio::test(start_paused = true)]
async fn custom_classifier_can_ignore_errors() {
    let (b, fail) = backend();
    let mut svc = Health::builder(b)
        .config(consecutive_only())
        .classify(classify_fn(
            |outcome: Result<&u32, &Boom>| matches!(outcome, Err(Boom(n)) if *n >= 100),
        ))
        .build();
    let h = svc.handle();
    fail.store(true, Ordering::SeqCst);
    for i in 0..10 {
        assert_eq!(send(&mut svc, i).await, Err(Boom(i)));
    }
    assert_eq!(
        h.status(),
        Status::Healthy,
        "errors the classifier accepts do not count"
    );
    for i in 100..105 {
        assert_eq!(send(&mut svc, i).await, Err(Boom(i)));
    }
    assert!(!h.status().is_ready());
}

#[tokio::test(start_paused = true)]
async fn errors_only_ignores_ok_responses() {
    let (mut svc, fail) = health(HealthConfig::default());
    let h = svc.handle();
    fail.store(false, Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(send(&mut svc, 503).await, Ok(503));
    }
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(h.report().consecutive_failures, 0);
    assert_eq!(h.report().window, (50, 0));
}

// ---------------------------------------------------------------------------------------
// 7. Subscriptions
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn subscribe_sees_every_transition_in_order() {
    let (mut svc, fail) = health(HealthConfig::default());
    let h = svc.handle();
    let mut rx = h.subscribe();
    assert_eq!(*rx.borrow_and_update(), Status::Unknown);
    assert!(!rx.has_changed().unwrap());

    succeed_n(&mut svc, &fail, 1).await;
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), Status::Healthy);

    // More successes and the first four failures change nothing.
    succeed_n(&mut svc, &fail, 3).await;
    fail_n(&mut svc, &fail, 4).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a notification without a status change"
    );

    let until = Instant::now() + secs(30);
    fail_n(&mut svc, &fail, 1).await;
    rx.changed().await.unwrap();
    assert_eq!(
        *rx.borrow_and_update(),
        Status::Ejected { until: Some(until) }
    );

    advance(secs(30)).await;
    let mut t = task::spawn(());
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), Status::Degraded);

    fail.store(false, Ordering::SeqCst);
    assert_eq!(svc.call(1).await, Ok(1));
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), Status::Healthy);
    assert!(!rx.has_changed().unwrap());

    // A second subscriber, and one from a clone's handle, see the latest status.
    assert_eq!(*h.subscribe().borrow(), Status::Healthy);
    assert_eq!(*svc.clone().handle().subscribe().borrow(), Status::Healthy);
}

#[tokio::test(start_paused = true)]
async fn subscriber_task_is_woken_on_each_change() {
    let (mut svc, fail) = health(HealthConfig::default());
    let h = svc.handle();
    let mut rx = h.subscribe();
    rx.borrow_and_update();

    let mut changed = task::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            seen.push(*rx.borrow_and_update());
            if seen.len() == 4 {
                break;
            }
        }
        seen
    });
    assert_pending!(changed.poll());

    succeed_n(&mut svc, &fail, 1).await;
    assert!(changed.is_woken());
    assert_pending!(changed.poll());

    let until = Instant::now() + secs(30);
    fail_n(&mut svc, &fail, 5).await;
    assert!(changed.is_woken());
    assert_pending!(changed.poll());

    advance(secs(30)).await;
    let mut t = task::spawn(());
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
    assert!(changed.is_woken());
    assert_pending!(changed.poll());

    succeed_n_trial(&mut svc, &fail).await;
    let seen = assert_ready!(changed.poll());
    assert_eq!(
        seen,
        vec![
            Status::Healthy,
            Status::Ejected { until: Some(until) },
            Status::Degraded,
            Status::Healthy
        ]
    );
}

/// Calls `svc`, which already holds the trial, with the backend succeeding.
async fn succeed_n_trial(svc: &mut Health<Backend>, fail: &AtomicBool) {
    fail.store(false, Ordering::SeqCst);
    assert_eq!(svc.call(2).await, Ok(2));
}

// ---------------------------------------------------------------------------------------
// 8. Errors pass through; late responses
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_unchanged() {
    // Statically the same type, and the same value.
    let (mut svc, fail) = health(HealthConfig::default());
    fail.store(true, Ordering::SeqCst);
    let err: Boom = send(&mut svc, 42).await.unwrap_err();
    assert_eq!(err, Boom(42));

    // Through the mock: the boxed error is the one the backend sent.
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    let mut svc: MockHealth = Health::new(inner, HealthConfig::default());
    let mut t = task::spawn(());
    assert_ready_ok!(mock_poll_ready(&mut t, &mut svc));
    let fut = svc.call("x");
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(Boom(9));
    let err = fut.await.unwrap_err();
    assert_eq!(err.downcast_ref::<Boom>(), Some(&Boom(9)));
    assert_eq!(err.to_string(), "boom 9");
}

#[tokio::test(start_paused = true)]
async fn inner_poll_ready_errors_pass_through() {
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    let mut svc: MockHealth = Health::new(inner, HealthConfig::default());
    handle.send_error(Boom(5));
    let mut t = task::spawn(());
    let err = assert_ready!(mock_poll_ready(&mut t, &mut svc)).unwrap_err();
    assert_eq!(err.downcast_ref::<Boom>(), Some(&Boom(5)));
}

#[tokio::test(start_paused = true)]
async fn late_responses_while_ejected_change_nothing() {
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    let mut svc: MockHealth = Health::new(inner, consecutive_only());
    let h = svc.handle();

    // Two requests in flight before the endpoint fails.
    let mut t = task::spawn(());
    assert_ready_ok!(mock_poll_ready(&mut t, &mut svc));
    let mut late_ok = task::spawn(svc.call("late ok"));
    assert_ready_ok!(mock_poll_ready(&mut t, &mut svc));
    let mut late_err = task::spawn(svc.call("late err"));
    let (_, send_ok) = handle.next_request().await.unwrap();
    let (_, send_err) = handle.next_request().await.unwrap();
    assert_pending!(late_ok.poll());
    assert_pending!(late_err.poll());

    for _ in 0..5 {
        mock_fail(&mut svc, &mut handle).await;
    }
    let ejected = h.status();
    assert_eq!(ejected_for(&h), secs(30));

    advance(secs(10)).await;
    send_ok.send_response("fine");
    assert_eq!(assert_ready_ok!(late_ok.poll()), "fine");
    assert_eq!(
        h.status(),
        ejected,
        "a late success must not end the ejection"
    );
    send_err.send_error(Boom(1));
    assert!(assert_ready!(late_err.poll()).is_err());
    assert_eq!(
        h.status(),
        ejected,
        "a late failure must not extend the ejection"
    );
    assert_eq!(h.report().consecutive_failures, 0);
    assert_eq!(h.report().ejections, 1);

    // Still closed, and it opens on the original schedule.
    assert_pending!(mock_poll_ready(&mut t, &mut svc));
    advance(secs(20)).await;
    assert!(t.is_woken());
    assert_ready_ok!(mock_poll_ready(&mut t, &mut svc));
    assert_eq!(h.status(), Status::Degraded);
}

#[tokio::test(start_paused = true)]
async fn late_responses_while_half_open_do_not_decide_the_trial() {
    let (inner, mut handle) = mock::pair::<&'static str, &'static str>();
    let mut a: MockHealth = Health::new(inner, consecutive_only());
    let mut b = a.clone();
    let h = a.handle();

    let mut ta = task::spawn(());
    assert_ready_ok!(mock_poll_ready(&mut ta, &mut a));
    let mut late = task::spawn(a.call("late"));
    let (_, send_late) = handle.next_request().await.unwrap();
    for _ in 0..5 {
        mock_fail(&mut a, &mut handle).await;
    }
    advance(secs(30)).await;

    // `a` holds the trial; `b` waits.
    assert_ready_ok!(mock_poll_ready(&mut ta, &mut a));
    let mut tb = task::spawn(());
    assert_pending!(mock_poll_ready(&mut tb, &mut b));

    send_late.send_response("fine");
    assert_eq!(assert_ready_ok!(late.poll()), "fine");
    assert_eq!(
        h.status(),
        Status::Degraded,
        "a late success is not the trial"
    );
    assert_pending!(mock_poll_ready(&mut tb, &mut b));

    // The real trial still decides.
    let mut trial = task::spawn(a.call("trial"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(Boom(2));
    assert!(assert_ready!(trial.poll()).is_err());
    assert_eq!(ejected_for(&h), secs(60));
}

/// The end of an ejection is published even when nobody polls the service, so a
/// subscriber can react without polling.
#[tokio::test(start_paused = true)]
async fn ejection_end_is_published_without_polling() {
    let (backend, fail) = backend();
    fail.store(true, Ordering::SeqCst);
    let mut svc = Health::new(backend, HealthConfig::default());
    let handle = svc.handle();
    for _ in 0..5 {
        let _ = tower::ServiceExt::ready(&mut svc)
            .await
            .unwrap()
            .call(1)
            .await;
    }
    assert!(matches!(
        handle.status(),
        Status::Ejected { until: Some(_) }
    ));
    let mut rx = handle.subscribe();
    rx.borrow_and_update();
    // Nobody polls `svc`; the subscriber still sees half-open at the 30 s mark.
    tokio::time::timeout(Duration::from_secs(31), rx.changed())
        .await
        .expect("a status change without polling")
        .unwrap();
    assert_eq!(*rx.borrow(), Status::Degraded);
    drop(svc);
}
