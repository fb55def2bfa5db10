//! Endpoints that die while ready and idle (their `poll_ready` now fails, as hyper's
//! `SendRequest`, tower's `Buffer` and tonic's `Channel` do once their connection or
//! worker is gone) never get a request, and never pile up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use marina_balance::{
    Balance, ConsistentHash, LeastConnections, LeastResponseTime, Pick, PowerOfTwoChoices, Random,
    RoundRobin, WeightedRoundRobin,
};
use marina_core::{BoxError, RouteHint};
use tokio::sync::mpsc;
use tower::discover::Change;
use tower::{Service, ServiceExt};

/// An endpoint that answers at once until it dies; dead, its `poll_ready` fails, and a
/// request sent to it anyway is counted.
#[derive(Clone)]
struct Mortal {
    id: u32,
    dead: Arc<AtomicBool>,
    sent_to_dead: Arc<AtomicU64>,
}

impl Service<RouteHintReq> for Mortal {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.dead.load(Relaxed) {
            Poll::Ready(Err("connection closed".into()))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _: RouteHintReq) -> Self::Future {
        if self.dead.load(Relaxed) {
            self.sent_to_dead.fetch_add(1, Relaxed);
            return std::future::ready(Err("sent to a dead endpoint".into()));
        }
        std::future::ready(Ok(self.id))
    }
}

/// A request with an optional route hint.
#[derive(Clone)]
struct RouteHintReq(Option<RouteHint>);

fn pickers() -> Vec<(&'static str, Box<dyn Pick>)> {
    vec![
        ("round robin", Box::new(RoundRobin::new())),
        ("weighted", Box::new(WeightedRoundRobin::new())),
        ("least connections", Box::new(LeastConnections::new())),
        ("least response time", Box::new(LeastResponseTime::new())),
        ("random", Box::new(Random::with_seed(7))),
        ("p2c", Box::new(PowerOfTwoChoices::with_seed(7))),
        ("consistent hash", Box::new(ConsistentHash::new())),
    ]
}

type Tx = mpsc::UnboundedSender<Result<Change<u32, Mortal>, BoxError>>;

fn channel_balance(
    picker: Box<dyn Pick>,
) -> (
    Balance<tokio_stream_like::Rx, RouteHintReq>,
    Tx,
    Arc<AtomicU64>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let lb =
        Balance::new(tokio_stream_like::Rx(rx), picker).route_hint(|r: &RouteHintReq| r.0.clone());
    (lb, tx, Arc::new(AtomicU64::new(0)))
}

/// `Discover` over an unbounded channel of changes.
mod tokio_stream_like {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_core::Stream;
    use marina_core::BoxError;
    use tokio::sync::mpsc;
    use tower::discover::Change;

    use super::Mortal;

    pub(crate) struct Rx(pub(crate) mpsc::UnboundedReceiver<Result<Change<u32, Mortal>, BoxError>>);

