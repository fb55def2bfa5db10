//! `TcpConnector`: socket options, `host:port` targets and error messages.

use std::net::SocketAddr;

use marina_pool::{ConnectError, Pool, TcpConnector};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

#[tokio::test]
async fn connects_by_address_and_sets_nodelay_and_keepalive() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut connector = TcpConnector::new();
    let stream = Service::<SocketAddr>::call(&mut connector, addr)
        .await
        .unwrap();
    assert!(stream.nodelay().unwrap());
    assert!(socket2::SockRef::from(&stream).keepalive().unwrap());

    let mut plain = TcpConnector::new().nodelay(false).keepalive(None);
    let stream = Service::<SocketAddr>::call(&mut plain, addr).await.unwrap();
    assert!(!stream.nodelay().unwrap());
    assert!(!socket2::SockRef::from(&stream).keepalive().unwrap());
}

#[tokio::test]
async fn host_port_targets_resolve_and_pool() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = format!("localhost:{port}");
    let pool = Pool::builder()
        .max_size(2)
        .build(TcpConnector::new(), target.clone())
        .unwrap();
    let conn = pool.get().await.unwrap();
    assert_eq!(conn.peer_addr().unwrap().port(), port);
    drop(conn);
    // The pool is a `Service<String>` for its own target.
    let mut svc = pool.clone();
    let again = svc.ready().await.unwrap().call(target).await.unwrap();
    assert_eq!(
        pool.stats().created,
        1,
        "reused, not reconnected: {again:?}"
    );
}

#[tokio::test]
async fn bad_host_port_is_a_typed_error_naming_the_target() {
    let mut connector = TcpConnector::new();
    let err: ConnectError = Service::<String>::call(&mut connector, "no-port-here".to_string())
        .await
        .unwrap_err();
    assert_eq!(err.target(), "no-port-here");
    assert!(err.to_string().contains("no-port-here"), "{err}");
}
