//! Whole-pool tests of `marina_pool::Pool`: reuse, bounds, fairness, timeouts, errors,
//! stale connections, eviction, refill, close, and cancellation under load.
//!
//! Real sockets (an echo server on 127.0.0.1) for the I/O paths; the in-memory
//! connector and paused time for everything that depends on time.

use std::error::Error as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, MemConn, MemConnector, Step, check_invariants, echo_round, eventually,
    mem_config, refused_addr, within, yield_until,
};
use marina_pool::{Config, ConnectError, ConnectTimeout, Pool, PoolError, TcpConnector};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------
// 1. Reuse
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sequential_checkouts_reuse_one_tcp_connection() {
    let server = EchoServer::start().await;
    let pool = Pool::builder()
        .max_size(4)
        .acquire_timeout(LIMIT)
        .build(TcpConnector::new(), server.addr())
        .unwrap();
    const N: u64 = 50;
    for i in 0..N {
        let mut conn = within(LIMIT, "get", pool.get()).await.expect("get");
        assert_eq!(conn.uses(), i + 1, "the same connection serves every round");
        let msg = format!("round {i}\n");
        let back = within(LIMIT, "echo", echo_round(&mut conn, msg.as_bytes()))
            .await
            .expect("echo round trip");
        assert_eq!(back, msg.as_bytes());
        assert!(!conn.is_broken());
    }
    assert_eq!(server.accepts(), 1, "one TCP connect for {N} rounds");
    let s = pool.stats();
    assert_eq!(s.created, 1, "{s:#?}");
    assert_eq!(s.acquired, N, "{s:#?}");
    assert_eq!(s.released, N, "{s:#?}");
    assert_eq!((s.idle, s.active, s.destroyed), (1, 0, 0), "{s:#?}");
    assert_eq!(s.connections[0].uses, N);
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------
// 2. max_size under contention
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_size_holds_under_256_concurrent_tasks() {
    const MAX: usize = 8;
    const TASKS: usize = 256;
    const ROUNDS: usize = 4;
    let server = EchoServer::start().await;
    let pool = Pool::builder()
        .max_size(MAX)
        .acquire_timeout(Duration::from_secs(30))
        .build(TcpConnector::new(), server.addr())
        .unwrap();
    let in_use = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    // Samples the pool's gauges while the tasks run.
    let sampler = tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        async move {
            let mut samples = 0usize;
            for _ in 0..60_000 {
                if stop.load(SeqCst) {
                    break;
                }
                let s = pool.stats();
                assert!(s.total <= MAX && s.active <= MAX, "over max_size: {s:#?}");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples
        }
    });

    let mut tasks = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let (pool, in_use, peak) = (pool.clone(), in_use.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                let mut conn = pool.get().await.expect("get under contention");
                let now = in_use.fetch_add(1, SeqCst) + 1;
                peak.fetch_max(now, SeqCst);
                let msg = format!("task {t} round {r}\n");
                let back = echo_round(&mut conn, msg.as_bytes()).await.expect("echo");
                assert_eq!(back, msg.as_bytes());
                in_use.fetch_sub(1, SeqCst);
                drop(conn);
            }
        }));
    }
    for t in tasks {
        within(Duration::from_secs(60), "contending task", t)
            .await
            .expect("task panicked");
    }
    stop.store(true, SeqCst);
    let samples = within(LIMIT, "sampler", sampler)
        .await
        .expect("sampler panicked");
    assert!(samples > 0);

    let peak = peak.load(SeqCst);
    assert!(peak <= MAX, "{peak} connections were checked out at once");
    assert!(
        server.accepts() <= MAX,
        "server accepted {}",
        server.accepts()
    );
    let s = pool.stats();
    assert!(s.total <= MAX && s.created <= MAX as u64, "{s:#?}");
    assert_eq!(s.acquired, (TASKS * ROUNDS) as u64, "{s:#?}");
    assert_eq!((s.active, s.waiting, s.timed_out), (0, 0, 0), "{s:#?}");
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------
// 3. FIFO fairness
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn waiters_are_served_in_fifo_order() {
    const WAITERS: usize = 64;
    let pool = Pool::builder()
        .max_size(1)
        .acquire_timeout(Duration::from_secs(30))
        .build(MemConnector::new(), "fifo")
        .unwrap();
    let held = pool.get().await.expect("first get");
    let held_id = held.id();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let (p, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = p.get().await.expect("queued get");
            conn.use_it();
            order.lock().unwrap().push(i);
            conn.id()
        }));
        let queued = yield_until(1_000, || pool.stats().waiting == i + 1).await;
        assert!(queued, "waiter {i} did not queue: {:#?}", pool.stats());
    }
    // A newcomer does not barge ahead of the queue.
    assert!(pool.try_get().expect("not closed").is_none());
    drop(held);
    for t in tasks {
        let id = within(LIMIT, "waiter", t).await.expect("waiter panicked");
        assert_eq!(
            id, held_id,
            "the one connection is handed from waiter to waiter"
        );
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
    let s = pool.stats();
    assert_eq!(s.created, 1, "{s:#?}");
    assert_eq!(s.acquired, WAITERS as u64 + 1, "{s:#?}");
    assert_eq!(s.waiting, 0, "{s:#?}");
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------
// 4. acquire_timeout
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn acquire_timeout_fires_when_the_pool_is_exhausted() {
    let connector = MemConnector::new();
    let pool = Pool::new(
        Config {
            acquire_timeout: Some(Duration::from_secs(5)),
            ..mem_config(1)
        },
        connector.clone(),
        "exhausted",
    )
    .unwrap();
    let held = pool.get().await.expect("first get");
    let start = Instant::now();
    let err = pool.get().await.expect_err("the pool is exhausted");
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        matches!(err, PoolError::Timeout(d) if d == Duration::from_secs(5)),
        "{err:?}"
    );
    assert!(start.elapsed() >= Duration::from_secs(5));
    let s = pool.stats();
    assert_eq!(s.timed_out, 1, "{s:#?}");
    assert_eq!((s.waiting, s.active, s.total), (0, 1, 1), "{s:#?}");

    // The timed-out waiter left nothing behind: the connection is reused at once.
    let held_id = held.id();
    drop(held);
    let again = pool.get().await.expect("get after release");
    assert_eq!(again.id(), held_id);
    assert_eq!(pool.stats().timed_out, 1);
    assert_eq!(connector.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn hanging_connect_is_bounded_by_acquire_timeout_and_dropped() {
    let connector = MemConnector::new();
    connector.always(Step::Never);
    let pool = Pool::new(
        Config {
            acquire_timeout: Some(Duration::from_secs(5)),
            connect_timeout: Some(Duration::from_secs(60)),
            ..mem_config(1)
        },
        connector.clone(),
        "hang",
    )
    .unwrap();
    let err = pool.get().await.expect_err("the connect never finishes");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(connector.started(), 1);
    assert_eq!(connector.dropped(), 1, "the abandoned connect was dropped");
    assert_eq!(connector.in_flight(), 0);
    let s = pool.stats();
    assert_eq!((s.timed_out, s.cancelled), (1, 1), "{s:#?}");
    assert_eq!((s.total, s.connecting), (0, 0), "{s:#?}");

    // The slot was freed: the next connect can use it.
    connector.always(Step::Ok);
    let conn = pool.get().await.expect("get after the hang");
    assert_eq!(conn.uses(), 1);
    assert_eq!(connector.live(), 1);
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_is_a_connect_error_not_an_acquire_timeout() {
    let connector = MemConnector::new();
    connector.always(Step::Never);
    let pool = Pool::new(
        Config {
            acquire_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Some(Duration::from_secs(2)),
            ..mem_config(1)
        },
        connector.clone(),
        "slow-target",
    )
    .unwrap();
    let start = Instant::now();
    let err = pool.get().await.expect_err("the connect never finishes");
    assert!(err.is_connect(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "reported before acquire_timeout"
    );
    let source = err.source().expect("a Connect error has a source");
    let ct = source
        .downcast_ref::<ConnectTimeout>()
        .unwrap_or_else(|| panic!("source is a ConnectTimeout: {source:?}"));
    assert_eq!(ct.timeout, Duration::from_secs(2));
    assert!(ct.target.contains("slow-target"), "{ct:?}");
    let s = pool.stats();
    assert_eq!((s.failed, s.timed_out, s.total), (1, 0, 0), "{s:#?}");
    assert_eq!(connector.dropped(), 1);
}

// ---------------------------------------------------------------------------------------
// 5. Connect errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn refused_connect_is_reported_promptly_as_a_connect_error() {
    let (_port, addr) = refused_addr();
    let pool = Pool::builder()
        .max_size(2)
        .acquire_timeout(Duration::from_secs(60))
        .build(TcpConnector::new(), addr)
        .unwrap();
    for attempt in 0..3 {
        let err = tokio::time::timeout(LIMIT, pool.get())
            .await
            .expect("a refused connect returns promptly, not after acquire_timeout")
            .expect_err("nothing listens there");
        assert!(err.is_connect() && !err.is_timeout(), "{err:?}");

        let mut chain = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cur.take() {
            chain.push(e.to_string());
            if chain.len() < 16 {
                cur = e.source();
            }
        }
        assert!(
            chain.iter().any(|m| m.contains(&addr.to_string())),
            "the source chain names {addr}: {chain:?}"
        );
        let ce = err
            .source()
            .and_then(|s| s.downcast_ref::<ConnectError>())
            .unwrap_or_else(|| panic!("source is the connector's ConnectError: {err:?}"));
        assert_eq!(ce.target(), addr.to_string());
        assert_eq!(ce.kind(), std::io::ErrorKind::ConnectionRefused);

        // Each failure frees its slot (else the third attempt would wait and time out).
        let s = pool.stats();
        assert_eq!(s.failed, attempt + 1, "{s:#?}");
        assert_eq!((s.total, s.connecting, s.timed_out), (0, 0, 0), "{s:#?}");
    }
}

#[tokio::test]
async fn failed_connect_frees_its_slot() {
    let connector = MemConnector::new();
    connector.script([Step::Fail]);
    let pool = Pool::new(mem_config(1), connector.clone(), "flaky").unwrap();
    let err = within(LIMIT, "get", pool.get())
        .await
        .expect_err("scripted failure");
    assert!(err.is_connect(), "{err:?}");
    let source = err.source().expect("the connector's error is the source");
    assert!(source.to_string().contains("flaky"), "{source}");
    let conn = within(LIMIT, "get", pool.get())
        .await
        .expect("second connect succeeds");
    assert_eq!(conn.uses(), 1);
    let s = pool.stats();
    assert_eq!((s.failed, s.created, s.total), (1, 1, 1), "{s:#?}");
}

// ---------------------------------------------------------------------------------------
// 6. Stale connections after a server restart
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn stale_connections_after_a_server_restart_are_not_handed_out() {
    const SIZE: usize = 4;
    let server = EchoServer::start().await;
    let pool = Pool::builder()
        .max_size(SIZE)
        .acquire_timeout(LIMIT)
        .build(TcpConnector::new(), server.addr())
        .unwrap();

    // Fill the pool: SIZE connections checked out at once, used, returned.
    let mut conns = Vec::new();
    for i in 0..SIZE {
        let mut c = within(LIMIT, "get", pool.get()).await.expect("get");
        echo_round(&mut c, format!("fill {i}\n").as_bytes())
            .await
            .expect("echo");
        conns.push(c);
    }
    drop(conns);
    let s = pool.stats();
    assert_eq!((s.idle, s.created), (SIZE, SIZE as u64), "{s:#?}");
    assert_eq!(server.accepts(), SIZE);

    // A socket of our own, to know when the server's FINs have arrived.
    let mut watch = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    echo_round(&mut watch, b"watch").await.expect("echo");

    server.shutdown().await;
    assert_eq!(server.open_connections(), 0);
    let closed = eventually(LIMIT, || !marina_pool::socket_is_open(&watch)).await;
    assert!(closed, "the client never saw the server close");
    // The pool's sockets were closed in the same shutdown; give them a moment too.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    server.restart().await.expect("restart on the same port");
    let mut conn = within(LIMIT, "get after restart", pool.get())
        .await
        .expect("get");
    let back = within(LIMIT, "echo", echo_round(&mut conn, b"after restart\n"))
        .await
        .expect("the connection handed out works");
    assert_eq!(back, b"after restart\n");
    assert_eq!(conn.uses(), 1, "a fresh connection, not a stale one");
    drop(conn);

    let s = pool.stats();
    assert_eq!(
        s.destroyed, SIZE as u64,
        "every stale connection was closed: {s:#?}"
    );
    assert_eq!(s.created, SIZE as u64 + 1, "{s:#?}");
    assert_eq!((s.total, s.idle), (1, 1), "{s:#?}");
    assert_eq!(server.accepts(), SIZE + 2); // + the watch socket + the fresh connection
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------
// 7. Idle timeout and max lifetime
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_idle_connections() {
    let connector = MemConnector::new();
    let pool = Pool::new(
        Config {
            idle_timeout: Some(Duration::from_secs(10)),
            ..mem_config(4)
        },
        connector.clone(),
        "idle",
    )
    .unwrap();
    let conns = vec![
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
    ];
    drop(conns);
    assert_eq!((pool.stats().idle, connector.live()), (3, 3));

    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = pool.stats();
    assert_eq!(
        (s.idle, s.evicted),
        (3, 0),
        "not idle long enough yet: {s:#?}"
    );
    assert_eq!(connector.live(), 3);

    // Past idle_timeout plus the eviction interval (and the clock's 1 s granularity).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = pool.stats();
    assert_eq!(s.evicted, 3, "{s:#?}");
    assert_eq!((s.idle, s.total, s.destroyed), (0, 0, 3), "{s:#?}");
    assert_eq!(connector.live(), 0, "evicted connections were dropped");
    check_invariants(&s);

    // The pool still works: a new connection is made.
    let c = pool.get().await.unwrap();
    assert_eq!(c.uses(), 1);
    assert_eq!(connector.succeeded(), 4);
}

#[tokio::test(start_paused = true)]
async fn max_lifetime_closes_connections_when_idle_and_on_return() {
    let connector = MemConnector::new();
    let pool = Pool::new(
        Config {
            max_lifetime: Some(Duration::from_secs(10)),
            ..mem_config(4)
        },
        connector.clone(),
        "lifetime",
    )
    .unwrap();
    let held = pool.get().await.unwrap();
    drop(pool.get().await.unwrap());
    let s = pool.stats();
    assert_eq!((s.idle, s.active), (1, 1), "{s:#?}");

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(pool.stats().evicted, 0);
    assert_eq!(connector.live(), 2);

    tokio::time::sleep(Duration::from_secs(7)).await;
    let s = pool.stats();
    assert_eq!(s.evicted, 1, "the idle one outlived max_lifetime: {s:#?}");
    assert_eq!((s.idle, s.active), (0, 1), "{s:#?}");
    assert_eq!(connector.live(), 1);

    drop(held);
    let s = pool.stats();
    assert_eq!(
        s.evicted, 2,
        "the checked-out one is closed on return: {s:#?}"
    );
    assert_eq!((s.idle, s.total), (0, 0), "{s:#?}");
    assert_eq!(connector.live(), 0);
    check_invariants(&s);
}

#[tokio::test(start_paused = true)]
async fn expired_idle_connection_is_not_handed_out_at_checkout() {
    let connector = MemConnector::new();
    let pool = Pool::new(
        Config {
            max_lifetime: Some(Duration::from_secs(10)),
            // Background eviction would come too late: checkout must catch it.
            eviction_interval: Duration::from_secs(3600),
            ..mem_config(4)
        },
        connector.clone(),
        "checkout-expiry",
    )
    .unwrap();
    let first = pool.get().await.unwrap();
    let first_id = first.id();
    drop(first);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(pool.stats().idle, 1, "no background eviction yet");

    let conn = pool.get().await.unwrap();
    assert_ne!(conn.id(), first_id, "the expired connection was not reused");
    let s = pool.stats();
    assert_eq!((s.created, s.evicted, s.total), (2, 1, 1), "{s:#?}");
    assert_eq!(connector.live(), 1);
}

// ---------------------------------------------------------------------------------------
// 8. min_idle refill
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn min_idle_is_refilled_in_the_background() {
    let connector = MemConnector::new();
    let pool = Pool::new(
        Config {
            min_idle: 3,
            ..mem_config(5)
        },
        connector.clone(),
        "min-idle",
    )
    .unwrap();
    pool.ready_min().await.expect("warm-up");
    let s = pool.stats();
    assert_eq!((s.idle, s.total, s.created), (3, 3, 3), "{s:#?}");
    assert_eq!(connector.live(), 3);

    // A poisoned connection is closed; the background task opens a replacement.
    let conn = pool.get().await.unwrap();
    conn.poison();
    assert_eq!(pool.stats().destroyed, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = pool.stats();
    assert_eq!(
        (s.idle, s.total, s.created),
        (3, 3, 4),
        "refilled to 3: {s:#?}"
    );
    assert_eq!(connector.live(), 3);

    // min_idle counts idle connections: one checked out is refilled too, within max_size.
    let held = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = pool.stats();
    assert_eq!((s.idle, s.active, s.total), (3, 1, 4), "{s:#?}");
    drop(held);
    let s = pool.stats();
    assert_eq!((s.idle, s.total), (4, 4), "{s:#?}");
    check_invariants(&s);
}

#[tokio::test(start_paused = true)]
async fn min_idle_is_refilled_after_eviction() {
    let connector = MemConnector::new();
    let pool = Pool::new(
        Config {
            min_idle: 2,
            idle_timeout: Some(Duration::from_secs(10)),
            ..mem_config(4)
        },
        connector.clone(),
        "evict-refill",
    )
    .unwrap();
    pool.ready_min().await.expect("warm-up");
    assert_eq!(connector.live(), 2);
    tokio::time::sleep(Duration::from_secs(13)).await;
    let s = pool.stats();
    assert_eq!(s.evicted, 2, "{s:#?}");
    assert_eq!((s.idle, s.total, s.created), (2, 2, 4), "{s:#?}");
    assert_eq!(connector.live(), 2);
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------
// 9. close()
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn close_rejects_waiters_and_waits_for_checked_out_connections() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(2), connector.clone(), "close").unwrap();
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    let waiter = tokio::spawn({
        let p = pool.clone();
        async move { p.get().await.map(drop) }
    });
    assert!(yield_until(1_000, || pool.stats().waiting == 1).await);

    let closer = tokio::spawn({
        let p = pool.clone();
        async move { p.close().await }
    });
    let r = within(LIMIT, "queued get", waiter)
        .await
        .expect("waiter panicked");
    assert!(matches!(r, Err(PoolError::Closed)), "{r:?}");
    assert!(pool.is_closed());
    let s = pool.stats();
    assert!(s.closed && s.waiting == 0, "{s:#?}");
    assert!(matches!(pool.get().await, Err(PoolError::Closed)));
    assert!(matches!(pool.try_get(), Err(PoolError::Closed)));
    assert!(matches!(pool.ready_min().await, Err(PoolError::Closed)));

    // close() waits for checked-out connections.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !closer.is_finished(),
        "close() finished with two connections out"
    );
    drop(b);
    assert_eq!(
        connector.live(),
        1,
        "a connection returned to a closed pool is dropped"
    );
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !closer.is_finished(),
        "close() finished with a connection out"
    );
    drop(a);
    within(LIMIT, "close", closer)
        .await
        .expect("closer panicked");
    assert_eq!(connector.live(), 0);
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.destroyed), (0, 0, 2), "{s:#?}");
    check_invariants(&s);
}

