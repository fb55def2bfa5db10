//! Failover over endpoints that are not marina pools: the peers' never-sent errors
//! (hyper-util's legacy client, tonic's `Channel`, tower's `Buffer`) are recognised, and
//! requests that are not `Clone` fail over when their endpoint gives them back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use marina_balance::{Balance, Failover, RoundRobin, never_sent};
use marina_core::{BoxError, NotSent, take_unsent_request};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt, service_fn};

/// An HTTP/1 server answering `hello <path>`.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                        "hello {}",
                        req.uri().path()
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An address nothing listens on (bound, then closed).
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A hyper-util user's first endpoint: one legacy `Client` per backend, behind a
/// request type of their own that is `Clone`.
#[tokio::test]
async fn hyper_util_connect_errors_fail_over() {
    let live = http_server().await;
    let dead = dead_addr().await;
    let endpoints = [dead, live].map(|addr| {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        service_fn(move |path: String| {
            let client = client.clone();
            async move {
                let uri: http::Uri = format!("http://{addr}{path}").parse()?;
                let resp = client.get(uri).await?;
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>(String::from_utf8_lossy(&body).into_owned())
            }
        })
    });
    let mut lb = Balance::from_services(endpoints, RoundRobin::new()).failover(Failover::new());
    for i in 0..8 {
        let got = lb.ready().await.unwrap().call(format!("/{i}")).await;
        assert_eq!(got.unwrap(), format!("hello /{i}"));
    }
    let totals = lb.handle().totals();
    assert!(totals.retries >= 4, "{totals:?}");

    // The classification itself, on hyper-util's own error.
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let err = client
        .get(format!("http://{dead}/").parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.is_connect());
    let err: BoxError = err.into();
    assert!(never_sent(&*err), "{err:?}");
}

/// tonic's `Channel` to a backend that refuses connections.
#[tokio::test]
async fn tonic_connect_errors_are_never_sent() {
    let dead = dead_addr().await;
    let mut channel = tonic::transport::Endpoint::from_shared(format!("http://{dead}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let req = http::Request::builder()
        .uri(format!("http://{dead}/grpc.health.v1.Health/Check"))
        .body(tonic::body::Body::empty())
        .unwrap();
    let err: BoxError = match tokio::time::timeout(Duration::from_secs(10), async {
        channel.ready().await?;
        channel.call(req).await.map(|_| ())
    })
    .await
    .expect("the channel answers")
    {
        Ok(()) => panic!("a dead backend answered"),
        Err(e) => e.into(),
    };
    assert!(never_sent(&*err), "{err:?}");
}

/// A service whose readiness fails: tower's `Buffer` reports its worker's error.
#[derive(Clone)]
struct Broken;

impl Service<u32> for Broken {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err("backend gone".into()))
    }

    fn call(&mut self, r: u32) -> Self::Future {
        std::future::ready(Ok(r))
    }
}

#[tokio::test]
async fn buffer_worker_errors_are_never_sent() {
    let mut buffered = tower::buffer::Buffer::new(Broken, 8);
    let err = match buffered.ready().await {
        Ok(svc) => svc.call(1).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(never_sent(&*err), "{err:?}");
}

#[tokio::test]
async fn a_custom_classifier_makes_an_error_never_sent() {
    #[derive(Debug)]
    struct Unreachable;
    impl std::fmt::Display for Unreachable {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("unreachable")
        }
    }
    impl std::error::Error for Unreachable {}

    let endpoints = (0..2u32).map(|n| {
        service_fn(move |r: u32| async move {
            if n == 0 {
                Err::<u32, BoxError>(Unreachable.into())
            } else {
                Ok(r)
            }
        })
    });
    let policy = Failover::new().not_sent_if(|e| e.is::<Unreachable>());
    let mut lb = Balance::from_services(endpoints, RoundRobin::new()).failover(policy);
    for i in 0..6 {
        assert_eq!(lb.ready().await.unwrap().call(i).await.unwrap(), i);
    }
    // Without it, the same error is returned.
    let endpoints = (0..2u32).map(|n| {
        service_fn(move |r: u32| async move {
            if n == 0 {
                Err::<u32, BoxError>(Unreachable.into())
            } else {
                Ok(r)
            }
        })
    });
    let mut lb = Balance::from_services(endpoints, RoundRobin::new()).failover(Failover::new());
    let mut failed = 0;
    for i in 0..6 {
        failed += usize::from(lb.ready().await.unwrap().call(i).await.is_err());
    }
    assert_eq!(failed, 3);
}

