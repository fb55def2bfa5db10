//! Tests of `SessionPool`: session-pinned connections over a `marina_pool::Pool` with an
//! in-memory connector (connections are numbers; a connect can be made to take time).
//!
//! - A session's requests all use one connection (`Pooled::id`), which stays with the
//!   session between requests; two sessions hold two connections; requests of one
//!   session take turns on it.
//! - `end` gives the connection back to the pool (at once, or once the request holding
//!   it is done); idle sessions end by `expire_idle()` and by the background sweep
//!   (paused time), and their connections go back too; sessions in use survive.
//! - `max_sessions` → `SessionError::TooMany`; pool failures → `SessionError::Pool`.
//! - User data; the snapshot listing.
//! - Cancel safety: an `acquire` dropped while waiting for the pool, while connecting,
//!   or while waiting for its session's turn leaves no session behind and no
//!   connection checked out; two racing first requests of one session share one
//!   connection and give the spare back.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_affinity::{SessionError, SessionPool, TooManySessions};
use marina_pool::Pool;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready};
use tower::Service;

/// Makes connections that are numbers, 0, 1, 2…, after `delay` (if any).
#[derive(Clone, Debug)]
struct Numbers {
    next: Arc<AtomicU32>,
    delay: Option<Duration>,
    fail: bool,
}

impl Service<&'static str> for Numbers {
    type Response = u32;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<u32>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: &'static str) -> Self::Future {
        let next = self.next.clone();
        let (delay, fail) = (self.delay, self.fail);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            if fail {
                return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
            }
            Ok(next.fetch_add(1, Ordering::Relaxed))
        })
    }
}

type MemPool = Pool<Numbers, &'static str>;

fn pool_with(max_size: usize, delay: Option<Duration>, fail: bool) -> MemPool {
    let connector = Numbers {
        next: Arc::default(),
        delay,
        fail,
    };
    Pool::builder()
        .max_size(max_size)
        .no_expiry()
        .health_check_interval(None)
        .build(connector, "memory")
        .unwrap()
}

fn pool(max_size: usize) -> MemPool {
    pool_with(max_size, None, false)
}

const IDLE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_session_keeps_one_connection() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    let first = sessions.acquire("alice").await.unwrap();
    let (id, value) = (first.id(), **first);
    drop(first);
    // Between requests the connection stays with the session, out of the pool.
    assert_eq!((pool.stats().active, pool.stats().idle), (1, 0));
    for _ in 0..5 {
        let conn = sessions.acquire("alice").await.unwrap();
        assert_eq!((conn.id(), **conn), (id, value));
    }
    assert_eq!(pool.stats().created, 1);

    // Another session holds another connection.
    let bob = sessions.acquire("bob").await.unwrap();
    assert_ne!(bob.id(), id);
    assert_eq!(pool.stats().active, 2);
    let bob_id = bob.id();
    drop(bob);
    assert_eq!(pool_id_of(&sessions, "bob"), bob_id);
    assert_eq!(pool_id_of(&sessions, "alice"), id);
    assert_eq!(sessions.acquire("bob").await.unwrap().id(), bob_id);
    assert_eq!(sessions.len(), 2);
    assert!(!sessions.is_empty());
}

/// The connection id a session holds, from the listing.
fn pool_id_of(sessions: &SessionPool<Numbers, &'static str>, id: &str) -> u64 {
    sessions
        .sessions(100)
        .into_iter()
        .find(|s| s.id == id)
        .and_then(|s| s.connection)
        .expect("the session holds a connection")
}

#[tokio::test]
async fn requests_of_one_session_take_turns() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    let held = sessions.acquire("alice").await.unwrap();
    let mut second = spawn(sessions.acquire("alice"));
    assert_pending!(second.poll());
    // Other sessions are not held up.
    assert!(sessions.acquire("bob").await.is_ok());
    let id = held.id();
    drop(held);
    assert!(second.is_woken());
    let conn = assert_ready!(second.poll()).unwrap();
    assert_eq!(conn.id(), id);
    assert_eq!(pool.stats().created, 2);
}

