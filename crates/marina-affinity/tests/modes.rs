//! Tests of what happens around the pin: re-pinning when the pinned endpoint is not
//! ready, removed, or fails a request over; `strict` pins; consistent-hash mode across
//! independent instances; new sessions for key-less requests.
//!
//! - **Re-pin**: `tower_test` mock endpoints (readiness set with `Handle::allow`) under
//!   a round-robin `Balance`: when the pinned endpoint turns not ready, the session's
//!   next request goes elsewhere, counts one re-pin and stays there, also once the old
//!   endpoint is back. The same after a discovery removal (`Balance::from_channel`,
//!   `Change::Remove`) and after a failover (the endpoint fails with `NotSent`).
//! - **Strict**: the request fails with `PinnedEndpointUnavailable` naming the pinned
//!   endpoint, nothing is re-pinned, and the session carries on where it was once its
//!   endpoint is back.
//! - **Consistent hash**: two independent `AffinityLayer::hash` + `ConsistentHash`
//!   stacks over the same endpoints (one discovering them in reverse order) route each
//!   of 1,000 keys to the same endpoint.
//! - **New sessions** (`new_sessions(true)`): a key-less request gets a `NewSession` id
//!   (64 lowercase hex characters, unique), which is pinned where that request went.

mod support;

use std::collections::{HashMap, HashSet};
use std::future::{Ready, ready};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use marina_affinity::{AffinityLayer, NewSession, TableConfig, new_session_id};
use marina_balance::{Balance, ConsistentHash, Failover, RoundRobin};
use marina_core::{BoxError, NotSent, PinnedEndpointUnavailable, Request, Response};
use support::{Backend, Req, Resp, balance, ids_by_position, key_of, send, served_by};
use tower::discover::Change;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Handle = mock::Handle<Req, Resp>;
type MockLb = Balance<tower::discover::ServiceList<Vec<mock::Mock<Req, Resp>>>, Req>;

/// `n` mock endpoints (ready until told otherwise) under a round-robin balancer reading
/// hints from extensions.
fn mock_balance(n: usize) -> (MockLb, Vec<Handle>) {
    let (mocks, handles): (Vec<_>, Vec<_>) = (0..n).map(|_| mock::pair()).unzip();
    let lb = Balance::from_services(mocks, RoundRobin::new()).route_hints_from_extensions();
    (lb, handles)
}

/// Sends a request for session `key` and answers it from whichever mock received it
/// (with that mock's index); none does when the stack fails it first.
async fn send_mock<S>(svc: &mut S, handles: &mut [Handle], key: &str) -> Result<usize, BoxError>
where
    S: Service<Req, Response = Resp, Error = BoxError>,
{
    let fut = svc.ready().await?.call(Request::new(Some(key.to_owned())));
    let mut received = 0;
    for (i, h) in handles.iter_mut().enumerate() {
        if let Poll::Ready(Some((_req, tx))) = h.poll_request() {
            tx.send_response(Response::new(i));
            received += 1;
        }
    }
    assert!(received <= 1, "one request reached {received} endpoints");
    fut.await.map(|r| r.body)
}

// ---------------------------------------------------------------------------------------
// Re-pin
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn session_moves_when_its_endpoint_is_not_ready() {
    let (lb, mut handles) = mock_balance(3);
    let ids = lb.handle();
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let first = send_mock(&mut svc, &mut handles, "s").await.unwrap();
    for _ in 0..3 {
        assert_eq!(send_mock(&mut svc, &mut handles, "s").await.unwrap(), first);
    }
    let ids = ids_by_position(&ids);
    assert_eq!(handle.pinned("s"), Some(ids[&first]));

    // The pinned endpoint stops being ready.
    handles[first].allow(0);
    let moved = send_mock(&mut svc, &mut handles, "s").await.unwrap();
    assert_ne!(moved, first);
    let stats = handle.stats();
    assert_eq!((stats.repinned, stats.created, stats.sessions), (1, 1, 1));
    assert_eq!(handle.pinned("s"), Some(ids[&moved]));

    // It stays on the new endpoint, also once the old one is back.
    for _ in 0..3 {
        assert_eq!(send_mock(&mut svc, &mut handles, "s").await.unwrap(), moved);
    }
    handles[first].allow(u64::MAX);
    for _ in 0..5 {
        assert_eq!(send_mock(&mut svc, &mut handles, "s").await.unwrap(), moved);
    }
    assert_eq!(handle.stats().repinned, 1);
    // Other sessions still reach the old endpoint: it is back in rotation.
    let mut reached = HashSet::new();
    for i in 0..6 {
        reached.insert(
            send_mock(&mut svc, &mut handles, &format!("other-{i}"))
                .await
                .unwrap(),
        );
    }
    assert!(reached.contains(&first), "{reached:?}");
}

