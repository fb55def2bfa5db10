//! `StackBuilder::connector`: every connection the stack opens goes through the user's
//! connector, within the connect timeout; its streams are checked at checkout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use marina::core::Request;
use marina::{Conn, Stack};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// A line echo server on 127.0.0.1; with `one_shot`, it closes each connection after
/// its first reply. Counts the connections it accepted.
async fn server(one_shot: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if w.write_all(format!("{l}\n").as_bytes()).await.is_err() || one_shot {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A connector over TCP that counts its connects.
fn counting(
    opened: Arc<AtomicUsize>,
) -> impl tower::Service<
    SocketAddr,
    Response = TcpStream,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TcpStream>> + Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |addr: SocketAddr| {
        opened.fetch_add(1, Relaxed);
        TcpStream::connect(addr)
    })
}

#[tokio::test]
async fn every_connection_goes_through_the_connector() {
    let (a, accepted_a) = server(false).await;
    let (b, accepted_b) = server(false).await;
    let opened = Arc::new(AtomicUsize::new(0));
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([a, b])
        .connector(counting(opened.clone()))
        .build_line()
        .unwrap();
    for i in 0..20 {
        let reply = svc
            .clone()
            .oneshot(Request::new(format!("x{i}")))
            .await
            .unwrap();
        assert_eq!(reply.into_body(), format!("x{i}"));
    }
    let created: u64 = handle.stats().backends.iter().map(|b| b.pool.created).sum();
    assert!(created >= 2, "{created}");
    // Give the servers a moment to count the last accepts.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let accepted = accepted_a.load(Relaxed) + accepted_b.load(Relaxed);
    assert_eq!(
        opened.load(Relaxed),
        accepted,
        "a connection bypassed the connector"
    );
    assert_eq!(created as usize, accepted);
    assert_eq!(handle.shutdown(Duration::from_secs(1)).await, 0);
}

#[tokio::test]
async fn a_closed_custom_stream_is_not_reused() {
    // The server hangs up after each reply: the checkout check (a read that does not
    // wait) sees the end of stream, and the next request gets a new connection instead
    // of failing on the dead one.
    let (a, accepted) = server(true).await;
    let opened = Arc::new(AtomicUsize::new(0));
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([a])
        .pool(marina::pool::Config {
            min_idle: 0,
            ..marina::pool::Config::balanced()
        })
        .failover(None)
        .connector(counting(opened.clone()))
        .build_line()
        .unwrap();
    for i in 0..5 {
        let reply = svc
            .clone()
            .oneshot(Request::new(format!("x{i}")))
            .await
            .unwrap();
        assert_eq!(reply.into_body(), format!("x{i}"));
        // The FIN arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(opened.load(Relaxed), 5);
    assert_eq!(accepted.load(Relaxed), 5);
    handle.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_custom_connect_is_bounded_by_the_connect_timeout() {
    let hung =
        tower::service_fn(|_: SocketAddr| std::future::pending::<std::io::Result<TcpStream>>());
    let (svc, handle) = Stack::builder::<String>()
        .endpoints(["127.0.0.1:9".parse().unwrap()])
        .pool(marina::pool::Config {
            min_idle: 0,
            ..marina::pool::Config::balanced()
        })
        .failover(None)
        .connect_timeout(Duration::from_millis(300))
        .connector(hung)
        .build_line()
        .unwrap();
    let start = tokio::time::Instant::now();
    let err = svc
        .oneshot(Request::new("x".to_string()))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    let mut timed_out = false;
    while let Some(e) = source {
        timed_out |= e.is::<marina::pool::ConnectTimeout>() || e.to_string().contains("timed out");
        source = e.source();
    }
    assert!(timed_out, "{err}");
    handle.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_custom_stream_has_no_tcp_socket() {
    let (a, _) = server(false).await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([a])
        .connector(counting(Arc::new(AtomicUsize::new(0))))
        .build(
            |mut conn: Conn| async move {
                let t = conn.get_mut();
                assert!(t.try_tcp().is_none());
                assert!(!t.is_tls());
                assert!(
                    t.custom()
                        .is_some_and(|c| c.downcast_mut::<TcpStream>().is_some())
                );
                assert!(t.is_open());
                Ok(marina::line::LineClient::new(conn))
            },
            |c: &mut marina::line::LineClient<Conn>| {
                c.is_open_with_mut(|io| io.get_mut().is_open())
            },
        )
        .unwrap();
    let reply = svc.oneshot(Request::new("x".to_string())).await.unwrap();
    assert_eq!(reply.into_body(), "x");
    handle.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn tcp_on_a_custom_stream_panics() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, _) = server(false).await;
        let s = TcpStream::connect(a).await.unwrap();
        let t = marina::Transport::Custom(marina::CustomStream::new(s));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = t.tcp();
        }));
        assert!(r.is_err());
    });
}
