//! The `Pick` trait and the pickers.
//!
//! The stateless pickers live here; the others in a file each: [`least`] (least
//! connections, least response time), [`weighted`] (weighted round robin), [`hash`]
//! with [`ring`] and [`maglev`] (consistent hashing).

use std::fmt;
use std::time::Duration;

use marina_core::{EndpointId, RouteHint};

mod hash;
mod least;
mod maglev;
mod ring;
mod weighted;

pub use hash::ConsistentHash;
pub(crate) use hash::rendezvous_score;
pub use least::{LeastConnections, LeastResponseTime};
pub use weighted::WeightedRoundRobin;

/// A read-only view of the endpoints a picker chooses among, by index `0..len()`.
///
/// Only `len` and `id` are required; weight defaults to 1, load to 0 and latency to
/// unknown, so a view exposes what it tracks.
pub trait Endpoints {
    /// How many endpoints there are (at least 1 when a picker is asked).
    fn len(&self) -> usize;

    /// True when there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoint's stable id (hashed from its discovery key).
    fn id(&self, i: usize) -> EndpointId;

    /// Its weight, at least 1 (default 1).
    fn weight(&self, _i: usize) -> u32 {
        1
    }

    /// Its load: requests in flight, or any `tower::load::Load` metric (default 0).
    fn load(&self, _i: usize) -> f64 {
        0.0
    }

    /// The sum of [`load`](Self::load) over the endpoints. The default adds them up
    /// (O(N)); a view that keeps a running total returns it at once, as a balancer does
    /// for a picker that [reads it](Pick::reads_total_load). Read by
    /// [`ConsistentHash::bounded_load`].
    fn total_load(&self) -> f64 {
        (0..self.len()).map(|i| self.load(i)).sum()
    }

    /// Its response-time EWMA, if known.
    fn latency(&self, _i: usize) -> Option<Duration> {
        None
    }

    /// A number that changes whenever the endpoint set (ids or order) changes, if the
    /// view tracks one. Pickers with per-set state ([`ConsistentHash`]'s ring or Maglev
    /// table, [`WeightedRoundRobin`]) then check it in O(1) instead of comparing every
    /// id, and know whether the changes [`Pick::update`] reported brought them up to
    /// date.
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// One change to the set of endpoints a picker chooses among, as
/// [`Pick::update`] reports it.
///
/// The set is an indexed list that changes one endpoint at a time, the way a balancer's
/// ready set does: an endpoint joins at the end, or one leaves and the last endpoint
/// takes its place (a swap-remove). Every other endpoint keeps its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetChange {
    /// An endpoint joined, at `index`: the last index of the view after the change.
    Added {
        /// Its index (`len() - 1` of the view after the change).
        index: usize,
    },
    /// The endpoint `id` at `index` left. The endpoint that was last before the change
    /// now sits at `index`, unless `index` was the last index (`index == len()` of the
    /// view after the change).
    Removed {
        /// Where it was.
        index: usize,
        /// Its id (it is no longer in the view).
        id: EndpointId,
    },
}

/// Chooses an endpoint for one request.
///
/// A picker with state about the set of endpoints (a ring, a schedule) can follow the
/// set's changes one at a time through [`update`](Self::update), which a
/// [`Balance`](crate::Balance) calls for each endpoint that joins or leaves its ready
/// set, so that no change costs it a rebuild; the built-in pickers do. A picker that
/// ignores `update` sees changes through [`Endpoints::generation`] at its next pick.
pub trait Pick: Send + 'static {
    /// Returns an index in `0..endpoints.len()`; `endpoints` is never empty. `hint` is
    /// the request's route hint, for pickers that use one ([`ConsistentHash`]).
    fn pick(&mut self, endpoints: &dyn Endpoints, hint: Option<&RouteHint>) -> usize;

    /// The set changed by one endpoint: `endpoints` is the view after the change (with
    /// its new [`generation`](Endpoints::generation)). Called for every change, in
    /// order, before the next pick. The default does nothing.
    fn update(&mut self, endpoints: &dyn Endpoints, change: SetChange) {
        let _ = (endpoints, change);
    }

    /// Whether the picker reads [`Endpoints::total_load`] (default false). A balancer
    /// asks once, when it is built, and for such a picker keeps a running total of its
    /// requests in flight, so that reading the total costs O(1) instead of a pass over
    /// the set. That total counts every request in flight from the balancer, those on
    /// endpoints that just left the ready set included (their requests still draw on
    /// the fleet), where the default sum counts the ready endpoints' only.
    fn reads_total_load(&self) -> bool {
        false
    }
}

