//! Shared sticky sessions against a real Redis (`MARINA_REDIS_URL`; skipped with a
//! message when none answers, outside CI).
//!
//! - A session pinned through instance A is routed to the same backend through
//!   instance B (whose round robin would send it elsewhere), and through A again after
//!   A restarts.
//! - An idle session expires: its key is gone from Redis and its next request starts a
//!   new session.
//! - Two instances pinning one new session at once agree on the first pin.

mod support;

use std::time::Duration;

use marina_affinity::{Lookup, NewSession, SessionStore};
use marina_balance::{Balance, RoundRobin};
use marina_core::{BoxError, EndpointId, Request, Response};
use marina_redis::{FleetConfig, RedisFleet, RedisSessionStore, SessionConfig, SharedSessionLayer};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A request: the session it belongs to.
type Req = Request<Option<&'static str>>;

fn session(req: &Req) -> Option<String> {
    req.body.map(str::to_owned)
}

/// One instance: its own fleet connection and store, a sticky layer over a round-robin
/// balancer of the same 3 backends (each answers with its number).
struct Instance {
    svc: BoxCloneService<Req, Response<usize>, BoxError>,
    store: RedisSessionStore,
    layer: SharedSessionLayer<fn(&Req) -> Option<String>>,
}

impl Instance {
    fn new(url: &str, prefix: &str, config: SessionConfig) -> Instance {
        let fleet = RedisFleet::with_config(
            FleetConfig::new(url)
                .key_prefix(prefix)
                .call_timeout(Duration::from_millis(250)),
        )
        .unwrap();
        let store = RedisSessionStore::new(&fleet, "web", config);
        let backends = (0..3usize).map(|n| {
            service_fn(move |_req: Req| async move { Ok::<_, std::io::Error>(Response::new(n)) })
        });
        let balance = Balance::from_services(backends, RoundRobin::new())
            .route_hints_from_extensions()
            .shared();
        let layer = SharedSessionLayer::new(session as fn(&Req) -> Option<String>, store.clone())
            .new_sessions(true);
        Instance {
            svc: BoxCloneService::new(layer.layer(balance)),
            store,
            layer,
        }
    }

    async fn call(&mut self, s: Option<&'static str>) -> Response<usize> {
        self.svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(s))
            .await
            .unwrap()
    }

    /// Waits until the store's background pin of `key` reached Redis.
    async fn pinned(&self, key: &str) -> Option<EndpointId> {
        for _ in 0..200 {
            if let Some(ep) = self.store.fetch(key).await.unwrap() {
                return Some(ep);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_follows_across_instances_and_survives_a_restart() {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("sessions");
    let config = SessionConfig::default().cache_ttl(Duration::from_millis(200));
    let mut a = Instance::new(&url, &prefix, config);
    let mut b = Instance::new(&url, &prefix, config);

    let backend = a.call(Some("alice")).await.body;
    assert!(a.pinned("alice").await.is_some(), "pinned in Redis");
    // Through B: the same backend every time, though B's round robin turns.
    for _ in 0..6 {
        assert_eq!(b.call(Some("alice")).await.body, backend);
    }
    assert_eq!(b.layer.stats().created, 0, "B found alice's session");
    let s = b.store.stats();
    assert!(s.fetches >= 1 && s.cache_hits >= 1, "{s:?}");

    // A session B starts is A's too.
    let bob = b.call(Some("bob")).await.body;
    assert!(b.pinned("bob").await.is_some());
    for _ in 0..3 {
        assert_eq!(a.call(Some("bob")).await.body, bob);
    }

    // A restarts: a new process, nothing in memory.
    drop(a);
    let mut a = Instance::new(&url, &prefix, config);
    for _ in 0..3 {
        assert_eq!(a.call(Some("alice")).await.body, backend);
        assert_eq!(a.call(Some("bob")).await.body, bob);
    }
    assert_eq!(a.layer.stats().created, 0);

    // A request without a session gets a new one, and any instance routes it.
    let resp = a.call(None).await;
    let id = resp
        .extensions
        .get::<NewSession>()
        .expect("a new session")
        .0
        .clone();
    let id: &'static str = Box::leak(id.into_boxed_str());
    assert!(a.pinned(id).await.is_some());
    for _ in 0..3 {
        assert_eq!(b.call(Some(id)).await.body, resp.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_expires() {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("expiry");
    let config = SessionConfig::default()
        .idle_timeout(Duration::from_millis(400))
        .cache_ttl(Duration::from_millis(100));
    let mut a = Instance::new(&url, &prefix, config);
    let mut b = Instance::new(&url, &prefix, config);
    let first = a.call(Some("carol")).await.body;
    assert!(a.pinned("carol").await.is_some());

    // Used through B for longer than the idle timeout: kept alive.
    for _ in 0..8 {
        assert_eq!(b.call(Some("carol")).await.body, first);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.store.fetch("carol").await.unwrap().is_some());

    // Idle for longer than the timeout: gone from Redis, and from the caches.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut admin = support::admin(&url).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:session:web:carol"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(exists, 0, "expired in Redis");
    assert!(
        matches!(b.store.lookup("carol"), Lookup::Fetch(_)),
        "B's copy is stale"
    );
    let created = b.layer.stats().created;
    b.call(Some("carol")).await;
    assert_eq!(b.layer.stats().created, created + 1, "a new session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_to_pin_a_new_session_agree() {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("race");
    let config = SessionConfig::default().cache_ttl(Duration::from_millis(100));
    let a = Instance::new(&url, &prefix, config);
    let b = Instance::new(&url, &prefix, config);
    a.store.pin("dave", EndpointId(1), None);
    // B pins the same new session elsewhere, after A's pin reached Redis.
    assert_eq!(a.pinned("dave").await, Some(EndpointId(1)));
    b.store.pin("dave", EndpointId(2), None);
    assert!(
        support::eventually(Duration::from_secs(2), || b.store.stats().adopted == 1).await,
        "{:?}",
        b.store.stats()
    );
    assert!(matches!(
        b.store.lookup("dave"),
        Lookup::Pinned(EndpointId(1))
    ));
    assert_eq!(b.store.fetch("dave").await.unwrap(), Some(EndpointId(1)));

    // A re-pin from where the session is moves it; a stale one does not.
    a.store.pin("dave", EndpointId(3), Some(EndpointId(1)));
    assert!(support::eventually(Duration::from_secs(2), || a.store.stats().pins == 2).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(b.store.fetch("dave").await.unwrap(), Some(EndpointId(3)));
    b.store.pin("dave", EndpointId(2), Some(EndpointId(1)));
    assert!(
        support::eventually(Duration::from_secs(2), || b.store.stats().adopted == 2).await,
        "{:?}",
        b.store.stats()
    );
    assert_eq!(a.store.fetch("dave").await.unwrap(), Some(EndpointId(3)));

    // Ended: gone everywhere.
    a.store.end_session("dave");
    assert!(
        support::eventually(Duration::from_secs(2), || {
            matches!(a.store.lookup("dave"), Lookup::Fetch(_))
        })
        .await
    );
    let mut gone = false;
    for _ in 0..100 {
        if b.store.fetch("dave").await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(gone, "ended in Redis");
}