#[tokio::test]
async fn close_drops_idle_connections_at_once() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(4), connector.clone(), "close-idle").unwrap();
    let conns = vec![
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
        pool.get().await.unwrap(),
    ];
    drop(conns);
    let held = pool.get().await.unwrap();
    assert_eq!((pool.stats().idle, connector.live()), (2, 3));

    let closer = tokio::spawn({
        let p = pool.clone();
        async move { p.close().await }
    });
    assert!(yield_until(1_000, || pool.is_closed()).await);
    assert_eq!(connector.live(), 1, "idle connections are dropped at once");
    assert_eq!(pool.stats().idle, 0);
    assert!(!closer.is_finished());
    drop(held);
    within(LIMIT, "close", closer)
        .await
        .expect("closer panicked");
    assert_eq!(connector.live(), 0);
    // close() on a closed, drained pool returns at once.
    within(LIMIT, "second close", pool.close()).await;
    check_invariants(&pool.stats());
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_pool() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(4), connector.clone(), "dropped").unwrap();
    let kept = pool.get().await.unwrap();
    drop(pool.get().await.unwrap());
    assert_eq!(connector.live(), 2);
    drop(pool);
    assert_eq!(
        connector.live(),
        1,
        "the idle connection was closed with the pool"
    );
    drop(kept);
    assert_eq!(
        connector.live(),
        0,
        "the checked-out one is closed when returned"
    );
}