#[tokio::test]
async fn strict_pins_fail_instead_of_moving() {
    let (lb, mut handles) = mock_balance(3);
    let ids = lb.handle();
    let layer = AffinityLayer::sticky(key_of, TableConfig::default()).strict(true);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let first = send_mock(&mut svc, &mut handles, "s").await.unwrap();
    assert_eq!(send_mock(&mut svc, &mut handles, "s").await.unwrap(), first);
    let ids = ids_by_position(&ids);

    handles[first].allow(0);
    for _ in 0..2 {
        let err = send_mock(&mut svc, &mut handles, "s").await.unwrap_err();
        let unavailable = err
            .downcast_ref::<PinnedEndpointUnavailable>()
            .unwrap_or_else(|| panic!("not PinnedEndpointUnavailable: {err}"));
        assert_eq!(unavailable.endpoint, ids[&first]);
    }
    assert_eq!(handle.stats().repinned, 0);
    assert_eq!(handle.sessions(1)[0].endpoint, ids[&first], "still pinned");
    // New sessions are not affected: they land on the ready endpoints.
    let other = send_mock(&mut svc, &mut handles, "t").await.unwrap();
    assert_ne!(other, first);

    // Back: the session carries on where it was.
    handles[first].allow(u64::MAX);
    for _ in 0..3 {
        assert_eq!(send_mock(&mut svc, &mut handles, "s").await.unwrap(), first);
    }
    let stats = handle.stats();
    assert_eq!((stats.repinned, stats.created), (0, 2));
}

#[tokio::test]
async fn session_moves_when_its_endpoint_is_removed() {
    let (tx, lb) = Balance::from_channel(RoundRobin::new());
    let lb = lb.route_hints_from_extensions();
    let names = ["a", "b", "c"];
    for (i, name) in names.iter().enumerate() {
        tx.send(Change::Insert(*name, Backend(i))).unwrap();
    }
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let first = served_by(&mut svc, "s").await;
    assert_eq!(served_by(&mut svc, "s").await, first);

    tx.send(Change::Remove(names[first])).unwrap();
    let moved = served_by(&mut svc, "s").await;
    assert_ne!(moved, first);
    assert_eq!(handle.stats().repinned, 1);
    for _ in 0..3 {
        assert_eq!(served_by(&mut svc, "s").await, moved);
    }
    // The removed endpoint coming back does not pull the session back.
    tx.send(Change::Insert(names[first], Backend(first)))
        .unwrap();
    for _ in 0..5 {
        assert_eq!(served_by(&mut svc, "s").await, moved);
    }
    assert_eq!(handle.stats().repinned, 1);
    assert_eq!(handle.stats().created, 1);
}

/// An endpoint that refuses requests (as not sent) while `down`.
#[derive(Debug, Clone)]
struct Flaky {
    index: usize,
    down: Arc<AtomicBool>,
}

impl Service<Req> for Flaky {
    type Response = Resp;
    type Error = BoxError;
    type Future = Ready<Result<Resp, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Req) -> Self::Future {
        ready(if self.down.load(Ordering::Relaxed) {
            Err(NotSent::new(io::Error::from(io::ErrorKind::ConnectionRefused)).into())
        } else {
            Ok(Response::new(self.index))
        })
    }
}

