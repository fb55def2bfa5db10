//! Connect retries (`Config::connect_retry`) over real loopback sockets: transient
//! failures are retried within `acquire_timeout`, permanent ones are returned at once,
//! and running out of time reports the last connect error.
//!
//! Time is paused: backoff sleeps take no wall time, and refused connects to 127.0.0.1
//! come back at once.

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use marina_core::BoxError;
use marina_pool::{
    ConnectError, ConnectRetry, Manage, Managed, Pool, PoolError, PoolService, RetriesExhausted,
    TcpConnector,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::{Service, ServiceExt, service_fn};

/// An address on 127.0.0.1 where nothing listens (connects are refused) while the
/// returned socket holds its port.
fn refused_addr() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A listener that accepts and holds connections.
async fn live_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A TCP connector whose `n`th connect (from 0) goes to `refused` when `refuse(n)`, else
/// to `live`; counts its connects.
#[derive(Clone)]
struct Scripted {
    live: SocketAddr,
    refused: SocketAddr,
    refuse: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    calls: Arc<AtomicUsize>,
}

impl Scripted {
    fn new(
        live: SocketAddr,
        refused: SocketAddr,
        refuse: impl Fn(usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        Scripted {
            live,
            refused,
            refuse: Arc::new(refuse),
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

impl Service<()> for Scripted {
    type Response = TcpStream;
    type Error = ConnectError;
    type Future = marina_pool::ConnectFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ConnectError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let n = self.calls.fetch_add(1, SeqCst);
        let addr = if (self.refuse)(n) {
            self.refused
        } else {
            self.live
        };
        TcpConnector::new().call(addr)
    }
}

fn builder(retry: ConnectRetry) -> marina_pool::Builder {
    Pool::builder()
        .max_size(2)
        .acquire_timeout(Duration::from_secs(30))
        .health_check_interval(None)
        .no_expiry()
        .connect_retry(retry)
}

#[tokio::test(start_paused = true)]
async fn refused_twice_then_accepted_succeeds_with_retry_always() {
    let (_hold, refused) = refused_addr();
    let connector = Scripted::new(live_addr().await, refused, |n| n < 2);
    let pool = builder(ConnectRetry::Always)
        .build(connector.clone(), ())
        .unwrap();
    let conn = pool.get().await.expect("the third connect succeeds");
    assert_eq!(conn.peer_addr().unwrap(), connector.live);
    assert_eq!(connector.calls(), 3);
    let s = pool.stats();
    assert_eq!(
        (s.failed, s.created, s.total, s.connecting),
        (2, 1, 1, 0),
        "{s:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reached_backend_that_refuses_for_a_while_costs_no_error_by_default() {
    let (_hold, refused) = refused_addr();
    // The first connect succeeds; the next two are refused (a restart); then it is back.
    let connector = Scripted::new(live_addr().await, refused, |n| n == 1 || n == 2);
    let pool = builder(ConnectRetry::default())
        .build(connector.clone(), ())
        .unwrap();
    pool.get().await.expect("first connect").poison();
    let conn = pool.get().await.expect("retried through the refusals");
    assert_eq!(conn.peer_addr().unwrap(), connector.live);
    assert_eq!(connector.calls(), 4);
    assert_eq!(pool.stats().failed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_target_never_reached_fails_at_once_by_default() {
    let (_hold, refused) = refused_addr();
    let connector = Scripted::new(refused, refused, |_| true);
    let pool = builder(ConnectRetry::default())
        .build(connector.clone(), ())
        .unwrap();
    let err = pool.get().await.expect_err("refused");
    let ce = err
        .source()
        .and_then(|s| s.downcast_ref::<ConnectError>())
        .unwrap_or_else(|| panic!("the connector's own error, not a retry wrapper: {err:?}"));
    assert_eq!(ce.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(connector.calls(), 1, "not retried");
    let s = pool.stats();
    assert_eq!((s.failed, s.total, s.connecting), (1, 0, 0), "{s:#?}");
}

#[tokio::test(start_paused = true)]
async fn retry_off_returns_the_first_failure_even_after_a_success() {
    let (_hold, refused) = refused_addr();
    let connector = Scripted::new(live_addr().await, refused, |n| n >= 1);
    let pool = builder(ConnectRetry::Off)
        .build(connector.clone(), ())
        .unwrap();
    pool.get().await.expect("first connect").poison();
    let err = pool.get().await.expect_err("refused");
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(connector.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn running_out_of_time_reports_the_last_connect_error() {
    let (_hold, refused) = refused_addr();
    let connector = Scripted::new(refused, refused, |_| true);
    let pool = builder(ConnectRetry::Always)
        .acquire_timeout(Duration::from_secs(2))
        .build(connector.clone(), ())
        .unwrap();
    let err = pool.get().await.expect_err("always refused");
    assert!(err.is_connect() && !err.is_timeout(), "{err:?}");
    let exhausted = err
        .source()
        .and_then(|s| s.downcast_ref::<RetriesExhausted>())
        .unwrap_or_else(|| panic!("a RetriesExhausted: {err:?}"));
    assert_eq!(exhausted.waited(), Duration::from_secs(2));
    assert!(exhausted.attempts() > 2, "{exhausted:?}");
    assert_eq!(exhausted.attempts() as usize, connector.calls());
    let last = exhausted
        .source()
        .and_then(|s| s.downcast_ref::<ConnectError>())
        .expect("the last connect error is the source");
    assert_eq!(last.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(last.target(), refused.to_string());
    // Each attempt counted; the slot was freed.
    let s = pool.stats();
    assert_eq!(s.failed as usize, connector.calls(), "{s:#?}");
    assert_eq!((s.total, s.connecting, s.timed_out), (0, 0, 0), "{s:#?}");
}

#[derive(Debug)]
struct AuthFailed;

impl std::fmt::Display for AuthFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("password authentication failed")
    }
}

impl std::error::Error for AuthFailed {}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_returned_at_once_with_retry_always() {
    let calls = Arc::new(AtomicUsize::new(0));
    let connector = service_fn({
        let calls = calls.clone();
        move |_: ()| {
            calls.fetch_add(1, SeqCst);
            async { Err::<TcpStream, _>(AuthFailed) }
        }
    });
    let pool = builder(ConnectRetry::Always)
        .acquire_timeout(Duration::from_secs(60))
        .build(connector, ())
        .unwrap();
    // A pool that retried would only fail at the 60 s acquire timeout.
    let err = tokio::time::timeout(Duration::from_secs(5), pool.get())
        .await
        .expect("returned at once, not retried until the acquire timeout")
        .expect_err("fails");
    assert!(err.is_connect(), "{err:?}");
    assert!(err.source().unwrap().is::<AuthFailed>(), "{err:?}");
    assert_eq!(calls.load(SeqCst), 1);
}

/// A manager whose errors say themselves whether they are worth retrying.
struct Judged {
    calls: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Flaky {
    retry: bool,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flaky (retry: {})", self.retry)
    }
}

impl std::error::Error for Flaky {}

impl Manage<()> for Judged {
    type Conn = u32;
    type Error = Flaky;

    async fn connect(&self, _: &()) -> Result<u32, Flaky> {
        match self.calls.fetch_add(1, SeqCst) {
            0 | 1 => Err(Flaky { retry: true }),
            2 => Ok(7),
            _ => Err(Flaky { retry: false }),
        }
    }

    fn is_transient(&self, error: &Flaky) -> bool {
        error.retry
    }
}

#[tokio::test(start_paused = true)]
async fn the_connector_decides_what_is_transient() {
    let calls = Arc::new(AtomicUsize::new(0));
    let pool = builder(ConnectRetry::Always)
        .max_size(1)
        .build(
            Managed::new(Judged {
                calls: calls.clone(),
            }),
            (),
        )
        .unwrap();
    let conn = pool
        .get()
        .await
        .expect("two transient failures, then a client");
    assert_eq!(*conn, 7);
    conn.poison();
    let err = pool.get().await.expect_err("a permanent failure");
    let flaky = err
        .source()
        .and_then(|s| s.downcast_ref::<Flaky>())
        .expect("the manager's error");
    assert!(!flaky.retry);
    assert_eq!(calls.load(SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn pool_service_fails_at_once_for_failover() {
    let calls = Arc::new(AtomicUsize::new(0));
    let connector = service_fn({
        let calls = calls.clone();
        move |_: ()| {
            let n = calls.fetch_add(1, SeqCst);
            async move {
                if n == 0 {
                    // A client that echoes its request.
                    Ok(service_fn(|r: u32| async move { Ok::<_, BoxError>(r) }))
                } else {
                    Err(io::Error::from(io::ErrorKind::ConnectionRefused))
                }
            }
        }
    });
    let pool = builder(ConnectRetry::Always)
        .max_size(1)
        .build(connector, ())
        .unwrap();
    let mut svc = PoolService::new(pool.clone());
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    pool.get().await.unwrap().poison();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(2)
        .await
        .expect_err("refused");
    assert!(marina_core::is_not_sent(&*err), "{err:?}");
    assert_eq!(calls.load(SeqCst), 2, "not retried");
}

#[tokio::test(start_paused = true)]
async fn close_during_backoff_ends_the_checkout_and_frees_the_slot() {
    let (_hold, refused) = refused_addr();
    let connector = Scripted::new(refused, refused, |_| true);
    let pool = builder(ConnectRetry::Always)
        .build(connector.clone(), ())
        .unwrap();
    let get = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    });
    // Paused time: each sleep lets the backoff timer fire.
    while connector.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(pool.stats().connecting, 1);
    tokio::time::timeout(Duration::from_secs(5), pool.close())
        .await
        .expect("close does not wait for the backoff");
    let r = get.await.unwrap();
    assert!(matches!(r, Err(PoolError::Closed)), "{r:?}");
    let s = pool.stats();
    assert_eq!((s.total, s.connecting), (0, 0), "{s:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_checkout_dropped_during_backoff_frees_its_slot() {
    let (_hold, refused) = refused_addr();
    let connector = Scripted::new(refused, refused, |_| true);
    let pool = builder(ConnectRetry::Always)
        .max_size(1)
        .build(connector.clone(), ())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_millis(100), pool.get()).await;
    assert!(r.is_err(), "still retrying: {r:?}");
    assert!(connector.calls() >= 2);
    let s = pool.stats();
    assert_eq!((s.total, s.connecting), (0, 0), "{s:#?}");
}
