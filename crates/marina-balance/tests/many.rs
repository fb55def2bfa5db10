//! Many endpoints (issue #21), through `Balance`: an ejection polls no other endpoint
//! and the ejected one still gets no request; every change of the ready set reaches the
//! picker as one `SetChange` that matches the view; the consistent-hash ring follows
//! discovery in place and routes as a fresh ring over the same set; a Maglev picker
//! keeps routing while its next table is built; bounded load reads the balancer's
//! running total.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use marina_balance::{
    Balance, ChangeStream, ConsistentHash, Endpoints, Pick, RoundRobin, SetChange,
    WeightedRoundRobin,
};
use marina_core::{EjectionGate, EndpointId, GateMember, RouteHint};
use tokio_test::assert_ready_ok;
use tokio_test::task::spawn;
use tower::discover::{Change, ServiceList};
use tower::{Service, ServiceExt};

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

/// An endpoint answering with its number, counting its `poll_ready` calls; its readiness
/// closes while it is ejected (unless the gate is open) or held, and reopens with a
/// wake-up, as marina-health's and a pool's do.
#[derive(Clone)]
struct Ep {
    n: u32,
    state: Arc<EpState>,
}

struct EpState {
    polls: AtomicUsize,
    member: Option<GateMember>,
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Ep {
    fn new(n: u32, gate: Option<&EjectionGate>) -> Self {
        Ep {
            n,
            state: Arc::new(EpState {
                polls: AtomicUsize::new(0),
                member: gate.map(EjectionGate::join),
                closed: AtomicBool::new(false),
                waker: Mutex::new(None),
            }),
        }
    }

    /// Closes (ejected, or held) or reopens its readiness.
    fn close(&self, closed: bool) {
        let s = &self.state;
        s.closed.store(closed, Relaxed);
        if let Some(m) = &s.member {
            m.set_ejected(closed);
        }
        if !closed && let Some(w) = s.waker.lock().unwrap().take() {
            w.wake();
        }
    }

    fn polls(&self) -> usize {
        self.state.polls.load(Relaxed)
    }
}

impl<R> Service<R> for Ep {
    type Response = u32;
    type Error = Infallible;
    type Future = std::future::Ready<Result<u32, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let s = &self.state;
        s.polls.fetch_add(1, Relaxed);
        let gate_open = s.member.as_ref().is_some_and(GateMember::gate_open);
        if s.closed.load(Relaxed) && !gate_open {
            *s.waker.lock().unwrap() = Some(cx.waker().clone());
            if s.closed.load(Relaxed) {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        std::future::ready(Ok(self.n))
    }
}

/// A request with an optional route hint.
#[derive(Clone, Default)]
struct Req(Option<RouteHint>);

fn hashed(key: u64) -> Req {
    Req(Some(RouteHint::hash(key)))
}

// ---------------------------------------------------------------------------------------
// 1. An ejection polls no other endpoint; the ejected one gets no request
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_ejection_polls_no_other_endpoint_and_the_ejected_one_gets_no_request() {
    const N: u32 = 64;
    let gate = EjectionGate::new();
    let eps: Vec<Ep> = (0..N).map(|n| Ep::new(n, Some(&gate))).collect();
    let mut lb: Balance<_, Req> =
        Balance::new(ServiceList::new::<Req>(eps.clone()), RoundRobin::new())
            .ejection_gate(gate.clone());
    let handle = lb.handle();
    let mut task = spawn(());
    let total = || eps.iter().map(Ep::polls).sum::<usize>();
    for _ in 0..2 * N {
        lb.ready()
            .await
            .unwrap()
            .call(Req::default())
            .await
            .unwrap();
    }

    // Endpoint 5 is ejected while in the ready set (by its health check, not by a
    // request this balancer sent).
    eps[5].close(true);
    let before = total();
    assert_ready_ok!(task.enter(|cx, _| lb.poll_ready(cx)));
    assert!(
        total() - before <= 2,
        "the gate's change made the balancer poll {} endpoints",
        total() - before
    );
    // In turn over the set, no request reaches it, and it leaves the ready set.
    for round in 0..2 * N {
        let before = total();
        let n = lb
            .ready()
            .await
            .unwrap()
            .call(Req::default())
            .await
            .unwrap();
        assert_ne!(n, 5, "request {round} went to the ejected endpoint");
        assert!(
            total() - before <= 4,
            "one request polled {} endpoints",
            total() - before
        );
    }
    let totals = handle.totals();
    assert_eq!((totals.ready, totals.pending), (N as usize - 1, 1));
    assert!(!totals.panicking);

    // Readmitted (its readiness reopens, with a wake-up): it takes requests again.
    eps[5].close(false);
    let mut seen = HashSet::new();
    for _ in 0..2 * N {
        seen.insert(
            lb.ready()
                .await
                .unwrap()
                .call(Req::default())
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        seen.len(),
        N as usize,
        "not every endpoint served after the readmission"
    );
    assert_eq!(handle.totals().ready, N as usize);
}

// ---------------------------------------------------------------------------------------
// 2. Every change of the ready set reaches the picker, matching the view
// ---------------------------------------------------------------------------------------

/// Wraps a picker; keeps its own copy of the view's ids from the changes reported and
/// checks it against the view at every change and every pick.
struct Mirror<P> {
    inner: P,
    ids: Vec<EndpointId>,
    generation: Option<u64>,
    changes: Arc<AtomicUsize>,
}

impl<P: Pick> Mirror<P> {
    fn check(&self, e: &dyn Endpoints, at: &str) {
        let view: Vec<EndpointId> = (0..e.len()).map(|i| e.id(i)).collect();
        assert_eq!(
            self.ids, view,
            "{at}: the changes reported do not add up to the view"
        );
    }
}

impl<P: Pick> Pick for Mirror<P> {
    fn pick(&mut self, e: &dyn Endpoints, hint: Option<&RouteHint>) -> usize {
        self.check(e, "pick");
        assert_eq!(self.generation, e.generation(), "a change went unreported");
        self.inner.pick(e, hint)
    }

    fn update(&mut self, e: &dyn Endpoints, change: SetChange) {
        assert_ne!(
            self.generation,
            e.generation(),
            "a change without a new generation"
        );
        match change {
            SetChange::Added { index } => {
                assert_eq!(index, self.ids.len());
                self.ids.push(e.id(index));
            }
            SetChange::Removed { index, id } => {
                assert_eq!(self.ids[index], id, "removed the wrong endpoint");
                self.ids.swap_remove(index);
            }
            _ => unreachable!("no other change"),
        }
        self.generation = e.generation();
        self.changes.fetch_add(1, Relaxed);
        self.check(e, "update");
        self.inner.update(e, change);
    }
}

#[tokio::test(start_paused = true)]
async fn every_ready_set_change_reaches_the_picker_as_one_set_change() {
    let changes = Arc::new(AtomicUsize::new(0));
    let picker = Mirror {
        inner: WeightedRoundRobin::edf(),
        ids: Vec::new(),
        generation: None,
        changes: changes.clone(),
    };
    let (tx, discover) = ChangeStream::channel();
    let mut lb = Balance::new(discover, picker)
        .weights(|k: &u32| 1 + k % 3)
        .failfast_timeout(Duration::from_secs(3600));
    let mut rng = fastrand::Rng::with_seed(21);
    let mut live: Vec<(u32, Ep)> = Vec::new();
    let mut next = 0u32;
    for step in 0..3_000 {
        match rng.u32(0..10) {
            // Discovery adds an endpoint, or replaces one under the same key.
            0..=2 => {
                let key = if live.is_empty() || rng.bool() {
                    next += 1;
                    next
                } else {
                    live[rng.usize(0..live.len())].0
                };
                let ep = Ep::new(key, None);
                live.retain(|(k, _)| *k != key);
                live.push((key, ep.clone()));
                tx.send(Change::Insert(key, ep)).unwrap();
            }
            // Discovery removes one.
            3 if !live.is_empty() => {
                let (key, _) = live.swap_remove(rng.usize(0..live.len()));
                tx.send(Change::Remove(key)).unwrap();
            }
            // One closes or reopens (ejected and readmitted, or at its limit and not).
            4..=6 if !live.is_empty() => {
                let (_, ep) = &live[rng.usize(0..live.len())];
                ep.close(!ep.state.closed.load(Relaxed));
            }
            _ => {}
        }
        // A request whenever something is ready.
        let mut task = spawn(());
        if task.enter(|cx, _| lb.poll_ready(cx)).is_ready() && lb.handle().totals().ready > 0 {
            let n = lb.call(Req::default()).await.unwrap();
            let ep = live.iter().find(|(k, _)| *k == n).map(|(_, ep)| ep);
            assert!(
                ep.is_some_and(|ep| !ep.state.closed.load(Relaxed)),
                "step {step}: request went to {n}, closed or gone"
            );
        }
    }
    assert!(
        changes.load(Relaxed) > 1_000,
        "{} changes",
        changes.load(Relaxed)
    );
}

// ---------------------------------------------------------------------------------------
// 3. The ring follows discovery in place
// ---------------------------------------------------------------------------------------

/// Endpoint ids by key, as the balancer computes them.
fn id_of(key: u32) -> EndpointId {
    EndpointId::of(&format!("{key:?}"))
}

/// A plain view over some endpoint ids.
struct Ids(Vec<EndpointId>);

impl Endpoints for Ids {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn id(&self, i: usize) -> EndpointId {
        self.0[i]
    }
}

/// Where `picker`, fresh, sends each of `keys` among the endpoints `ids`.
fn fresh_choices(mut picker: ConsistentHash, ids: &[EndpointId], keys: &[u64]) -> Vec<EndpointId> {
    let view = Ids(ids.to_vec());
    keys.iter()
        .map(|&k| view.id(picker.pick(&view, Some(&RouteHint::hash(k)))))
        .collect()
}

type ChannelBalance = Balance<ChangeStream<u32, Ep>, Req>;

/// The endpoint (its number) a request with hash `key` goes to.
async fn route(lb: &mut ChannelBalance, key: u64) -> u32 {
    lb.ready().await.unwrap().call(hashed(key)).await.unwrap()
}

#[tokio::test]
async fn the_ring_follows_discovery_and_moves_only_the_removed_endpoints_keys() {
    const N: u32 = 300;
    let (tx, discover) = ChangeStream::channel();
    let mut lb = Balance::new(discover, ConsistentHash::new()).route_hint(|r: &Req| r.0.clone());
    for key in 0..N {
        tx.send(Change::Insert(key, Ep::new(key, None))).unwrap();
    }
    let keys: Vec<u64> = (0..400).map(|k| k * 7_919).collect();
    let mut before = Vec::new();
    for &k in &keys {
        before.push(route(&mut lb, k).await);
    }
    let mut live: Vec<u32> = (0..N).collect();
    for round in 0..30u32 {
        let gone = live.swap_remove((round as usize * 37) % live.len());
        tx.send(Change::Remove(gone)).unwrap();
        let ids: Vec<EndpointId> = live.iter().map(|&k| id_of(k)).collect();
        let fresh = fresh_choices(ConsistentHash::new(), &ids, &keys);
        for (i, &k) in keys.iter().enumerate() {
            let now = route(&mut lb, k).await;
            if before[i] != gone {
                assert_eq!(
                    now, before[i],
                    "round {round}: key {k} moved off a live endpoint"
                );
            }
            assert_eq!(
                id_of(now),
                fresh[i],
                "round {round}: key {k} routes unlike a fresh ring"
            );
            before[i] = now;
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Maglev keeps routing while its next table is built
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn maglev_routes_every_request_while_its_next_table_is_built() {
    const N: u32 = 200;
    let (tx, discover) = ChangeStream::channel();
    let mut lb =
        Balance::new(discover, ConsistentHash::new().maglev()).route_hint(|r: &Req| r.0.clone());
    for key in 0..N {
        tx.send(Change::Insert(key, Ep::new(key, None))).unwrap();
    }
    let keys: Vec<u64> = (0..300).map(|k| k * 104_729).collect();
    let mut live: Vec<u32> = (0..N).collect();

    // Requests routed with `lb` until its choices are those of a fresh table over
    // `live` (the worker's table is in).
    async fn settle(lb: &mut ChannelBalance, keys: &[u64], live: &[u32]) {
        let ids: Vec<EndpointId> = live.iter().map(|&k| id_of(k)).collect();
        let want = fresh_choices(ConsistentHash::new().maglev(), &ids, keys);
        for _ in 0..12_000 {
            let mut got = Vec::new();
            for &k in keys {
                got.push(id_of(route(lb, k).await));
            }
            if got == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the worker's table never came in");
    }
    settle(&mut lb, &keys, &live).await;

    for round in 0..10 {
        let gone = live.swap_remove((round * 53) % live.len());
        tx.send(Change::Remove(gone)).unwrap();
        // At once, before any new table: every request is routed, none to the endpoint
        // that left.
        for &k in &keys {
            let n = route(&mut lb, k).await;
            assert_ne!(n, gone, "round {round}: key {k} went to a removed endpoint");
        }
        // An endpoint joins too (it gets keys once the new table is in).
        let key = N + round as u32;
        tx.send(Change::Insert(key, Ep::new(key, None))).unwrap();
        live.push(key);
    }
    settle(&mut lb, &keys, &live).await;
}

// ---------------------------------------------------------------------------------------
// 5. Bounded load reads the balancer's running total
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bounded_load_holds_through_the_balancer() {
    const N: u32 = 100;
    const K: usize = 400;
    let eps: Vec<Ep> = (0..N).map(|n| Ep::new(n, None)).collect();
    let mut lb: Balance<_, Req> = Balance::new(
        ServiceList::new::<Req>(eps),
        ConsistentHash::new().bounded_load(1.25),
    )
    .route_hint(|r: &Req| r.0.clone());
    let handle = lb.handle();
    // One hot key, K requests held in flight.
    let mut held = Vec::new();
    for _ in 0..K {
        held.push(lb.ready().await.unwrap().call(hashed(42)));
    }
    let stats = handle.stats();
    let in_flight: Vec<u64> = stats.iter().map(|s| s.in_flight).collect();
    assert_eq!(in_flight.iter().sum::<u64>(), K as u64);
    // ceil(1.25 × K / N) = 5 at most on any endpoint.
    assert!(in_flight.iter().all(|&f| f <= 5), "{in_flight:?}");
    let first = held.remove(0).await.unwrap();
    // All done: the total is back to nothing, and the key goes to its own endpoint.
    for f in held {
        f.await.unwrap();
    }
    assert_eq!(handle.totals().in_flight, 0);
    let again = lb.ready().await.unwrap().call(hashed(42)).await.unwrap();
    assert_eq!(again, first);
}

// ---------------------------------------------------------------------------------------
// 6. Pending endpoints are polled when they wake, not on every request
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pending_endpoints_are_polled_when_they_wake_not_per_request() {
    const N: u32 = 64;
    let eps: Vec<Ep> = (0..N).map(|n| Ep::new(n, None)).collect();
    // Half of them pending from the start (ejected, at their limit: closed readiness).
    for ep in &eps[..N as usize / 2] {
        ep.close(true);
    }
    let mut lb: Balance<_, Req> =
        Balance::new(ServiceList::new::<Req>(eps.clone()), RoundRobin::new());
    let handle = lb.handle();
    let total = || eps.iter().map(Ep::polls).sum::<usize>();
    for _ in 0..N {
        let n = lb
            .ready()
            .await
            .unwrap()
            .call(Req::default())
            .await
            .unwrap();
        assert!(n >= N / 2, "went to pending endpoint {n}");
    }
    let pending_polls = || eps[..N as usize / 2].iter().map(Ep::polls).sum::<usize>();
    let before = (total(), pending_polls());
    for _ in 0..4 * N {
        lb.ready()
            .await
            .unwrap()
            .call(Req::default())
            .await
            .unwrap();
    }
    assert_eq!(
        pending_polls(),
        before.1,
        "pending endpoints polled without waking"
    );
    assert!(
        total() - before.0 <= 3 * 4 * N as usize,
        "{} polls for {} requests",
        total() - before.0,
        4 * N
    );
    // One wakes: it is polled, joins, and takes requests; the others are still not
    // polled.
    let others = || {
        eps[..N as usize / 2]
            .iter()
            .filter(|e| e.n != 3)
            .map(Ep::polls)
            .sum::<usize>()
    };
    let still = others();
    eps[3].close(false);
    let mut seen = HashSet::new();
    for _ in 0..2 * N {
        seen.insert(
            lb.ready()
                .await
                .unwrap()
                .call(Req::default())
                .await
                .unwrap(),
        );
    }
    assert!(seen.contains(&3), "the endpoint that woke got no request");
    assert_eq!(handle.totals().ready, N as usize / 2 + 1);
    assert_eq!(others(), still, "pending endpoints polled without waking");
}
