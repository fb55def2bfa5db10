//! Load balancing for tower services: one `Service` in front of many endpoints, choosing
//! among the ready ones with a pluggable picker.
//!
//! [`Balance`] takes its endpoints from a list ([`Balance::from_services`]), a channel
//! of changes ([`Balance::from_channel`]) or any `tower::discover::Discover`. The
//! endpoints can be any tower services — tonic `Channel`s, hyper clients,
//! marina-pool's `PoolService`s, marina-health's `Health` wrappers around them — and
//! need not implement `tower::load::Load`: the balancer counts each endpoint's
//! requests in flight and measures its response times itself.
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina-balance = "0.1"
//! # or, to have failover recognise hyper-util's connect errors:
//! # marina-balance = { version = "0.1", features = ["hyper-util"] }
//! ```
//!
//! # Cargo features
//!
//! Default: none. None adds API. `hyper-util`, `tonic` and `buffer` teach
//! [`never_sent`] (the default failover policy) to recognise another client's "the
//! request never left" errors; `metrics` records the balancer's figures.
//!
//! | feature | enables |
//! |---|---|
//! | `hyper-util` | hyper-util's legacy client connect errors (`Error::is_connect`) count as never sent |
//! | `tonic` | tonic's `ConnectError` (a `Channel` that could not connect) counts as never sent |
//! | `buffer` | tower `Buffer`'s `Closed` and `ServiceError` (its worker is gone) count as never sent |
//! | `metrics` | counters, gauges and a histogram through the [`metrics`](https://docs.rs/metrics) facade: see [Metrics](#metrics) |
//!
//! # Examples
//!
//! A balancer is a tower service: wait until it is ready, then call it.
//!
//! ```
//! use marina_balance::{Balance, RoundRobin};
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! // Three endpoints; in a real program, tonic Channels, hyper clients or pools.
//! let endpoints = (0..3).map(|n| {
//!     service_fn(move |req: String| async move {
//!         Ok::<_, std::io::Error>(format!("{req} from backend {n}"))
//!     })
//! });
//! let mut lb = Balance::from_services(endpoints, RoundRobin::new());
//! let reply = lb.ready().await?.call("hello".to_string()).await?;
//! assert_eq!(reply, "hello from backend 0");
//! # Ok(()) }
//! ```
//!
//! `Balance` is not `Clone` (one ready set, one picker state). To send from many tasks,
//! make it [`shared`](Balance::shared): a `Clone` handle to the one balancer. Here with
//! [`failover`](Balance::failover) too, so requests that never reached their endpoint
//! (an error marked [`NotSent`](marina_core::NotSent), a refused connect) go to another
//! one:
//!
//! ```
//! use marina_balance::{Balance, Failover, RoundRobin};
//! use marina_core::NotSent;
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! // Backend 0 refuses every connection.
//! let endpoints = (0..3).map(|n| {
//!     service_fn(move |req: String| async move {
//!         if n == 0 {
//!             let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
//!             return Err(NotSent::new(refused));
//!         }
//!         Ok(format!("{req} from backend {n}"))
//!     })
//! });
//! let lb = Balance::from_services(endpoints, RoundRobin::new()).failover(Failover::new());
//! let stats = lb.handle();
//! let lb = lb.shared();
//!
//! let mut tasks = Vec::new();
//! for i in 0..6 {
//!     let lb = lb.clone(); // one balancer, one round robin, six users
//!     tasks.push(tokio::spawn(lb.oneshot(format!("request {i}"))));
//! }
//! for task in tasks {
//!     let reply = task.await??; // none fails...
//!     assert!(!reply.ends_with("backend 0")); // ...and none came from backend 0
//! }
//! assert_eq!(stats.totals().retries, 2); // backend 0's two turns went elsewhere
//! # Ok(()) }
//! ```
//!
//! # What the balancer does
//!
//! A [`Pick`] chooses one of the ready endpoints for a request, through a read-only
//! [`Endpoints`] view (id, weight, load, latency) and the request's
//! [`RouteHint`](marina_core::RouteHint), if the affinity layer set one. Every picker
//! here works in place: no allocation per pick.
//!
//! | picker | chooses | cost per pick |
//! |---|---|---|
//! | [`RoundRobin`] | each endpoint in turn | O(1) |
//! | [`WeightedRoundRobin`] | in proportion to weights: up to 16 endpoints smoothly (nginx's algorithm: exact proportions over every window of Σweights picks), above by earliest deadline first (Envoy's); [`smooth`](WeightedRoundRobin::smooth) or [`edf`](WeightedRoundRobin::edf) at any size | O(N) up to 16, O(log N) above |
//! | [`LeastConnections`] | the least loaded: up to 16 endpoints by a full scan (ties in turn), above the least loaded of 2 random ones (Envoy's and gRPC's default; [`choice_count`](LeastConnections::choice_count)); [`exact`](LeastConnections::exact) scans at any size | O(1) above 16 |
//! | [`LeastResponseTime`] | the lowest latency EWMA × (load + 1), chosen as least connections chooses | O(1) above 16 |
//! | [`Random`] | uniformly at random | O(1) |
//! | [`PowerOfTwoChoices`] | the less loaded of two distinct random endpoints | O(1) |
//! | [`ConsistentHash`] | by the request's hash: rendezvous for small sets, a hash ring (or a Maglev table) for large ones, optionally bounded load | O(N) up to 64, O(1) above |
//!
//! Pickers with state about the set — the ring, the Maglev table, the weighted
//! schedule — follow the balancer's ready set change by change ([`Pick::update`], with a
//! [`SetChange`]): an endpoint that joins or leaves, is ejected or readmitted costs
//! them O(1) to O(log N), never a rebuild under the balancer (the Maglev table, which
//! must be rebuilt, is rebuilt on a thread of its own while requests go through the
//! table in use).
//!
//! Random pickers take a seed ([`Random::with_seed`], [`PowerOfTwoChoices::with_seed`],
//! [`LeastConnections::with_seed`], [`LeastResponseTime::with_seed`]) so simulations
//! and tests are reproducible.
//!
//! Around the picker, [`Balance`] has
//!
//! - a ready set that does not churn, and pending endpoints and discovery driven with
//!   no traffic;
//! - **fail fast**: [`NoReadyEndpoints`] when nothing is ready within
//!   `failfast_timeout`;
//! - **failover** ([`Balance::failover`]): a request that never reached its endpoint
//!   (an error marked [`NotSent`](marina_core::NotSent), as marina-pool's `PoolService`
//!   marks connect and checkout failures) goes to another endpoint, within
//!   `max_attempts` and a [`RetryBudget`]; [`Balance::failover_unsent`] does the same
//!   for requests that are not `Clone`, when the endpoint gives them back with the
//!   error, and [`Balance::failover_copy_idempotent`] copies only the requests marked
//!   idempotent and takes the others back that way (no copy and no allocation per
//!   request that does not fail; what the marina stack uses);
//! - **deadlines, idempotent retries and hedging** (opt-in, see
//!   [`Balance`'s section](Balance#deadlines-retries-and-hedging)): an overall
//!   [`Failover::deadline`] across attempts ([`DeadlineExceeded`]); requests marked
//!   [`Idempotent`](marina_core::Idempotent) (or by [`Balance::idempotent_if`]) also
//!   retried after errors that came after sending, and hedged after a delay
//!   ([`Failover::hedge`]);
//! - **slow start** ([`Balance::slow_start`], opt-in): an endpoint back from an
//!   ejection, or new, gets a share of its picks that ramps up over a window;
//! - a **panic threshold** ([`Balance::panic_threshold`]): below 50% healthy endpoints
//!   (as reported by marina-health through an
//!   [`EjectionGate`](marina_core::EjectionGate)), route over all of them;
//! - per-endpoint stats and totals ([`BalanceHandle`]), route hints
//!   ([`Balance::route_hint`], [`Balance::route_hints_from_extensions`]), weights from
//!   discovery keys ([`Balance::weights`]) or services ([`Weighted`]), and a
//!   [`BalanceLayer`].
//!
//! # Cancel safety
//!
//! Dropping a [`ResponseFuture`] (the caller gave up, a timeout above the balancer
//! fired) drops every attempt's future, which cancels the request at those endpoints,
//! and releases its count at once: the endpoint's requests in flight (what the
//! least-loaded pickers read, [`EndpointSnapshot::in_flight`] and the
//! `marina_balance_in_flight` gauge) go back down, and the attempt counts as
//! cancelled — neither an error nor a latency sample. Nothing starts after the drop:
//! failover attempts, retries and hedges are sent only while the future is polled, so
//! an attempt being readied is abandoned and no new one is sent; the retry budget is
//! not drawn on. What happens to a request already at an endpoint is that endpoint's
//! cancel safety (a pooled connection whose reply was not read to the end is not
//! reused).
//!
//! Dropping the future of `poll_ready` (tower's `ready()`) loses nothing: no endpoint
//! is reserved, and the endpoint for a request is checked again in `call`. A
//! [`SharedFuture`] dropped while it waits for the shared balancer never sent its
//! request. Discovery changes are applied when the balancer is next polled, whoever
//! polls it.
//!
//! # Metrics
//!
//! With the `metrics` feature, the balancer records through the
//! [`metrics`](https://docs.rs/metrics) facade, with handles registered once — the
//! balancer-wide ones when it is built, an endpoint's when discovery adds it — so a
//! request costs a few atomic operations on handles at hand, never a name or label
//! built or looked up.
//!
//! **Install the recorder (a Prometheus exporter, say) before the balancer is built
//! and its endpoints discovered**: handles taken before that are no-ops and stay so.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `marina_balance_requests_total` | counter | `endpoint` | attempts sent to the endpoint (failover attempts and hedges included; cancelled ones too) |
//! | `marina_balance_errors_total` | counter | `endpoint` | of those, the ones that failed |
//! | `marina_balance_in_flight` | gauge | `endpoint` | attempts in flight at the endpoint now |
//! | `marina_balance_request_duration_seconds` | histogram | `endpoint` | response time of the endpoint's timed attempts: one first attempt in 8 (the ones timed for the latency estimate, so no clock is read for the others), every failover attempt and hedge; count rates from `requests_total`, not from this |
//! | `marina_balance_failovers_total` | counter | | requests sent again to another endpoint after an attempt failed (retries of idempotent requests included) |
//! | `marina_balance_failovers_refused_total` | counter | | failover attempts and hedges the [`RetryBudget`] refused |
//! | `marina_balance_hedges_total` | counter | | hedges sent ([`Failover::hedge`]) |
//! | `marina_balance_hedges_won_total` | counter | | of those, the ones whose reply was returned |
//! | `marina_balance_deadline_exceeded_total` | counter | | requests failed with [`DeadlineExceeded`] |
//! | `marina_balance_no_ready_endpoints_total` | counter | | requests failed at once with [`NoReadyEndpoints`] |
//! | `marina_balance_endpoints` | gauge | `state` = `ready`, `unready` | endpoints in the ready set, and the others (connecting, ejected, at a limit) |
//! | `marina_balance_panic_mode` | gauge | | 1 while the [panic threshold](Balance::panic_threshold) is crossed, else 0 |
//!
//! The `endpoint` label is the endpoint's key as [`EndpointSnapshot::key`] shows it
//! (its `Debug` text: `10.0.0.7:8080` for a `SocketAddr`, the index for a
//! `ServiceList`), so its values are as many as the endpoints. An endpoint that
//! discovery removes keeps its series at their last values (its `in_flight` goes back
//! to 0 as its requests complete); added again under the same key, it counts on in
//! the same series. The unlabelled figures and the gauges are summed over the
//! balancers of a process: each balancer adds its own (its endpoints, 1 in panic
//! mode) and takes them back out when dropped.
//!
//! # Tracing
//!
//! When an attempt is sent, the balancer records into the current span
//! ([`tracing::Span::current`], the request's span that the stack opens) the fields
//! `endpoint` (the key as text) and `attempt` (1 for the first attempt, 2 and on for
//! failover attempts and hedges), if that span is enabled and has them; when a hedge
//! loses, `endpoint` names the endpoint that answered. Nothing is logged per request
//! above `DEBUG`. State changes are events: panic mode entered (`WARN`) and left
//! (`INFO`), no endpoint ready within `failfast_timeout` (`WARN`, once until one is
//! ready again, then `INFO`), an endpoint whose readiness failed and was removed
//! (`WARN`); endpoints added and removed by discovery, failovers and hedges are
//! `DEBUG`.
//!
//! # Writing a picker
//!
//! A picker implements [`Pick`]: given the ready endpoints (never none) and the
//! request's hint, it returns an index. To try one without a balancer — in a unit
//! test, or to see how the built-in pickers choose — write an [`Endpoints`] view by
//! hand; only `len` and `id` are required.
//!
//! ```
//! use marina_balance::{Balance, Endpoints, Pick, PowerOfTwoChoices, RoundRobin};
//! use marina_core::{EndpointId, RouteHint};
//!
//! /// Endpoints with their requests in flight.
//! struct View(Vec<(u64, f64)>);
//!
//! impl Endpoints for View {
//!     fn len(&self) -> usize { self.0.len() }
//!     fn id(&self, i: usize) -> EndpointId { EndpointId(self.0[i].0) }
//!     fn load(&self, i: usize) -> f64 { self.0[i].1 }
//! }
//!
//! let view = View(vec![(1, 3.0), (2, 0.0), (3, 7.0)]);
//! let mut rr = RoundRobin::new();
//! let picks: Vec<usize> = (0..6).map(|_| rr.pick(&view, None)).collect();
//! assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
//!
//! // P2C compares two distinct endpoints: the busiest one (index 2) can never win.
//! let mut p2c = PowerOfTwoChoices::with_seed(7);
//! assert!((0..100).all(|_| p2c.pick(&view, None) != 2));
//!
//! /// A picker of your own: the first idle endpoint, else the first one.
//! struct FirstIdle;
//!
//! impl Pick for FirstIdle {
//!     fn pick(&mut self, endpoints: &dyn Endpoints, _hint: Option<&RouteHint>) -> usize {
//!         (0..endpoints.len()).find(|&i| endpoints.load(i) == 0.0).unwrap_or(0)
//!     }
//! }
//!
//! assert_eq!(FirstIdle.pick(&view, None), 1);
//! // A balancer takes it like any other.
//! let endpoints = (0..2).map(|n| tower::service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
//! let lb = Balance::from_services(endpoints, FirstIdle);
//! # drop(lb);
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balance;
mod failover;
mod future;
mod index;
mod layer;
#[cfg(feature = "metrics")]
mod metrics;
mod pick;
mod shared;
mod slow_start;
mod weighted;

pub use balance::{Balance, BalanceHandle, BalanceTotals, EndpointSnapshot, NoReadyEndpoints};
pub use failover::{DeadlineExceeded, Failover, RetryBudget, never_sent};
pub use future::ResponseFuture;
pub use layer::{BalanceLayer, ChangeStream};
pub use shared::{Shared, SharedFuture};
pub use slow_start::SlowStart;
pub use weighted::Weighted;

pub use pick::{
    ConsistentHash, Endpoints, LeastConnections, LeastResponseTime, Pick, PowerOfTwoChoices,
    Random, RoundRobin, SetChange, WeightedRoundRobin,
};
