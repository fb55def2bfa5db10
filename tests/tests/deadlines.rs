//! No request waits forever: the stack's per-attempt request timeout (on by default),
//! a backend that accepts and never answers (a black hole) is ejected, and the user's
//! own layers sit where the health checks see their failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::Duration;

use integration_tests::{LIMIT, LineServer, LineServerOptions, eventually, split_tag, within};
use marina::core::{BoxError, Request, find};
use marina::health::{HealthConfig, Status};
use marina::{Reply, RequestTimeout, Stack, StackConfig};
use tower::{Layer, Service, ServiceExt};

const TIMEOUT: Duration = Duration::from_millis(300);

async fn send(svc: &marina::StackService<String, String>, line: &str) -> Result<String, BoxError> {
    within(
        LIMIT,
        "a request",
        svc.clone().oneshot(Request::new(line.to_string())),
    )
    .await
    .map(|r| r.into_body())
}

#[tokio::test]
async fn a_black_hole_times_out_is_ejected_and_the_others_keep_serving() {
    let tagged = LineServerOptions {
        tag: true,
        ..LineServerOptions::default()
    };
    let good = [
        LineServer::start(tagged).await,
        LineServer::start(tagged).await,
    ];
    let hole = LineServer::start(LineServerOptions {
        hold: true,
        ..tagged
    })
    .await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([good[0].addr(), hole.addr(), good[1].addr()])
        .request_timeout(TIMEOUT)
        .health(Some(HealthConfig {
            consecutive_failures: 2,
            failure_rate: None,
            base_ejection: Duration::from_secs(120),
            ..HealthConfig::default()
        }))
        .build_line()
        .expect("a valid stack");

    let mut timeouts = 0;
    for i in 0..30 {
        match send(&svc, &format!("r{i}")).await {
            Ok(reply) => {
                let (port, line) = split_tag(&reply).expect("a tagged reply");
                assert_ne!(port, hole.addr().port(), "the black hole answered");
                assert_eq!(line, format!("r{i}"));
            }
            Err(e) => {
                let t = find::<RequestTimeout>(&*e)
                    .unwrap_or_else(|| panic!("not a request timeout: {e}"));
                assert_eq!(t.after, TIMEOUT);
                timeouts += 1;
            }
        }
    }
    // Two timeouts in a row eject the black hole; nothing else failed.
    assert_eq!(timeouts, 2);
    assert!(
        matches!(
            handle.health(hole.addr()).unwrap().status(),
            Status::Ejected { .. }
        ),
        "{}",
        handle.stats()
    );
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
}

#[tokio::test]
async fn a_connection_that_timed_out_mid_reply_is_not_reused() {
    let hole = LineServer::start(LineServerOptions {
        hold: true,
        ..LineServerOptions::default()
    })
    .await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([hole.addr()])
        .request_timeout(TIMEOUT)
        .health(None)
        .failover(None)
        .build_line()
        .expect("a valid stack");
    for line in ["a", "b"] {
        let err = send(&svc, line).await.expect_err("held");
        assert!(find::<RequestTimeout>(&*err).is_some(), "{err}");
    }
    // The held replies ("a", "b") now arrive on the connections that timed out: a
    // reused one would hand them to the next request.
    hole.release();
    assert!(eventually(LIMIT, || hole.lines() == 2).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for line in ["c", "d", "e"] {
        assert_eq!(send(&svc, line).await.expect("a reply"), line);
    }
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
}

#[test]
fn the_request_timeout_is_on_by_default_and_configurable() {
    assert_eq!(marina::DEFAULT_REQUEST_TIMEOUT, Duration::from_secs(15));
    let c = StackConfig::from_toml("endpoints = [\"127.0.0.1:1\"]\nrequest_timeout_ms = 0\n")
        .expect("valid TOML");
    let problems = c.validate();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, "request_timeout_ms");
    let err = Stack::builder::<String>()
        .endpoints(["127.0.0.1:1".parse().unwrap()])
        .request_timeout(Duration::ZERO)
        .validate();
    assert_eq!(err[0].path, "request_timeout_ms");
}

/// A layer of the user's that fails every other request.
#[derive(Clone)]
struct Flaky {
    seen: Arc<AtomicUsize>,
}

impl<S> Layer<S> for Flaky {
    type Service = FlakyService<S>;
    fn layer(&self, inner: S) -> FlakyService<S> {
        FlakyService {
            inner,
            seen: self.seen.clone(),
        }
    }
}

#[derive(Clone)]
struct FlakyService<S> {
    inner: S,
    seen: Arc<AtomicUsize>,
}

impl<S> Service<Request<String>> for FlakyService<S>
where
    S: Service<Request<String>, Response = marina::core::Response<Reply>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = marina::core::Response<Reply>;
    type Error = BoxError;
    type Future = marina::core::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<String>) -> Self::Future {
        let n = self.seen.fetch_add(1, SeqCst);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let reply = fut.await?;
            // The reply, type-erased: the line protocol's String.
            assert!(reply.body.0.is::<String>());
            if n.is_multiple_of(2) {
                Err("refused by the user's layer".into())
            } else {
                Ok(reply)
            }
        })
    }
}

