//! Load balancing for tower services: the pickers.
//!
//! A [`Pick`] chooses one of the ready endpoints for a request, through a read-only
//! [`Endpoints`] view (id, weight, load, latency) and the request's
//! [`RouteHint`](marina_core::RouteHint), if the affinity layer set one. Every picker
//! here works in place: no allocation per pick.
//!
//! | picker | chooses | cost per pick |
//! |---|---|---|
//! | [`RoundRobin`] | each endpoint in turn | O(1) |
//! | [`WeightedRoundRobin`] | in proportion to weights, smoothly (nginx's algorithm: exact proportions over every window of Σweights picks) | O(N) |
//! | [`LeastConnections`] | the least loaded (full scan, ties in turn) | O(N) |
//! | [`LeastResponseTime`] | the lowest latency EWMA × (load + 1) (ties in turn) | O(N) |
//! | [`Random`] | uniformly at random | O(1) |
//! | [`PowerOfTwoChoices`] | the less loaded of two distinct random endpoints | O(1) |
//! | [`ConsistentHash`] | by the request's hash: rendezvous for small sets, a hash ring (or a Maglev table) for large ones, optionally bounded load | O(N) / O(log N) (O(1) Maglev) |
//!
//! Random pickers take a seed ([`Random::with_seed`], [`PowerOfTwoChoices::with_seed`])
//! so simulations and tests are reproducible.
//!
//! [`Balance`] drives them: a `Service` over any `tower::discover::Discover`
//! ([`Balance::from_services`] for a fixed list, [`Balance::from_channel`] for a channel
//! of changes), with
//!
//! - a ready set that does not churn, and pending endpoints and discovery driven with
//!   no traffic;
//! - **fail fast**: [`NoReadyEndpoints`] when nothing is ready within
//!   `failfast_timeout`;
//! - **failover** ([`Balance::failover`]): a request that never reached its endpoint
//!   (an error marked [`NotSent`](marina_core::NotSent), as marina-pool's `PoolService`
//!   marks connect and checkout failures) goes to another endpoint, within
//!   `max_attempts` and a [`RetryBudget`];
//! - a **panic threshold** ([`Balance::panic_threshold`]): below 50% healthy endpoints
//!   (as reported by marina-health through an
//!   [`EjectionGate`](marina_core::EjectionGate)), route over all of them;
//! - per-endpoint stats and totals ([`BalanceHandle`]), route hints
//!   ([`Balance::route_hint`]), weights from discovery keys ([`Balance::weights`]) or
//!   services ([`Weighted`]), and a [`BalanceLayer`].
//!
//! Endpoint services need not implement `tower::load::Load`: the balancer counts each
//! endpoint's requests in flight and measures its response times itself, and every
//! picker reads those.
//!
//! # Examples
//!
//! ```
//! use marina_balance::{Endpoints, Pick, PowerOfTwoChoices, RoundRobin};
//! use marina_core::EndpointId;
//! use std::time::Duration;
//!
//! /// Three endpoints with in-flight counts.
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
//! ```
#![forbid(unsafe_code)]

mod balance;
mod failover;
mod layer;
mod pick;
mod shared;
mod weighted;

pub use balance::{
    Balance, BalanceHandle, BalanceTotals, EndpointSnapshot, NoReadyEndpoints, ResponseFuture,
};
pub use failover::{Failover, RetryBudget, never_sent};
pub use layer::{BalanceLayer, ChangeStream};
pub use shared::{Shared, SharedFuture};
pub use weighted::Weighted;

pub use pick::{
    ConsistentHash, Endpoints, LeastConnections, LeastResponseTime, Pick, PowerOfTwoChoices,
    Random, RoundRobin, WeightedRoundRobin,
};