    impl Stream for Rx {
        type Item = Result<Change<u32, Mortal>, BoxError>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

#[tokio::test]
async fn endpoints_that_die_idle_get_no_request() {
    for (name, picker) in pickers() {
        let (mut lb, tx, sent_to_dead) = channel_balance(picker);
        let mut deaths = Vec::new();
        for id in 0..5 {
            let dead = Arc::new(AtomicBool::new(false));
            deaths.push(dead.clone());
            tx.send(Ok(Change::Insert(
                id,
                Mortal {
                    id,
                    dead,
                    sent_to_dead: sent_to_dead.clone(),
                },
            )))
            .unwrap();
        }
        // All five are ready.
        lb.ready().await.unwrap();
        for _ in 0..10 {
            lb.ready()
                .await
                .unwrap()
                .call(RouteHintReq(None))
                .await
                .unwrap();
        }
        assert_eq!(lb.handle().totals().ready, 5, "{name}");

        // Four die while idle.
        for d in &deaths[1..] {
            d.store(true, Relaxed);
        }
        for k in 0..20u64 {
            let hint = (k % 2 == 0).then(|| RouteHint::hash(k));
            let got = lb.ready().await.unwrap().call(RouteHintReq(hint)).await;
            assert_eq!(
                got.unwrap(),
                0,
                "{name}: request {k} not sent to the live endpoint"
            );
        }
        assert_eq!(
            sent_to_dead.load(Relaxed),
            0,
            "{name}: requests sent to dead endpoints"
        );
        let totals = lb.handle().totals();
        assert_eq!(totals.endpoints, 1, "{name}: dead endpoints still tracked");
        assert_eq!(totals.ready, 1, "{name}");
    }
}

#[tokio::test]
async fn a_sticky_hint_to_a_dead_endpoint_goes_elsewhere() {
    let (mut lb, tx, sent_to_dead) = channel_balance(Box::new(RoundRobin::new()));
    let mut deaths = Vec::new();
    for id in 0..3 {
        let dead = Arc::new(AtomicBool::new(false));
        deaths.push(dead.clone());
        tx.send(Ok(Change::Insert(
            id,
            Mortal {
                id,
                dead,
                sent_to_dead: sent_to_dead.clone(),
            },
        )))
        .unwrap();
    }
    lb.ready().await.unwrap();
    let target = lb.handle().stats()[2].id;
    let pinned = RouteHintReq(Some(RouteHint::endpoint(target)));
    assert_eq!(
        lb.ready()
            .await
            .unwrap()
            .call(pinned.clone())
            .await
            .unwrap(),
        2
    );
    deaths[2].store(true, Relaxed);
    let hint = RouteHint::endpoint(target);
    let got = lb
        .ready()
        .await
        .unwrap()
        .call(RouteHintReq(Some(hint.clone())))
        .await
        .unwrap();
    assert_ne!(got, 2);
    assert_eq!(sent_to_dead.load(Relaxed), 0);
    // The hint is told where the request went (the affinity layer re-pins).
    assert_ne!(hint.chosen(), Some(target));
}

/// tower's balance stress workload, in miniature: endpoints are added, removed and die
/// at random while requests flow. No request reaches a dead endpoint, and the tracked
/// set stays bounded by the live ones.
#[tokio::test]
async fn churn_sends_nothing_to_dead_endpoints_and_keeps_the_set_bounded() {
    for (name, picker) in pickers() {
        let (mut lb, tx, sent_to_dead) = channel_balance(picker);
        let mut rng = fastrand::Rng::with_seed(42);
        let mut live: Vec<(u32, Arc<AtomicBool>)> = Vec::new();
        let mut next_id = 0u32;
        let mut max_tracked = 0;
        for step in 0..3_000u32 {
            match rng.u32(0..10) {
                0 | 1 => {
                    let dead = Arc::new(AtomicBool::new(false));
                    tx.send(Ok(Change::Insert(
                        next_id,
                        Mortal {
                            id: next_id,
                            dead: dead.clone(),
                            sent_to_dead: sent_to_dead.clone(),
                        },
                    )))
                    .unwrap();
                    live.push((next_id, dead));
                    next_id += 1;
                }
                2 if live.len() > 1 => {
                    let (id, _) = live.swap_remove(rng.usize(0..live.len()));
                    tx.send(Ok(Change::Remove(id))).unwrap();
                }
                3 if live.len() > 1 => {
                    // Dies without discovery ever saying so.
                    let (_, dead) = live.swap_remove(rng.usize(0..live.len()));
                    dead.store(true, Relaxed);
                }
                _ => {}
            }
            if live.is_empty() {
                continue;
            }
            let hint = (step % 3 == 0).then(|| RouteHint::hash(u64::from(step)));
            let got = lb.ready().await.unwrap().call(RouteHintReq(hint)).await;
            let id = got.unwrap_or_else(|e| panic!("{name}: step {step} failed: {e}"));
            assert!(live.iter().any(|(l, _)| *l == id), "{name}: {id} not live");
            max_tracked = max_tracked.max(lb.handle().totals().endpoints);
        }
        assert_eq!(
            sent_to_dead.load(Relaxed),
            0,
            "{name}: requests sent to dead endpoints"
        );
        let tracked = lb.handle().totals().endpoints;
        assert!(
            tracked <= 2 * live.len() + 2,
            "{name}: {tracked} endpoints tracked with {} live",
            live.len()
        );
        assert!(
            max_tracked <= 3 * live.len().max(10),
            "{name}: up to {max_tracked} tracked"
        );
    }
}
