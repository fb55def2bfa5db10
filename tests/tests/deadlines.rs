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
