//! `ConcurrencyPerKeyLayer`: at most N requests in flight per key. A request over its
//! key's limit fails with `ConnectionLimit` (or waits, bounded, for a slot); a slot is
//! released when the response completes or its future is dropped; the key table holds
//! only keys in use (a cancelled wait leaves nothing behind) and caps them; requests
//! without a key are handled as `without_key` says (tests/without_key.rs has the
//! choices); the handle reports top keys and in-flight counts.
//!
//! Requests are held in flight by the backend, which answers each when the test sends
//! on the request's `oneshot` channel. Waits run on paused time.

use std::time::Duration;

use marina_core::{BoxError, ClientIp, PeerAddr};
use marina_limit::{ConcurrencyPerKeyLayer, ConnectionLimit, TooManyActiveKeys, WithoutKey};
use proptest::prelude::*;
use tokio::sync::oneshot;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_err, assert_ready_ok};
use tower::{Layer, Service, ServiceExt, service_fn};

/// A request: its user (if any), and the channel its answer comes on.
type Req = (Option<&'static str>, oneshot::Receiver<u32>);

fn user(req: &Req) -> Option<String> {
    req.0.map(str::to_string)
}

type UserFn = fn(&Req) -> Option<String>;

/// A backend that answers each request with what is sent on its channel.
fn backend() -> impl Service<Req, Response = u32, Error = BoxError, Future: Send> + Clone {
    service_fn(|(_, answer): Req| async move { answer.await.map_err(BoxError::from) })
}

/// A request of `who`, and the sender that completes it.
fn req(who: Option<&'static str>) -> (Req, oneshot::Sender<u32>) {
    let (tx, rx) = oneshot::channel();
    ((who, rx), tx)
}

fn layer(limit: usize) -> ConcurrencyPerKeyLayer<UserFn> {
    ConcurrencyPerKeyLayer::new(user as UserFn, limit)
}

fn connection_limit(e: &BoxError) -> ConnectionLimit {
    e.downcast_ref::<ConnectionLimit>()
        .unwrap_or_else(|| panic!("not ConnectionLimit: {e}"))
        .clone()
}

/// Calls `svc` (ready at once) with a request of `who`: the spawned response future,
/// and the sender that completes it.
macro_rules! start {
    ($svc:expr, $who:expr) => {{
        let (r, tx) = req($who);
        let fut = $svc.ready().await.unwrap().call(r);
        (tokio_test::task::spawn(fut), tx)
    }};
}

#[tokio::test]
async fn the_sixth_request_of_a_user_is_refused() {
    let layer = layer(5);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut alice: Vec<_> = Vec::new();
    for _ in 0..5 {
        let (mut f, tx) = start!(svc, Some("alice"));
        assert_pending!(f.poll());
        alice.push((f, tx));
    }
    assert_eq!(handle.in_flight("alice"), 5);

    let (mut sixth, _tx) = start!(svc, Some("alice"));
    let e = assert_ready_err!(sixth.poll());
    assert_eq!(
        connection_limit(&e),
        ConnectionLimit {
            key: Some("alice".into()),
            limit: 5
        }
    );
    assert_eq!(
        e.to_string(),
        "\"alice\" has its maximum of 5 requests in flight"
    );

    // Another user is admitted.
    let (mut bob, bob_tx) = start!(svc, Some("bob"));
    assert_pending!(bob.poll());
    assert_eq!(handle.in_flight("bob"), 1);

    // One of alice's completes: a slot is free again.
    let (mut f, tx) = alice.pop().unwrap();
    tx.send(7).unwrap();
    assert_eq!(assert_ready_ok!(f.poll()), 7);
    assert_eq!(handle.in_flight("alice"), 4);
    let (mut again, again_tx) = start!(svc, Some("alice"));
    assert_pending!(again.poll());
    assert_eq!(handle.in_flight("alice"), 5);

    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (5 + 1 + 1, 1));
    assert_eq!((stats.active_keys, stats.in_flight, stats.limit), (2, 6, 5));

    bob_tx.send(1).unwrap();
    again_tx.send(2).unwrap();
    assert_eq!(assert_ready_ok!(bob.poll()), 1);
    assert_eq!(assert_ready_ok!(again.poll()), 2);
    for (i, (mut f, tx)) in alice.into_iter().enumerate() {
        tx.send(i as u32).unwrap();
        assert_eq!(assert_ready_ok!(f.poll()), i as u32);
    }
    let stats = handle.stats();
    assert_eq!((stats.active_keys, stats.in_flight), (0, 0));
    assert_eq!(handle.in_flight("alice"), 0);
}

