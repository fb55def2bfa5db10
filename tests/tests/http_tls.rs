//! `marina_pool::http::HttpClient` over `marina_pool::tls::TlsConnector`: the protocol
//! follows ALPN (`Protocol::Negotiated`), HTTP/2 connections shared, HTTP/1 otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use integration_tests::LIMIT;
use integration_tests::tls::TestPki;
use marina_pool::http::{HttpClient, Protocol};
use marina_pool::tls::TlsConnector;
use marina_pool::{Pool, TcpConnector};
use tokio::net::TcpListener;
use tower::ServiceExt;

const NAME: &str = "http.test";

/// A TLS server offering `h2` and `http/1.1`: HTTP/2 or HTTP/1 by what ALPN chose.
/// Answers the request's HTTP version; counts TLS connections.
async fn tls_server(pki: &TestPki) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(&[NAME], &["h2", "http/1.1"])));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                c.fetch_add(1, Ordering::Relaxed);
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let v = format!("{:?}", req.version());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(v))))
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, conns)
}

async fn run(alpn: &[&str]) -> (Vec<String>, usize, Vec<Version>) {
    let pki = TestPki::new("marina http test CA");
    let (addr, conns) = tls_server(&pki).await;
    let tls = pki.client().server_name(NAME).unwrap().alpn(alpn.to_vec());
    let client = HttpClient::builder()
        .pool(Pool::builder().max_size(16))
        .protocol(Protocol::Negotiated)
        .build_with::<_, _, Full<Bytes>>(TlsConnector::new(TcpConnector::new(), tls), addr)
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let client = client.clone();
        tasks.spawn(async move {
            let req = Request::get(format!("/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.oneshot(req).await.unwrap();
            let version = resp.version();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (String::from_utf8(body.to_vec()).unwrap(), version)
        });
    }
    let mut bodies = Vec::new();
    let mut versions = Vec::new();
    while let Some(r) = tokio::time::timeout(LIMIT, tasks.join_next())
        .await
        .unwrap()
    {
        let (b, v) = r.unwrap();
        bodies.push(b);
        versions.push(v);
    }
    (bodies, conns.load(Ordering::Relaxed), versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_gives_shared_http2_connections() {
    let (bodies, conns, versions) = run(&["h2", "http/1.1"]).await;
    assert!(bodies.iter().all(|b| b == "HTTP/2.0"), "{bodies:?}");
    assert!(versions.iter().all(|&v| v == Version::HTTP_2));
    // 16 concurrent requests, 200 streams allowed: one connection carries them all.
    assert_eq!(conns, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_http11_gives_http1_connections() {
    let (bodies, conns, _) = run(&["http/1.1"]).await;
    assert!(bodies.iter().all(|b| b == "HTTP/1.1"), "{bodies:?}");
    assert!((1..=16).contains(&conns), "{conns}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_over_a_keyed_pool_of_tls_connections() {
    use hyper_util::service::TowerToHyperService;
    use marina_pool::KeyedPool;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tower::ServiceBuilder;

    let pki = TestPki::new("marina tonic test CA");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(&[NAME], &["h2"])));
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("svc", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let h = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, svc, h) = (acceptor.clone(), service.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                h.fetch_add(1, Ordering::Relaxed);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });

    // Pools keyed by "host:port" (the TLS server name fixed to the certificate's, as the
    // target is an IP address); tonic hands the connector a `Uri` and reads hyper I/O,
    // so the `Uri` becomes its authority and the TLS stream is wrapped in `TokioIo`.
    let tls = pki.client().server_name(NAME).unwrap().alpn(["h2"]);
    let pools: KeyedPool<_, String> = KeyedPool::new(
        Pool::builder().max_size(2),
        TlsConnector::new(TcpConnector::new(), tls),
    )
    .unwrap();
    let connector = ServiceBuilder::new()
        .map_request(|uri: tonic::transport::Uri| uri.authority().unwrap().to_string())
        .map_response(TokioIo::new)
        .service(pools.clone());
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for _ in 0..3 {
        let reply = tokio::time::timeout(
            LIMIT,
            health.check(HealthCheckRequest {
                service: "svc".into(),
            }),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(reply.into_inner().status, 1); // SERVING
    }
    assert_eq!(handshakes.load(Ordering::Relaxed), 1);
    let (target, stats) = pools.stats().pop().unwrap();
    assert_eq!(target, addr.to_string());
    assert_eq!((stats.created, stats.active), (1, 1));
}
