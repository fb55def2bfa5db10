//! marina-pool under hyper: `Pooled` as hyper I/O, and a `KeyedPool` as the connector of
//! hyper-util's legacy client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use marina_pool::{KeyedPool, Pool};
use tokio::net::{TcpListener, TcpStream};
use tower::service_fn;

/// An HTTP/1 server answering every request with `hello <path>`; counts TCP accepts.
async fn http_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
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
    (addr, accepts)
}

#[tokio::test]
async fn pooled_tokio_io_speaks_http1_through_hyper() {
    let (addr, accepts) = http_server().await;
    let connector =
        service_fn(
            |addr: SocketAddr| async move { TcpStream::connect(addr).await.map(TokioIo::new) },
        );
    let pool = Pool::builder().max_size(2).build(connector, addr).unwrap();

    let io = pool.get().await.unwrap();
    // hyper-util's `Connection` passes through the guard.
    assert!(!io.connected().is_proxied());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    let driver = tokio::spawn(conn);
    for path in ["/a", "/b"] {
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("hello {path}"));
    }
    assert_eq!(accepts.load(Ordering::Relaxed), 1);
    assert_eq!(pool.stats().active, 1);
    // Dropping the sender ends the connection task, which drops the guard: since hyper
    // shut the I/O down, it is closed rather than reused.
    drop(sender);
    driver.await.unwrap().unwrap();
    let s = pool.stats();
    assert_eq!((s.active, s.released), (0, 1));
    assert_eq!(
        s.total, 0,
        "a connection hyper shut down must not be pooled"
    );
}

#[tokio::test]
async fn keyed_pool_is_a_connector_for_hyper_util_client() {
    let (addr, accepts) = http_server().await;
    let keyed = KeyedPool::new(Pool::builder().max_size(4), HttpConnector::new()).unwrap();
    let client: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(keyed.clone());
    for i in 0..3 {
        let uri: hyper::Uri = format!("http://{addr}/r{i}").parse().unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
            .await
            .unwrap()
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("hello /r{i}"));
    }
    // hyper's own keep-alive reuses the connection it got from our pool.
    assert_eq!(accepts.load(Ordering::Relaxed), 1);
    assert_eq!(keyed.len(), 1);
    let (_, stats) = keyed.stats().pop().unwrap();
    assert_eq!((stats.created, stats.acquired), (1, 1));
}
