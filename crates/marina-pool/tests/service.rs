//! `PoolService` readiness: `poll_ready` reserves a client (or a free slot, or with
//! `pending_when_saturated` a place in the pool's queue), `call` uses it. A saturated
//! pool is ready by default (the call waits), not ready with `pending_when_saturated`
//! (a freed connection wakes it); a failed checkout is no `poll_ready` error but fails
//! the call, not sent, with the request given back; dropping a service returns what it
//! reserved; a cancelled call closes its client; a balancer routes around a saturated
//! pool.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_balance::{Balance, RoundRobin};
use marina_core::{BoxError, find, is_not_sent, take_unsent_request};
use marina_pool::{Pool, PoolError, PoolService, PoolStats};
use tokio_test::task;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::discover::ServiceList;
use tower::{Service, ServiceExt};

// ------------------------------------------------------------------------- fixtures

/// A request: not `Clone`, so a request given back is the one sent.
#[derive(Debug, PartialEq, Eq)]
struct Req {
    body: u32,
    /// How long the client takes to answer.
    delay: Duration,
}

fn req(body: u32) -> Req {
    Req {
        body,
        delay: Duration::ZERO,
    }
}

/// What a client answers: who answered, and the request's body.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    target: &'static str,
    conn: usize,
    body: u32,
}

/// A pooled client: answers after the request's delay (tokio time).
struct Client {
    target: &'static str,
    id: usize,
    /// Cleared to make the pool's check call it dead.
    alive: Arc<AtomicBool>,
    /// Its own `poll_ready` fails while set.
    unready: Arc<AtomicBool>,
}

impl Service<Req> for Client {
    type Response = Reply;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Reply>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unready.load(SeqCst) {
            return Poll::Ready(Err(io::Error::other("client not usable")));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (target, conn) = (self.target, self.id);
        Box::pin(async move {
            tokio::time::sleep(req.delay).await;
            Ok(Reply {
                target,
                conn,
                body: req.body,
            })
        })
    }
}

/// Makes [`Client`]s (ids from 1), or refuses while `refuse` is set.
#[derive(Clone, Default)]
struct Connector {
    refuse: Arc<AtomicBool>,
    unready: Arc<AtomicBool>,
    made: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Connector {
    /// Makes the pool's check call client `id` dead.
    fn kill(&self, id: usize) {
        self.made.lock().unwrap()[id - 1].store(false, SeqCst);
    }

    fn made(&self) -> usize {
        self.made.lock().unwrap().len()
    }
}

impl Service<&'static str> for Connector {
    type Response = Client;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Client>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: &'static str) -> Self::Future {
        if self.refuse.load(SeqCst) {
            return std::future::ready(Err(io::ErrorKind::ConnectionRefused.into()));
        }
        let alive = Arc::new(AtomicBool::new(true));
        let mut made = self.made.lock().unwrap();
        made.push(alive.clone());
        std::future::ready(Ok(Client {
            target,
            id: made.len(),
            alive,
            unready: self.unready.clone(),
        }))
    }
}

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

fn pool(
    connector: &Connector,
    target: &'static str,
    max_size: usize,
) -> Pool<Connector, &'static str> {
    Pool::builder()
        .max_size(max_size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .health_check_interval(None)
        .no_expiry()
        .check(|c: &mut Client| c.alive.load(SeqCst))
        .build(connector.clone(), target)
        .unwrap()
}

/// Opens `n` connections and leaves them idle (a pool with room reserves a slot for
/// `PoolService`, not a client).
async fn warm(pool: &Pool<Connector, &'static str>, n: usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.get().await.unwrap());
    }
}

/// The pool's gauges that say where its connections are.
fn where_(s: &PoolStats) -> (usize, usize, usize, usize) {
    (s.total, s.active, s.idle, s.waiting)
}

#[track_caller]
fn balanced(s: &PoolStats) {
    assert_eq!(s.acquired, s.released + s.active as u64, "{s:#?}");
}

// ---------------------------------------------------------------------------- tests

