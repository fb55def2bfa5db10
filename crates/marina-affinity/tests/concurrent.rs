//! Concurrent requests of one session (several callers sharing a sticky session): the
//! table is pinned by compare-and-set against the pin each request saw when it was
//! routed, so the first pin wins and a session moves once per failure.
//!
//! A fake balancer routes each request where the test says (as a balancer whose pinned
//! endpoint is not ready chooses another), reports the choice through the route hint at
//! once, and answers only when the test releases the request: several requests of one
//! session are routed before any answers.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use marina_affinity::{Affinity, AffinityHandle, AffinityLayer, TableConfig};
use marina_core::{BoxError, EndpointId, HintTarget, Request, Response, RouteHint};
use tokio::sync::oneshot;
use tower::{Layer, Service};

type Req = Request<String>;
type Resp = Response<EndpointId>;

#[derive(Default)]
struct State {
    /// Where the next requests go, whatever their hints ask.
    forced: VecDeque<EndpointId>,
    /// The requests routed and not answered yet: where each went, and its release.
    waiting: Vec<(EndpointId, oneshot::Sender<()>)>,
}

/// Routes a request to the next forced endpoint, else where its hint names, else
/// endpoint 0; answers once released.
#[derive(Clone, Default)]
struct FakeBalancer(Arc<Mutex<State>>);

impl Service<Req> for FakeBalancer {
    type Response = Resp;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let hint = req.extensions.get::<RouteHint>().cloned();
        let mut state = self.0.lock().unwrap();
        let ep = state.forced.pop_front().unwrap_or_else(|| {
            match hint.as_ref().map(RouteHint::target) {
                Some(HintTarget::Endpoint(ep)) => ep,
                _ => EndpointId(0),
            }
        });
        if let Some(h) = &hint {
            h.report_chosen(ep);
        }
        let (tx, rx) = oneshot::channel();
        state.waiting.push((ep, tx));
        Box::pin(async move {
            rx.await?;
            Ok(Response::new(ep))
        })
    }
}

impl FakeBalancer {
    fn force(&self, eps: &[u64]) {
        self.0
            .lock()
            .unwrap()
            .forced
            .extend(eps.iter().map(|&e| EndpointId(e)));
    }

    /// Releases the `i`th request still waiting (in the order they were routed).
    fn release(&self, i: usize) -> EndpointId {
        let (ep, tx) = self.0.lock().unwrap().waiting.remove(i);
        tx.send(()).unwrap();
        ep
    }
}

type Svc = Affinity<FakeBalancer, fn(&Req) -> Option<String>>;

fn key(req: &Req) -> Option<String> {
    Some(req.body.clone())
}

fn stack() -> (Svc, FakeBalancer, AffinityHandle) {
    let lb = FakeBalancer::default();
    let layer = AffinityLayer::sticky(key as fn(&Req) -> Option<String>, TableConfig::default());
    let handle = layer.handle();
    (layer.layer(lb.clone()), lb, handle)
}

/// Routes one request of session `s` (the call, not yet answered).
fn route(svc: &mut Svc) -> <Svc as Service<Req>>::Future {
    svc.call(Request::new("s".to_owned()))
}

/// One request of session `s`, routed and answered: where it went.
async fn one(svc: &mut Svc, lb: &FakeBalancer) -> EndpointId {
    let fut = route(svc);
    lb.release(0);
    fut.await.unwrap().body
}

#[tokio::test]
async fn two_concurrent_first_requests_pin_the_session_once() {
    for first_answered in [0, 1] {
        let (mut svc, lb, handle) = stack();
        lb.force(&[1, 2]);
        let mut routed = vec![route(&mut svc), route(&mut svc)];
        // Whichever answers first pins the session; the other leaves that pin alone.
        let winner = lb.release(first_answered);
        assert_eq!(routed.remove(first_answered).await.unwrap().body, winner);
        assert_eq!(handle.pinned("s"), Some(winner));
        let loser = lb.release(0);
        assert_ne!(winner, loser);
        assert_eq!(routed.remove(0).await.unwrap().body, loser);
        assert_eq!(handle.pinned("s"), Some(winner));
        // Both callers' next requests go to the same endpoint.
        assert_eq!(one(&mut svc, &lb).await, winner);
        assert_eq!(one(&mut svc, &lb).await, winner);
        let stats = handle.stats();
        assert_eq!((stats.created, stats.repinned, stats.sessions), (1, 0, 1));
    }
}

#[tokio::test]
async fn a_failure_with_three_requests_in_flight_moves_the_session_once() {
    let (mut svc, lb, handle) = stack();
    assert_eq!(one(&mut svc, &lb).await, EndpointId(0));
    // Endpoint 0 fails: three requests in flight, each sent elsewhere.
    lb.force(&[1, 2, 1]);
    let futs = [route(&mut svc), route(&mut svc), route(&mut svc)];
    let mut went = Vec::new();
    for f in futs {
        went.push(lb.release(0));
        assert_eq!(f.await.unwrap().body, went[went.len() - 1]);
    }
    assert_eq!(went, [EndpointId(1), EndpointId(2), EndpointId(1)]);
    // The first answer moved it; the others, which saw endpoint 0 too, left it there.
    assert_eq!(handle.pinned("s"), Some(EndpointId(1)));
    let stats = handle.stats();
    assert_eq!((stats.created, stats.repinned, stats.sessions), (1, 1, 1));
    for _ in 0..3 {
        assert_eq!(one(&mut svc, &lb).await, EndpointId(1));
    }
    assert_eq!(handle.stats().repinned, 1);
}

#[tokio::test]
async fn a_late_answer_from_before_a_move_does_not_move_the_session_back() {
    let (mut svc, lb, handle) = stack();
    assert_eq!(one(&mut svc, &lb).await, EndpointId(0));
    // A request routed to endpoint 0 (the pin), slow to answer...
    let slow = route(&mut svc);
    // ...meanwhile endpoint 0 fails and a later request moves the session to 2.
    lb.force(&[2]);
    let moved = route(&mut svc);
    assert_eq!(lb.release(1), EndpointId(2));
    moved.await.unwrap();
    assert_eq!(handle.pinned("s"), Some(EndpointId(2)));
    // The slow one answers from endpoint 0 at last: the session stays on 2.
    assert_eq!(lb.release(0), EndpointId(0));
    slow.await.unwrap();
    assert_eq!(handle.pinned("s"), Some(EndpointId(2)));
    assert_eq!(handle.stats().repinned, 1);
}
