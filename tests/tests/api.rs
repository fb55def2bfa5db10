//! Tests of the pool's other surfaces: `KeyedPool`, `PoolService`, `Pooled` I/O,
//! `Pool` as a `MakeConnection`, `resize`, `max_connecting`, and the `check`/`probe`
//! liveness hooks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, MemConn, MemConnector, Step, check_invariants, echo_round, mem_config,
    refused_addr, within, yield_until,
};
use marina_core::{BoxError, probe_fn};
use marina_pool::{Config, KeyedPool, Pool, PoolError, PoolService, TcpConnector};
use tokio::io::AsyncReadExt;
use tower::load::Load;
use tower::make::MakeConnection;
use tower::{Service, ServiceExt};

// ---------------------------------------------------------------------------------------
// KeyedPool
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn keyed_pool_bounds_targets_evicting_unused_ones_and_sweeps_idle_ones() {
    let connector = MemConnector::new();
    let builder = Pool::builder().config(Config {
        idle_timeout: Some(Duration::from_secs(10)),
        ..mem_config(2)
    });
    let mut pools = KeyedPool::new(builder, connector.clone())
        .unwrap()
        .max_targets(2);

    let a = pools
        .ready()
        .await
        .unwrap()
        .call("a")
        .await
        .expect("target a");
    let b = pools
        .ready()
        .await
        .unwrap()
        .call("b")
        .await
        .expect("target b");
    assert_eq!(pools.len(), 2);
    let err = pools
        .ready()
        .await
        .unwrap()
        .call("c")
        .await
        .expect_err("a third target");
    assert!(matches!(err, PoolError::TooManyTargets(2)), "{err:?}");

    // Known targets are still served while the map is full.
    let a2 = pools.call("a").await.expect("a second connection to a");
    assert_eq!(connector.live(), 3);
    drop((a, a2, b));

    // At capacity, the least recently used target that nobody uses makes room: b
    // (a was asked for more recently). Its pool closes with it.
    let c = pools
        .call("c")
        .await
        .expect("b is unused and least recently used");
    let mut targets: Vec<_> = pools.stats().into_iter().map(|(t, _)| t).collect();
    targets.sort();
    assert_eq!(targets, ["a", "c"]);
    assert_eq!(
        connector.live(),
        3,
        "b's idle connection was closed with its pool"
    );

    // While every target is in use, a new one is refused.
    let a3 = pools.call("a").await.unwrap();
    let err = pools.call("d").await.expect_err("a and c are both in use");
    assert!(matches!(err, PoolError::TooManyTargets(2)), "{err:?}");
    drop((a3, c));

    // Unused for the target idle timeout (the builder's idle_timeout, 10 s), a sweep
    // drops every target; their idle connections were already evicted.
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert_eq!(connector.live(), 0, "idle connections were evicted");
    pools.sweep();
    assert!(pools.is_empty(), "unused targets were swept");
    let c = pools.call("c").await.expect("a fresh pool for c");
    assert_eq!(pools.len(), 1);
    let stats = pools.stats();
    assert_eq!(stats[0].0, "c");
    assert_eq!(stats[0].1.active, 1);
    drop(c);

    // The same target reuses its pool and connection.
    let c = pools.call("c").await.unwrap();
    assert_eq!(c.uses(), 2);
    drop(c);
    within(LIMIT, "keyed close", pools.close()).await;
    assert_eq!(connector.live(), 0);
    assert!(pools.is_empty());
    let err = pools.call("c").await.expect_err("closed");
    assert!(err.is_closed(), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// PoolService
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn pool_service_returns_clients_and_closes_cancelled_ones() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(2), connector.clone(), "svc").unwrap();
    let mut svc = PoolService::new(pool.clone());

    // A completed call returns its client to the pool.
    let id = svc
        .ready()
        .await
        .unwrap()
        .call(Duration::from_millis(5))
        .await
        .unwrap();
    let s = pool.stats();
    assert_eq!((s.idle, s.active, s.destroyed), (1, 0, 0), "{s:#?}");
    let again = svc
        .ready()
        .await
        .unwrap()
        .call(Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(again, id, "the returned client is reused");
    assert_eq!(pool.stats().created, 1);
    assert_eq!(svc.load(), 0);

    // A call in flight counts as load and holds its client.
    let task = tokio::spawn(svc.call(Duration::from_secs(60)));
    let in_flight = yield_until(1_000, || svc.load() == 1 && pool.stats().active == 1).await;
    assert!(in_flight, "load {} stats {:#?}", svc.load(), pool.stats());

    // Cancelled mid-response: the client is closed, not reused.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(svc.load(), 0);
    let s = pool.stats();
    assert_eq!((s.total, s.destroyed), (0, 1), "{s:#?}");
    assert_eq!(connector.live(), 0);

    // Same with a timeout around the call.
    let r = tokio::time::timeout(Duration::from_secs(1), svc.call(Duration::from_secs(60))).await;
    assert!(r.is_err(), "the call outlives its timeout");
    let s = pool.stats();
    assert_eq!((s.total, s.destroyed, s.created), (0, 2, 2), "{s:#?}");
    assert_eq!(connector.live(), 0);

    // And the service still works with a fresh client.
    let id = svc.call(Duration::ZERO).await.unwrap();
    assert_eq!(id, 3);
    assert_eq!(pool.stats().idle, 1);
    check_invariants(&pool.stats());
}

#[tokio::test]
async fn pool_service_surfaces_checkout_errors() {
    let connector = MemConnector::new();
    connector.script([Step::Fail]);
    let pool = Pool::new(mem_config(1), connector.clone(), "svc-err").unwrap();
    let mut svc = PoolService::new(pool.clone());
    let err: BoxError = within(LIMIT, "call", svc.call(Duration::ZERO))
        .await
        .expect_err("the connect fails");
    // Marked "not sent" (safe to fail over), the PoolError inside.
    assert!(marina_core::is_not_sent(&*err), "{err:?}");
    let pe =
        marina_core::find::<PoolError>(&*err).unwrap_or_else(|| panic!("a PoolError: {err:?}"));
    assert!(pe.is_connect(), "{pe:?}");
    assert_eq!(svc.load(), 0);
    assert_eq!(pool.stats().total, 0);
}

// ---------------------------------------------------------------------------------------
// Pooled I/O
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pooled_stream_that_sees_eof_is_not_returned() {
    let server = EchoServer::start().await;
    let pool = Pool::builder()
        .max_size(2)
        .acquire_timeout(LIMIT)
        .build(TcpConnector::new(), server.addr())
        .unwrap();
    let mut conn = within(LIMIT, "get", pool.get()).await.unwrap();
    echo_round(&mut conn, b"hello\n").await.expect("echo");
    assert!(!conn.is_broken());

    server.shutdown().await;
    let mut buf = [0u8; 16];
    let r = within(LIMIT, "read after shutdown", conn.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "EOF or reset, got {r:?}");
    assert!(conn.is_broken(), "EOF poisons the connection");
    drop(conn);

    let s = pool.stats();
    assert_eq!((s.total, s.idle, s.destroyed), (0, 0, 1), "{s:#?}");
    assert!(s.connections.is_empty());
    check_invariants(&s);
}

#[tokio::test]
async fn detach_takes_the_connection_out_of_the_pool() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(1), connector.clone(), "detach").unwrap();
    let conn = pool.get().await.unwrap();
    let mut owned: MemConn = conn.detach();
    owned.use_it();
    let s = pool.stats();
    assert_eq!((s.total, s.destroyed), (0, 1), "{s:#?}");
    assert_eq!(connector.live(), 1, "the caller owns it now");
    // Its slot was freed: a second connection fits in a max_size of 1.
    let second = within(LIMIT, "get", pool.get()).await.unwrap();
    assert_eq!(second.uses(), 1);
    assert_eq!(connector.live(), 2);
    drop(owned);
    drop(second);
    assert_eq!(connector.live(), 1);
    check_invariants(&pool.stats());
}