#[tokio::test(start_paused = true)]
async fn a_saturated_pool_is_not_ready_and_a_freed_connection_wakes_it() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let held = pool.get().await.unwrap();
    let mut svc = PoolService::new(pool.clone()).pending_when_saturated();
    {
        let mut ready = task::spawn(poll_fn(|cx| svc.poll_ready(cx)));
        assert_pending!(ready.poll());
        assert_eq!(
            where_(&pool.stats()),
            (1, 1, 0, 1),
            "queued for a connection"
        );
        assert_pending!(ready.poll());
        assert_eq!(pool.stats().waiting, 1, "polled again: still one place");
        drop(held);
        assert!(ready.is_woken(), "the freed connection wakes it");
        assert_ready_ok!(ready.poll());
    }
    let s = pool.stats();
    assert_eq!(
        where_(&s),
        (1, 1, 0, 0),
        "reserved for the next call: {s:#?}"
    );
    // A ready service stays ready without checking out more.
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    assert_eq!(pool.stats().acquired, 2);

    let reply = svc.call(req(7)).await.unwrap();
    assert_eq!(
        reply,
        Reply {
            target: "a",
            conn: 1,
            body: 7
        }
    );
    let s = pool.stats();
    assert_eq!(where_(&s), (1, 0, 1, 0), "back after the call: {s:#?}");
    assert_eq!((s.created, s.destroyed), (1, 0));
    balanced(&s);
}

#[tokio::test(start_paused = true)]
async fn a_pool_with_room_reserves_a_slot_and_the_call_connects_in_it() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let mut svc = PoolService::new(pool.clone());
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    let s = pool.stats();
    assert_eq!(
        (s.total, s.connecting, s.created),
        (0, 1, 0),
        "a slot: {s:#?}"
    );
    // Reserved: a `get` must wait for it.
    let mut get = task::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(|c| c.id()) }
    });
    assert_pending!(get.poll());
    let reply = svc.call(req(1)).await.unwrap();
    assert_eq!(reply.conn, 1);
    assert!(get.is_woken());
    assert_eq!(
        assert_ready!(get.poll()).unwrap(),
        1,
        "the new client, returned"
    );

    // Dropped with a slot reserved: the slot is freed.
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    assert_eq!(pool.stats().active, 1, "the idle client, reserved");
    let mut other = PoolService::new(pool.clone()).pending_when_saturated();
    assert_pending!(task::spawn(poll_fn(|cx| other.poll_ready(cx))).poll());
    drop(svc);
    assert_ready_ok!(task::spawn(poll_fn(|cx| other.poll_ready(cx))).poll());
    drop(other);
    let s = pool.stats();
    assert_eq!(where_(&s), (1, 0, 1, 0), "{s:#?}");
    pool.resize(2);
    let mut svc = PoolService::new(pool.clone());
    let mut other = PoolService::new(pool.clone());
    svc.ready().await.unwrap(); // the idle client
    other.ready().await.unwrap(); // a slot
    assert_eq!(pool.stats().connecting, 1);
    drop(other);
    let s = pool.stats();
    assert_eq!(
        (s.total, s.connecting, s.active),
        (1, 0, 1),
        "freed: {s:#?}"
    );
    balanced(&s);
}

