//! `RateLimitLayer` on paused tokio time: the GCRA admits exactly its burst plus its
//! rate times the simulated time elapsed, `retry_after` is exact to the nanosecond,
//! `Wait` mode holds `poll_ready` back (global) or the response future (keyed) within
//! its bound, clones share one quota, and the keyed limiter isolates keys, bounds and
//! sweeps its key table (evicting or refusing, on a schedule or on demand).
//!
//! `Wait` mode is first come, first served, for one quota's waiters (global, or one
//! key's), across many clones and keys (fixed schedules and a proptest): admissions
//! in arrival order, none refused whose place in line was within the bound, none
//! waiting past it, the quota kept; a cancelled wait strands nobody, and the last
//! reserved cell is given back.
//!
//! Every test runs on simulated time (`start_paused`, `tokio::time::advance`); nothing
//! sleeps on the wall clock.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use governor::clock::Clock;
use marina_core::{BoxError, HeaderKey};
use marina_limit::{
    KeyTable, OnLimit, Rate, RateLimit, RateLimitLayer, RateLimited, TokioClock, TooManyKeys,
    WhenKeysFull, WithoutKey,
};
use proptest::prelude::*;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};

/// A backend that answers every request at once with the request itself.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl<R> Service<R> for Echo {
    type Response = R;
    type Error = Infallible;
    type Future = Ready<Result<R, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        ready(Ok(req))
    }
}

/// Requests of the keyed tests: their key, or none.
type Req = Option<String>;

fn key_of(req: &Req) -> Option<String> {
    req.clone()
}

type KeyFn = fn(&Req) -> Option<String>;

fn keyed(rate: Rate) -> RateLimitLayer<marina_limit::Keyed<KeyFn>> {
    RateLimitLayer::keyed(key_of as KeyFn, rate)
}

fn keyed_with(rate: Rate, table: KeyTable) -> RateLimitLayer<marina_limit::Keyed<KeyFn>> {
    RateLimitLayer::keyed_with(key_of as KeyFn, rate, table)
}

fn some(key: &str) -> Req {
    Some(key.to_string())
}

fn rate_limited(e: &BoxError) -> RateLimited {
    *e.downcast_ref::<RateLimited>()
        .unwrap_or_else(|| panic!("not RateLimited: {e}"))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Calls until the first refusal: how many were admitted, and the refusal's wait.
async fn drain<S, R>(svc: &mut S, req: impl Fn() -> R) -> (u64, Duration)
where
    S: Service<R, Error = BoxError>,
{
    let mut admitted = 0;
    loop {
        match send(svc, req()).await {
            Ok(_) => admitted += 1,
            Err(e) => return (admitted, rate_limited(&e).retry_after),
        }
    }
}

/// One request: waits for readiness, then calls.
async fn send<S: Service<R>, R>(svc: &mut S, req: R) -> Result<S::Response, S::Error> {
    svc.ready().await?.call(req).await
}

/// Lets spawned tasks (the sweep) run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------- global

#[tokio::test(start_paused = true)]
async fn global_admits_exactly_burst_plus_rate_times_elapsed() {
    let layer = RateLimitLayer::global(Rate::per_second(100));
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);

    // t = 0: the whole burst, then a refusal until the next cell (10 ms).
    let (n, wait) = drain(&mut svc, || ()).await;
    assert_eq!(n, 100);
    assert_eq!(wait, ms(10));
    let mut total = n;
    let mut rate_at_one_second = None;
    // Every 10 ms for 2 s: one cell each (T = 10 ms exactly), 200 in all.
    for step in 1..=200u64 {
        advance(ms(10)).await;
        if step == 100 {
            // t = 1.0 s, before this step's cell: the whole of second 0.
            rate_at_one_second = Some(handle.stats().current_rate);
        }
        let (n, wait) = drain(&mut svc, || ()).await;
        assert_eq!(n, 1, "step {step}: one cell per 10 ms");
        assert_eq!(wait, ms(10), "step {step}");
        total += n;
        // Read like a scraper would, so admissions are filed in their own second.
        let _ = handle.stats();
    }
    assert_eq!(total, 100 + 200, "burst + rate x 2 s");

    let stats = handle.stats();
    assert_eq!(stats.admitted, 300);
    assert_eq!(stats.rejected, 201, "one refusal per drain");
    assert_eq!(stats.limit_per_second, 100.0);
    assert_eq!(stats.burst, 100);
    assert_eq!(stats.keys, 0);
    assert_eq!(stats.evicted_keys, 0);
    // Second 0 admitted the burst and 99 more (10..=990 ms); second 1, 100.
    assert_eq!(rate_at_one_second, Some(199));
    // Since the reading at 1.0 s: the cells of 1.0 s (taken after that reading) to 2.0 s.
    assert_eq!(stats.current_rate, 101, "1.0..=2.0 s");
    // Two seconds later nothing was admitted in the last whole second.
    advance(Duration::from_secs(2)).await;
    assert_eq!(handle.stats().current_rate, 0);
}

