//! The line protocol over raw bytes (`build_line_bytes`, `BytesLineClient`) against
//! real loopback echo servers, and how the `String` flavour treats a reply that is
//! not UTF-8.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use integration_tests::EchoServer;
use marina::Stack;
use marina::core::Request;
use marina::line::{BytesLineClient, LineClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceExt};

#[tokio::test]
async fn the_bytes_stack_round_trips_lines_that_are_not_utf8() {
    let a = EchoServer::start().await;
    let b = EchoServer::start().await;
    let (mut svc, handle) = Stack::builder::<Bytes>()
        .endpoints([a.addr(), b.addr()])
        .build_line_bytes()
        .unwrap();
    for i in 0..20u8 {
        let line = Bytes::from(vec![0xff, 0xfe, b'a' + i, b'x']);
        let reply = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(line.clone()))
            .await
            .unwrap();
        assert_eq!(reply.into_body(), line);
    }
    // A request holding '\n' is refused before it is sent, with a typed error.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(Bytes::from_static(b"two\nlines")))
        .await
        .unwrap_err();
    let io = err.downcast_ref::<io::Error>().expect("an io::Error");
    assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
    // Both backends took requests; none of them counted the bad one.
    let stats = handle.stats();
    assert_eq!(stats.backends.len(), 2);
    handle.shutdown(Duration::from_secs(1)).await;
}

/// A server that answers every line with the same bytes that are not UTF-8.
async fn garbage_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(b"\xc3\x28\n").await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_reply_that_is_not_utf8_fails_the_string_client_and_breaks_it_but_not_the_bytes_one() {
    let addr = garbage_server().await;
    let mut text = LineClient::new(TcpStream::connect(addr).await.unwrap());
    let err = text
        .ready()
        .await
        .unwrap()
        .call("hello".to_string())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(!text.is_usable(), "a garbage reply is not trusted again");

    let mut raw = BytesLineClient::new(TcpStream::connect(addr).await.unwrap());
    for _ in 0..3 {
        let reply = raw
            .ready()
            .await
            .unwrap()
            .call(Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(reply, Bytes::from_static(b"\xc3\x28"));
    }
    assert!(raw.is_usable());
}