// ---------------------------------------------------------------------------------------
// MakeConnection
// ---------------------------------------------------------------------------------------

async fn connect_via<M>(maker: &mut M, target: SocketAddr) -> Result<M::Connection, M::Error>
where
    M: MakeConnection<SocketAddr>,
{
    std::future::poll_fn(|cx| maker.poll_ready(cx)).await?;
    maker.make_connection(target).await
}

#[tokio::test]
async fn pool_is_a_make_connection() {
    let server = EchoServer::start().await;
    let mut pool = Pool::builder()
        .max_size(2)
        .acquire_timeout(LIMIT)
        .build(TcpConnector::new(), server.addr())
        .unwrap();
    for i in 0..3 {
        let mut conn = within(
            LIMIT,
            "make_connection",
            connect_via(&mut pool, server.addr()),
        )
        .await
        .expect("make_connection");
        let msg = format!("made {i}\n");
        assert_eq!(
            echo_round(&mut conn, msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
    }
    assert_eq!(
        server.accepts(),
        1,
        "make_connection checks out pooled connections"
    );
    assert_eq!(pool.stats().acquired, 3);

    let (_port, other) = refused_addr();
    let err = within(LIMIT, "wrong target", connect_via(&mut pool, other))
        .await
        .expect_err("a pool serves only its own target");
    assert!(matches!(err, PoolError::WrongTarget), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// resize
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn resize_down_closes_idle_connections_over_the_new_size() {
    let connector = MemConnector::new();
    let pool = Pool::new(mem_config(4), connector.clone(), "resize").unwrap();
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(pool.get().await.unwrap());
    }
    drop(conns);
    assert_eq!((pool.stats().idle, connector.live()), (4, 4));

    pool.resize(2);
    let s = pool.stats();
    assert_eq!(
        (s.max_size, s.idle, s.total, s.destroyed),
        (2, 2, 2, 2),
        "{s:#?}"
    );
    assert_eq!(
        connector.live(),
        2,
        "idle connections over the new size were closed"
    );

    // Checked-out connections over the size are closed as they come back.
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    pool.resize(1);
    assert_eq!(connector.live(), 2);
    drop(a);
    assert_eq!(connector.live(), 1);
    drop(b);
    let s = pool.stats();
    assert_eq!((s.max_size, s.idle, s.total), (1, 1, 1), "{s:#?}");
    assert_eq!(connector.live(), 1);

    // Growing lets a waiter connect at once.
    let held = pool.get().await.unwrap();
    let waiter = tokio::spawn({
        let p = pool.clone();
        async move { p.get().await.map(|c| c.uses()) }
    });
    assert!(yield_until(1_000, || pool.stats().waiting == 1).await);
    pool.resize(2);
    let uses = within(LIMIT, "waiter after grow", waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uses, 1, "the waiter got a new connection");
    drop(held);
    let s = pool.stats();
    assert_eq!((s.max_size, s.total), (2, 2), "{s:#?}");
    assert_eq!(connector.live(), 2);
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------
// max_connecting
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn max_connecting_bounds_connects_in_flight() {
    let connector = MemConnector::new();
    connector.always(Step::Slow(Duration::from_secs(1)));
    let pool = Pool::new(
        Config {
            max_connecting: 2,
            ..mem_config(8)
        },
        connector.clone(),
        "gate",
    )
    .unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move { p.get().await })
        })
        .collect();
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap().expect("slow connect succeeds"));
    }
    assert_eq!(connector.max_in_flight(), 2, "{connector:?}");
    assert_eq!(pool.stats().created, 6);
    assert_eq!(connector.live(), 6);
}