/// A request waiting for its session's turn when the session ends starts a new session
/// (as `acquire`'s code intends: "the session ended while we waited: start over").
#[tokio::test]
async fn a_request_waiting_on_an_ended_session_starts_a_new_one() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    let held = sessions.acquire("alice").await.unwrap();
    let mut waiting = spawn(sessions.acquire("alice"));
    assert_pending!(waiting.poll());
    assert!(sessions.end("alice"));
    drop(held);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let conn = assert_ready!(waiting.poll()).unwrap();
    // The ended session's connection went back to the pool first; the new session
    // checked one out afresh (the pool may hand the same one back: LIFO reuse).
    assert_eq!(sessions.sessions(1)[0].connection, Some(conn.id()));
    assert_eq!(
        pool.stats().acquired,
        2,
        "a second checkout for the new session"
    );
    assert_eq!(sessions.len(), 1, "a new session");
    assert!(sessions.set_data("alice", "k", "v"));
}

#[tokio::test]
async fn end_returns_the_connection_to_the_pool() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    let id = sessions.acquire("alice").await.unwrap().id();
    assert!(sessions.end("alice"));
    assert!(!sessions.end("alice"), "ended twice");
    assert!(!sessions.end("nobody"));
    let stats = pool.stats();
    assert_eq!((stats.idle, stats.active), (1, 0));
    assert_eq!(sessions.ended(), (1, 0));
    assert!(sessions.is_empty());

    // The next session reuses it.
    assert_eq!(sessions.acquire("bob").await.unwrap().id(), id);
    assert_eq!(pool.stats().created, 1);
    // A new "alice" is a new session.
    let alice = sessions.acquire("alice").await.unwrap();
    assert_ne!(alice.id(), id);
}

#[tokio::test]
async fn end_while_in_use_returns_the_connection_after_the_request() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    let held = sessions.acquire("alice").await.unwrap();
    assert!(sessions.end("alice"));
    assert!(sessions.is_empty());
    assert_eq!(pool.stats().active, 1, "the request still uses it");
    drop(held);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let stats = pool.stats();
    assert_eq!((stats.idle, stats.active), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_end_by_hand() {
    let pool = pool(4);
    // The sweep runs every 15 s (IDLE / 4), at 15, 30, 45, 60, 75 s...
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    // Start at 5 s, so that at 66 s the session is 61 s idle and no sweep ran since 60 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(sessions.acquire("idle").await.unwrap());
    drop(sessions.acquire("busy").await.unwrap());
    tokio::time::sleep(Duration::from_secs(50)).await;
    drop(sessions.acquire("busy").await.unwrap());
    assert_eq!(sessions.expire_idle(), 0);
    tokio::time::sleep(Duration::from_secs(6)).await; // 61 s
    assert_eq!(
        sessions.len(),
        2,
        "the sweep at 60 s found 55 s of idleness"
    );
    tokio::time::advance(Duration::from_secs(5)).await; // 66 s
    assert_eq!(sessions.expire_idle(), 1);
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions.ended(), (0, 1));
    let stats = pool.stats();
    assert_eq!((stats.idle, stats.active), (1, 1), "its connection is back");
    assert!(sessions.sessions(10).iter().all(|s| s.id == "busy"));
}

#[tokio::test(start_paused = true)]
async fn the_sweep_ends_idle_sessions() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);

    for id in ["a", "b", "c"] {
        drop(sessions.acquire(id).await.unwrap());
    }
    let busy = sessions.acquire("busy").await.unwrap().id();
    // Three minutes, "busy" making a request every 20 s.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(sessions.acquire("busy").await.unwrap().id(), busy);
    }
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions.ended(), (0, 3));
    let stats = pool.stats();
    assert_eq!((stats.idle, stats.active, stats.created), (3, 1, 4));
    let snap = &sessions.sessions(10)[0];
    assert_eq!(snap.id, "busy");
    assert_eq!(snap.requests, 10);
    assert_eq!(snap.age, Duration::from_secs(180));
    assert_eq!(snap.idle, Duration::ZERO);
    assert_eq!(snap.connection, Some(busy));
}

