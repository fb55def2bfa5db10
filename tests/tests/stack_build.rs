//! The `Stack` builder as a new user meets it: any protocol through `build`, settings
//! checked at build with the paths a config file uses, and a shutdown that is safe to
//! drop.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::Duration;

use integration_tests::{EchoServer, LIMIT, eventually, within};
use marina::core::{BoxError, BoxFuture, Request};
use marina::limit::Rate;
use marina::{Conn, InvalidConfig, KeyFnBox, ShuttingDown, Stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Service, ServiceExt};

/// A length-prefixed protocol client: a 4-byte big-endian length, then the bytes.
#[derive(Clone)]
struct FrameClient {
    conn: Arc<tokio::sync::Mutex<Conn>>,
    uses: Arc<AtomicUsize>,
}

impl Service<Vec<u8>> for FrameClient {
    type Response = Vec<u8>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Vec<u8>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, frame: Vec<u8>) -> Self::Future {
        let conn = self.conn.clone();
        self.uses.fetch_add(1, SeqCst);
        Box::pin(async move {
            let mut conn = conn.lock().await;
            conn.write_all(&(frame.len() as u32).to_be_bytes()).await?;
            conn.write_all(&frame).await?;
            let len = conn.read_u32().await? as usize;
            let mut reply = vec![0; len];
            conn.read_exact(&mut reply).await?;
            Ok(reply)
        })
    }
}

#[tokio::test]
async fn build_runs_any_protocol_with_a_closure_and_a_check() {
    let servers = [EchoServer::start().await, EchoServer::start().await];
    let made = Arc::new(AtomicUsize::new(0));
    let checked = Arc::new(AtomicUsize::new(0));
    let (m, c) = (made.clone(), checked.clone());
    let (svc, handle) = Stack::builder::<Vec<u8>>()
        .endpoints(servers.iter().map(EchoServer::addr))
        .build(
            move |conn: Conn| {
                m.fetch_add(1, SeqCst);
                async move {
                    Ok(FrameClient {
                        conn: Arc::new(tokio::sync::Mutex::new(conn)),
                        uses: Arc::new(AtomicUsize::new(0)),
                    })
                }
            },
            move |client: &mut FrameClient| {
                c.fetch_add(1, SeqCst);
                // Each client serves at most 3 requests, then is replaced.
                client.uses.load(SeqCst) < 3
            },
        )
        .expect("a valid stack");
    for i in 0..20u8 {
        let reply = within(
            LIMIT,
            "a frame",
            svc.clone().oneshot(Request::new(vec![i; 5])),
        )
        .await
        .expect("a reply");
        assert_eq!(reply.into_body(), vec![i; 5]);
    }
    assert!(checked.load(SeqCst) > 0, "the check was never called");
    // 20 requests, 3 per client at most: at least 7 clients were made.
    assert!(made.load(SeqCst) >= 7, "made {}", made.load(SeqCst));
    let stats = handle.stats();
    assert!(stats.backends.iter().all(|b| b.pool.created > 0), "{stats}");
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
}

fn paths(err: &BoxError) -> BTreeSet<String> {
    let invalid = err
        .downcast_ref::<InvalidConfig>()
        .unwrap_or_else(|| panic!("not an InvalidConfig: {err}"));
    invalid.0.iter().map(|p| p.path.clone()).collect()
}

#[tokio::test]
async fn the_builder_refuses_bad_settings_with_their_paths() {
    let addr = "127.0.0.1:7000".parse().unwrap();
    let key = KeyFnBox::new(|_: &Request<String>| Some("user".into()));
    let err = Stack::builder::<String>()
        .endpoints([addr, addr])
        .panic_threshold(50.0)
        .connect_timeout(Duration::ZERO)
        .concurrency_per_key(key, 0)
        .bandwidth(f64::NAN, 0)
        .rate_limit(Rate::per_second(10))
        .build_line()
        .map(|_| ())
        .expect_err("bad settings build");
    let expected: BTreeSet<String> = [
        "endpoints[1]",
        "health.panic_threshold",
        "connect_timeout_ms",
        "limits.concurrency_per_key[0]",
        "limits.bandwidth_bytes_per_sec",
        "limits.bandwidth_burst",
    ]
    .map(String::from)
    .into();
    assert_eq!(paths(&err), expected, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(
            "health.panic_threshold: must be within 0.0..=1.0 (a share, not a percentage), got 50"
        ),
        "{text}"
    );

    // No endpoint at all.
    let err = Stack::builder::<String>()
        .build_line()
        .map(|_| ())
        .expect_err("no endpoints");
    assert_eq!(paths(&err), ["endpoints".to_string()].into());
}

#[tokio::test]
async fn a_dropped_shutdown_still_closes_the_stack() {
    let server = EchoServer::start().await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .build_line()
        .expect("a valid stack");
    let reply = within(
        LIMIT,
        "a line",
        svc.clone().oneshot(Request::new("hi".into())),
    )
    .await
    .expect("a reply");
    assert_eq!(reply.into_body(), "hi");

    // Started, then dropped at once.
    {
        let shutdown = handle.shutdown(Duration::from_millis(200));
        tokio::pin!(shutdown);
        let _ = futures_poll_once(shutdown.as_mut()).await;
    }
    // New requests are refused, and the pools close all the same.
    let err = svc
        .clone()
        .oneshot(Request::new("late".into()))
        .await
        .expect_err("refused");
    assert!(err.downcast_ref::<ShuttingDown>().is_some(), "{err}");
    assert!(
        eventually(LIMIT, || handle
            .stats()
            .backends
            .iter()
            .all(|b| b.pool.closed))
        .await,
        "pools left open: {}",
        handle.stats()
    );
    assert!(
        eventually(LIMIT, || server.open_connections() == 0).await,
        "server-side connections left open"
    );
}

