//! Tests of `Balance::slow_start`.
//!
//! - An endpoint readmitted after an unready spell longer than `after_unready` gets a
//!   share of the requests that rises monotonically over the window (counted over 5
//!   slices of it) and is back to its full share after it, with round robin, smooth
//!   weighted round robin, least connections, power of two choices and random.
//! - The same for an endpoint that discovery adds after the first request.
//! - No ramp: for the endpoints there at the start, for a short unready spell, with
//!   slow start off, and for requests whose route hint names the endpoint.
//!
//! Endpoints are "doors": always-ready services that answer with their index until
//! closed, pending while closed (waking the balancer when opened again). Time is
//! paused and moved with `tokio::time::advance` between requests, so each slice of
//! the window sees the same number of requests.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use marina_balance::{
    Balance, BalanceHandle, ChangeStream, LeastConnections, Pick, PowerOfTwoChoices, Random,
    RoundRobin, SlowStart, WeightedRoundRobin,
};
use marina_core::{BoxError, EndpointId, HasExtensions, Request, RouteHint};
use tower::discover::Change;
use tower::{Service, ServiceExt};

/// An endpoint answering with its index while open; pending while closed.
#[derive(Clone)]
struct Door {
    index: usize,
    open: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Door {
    fn new(index: usize) -> Self {
        Door {
            index,
            open: Arc::new(AtomicBool::new(true)),
            waker: Arc::default(),
        }
    }

    fn close(&self) {
        self.open.store(false, SeqCst);
    }

    fn open(&self) {
        self.open.store(true, SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl<R> Service<R> for Door {
    type Response = usize;
    type Error = BoxError;
    type Future = std::future::Ready<Result<usize, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.open.load(SeqCst) {
            return Poll::Ready(Ok(()));
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn call(&mut self, _: R) -> Self::Future {
        std::future::ready(Ok(self.index))
    }
}

const WINDOW: Duration = Duration::from_secs(10);
const SLICES: usize = 5;
const PER_SLICE: usize = 400;

/// One request; the index of the endpoint that answered.
async fn one<S: Service<(), Response = usize, Error = BoxError>>(lb: &mut S) -> usize {
    lb.ready().await.unwrap().call(()).await.unwrap()
}

/// `n` requests spread evenly over `span` of (paused) time; how many endpoint
/// `watched` answered.
async fn slice<S: Service<(), Response = usize, Error = BoxError>>(
    lb: &mut S,
    n: usize,
    span: Duration,
    watched: usize,
) -> usize {
    let step = span / n as u32;
    let mut hits = 0;
    for _ in 0..n {
        if one(lb).await == watched {
            hits += 1;
        }
        tokio::time::advance(step).await;
    }
    hits
}

fn is_ready(h: &BalanceHandle, index: usize) -> bool {
    let key = format!("{index:?}");
    h.stats().iter().any(|s| s.key == key && s.ready)
}

/// Closes `door`, sends requests until the balancer has seen it unready, waits
/// `unready_for`, then opens it again and lets the balancer see it ready.
async fn bounce<S: Service<(), Response = usize, Error = BoxError>>(
    lb: &mut S,
    h: &BalanceHandle,
    door: &Door,
    unready_for: Duration,
) {
    assert!(
        is_ready(h, door.index),
        "bounce a door the balancer knows open"
    );
    door.close();
    for _ in 0..100 {
        if !is_ready(h, door.index) {
            break;
        }
        one(lb).await;
    }
    assert!(
        !is_ready(h, door.index),
        "the balancer never noticed the closed door"
    );
    tokio::time::advance(unready_for).await;
    door.open();
    lb.ready().await.unwrap();
    assert!(is_ready(h, door.index));
}

/// Endpoint 2's share of the requests in each fifth of the window after it is
/// readmitted (unready for 5 s), and in a slice after the window, under `picker`.
async fn readmitted_shares(picker: impl Pick) -> (Vec<f64>, f64) {
    let doors: Vec<Door> = (0..3).map(Door::new).collect();
    let mut lb = Balance::from_services(doors.clone(), picker).slow_start(WINDOW);
    let h = lb.handle();
    // The initial set does not ramp: endpoint 2 has its share from the start.
    let warm = slice(&mut lb, 300, Duration::from_secs(3), 2).await;
    assert!(
        (70..=130).contains(&warm),
        "endpoint 2 got {warm} of the first 300 requests"
    );
    bounce(&mut lb, &h, &doors[2], Duration::from_secs(5)).await;
    let mut shares = Vec::new();
    for _ in 0..SLICES {
        let hits = slice(&mut lb, PER_SLICE, WINDOW / SLICES as u32, 2).await;
        shares.push(hits as f64 / PER_SLICE as f64);
    }
    let after =
        slice(&mut lb, PER_SLICE, WINDOW / SLICES as u32, 2).await as f64 / PER_SLICE as f64;
    (shares, after)
}

/// The shares rise strictly from slice to slice, start well below the full share (1/3)
/// and end near it.
fn assert_ramp(name: &str, shares: &[f64], after: f64) {
    eprintln!("{name}: shares per fifth of the window {shares:?}, after it {after}");
    assert!(
        shares.windows(2).all(|w| w[0] < w[1]),
        "{name}: shares not rising: {shares:?}"
    );
    assert!(shares[0] < 0.12, "{name}: first slice share {}", shares[0]);
    assert!(
        shares[SLICES - 1] > 0.22,
        "{name}: last slice share {shares:?}"
    );
    assert!(
        (0.27..0.40).contains(&after),
        "{name}: share after the window {after} (shares {shares:?})"
    );
}

#[tokio::test(start_paused = true)]
async fn readmitted_endpoint_ramps_up_with_round_robin() {
    let (shares, after) = readmitted_shares(RoundRobin::new()).await;
    assert_ramp("round robin", &shares, after);
}

#[tokio::test(start_paused = true)]
async fn readmitted_endpoint_ramps_up_with_weighted_round_robin() {
    let (shares, after) = readmitted_shares(WeightedRoundRobin::new()).await;
    assert_ramp("weighted round robin", &shares, after);
}

#[tokio::test(start_paused = true)]
async fn readmitted_endpoint_ramps_up_with_least_connections() {
    let (shares, after) = readmitted_shares(LeastConnections::new()).await;
    assert_ramp("least connections", &shares, after);
}

#[tokio::test(start_paused = true)]
async fn readmitted_endpoint_ramps_up_with_power_of_two_choices() {
    let (shares, after) = readmitted_shares(PowerOfTwoChoices::with_seed(7)).await;
    assert_ramp("P2C", &shares, after);
}

#[tokio::test(start_paused = true)]
async fn readmitted_endpoint_ramps_up_with_random() {
    let (shares, after) = readmitted_shares(Random::with_seed(7)).await;
    assert_ramp("random", &shares, after);
}

#[tokio::test(start_paused = true)]
async fn least_connections_with_requests_in_flight_ramps_too() {
    // Requests held in flight: least connections sends everything to the endpoint with
    // none, which after a readmission is the returning one. The ramp holds it back.
    let doors: Vec<Door> = (0..3).map(Door::new).collect();
    let mut lb = Balance::from_services(doors.clone(), LeastConnections::new()).slow_start(WINDOW);
    let h = lb.handle();
    one(&mut lb).await;
    bounce(&mut lb, &h, &doors[2], Duration::from_secs(5)).await;
    // Keep the futures of the first 30 requests unpolled: they stay in flight (a
    // `Ready` future counts as in flight until polled), loading endpoints 0 and 1.
    let mut held = Vec::new();
    let mut to_2 = 0;
    for _ in 0..30 {
        lb.ready().await.unwrap();
        let before = h.stats().iter().find(|s| s.key == "2").unwrap().requests;
        held.push(lb.call(()));
        if h.stats().iter().find(|s| s.key == "2").unwrap().requests > before {
            to_2 += 1;
        }
    }
    // Without the ramp, endpoint 2 (least loaded) would get about a third; at the
    // start of its window it gets well under that.
    assert!(to_2 <= 6, "the returning endpoint got {to_2} of 30");
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_discovered_after_the_first_request_ramps_up() {
    let (tx, lb) = Balance::<ChangeStream<usize, Door>, ()>::from_channel(RoundRobin::new());
    let mut lb = lb.slow_start(WINDOW);
    let doors: Vec<Door> = (0..3).map(Door::new).collect();
    for d in &doors[..2] {
        tx.send(Change::Insert(d.index, d.clone())).unwrap();
    }
    assert!(one(&mut lb).await < 2);
    tx.send(Change::Insert(2, doors[2].clone())).unwrap();
    lb.ready().await.unwrap();
    let mut shares = Vec::new();
    for _ in 0..SLICES {
        let hits = slice(&mut lb, PER_SLICE, WINDOW / SLICES as u32, 2).await;
        shares.push(hits as f64 / PER_SLICE as f64);
    }
    let after =
        slice(&mut lb, PER_SLICE, WINDOW / SLICES as u32, 2).await as f64 / PER_SLICE as f64;
    assert_ramp("discovered later", &shares, after);
}

#[tokio::test(start_paused = true)]
async fn a_short_unready_spell_does_not_ramp() {
    let doors: Vec<Door> = (0..3).map(Door::new).collect();
    let mut lb = Balance::from_services(doors.clone(), RoundRobin::new())
        .slow_start(SlowStart::new(WINDOW).after_unready(Duration::from_secs(1)));
    let h = lb.handle();
    one(&mut lb).await;
    bounce(&mut lb, &h, &doors[2], Duration::from_millis(900)).await;
    let hits = slice(&mut lb, 300, Duration::from_secs(1), 2).await;
    assert_eq!(hits, 100, "a 0.9 s spell ramped");
}

#[tokio::test(start_paused = true)]
async fn no_ramp_without_slow_start() {
    let doors: Vec<Door> = (0..3).map(Door::new).collect();
    let mut lb = Balance::from_services(doors.clone(), RoundRobin::new());
    let h = lb.handle();
    one(&mut lb).await;
    bounce(&mut lb, &h, &doors[2], Duration::from_secs(5)).await;
    let hits = slice(&mut lb, 300, Duration::from_secs(1), 2).await;
    assert_eq!(hits, 100);
}

#[tokio::test(start_paused = true)]
async fn min_share_sets_the_starting_share() {
    // A start at 100% is no ramp at all; at 0% the first slice gets less than at 10%.
    async fn first_slice(slow: SlowStart) -> usize {
        let doors: Vec<Door> = (0..3).map(Door::new).collect();
        let mut lb = Balance::from_services(doors.clone(), RoundRobin::new()).slow_start(slow);
        let h = lb.handle();
        one(&mut lb).await;
        bounce(&mut lb, &h, &doors[2], Duration::from_secs(5)).await;
        slice(&mut lb, 300, Duration::from_millis(300), 2).await
    }
    let full = first_slice(SlowStart::new(WINDOW).min_share(1.0)).await;
    let tenth = first_slice(SlowStart::new(WINDOW)).await;
    let none = first_slice(SlowStart::new(WINDOW).min_share(0.0)).await;
    assert_eq!(full, 100);
    assert!(none < tenth && tenth < full, "{none} / {tenth} / {full}");
}

#[tokio::test(start_paused = true)]
async fn a_hint_naming_the_ramping_endpoint_is_honoured() {
    let doors: Vec<Door> = (0..3).map(Door::new).collect();
    let mut lb = Balance::from_services(doors.clone(), RoundRobin::new())
        .slow_start(WINDOW)
        .route_hints_from_extensions();
    let h = lb.handle();
    let pinned = || {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(RouteHint::endpoint(EndpointId::of("2")));
        req
    };
    lb.ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    // Bounce endpoint 2 (requests without a hint find it closed).
    doors[2].close();
    for _ in 0..100 {
        if !is_ready(&h, 2) {
            break;
        }
        lb.ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    assert!(!is_ready(&h, 2));
    tokio::time::advance(Duration::from_secs(5)).await;
    doors[2].open();
    for _ in 0..20 {
        let got = lb.ready().await.unwrap().call(pinned()).await.unwrap();
        assert_eq!(got, 2, "a pinned request was turned away by the ramp");
    }
}

#[test]
#[should_panic(expected = "a share, not a percentage")]
fn min_share_refuses_a_percentage() {
    let _ = SlowStart::new(WINDOW).min_share(10.0);
}