#[tokio::test]
async fn dropping_the_session_pool_returns_its_connections() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 100, IDLE);
    drop(sessions.acquire("a").await.unwrap());
    let clone = sessions.clone();
    drop(sessions);
    // A clone keeps the sessions.
    assert_eq!(clone.len(), 1);
    assert_eq!(pool.stats().active, 1);
    drop(clone);
    // Gone with the last clone: the session's connection is back in the pool.
    let stats = pool.stats();
    assert_eq!((stats.active, stats.idle), (0, 1));
}

#[tokio::test]
async fn max_sessions_is_a_bound() {
    let pool = pool(10);
    let sessions = SessionPool::new(pool.clone(), 2, IDLE);

    sessions.acquire("a").await.unwrap();
    sessions.acquire("b").await.unwrap();
    let err = sessions.acquire("c").await.unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::TooMany(TooManySessions { max_sessions: 2 })
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "2 sessions already hold connections");
    assert!(std::error::Error::source(&err).is_some());
    // No connection was taken for it; existing sessions carry on.
    assert_eq!(pool.stats().created, 2);
    assert!(sessions.acquire("a").await.is_ok());
    // Ending one makes room.
    assert!(sessions.end("a"));
    assert!(sessions.acquire("c").await.is_ok());
    assert_eq!(sessions.len(), 2);
    assert_eq!(pool.stats().created, 2, "c reuses a's connection");
}

#[tokio::test]
async fn pool_failures_are_reported_and_leave_no_session() {
    let pool = pool_with(4, None, true);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);
    let err = sessions.acquire("a").await.unwrap_err();
    match &err {
        SessionError::Pool(e) => assert!(e.is_connect(), "{e:?}"),
        other => panic!("not a pool error: {other:?}"),
    }
    assert!(err.to_string().starts_with("session connection"), "{err}");
    assert!(sessions.is_empty());
    assert_eq!(pool.stats().total, 0);
}

#[tokio::test]
async fn user_data_lives_with_the_session() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);

    assert!(
        !sessions.set_data("alice", "cart", "3 items"),
        "no session yet"
    );
    assert_eq!(sessions.data("alice", "cart"), None);
    assert!(sessions.is_empty(), "set_data creates no session");

    sessions.acquire("alice").await.unwrap();
    sessions.acquire("bob").await.unwrap();
    assert!(sessions.set_data("alice", "cart", "3 items"));
    assert!(sessions.set_data("alice", String::from("user"), String::from("alice")));
    assert_eq!(sessions.data("alice", "cart").as_deref(), Some("3 items"));
    assert!(sessions.set_data("alice", "cart", "4 items"));
    assert_eq!(sessions.data("alice", "cart").as_deref(), Some("4 items"));
    assert_eq!(sessions.data("alice", "user").as_deref(), Some("alice"));
    assert_eq!(sessions.data("alice", "other"), None);
    assert_eq!(sessions.data("bob", "cart"), None, "per session");

    // Ended: its data goes with it, and a new session starts empty.
    sessions.end("alice");
    assert_eq!(sessions.data("alice", "cart"), None);
    sessions.acquire("alice").await.unwrap();
    assert_eq!(sessions.data("alice", "cart"), None);
}

/// The listing names the connection of a session even while a request holds it.
#[tokio::test]
async fn the_listing_names_a_connection_in_use() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);
    let held = sessions.acquire("alice").await.unwrap();
    let snap = &sessions.sessions(10)[0];
    assert_eq!(snap.connection, Some(held.id()));
}

