//! Passive outlier detection: detectors, the ejection gate, half-open trials, ejection
//! times, classifiers, status subscriptions, error pass-through, and passing active
//! probes that end an ejection early.
//!
//! Every test runs on a paused clock and polls `poll_ready` by hand (tokio-test's mock
//! task), so wake-ups and ejection times are checked exactly.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::{EjectionGate, probe_fn};
use marina_health::{
    ActiveConfig, Classify, FailureRate, Health, HealthConfig, HealthHandle, Status, classify_fn,
};
use tokio::time::{Instant, advance, sleep};
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

// ---------------------------------------------------------------------------------------
// 9. Passing active probes end a passive ejection
// ---------------------------------------------------------------------------------------

const fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A probe round every 200 ms, no jitter; rise 2, fall 3.
fn every_200ms() -> ActiveConfig {
    ActiveConfig {
        interval: ms(200),
        jitter: 0.0,
        timeout: secs(1),
        healthy_threshold: 2,
        unhealthy_threshold: 3,
    }
}

/// A probed endpoint: the backend's failure switch, the probe's switch (it passes while
/// `up` is set) and the count of finished probe rounds.
struct Probed {
    svc: Health<Backend>,
    fail: Arc<AtomicBool>,
    up: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
}

/// Builds a probed endpoint in `gate`. Each probe round takes `takes` and reads `up`
/// when it ends. The first round starts when the test first yields (t = 0).
fn probed(
    config: HealthConfig,
    active: ActiveConfig,
    takes: Duration,
    gate: &EjectionGate,
) -> Probed {
    let (b, fail) = backend();
    let up = Arc::new(AtomicBool::new(true));
    let rounds = Arc::new(AtomicUsize::new(0));
    let probe = {
        let (up, rounds) = (up.clone(), rounds.clone());
        probe_fn(move |_: &mut ()| {
            let (up, rounds) = (up.clone(), rounds.clone());
            Box::pin(async move {
                sleep(takes).await;
                rounds.fetch_add(1, Ordering::SeqCst);
                if up.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("probe refused".into())
                }
            })
        })
    };
    let svc = Health::builder(b)
        .config(config)
        .probe(active, probe, ())
        .ejection_gate(gate.clone())
        .build();
    Probed {
        svc,
        fail,
        up,
        rounds,
    }
}