// ---------------------------------------------------------------------------------------
// 10. Cancellation at random points
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_cancelled_gets_leave_nothing_behind() {
    const MAX: usize = 8;
    const ATTEMPTS: usize = 10_000;
    const WORKERS: u64 = 32;
    const SEED: u64 = 0x6d61_7269_6e61;

    let connector = MemConnector::new();
    let script_rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(SEED)));
    connector.behave(move |_| {
        let mut rng = script_rng.lock().unwrap();
        let delay = Duration::from_micros(rng.u64(0..1_000));
        match rng.u32(0..100) {
            0..8 => Step::Fail,
            8..12 => Step::SlowFail(delay),
            12..60 => Step::Slow(delay),
            _ => Step::Ok,
        }
    });
    let pool = Pool::new(
        Config {
            acquire_timeout: Some(Duration::from_secs(5)),
            ..mem_config(MAX)
        },
        connector.clone(),
        "chaos",
    )
    .unwrap();

    let next = Arc::new(AtomicUsize::new(0));
    let acquired = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (pool, next, acquired, aborted) = (
            pool.clone(),
            next.clone(),
            acquired.clone(),
            aborted.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(SEED ^ (w + 1));
            while next.fetch_add(1, SeqCst) < ATTEMPTS {
                match rng.u32(0..100) {
                    // A task aborted mid-flight (waiting, connecting, or holding).
                    0..10 => {
                        let (p, acq) = (pool.clone(), acquired.clone());
                        let hold = Duration::from_micros(rng.u64(0..500));
                        let task = tokio::spawn(async move {
                            if let Ok(mut c) = p.get().await {
                                acq.fetch_add(1, SeqCst);
                                c.use_it();
                                tokio::time::sleep(hold).await;
                            }
                        });
                        for _ in 0..rng.usize(0..4) {
                            tokio::task::yield_now().await;
                        }
                        task.abort();
                        if task.await.is_err() {
                            aborted.fetch_add(1, SeqCst);
                        }
                    }
                    // try_get: never waits.
                    10..15 => {
                        if let Ok(Some(c)) = pool.try_get() {
                            acquired.fetch_add(1, SeqCst);
                            drop(c);
                        }
                    }
                    // get() under a random short timeout.
                    _ => {
                        let limit = Duration::from_micros(rng.u64(0..1_000));
                        match tokio::time::timeout(limit, pool.get()).await {
                            Ok(Ok(mut c)) => {
                                acquired.fetch_add(1, SeqCst);
                                c.use_it();
                                match rng.u32(0..20) {
                                    0 => c.poison(),
                                    1 => drop(c.detach()),
                                    2 => c.mark_broken(),
                                    3..10 => {
                                        let hold = Duration::from_micros(rng.u64(0..300));
                                        tokio::time::sleep(hold).await;
                                    }
                                    _ => tokio::task::yield_now().await,
                                }
                            }
                            Ok(Err(e)) => {
                                assert!(e.is_connect() || e.is_timeout(), "unexpected {e:?}")
                            }
                            Err(_elapsed) => {}
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        within(Duration::from_secs(60), "chaos worker", w)
            .await
            .expect("worker panicked");
    }

    let settled = eventually(LIMIT, || {
        let s = pool.stats();
        s.active == 0 && s.connecting == 0
    })
    .await;
    let s = pool.stats();
    assert!(settled, "the pool did not settle: {s:#?}");
    assert_eq!(s.active, 0, "{s:#?}");
    assert_eq!(s.waiting, 0, "{s:#?}");
    assert_eq!(s.connecting, 0, "{s:#?}");
    assert!(s.total <= MAX, "{s:#?}");
    assert_eq!(s.acquired, s.released, "{s:#?}");
    assert_eq!(s.created, s.destroyed + s.total as u64, "{s:#?}");
    assert_eq!(
        s.acquired,
        acquired.load(SeqCst),
        "every checkout was counted once"
    );
    assert_eq!(connector.live(), s.total, "connections leaked: {s:#?}");
    assert_eq!(connector.in_flight(), 0);
    assert_eq!(
        connector.started(),
        connector.succeeded() + connector.failed() + connector.dropped(),
        "{connector:?}"
    );
    assert_eq!(
        s.created,
        connector.succeeded() as u64,
        "{s:#?} {connector:?}"
    );
    assert_eq!(s.failed, connector.failed() as u64, "{s:#?} {connector:?}");
    assert!(
        s.cancelled >= connector.dropped() as u64,
        "{s:#?} {connector:?}"
    );
    check_invariants(&s);
    // The run exercised what it claims to.
    assert!(s.acquired > 0 && s.failed > 0, "{s:#?}");
    assert!(aborted.load(SeqCst) > 0);

    // Fresh checkouts still work, up to max_size at once.
    connector.always(Step::Ok);
    let mut fresh: Vec<marina_pool::Pooled<MemConn>> = Vec::new();
    for _ in 0..MAX {
        fresh.push(
            within(LIMIT, "fresh get", pool.get())
                .await
                .expect("fresh get"),
        );
    }
    let s = pool.stats();
    assert_eq!((s.active, s.total), (MAX, MAX), "{s:#?}");
    drop(fresh);
    assert_eq!(connector.live(), MAX);
    check_invariants(&pool.stats());
}