#[tokio::test(start_paused = true)]
async fn current_rate_is_the_last_seconds_admissions_when_read_rarely() {
    let layer = RateLimitLayer::global(Rate::per_second(1000));
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    // A steady 30 requests/s for 10 s (3 every 100 ms), read once at the end.
    for _ in 0..100 {
        for _ in 0..3 {
            send(&mut svc, ()).await.unwrap();
        }
        advance(ms(100)).await;
    }
    let stats = handle.stats();
    assert_eq!(stats.admitted, 300);
    assert_eq!(stats.current_rate, 30, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_exact() {
    let layer = RateLimitLayer::global(Rate::per_second(2));
    let mut svc = layer.layer(Echo);
    let (n, wait) = drain(&mut svc, || ()).await;
    assert_eq!((n, wait), (2, ms(500)));
    advance(ms(200)).await;
    let (n, wait) = drain(&mut svc, || ()).await;
    assert_eq!((n, wait), (0, ms(300)));
    advance(ms(300) - Duration::from_nanos(1)).await;
    let (n, wait) = drain(&mut svc, || ()).await;
    assert_eq!((n, wait), (0, Duration::from_nanos(1)));
    advance(Duration::from_nanos(1)).await;
    let (n, wait) = drain(&mut svc, || ()).await;
    assert_eq!((n, wait), (1, ms(500)), "one cell, the next 500 ms on");
}

#[tokio::test(start_paused = true)]
async fn every_and_burst_shape_the_quota() {
    // One per 250 ms, bursts of 3.
    let layer = RateLimitLayer::global(Rate::every(ms(250)).burst(3));
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    assert_eq!(drain(&mut svc, || ()).await, (3, ms(250)));
    // A full replenish (3 x 250 ms) brings the whole burst back, no more.
    advance(Duration::from_secs(10)).await;
    assert_eq!(drain(&mut svc, || ()).await, (3, ms(250)));
    let stats = handle.stats();
    assert_eq!(stats.burst, 3);
    assert_eq!(stats.limit_per_second, 4.0);
}

#[tokio::test(start_paused = true)]
async fn clones_and_sibling_services_share_the_quota() {
    let layer = RateLimitLayer::global(Rate::per_second(1).burst(3));
    let handle = layer.handle();
    let mut a = layer.layer(Echo);
    let mut b = a.clone();
    let mut c = layer.layer(Echo);
    assert_eq!(send(&mut a, 1).await.unwrap(), 1);
    assert_eq!(send(&mut b, 2).await.unwrap(), 2);
    assert_eq!(send(&mut c, 3).await.unwrap(), 3);
    for svc in [&mut a, &mut b, &mut c] {
        let e = send(svc, 4).await.unwrap_err();
        assert_eq!(rate_limited(&e).retry_after, Duration::from_secs(1));
    }
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (3, 3));
    assert_eq!(a.handle().stats(), stats);
}

#[tokio::test(start_paused = true)]
async fn global_takes_its_cell_then_waits_for_the_inner_service() {
    let layer = RateLimitLayer::global(Rate::per_second(1).burst(2));
    let handle = layer.handle();
    let mut sibling = layer.layer(Echo);
    let (mut svc, mut inner) = tower_test::mock::spawn_layer::<u32, u32, _>(layer);
    inner.allow(0);
    assert_pending!(svc.poll_ready(), "the inner service is not ready");
    // The cell is taken while the inner service holds the request back.
    assert_eq!(
        drain(&mut sibling, || 0u32).await,
        (1, Duration::from_secs(1))
    );
    inner.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(7);
    let (req, send) = inner.next_request().await.unwrap();
    assert_eq!(req, 7);
    send.send_response(8);
    assert_eq!(fut.await.unwrap(), 8);
    assert_eq!(handle.stats().admitted, 2);
}

#[tokio::test(start_paused = true)]
async fn call_without_poll_ready_fails() {
    let mut svc = RateLimitLayer::global(Rate::per_second(1)).layer(Echo);
    assert!(svc.call(()).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn wait_mode_holds_poll_ready_until_a_cell_is_free() {
    let layer = RateLimitLayer::global(Rate::per_second(10).burst(1)).on_limit(OnLimit::Wait {
        max: Duration::from_secs(1),
    });
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    let start = Instant::now();
    assert_eq!(send(&mut svc, 1).await.unwrap(), 1);

    let mut task = tokio_test::task::spawn(());
    assert_pending!(task.enter(|cx, _| Service::<u32>::poll_ready(&mut svc, cx)));
    advance(ms(99)).await;
    assert!(!task.is_woken(), "woken 1 ms before the cell");
    assert_pending!(task.enter(|cx, _| Service::<u32>::poll_ready(&mut svc, cx)));
    advance(ms(1)).await;
    assert!(task.is_woken());
    assert_ready_ok!(task.enter(|cx, _| Service::<u32>::poll_ready(&mut svc, cx)));
    assert_eq!(svc.call(2u32).await.unwrap(), 2);
    assert_eq!(start.elapsed(), ms(100));

    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_waits_through_ready_await() {
    let layer = RateLimitLayer::global(Rate::per_second(4).burst(2))
        .on_limit(OnLimit::Wait { max: ms(250) });
    let mut svc = layer.layer(Echo);
    let start = Instant::now();
    for i in 0..6u32 {
        assert_eq!(send(&mut svc, i).await.unwrap(), i);
    }
    // Two at once, then one per 250 ms.
    assert_eq!(start.elapsed(), ms(4 * 250));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_at_once_past_its_bound() {
    let layer =
        RateLimitLayer::global(Rate::per_second(1)).on_limit(OnLimit::Wait { max: ms(500) });
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    send(&mut svc, ()).await.unwrap();
    let start = Instant::now();
    let mut task = tokio_test::task::spawn(());
    // The wait (1 s) is past the bound: ready at once, and the call fails.
    assert_ready_ok!(task.enter(|cx, _| Service::<u32>::poll_ready(&mut svc, cx)));
    let e = svc.call(()).await.unwrap_err();
    assert_eq!(rate_limited(&e).retry_after, Duration::from_secs(1));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(handle.stats().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_serves_waiters_in_arrival_order() {
    let layer = RateLimitLayer::global(Rate::per_second(10).burst(1)).on_limit(OnLimit::Wait {
        max: Duration::from_secs(1),
    });
    let handle = layer.handle();
    let mut first = layer.layer(Echo);
    let mut a = first.clone();
    let mut b = first.clone();
    send(&mut first, 0).await.unwrap();

    let mut ta = tokio_test::task::spawn(());
    let mut tb = tokio_test::task::spawn(());
    assert_pending!(ta.enter(|cx, _| Service::<u32>::poll_ready(&mut a, cx)));
    assert_pending!(tb.enter(|cx, _| Service::<u32>::poll_ready(&mut b, cx)));
    // a came first: the cell at 100 ms is a's; b's place is the next one, at 200 ms,
    // and b is not even woken for a's.
    advance(ms(100)).await;
    assert!(ta.is_woken());
    assert!(!tb.is_woken(), "b woken for a cell that is not its own");
    assert_ready_ok!(ta.enter(|cx, _| Service::<u32>::poll_ready(&mut a, cx)));
    assert_eq!(a.call(1u32).await.unwrap(), 1);
    // A newcomer queues behind b.
    let mut c = first.clone();
    let mut tc = tokio_test::task::spawn(());
    assert_pending!(tc.enter(|cx, _| Service::<u32>::poll_ready(&mut c, cx)));
    advance(ms(100)).await;
    assert!(tb.is_woken() && !tc.is_woken());
    assert_ready_ok!(tb.enter(|cx, _| Service::<u32>::poll_ready(&mut b, cx)));
    assert_eq!(b.call(2u32).await.unwrap(), 2);
    advance(ms(100)).await;
    assert!(tc.is_woken());
    assert_ready_ok!(tc.enter(|cx, _| Service::<u32>::poll_ready(&mut c, cx)));
    assert_eq!(c.call(3u32).await.unwrap(), 3);
    assert_eq!((handle.stats().admitted, handle.stats().rejected), (4, 0));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_at_once_a_place_in_line_beyond_its_bound() {
    let layer = RateLimitLayer::global(Rate::per_second(10).burst(1))
        .on_limit(OnLimit::Wait { max: ms(150) });
    let handle = layer.handle();
    let mut first = layer.layer(Echo);
    let mut a = first.clone();
    let mut b = first.clone();
    send(&mut first, 0).await.unwrap();
    let mut ta = tokio_test::task::spawn(());
    let mut tb = tokio_test::task::spawn(());
    assert_pending!(ta.enter(|cx, _| Service::<u32>::poll_ready(&mut a, cx)));
    // b's place is behind a's, 200 ms away, past 150 ms: ready at once, and refused
    // with the wait it would have needed; it takes no cell.
    assert_ready_ok!(tb.enter(|cx, _| Service::<u32>::poll_ready(&mut b, cx)));
    let e = b.call(2u32).await.unwrap_err();
    assert_eq!(rate_limited(&e).retry_after, ms(200));
    assert_eq!(handle.stats().rejected, 1);
    advance(ms(100)).await;
    assert_ready_ok!(ta.enter(|cx, _| Service::<u32>::poll_ready(&mut a, cx)));
    a.call(1u32).await.unwrap();
    // The refusal reserved nothing: the next cell is 100 ms after a's.
    let e = send(&mut b, 3u32).await;
    assert!(e.is_ok(), "within the bound now: waits 100 ms");
    assert_eq!(handle.stats().admitted, 3);
}

/// What became of one request of a simulation.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// Its place in arrival order (across all clients).
    seq: u64,
    /// The key (keyed runs) or 0.
    key: usize,
    arrived: Instant,
    /// When it was admitted, or the refusal's `retry_after`.
    result: Result<Instant, Duration>,
}

/// Runs `clients` concurrently, each sending one request after another; a client's
/// requests are (delay before it, key). Returns every outcome.
async fn simulate<S, R>(
    svc: S,
    clients: Vec<Vec<(Duration, usize)>>,
    req: fn(usize) -> R,
) -> Vec<Outcome>
where
    S: Service<R, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for plan in clients {
        let mut svc = svc.clone();
        let seq = seq.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (delay, key) in plan {
                tokio::time::sleep(delay).await;
                let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let arrived = Instant::now();
                let result = match send(&mut svc, req(key)).await {
                    Ok(_) => Ok(Instant::now()),
                    Err(e) => Err(rate_limited(&e).retry_after),
                };
                out.push(Outcome {
                    seq: n,
                    key,
                    arrived,
                    result,
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Checks one quota's outcomes (one key's, or the global ones): first come, first
/// served; no admitted request waited past `max`, no refused one had its place
/// within `max`; and the admissions keep to the quota (`burst`, one cell per
/// `period` after). Returns the longest wait.
fn check_first_come_first_served(
    outcomes: &[Outcome],
    period: Duration,
    burst: u64,
    max: Duration,
) -> Duration {
    let mut by_arrival: Vec<&Outcome> = outcomes.iter().collect();
    by_arrival.sort_by_key(|o| o.seq);
    let mut last_admitted: Option<(u64, Instant)> = None;
    let mut longest = Duration::ZERO;
    for o in &by_arrival {
        match o.result {
            Ok(at) => {
                let waited = at - o.arrived;
                assert!(waited <= max, "{o:?} waited {waited:?}, past {max:?}");
                longest = longest.max(waited);
                if let Some((seq, before)) = last_admitted {
                    assert!(
                        at >= before,
                        "request {} (key {}) admitted at {:?}, before request {seq} \
                         that arrived earlier, at {:?}",
                        o.seq,
                        o.key,
                        at - by_arrival[0].arrived,
                        before - by_arrival[0].arrived,
                    );
                }
                last_admitted = Some((o.seq, at));
            }
            Err(retry_after) => assert!(
                retry_after > max,
                "{o:?} refused though its place was {retry_after:?} away, within {max:?}"
            ),
        }
    }
    let mut admitted: Vec<Instant> = outcomes.iter().filter_map(|o| o.result.ok()).collect();
    admitted.sort();
    for i in 0..admitted.len() {
        for j in i..admitted.len() {
            let span = admitted[j] - admitted[i];
            let allowed = burst + (span.as_nanos() / period.as_nanos()) as u64;
            assert!(
                (j - i + 1) as u64 <= allowed,
                "{} admitted within {span:?}: over the quota ({allowed})",
                j - i + 1
            );
        }
    }
    longest
}

/// The reported case: four clones of a global `Wait`-mode limiter (100/s, bursts of
/// 10, waits up to 5 s), 250 requests each, one after another. Before, waiters
/// re-checked after their delay and raced for each cell: one clone's first request
/// lost every race for 5 s and was refused while the others were served. Now each
/// takes its place in line on arrival: all are admitted, in arrival order, none
/// waiting longer than the three others' cells and its own.
#[tokio::test(start_paused = true)]
async fn wait_mode_clones_are_served_first_come_first_served() {
    let max = Duration::from_secs(5);
    let layer =
        RateLimitLayer::global(Rate::per_second(100).burst(10)).on_limit(OnLimit::Wait { max });
    let handle = layer.handle();
    let svc = layer.layer(Echo);
    let clients = vec![vec![(Duration::ZERO, 0); 250]; 4];
    let outcomes = simulate(svc, clients, |_| ()).await;
    assert_eq!(outcomes.len(), 1000);
    let refused: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
    let longest = check_first_come_first_served(&outcomes, ms(10), 10, max);
    assert!(longest <= ms(40), "a request waited {longest:?}");
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (1000, 0));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_strands_nobody_and_gives_back_the_last_cell() {
    let layer = RateLimitLayer::global(Rate::per_second(10).burst(1)).on_limit(OnLimit::Wait {
        max: Duration::from_secs(1),
    });
    let handle = layer.handle();
    let mut first = layer.layer(Echo);
    send(&mut first, 0).await.unwrap();
    let start = Instant::now();
    let poll = |svc: &mut RateLimit<Echo>, t: &mut tokio_test::task::Spawn<()>| {
        t.enter(|cx, _| Service::<u32>::poll_ready(svc, cx))
    };
    let (mut a, mut b, mut c, mut d) = (first.clone(), first.clone(), first.clone(), first.clone());
    let (mut ta, mut tb, mut tc, mut td) = (
        tokio_test::task::spawn(()),
        tokio_test::task::spawn(()),
        tokio_test::task::spawn(()),
        tokio_test::task::spawn(()),
    );
    // a has the cell at 100 ms, b the one at 200 ms.
    assert_pending!(poll(&mut a, &mut ta));
    assert_pending!(poll(&mut b, &mut tb));
    // a gives up. Its cell is not the last reserved: it goes unused, and b keeps
    // its place and time; c queues behind b.
    drop(a);
    assert_pending!(poll(&mut c, &mut tc));
    advance(ms(100)).await;
    assert!(!tb.is_woken() && !tc.is_woken());
    advance(ms(100)).await;
    assert!(tb.is_woken(), "b stranded by a's cancelled wait");
    assert_ready_ok!(poll(&mut b, &mut tb));
    b.call(2).await.unwrap();
    assert_eq!(start.elapsed(), ms(200));
    // c (cell at 300 ms) gives up too. Its cell is the last reserved: given back, so
    // d, arriving now, takes it rather than the one after.
    drop(c);
    assert_pending!(poll(&mut d, &mut td));
    advance(ms(100)).await;
    assert!(td.is_woken(), "d did not get the cell c gave back");
    assert_ready_ok!(poll(&mut d, &mut td));
    d.call(4).await.unwrap();
    assert_eq!(start.elapsed(), ms(300));
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (3, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// For any period, burst, bound and arrivals of several clients (global) or of
    /// several clients over a few keys (keyed), in `Wait` mode: each quota's
    /// requests are admitted in arrival order, none waits past the bound, none is
    /// refused whose place in line was within it, and the admissions keep to the
    /// quota.
    #[test]
    fn wait_mode_is_first_come_first_served_for_any_arrivals(
        period_ms in 1u64..30,
        burst in 1u32..5,
        max_ms in 0u64..200,
        keyed_mode: bool,
        clients in proptest::collection::vec(
            proptest::collection::vec((0u64..50, 0usize..3), 1..15),
            1..6,
        ),
    ) {
        let period = ms(period_ms);
        let max = ms(max_ms);
        let rate = Rate::every(period).burst(burst);
        let clients: Vec<Vec<(Duration, usize)>> = clients
            .into_iter()
            .map(|c| c.into_iter().map(|(gap, key)| (ms(gap), key)).collect())
            .collect();
        let requests: usize = clients.iter().map(Vec::len).sum();
        on_paused_runtime(async move {
            let (outcomes, stats) = if keyed_mode {
                let layer = keyed(rate).on_limit(OnLimit::Wait { max });
                let handle = layer.handle();
                let out = simulate(layer.layer(Echo), clients, |k| Some(format!("k{k}"))).await;
                (out, handle.stats())
            } else {
                let layer = RateLimitLayer::global(rate).on_limit(OnLimit::Wait { max });
                let handle = layer.handle();
                let out = simulate(layer.layer(Echo), clients, |_| ()).await;
                (out, handle.stats())
            };
            prop_assert_eq!(outcomes.len(), requests);
            let keys = if keyed_mode { 3 } else { 1 };
            for key in 0..keys {
                let mine: Vec<Outcome> = outcomes
                    .iter()
                    .filter(|o| !keyed_mode || o.key == key)
                    .copied()
                    .collect();
                check_first_come_first_served(&mine, period, u64::from(burst), max);
            }
            let admitted = outcomes.iter().filter(|o| o.result.is_ok()).count() as u64;
            let refused = requests as u64 - admitted;
            prop_assert_eq!((stats.admitted, stats.rejected), (admitted, refused));
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For any rate, burst and schedule of calls: never more than burst + elapsed / T
    /// admitted, every refusal's `retry_after` is in (0, T], and exact: 1 ns before
    /// it the limiter still refuses, at it one more cell is admitted.
    #[test]
    fn global_quota_and_retry_after_hold_for_any_schedule(
        per_second in 1u32..2_000,
        burst in 1u32..40,
        steps in proptest::collection::vec(0u64..3_000_000_000, 1..12),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Duration::from_secs(1) / per_second;
            let mut svc =
                RateLimitLayer::global(Rate::per_second(per_second).burst(burst)).layer(Echo);
            let start = Instant::now();
            let mut total = 0u64;
            for step in steps {
                advance(Duration::from_nanos(step)).await;
                let (n, wait) = drain(&mut svc, || ()).await;
                total += n;
                let elapsed = start.elapsed().as_nanos() as u64;
                let bound = u64::from(burst) + elapsed / t.as_nanos() as u64;
                prop_assert!(total <= bound, "{total} admitted by {elapsed} ns, bound {bound}");
                prop_assert!(wait > Duration::ZERO && wait <= t, "retry_after {wait:?}, T {t:?}");
                advance(wait - Duration::from_nanos(1)).await;
                let (n, left) = drain(&mut svc, || ()).await;
                prop_assert_eq!((n, left), (0, Duration::from_nanos(1)));
                advance(Duration::from_nanos(1)).await;
                let (n, _) = drain(&mut svc, || ()).await;
                prop_assert_eq!(n, 1);
                total += n;
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

// ---------------------------------------------------------------- keyed

#[tokio::test(start_paused = true)]
async fn a_hot_key_does_not_starve_the_others() {
    let layer = keyed(Rate::per_second(10));
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    let (n, wait) = drain(&mut svc, || some("hot")).await;
    assert_eq!((n, wait), (10, ms(100)));
    for _ in 0..40 {
        let e = send(&mut svc, some("hot")).await.unwrap_err();
        assert_eq!(rate_limited(&e).retry_after, ms(100));
    }
    for i in 0..100 {
        let (n, _) = drain(&mut svc, || some(&format!("user-{i}"))).await;
        assert_eq!(n, 10, "user-{i} has its own quota");
    }
    let stats = handle.stats();
    assert_eq!(stats.admitted, 10 + 100 * 10);
    assert_eq!(stats.rejected, 1 + 40 + 100);
    assert_eq!(stats.keys, 101);
    assert_eq!(stats.burst, 10);
}

#[tokio::test(start_paused = true)]
async fn shared_requests_without_a_key_draw_on_one_quota() {
    let layer = RateLimitLayer::keyed(HeaderKey::new("x-user"), Rate::per_second(10).burst(3))
        .without_key(WithoutKey::Shared);
    let mut svc = layer.layer(Echo);
    let anon = || http::Request::new(());
    let user = |u: &str| {
        http::Request::builder()
            .header("x-user", u)
            .body(())
            .unwrap()
    };
    let empty = || {
        http::Request::builder()
            .header("x-user", "")
            .body(())
            .unwrap()
    };
    // Anonymous and empty-header requests (no key: `HeaderKey` reads an empty value
    // as none) draw on one quota.
    assert!(send(&mut svc, anon()).await.is_ok());
    assert!(send(&mut svc, empty()).await.is_ok());
    assert!(send(&mut svc, anon()).await.is_ok());
    let e = send(&mut svc, anon()).await.unwrap_err();
    assert_eq!(rate_limited(&e).retry_after, ms(100));
    assert!(send(&mut svc, empty()).await.is_err());
    // Named users are untouched by it.
    for u in ["alice", "bob"] {
        let (n, _) = drain(&mut svc, || user(u)).await;
        assert_eq!(n, 3);
    }
}

#[tokio::test(start_paused = true)]
async fn keyless_requests_stay_limited_when_the_key_table_is_full() {
    let mut seen = Vec::new();
    for when_full in [WhenKeysFull::Reject, WhenKeysFull::EvictOldest] {
        let table = KeyTable::with_capacity(2).when_full(when_full);
        let mut svc = keyed_with(Rate::every(Duration::from_secs(3600)), table)
            .without_key(WithoutKey::Shared)
            .layer(Echo);
        send(&mut svc, some("a")).await.unwrap();
        send(&mut svc, some("b")).await.unwrap();
        let mut admitted = 0;
        for _ in 0..10 {
            if send(&mut svc, None).await.is_ok() {
                admitted += 1;
            }
        }
        seen.push((when_full, admitted));
    }
    // Their quota is not in the table: the first is admitted, the others limited.
    assert!(
        seen.iter().all(|(_, admitted)| *admitted == 1),
        "keyless requests admitted of 10 at 1/h: {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn client_ip_keys_by_peer_address() {
    use marina_core::{ClientIp, PeerAddr};
    let mut svc = RateLimitLayer::keyed(ClientIp::new(), Rate::per_second(1)).layer(Echo);
    let from = |addr: &str| {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(PeerAddr(addr.parse().unwrap()));
        req
    };
    assert!(send(&mut svc, from("192.0.2.1:1000")).await.is_ok());
    // Same address, another port: the same client.
    assert!(send(&mut svc, from("192.0.2.1:2000")).await.is_err());
    assert!(send(&mut svc, from("192.0.2.2:1000")).await.is_ok());
}

/// Runs `f` on a fresh current-thread runtime with paused time.
fn on_paused_runtime<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(f)
}

/// A keyed layer in `Wait` mode, made outside any runtime (so without a sweep task:
/// inside one, `on_limit` panics, see
/// `on_limit_configures_a_keyed_layer_made_in_a_runtime`). Its clock reads from
/// before the runtime starts, so readings are offset, and differences exact.
fn keyed_waiting(rate: Rate, max: Duration) -> RateLimitLayer<marina_limit::Keyed<KeyFn>> {
    assert!(tokio::runtime::Handle::try_current().is_err());
    keyed(rate).on_limit(OnLimit::Wait { max })
}

#[tokio::test]
async fn on_limit_configures_a_keyed_layer_made_in_a_runtime() {
    let layer = keyed(Rate::per_second(1)).on_limit(OnLimit::Wait { max: ms(500) });
    let mut svc = layer.layer(Echo);
    assert!(send(&mut svc, some("k")).await.is_ok());
}

#[test]
fn keyed_wait_mode_serves_a_keys_waiters_in_arrival_order() {
    for (max, second_waiter_gets_in) in [(ms(150), false), (ms(250), true)] {
        let layer = keyed_waiting(Rate::per_second(10).burst(1), max);
        on_paused_runtime(async move {
            let handle = layer.handle();
            let mut svc = layer.layer(Echo);
            let start = Instant::now();
            send(&mut svc, some("k")).await.unwrap();
            let mut f1 = tokio_test::task::spawn(svc.ready().await.unwrap().call(some("k")));
            let mut f2 = tokio_test::task::spawn(svc.ready().await.unwrap().call(some("k")));
            // Another key is not held up by the waiters.
            send(&mut svc, some("other")).await.unwrap();
            assert_pending!(f1.poll());
            if second_waiter_gets_in {
                // f1 has the cell at 100 ms, f2 the one at 200 ms.
                assert_pending!(f2.poll());
                advance(ms(99)).await;
                assert!(!f1.is_woken());
                advance(ms(1)).await;
                assert!(f1.is_woken());
                assert!(!f2.is_woken(), "f2 woken for f1's cell");
                assert_eq!(assert_ready!(f1.poll()).unwrap(), some("k"));
                advance(ms(100)).await;
                assert!(f2.is_woken());
                assert_eq!(assert_ready!(f2.poll()).unwrap(), some("k"));
                assert_eq!(start.elapsed(), ms(200));
                assert_eq!(handle.stats().rejected, 0);
            } else {
                // f2's place, 200 ms away, is past 150 ms: refused at once, with that
                // wait, and f1 keeps its cell.
                let e = assert_ready!(f2.poll()).unwrap_err();
                assert_eq!(rate_limited(&e).retry_after, ms(200));
                assert_eq!(handle.stats().rejected, 1);
                advance(ms(100)).await;
                assert!(f1.is_woken());
                assert_eq!(assert_ready!(f1.poll()).unwrap(), some("k"));
                assert_eq!(start.elapsed(), ms(100));
            }
            assert_eq!(
                handle.stats().admitted,
                3 + u64::from(second_waiter_gets_in)
            );
        });
    }
}

/// Twelve clients over four keys in keyed `Wait` mode, each sending 40 requests one
/// after another with gaps of 0 to 30 ms (keys and gaps from a fixed seed): each
/// key's waiters are served in arrival order, none is refused while its place is
/// within the bound, and none waits past it; a tight bound refuses some, each with a
/// place beyond it.
#[tokio::test(start_paused = true)]
async fn keyed_wait_mode_is_first_come_first_served_per_key() {
    for (max, refusals) in [(Duration::from_secs(2), false), (ms(60), true)] {
        let layer = keyed(Rate::per_second(50).burst(3)).on_limit(OnLimit::Wait { max });
        let handle = layer.handle();
        let mut rng = xorshift(7);
        let clients: Vec<Vec<(Duration, usize)>> = (0..12)
            .map(|_| {
                (0..40)
                    .map(|_| (ms(rng() % 31), (rng() % 4) as usize))
                    .collect()
            })
            .collect();
        let outcomes = simulate(layer.layer(Echo), clients, |k| Some(format!("k{k}"))).await;
        assert_eq!(outcomes.len(), 480);
        for key in 0..4 {
            let mine: Vec<Outcome> = outcomes.iter().filter(|o| o.key == key).copied().collect();
            assert!(mine.len() > 60, "key {key}: {} requests", mine.len());
            check_first_come_first_served(&mine, ms(20), 3, max);
        }
        let refused = outcomes.iter().filter(|o| o.result.is_err()).count() as u64;
        assert_eq!(refused > 0, refusals, "{refused} refused with max {max:?}");
        let stats = handle.stats();
        assert_eq!((stats.admitted, stats.rejected), (480 - refused, refused));
    }
}

/// A small xorshift generator, for fixed-seed schedules.
fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

#[test]
fn a_cancelled_keyed_wait_strands_nobody_and_gives_back_the_last_cell() {
    let layer = keyed_waiting(Rate::per_second(10).burst(1), Duration::from_secs(1));
    on_paused_runtime(async move {
        let handle = layer.handle();
        let mut svc = layer.layer(Echo);
        send(&mut svc, some("k")).await.unwrap();
        let start = Instant::now();
        let call = |svc: &mut RateLimit<Echo, marina_limit::Keyed<KeyFn>>| {
            let mut cx = Context::from_waker(Waker::noop());
            assert!(svc.poll_ready(&mut cx).is_ready());
            tokio_test::task::spawn(svc.call(some("k")))
        };
        // f1 has the cell at 100 ms, f2 the one at 200 ms.
        let mut f1 = call(&mut svc);
        let mut f2 = call(&mut svc);
        assert_pending!(f1.poll());
        assert_pending!(f2.poll());
        // f1 is dropped: its cell is not the last reserved, so it goes unused; f2
        // keeps its time, and f3 queues behind it.
        drop(f1);
        let mut f3 = call(&mut svc);
        assert_pending!(f3.poll());
        advance(ms(100)).await;
        assert!(!f2.is_woken() && !f3.is_woken());
        advance(ms(100)).await;
        assert!(f2.is_woken(), "f2 stranded by f1's cancelled wait");
        assert_eq!(assert_ready!(f2.poll()).unwrap(), some("k"));
        // f3 (cell at 300 ms) is dropped: the last reserved, given back to f4.
        drop(f3);
        let mut f4 = call(&mut svc);
        assert_pending!(f4.poll());
        advance(ms(100)).await;
        assert!(f4.is_woken(), "f4 did not get the cell f3 gave back");
        assert_eq!(assert_ready!(f4.poll()).unwrap(), some("k"));
        assert_eq!(start.elapsed(), ms(300));
        let stats = handle.stats();
        assert_eq!((stats.admitted, stats.rejected), (3, 0));
    });
}

#[test]
fn keyed_wait_mode_refuses_at_once_past_its_bound() {
    let layer = keyed_waiting(Rate::per_second(1), ms(500));
    on_paused_runtime(async move {
        let handle = layer.handle();
        let mut svc = layer.layer(Echo);
        let start = Instant::now();
        send(&mut svc, some("k")).await.unwrap();
        let mut f = tokio_test::task::spawn(svc.ready().await.unwrap().call(some("k")));
        let e = assert_ready!(f.poll()).unwrap_err();
        assert_eq!(rate_limited(&e).retry_after, Duration::from_secs(1));
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(handle.stats().rejected, 1);
    });
}

#[test]
fn a_waiter_keeps_its_place_when_the_table_fills_and_refusals_count() {
    // Room for 2 keys, refusing new ones; one request per 100 ms, waits up to 1 s.
    let table = KeyTable::with_capacity(2).when_full(WhenKeysFull::Reject);
    let layer = RateLimitLayer::keyed_with(key_of as KeyFn, Rate::per_second(10).burst(1), table)
        .on_limit(OnLimit::Wait {
            max: Duration::from_secs(1),
        });
    on_paused_runtime(async move {
        let handle = layer.handle();
        let mut svc = layer.layer(Echo);
        send(&mut svc, some("a")).await.unwrap();
        let mut waiter = tokio_test::task::spawn(svc.ready().await.unwrap().call(some("a")));
        assert_pending!(waiter.poll());
        advance(ms(100)).await;
        // "a" holds the waiter's reserved cell, so the table keeps it: a second key
        // fits, a third is refused (and counted), and the waiter is served.
        send(&mut svc, some("b")).await.unwrap();
        let e = send(&mut svc, some("c")).await.unwrap_err();
        assert_eq!(
            e.downcast_ref::<TooManyKeys>(),
            Some(&TooManyKeys { max_keys: 2 })
        );
        assert_eq!(assert_ready!(waiter.poll()).unwrap(), some("a"));
        let stats = handle.stats();
        assert_eq!((stats.admitted, stats.rejected), (3, 1), "{stats:?}");
    });
}

#[tokio::test(start_paused = true)]
async fn a_full_table_refuses_new_keys_but_serves_known_ones() {
    let table = KeyTable::with_capacity(3).when_full(WhenKeysFull::Reject);
    let layer = keyed_with(Rate::per_second(1).burst(5), table);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    for k in ["a", "b", "c"] {
        send(&mut svc, some(k)).await.unwrap();
    }
    let e = send(&mut svc, some("d")).await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<TooManyKeys>(),
        Some(&TooManyKeys { max_keys: 3 })
    );
    for k in ["a", "b", "c"] {
        assert_eq!(
            drain(&mut svc, || some(k)).await.0,
            4,
            "{k}: the rest of its burst"
        );
    }
    let stats = handle.stats();
    assert_eq!(stats.keys, 3);
    assert_eq!(stats.rejected, 1 + 3);
    assert_eq!(stats.evicted_keys, 0);
    // a, b and c replenish in 5 s: then they carry nothing, and make room.
    advance(ms(4_999)).await;
    assert!(send(&mut svc, some("d")).await.is_err());
    advance(ms(1)).await;
    assert!(send(&mut svc, some("d")).await.is_ok());
    let stats = handle.stats();
    assert_eq!(stats.keys, 1, "the replenished keys gave way");
    assert_eq!(
        stats.evicted_keys, 0,
        "dropping replenished keys is not eviction"
    );
}

#[tokio::test(start_paused = true)]
async fn evict_oldest_keeps_the_table_bounded() {
    let table = KeyTable::with_capacity(100).when_full(WhenKeysFull::EvictOldest);
    let layer = keyed_with(Rate::every(Duration::from_secs(3600)), table);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    for i in 0..1_000 {
        let r = send(&mut svc, some(&format!("k{i}"))).await;
        assert!(r.is_ok(), "new key {i} admitted");
        assert!(handle.stats().keys <= 100);
        // Each key a little later than the last, so "oldest" is well defined.
        advance(ms(1)).await;
    }
    let stats = handle.stats();
    assert!(stats.keys <= 100 && stats.keys > 0, "{stats:?}");
    assert_eq!(stats.evicted_keys, 1_000 - stats.keys as u64, "{stats:?}");
    // The newest key is still tracked (and limited); an evicted one starts afresh.
    assert!(send(&mut svc, some("k999")).await.is_err());
    assert!(send(&mut svc, some("k0")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_new_keys_evicts_them_before_a_limited_hot_key() {
    let table = KeyTable::with_capacity(64).when_full(WhenKeysFull::EvictOldest);
    let layer = keyed_with(Rate::per_second(1).burst(5), table);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    assert_eq!(drain(&mut svc, || some("hot")).await.0, 5);
    for i in 0..5_000 {
        send(&mut svc, some(&format!("flood-{i}"))).await.unwrap();
    }
    assert!(handle.stats().evicted_keys > 0);
    // The hot key's state is the newest (5 s ahead): it was kept, and still limits.
    let e = send(&mut svc, some("hot")).await.unwrap_err();
    assert_eq!(rate_limited(&e).retry_after, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_sweep_drops_replenished_keys() {
    let table = KeyTable::with_capacity(1_000).sweep_interval(Duration::from_secs(10));
    // T = 1 s, bursts of 60.
    let layer = keyed_with(Rate::per_second(1).burst(60), table);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    // Let the sweep task start (its schedule runs from its first poll).
    settle().await;
    for i in 0..100 {
        // One request each: replenished after 1 s.
        send(&mut svc, some(&format!("k{i}"))).await.unwrap();
    }
    for _ in 0..30 {
        // Replenished after 30 s.
        send(&mut svc, some("busy")).await.unwrap();
    }
    assert_eq!(handle.stats().keys, 101);
    advance(ms(9_999)).await;
    settle().await;
    assert_eq!(handle.stats().keys, 101, "no sweep before its interval");
    advance(ms(1)).await;
    settle().await;
    assert_eq!(
        handle.stats().keys,
        1,
        "the 10 s sweep kept only the busy key"
    );
    // Its state still counts: 30 of its 60 spent, 10 replenished.
    assert_eq!(drain(&mut svc, || some("busy")).await.0, 40);
    // Its state is now at 70 s: the sweeps up to 60 s keep it, the one at 70 s drops it.
    advance(Duration::from_secs(50)).await;
    settle().await;
    assert_eq!(handle.stats().keys, 1);
    advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(handle.stats().keys, 0);
}

#[tokio::test(start_paused = true)]
async fn retain_recent_drops_replenished_keys_on_demand() {
    let layer = keyed(Rate::per_second(1).burst(10));
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    for i in 0..50 {
        send(&mut svc, some(&format!("k{i}"))).await.unwrap();
    }
    for _ in 0..5 {
        send(&mut svc, some("busy")).await.unwrap();
    }
    assert_eq!(handle.retain_recent(), 0, "nothing replenished at t = 0");
    advance(Duration::from_secs(1)).await;
    assert_eq!(handle.retain_recent(), 50);
    assert_eq!(handle.stats().keys, 1);
    advance(Duration::from_secs(4)).await;
    assert_eq!(handle.retain_recent(), 1);
    assert_eq!(handle.stats().keys, 0);
    // A global limiter has no table.
    let global = RateLimitLayer::global(Rate::per_second(1));
    assert_eq!(global.handle().retain_recent(), 0);
}

/// Drives a keyed service synchronously: its futures are ready at once in `Reject`.
fn call_now(svc: &mut RateLimit<Echo, marina_limit::Keyed<KeyFn>>, req: Req) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let mut fut = std::pin::pin!(svc.call(req));
    match std::future::Future::poll(fut.as_mut(), &mut cx) {
        Poll::Ready(r) => r.is_ok(),
        Poll::Pending => panic!("a Reject-mode keyed call is never pending"),
    }
}

#[test]
fn a_million_distinct_keys_stay_within_the_cap() {
    const CAP: usize = 10_000;
    const KEYS: u64 = 1_000_000;
    // Outside a runtime: no sweep task; the cap alone bounds the table.
    let table = KeyTable::with_capacity(CAP).when_full(WhenKeysFull::EvictOldest);
    let layer = RateLimitLayer::keyed_with(key_of as KeyFn, Rate::per_second(1), table);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    for i in 0..KEYS {
        assert!(
            call_now(&mut svc, Some(format!("{i:016x}"))),
            "key {i} refused"
        );
        if i % 100_000 == 0 {
            assert!(handle.stats().keys <= CAP);
        }
    }
    let stats = handle.stats();
    assert!(stats.keys <= CAP, "{stats:?}");
    assert_eq!(stats.admitted, KEYS);
}

// ---------------------------------------------------------------- clock

#[tokio::test(start_paused = true)]
async fn tokio_clock_follows_paused_time() {
    let clock = TokioClock::new();
    let t0 = clock.now();
    let i0 = Instant::now();
    advance(Duration::from_secs(1)).await;
    let t1 = clock.now();
    assert_eq!(t1.as_u64() - t0.as_u64(), 1_000_000_000);
    assert_eq!(clock.instant_of(t1), i0 + Duration::from_secs(1));
    assert_eq!(clock.instant_of(t0), i0);
}

// ---------------------------------------------------------------- governor's step, counts

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A keyed limiter checks its own key table, looked up by the key the extractor
    /// lends, with governor's GCRA step (governor's `check_key` would take an owned
    /// key per request): for any rate, burst and schedule over a few keys, it admits
    /// and refuses exactly as governor's keyed limiter on the same clock does, with the
    /// same `retry_after`.
    #[test]
    fn keyed_admissions_are_governors_for_any_schedule(
        per_second in 1u32..2_000,
        burst in 1u32..20,
        steps in proptest::collection::vec((0u64..20_000_000, 0usize..3), 1..150),
    ) {
        on_paused_runtime(async {
            let quota = governor::Quota::per_second(per_second.try_into().unwrap())
                .allow_burst(burst.try_into().unwrap());
            let clock = TokioClock::new();
            let governor = governor::RateLimiter::hashmap_with_clock(quota, clock);
            let mut svc = keyed(Rate::per_second(per_second).burst(burst)).layer(Echo);
            let start = Instant::now();
            for (step, k) in steps {
                advance(Duration::from_nanos(step)).await;
                let key = ["alice", "bob", "carol"][k];
                let ours = send(&mut svc, some(key))
                    .await
                    .map(drop)
                    .map_err(|e| rate_limited(&e).retry_after);
                let theirs = governor
                    .check_key(&key.to_string())
                    .map_err(|nu| nu.wait_time_from(clock.now()));
                prop_assert_eq!(ours, theirs, "{} at {:?}", key, start.elapsed());
            }
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn admissions_count_exactly_through_long_lived_services_clones_and_drops() {
    let plenty = || Rate::per_second(Rate::MAX_PER_SECOND);
    // Global: a long-lived service (counting in a slot of its own after a few dozen
    // admissions), a clone per request, another service; then they go.
    let layer = RateLimitLayer::global(plenty());
    let handle = layer.handle();
    let mut long = layer.layer(Echo);
    let mut other = long.clone();
    for _ in 0..1000 {
        send(&mut long, ()).await.unwrap();
    }
    for _ in 0..100 {
        send(&mut long.clone(), ()).await.unwrap();
    }
    for _ in 0..10 {
        send(&mut other, ()).await.unwrap();
    }
    assert_eq!(handle.stats().admitted, 1110);
    drop(long);
    assert_eq!(
        handle.stats().admitted,
        1110,
        "a service gone keeps its count"
    );
    for _ in 0..100 {
        send(&mut other, ()).await.unwrap();
    }
    assert_eq!(handle.stats().admitted, 1210);
    let Echo = other.into_inner();
    assert_eq!(handle.stats().admitted, 1210);
    assert_eq!(handle.stats().rejected, 0);

    // Keyed: the same, over a few keys, with refusals counted apart.
    let layer = keyed(plenty());
    let handle = layer.handle();
    let mut long = layer.layer(Echo);
    for i in 0..1000 {
        send(&mut long, some(["a", "b", "c"][i % 3])).await.unwrap();
    }
    for _ in 0..100 {
        send(&mut long.clone(), some("d")).await.unwrap();
    }
    assert!(send(&mut long, None).await.is_err());
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected, stats.keys), (1100, 1, 4));
    drop(long);
    assert_eq!(handle.stats().admitted, 1100);
}