#[tokio::test(start_paused = true)]
async fn by_default_a_saturated_pool_is_ready_and_the_call_waits_in_the_queue() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let held = pool.get().await.unwrap();
    let mut svc = PoolService::new(pool.clone());
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    assert_eq!(pool.stats().waiting, 0, "not queued by poll_ready");
    let mut call = task::spawn(svc.call(req(1)));
    assert_pending!(call.poll());
    assert_eq!(pool.stats().waiting, 1, "the call waits, FIFO");
    drop(held);
    assert!(call.is_woken());
    let reply = assert_ready!(call.poll()).unwrap();
    assert_eq!((reply.conn, reply.body), (1, 1));
    let s = pool.stats();
    assert_eq!(where_(&s), (1, 0, 1, 0), "{s:#?}");
    balanced(&s);

    // Saturated past the acquire timeout: the call fails, not sent.
    let held = pool.get().await.unwrap();
    svc.ready().await.unwrap();
    let err = svc.call(req(2)).await.unwrap_err();
    assert!(is_not_sent(&*err), "{err:?}");
    assert!(
        find::<PoolError>(&*err).is_some_and(PoolError::is_timeout),
        "{err:?}"
    );
    assert_eq!(take_unsent_request::<Req>(&*err), Some(req(2)));
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn a_failed_connect_fails_the_call_not_sent_with_its_request_not_poll_ready() {
    let connector = Connector::default();
    connector.refuse.store(true, SeqCst);
    let pool = pool(&connector, "a", 1);
    let mut svc = PoolService::new(pool.clone());

    assert_ready_ok!(
        task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll(),
        "a pool with room is ready: the call connects"
    );
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    assert_eq!(pool.stats().failed, 0, "no connect yet");

    let err: BoxError = svc.call(req(3)).await.unwrap_err();
    assert!(is_not_sent(&*err), "{err:?}");
    let pe = find::<PoolError>(&*err).unwrap_or_else(|| panic!("a PoolError: {err:?}"));
    assert!(pe.is_connect(), "{pe:?}");
    assert_eq!(
        take_unsent_request::<Req>(&*err),
        Some(req(3)),
        "given back"
    );
    assert_eq!(svc.in_flight(), 0);
    let s = pool.stats();
    assert_eq!((s.total, s.connecting, s.failed), (0, 0, 1), "{s:#?}");

    // The next call connects afresh.
    connector.refuse.store(false, SeqCst);
    let reply = svc.ready().await.unwrap().call(req(4)).await.unwrap();
    assert_eq!(reply.body, 4);
    assert_eq!(pool.stats().idle, 1);
}

#[tokio::test(start_paused = true)]
async fn an_acquire_timeout_in_poll_ready_fails_the_call_not_poll_ready() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let held = pool.get().await.unwrap();
    let mut svc = PoolService::new(pool.clone()).pending_when_saturated();
    let mut ready = task::spawn(poll_fn(|cx| svc.poll_ready(cx)));
    assert_pending!(ready.poll());
    // Paused time: the deadline timer fires once everything else is idle.
    tokio::time::sleep(ACQUIRE_TIMEOUT + Duration::from_millis(1)).await;
    assert!(ready.is_woken());
    assert_ready_ok!(
        ready.poll(),
        "a timed-out checkout is not a poll_ready error"
    );
    drop(ready);
    assert_eq!(pool.stats().waiting, 0);

    let err = svc.call(req(9)).await.unwrap_err();
    assert!(is_not_sent(&*err), "{err:?}");
    let pe = find::<PoolError>(&*err).unwrap_or_else(|| panic!("a PoolError: {err:?}"));
    assert!(pe.is_timeout(), "{pe:?}");
    assert_eq!(take_unsent_request::<Req>(&*err), Some(req(9)));
    assert_eq!(pool.stats().timed_out, 1);

    drop(held);
    let reply = svc.ready().await.unwrap().call(req(10)).await.unwrap();
    assert_eq!((reply.conn, reply.body), (1, 10));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_ready_service_returns_its_client_and_clones_reserve_their_own() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 2);
    warm(&pool, 2).await;
    let mut svc = PoolService::new(pool.clone());
    svc.ready().await.unwrap();
    assert_eq!(
        where_(&pool.stats()),
        (2, 1, 1, 0),
        "an idle client reserved"
    );

    // A clone does not share the reservation.
    let mut clone = svc.clone();
    assert_eq!(where_(&pool.stats()), (2, 1, 1, 0));
    clone.ready().await.unwrap();
    assert_eq!(where_(&pool.stats()), (2, 2, 0, 0), "its own client");
    drop(clone);
    assert_eq!(where_(&pool.stats()), (2, 1, 1, 0), "given back");

    // Made ready, never called, dropped: its client is back and reusable.
    drop(svc);
    let s = pool.stats();
    assert_eq!(where_(&s), (2, 0, 2, 0), "{s:#?}");
    assert_eq!(s.destroyed, 0);
    balanced(&s);
    let conn = pool.get().await.unwrap();
    assert!(!conn.is_broken());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_service_that_waits_withdraws_it_from_the_queue() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let held = pool.get().await.unwrap();
    let mut svc = PoolService::new(pool.clone()).pending_when_saturated();
    assert_pending!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    assert_eq!(pool.stats().waiting, 1);
    drop(svc);
    assert_eq!(pool.stats().waiting, 0, "withdrawn");
    drop(held);
    let s = pool.stats();
    assert_eq!(
        where_(&s),
        (1, 0, 1, 0),
        "the freed connection went idle: {s:#?}"
    );
    balanced(&s);
}

