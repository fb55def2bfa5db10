//! The small shared vocabulary of marina.
//!
//! marina's crates (pool, health, balance, affinity, limit) meet only through the types
//! in this crate, so each one stays usable alone. Its dependencies are tokio's clock and
//! a SipHash implementation.
//!
//! - [`BoxError`]: the error type of layers that add failures of their own. Callers
//!   downcast it to the small named error structs each crate exports.
//! - [`RouteHint`] and [`EndpointId`]: where a request would like to go (written by the
//!   affinity layer, read by the balancer), and a stable id for an endpoint's key.
//! - [`NotSent`]: marks an error that happened before the request was sent (connect
//!   refused, pool checkout timeout), so a balancer may safely send it elsewhere;
//!   [`find`] reaches a named error through such wrappers.
//! - [`EjectionGate`]: links a balancer's panic threshold to its endpoints' health
//!   checks.
//! - [`HasExtensions`], [`Request`] and [`Response`]: where those typed values travel —
//!   `http::Extensions`, on HTTP messages or on marina's wrappers for raw protocols.
//! - [`KeyExtractor`]: reads a session or client key from a request ([`HeaderKey`],
//!   [`CookieKey`], [`ClientIp`] with trusted proxies, or a closure); shared by the
//!   affinity layer and the limits.
//! - [`Probe`]: an asynchronous check of something — a pooled connection or an endpoint —
//!   that returns the measured response time or an error. The pool uses it to validate
//!   idle connections; the health layer uses it for active probes.
//!
//! # Examples
//!
//! A probe that writes a `PING` line on a connection and expects `PONG` back:
//!
//! ```
//! use marina_core::{BoxError, Probe, probe_fn};
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//! use tokio::net::TcpStream;
//!
//! let ping = probe_fn(|conn: &mut TcpStream| {
//!     Box::pin(async move {
//!         conn.write_all(b"PING\n").await?;
//!         let mut line = String::new();
//!         BufReader::new(conn).read_line(&mut line).await?;
//!         if line.trim_end() == "PONG" {
//!             Ok(())
//!         } else {
//!             Err(BoxError::from(format!("unexpected reply {line:?}")))
//!         }
//!     })
//! });
//! # fn assert_probe<P: Probe<TcpStream>>(_: &P) {}
//! # assert_probe(&ping);
//! ```
#![forbid(unsafe_code)]

mod error;
mod ext;
mod gate;
mod key;
mod probe;
mod route;

pub use error::{NotSent, find, is_not_sent, take_unsent_request};
pub use ext::{Extensions, HasExtensions, Request, Response};
pub use gate::{EjectionGate, GateMember};
pub use key::{
    ClientIp, CookieKey, HeaderKey, InvalidIpNet, IpNet, KeyExtractor, MAX_KEY_LEN, PeerAddr,
};
pub use probe::{BoxFuture, Probe, ProbeFn, probe_fn};
pub use route::{EndpointId, HintTarget, PinnedEndpointUnavailable, RouteHint, stable_hash};

/// A type-erased error, as tower uses: `Box<dyn Error + Send + Sync>`.
///
/// Layers that add failures of their own return it, carrying small named error structs;
/// match on them with [`downcast_ref`](std::error::Error#method.downcast_ref).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