#[tokio::test]
async fn session_follows_a_failover() {
    let down: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let endpoints = (0..3).map(|index| Flaky {
        index,
        down: down[index].clone(),
    });
    let lb = Balance::from_services(endpoints, RoundRobin::new())
        .route_hints_from_extensions()
        .failover(Failover::new());
    let lb_handle = lb.handle();
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let first = served_by(&mut svc, "s").await;
    // The endpoint stays ready but refuses: the balancer fails the request over.
    down[first].store(true, Ordering::Relaxed);
    let moved = served_by(&mut svc, "s").await;
    assert_ne!(moved, first);
    assert_eq!(lb_handle.totals().retries, 1);
    let ids = ids_by_position(&lb_handle);
    assert_eq!(
        handle.pinned("s"),
        Some(ids[&moved]),
        "pinned where the request was served"
    );
    assert_eq!(handle.stats().repinned, 1);
    // Later requests go straight there: no more failovers.
    down[first].store(false, Ordering::Relaxed);
    for _ in 0..5 {
        assert_eq!(served_by(&mut svc, "s").await, moved);
    }
    assert_eq!(lb_handle.totals().retries, 1);
    assert_eq!(handle.stats().repinned, 1);
}

#[tokio::test]
async fn a_new_session_is_pinned_where_its_failover_landed() {
    let down: Vec<_> = (0..2).map(|i| Arc::new(AtomicBool::new(i == 0))).collect();
    let endpoints = (0..2).map(|index| Flaky {
        index,
        down: down[index].clone(),
    });
    let lb = Balance::from_services(endpoints, RoundRobin::new())
        .route_hints_from_extensions()
        .failover(Failover::new());
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // Whichever endpoint round robin offers a new session, it is served by 1.
    for i in 0..4 {
        let key = format!("s{i}");
        assert_eq!(served_by(&mut svc, &key).await, 1);
        down[0].store(false, Ordering::Relaxed);
        assert_eq!(served_by(&mut svc, &key).await, 1, "{key} moved");
        down[0].store(true, Ordering::Relaxed);
    }
    assert_eq!(
        handle.stats().repinned,
        0,
        "new sessions are created, not moved"
    );
    assert_eq!(handle.stats().created, 4);
}

// ---------------------------------------------------------------------------------------
// Consistent hash
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hash_mode_routes_alike_across_instances() {
    // Instance A discovers endpoints 0..5 in order...
    let lb_a = Balance::from_services((0..5).map(Backend), ConsistentHash::new())
        .route_hints_from_extensions();
    let layer_a = AffinityLayer::hash(key_of);
    let handle_a = layer_a.handle();
    let mut a = layer_a.layer(lb_a);
    // ...B, with the same keys, in reverse order (another ready-set order)...
    let (tx, lb_b) = Balance::from_channel(ConsistentHash::new());
    for i in (0..5usize).rev() {
        tx.send(Change::Insert(i, Backend(i))).unwrap();
    }
    let mut b = AffinityLayer::hash(key_of).layer(lb_b.route_hints_from_extensions());
    // ...and C is a second copy of A.
    let lb_c = Balance::from_services((0..5).map(Backend), ConsistentHash::new())
        .route_hints_from_extensions();
    let mut c = AffinityLayer::hash(key_of).layer(lb_c);

    let mut per_endpoint = [0usize; 5];
    let mut routes = HashMap::new();
    for i in 0..1000 {
        let key = format!("user-{i}");
        let ea = served_by(&mut a, &key).await;
        assert_eq!(served_by(&mut b, &key).await, ea, "{key}");
        assert_eq!(served_by(&mut c, &key).await, ea, "{key}");
        per_endpoint[ea] += 1;
        routes.insert(key, ea);
    }
    // Spread, not all on one endpoint (200 each on average).
    assert!(
        per_endpoint.iter().all(|&n| n >= 100),
        "keys per endpoint: {per_endpoint:?}"
    );
    // Stable: asked again, in another order, every key goes where it went.
    for (key, ep) in routes.iter().take(200) {
        assert_eq!(served_by(&mut a, key).await, *ep);
        assert_eq!(served_by(&mut b, key).await, *ep);
    }
    // No state kept.
    let stats = handle_a.stats();
    assert_eq!((stats.sessions, stats.created), (0, 0));
    assert!(handle_a.sessions(10).is_empty());
    assert!(!handle_a.end_session("user-1"));
}

