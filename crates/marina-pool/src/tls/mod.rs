//! TLS for pooled connections: [`TlsConnector`] wraps any connector whose connections
//! are tokio streams ([`TcpConnector`](crate::TcpConnector), a connector of your own)
//! and hands out [`TlsStream`]s, so anything that pools a `TcpConnector` pools a TLS
//! one: [`Pool`](crate::Pool), [`KeyedPool`](crate::KeyedPool), marina-limit's
//! `BandwidthLimit`.
//!
//! - **Settings** in a [`TlsConfig`]: the trusted roots (a CA file or PEM bytes,
//!   a `RootCertStore`, the system's roots with the `tls-native-roots` feature, or a
//!   whole `rustls::ClientConfig` of your own), ALPN ([`TlsConfig::alpn`]), and an
//!   optional fixed server name. Cheap to clone: connectors and pools share one
//!   `ClientConfig`, and with it rustls's session cache, so reconnects to a backend
//!   resume their TLS session (a shorter handshake).
//! - **Server name**: the name the server's certificate must carry comes from the
//!   target ([`TlsTarget`]: the host of a `"host:port"` string, the IP address of a
//!   `SocketAddr`), unless [`TlsConfig::server_name`] fixes one (backends addressed by
//!   IP whose certificates name a host).
//! - **Timeouts**: the handshake is part of the connector's future, so a pool's
//!   `connect_timeout` covers the TCP connect and the handshake together (a server that
//!   accepts and never answers the handshake is a
//!   [`ConnectTimeout`](crate::ConnectTimeout)).
//! - **Errors**: a failed handshake is a [`TlsError`] (its source the rustls error: an
//!   unknown issuer, a name mismatch, …), and the inner connector's errors pass through
//!   unchanged. Both are connect errors: a pool reports them as
//!   [`PoolError::Connect`](crate::PoolError::Connect), and
//!   [`PoolService`](crate::PoolService) marks them
//!   [`NotSent`](marina_core::NotSent), so a balancer's failover sends the request to
//!   another backend. A certificate error is permanent (reported at once, not retried
//!   by [`ConnectRetry`](crate::ConnectRetry)); a reset during the handshake is
//!   transient, like a refused connect.
//! - **Stale connections**: the pool's default check sees through `TlsStream<TcpStream>`
//!   to the socket ([`is_open`]), and reads TLS records that arrived while the
//!   connection was idle (TLS 1.3 session tickets) without mistaking them for a reply
//!   nobody read; a peer's `close_notify`, FIN or RST closes the connection.
//! - **ALPN**: set the protocols offered with [`TlsConfig::alpn`]; read the one the
//!   server chose from the stream (`stream.get_ref().1.alpn_protocol()`, or
//!   [`alpn_protocol`]).
//!
//! # Why ring
//!
//! rustls needs a crypto provider. The configurations this module builds
//! ([`TlsConfig::with_roots`], [`TlsConfig::from_ca_file`], …) use *ring*: it builds with
//! a C compiler alone (aws-lc-rs, rustls's default, builds the much larger AWS-LC C
//! library, with CMake on some platforms and NASM on Windows), compiles in a fraction
//! of the time, and covers every cipher suite and key exchange a TLS 1.2/1.3 backend
//! negotiates today. The provider is named explicitly
//! (`ClientConfig::builder_with_provider`), so a program that also links aws-lc-rs
//! through another crate does not panic on an ambiguous process-wide default, and its
//! key exchanges are offered X25519 first (ring's own list starts with P-384, which
//! ring computes about 4 times slower: docs/BENCHMARKS.md, "TLS connects").
//!
//! What ring lacks is post-quantum key exchange (X25519MLKEM768) and FIPS validation;
//! rustls 0.23.48 marks `rustls::crypto::ring::default_provider` deprecated for the
//! first. Where either matters, build a `rustls::ClientConfig` with aws-lc-rs (add
//! `rustls` with its `aws_lc_rs` feature to your own dependencies) and pass it to
//! [`TlsConfig::new`]: the connector, the checks and the errors work with any provider,
//! and this crate compiles no second provider in.
//!
//! # Examples
//!
//! A pool of TLS connections to one backend, trusting a private CA:
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use marina_pool::tls::{TlsConfig, TlsConnector};
//! use marina_pool::{Pool, TcpConnector};
//! use tokio::io::AsyncWriteExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let tls = TlsConfig::from_ca_file("ca.pem")?
//!     .server_name("backend.internal")? // the backends are addressed by IP
//!     .alpn(["http/1.1"]);
//! let backend = SocketAddr::from(([10, 0, 0, 7], 443));
//! let pool = Pool::builder()
//!     .max_size(16)
//!     .connect_timeout(std::time::Duration::from_secs(2)) // TCP connect + handshake
//!     .build(TlsConnector::new(TcpConnector::new(), tls), backend)?;
//! let mut conn = pool.get().await?; // a TlsStream<TcpStream>, checked for staleness
//! conn.write_all(b"ping\n").await?;
//! # Ok(()) }
//! ```
//!
//! Keyed by `"host:port"` (the server name is each target's host), under a bandwidth
//! limit:
//!
//! ```
//! use marina_pool::tls::{TlsConfig, TlsConnector};
//! use marina_pool::{KeyedPool, Pool, TcpConnector};
//! # fn roots() -> rustls::RootCertStore { rustls::RootCertStore::empty() }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_pool::PoolError> {
//! let tls = TlsConfig::with_roots(roots());
//! let connector = TlsConnector::new(TcpConnector::new(), tls);
//! let pools: KeyedPool<_, String> = KeyedPool::new(Pool::builder().max_size(8), connector)?;
//! // The pool of one target: its connections verify "api.example.com".
//! let api = pools.pool(&"api.example.com:443".to_string())?;
//! # drop(api);
//! # Ok(()) }
//! ```

