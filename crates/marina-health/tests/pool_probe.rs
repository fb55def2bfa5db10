//! Connection-level use: marina-pool validates idle connections with a probe from this
//! crate (through marina-core's `Probe` trait; the crates do not depend on each other).

use std::time::Duration;

use marina_health::LineProbe;
use marina_pool::{Pool, TcpConnector};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A line server answering each line with `reply(line)`.
async fn line_server(reply: fn(&str) -> String) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{}\n", reply(&line)).as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn pool_with_probe(addr: std::net::SocketAddr) -> Pool<TcpConnector, std::net::SocketAddr> {
    Pool::builder()
        .max_size(1)
        .health_check_interval(Duration::from_millis(20))
        .probe::<TcpStream, _>(LineProbe::new("ping", "ping"))
        .build(TcpConnector::new(), addr)
        .unwrap()
}

#[tokio::test]
async fn idle_connections_that_answer_the_probe_are_kept() {
    let addr = line_server(|l| l.to_string()).await;
    let pool = pool_with_probe(addr).await;
    let first = pool.get().await.unwrap().id();
    // Several health-check rounds pass over the idle connection.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let s = pool.stats();
    assert_eq!((s.total, s.evicted), (1, 0), "{s:?}");
    let conn = pool.get().await.unwrap();
    assert_eq!(
        conn.id(),
        first,
        "the probed connection is reused, still in step"
    );
}

#[tokio::test]
async fn idle_connections_that_answer_wrong_are_evicted() {
    let addr = line_server(|_| "garbage".to_string()).await;
    let pool = pool_with_probe(addr).await;
    drop(pool.get().await.unwrap());
    let mut evicted = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if pool.stats().evicted >= 1 {
            evicted = true;
            break;
        }
    }
    assert!(
        evicted,
        "the failing probe closed the idle connection: {:?}",
        pool.stats()
    );
    assert_eq!(pool.stats().total, 0);
}
