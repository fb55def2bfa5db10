//! Unit tests of the pool that need its internals or no sockets.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tower::service_fn;

use crate::{Pool, PoolError, Pooled};

fn mem_pool(
    max: usize,
) -> Pool<
    impl tower_service::Service<(), Response = u64, Error = Infallible, Future = impl Send>
    + Clone
    + Send
    + Sync,
    (),
> {
    Pool::builder()
        .max_size(max)
        .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u64) }), ())
        .unwrap()
}

#[test]
fn handles_and_guards_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Pool<crate::TcpConnector, std::net::SocketAddr>>();
    send_sync::<Pooled<tokio::net::TcpStream>>();
    send_sync::<PoolError>();
}

#[tokio::test(flavor = "current_thread")]
async fn a_busy_loop_on_a_ready_pool_yields_to_other_tasks() {
    let pool = mem_pool(1);
    drop(pool.get().await.unwrap());
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    tokio::spawn(async move { flag.store(true, Ordering::Relaxed) });
    let mut n = 0;
    while !ran.load(Ordering::Relaxed) && n < 100_000 {
        drop(pool.get().await.unwrap());
        n += 1;
    }
    assert!(
        ran.load(Ordering::Relaxed),
        "get() never yielded: it ignores tokio's coop budget"
    );
    assert!(n < 1000, "yielded only after {n} checkouts");
}

#[tokio::test(start_paused = true)]
async fn expired_idle_connection_is_not_handed_out_even_before_eviction_runs() {
    let pool = Pool::builder()
        .max_size(1)
        .idle_timeout(Duration::from_secs(10))
        .eviction_interval(Duration::from_secs(3600))
        .health_check_interval(Duration::from_secs(3600))
        .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u64) }), ())
        .unwrap();
    let first = pool.get().await.unwrap().id();
    assert_eq!(pool.get().await.unwrap().id(), first, "reused while fresh");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let s = pool.stats();
    assert_eq!(
        (s.total, s.evicted),
        (1, 0),
        "the eviction pass has not run yet"
    );
    let conn = pool.get().await.unwrap();
    assert_ne!(
        conn.id(),
        first,
        "an idle-expired connection was handed out"
    );
    let s = pool.stats();
    assert_eq!((s.created, s.destroyed), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn lifetime_expired_connection_is_closed_on_return() {
    let pool = Pool::builder()
        .max_size(1)
        .max_lifetime(Duration::from_secs(30))
        .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u64) }), ())
        .unwrap();
    let conn = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    drop(conn);
    let s = pool.stats();
    assert_eq!((s.total, s.destroyed, s.released), (0, 1, 1));
}

#[tokio::test]
async fn hooks_for_another_connection_type_are_rejected_at_build() {
    let r = Pool::builder()
        .check(|_: &mut String| true)
        .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u64) }), ());
    match r {
        Err(PoolError::Invalid(problems)) => assert_eq!(problems[0].field, "check"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let r = Pool::builder()
        .max_size(0)
        .min_idle(1)
        .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u64) }), ());
    match r {
        Err(e @ PoolError::Invalid(_)) => {
            let text = e.to_string();
            assert!(
                text.contains("max_size") && text.contains("min_idle"),
                "{text}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failing_custom_check_closes_the_connection_at_checkout() {
    let pool = Pool::builder()
        .max_size(1)
        .check(|n: &mut u64| *n < 2)
        .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u64) }), ())
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..6 {
        let mut c = pool.get().await.unwrap();
        *c += 1;
        ids.push(c.id());
    }
    // uses 1 and 2 on the first connection; its value is then 2: closed at the 3rd checkout.
    assert_eq!(ids, [1, 1, 2, 2, 3, 3]);
    assert_eq!(pool.stats().destroyed, 2);
}

#[tokio::test]
async fn a_closed_pool_reads_max_size_0_and_ignores_resize() {
    let pool = mem_pool(4);
    drop(pool.get().await.unwrap());
    pool.close().await;
    assert_eq!(pool.stats().max_size, 0);
    pool.resize(16);
    let s = pool.stats();
    assert_eq!((s.max_size, s.total, s.closed), (0, 0, true), "{s:#?}");
    assert!(pool.get().await.unwrap_err().is_closed());
}