#[tokio::test(start_paused = true)]
async fn close_takes_back_reservations_and_they_fail_their_call() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 2);
    warm(&pool, 1).await;
    let mut client = PoolService::new(pool.clone());
    client.ready().await.unwrap(); // the idle client
    let mut slot = PoolService::new(pool.clone());
    slot.ready().await.unwrap(); // the free slot
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.connecting), (1, 1, 1), "{s:#?}");

    tokio::time::timeout(Duration::from_secs(1), pool.close())
        .await
        .expect("close() does not wait for what services hold for later");
    // Taken back by close(), not by the services' next poll: the client is closed.
    let s = pool.stats();
    assert_eq!(
        (s.total, s.active, s.connecting, s.destroyed),
        (0, 0, 0, 1),
        "{s:#?}"
    );
    balanced(&s);
    for svc in [&mut client, &mut slot] {
        assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
        let err = svc.call(req(1)).await.unwrap_err();
        assert!(is_not_sent(&*err), "{err:?}");
        let pe = find::<PoolError>(&*err).unwrap_or_else(|| panic!("a PoolError: {err:?}"));
        assert!(pe.is_closed(), "{pe:?}");
        assert_eq!(take_unsent_request::<Req>(&*err), Some(req(1)));
    }
    let s = pool.stats();
    assert_eq!((s.total, s.connecting, s.destroyed), (0, 0, 1), "{s:#?}");
    balanced(&s);
}

/// Polls `svc` ready once and expects its next call to fail with `Closed`, not sent,
/// its request given back.
async fn fails_closed(svc: &mut PoolService<Connector, &'static str>) {
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    let err = svc.call(req(1)).await.unwrap_err();
    assert!(is_not_sent(&*err), "{err:?}");
    let pe = find::<PoolError>(&*err).unwrap_or_else(|| panic!("a PoolError: {err:?}"));
    assert!(pe.is_closed(), "{pe:?}");
    assert_eq!(take_unsent_request::<Req>(&*err), Some(req(1)));
}

#[tokio::test(start_paused = true)]
async fn a_service_made_ready_and_never_called_does_not_keep_its_connection_past_close() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 2);
    warm(&pool, 1).await;
    let mut svc = PoolService::new(pool.clone());
    svc.ready().await.unwrap(); // reserved, and never called (as a balancer does)
    let s = pool.stats();
    assert_eq!((s.total, s.active), (1, 1), "{s:#?}");

    tokio::time::timeout(Duration::from_secs(60), pool.close())
        .await
        .expect("close() ends");
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.destroyed), (0, 0, 1), "{s:#?}");
    assert_eq!(s.acquired, s.released, "{s:#?}");
    fails_closed(&mut svc).await;
    assert_eq!(pool.stats().total, 0);
}

#[tokio::test(start_paused = true)]
async fn close_takes_back_what_each_clone_reserved() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 4);
    warm(&pool, 2).await;
    let mut a = PoolService::new(pool.clone());
    let mut b = a.clone();
    let mut c = b.clone();
    a.ready().await.unwrap(); // an idle client
    b.ready().await.unwrap(); // the other idle client
    c.ready().await.unwrap(); // a free slot
    let mut d = c.clone(); // nothing reserved
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.connecting), (2, 2, 1), "{s:#?}");

    tokio::time::timeout(Duration::from_secs(60), pool.close())
        .await
        .expect("close() ends");
    let s = pool.stats();
    assert_eq!(
        (s.total, s.active, s.connecting, s.destroyed),
        (0, 0, 0, 2),
        "{s:#?}"
    );
    balanced(&s);
    for svc in [&mut a, &mut b, &mut c] {
        fails_closed(svc).await;
    }
    // The clone that held nothing: its checkout fails.
    fails_closed(&mut d).await;
    assert_eq!(pool.stats().total, 0);
}