/// The regression of issue #19: a backend ejected for consecutive failures whose probe
/// passes comes back after `rise` rounds begun after the ejection (not after 30 s), all
/// waiters are woken, and the gate, status, subscription and report follow.
#[tokio::test(start_paused = true)]
async fn passing_probe_rounds_end_a_passive_ejection_early() {
    let gate = EjectionGate::new();
    let Probed {
        svc: mut a,
        fail,
        rounds,
        ..
    } = probed(consecutive_only(), every_200ms(), Duration::ZERO, &gate);
    let mut b = a.clone();
    let h = a.handle();
    let mut rx = h.subscribe();

    // Rounds at 0 and 200 ms pass: the probe's streak reaches rise before any ejection.
    sleep(ms(250)).await;
    assert_eq!(rounds.load(Ordering::SeqCst), 2);
    assert_eq!(*rx.borrow_and_update(), Status::Healthy);

    let until = Instant::now() + secs(30);
    fail_n(&mut a, &fail, 5).await;
    assert_eq!(h.status(), Status::Ejected { until: Some(until) });
    assert_eq!(
        *rx.borrow_and_update(),
        Status::Ejected { until: Some(until) }
    );
    assert_eq!(gate.counts(), (1, 1));
    let (mut ta, mut tb) = (task::spawn(()), task::spawn(()));
    assert_pending!(poll_ready(&mut ta, &mut a));
    assert_pending!(poll_ready(&mut tb, &mut b));

    // 400 ms: one pass since the ejection. The two before it do not count.
    sleep(ms(200)).await;
    assert_eq!(rounds.load(Ordering::SeqCst), 3);
    assert_eq!(
        h.status(),
        Status::Ejected { until: Some(until) },
        "readmitted on one pass after the ejection (the streak from before it counted)"
    );
    assert!(!rx.has_changed().unwrap());
    assert!(!ta.is_woken() && !tb.is_woken());
    assert_eq!(gate.counts(), (1, 1));

    // 600 ms: the second pass ends the ejection, 29.4 s early. Both waiters are woken
    // and both are ready: serving, not a half-open trial for one of them.
    sleep(ms(200)).await;
    assert_eq!(rounds.load(Ordering::SeqCst), 4);
    assert_eq!(h.status(), Status::Healthy, "{:#?}", h.report());
    assert!(
        ta.is_woken() && tb.is_woken(),
        "a task waiting in poll_ready was not woken by the readmission"
    );
    assert_ready_ok!(poll_ready(&mut ta, &mut a));
    assert_ready_ok!(poll_ready(&mut tb, &mut b));
    assert_eq!(gate.counts(), (1, 0), "the gate still counts it as ejected");
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), Status::Healthy);
    let report = h.report();
    assert_eq!(report.status, Status::Healthy);
    assert_eq!(
        report.ejections, 1,
        "the ejection that ended early still counts"
    );
    assert!(report.last.is_some_and(|r| r.passed));
    assert_eq!((report.recent, report.healthy), (4, 4));
    succeed_n(&mut a, &fail, 3).await;
    succeed_n(&mut b, &fail, 3).await;

    // The ejection count is kept: a second ejection lasts 2 × base, and the probe ends
    // it too, with the gate counting it in and out again.
    let until = Instant::now() + secs(60);
    fail_n(&mut a, &fail, 5).await;
    assert_eq!(h.status(), Status::Ejected { until: Some(until) });
    assert_eq!(gate.counts(), (1, 1));
    assert_pending!(poll_ready(&mut ta, &mut a));
    sleep(ms(400)).await; // rounds at 800 and 1000 ms
    assert_eq!(h.status(), Status::Healthy);
    assert!(ta.is_woken());
    assert_ready_ok!(poll_ready(&mut ta, &mut a));
    assert_eq!(gate.counts(), (1, 0));
    assert_eq!(h.report().ejections, 2);
}

/// A probe round that was under way when the endpoint was ejected says nothing about
/// the backend after the ejection: even with rise 1, it does not end the ejection.
#[tokio::test(start_paused = true)]
async fn a_round_under_way_at_the_ejection_does_not_end_it() {
    let gate = EjectionGate::new();
    let active = ActiveConfig {
        healthy_threshold: 1,
        ..every_200ms()
    };
    // Rounds start every 200 ms and take 100 ms: 0–100, 200–300, 400–500 ms.
    let Probed {
        mut svc,
        fail,
        rounds,
        ..
    } = probed(consecutive_only(), active, ms(100), &gate);
    let h = svc.handle();

    sleep(ms(250)).await; // the second round is under way
    assert_eq!(rounds.load(Ordering::SeqCst), 1);
    fail_n(&mut svc, &fail, 5).await;
    assert!(matches!(h.status(), Status::Ejected { until: Some(_) }));

    sleep(ms(100)).await; // it passed at 300 ms
    assert_eq!(rounds.load(Ordering::SeqCst), 2);
    assert!(
        matches!(h.status(), Status::Ejected { until: Some(_) }),
        "a round begun before the ejection ended it: {:?}",
        h.status()
    );
    assert_eq!(gate.counts(), (1, 1));

    sleep(ms(200)).await; // the round begun at 400 ms passed
    assert_eq!(rounds.load(Ordering::SeqCst), 3);
    assert_eq!(h.status(), Status::Healthy);
    assert_eq!(gate.counts(), (1, 0));
    succeed_n(&mut svc, &fail, 1).await;
}