#[tokio::test]
async fn a_failed_response_frees_its_slot() {
    let layer = layer(1);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let (mut f, tx) = start!(svc, Some("alice"));
    assert_pending!(f.poll());
    drop(tx); // the backend fails the request
    assert!(assert_ready!(f.poll()).is_err());
    assert_eq!(handle.in_flight("alice"), 0);
    let (mut f, tx) = start!(svc, Some("alice"));
    tx.send(3).unwrap();
    assert_eq!(assert_ready_ok!(f.poll()), 3);
}

#[tokio::test]
async fn dropping_a_response_future_releases_its_slot() {
    let layer = layer(5).max_keys(1);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut held: Vec<_> = Vec::new();
    for i in 0..5 {
        let (mut f, tx) = start!(svc, Some("alice"));
        if i % 2 == 0 {
            // Started on the backend, or never polled: both release on drop.
            assert_pending!(f.poll());
        }
        held.push((f, tx));
    }
    let (mut f, _tx) = start!(svc, Some("alice"));
    assert!(assert_ready!(f.poll()).is_err());
    held.truncate(3);
    assert_eq!(handle.in_flight("alice"), 3);
    for _ in 0..2 {
        let (mut f, tx) = start!(svc, Some("alice"));
        assert_pending!(f.poll());
        held.push((f, tx));
    }
    assert_eq!(handle.in_flight("alice"), 5);
    drop(held);
    let stats = handle.stats();
    assert_eq!((stats.active_keys, stats.in_flight), (0, 0));
    // The key is gone from the table: with room for one key, another user gets in.
    let (mut bob, tx) = start!(svc, Some("bob"));
    tx.send(9).unwrap();
    assert_eq!(assert_ready_ok!(bob.poll()), 9);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_proceeds_when_a_slot_frees() {
    let layer = layer(5).wait(Duration::from_secs(1));
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut alice: Vec<_> = Vec::new();
    for _ in 0..5 {
        let (mut f, tx) = start!(svc, Some("alice"));
        assert_pending!(f.poll());
        alice.push((f, tx));
    }
    let (mut sixth, sixth_tx) = start!(svc, Some("alice"));
    assert_pending!(sixth.poll());
    advance(Duration::from_millis(500)).await;
    assert_pending!(sixth.poll());
    assert_eq!(handle.in_flight("alice"), 5);

    let (mut f, tx) = alice.remove(0);
    tx.send(0).unwrap();
    assert_ready_ok!(f.poll());
    assert!(sixth.is_woken(), "a freed slot wakes the waiter");
    // It took the slot and is now on the backend.
    assert_pending!(sixth.poll());
    assert_eq!(handle.in_flight("alice"), 5);
    // Nobody else gets the slot it took.
    let (mut seventh, _tx7) = start!(svc, Some("alice"));
    assert_pending!(seventh.poll());
    drop(seventh);
    sixth_tx.send(6).unwrap();
    assert_eq!(assert_ready_ok!(sixth.poll()), 6);

    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (6, 0));
    drop(alice);
    assert_eq!(handle.stats().active_keys, 0);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_gives_up_after_its_bound() {
    let layer = layer(5).wait(Duration::from_secs(1)).max_keys(1);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut alice: Vec<_> = Vec::new();
    for _ in 0..5 {
        let (mut f, tx) = start!(svc, Some("alice"));
        assert_pending!(f.poll());
        alice.push((f, tx));
    }
    let start = Instant::now();
    let (mut sixth, _tx) = start!(svc, Some("alice"));
    assert_pending!(sixth.poll());
    advance(Duration::from_millis(999)).await;
    assert_pending!(sixth.poll());
    advance(Duration::from_millis(1)).await;
    assert!(sixth.is_woken());
    let e = assert_ready_err!(sixth.poll());
    assert_eq!(connection_limit(&e).limit, 5);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(handle.stats().rejected, 1);

    for (mut f, tx) in alice {
        tx.send(0).unwrap();
        assert_ready_ok!(f.poll());
    }
    assert_eq!(handle.stats().active_keys, 0);
    // No entry left behind: with room for one key, another user gets in.
    let (mut bob, tx) = start!(svc, Some("bob"));
    tx.send(1).unwrap();
    assert_eq!(assert_ready_ok!(bob.poll()), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_leaves_no_entry_behind() {
    let layer = layer(5).wait(Duration::from_secs(1)).max_keys(1);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut alice: Vec<_> = Vec::new();
    for _ in 0..5 {
        let (mut f, tx) = start!(svc, Some("alice"));
        assert_pending!(f.poll());
        alice.push((f, tx));
    }
    // One waiter queued on the semaphore, one never polled: both cancelled.
    let (mut queued, _q) = start!(svc, Some("alice"));
    assert_pending!(queued.poll());
    let (unpolled, _u) = start!(svc, Some("alice"));
    advance(Duration::from_millis(100)).await;
    drop(queued);
    drop(unpolled);
    assert_eq!(handle.in_flight("alice"), 5);

    // The freed slots go to nobody: both waiters are gone.
    for (mut f, tx) in alice {
        tx.send(0).unwrap();
        assert_ready_ok!(f.poll());
    }
    let stats = handle.stats();
    assert_eq!((stats.active_keys, stats.in_flight), (0, 0));
    assert_eq!((stats.admitted, stats.rejected), (5, 0));
    let (mut bob, tx) = start!(svc, Some("bob"));
    tx.send(1).unwrap();
    assert_eq!(assert_ready_ok!(bob.poll()), 1, "alice's entry is gone");

    // A wait cancelled after the slot was handed to it, before it ran.
    let layer = layer_one_wait();
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let (mut first, first_tx) = start!(svc, Some("dave"));
    assert_pending!(first.poll());
    let (mut waiter, _w) = start!(svc, Some("dave"));
    assert_pending!(waiter.poll());
    drop(first);
    drop(first_tx);
    // The slot was handed to the waiter; cancel it before it runs.
    assert!(waiter.is_woken());
    drop(waiter);
    assert_eq!(handle.stats().active_keys, 0);
    assert_eq!(handle.in_flight("dave"), 0);
    let (mut erin, tx) = start!(svc, Some("erin"));
    tx.send(2).unwrap();
    assert_eq!(assert_ready_ok!(erin.poll()), 2, "dave's entry is gone");
}

fn layer_one_wait() -> ConcurrencyPerKeyLayer<UserFn> {
    layer(1).wait(Duration::from_secs(1)).max_keys(1)
}

#[tokio::test]
async fn max_keys_caps_the_distinct_active_keys() {
    let layer = layer(5).max_keys(2).without_key(WithoutKey::Shared);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let (mut a, a_tx) = start!(svc, Some("alice"));
    let (mut b, b_tx) = start!(svc, Some("bob"));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    let (mut c, _c_tx) = start!(svc, Some("carol"));
    let e = assert_ready_err!(c.poll());
    assert_eq!(
        e.downcast_ref::<TooManyActiveKeys>(),
        Some(&TooManyActiveKeys { max_keys: 2 })
    );
    // Known keys still get slots; the slots shared by requests without a key are not
    // one of the keys counted.
    let (mut a2, a2_tx) = start!(svc, Some("alice"));
    assert_pending!(a2.poll());
    let (mut anon, anon_tx) = start!(svc, None);
    assert_pending!(anon.poll());
    b_tx.send(2).unwrap();
    assert_ready_ok!(b.poll());
    let (mut c, c_tx) = start!(svc, Some("carol"));
    assert_pending!(c.poll());
    assert_eq!(handle.stats().active_keys, 2);
    assert_eq!(handle.stats().rejected, 1);
    for (mut f, tx) in [(a, a_tx), (a2, a2_tx), (anon, anon_tx), (c, c_tx)] {
        tx.send(0).unwrap();
        assert_ready_ok!(f.poll());
    }
    assert_eq!(handle.stats().active_keys, 0);
}

#[tokio::test]
async fn requests_without_a_key_let_through_are_not_limited() {
    let layer = layer(1).without_key(WithoutKey::Unlimited);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut anon: Vec<_> = Vec::new();
    for _ in 0..50 {
        let (mut f, tx) = start!(svc, None);
        assert_pending!(f.poll());
        anon.push((f, tx));
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.active_keys, stats.in_flight, stats.rejected),
        (0, 0, 0)
    );
    // Admitted, but not tracked.
    assert_eq!((stats.admitted, stats.keyless_in_flight), (50, 0));
    // A keyed request beside them is limited as usual.
    let (mut k, _k_tx) = start!(svc, Some("alice"));
    assert_pending!(k.poll());
    let (mut k2, _k2_tx) = start!(svc, Some("alice"));
    assert!(assert_ready!(k2.poll()).is_err());
    for (i, (mut f, tx)) in anon.into_iter().enumerate() {
        tx.send(i as u32).unwrap();
        assert_eq!(assert_ready_ok!(f.poll()), i as u32);
    }
}

#[tokio::test]
async fn stats_list_the_top_five_keys_by_requests_in_flight() {
    let layer = layer(10);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let keys = ["k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let mut held: Vec<_> = Vec::new();
    // k1 has 1 in flight ... k7 has 7; k3b ties k3.
    for (n, key) in keys.iter().enumerate() {
        for _ in 0..=n {
            held.push(start!(svc, Some(*key)));
        }
    }
    for _ in 0..3 {
        held.push(start!(svc, Some("k3b")));
    }
    let stats = handle.stats();
    let top: Vec<(&str, usize)> = stats.top.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(top, [("k7", 7), ("k6", 6), ("k5", 5), ("k4", 4), ("k3", 3)]);
    assert_eq!(stats.active_keys, 8);
    assert_eq!(stats.in_flight, 28 + 3);
    assert_eq!(stats.limit, 10);
    assert_eq!(stats.admitted, 31);
    assert_eq!(handle.in_flight("k6"), 6);
    assert_eq!(handle.in_flight("k3b"), 3);
    assert_eq!(handle.in_flight("nobody"), 0);
    // Completing k7's requests drops it from the top; k3b (a tie, later by name) enters.
    // k7's are the 21st to 28th held.
    drop(held.drain(21..28));
    let top: Vec<(String, usize)> = handle.stats().top;
    assert_eq!(
        top,
        [("k6", 6), ("k5", 5), ("k4", 4), ("k3", 3), ("k3b", 3)].map(|(k, n)| (k.to_string(), n))
    );
    assert!(format!("{handle:?}").contains("k6"));
}

#[tokio::test]
async fn client_ip_caps_requests_per_peer_address() {
    let layer = ConcurrencyPerKeyLayer::new(ClientIp::new(), 2);
    let mut svc = layer.layer(service_fn(
        |req: http::Request<oneshot::Receiver<u32>>| async move {
            req.into_body().await.map_err(BoxError::from)
        },
    ));
    let from = |addr: &str| {
        let (tx, rx) = oneshot::channel::<u32>();
        let mut req = http::Request::new(rx);
        req.extensions_mut().insert(PeerAddr(addr.parse().unwrap()));
        (req, tx)
    };
    let mut held = Vec::new();
    for port in [1000, 1001] {
        let (r, tx) = from(&format!("192.0.2.1:{port}"));
        let mut f = tokio_test::task::spawn(svc.ready().await.unwrap().call(r));
        assert_pending!(f.poll());
        held.push((f, tx));
    }
    let (r, _tx) = from("192.0.2.1:1002");
    let mut f = tokio_test::task::spawn(svc.ready().await.unwrap().call(r));
    assert_eq!(
        connection_limit(&assert_ready_err!(f.poll()))
            .key
            .as_deref(),
        Some("192.0.2.1")
    );
    let (r, tx) = from("192.0.2.2:1000");
    let mut f = tokio_test::task::spawn(svc.ready().await.unwrap().call(r));
    tx.send(5).unwrap();
    assert_eq!(assert_ready_ok!(f.poll()), 5);
}

/// A step of the property test: start a request for one of four users, complete or
/// cancel one in flight (by index, modulo how many there are).
#[derive(Debug, Clone)]
enum Op {
    Start(usize),
    Complete(usize),
    Cancel(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..4).prop_map(Op::Start),
        1 => any::<usize>().prop_map(Op::Complete),
        1 => any::<usize>().prop_map(Op::Cancel),
    ]
}

const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];

proptest! {
    /// For any sequence of starts, completions and cancellations: a request is admitted
    /// exactly when its user has fewer than `limit` in flight, the handle's counts match
    /// a model, and once everything is done no key is left.
    #[test]
    fn in_flight_counts_match_a_model(
        limit in 1usize..4,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let layer = layer(limit).max_keys(USERS.len());
        let handle = layer.handle();
        let mut svc = layer.layer(backend());
        let mut model = [0usize; 4];
        let mut held = Vec::new();
        let (mut admitted, mut rejected) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Start(u) => {
                    let (r, tx) = req(Some(USERS[u]));
                    let mut f = tokio_test::task::spawn(svc.call(r));
                    let polled = f.poll();
                    if model[u] < limit {
                        prop_assert!(polled.is_pending(), "{} admitted below its limit", USERS[u]);
                        model[u] += 1;
                        admitted += 1;
                        held.push((u, f, tx));
                    } else {
                        let e = match polled {
                            std::task::Poll::Ready(Err(e)) => e,
                            other => panic!("{}: over the limit, got {other:?}", USERS[u]),
                        };
                        prop_assert_eq!(connection_limit(&e).limit, limit);
                        rejected += 1;
                    }
                }
                Op::Complete(i) if !held.is_empty() => {
                    let (u, mut f, tx) = held.swap_remove(i % held.len());
                    tx.send(1).unwrap();
                    prop_assert!(matches!(f.poll(), std::task::Poll::Ready(Ok(1))));
                    model[u] -= 1;
                }
                Op::Cancel(i) if !held.is_empty() => {
                    let (u, _, _) = held.swap_remove(i % held.len());
                    model[u] -= 1;
                }
                Op::Complete(_) | Op::Cancel(_) => {}
            }
            for (u, name) in USERS.iter().enumerate() {
                prop_assert_eq!(handle.in_flight(name), model[u]);
            }
            let stats = handle.stats();
            prop_assert_eq!(stats.active_keys, model.iter().filter(|n| **n > 0).count());
            prop_assert_eq!(stats.in_flight, model.iter().sum::<usize>());
            prop_assert_eq!((stats.admitted, stats.rejected), (admitted, rejected));
        }
        drop(held);
        prop_assert_eq!(handle.stats().active_keys, 0);
    }
}
