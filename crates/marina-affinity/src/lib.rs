//! Session affinity for tower services: a session stays on its backend while it lives.
//!
//! [`AffinityLayer`] reads a session key from each request with a
//! [`KeyExtractor`](marina_core::KeyExtractor) (a header, a cookie, the client's IP
//! behind trusted proxies, a closure) and routes the request by writing a
//! [`RouteHint`](marina_core::RouteHint) into its extensions, which marina-balance's
//! `Balance` reads (`route_hints_from_extensions`). The balancer reports the endpoint it
//! chose through the same hint, so the layer learns where a new session landed, or
//! that a session moved, without reading responses.
//!
//! # Add it
//!
//! The layer needs a balancer under it that reads its hints; marina-balance's is one:
//!
//! ```toml
//! [dependencies]
//! marina-affinity = "0.1"
//! marina-balance = "0.1"
//! ```
//!
//! # Cargo features
//!
//! | feature | enables |
//! |---|---|
//! | `metrics` | counters and gauges of sessions through the [`metrics`](https://docs.rs/metrics) facade (see [Metrics](#metrics)) |
//!
//! No feature is on by default. [`SessionPool`] builds on marina-pool, which is always a
//! dependency.
//!
//! # Examples
//!
//! The wiring every mode needs: the layer over a `Balance` built with
//! `.route_hints_from_extensions()`. Here a raw protocol, with sticky sessions keyed
//! by a user name carried in the request:
//!
//! ```
//! use marina_affinity::{AffinityLayer, TableConfig};
//! use marina_balance::{Balance, RoundRobin};
//! use marina_core::{Request, Response};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! // Three backends that answer with their number.
//! let backends = (0..3).map(|n| {
//!     service_fn(move |_req: Request<(String, String)>| async move {
//!         Ok::<_, std::io::Error>(Response::new(n))
//!     })
//! });
//! let balance = Balance::from_services(backends, RoundRobin::new()).route_hints_from_extensions();
//! let affinity = AffinityLayer::sticky(
//!     |req: &Request<(String, String)>| Some(req.body.0.clone()), // (user, line)
//!     TableConfig::default(),
//! );
//! let handle = affinity.handle();
//! let mut svc = ServiceBuilder::new().layer(affinity).service(balance);
//! let mut seen = Vec::new();
//! for line in ["a", "b", "c", "d"] {
//!     let req = Request::new(("alice".to_string(), line.to_string()));
//!     seen.push(svc.ready().await?.call(req).await?.body);
//! }
//! assert!(seen.iter().all(|&b| b == seen[0])); // alice stays on one backend
//! assert_eq!(handle.stats().sessions, 1);
//! # Ok(()) }
//! ```
//!
//! HTTP, with signed tokens in a cookie (no server-side state):
//!
//! ```
//! use marina_affinity::{AffinityLayer, IssuedToken, TokenCodec};
//! use marina_balance::{Balance, PowerOfTwoChoices};
//! use marina_core::CookieKey;
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! let backends = (0..3).map(|n| {
//!     service_fn(move |_req: http::Request<()>| async move {
//!         Ok::<_, std::io::Error>(http::Response::new(n))
//!     })
//! });
//! let balance = Balance::from_services(backends, PowerOfTwoChoices::new()).route_hints_from_extensions();
//! let codec = TokenCodec::new(b"keep this secret, 32 bytes long.", Duration::from_secs(3600))?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(AffinityLayer::token(CookieKey::new("route"), codec).new_sessions(true))
//!     .service(balance);
//!
//! // First request: no cookie; the response carries a token to set as the cookie.
//! let resp = svc.ready().await?.call(http::Request::new(())).await?;
//! let backend = *resp.body();
//! let token = resp.extensions().get::<IssuedToken>().expect("a new session").0.clone();
//!
//! // Later requests carrying it reach the same backend.
//! for _ in 0..5 {
//!     let req = http::Request::builder().header("cookie", format!("route={token}")).body(())?;
//!     assert_eq!(*svc.ready().await?.call(req).await?.body(), backend);
//! }
//! # Ok(()) }
//! ```
//!
//! # Modes
//!
//! | mode | state | sessions shared between client instances | when the pinned endpoint is down |
//! |---|---|---|---|
//! | [`sticky`](AffinityLayer::sticky) table | bounded table, idle expiry, sweep | no | re-pin (or `strict`: fail) |
//! | signed [`token`](AffinityLayer::token) | none: the client carries `{endpoint, expiry}` + HMAC | yes | re-pin, new token |
//! | consistent [`hash`](AffinityLayer::hash) | none | yes, for the same endpoint set | the hash maps elsewhere |
//!
//! Also: new sessions for key-less requests ([`AffinityLayer::new_sessions`]: 256-bit
//! ids from the OS CSPRNG, returned as [`NewSession`] in the response's extensions;
//! [`write_session_cookie`] turns it, or an [`IssuedToken`], into a `Set-Cookie`),
//! session-pinned connections over marina-pool ([`SessionPool`]), and stats
//! ([`AffinityHandle`]).
//!
//! # What the balancer under the layer must do
//!
//! The layer writes a hint; it does not route. The service under it must be a balancer
//! that reads the hint from the request's extensions and reports its choice back:
//! marina-balance's `Balance` built with `.route_hints_from_extensions()` (or
//! `.route_hint(..)`), as in the examples above, or the whole stack from `marina::Stack`, which wires
//! it. Over anything else the stack still works, but sessions are silently not
//! pinned. So the layer watches for it: if the first 8 requests that carried a hint
//! complete with no choice reported and none ever was, it logs one `tracing` warning
//! ("session affinity is doing nothing: no balancer has read this AffinityLayer's
//! route hints …") and sets [`AffinityStats::hint_unread`];
//! [`AffinityStats::unrouted`] counts the requests whose hint went unread. Seeing
//! either means: add `.route_hints_from_extensions()` to the balancer. See
//! [`AffinityLayer`]'s "Wiring".
//!
//! # Cancel safety
//!
//! Every future here can be dropped at any point (a client gone, a timeout) and leaves
//! no session half-made:
//!
//! - [`ResponseFuture`] (the layer's calls): dropping it cancels the inner request; a
//!   session it would have created or moved is left as it was (not pinned, not
//!   re-pinned), and no token is issued.
//! - [`SessionPool::acquire`]: dropped while waiting for the pool, the new session is
//!   not created; dropped while waiting for the session's turn on its connection,
//!   nothing changes.
//! - A [`SessionStore`]'s fetch future must be as safe to drop (see its docs).
//!
//! # Metrics
//!
//! With the `metrics` feature, the layer records through the
//! [`metrics`](https://docs.rs/metrics) facade, into whatever recorder the application
//! installs (a Prometheus exporter, say). None has a label: a session key is never a
//! label value, so the number of series stays fixed however many sessions there are.
//! The counters are the figures of [`AffinityStats`], summed over every affinity layer
//! of the process.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `marina_affinity_sessions` | gauge | | sessions in sticky tables now (token and hash modes keep none) |
//! | `marina_affinity_sessions_created_total` | counter | | sessions created: pinned for the first time, or issued a first token |
//! | `marina_affinity_sessions_repinned_total` | counter | | sessions moved to another endpoint because theirs was unavailable |
//! | `marina_affinity_sessions_expired_total` | counter | | sessions forgotten after their idle timeout |
//! | `marina_affinity_sessions_purged_total` | counter | | sessions forgotten to make room for new ones (table full, [`WhenFull::PurgeOldest`]) |
//! | `marina_affinity_table_full_total` | counter | | new sessions refused because the table was full ([`WhenFull::Refuse`]) |
//! | `marina_affinity_rejected_tokens_total` | counter | | session tokens that did not check out (forged, expired, garbled) and were replaced |
//! | `marina_affinity_unrouted_requests_total` | counter | | requests whose route hint no balancer read (see "What the balancer under the layer must do") |
//! | `marina_affinity_miswired_layers` | gauge | | affinity layers whose hints no balancer has read ([`AffinityStats::hint_unread`]) |
//!
//! **Install the recorder before building the layer.** The layer takes its metric
//! handles once, when it is built ([`AffinityLayer::sticky`], [`token`](AffinityLayer::token),
//! [`hash`](AffinityLayer::hash)); handles taken before a recorder is installed record
//! nothing, ever. Every metric above exists, at 0, as soon as a layer is built.
//!
//! With or without the feature, `tracing` tells of state changes: a WARN when the
//! sticky table first finds itself full (once, until it is down to 90% of its
//! capacity again; fields `max_sessions`, `when_full`), a WARN when no balancer reads the layer's hints, and
//! a DEBUG event per re-pinned session. When a session is re-pinned the layer records
//! `repinned = true` into the current span, the request's span that `marina::Stack`
//! opens (`marina.request`); nothing is logged per request at INFO or above.
//!
//! # Hashing
//!
//! Session keys come from clients (cookies, headers, user ids), so the sticky table's
//! maps hash them with std's randomly seeded SipHash: a client that crafts colliding
//! keys cannot turn lookups into linear scans (hash flooding). A faster hash without
//! that protection (foldhash, ahash, FxHash) would save some tens of instructions a
//! request; it is left out for that reason. The shard is chosen with a fixed-key hash
//! ([`marina_core::stable_hash`]): at worst crafted keys share one shard's lock, which
//! costs contention, never complexity. Endpoint ids are hashes of discovery keys,
//! which clients do not choose.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod instruments;
mod service;
mod session;
mod store;
mod table;
mod token;

pub use service::{
    Affinity, AffinityHandle, AffinityLayer, AffinityStats, IssuedToken, NewSession,
    ResponseFuture, SessionTableFull, write_session_cookie,
};
pub use session::{
    SessionConn, SessionError, SessionPool, SessionSnapshot, TooManySessions, new_session_id,
};
pub use store::{Lookup, SessionStore, StoreFuture};
pub use table::{SessionInfo, TableConfig, WhenFull};
pub use token::{TOKEN_LEN, Token, TokenCodec, WeakKey};