// ---------------------------------------------------------------------------------------
// New sessions
// ---------------------------------------------------------------------------------------

fn assert_session_id(id: &str) {
    assert_eq!(id.len(), 64, "{id}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "not lowercase hex: {id}"
    );
}

#[test]
fn new_session_id_is_64_lowercase_hex_and_unique() {
    let ids: HashSet<String> = (0..1000).map(|_| new_session_id()).collect();
    assert_eq!(ids.len(), 1000);
    for id in &ids {
        assert_session_id(id);
    }
    // 256 random bits: every hex digit shows up across 1000 ids, in every position.
    for pos in 0..64 {
        let digits: HashSet<u8> = ids.iter().map(|id| id.as_bytes()[pos]).collect();
        assert_eq!(digits.len(), 16, "position {pos}");
    }
}

#[tokio::test]
async fn keyless_requests_get_a_pinned_new_session() {
    let (lb, lb_handle) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default()).new_sessions(true);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let resp = send(&mut svc, None).await.unwrap();
    let NewSession(id) = resp
        .extensions
        .get::<NewSession>()
        .expect("a new session")
        .clone();
    assert_session_id(&id);
    let ids = ids_by_position(&lb_handle);
    assert_eq!(handle.pinned(&id), Some(ids[&resp.body]));

    // Requests carrying it stick, and get no new session.
    for _ in 0..6 {
        let again = send(&mut svc, Some(&id)).await.unwrap();
        assert_eq!(again.body, resp.body);
        assert!(again.extensions.get::<NewSession>().is_none());
    }
    let stats = handle.stats();
    assert_eq!((stats.created, stats.sessions), (1, 1));

    // 1000 more key-less requests: 1000 distinct sessions, spread like new sessions.
    let mut fresh = HashSet::new();
    let mut per_endpoint = [0; 3];
    for _ in 0..1000 {
        let r = send(&mut svc, None).await.unwrap();
        let id = r.extensions.get::<NewSession>().expect("a new session");
        assert_session_id(&id.0);
        fresh.insert(id.0.clone());
        per_endpoint[r.body] += 1;
    }
    assert_eq!(fresh.len(), 1000);
    assert!(!fresh.contains(&id));
    assert!(per_endpoint.iter().all(|&n| n > 300), "{per_endpoint:?}");
    let stats = handle.stats();
    assert_eq!((stats.created, stats.sessions), (1001, 1001));
}

#[tokio::test]
async fn a_known_key_gets_no_new_session() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default()).new_sessions(true);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // A client-chosen key is a session like any other: no id is minted for it.
    let resp = send(&mut svc, Some("alice")).await.unwrap();
    assert!(resp.extensions.get::<NewSession>().is_none());
    assert_eq!(handle.stats().created, 1);
    assert!(handle.pinned("alice").is_some());
}

#[tokio::test]
async fn hash_mode_new_sessions_route_like_their_id() {
    let lb = Balance::from_services((0..5).map(Backend), ConsistentHash::new())
        .route_hints_from_extensions();
    let layer = AffinityLayer::hash(key_of).new_sessions(true);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let mut ids = HashSet::new();
    for _ in 0..50 {
        let resp = send(&mut svc, None).await.unwrap();
        let id = resp.extensions.get::<NewSession>().expect("a new session");
        assert_session_id(&id.0);
        // The id hashes to the endpoint the first request reached.
        for _ in 0..2 {
            let again = send(&mut svc, Some(&id.0)).await.unwrap();
            assert_eq!(again.body, resp.body);
            assert!(again.extensions.get::<NewSession>().is_none());
        }
        ids.insert(id.0.clone());
    }
    assert_eq!(ids.len(), 50);
    let stats = handle.stats();
    assert_eq!((stats.created, stats.sessions), (50, 0));

    // Without `new_sessions`, a key-less request gets none.
    let lb = Balance::from_services((0..5).map(Backend), ConsistentHash::new())
        .route_hints_from_extensions();
    let mut plain = AffinityLayer::hash(key_of).layer(lb);
    let resp = send(&mut plain, None).await.unwrap();
    assert!(resp.extensions.get::<NewSession>().is_none());
}