/// The passes must come in a row: a failing round starts the count again.
#[tokio::test(start_paused = true)]
async fn a_failing_round_starts_the_count_again() {
    let gate = EjectionGate::new();
    let Probed {
        mut svc,
        fail,
        up,
        rounds,
    } = probed(consecutive_only(), every_200ms(), Duration::ZERO, &gate);
    let h = svc.handle();
    sleep(ms(250)).await;
    fail_n(&mut svc, &fail, 5).await;
    let ejected = h.status();
    assert!(matches!(ejected, Status::Ejected { until: Some(_) }));

    sleep(ms(200)).await; // 400 ms: pass
    up.store(false, Ordering::SeqCst);
    sleep(ms(200)).await; // 600 ms: fail
    up.store(true, Ordering::SeqCst);
    sleep(ms(200)).await; // 800 ms: pass
    assert_eq!(rounds.load(Ordering::SeqCst), 5);
    assert_eq!(
        h.status(),
        ejected,
        "two passes split by a failure ended the ejection"
    );
    let mut t = task::spawn(());
    assert_pending!(poll_ready(&mut t, &mut svc));

    sleep(ms(200)).await; // 1000 ms: the second pass in a row
    assert!(t.is_woken());
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
    // Serving; one failed round of the last six is over the 10% error-rate threshold.
    assert_eq!(h.status(), Status::Degraded, "{:#?}", h.report());
    assert_eq!(gate.counts(), (1, 0));
}

/// With `uneject_on_probe_success` off, a passing probe does not shorten a passive
/// ejection: it runs its 30 s.
#[tokio::test(start_paused = true)]
async fn with_uneject_on_probe_success_off_the_ejection_runs_its_time() {
    let gate = EjectionGate::new();
    let config = HealthConfig {
        uneject_on_probe_success: false,
        ..consecutive_only()
    };
    let Probed {
        mut svc,
        fail,
        rounds,
        ..
    } = probed(config, every_200ms(), Duration::ZERO, &gate);
    let h = svc.handle();
    sleep(ms(250)).await;
    let until = Instant::now() + secs(30);
    fail_n(&mut svc, &fail, 5).await;
    let mut t = task::spawn(());
    assert_pending!(poll_ready(&mut t, &mut svc));

    sleep(ms(29_900)).await;
    assert!(
        rounds.load(Ordering::SeqCst) > 100,
        "the probe kept passing"
    );
    assert_eq!(h.status(), Status::Ejected { until: Some(until) });
    assert!(!t.is_woken());
    assert_pending!(poll_ready(&mut t, &mut svc));
    assert_eq!(gate.counts(), (1, 1));

    // The ejection's time is up: the endpoint opens again (half-open, and the next
    // passing round settles it).
    sleep(ms(100)).await;
    assert!(t.is_woken());
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
    assert!(h.status().is_ready());
    assert_eq!(gate.counts(), (1, 0));
}

/// Without a probe, nothing ends a passive ejection early (the switch is on by
/// default and changes nothing): pending for the full 30 s, counted by the gate.
#[tokio::test(start_paused = true)]
async fn without_a_probe_the_ejection_runs_its_time() {
    let gate = EjectionGate::new();
    let (b, fail) = backend();
    let mut svc = Health::builder(b)
        .config(consecutive_only())
        .ejection_gate(gate.clone())
        .build();
    assert!(HealthConfig::default().uneject_on_probe_success);
    let h = svc.handle();
    let until = Instant::now() + secs(30);
    fail_n(&mut svc, &fail, 5).await;
    let mut t = task::spawn(());
    assert_pending!(poll_ready(&mut t, &mut svc));

    sleep(ms(29_900)).await;
    assert_eq!(h.status(), Status::Ejected { until: Some(until) });
    assert!(!t.is_woken());
    assert_pending!(poll_ready(&mut t, &mut svc));
    assert_eq!(gate.counts(), (1, 1));

    sleep(ms(100)).await;
    assert!(t.is_woken());
    assert_ready_ok!(poll_ready(&mut t, &mut svc));
    assert_eq!(
        h.status(),
        Status::Degraded,
        "half-open after the full ejection"
    );
    assert_eq!(gate.counts(), (1, 0));
}

