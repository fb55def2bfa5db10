//! The pool alone: one echo server, one marina-pool, end to end on loopback.
//!
//! Starts a line echo server on 127.0.0.1, then drives traffic through a
//! [`marina_pool::Pool`] of TCP connections and prints what happened:
//!
//! 1. warm-up to `min_idle`;
//! 2. 16 tasks × 25 lines each over a pool of at most 4 connections (tasks queue FIFO);
//! 3. the server restarts, dropping every connection: the pool notices the stale idle
//!    connections at checkout and reconnects, so no request fails;
//! 4. graceful close.
//!
//! Run it with `cargo run --example pool`. Set `RUST_LOG=marina_pool=debug` to see the
//! pool's events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use marina_core::BoxError;
use marina_pool::{Pool, PoolStats, TcpConnector, TcpPool};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A line echo server that can drop every connection (a restart) on demand.
struct EchoServer {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    restart: watch::Sender<u64>,
}

impl EchoServer {
    async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepts = Arc::new(AtomicUsize::new(0));
        let (restart, generation) = watch::channel(0u64);
        let counter = accepts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let mut generation = generation.clone();
                generation.mark_unchanged();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    loop {
                        tokio::select! {
                            _ = generation.changed() => return, // "restart": drop the connection
                            line = lines.next_line() => match line {
                                Ok(Some(line)) => {
                                    if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                                        return;
                                    }
                                }
                                _ => return,
                            },
                        }
                    }
                });
            }
        });
        Ok(EchoServer {
            addr,
            accepts,
            restart,
        })
    }

    /// Drops every open connection, as a restarted server would.
    fn restart(&self) {
        self.restart.send_modify(|g| *g += 1);
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::Relaxed)
    }
}

/// Sends `line` over a pooled connection and checks the echo.
///
/// The exchange is bracketed by `mark_broken` / `mark_healthy`: if anything interrupts
/// it (an error, a garbled reply, the task being cancelled), the connection is closed
/// instead of going back to the pool out of step with the protocol. The I/O goes
/// through the guard (`&mut conn`), so an error or EOF also marks it broken.
async fn round_trip(pool: &TcpPool, line: &str) -> Result<(), BoxError> {
    let mut conn = pool.get().await?;
    conn.mark_broken();
    conn.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    BufReader::new(&mut conn).read_line(&mut reply).await?;
    if reply.trim_end() != line {
        return Err(format!("garbled echo: sent {line:?}, got {reply:?}").into());
    }
    conn.mark_healthy();
    Ok(())
}

/// An error with its sources, as `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn print_stats(phase: &str, s: &PoolStats) {
    println!(
        "  [{phase}] pool: total {} (idle {}, active {}), connecting {}, waiting {}",
        s.total, s.idle, s.active, s.connecting, s.waiting
    );
    println!(
        "  [{phase}] counters: created {}, acquired {}, released {}, destroyed {}, evicted {}, timed out {}, failed {}",
        s.created, s.acquired, s.released, s.destroyed, s.evicted, s.timed_out, s.failed
    );
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let server = EchoServer::start().await?;
    println!("echo server listening on {}", server.addr);

    let pool = Pool::builder()
        .min_idle(2)
        .max_size(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .idle_timeout(Duration::from_secs(60))
        .name("echo")
        .build(TcpConnector::new(), server.addr)?;

    println!("\n1. warm-up to min_idle = 2");
    pool.ready_min().await?;
    print_stats("warm-up", &pool.stats());

    println!("\n2. 16 tasks x 25 lines over at most 4 connections");
    let (tasks, lines) = (16, 25);
    let mut set = JoinSet::new();
    for t in 0..tasks {
        let pool = pool.clone();
        set.spawn(async move {
            for i in 0..lines {
                round_trip(&pool, &format!("task {t} line {i}")).await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    let mut failures = 0;
    while let Some(r) = set.join_next().await {
        if let Err(e) = r? {
            failures += 1;
            eprintln!("  request failed: {}", chain(&*e));
        }
    }
    let s = pool.stats();
    println!(
        "  {} echoes checked, {failures} tasks failed, {} TCP connects to the server",
        tasks * lines,
        server.accepts()
    );
    print_stats("traffic", &s);
    assert!(
        s.total <= 4,
        "the pool never holds more than max_size connections"
    );

    println!("\n3. the server restarts and drops every connection");
    let before = pool.stats().destroyed;
    server.restart();
    // Give the client sockets a moment to see the server's FIN.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut ok = 0;
    for i in 0..20 {
        match round_trip(&pool, &format!("after restart {i}")).await {
            Ok(()) => ok += 1,
            Err(e) => eprintln!("  request failed: {}", chain(&*e)),
        }
    }
    let s = pool.stats();
    println!(
        "  {ok}/20 requests succeeded; {} stale connections closed at checkout",
        s.destroyed - before
    );
    print_stats("restart", &s);

    println!("\n4. graceful close");
    pool.close().await;
    let s = pool.stats();
    print_stats("closed", &s);
    println!(
        "  get() after close: {}",
        pool.get()
            .await
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string())
    );
    for c in pool.stats().connections {
        println!("  leftover connection {c:?}");
    }
    println!(
        "\ndone: {} echoes, {} connects, nothing left open",
        tasks * lines + ok,
        server.accepts()
    );
    Ok(())
}
