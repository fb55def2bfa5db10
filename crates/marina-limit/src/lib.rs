//! Resource limits for tower services: they protect a backend fleet from a caller (and
//! a caller from itself), in front of any service.
//!
//! - [`RateLimitLayer`]: request rate, with governor's GCRA on tokio's clock
//!   ([`TokioClock`]: monotonic across cores, follows paused time). Global (one quota;
//!   `poll_ready` backpressure in `Wait` mode) or keyed by any
//!   [`KeyExtractor`](marina_core::KeyExtractor) (per user, per client IP) with a
//!   bounded, swept key table. Over the limit: [`RateLimited`] with the exact
//!   `retry_after`, or a bounded wait ([`OnLimit`]), first come, first served: each
//!   waiter reserves its cell on arrival.
//! - [`ConcurrencyPerKeyLayer`]: requests in flight per key — at most so many per
//!   user, or per client IP (one layer for each); over the limit:
//!   [`ConnectionLimit`], or a bounded wait.
//! - In both per-key limiters a request without a key is refused with [`MissingKey`],
//!   unless the layer's `without_key` lets it through unlimited or limits all such
//!   requests together as one key of their own ([`WithoutKey`]).
//! - [`BandwidthLimit`]: wraps a connector; its connections are throttled in bytes/s
//!   with a burst, per connection or shared, charged before the bytes move in small
//!   chunks; a [`MinRate`] cuts off slow peers ([`TooSlow`]).
//!
//! Each has a handle with stats (admitted and refused counts, current rate against the
//! limit, top keys, bandwidth used). Errors are small structs, downcastable from the
//! `BoxError` the services return.
//!
//! Every setting documents its unit and range, and is checked where it is given: a
//! value out of range (a rate of 0, a NaN bandwidth, an empty key table) is never
//! clamped or ignored. The constructors and setters named `try_` return it as an
//! [`InvalidLimit`] naming the setting (`rate_per_second: must be above 0, got 0`),
//! for values read from a user's settings; the others panic with the same message.
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina-limit = "0.1"
//! ```
//!
//! # Cargo features
//!
//! | feature | enables |
//! |---|---|
//! | `metrics` | counters, gauges and a histogram per limiter through the [`metrics`](https://docs.rs/metrics) facade (see [Metrics](#metrics)) |
//!
//! No feature is on by default; every limiter is always built.
//!
//! # Examples
//!
//! A rate limit in front of a service: 100 requests a second in bursts of up to 10,
//! and a request over the limit waits for its turn (up to 1 s) instead of failing:
//!
//! ```
//! use std::time::Duration;
//! use marina_limit::{OnLimit, Rate, RateLimitLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! let backend = service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req * 2) });
//! let limit = RateLimitLayer::global(Rate::per_second(100).burst(10))
//!     .on_limit(OnLimit::Wait { max: Duration::from_secs(1) });
//! let mut svc = ServiceBuilder::new().layer(limit).service(backend);
//!
//! let start = tokio::time::Instant::now();
//! for i in 0..20 {
//!     assert_eq!(svc.ready().await?.call(i).await?, i * 2);
//! }
//! // The first 10 at once, then one every 10 ms.
//! assert_eq!(start.elapsed(), Duration::from_millis(100));
//! # Ok(()) }
//! ```
//!
//! Clones of `svc` (one per task) share its quota: see [`RateLimit`]'s "Sharing".
//!
//! Per-user rate and concurrency limits in front of a service, the user read from a
//! header:
//!
//! ```
//! use marina_core::HeaderKey;
//! use marina_limit::{ConcurrencyPerKeyLayer, Rate, RateLimitLayer, RateLimited};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let backend = service_fn(|_req: http::Request<()>| async { Ok::<_, std::io::Error>("ok") });
//! let mut svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::keyed(HeaderKey::new("x-user"), Rate::per_second(10).burst(2)))
//!     .layer(ConcurrencyPerKeyLayer::new(HeaderKey::new("x-user"), 5))
//!     .service(backend);
//! let req = || http::Request::builder().header("x-user", "alice").body(()).unwrap();
//! assert!(svc.ready().await.unwrap().call(req()).await.is_ok());
//! assert!(svc.ready().await.unwrap().call(req()).await.is_ok());
//! // The burst of 2 is spent: the third waits 100 ms or fails.
//! let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
//! assert!(err.downcast_ref::<RateLimited>().is_some());
//! # }
//! ```
//!
//! Limits read from settings, refused with the setting's name rather than a panic:
//!
//! ```
//! use marina_limit::{InvalidLimit, Rate, RateLimitLayer};
//!
//! fn rate_limit(per_second: u32, burst: u32) -> Result<RateLimitLayer, InvalidLimit> {
//!     Ok(RateLimitLayer::global(Rate::try_per_second(per_second)?.try_burst(burst)?))
//! }
//! assert!(rate_limit(100, 20).is_ok());
//! let err = rate_limit(100, 0).unwrap_err();
//! assert_eq!((err.field, err.message.as_str()), ("burst", "must be above 0, got 0"));
//! ```
//!
//! # Cancel safety
//!
//! Every future here can be dropped at any point (a client gone, a timeout) without
//! leaking a slot or a cell:
//!
//! - A rate limit's futures ([`ResponseFuture`], [`KeyedFuture`]) and a global
//!   [`RateLimit`] waiting in `poll_ready`: a request dropped while waiting for its
//!   turn gives its reserved cell back if no later request has reserved one since;
//!   otherwise that cell goes unused and nobody behind it waits longer. Dropped after
//!   admission, the inner request is cancelled and the cell stays spent.
//! - [`ConcurrencyFuture`]: dropping it releases the key's slot (and, while waiting
//!   for one, drops the request unsent).
//! - [`Throttled`] connections: a read or write waiting for its bandwidth budget has
//!   charged nothing, and bytes charged but not moved are refunded, so their reads
//!   and writes are as cancel safe as the connection's own. [`ConnectFuture`]
//!   dropped drops the inner connect.
//!
//! # Metrics
//!
//! With the `metrics` feature, each limiter records through the
//! [`metrics`](https://docs.rs/metrics) facade, into whatever recorder the
//! application installs (a Prometheus exporter, say), labelled with the limiter's
//! name: `limiter`, set with `name(..)` on [`RateLimitLayer`](RateLimitLayer::name),
//! [`ConcurrencyPerKeyLayer`](ConcurrencyPerKeyLayer::name) and
//! [`BandwidthLimit`](BandwidthLimit::name). The defaults suit a stack with one of
//! each: `rate` (a global rate limit), `rate_per_key` (a keyed one),
//! `concurrency_per_key` and `bandwidth`; name them when a stack has two of a kind.
//!
//! Label values are bounded: the limiter's name and a fixed `outcome` or `reason`.
//! **A user's key (user id, client IP, API key) is never a label value**, so the
//! number of series does not grow with the number of users; per-key figures are in
//! the handles' stats ([`ConcurrencyStats::top`], [`ConcurrencyHandle::in_flight`]).
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `marina_limit_admitted_total` | counter | `limiter` | requests let through (at once, or after waiting their turn) |
//! | `marina_limit_rate_limited_total` | counter | `limiter`, `outcome` = `rejected` \| `delayed` | requests over a rate limit: refused with [`RateLimited`] (`rejected`), or given a later place in line in [`OnLimit::Wait`] mode (`delayed`; admitted when their turn comes, also counted in `admitted`) |
//! | `marina_limit_concurrency_refused_total` | counter | `limiter` | requests refused with [`ConnectionLimit`]: their key had its maximum in flight (at once, or after waiting for a slot) |
//! | `marina_limit_refused_total` | counter | `limiter`, `reason` = `missing_key` \| `too_many_keys` | keyed limiters' refusals for the key: none found ([`MissingKey`]), or no room for a new one ([`TooManyKeys`], [`TooManyActiveKeys`]) |
//! | `marina_limit_in_flight` | gauge | `limiter` | requests holding a slot of a per-key concurrency limit now |
//! | `marina_limit_active_keys` | gauge | `limiter` | keys a keyed limiter tracks now: a keyed rate limit's keys whose quota has not replenished, a concurrency limit's keys with requests in flight or waiting |
//! | `marina_limit_bandwidth_bytes_total` | counter | `limiter` | bytes moved through a bandwidth limit's budgets (the directions it limits) |
//! | `marina_limit_bandwidth_throttled_seconds` | histogram | `limiter` | each wait of a read or write for its budget, in seconds; the sum is the total throttled time |
//!
//! Which limiter records what: a rate limit, `admitted` and `rate_limited` (and, keyed,
//! `refused` and `active_keys`); a per-key concurrency limit, `admitted`,
//! `concurrency_refused`, `refused`, `in_flight` and `active_keys`; a bandwidth limit,
//! the two `bandwidth` metrics.
//!
//! **Install the recorder before building the limiters.** A limiter takes its metric
//! handles once, when it is built (and again when it is named); handles taken before
//! a recorder is installed record nothing, ever. Every series a limiter records exists,
//! at 0, as soon as it is built.
//!
//! # Hashing
//!
//! Keyed limits are keyed by what clients send (user ids, IPs, API keys), so their
//! key tables hash with std's randomly seeded SipHash, which crafted colliding keys
//! cannot degrade into linear scans; a keyed check costs 1.10× governor's own keyed
//! limiter (docs/BENCHMARKS.md). A faster hash without that protection would save some
//! tens of instructions a check.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bandwidth;
mod clock;
mod concurrency;
mod instruments;
mod invalid;
mod keyless;
mod rate;
mod store;

pub use bandwidth::{BandwidthLimit, Bucket, ConnectFuture, MinRate, Throttled, TooSlow};
pub use clock::TokioClock;
pub use concurrency::{
    ConcurrencyHandle, ConcurrencyPerKey, ConcurrencyPerKeyLayer, ConcurrencyStats,
    ConnectionLimit, ResponseFuture as ConcurrencyFuture, TooManyActiveKeys,
};
pub use invalid::InvalidLimit;
pub use keyless::{MissingKey, WithoutKey};
pub use rate::{
    Global, KeyTable, Keyed, KeyedFuture, OnLimit, Rate, RateLimit, RateLimitHandle,
    RateLimitLayer, RateLimited, RateStats, ResponseFuture, TooManyKeys,
};
pub use store::WhenKeysFull;