mod config;
mod connector;
mod error;

pub use config::{TlsConfig, TlsConfigError};
pub use connector::{TlsConnectFuture, TlsConnector, TlsTarget};
pub use error::TlsError;

/// The client side of a TLS connection over `IO` (tokio-rustls's): `get_ref()` gives
/// `(&IO, &rustls::ClientConnection)`, the socket and the session (negotiated ALPN
/// protocol, version, peer certificates).
pub use tokio_rustls::client::TlsStream;

/// The rustls crate, for building a [`ClientConfig`](rustls::ClientConfig) or a
/// [`RootCertStore`](rustls::RootCertStore) of your own with the same version.
pub use rustls;

use std::io;

use tokio::net::TcpStream;

/// Whether an idle TLS connection over TCP can be reused: what
/// [`socket_is_open`](crate::socket_is_open) checks of the socket (no FIN, no RST, no
/// unread bytes), seen through TLS. Records that arrived while the connection was idle
/// are read and processed without waiting: handshake messages the server sends after
/// the handshake (TLS 1.3 session tickets, key updates) leave the connection usable;
/// application data nobody asked for, a `close_notify`, EOF or an error mean it is not.
///
/// The pool's default check for `TlsStream<TcpStream>`. No I/O unless bytes or EOF
/// wait on the socket, and then only non-blocking reads straight from the socket (not
/// through tokio's readiness, which may not have seen them yet).
///
/// ```
/// use marina_pool::tls::{TlsStream, is_open};
/// use tokio::net::TcpStream;
///
/// /// A pool check for TLS streams behind a wrapper of your own.
/// fn check(wrapped: &mut Box<TlsStream<TcpStream>>) -> bool {
///     is_open(wrapped)
/// }
/// # let _ = check;
/// ```
pub fn is_open(stream: &mut TlsStream<TcpStream>) -> bool {
    let (tcp, session) = stream.get_mut();
    // Plaintext already decrypted and left unread, or the peer's close_notify seen.
    if !usable(session.process_new_packets()) {
        return false;
    }
    if crate::socket_is_open(tcp) {
        return true;
    }
    // Bytes (or EOF) wait on the socket: hand them to rustls until the socket would
    // block. Bounded: each round reads what is there now.
    let sock = socket2::SockRef::from(&*tcp);
    for _ in 0..64 {
        match session.read_tls(&mut &*sock) {
            Ok(0) => return false, // EOF
            Ok(_) => {
                if !usable(session.process_new_packets()) {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    // Still more records after 64 reads: not an idle connection.
    false
}

/// The session after processing: no error, no data waiting, not closed by the peer.
fn usable(state: Result<rustls::IoState, rustls::Error>) -> bool {
    state.is_ok_and(|s| s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed())
}

/// The protocol the server chose by ALPN (`b"h2"`, `b"http/1.1"`), if any.
pub fn alpn_protocol<IO>(stream: &TlsStream<IO>) -> Option<&[u8]> {
    stream.get_ref().1.alpn_protocol()
}
