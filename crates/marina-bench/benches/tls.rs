//! What a TLS connection costs marina's pools: connects per second and the time of one
//! connect through `marina_pool::tls::TlsConnector` (TCP connect + TLS 1.3 handshake,
//! rustls with *ring*, ECDSA P-256 certificate from rcgen) beside a plain
//! `TcpConnector` connect, against a loopback rustls server on its own thread and
//! runtime, in the same run.
//!
//! - `tcp`: `TcpConnector` alone;
//! - `tls full`: a full handshake each time (session resumption off in the client);
//! - `tls resumed`: the default `TlsConfig`, whose session cache resumes the session a
//!   previous connect to the same server left (what a pool's reconnects get);
//! - `tls full, P-384 first`: a full handshake with rustls's own ring configuration
//!   (`ClientConfig::builder_with_provider(ring::default_provider())`), which offers a
//!   P-384 key share first; `TlsConfig::with_roots` offers X25519 first.
//!
//! Each connect ends when the first byte the server writes after its handshake has been
//! read (so the client has also processed the server's session tickets, as a pooled
//! connection does on its first reply); the connection is then closed. Each row connects
//! `--connects` times one after another (default 300); rows run interleaved `--reps`
//! times (default 5); the table shows each row's median wall time per connect, its
//! min–max over the reps, and the CPU time per connect of the whole process (client and
//! server threads, from `/proc/self/task/*/schedstat`: steadier than wall time on a
//! shared machine).
//!
//! ```text
//! cargo bench -p marina-bench --bench tls -- [--connects N] [--reps R]
//! ```
//!
//! Without `--bench` in its arguments (as under `cargo test --benches`) it runs every row
//! once, briefly, and fails on an error.

// A benchmark measures real wall time, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use marina_pool::TcpConnector;
use marina_pool::tls::{TlsConfig, TlsConnector, rustls};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ROWS: [&str; 4] = ["tcp", "tls full", "tls resumed", "tls full, P-384 first"];

fn main() -> Result<(), BoxError> {
    let argv: Vec<String> = std::env::args().collect();
    let full = argv.iter().any(|a| a == "--bench");
    let arg = |name: &str, default: usize| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (connects, reps) = if full {
        (arg("--connects", 300), arg("--reps", 5))
    } else {
        (5, 1)
    };

    // A self-signed certificate for 127.0.0.1, trusted by the client.
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])?.self_signed(&key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    #[allow(deprecated)] // ring's provider: see marina_pool::tls ("Why ring").
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx
                .send((tls.local_addr().unwrap(), tcp.local_addr().unwrap()))
                .unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = tcp.accept().await {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = s.write_all(b"!").await;
                        let _ = s.read(&mut [0; 1]).await; // until the client closes
                    });
                }
            });
            while let Ok((s, _)) = tls.accept().await {
                let _ = s.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(s).await {
                        let _ = s.write_all(b"!").await;
                        let _ = s.flush().await;
                        let _ = s.read(&mut [0; 1]).await; // until the client closes
                    }
                });
            }
        });
    });
    let (tls_addr, tcp_addr) = addr_rx.recv()?;

    let resumed = TlsConfig::with_roots(roots.clone());
    let mut no_resumption = (**resumed.client_config()).clone();
    no_resumption.resumption = rustls::client::Resumption::disabled();
    let full_config = TlsConfig::new(no_resumption.clone());
    #[allow(deprecated)]
    let ring_default = Arc::new(rustls::crypto::ring::default_provider());
    let mut p384_first = rustls::ClientConfig::builder_with_provider(ring_default)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    p384_first.resumption = rustls::client::Resumption::disabled();
    let p384_first = TlsConfig::new(p384_first);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
    let mut resumptions = 0usize;
    rt.block_on(async {
        for _ in 0..reps {
            for (i, row) in ROWS.iter().enumerate() {
                let (start, cpu0) = (Instant::now(), cpu_ns());
                for _ in 0..connects {
                    match *row {
                        "tcp" => first_byte(TcpConnector::new().oneshot(tcp_addr).await?).await?,
                        "tls full" => first_byte(connect(&full_config, tls_addr).await?).await?,
                        "tls full, P-384 first" => {
                            first_byte(connect(&p384_first, tls_addr).await?).await?
                        }
                        _ => {
                            let conn = connect(&resumed, tls_addr).await?;
                            let kind = conn.get_ref().1.handshake_kind();
                            if kind == Some(rustls::HandshakeKind::Resumed) {
                                resumptions += 1;
                            }
                            first_byte(conn).await?
                        }
                    }
                }
                times[i].push(start.elapsed().as_secs_f64() * 1e6 / connects as f64);
                if let (Some(a), Some(b)) = (cpu0, cpu_ns()) {
                    cpu[i].push((b - a) as f64 / 1e3 / connects as f64);
                }
            }
        }
        Ok::<_, BoxError>(())
    })?;

    println!(
        "\n{resumptions} of {} `tls resumed` connects resumed a session",
        connects * reps
    );
    println!("\n| row | µs per connect (median) | min–max | CPU µs per connect | connects/s |");
    println!("|---|---|---|---|---|");
    for ((row, t), c) in ROWS.iter().zip(&mut times).zip(&mut cpu) {
        t.sort_by(f64::total_cmp);
        c.sort_by(f64::total_cmp);
        let median = t[t.len() / 2];
        let cpu = c
            .get(c.len() / 2)
            .map_or("–".to_string(), |c| format!("{c:.0}"));
        println!(
            "| {row} | {median:.0} | {:.0}–{:.0} | {cpu} | {:.0} |",
            t[0],
            t[t.len() - 1],
            1e6 / median
        );
    }
    Ok(())
}

async fn connect(
    tls: &TlsConfig,
    addr: SocketAddr,
) -> Result<marina_pool::tls::TlsStream<tokio::net::TcpStream>, BoxError> {
    TlsConnector::new(TcpConnector::new(), tls.clone())
        .oneshot(addr)
        .await
}

/// Reads the byte the server writes first, then closes the connection.
async fn first_byte(mut conn: impl AsyncRead + Unpin) -> Result<(), BoxError> {
    let mut byte = [0; 1];
    conn.read_exact(&mut byte).await?;
    Ok(())
}

/// CPU time of every thread of the process so far, ns (Linux).
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}