#[tokio::test]
async fn the_listing_is_bounded() {
    let pool = pool(10);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);
    for i in 0..5 {
        drop(sessions.acquire(&format!("s{i}")).await.unwrap());
    }
    assert_eq!(sessions.sessions(3).len(), 3);
    assert!(sessions.sessions(0).is_empty());
    let all = sessions.sessions(100);
    assert_eq!(all.len(), 5);
    let mut conns: Vec<_> = all.iter().map(|s| s.connection.unwrap()).collect();
    conns.sort();
    conns.dedup();
    assert_eq!(conns.len(), 5, "one connection each");
    assert!(all.iter().all(|s| s.requests == 1));
}

// ---------------------------------------------------------------------------------------
// Cancel safety
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn cancelled_while_waiting_for_the_pool() {
    let pool = pool(1);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);
    let alice = sessions.acquire("alice").await.unwrap().id();

    // The only connection is alice's: bob waits in the pool's queue...
    let mut bob = spawn(sessions.acquire("bob"));
    assert_pending!(bob.poll());
    assert_eq!(pool.stats().waiting, 1);
    // ...and gives up.
    drop(bob);
    assert_eq!(pool.stats().waiting, 0);
    assert_eq!(sessions.len(), 1);
    assert!(!sessions.set_data("bob", "k", "v"), "no session for bob");

    // Nothing leaked: alice's connection goes back and bob gets it.
    assert!(sessions.end("alice"));
    assert_eq!(pool.stats().idle, 1);
    assert_eq!(sessions.acquire("bob").await.unwrap().id(), alice);
    assert_eq!(pool.stats().created, 1);
}

#[tokio::test(start_paused = true)]
async fn cancelled_while_connecting() {
    let pool = pool_with(4, Some(Duration::from_secs(5)), false);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);

    let mut carol = spawn(sessions.acquire("carol"));
    assert_pending!(carol.poll());
    assert_eq!(pool.stats().connecting, 1);
    drop(carol);
    let stats = pool.stats();
    assert_eq!((stats.connecting, stats.total, stats.cancelled), (0, 0, 1));
    assert!(sessions.is_empty());

    // Carol can start over (the connect takes its 5 s of paused time).
    let conn = sessions.acquire("carol").await.unwrap();
    assert_eq!(pool.stats().active, 1);
    drop(conn);
    assert_eq!(sessions.len(), 1);
}

#[tokio::test]
async fn cancelled_while_waiting_for_the_sessions_turn() {
    let pool = pool(4);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);
    let held = sessions.acquire("alice").await.unwrap();
    let id = held.id();

    let mut waiting = spawn(sessions.acquire("alice"));
    assert_pending!(waiting.poll());
    drop(waiting);
    drop(held);
    // Still one session on its connection, nothing else checked out.
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions.acquire("alice").await.unwrap().id(), id);
    let stats = pool.stats();
    assert_eq!((stats.active, stats.idle, stats.created), (1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn racing_first_requests_share_one_connection() {
    let pool = pool_with(4, Some(Duration::from_secs(1)), false);
    let sessions = SessionPool::new(pool.clone(), 10, IDLE);

    // Two first requests of one new session, both connecting.
    let mut one = spawn(sessions.acquire("dave"));
    let mut two = spawn(sessions.acquire("dave"));
    assert_pending!(one.poll());
    assert_pending!(two.poll());
    assert_eq!(pool.stats().connecting, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let first = assert_ready!(one.poll()).unwrap();
    // The second found the session made: it gave its connection back and waits for
    // the session's turn.
    assert_pending!(two.poll());
    assert_eq!(sessions.len(), 1);
    let stats = pool.stats();
    assert_eq!((stats.total, stats.idle, stats.active), (2, 1, 1));
    let id = first.id();
    drop(first);
    let second = assert_ready!(two.poll()).unwrap();
    assert_eq!(second.id(), id);
}