#[tokio::test]
async fn endpoint_layers_sit_inside_the_health_checks() {
    let server = LineServer::start(LineServerOptions::default()).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .endpoint_layer(Flaky { seen: seen.clone() })
        .health(Some(HealthConfig {
            consecutive_failures: 1,
            failure_rate: None,
            base_ejection: Duration::from_secs(120),
            ..HealthConfig::default()
        }))
        .failover(None)
        .failfast_timeout(Duration::from_millis(100))
        .build_line()
        .expect("a valid stack");
    let err = send(&svc, "x")
        .await
        .expect_err("the layer refuses the first");
    assert!(
        err.to_string().contains("refused by the user's layer"),
        "{err}"
    );
    // The health checks saw it: the only backend is ejected.
    assert!(matches!(
        handle.health(server.addr()).unwrap().status(),
        Status::Ejected { .. }
    ));
    assert_eq!(seen.load(SeqCst), 1);
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
}

#[tokio::test]
async fn a_deadline_bounds_the_request_across_failover_attempts() {
    use marina::balance::DeadlineExceeded;
    let holes = [
        LineServer::start(LineServerOptions {
            hold: true,
            ..LineServerOptions::default()
        })
        .await,
        LineServer::start(LineServerOptions {
            hold: true,
            ..LineServerOptions::default()
        })
        .await,
        LineServer::start(LineServerOptions {
            hold: true,
            ..LineServerOptions::default()
        })
        .await,
    ];
    let (svc, handle) = Stack::builder::<String>()
        .endpoints(holes.iter().map(LineServer::addr))
        .request_timeout(Duration::from_millis(400))
        .deadline(Duration::from_millis(500))
        .health(None)
        .build_line()
        .expect("a valid stack");
    // Idempotent, so every timed-out attempt may be sent again: without the deadline
    // the request would last 3 × 400 ms.
    let mut req = Request::new("x".to_string());
    marina::core::Idempotent::mark(&mut req);
    let err = within(LIMIT, "a request", svc.clone().oneshot(req))
        .await
        .expect_err("every backend is a black hole");
    let d = find::<DeadlineExceeded>(&*err).unwrap_or_else(|| panic!("not a deadline: {err}"));
    assert_eq!(d.after, Duration::from_millis(500));
    assert!(d.maybe_sent);
    assert_eq!(d.attempts, 2, "{err}");
    assert_eq!(handle.stats().balance.deadlines_exceeded, 1);
    for h in &holes {
        h.release();
    }
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}

/// A backend that reads each request line, counts it, and closes the connection.
async fn read_and_close() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncBufReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stream).lines();
                if let Ok(Some(_)) = lines.next_line().await {
                    count.fetch_add(1, SeqCst);
                }
                // Dropped: closed without a reply.
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn only_idempotent_requests_are_sent_again_after_they_may_have_been_sent() {
    let (bad, seen) = read_and_close().await;
    let good = LineServer::start(LineServerOptions::default()).await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([bad, good.addr()])
        .health(None)
        .build_line()
        .expect("a valid stack");
    let (mut failed_unmarked, mut ok_marked) = (0, 0);
    for i in 0..30 {
        let mut req = Request::new(format!("r{i}"));
        // Not every other one: round robin over two backends would line the marked
        // requests up with one backend.
        let marked = i % 3 == 0;
        if marked {
            marina::core::Idempotent::mark(&mut req);
        }
        match within(LIMIT, "a request", svc.clone().oneshot(req)).await {
            Ok(r) => {
                assert_eq!(r.into_body(), format!("r{i}"));
                ok_marked += usize::from(marked);
            }
            Err(_) => {
                assert!(!marked, "a marked request failed");
                failed_unmarked += 1;
            }
        }
    }
    assert_eq!(ok_marked, 10, "every marked request succeeded");
    assert!(
        failed_unmarked > 0,
        "no unmarked request reached the bad backend"
    );
    // Each unmarked request that reached the bad backend was delivered exactly once.
    let totals = handle.stats().balance;
    assert_eq!(
        seen.load(SeqCst) as u64,
        failed_unmarked as u64 + totals.sent_retries,
        "{totals:?}"
    );
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}

#[tokio::test]
async fn a_hedge_takes_the_fast_reply() {
    let slow = LineServer::start(LineServerOptions {
        tag: true,
        delay: Duration::from_millis(300),
        ..LineServerOptions::default()
    })
    .await;
    let fast = LineServer::start(LineServerOptions {
        tag: true,
        ..LineServerOptions::default()
    })
    .await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([slow.addr(), fast.addr()])
        .hedge(Duration::from_millis(20))
        .health(None)
        .build_line()
        .expect("a valid stack");
    for i in 0..6 {
        let mut req = Request::new(format!("h{i}"));
        marina::core::Idempotent::mark(&mut req);
        let reply = within(LIMIT, "a request", svc.clone().oneshot(req))
            .await
            .expect("a reply");
        let body = reply.into_body();
        let (port, line) = split_tag(&body).expect("tagged");
        assert_eq!(port, fast.addr().port(), "the slow reply won");
        assert_eq!(line, format!("h{i}"));
    }
    let totals = handle.stats().balance;
    assert!(totals.hedges >= 1 && totals.hedges_won >= 1, "{totals:?}");
    // Unmarked requests are never hedged.
    let before = handle.stats().balance.hedges;
    for i in 0..4 {
        let _ = within(
            LIMIT,
            "a request",
            svc.clone().oneshot(Request::new(format!("u{i}"))),
        )
        .await;
    }
    assert_eq!(handle.stats().balance.hedges, before);
    within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await;
}