impl Pick for Box<dyn Pick> {
    fn pick(&mut self, endpoints: &dyn Endpoints, hint: Option<&RouteHint>) -> usize {
        (**self).pick(endpoints, hint)
    }

    fn update(&mut self, endpoints: &dyn Endpoints, change: SetChange) {
        (**self).update(endpoints, change);
    }

    fn reads_total_load(&self) -> bool {
        (**self).reads_total_load()
    }
}

/// Each endpoint in turn.
#[derive(Debug, Clone, Default)]
pub struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// Starts with the first endpoint.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Pick for RoundRobin {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let i = self.next % endpoints.len();
        self.next = i + 1;
        i
    }
}

/// Uniformly at random.
#[derive(Clone)]
pub struct Random {
    rng: fastrand::Rng,
}

impl Random {
    /// Seeded from the OS.
    pub fn new() -> Self {
        Random {
            rng: fastrand::Rng::new(),
        }
    }

    /// Seeded, for reproducible picks.
    pub fn with_seed(seed: u64) -> Self {
        Random {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Random {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Random")
    }
}

impl Pick for Random {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        self.rng.usize(0..endpoints.len())
    }
}

/// Power of two choices: draws two distinct endpoints at random and takes the less
/// loaded (the first on a tie). Near least-connections quality at O(1) cost.
#[derive(Clone)]
pub struct PowerOfTwoChoices {
    rng: fastrand::Rng,
}

impl PowerOfTwoChoices {
    /// Seeded from the OS.
    pub fn new() -> Self {
        PowerOfTwoChoices {
            rng: fastrand::Rng::new(),
        }
    }

    /// Seeded, for reproducible picks.
    pub fn with_seed(seed: u64) -> Self {
        PowerOfTwoChoices {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl Default for PowerOfTwoChoices {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PowerOfTwoChoices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PowerOfTwoChoices")
    }
}

impl Pick for PowerOfTwoChoices {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let len = endpoints.len();
        if len == 1 {
            return 0;
        }
        let a = self.rng.usize(0..len);
        let mut b = self.rng.usize(0..len - 1);
        if b >= a {
            b += 1;
        }
        if endpoints.load(b) < endpoints.load(a) {
            b
        } else {
            a
        }
    }
}

/// A fast 64-bit mix (SplitMix64's finalizer): spreads keys such as 1, 2, 3 over the
/// hash space. Every client computes the same.
pub(crate) const fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Draws `choices` distinct indices in `0..len` (`2 <= choices < len`) and returns the
/// one of least `cost` (the first drawn on a tie): Envoy's and gRPC's N-choices
/// sampling, O(choices) whatever `len`.
pub(crate) fn least_of_sample(
    rng: &mut fastrand::Rng,
    len: usize,
    choices: usize,
    cost: impl Fn(usize) -> f64,
) -> usize {
    let a = rng.usize(0..len);
    let mut b = rng.usize(0..len - 1);
    if b >= a {
        b += 1;
    }
    let (mut best, mut best_cost) = (a, cost(a));
    let cb = cost(b);
    if cb < best_cost {
        (best, best_cost) = (b, cb);
    }
    if choices > 2 {
        let mut drawn = [0usize; MAX_CHOICES];
        drawn[0] = a;
        drawn[1] = b;
        for k in 2..choices.min(MAX_CHOICES) {
            let c = loop {
                let c = rng.usize(0..len);
                if !drawn[..k].contains(&c) {
                    break c;
                }
            };
            drawn[k] = c;
            let cc = cost(c);
            if cc < best_cost {
                (best, best_cost) = (c, cc);
            }
        }
    }
    best
}

/// The most candidates a sampling picker draws (gRPC clamps `choice_count` to 10).
pub(crate) const MAX_CHOICES: usize = 16;