/// Polls `f` once.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test]
async fn health_and_probe_settings_are_checked_at_build() {
    use marina::health::{ActiveConfig, FailureRate, HealthConfig, TcpConnectProbe};
    let health = HealthConfig {
        failure_rate: Some(FailureRate {
            threshold: 50.0, // meant 50%
            ..FailureRate::default()
        }),
        ..HealthConfig::default()
    };
    let active = ActiveConfig {
        interval: Duration::ZERO, // 730 probe connections a second
        ..ActiveConfig::default()
    };
    let err = Stack::builder::<String>()
        .endpoints(["127.0.0.1:7000".parse().unwrap()])
        .health(Some(health))
        .probe(active, TcpConnectProbe)
        .build_line()
        .map(|_| ())
        .expect_err("bad health settings build");
    let expected: BTreeSet<String> = ["health.failure_rate.threshold", "probe.interval"]
        .map(String::from)
        .into();
    assert_eq!(paths(&err), expected, "{err}");
}

mod validate_matches_build {
    use marina::{Stack, StackConfig};
    use proptest::prelude::*;

    fn opt<T: std::fmt::Debug + Clone + 'static>(
        s: impl Strategy<Value = T> + 'static,
    ) -> impl Strategy<Value = Option<T>> {
        prop_oneof![Just(None), s.prop_map(Some)]
    }

    prop_compose! {
        fn config()(
            endpoints in prop::collection::vec(
                prop_oneof![
                    Just("127.0.0.1:1".to_string()),
                    Just("127.0.0.1:2".to_string()),
                    Just("not an address".to_string()),
                ],
                0..3,
            ),
            picker in opt(prop_oneof![Just("p2c".to_string()), Just("fastest".to_string())]),
            connect in opt(prop_oneof![Just(0u64), Just(500)]),
            min_idle in opt(0usize..4),
            max_size in opt(0usize..4),
            acquire in opt(prop_oneof![Just(0u64), Just(1_000)]),
            panic in opt(prop_oneof![Just(0.5f64), Just(50.0), Just(f64::NAN)]),
            base in opt(prop_oneof![Just(0u64), Just(1_000), Just(900_000)]),
            max in opt(prop_oneof![Just(500u64), Just(300_000), Just(200_000_000)]),
            attempts in opt(0u32..3),
            rate in opt(prop_oneof![Just(0u32), Just(100)]),
            burst in opt(prop_oneof![Just(0u32), Just(10)]),
            bandwidth in opt(prop_oneof![Just(0.0f64), Just(0.5), Just(1e6), Just(f64::INFINITY)]),
            bandwidth_burst in opt(prop_oneof![Just(0u64), Just(65_536)]),
        ) -> StackConfig {
            let mut c = StackConfig { endpoints, picker, connect_timeout_ms: connect, ..StackConfig::default() };
            c.pool.min_idle = min_idle;
            c.pool.max_size = max_size;
            c.pool.acquire_timeout_ms = acquire;
            c.health.panic_threshold = panic;
            c.health.base_ejection_ms = base;
            c.health.max_ejection_ms = max;
            c.failover.max_attempts = attempts;
            c.limits.rate_per_second = rate;
            c.limits.burst = burst;
            c.limits.bandwidth_bytes_per_sec = bandwidth;
            c.limits.bandwidth_burst = bandwidth_burst;
            c
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// `validate()` finds exactly what building refuses: a config it passes builds,
        /// and one it faults does not.
        #[test]
        fn validate_is_empty_iff_the_stack_builds(c in config()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let problems = c.validate();
            let built = rt.block_on(async {
                let built = Stack::from_config::<String>(&c)
                    .map_err(marina::core::BoxError::from)
                    .and_then(|b| b.build_line());
                match built {
                    Ok((_, handle)) => {
                        handle.shutdown(std::time::Duration::from_millis(50)).await;
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            });
            prop_assert_eq!(problems.is_empty(), built.is_ok(), "problems {:?}, build {:?}", problems, built);
        }
    }
}

#[tokio::test]
async fn requests_without_a_key_are_refused_unless_the_stack_says_otherwise() {
    use marina::limit::{MissingKey, WithoutKey};
    let server = EchoServer::start().await;
    let user = || KeyFnBox::new(|r: &Request<String>| r.extensions.get::<String>().cloned());
    for (choice, refused) in [(None, true), (Some(WithoutKey::Unlimited), false)] {
        let mut b = Stack::builder::<String>()
            .endpoints([server.addr()])
            .rate_limit_per_key(user(), Rate::per_second(1_000));
        if let Some(c) = choice {
            b = b.without_key(c);
        }
        let (svc, handle) = b.build_line().expect("a valid stack");
        let out = within(LIMIT, "a request", svc.oneshot(Request::new("anon".into()))).await;
        match out {
            Err(e) if refused => assert!(e.downcast_ref::<MissingKey>().is_some(), "{e}"),
            Ok(r) if !refused => assert_eq!(r.into_body(), "anon"),
            other => panic!("{choice:?}: {other:?}"),
        }
        assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
    }
}

/// The default stack copies no request: a request its pool could not send (a refused
/// connect) comes back whole and goes to the other backend.
#[tokio::test]
async fn refused_connects_fail_over_without_copies() {
    let live = EchoServer::start().await;
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([dead, live.addr()])
        .health(None)
        .build_line()
        .expect("a valid stack");
    for i in 0..8 {
        let reply = within(
            LIMIT,
            "a request",
            svc.clone().oneshot(Request::new(format!("r{i}"))),
        )
        .await
        .expect("failed over");
        assert_eq!(reply.into_body(), format!("r{i}"));
    }
    assert!(handle.stats().balance.retries >= 4, "{}", handle.stats());
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}