#[tokio::test(start_paused = true)]
async fn close_waits_for_connections_in_use_only_and_a_service_dropped_meanwhile_is_fine() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 3);
    warm(&pool, 2).await;
    let held = pool.get().await.unwrap(); // really in use
    let mut svc = PoolService::new(pool.clone());
    svc.ready().await.unwrap(); // the other idle client, reserved
    let clone = svc.clone();
    let mut waiting = clone.clone().pending_when_saturated();
    let mut slot = clone.clone();
    slot.ready().await.unwrap(); // the third slot
    // Saturated now: this one queues in `poll_ready`.
    let mut ready = task::spawn(poll_fn(|cx| waiting.poll_ready(cx)));
    assert_pending!(ready.poll());
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.waiting), (2, 2, 1), "{s:#?}");

    let mut close = task::spawn(pool.close());
    assert_pending!(close.poll(), "waits for the connection in use");
    assert!(ready.is_woken(), "the queued poll_ready is woken");
    assert_ready_ok!(ready.poll());
    drop(ready);
    let s = pool.stats();
    assert_eq!(
        (s.total, s.active, s.connecting, s.waiting, s.destroyed),
        (1, 1, 0, 0, 1),
        "only the connection in use is left: {s:#?}"
    );
    // Services dropped while close() waits: nothing left to give back twice.
    drop(svc);
    drop(clone);
    drop(slot);
    assert_pending!(close.poll());
    drop(held);
    assert!(close.is_woken());
    assert_ready!(close.poll());
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.destroyed), (0, 0, 2), "{s:#?}");
    balanced(&s);
    fails_closed(&mut waiting).await;
}

#[tokio::test(start_paused = true)]
async fn close_takes_back_what_a_balancer_holds_ready() {
    let connector = Connector::default();
    let (a, b) = (pool(&connector, "a", 2), pool(&connector, "b", 2));
    warm(&a, 1).await;
    warm(&b, 1).await;
    let mut lb = Balance::new(
        ServiceList::new(vec![
            PoolService::new(a.clone()),
            PoolService::new(b.clone()),
        ]),
        RoundRobin::new(),
    );
    for i in 0..4 {
        lb.ready().await.unwrap().call(req(i)).await.unwrap();
    }
    // Ready again, and kept so: the balancer holds its endpoints' reservations.
    lb.ready().await.unwrap();
    let held: usize = [&a, &b].iter().map(|p| p.stats().active).sum();
    assert!(held >= 1, "{:#?} {:#?}", a.stats(), b.stats());

    for p in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(60), p.close())
            .await
            .expect("close() ends while the balancer lives");
        let s = p.stats();
        assert_eq!((s.total, s.active, s.connecting), (0, 0, 0), "{s:#?}");
        balanced(&s);
    }
    drop(lb);
}

/// Uses `svc` until a call fails (the pool closed), cloning it now and then (the old
/// one dropped), then makes it ready once more and returns it.
async fn use_until_closed(
    mut svc: PoolService<Connector, &'static str>,
) -> PoolService<Connector, &'static str> {
    for i in 0.. {
        poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        if svc.call(req(i)).await.is_err() {
            break;
        }
        if i % 3 == 0 {
            svc = svc.clone();
        }
        tokio::task::yield_now().await;
    }
    poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    svc
}