/// End to end under tower's p2c balancer, the case of issue #19: a backend that dies
/// (requests and probes fail) and comes back 3 s later takes requests again within a
/// few probe intervals. The balancer learns of it only through the wake-up: its ready
/// cache holds the endpoint as pending until `poll_ready` wakes it.
#[tokio::test(start_paused = true)]
async fn a_restarted_backend_gets_traffic_under_p2c_after_rise_rounds() {
    use tower::ServiceExt;
    use tower::balance::p2c::Balance;
    use tower::discover::ServiceList;
    use tower::load::Constant;

    let down = Arc::new(AtomicBool::new(false));
    let calls: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut handles = Vec::new();
    let endpoints: Vec<_> = (0..2)
        .map(|i| {
            // Endpoint 1 is the one that dies; its probe fails while it is down.
            let dies = i == 1;
            let (down_req, down_probe, count) = (down.clone(), down.clone(), calls[i].clone());
            let inner = tower::service_fn(move |n: u32| {
                let is_down = dies && down_req.load(Ordering::SeqCst);
                if !is_down {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    if is_down {
                        Err(std::io::Error::other("connection refused"))
                    } else {
                        Ok(n)
                    }
                }
            });
            let probe = probe_fn(move |_: &mut ()| {
                let is_down = dies && down_probe.load(Ordering::SeqCst);
                Box::pin(async move {
                    if is_down {
                        Err("connection refused".into())
                    } else {
                        Ok(())
                    }
                })
            });
            let svc = Health::builder(inner)
                .name(format!("e{i}"))
                .config(consecutive_only())
                .probe(every_200ms(), probe, ())
                .build();
            handles.push(svc.handle());
            Constant::new(svc, 0)
        })
        .collect();
    let mut lb = Balance::new(ServiceList::new(endpoints));
    /// One request through the balancer, which must be ready within a second.
    async fn send<S>(lb: &mut S) -> Result<Result<u32, BoxError>, tokio::time::error::Elapsed>
    where
        S: Service<u32, Response = u32, Error = BoxError>,
    {
        tokio::time::timeout(secs(1), async { lb.ready().await?.call(7).await }).await
    }

    for _ in 0..40 {
        send(&mut lb).await.expect("ready").expect("served");
    }
    assert!(calls[1].load(Ordering::SeqCst) > 0);

    // Endpoint 1 dies: within a few failed requests it is ejected.
    down.store(true, Ordering::SeqCst);
    let mut failed = 0;
    for _ in 0..40 {
        if send(&mut lb).await.expect("ready").is_err() {
            failed += 1;
        }
    }
    assert!((1..=5).contains(&failed), "{failed} failed requests");
    assert!(matches!(
        handles[1].status(),
        Status::Ejected { until: Some(_) }
    ));

    // Meanwhile every request goes to endpoint 0.
    sleep(secs(3)).await;
    let before = calls[1].load(Ordering::SeqCst);
    for _ in 0..10 {
        send(&mut lb).await.expect("ready").expect("served");
    }
    assert_eq!(calls[1].load(Ordering::SeqCst), before);

    // Back 3 s later: two passing probe rounds readmit it (degraded: most of its
    // recent rounds failed), 26 s before its ejection would have ended.
    down.store(false, Ordering::SeqCst);
    sleep(ms(500)).await;
    assert_eq!(
        handles[1].status(),
        Status::Degraded,
        "{:#?}",
        handles[1].report()
    );
    for _ in 0..40 {
        send(&mut lb).await.expect("ready").expect("served");
    }
    assert!(
        calls[1].load(Ordering::SeqCst) > before,
        "the restarted backend got no requests: the balancer was not woken"
    );
}