/// A request type that is not `Clone`, like a proxy's `http::Request<Incoming>`.
#[derive(Debug)]
struct Upload(Vec<u8>);

#[tokio::test]
async fn requests_that_are_not_clone_fail_over_when_given_back() {
    let endpoints = (0..3u32).map(|n| {
        service_fn(move |req: Upload| async move {
            if n == 0 {
                let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                Err::<usize, BoxError>(NotSent::with_request(refused, req).into())
            } else {
                Ok(req.0.len() * 10 + n as usize)
            }
        })
    });
    let mut lb =
        Balance::from_services(endpoints, RoundRobin::new()).failover_unsent(Failover::new());
    for _ in 0..9 {
        let got = lb
            .ready()
            .await
            .unwrap()
            .call(Upload(vec![0; 4]))
            .await
            .unwrap();
        assert!(got == 41 || got == 42, "{got}");
    }
    assert_eq!(lb.handle().totals().retries, 3);
}

#[tokio::test]
async fn an_error_without_the_request_is_returned_and_one_with_it_keeps_it() {
    // Not given back: nothing to send again.
    let endpoints = (0..2u32).map(|n| {
        service_fn(move |req: Upload| async move {
            if n == 0 {
                Err::<usize, BoxError>(NotSent::new("refused").into())
            } else {
                Ok(req.0.len())
            }
        })
    });
    let mut lb =
        Balance::from_services(endpoints, RoundRobin::new()).failover_unsent(Failover::new());
    let mut failed = 0;
    for _ in 0..4 {
        failed += usize::from(
            lb.ready()
                .await
                .unwrap()
                .call(Upload(vec![1]))
                .await
                .is_err(),
        );
    }
    assert_eq!(failed, 2);

    // Every endpoint refuses: the last error still carries the request for the caller.
    let endpoints = (0..2u32).map(|_| {
        service_fn(move |req: Upload| async move {
            Err::<usize, BoxError>(NotSent::with_request("refused", req).into())
        })
    });
    let mut lb =
        Balance::from_services(endpoints, RoundRobin::new()).failover_unsent(Failover::new());
    let err = lb
        .ready()
        .await
        .unwrap()
        .call(Upload(vec![7, 7]))
        .await
        .unwrap_err();
    let back: Upload = take_unsent_request(&*err).expect("the request comes back");
    assert_eq!(back.0, [7, 7]);
}

/// marina-pool's `PoolService` gives an unsent request back: requests that are not
/// `Clone` fail over from a backend that refuses connections.
#[tokio::test]
async fn pool_services_give_unsent_requests_back() {
    use marina_pool::{Pool, PoolService};
    let live = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                open.push(s);
            }
        });
        a
    };
    let dead = dead_addr().await;
    // A "client" per connection that answers with the upload's length.
    let connector = service_fn(|addr: SocketAddr| async move {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        drop(stream);
        Ok::<_, std::io::Error>(service_fn(|u: Upload| async move {
            Ok::<_, std::io::Error>(u.0.len())
        }))
    });
    let endpoints = [dead, live].map(|addr| {
        let pool = Pool::builder().build(connector, addr).unwrap();
        PoolService::new(pool)
    });
    // The error itself carries the request.
    let mut alone = endpoints[0].clone();
    let err = alone
        .ready()
        .await
        .unwrap()
        .call(Upload(vec![1, 2]))
        .await
        .unwrap_err();
    let back: Upload = take_unsent_request(&*err).expect("given back");
    assert_eq!(back.0, [1, 2]);

    let mut lb =
        Balance::from_services(endpoints, RoundRobin::new()).failover_unsent(Failover::new());
    for _ in 0..6 {
        let got = lb
            .ready()
            .await
            .unwrap()
            .call(Upload(vec![0; 3]))
            .await
            .unwrap();
        assert_eq!(got, 3);
    }
    assert!(lb.handle().totals().retries >= 3);
}