#[test]
fn close_takes_back_reservations_of_services_used_on_other_threads() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for round in 0..20u64 {
        let connector = Connector::default();
        let pool = rt.block_on(async { pool(&connector, "a", 4) });
        let svc = PoolService::new(pool.clone());
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let svc = if t % 2 == 0 {
                    svc.clone()
                } else {
                    svc.clone().pending_when_saturated()
                };
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(use_until_closed(svc))
                })
            })
            .collect();
        rt.block_on(async {
            tokio::time::sleep(Duration::from_micros(200 * (round % 4))).await;
            tokio::time::timeout(Duration::from_secs(10), pool.close())
                .await
                .unwrap_or_else(|_| panic!("round {round}: close() ends: {:#?}", pool.stats()));
        });
        let s = pool.stats();
        assert_eq!((s.total, s.connecting), (0, 0), "round {round}: {s:#?}");
        let kept: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let s = pool.stats();
        assert_eq!((s.total, s.active), (0, 0), "round {round}: {s:#?}");
        balanced(&s);
        drop(kept);
        drop(svc);
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_closes_its_client_and_a_completed_one_returns_it() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let mut svc = PoolService::new(pool.clone());

    svc.ready().await.unwrap();
    let slow = Req {
        body: 1,
        delay: Duration::from_secs(60),
    };
    let mut call = task::spawn(svc.call(slow));
    assert_pending!(call.poll());
    assert_eq!((svc.in_flight(), pool.stats().active), (1, 1));
    drop(call);
    let s = pool.stats();
    assert_eq!((s.total, s.destroyed), (0, 1), "closed, not reused: {s:#?}");
    assert_eq!(svc.in_flight(), 0);

    // A timeout around the call does the same.
    svc.ready().await.unwrap();
    let slow = Req {
        body: 2,
        delay: Duration::from_secs(60),
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(1), svc.call(slow))
            .await
            .is_err()
    );
    assert_eq!((pool.stats().total, pool.stats().destroyed), (0, 2));

    // A completed call returns its client.
    let reply = svc.ready().await.unwrap().call(req(3)).await.unwrap();
    assert_eq!((reply.conn, reply.body), (3, 3));
    let s = pool.stats();
    assert_eq!(where_(&s), (1, 0, 1, 0), "{s:#?}");
    balanced(&s);
}

#[tokio::test(start_paused = true)]
async fn a_reserved_client_that_died_is_replaced_at_the_call_in_its_slot() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    warm(&pool, 1).await;
    let mut svc = PoolService::new(pool.clone());
    svc.ready().await.unwrap();
    // Queued behind the reservation.
    let mut waiter = task::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(|c| c.id()) }
    });
    assert_pending!(waiter.poll());
    connector.kill(1); // its peer closed, say, while it was reserved
    let reply = svc.call(req(5)).await.unwrap();
    assert_eq!(reply.conn, 2, "sent through a new client, not the dead one");
    assert_eq!(connector.made(), 2);
    let s = pool.stats();
    assert_eq!((s.created, s.destroyed), (2, 1), "{s:#?}");
    // The new client was opened in the reservation's slot, ahead of the waiter, which
    // gets it once the call is done.
    assert!(waiter.is_woken());
    assert_eq!(assert_ready!(waiter.poll()).unwrap(), 2);
    balanced(&pool.stats());
}

