//! Regression tests for races and leaks found in review: `close()` that never ended,
//! waiters losing their place, grants that outlived `close()`, background work that
//! kept an abandoned pool alive, and a pool that outlived its runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use integration_tests::{LIMIT, MemConn, MemConnector, Step, mem_config, within, yield_until};
use marina_pool::{Pool, PoolError};

#[tokio::test(start_paused = true)]
async fn close_ends_when_the_last_connection_is_detached() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(1), connector.clone(), "detach").unwrap();
    let conn = pool.get().await.unwrap();
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close().await }
    });
    assert!(yield_until(100, || pool.is_closed()).await);
    let raw: MemConn = conn.detach();
    within(LIMIT, "close after detach", closing).await.unwrap();
    assert_eq!(pool.stats().total, 0);
    drop(raw);
    assert_eq!(connector.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn close_ends_when_a_waiter_granted_a_slot_is_cancelled() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(1), connector.clone(), "grant").unwrap();
    let held = pool.get().await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await }
    });
    assert!(yield_until(100, || pool.stats().waiting == 1).await);
    // The broken connection frees its slot: it is granted to the waiter, which has not
    // run yet; then the pool closes and the waiter is cancelled before it runs.
    held.poison();
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close().await }
    });
    waiter.abort();
    within(LIMIT, "close after a cancelled grant", closing)
        .await
        .unwrap();
    assert_eq!(pool.stats().total, 0);
    assert_eq!(connector.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_granted_a_connection_before_close_still_fails_with_closed() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(1), connector.clone(), "late").unwrap();
    let held = pool.get().await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(|c| c.id()) }
    });
    assert!(yield_until(100, || pool.stats().waiting == 1).await);
    drop(held); // handed straight to the waiter, which has not run yet
    // Close now, before the waiter runs: poll `close()` once, in this task.
    let closing = pool.close();
    tokio::pin!(closing);
    assert!(
        tokio::time::timeout(Duration::ZERO, closing.as_mut())
            .await
            .is_err()
    );
    assert!(pool.is_closed());
    let got = within(LIMIT, "waiter", waiter).await.unwrap();
    assert!(matches!(got, Err(PoolError::Closed)), "{got:?}");
    within(LIMIT, "close", closing).await;
    assert_eq!(connector.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_handed_a_stale_connection_connects_in_its_place() {
    let connector = MemConnector::new();
    let pool = Pool::builder()
        .config(mem_config(1))
        .check(|c: &mut MemConn| c.is_open())
        .build(connector.clone(), "stale")
        .unwrap();
    let held = pool.get().await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..2 {
        let (p, order) = (pool.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let conn = p.get().await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(conn);
        }));
        assert!(yield_until(100, || pool.stats().waiting == i + 1).await);
    }
    // The connection goes back, but its peer has gone: the first waiter gets it, finds it
    // stale, and must connect in its slot rather than queue again behind the second.
    connector.break_all();
    drop(held);
    for w in waiters {
        within(LIMIT, "waiters", w).await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1]);
    let s = pool.stats();
    assert_eq!((s.created, s.destroyed, s.total), (2, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_abandons_a_hanging_refill() {
    let connector = MemConnector::new();
    connector.always(Step::Never);
    let pool = Pool::builder()
        .config(mem_config(2))
        .min_idle(1)
        .connect_timeout(None)
        .build(connector.clone(), "refill")
        .unwrap();
    assert!(
        yield_until(1000, || connector.started() == 1).await,
        "the warm-up connect started"
    );
    drop(pool);
    // Nothing else holds the pool open: the hanging connect is dropped at once, not
    // after some connect timeout (there is none).
    assert!(
        yield_until(1000, || connector.dropped() == 1).await,
        "{connector:?}"
    );
    assert_eq!(connector.in_flight(), 0);
}

#[test]
fn a_pool_outlives_the_runtime_its_tasks_started_on() {
    let connector = MemConnector::new();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let (pool, held) = first.block_on(async {
        let pool = Pool::builder()
            .config(mem_config(1))
            .acquire_timeout(Duration::from_secs(1))
            .build(connector.clone(), "rt")
            .unwrap();
        let held = pool.get().await.unwrap();
        // Start the deadline timer on this runtime.
        assert!(pool.get().await.unwrap_err().is_timeout());
        (pool, held)
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let timeouts = AtomicUsize::new(0);
    second.block_on(async {
        // The first runtime's timer task is gone: a waiter must still time out.
        let r = within(LIMIT, "get on a second runtime", pool.get()).await;
        assert!(r.unwrap_err().is_timeout());
        timeouts.fetch_add(1, SeqCst);
        drop(held);
        assert!(pool.get().await.is_ok(), "the pool still works");
    });
    assert_eq!(timeouts.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn close_ends_while_a_health_probe_is_in_flight() {
    let connector = MemConnector::new();
    let pool = Pool::builder()
        .config(mem_config(1))
        .health_check_interval(Duration::from_secs(1))
        .probe(marina_core::probe_fn(|_: &mut MemConn| {
            Box::pin(async {
                std::future::pending::<()>().await;
                Ok(())
            })
        }))
        .health_check_timeout(Duration::from_secs(3600))
        .build(connector.clone(), "probe")
        .unwrap();
    drop(pool.get().await.unwrap());
    // Let the probe start: the idle connection leaves the idle queue.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pool.try_get().unwrap().map(|c| c.id()),
        None,
        "being probed"
    );
    within(LIMIT, "close during a probe", pool.close()).await;
    let s = pool.stats();
    assert_eq!((s.total, s.idle, s.connections.len()), (0, 0, 0));
    assert_eq!(connector.live(), 0);
}

#[test]
fn maintenance_restarts_on_a_new_runtime_even_on_the_fast_path() {
    let connector = MemConnector::new();
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let pool = paused().block_on(async {
        let pool = Pool::builder()
            .config(mem_config(1))
            .idle_timeout(Duration::from_secs(10))
            .build(connector.clone(), "rt-fast")
            .unwrap();
        drop(pool.get().await.unwrap());
        pool
    });
    // That runtime is gone with its maintenance task. Here every get() is a fast-path
    // hit on the idle connection, yet eviction must run again.
    paused().block_on(async {
        drop(pool.get().await.unwrap());
        tokio::time::sleep(Duration::from_secs(12)).await;
        let s = pool.stats();
        assert_eq!((s.evicted, s.total), (1, 0), "{s:?}");
    });
    assert_eq!(connector.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_keyed_target_with_a_live_handle_is_never_dropped_for_another() {
    use marina_pool::KeyedPool;
    let connector = MemConnector::new();
    let keyed = KeyedPool::new(Pool::builder().config(mem_config(1)), connector.clone())
        .unwrap()
        .max_targets(1);
    // A handle to a's pool is held (as an unpolled `call` future would), with nothing
    // checked out: a must not be evicted, or a second pool for a could appear.
    let a = keyed.pool(&"a").unwrap();
    let err = keyed.pool(&"b").expect_err("a is held");
    assert!(matches!(err, PoolError::TooManyTargets(1)), "{err:?}");
    drop(a);
    keyed.pool(&"b").expect("a is unused now");
    // A target whose pool was closed through a clone is replaced.
    let b = keyed.pool(&"b").unwrap();
    b.close().await;
    drop(b);
    let b2 = keyed.pool(&"b").unwrap();
    assert!(!b2.is_closed());
    assert!(b2.get().await.is_ok());
}