// ---------------------------------------------------------------------------------------
// Liveness hooks
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn custom_check_rejects_broken_idle_connections_at_checkout() {
    let connector = MemConnector::new();
    let pool = Pool::builder()
        .config(mem_config(2))
        .check(|c: &mut MemConn| c.is_open())
        .build(connector.clone(), "check")
        .unwrap();
    let first = pool.get().await.unwrap();
    let first_id = first.id();
    drop(first);
    let again = pool.get().await.unwrap();
    assert_eq!(again.id(), first_id, "a healthy idle connection is reused");
    drop(again);

    connector.break_all();
    let fresh = pool.get().await.unwrap();
    assert_ne!(
        fresh.id(),
        first_id,
        "the broken connection was not handed out"
    );
    assert!(fresh.is_open());
    let s = pool.stats();
    assert_eq!((s.created, s.destroyed, s.total), (2, 1, 1), "{s:#?}");
    assert_eq!(connector.live(), 1);
}

#[tokio::test(start_paused = true)]
async fn failing_probe_evicts_idle_connections() {
    let connector = MemConnector::new();
    let probes = Arc::new(AtomicUsize::new(0));
    let counted = probes.clone();
    let pool = Pool::builder()
        .config(Config {
            health_check_interval: Some(Duration::from_secs(10)),
            ..mem_config(2)
        })
        .probe(probe_fn(move |c: &mut MemConn| {
            counted.fetch_add(1, SeqCst);
            let open = c.is_open();
            Box::pin(async move {
                if open {
                    Ok(())
                } else {
                    Err(BoxError::from("connection is broken"))
                }
            })
        }))
        .build(connector.clone(), "probe")
        .unwrap();
    let conns = vec![pool.get().await.unwrap(), pool.get().await.unwrap()];
    drop(conns);

    tokio::time::sleep(Duration::from_secs(12)).await;
    let s = pool.stats();
    assert!(
        probes.load(SeqCst) >= 2,
        "both idle connections were probed"
    );
    assert_eq!(
        (s.idle, s.evicted),
        (2, 0),
        "healthy connections stay: {s:#?}"
    );

    connector.break_all();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let s = pool.stats();
    assert_eq!(s.evicted, 2, "{s:#?}");
    assert_eq!((s.idle, s.total), (0, 0), "{s:#?}");
    assert_eq!(connector.live(), 0);
    check_invariants(&s);
}