#[tokio::test(start_paused = true)]
async fn a_reserved_client_that_died_with_its_backend_fails_the_call_not_sent() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    warm(&pool, 1).await;
    let mut svc = PoolService::new(pool.clone());
    svc.ready().await.unwrap();
    connector.kill(1);
    connector.refuse.store(true, SeqCst); // the backend is down
    let err = svc.call(req(8)).await.unwrap_err();
    assert!(is_not_sent(&*err), "{err:?}");
    let pe = find::<PoolError>(&*err).unwrap_or_else(|| panic!("a PoolError: {err:?}"));
    assert!(pe.is_connect(), "{pe:?}");
    assert_eq!(take_unsent_request::<Req>(&*err), Some(req(8)));
    let s = pool.stats();
    assert_eq!((s.total, s.destroyed, s.failed), (0, 1, 1), "{s:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_check_that_panics_at_the_call_closes_the_reserved_client() {
    let connector = Connector::default();
    let armed = Arc::new(AtomicBool::new(false));
    let pool = Pool::builder()
        .max_size(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .health_check_interval(None)
        .no_expiry()
        .check({
            let armed = armed.clone();
            move |_: &mut Client| {
                if armed.swap(false, SeqCst) {
                    panic!("check panics");
                }
                true
            }
        })
        .build(connector.clone(), "a")
        .unwrap();
    drop(pool.get().await.unwrap()); // an idle client to reserve
    let mut svc = PoolService::new(pool.clone());
    svc.ready().await.unwrap();
    armed.store(true, SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(svc.call(req(1)))));
    assert!(r.is_err(), "the panic reaches the caller");
    let s = pool.stats();
    assert_eq!(
        (s.total, s.active, s.destroyed),
        (0, 0, 1),
        "closed: {s:#?}"
    );
    assert_eq!(svc.in_flight(), 0);
    let reply = svc.ready().await.unwrap().call(req(2)).await.unwrap();
    assert_eq!(reply.conn, 2, "the service and the pool go on");
    balanced(&pool.stats());
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_poll_ready_fails_is_closed_and_the_call_fails_not_sent() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    warm(&pool, 1).await;
    let mut svc = PoolService::new(pool.clone());
    connector.unready.store(true, SeqCst);
    assert_ready_ok!(task::spawn(poll_fn(|cx| svc.poll_ready(cx))).poll());
    assert_eq!(pool.stats().destroyed, 1, "the client is closed");
    let err = svc.call(req(6)).await.unwrap_err();
    assert!(is_not_sent(&*err), "{err:?}");
    assert_eq!(take_unsent_request::<Req>(&*err), Some(req(6)));
    connector.unready.store(false, SeqCst);
    assert_eq!(
        svc.ready().await.unwrap().call(req(7)).await.unwrap().conn,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_without_poll_ready_still_checks_out_in_the_call() {
    let connector = Connector::default();
    let pool = pool(&connector, "a", 1);
    let mut svc = PoolService::new(pool.clone());
    let held = pool.get().await.unwrap();
    let mut call = task::spawn(svc.call(req(1)));
    assert_pending!(call.poll());
    assert_eq!(pool.stats().waiting, 1);
    drop(held);
    assert!(call.is_woken());
    assert_eq!(svc.in_flight(), 1);
    let reply = assert_ready!(call.poll()).unwrap();
    assert_eq!(reply.body, 1);
    assert_eq!(svc.in_flight(), 0, "not in flight once complete");
    assert_eq!(where_(&pool.stats()), (1, 0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_balancer_routes_around_a_saturated_pool() {
    let connector = Connector::default();
    let (a, b) = (pool(&connector, "a", 1), pool(&connector, "b", 1));
    let held = a.get().await.unwrap(); // `a` is saturated
    let mut lb = Balance::new(
        ServiceList::new(vec![
            PoolService::new(a.clone()).pending_when_saturated(),
            PoolService::new(b.clone()).pending_when_saturated(),
        ]),
        RoundRobin::new(),
    );
    // Round robin would send every other request to `a`, where it would wait for the
    // acquire timeout (paused time gets there at once) and fail.
    for i in 0..6 {
        let reply = lb.ready().await.unwrap().call(req(i)).await.unwrap();
        assert_eq!(reply.target, "b", "request {i} went to the saturated pool");
    }
    assert_eq!(a.stats().timed_out, 0);
    assert_eq!(a.stats().waiting, 1, "`a`'s service waits for a connection");

    // Freed: `a` takes requests again.
    drop(held);
    let mut targets = Vec::new();
    for i in 0..6 {
        targets.push(lb.ready().await.unwrap().call(req(i)).await.unwrap().target);
    }
    assert!(targets.contains(&"a"), "{targets:?}");
    assert!(targets.contains(&"b"), "{targets:?}");
    drop(lb);
    for p in [&a, &b] {
        let s = p.stats();
        assert_eq!(where_(&s), (1, 0, 1, 0), "{s:#?}");
        balanced(&s);
    }
}

#[test]
fn a_service_is_send_and_sync_over_clients_that_are_only_send() {
    /// A client that is `Send` but not `Sync`.
    struct OnlySend(std::cell::Cell<u32>);

    impl Service<u32> for OnlySend {
        type Response = u32;
        type Error = io::Error;
        type Future = std::future::Ready<io::Result<u32>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: u32) -> Self::Future {
            self.0.set(req);
            std::future::ready(Ok(req))
        }
    }

    #[derive(Clone)]
    struct MakeOnlySend;

    impl Service<()> for MakeOnlySend {
        type Response = OnlySend;
        type Error = io::Error;
        type Future = std::future::Ready<io::Result<OnlySend>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: ()) -> Self::Future {
            std::future::ready(Ok(OnlySend(std::cell::Cell::new(0))))
        }
    }

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<PoolService<MakeOnlySend, ()>>();
    send::<<PoolService<MakeOnlySend, ()> as Service<u32>>::Future>();
    send_sync::<PoolService<Connector, &'static str>>();
}
