//! The small shared vocabulary of marina.
//!
//! marina's crates (pool, health, balance, affinity, limit) meet only through the types
//! in this crate, so each one stays usable alone. Depend on it directly when your own
//! code speaks that vocabulary: an endpoint service that marks its failures
//! [`NotSent`], a request type that carries a [`RouteHint`], a [`Probe`] for the pool
//! or the health checks. Through the umbrella crate it is `marina::core`.
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina-core = "0.1"
//! ```
//!
//! # Cargo features
//!
//! | feature | enables |
//! |---|---|
//! | *(none)* | marina-core has no optional features (default: none). It depends only on tokio's clock, `http` (for [`Extensions`]) and a SipHash implementation. |
//!
//! # Examples
//!
//! A user meets this crate's types at the edges of a stack. An endpoint that could not
//! connect says so with [`NotSent`] and hands the request back
//! ([`NotSent::with_request`]), so a balancer may send it elsewhere — or the caller
//! gets it back, here a request that is not `Clone`:
//!
//! ```
//! use marina_core::{BoxError, NotSent, Request, is_not_sent, take_unsent_request};
//! use std::io;
//!
//! struct Upload(Vec<u8>); // a streaming body, say: not Clone
//!
//! // An endpoint whose connection was refused: nothing was sent.
//! fn send(req: Request<Upload>) -> Result<(), BoxError> {
//!     let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
//!     Err(NotSent::with_request(refused, req).into())
//! }
//!
//! let err = send(Request::new(Upload(vec![1, 2, 3]))).unwrap_err();
//! assert!(is_not_sent(&*err)); // safe to send to another endpoint
//! let back: Request<Upload> = take_unsent_request(&*err).expect("handed back");
//! assert_eq!(back.body.0, [1, 2, 3]);
//! ```
//!
//! A [`RouteHint`] travels in the request's extensions: the affinity layer (or your
//! code) puts it there, the balancer reads it, routes by it, and reports the endpoint
//! it chose through it — clones of a hint share that report:
//!
//! ```
//! use marina_core::{EndpointId, HasExtensions, HintTarget, Request, RouteHint};
//!
//! // Route this user's requests by a consistent hash of the user name.
//! let hint = RouteHint::hash(marina_core::stable_hash("alice"));
//! let mut req = Request::new("GET /cart".to_string());
//! req.extensions_mut().insert(hint.clone());
//!
//! // What a balancer does with it.
//! let seen = req.extensions().get::<RouteHint>().expect("a hint");
//! assert!(matches!(seen.target(), HintTarget::Hash(_)));
//! seen.report_chosen(EndpointId(7));
//!
//! // The layer that set the hint learns where the request went.
//! assert_eq!(hint.chosen(), Some(EndpointId(7)));
//! ```
//!
//! # What is here
//!
//! - [`BoxError`]: the error type of layers that add failures of their own. Callers
//!   downcast it to the small named error structs each crate exports.
//! - [`RouteHint`] and [`EndpointId`]: where a request would like to go (written by the
//!   affinity layer, read by the balancer), and a stable id for an endpoint's key.
//! - [`NotSent`]: marks an error that happened before the request was sent (connect
//!   refused, pool checkout timeout), so a balancer may safely send it elsewhere;
//!   [`find`] reaches a named error through such wrappers.
//! - [`Idempotent`]: marks a request that is safe to send twice, so a balancer may
//!   retry it after it may have been sent, or hedge it (only where told to read it).
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
//!
//! # Cancel safety
//!
//! The crate runs no I/O of its own: its one future, [`WaitThenCall`], is the layers'
//! response future. Dropped while it waits for admission, it drops the wait (and with
//! it the request, unsent; a rate-limit cell or a concurrency slot goes back as that
//! wait's own future says); dropped while it calls, it drops the inner future and then
//! what admission gave it (a permit, a slot), so nothing is held past the drop.
//! A [`Probe`]'s future is dropped when it outlasts the timeout its runner gives it;
//! the pool then closes the connection it probed instead of reusing it half way
//! through an exchange. The values layers pass each other ([`RouteHint`], [`NotSent`],
//! [`Idempotent`]) are plain data: dropping them at any point is fine.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod ext;
mod future;
mod gate;
mod idempotent;
mod key;
mod probe;
mod route;

pub use error::{NotSent, find, is_not_sent, take_unsent_request};
pub use ext::{Extensions, HasExtensions, Request, Response};
pub use future::{PolledAfterCompletion, WaitThenCall, after_completion};
pub use gate::{EjectionGate, GateMember};
pub use idempotent::Idempotent;
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
