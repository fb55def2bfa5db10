//! Least connections and least response time: an exact scan over small sets, the
//! least loaded of a few random candidates (Envoy's and gRPC's default) above.

use std::fmt;
use std::time::Duration;

use marina_core::RouteHint;

use super::{Endpoints, MAX_CHOICES, Pick, least_of_sample};

/// Up to this many endpoints, least-load pickers scan them all by default.
const EXACT_UP_TO: usize = 16;

/// How a least-load picker chooses: a full scan from a rotating start (ties in turn) up
/// to `exact_up_to` endpoints, the best of `choices` random ones above.
#[derive(Clone)]
struct Least {
    offset: usize,
    exact_up_to: usize,
    choices: usize,
    rng: fastrand::Rng,
}

impl Least {
    fn new(rng: fastrand::Rng) -> Self {
        Least {
            offset: 0,
            exact_up_to: EXACT_UP_TO,
            choices: 2,
            rng,
        }
    }

    fn choose(&mut self, len: usize, cost: impl Fn(usize) -> f64) -> usize {
        if len <= self.exact_up_to || len <= self.choices {
            let i = min_from(len, self.offset, cost);
            self.offset = (self.offset + 1) % len;
            i
        } else {
            least_of_sample(&mut self.rng, len, self.choices, cost)
        }
    }

    fn fmt_fields(&self, d: &mut fmt::DebugStruct<'_, '_>) {
        if self.exact_up_to == usize::MAX {
            d.field("exact", &true);
        } else {
            d.field("exact_up_to", &self.exact_up_to)
                .field("choice_count", &self.choices);
        }
    }
}

/// Index of the minimum of `cost` over `0..len`, scanning from `start` (so ties rotate).
fn min_from(len: usize, start: usize, cost: impl Fn(usize) -> f64) -> usize {
    let mut best = start % len;
    let mut best_cost = cost(best);
    for k in 1..len {
        let i = (start + k) % len;
        let c = cost(i);
        if c < best_cost {
            best = i;
            best_cost = c;
        }
    }
    best
}

/// The endpoint with the least load (requests in flight).
///
/// - **Up to 16 endpoints** (see [`exact_up_to`](Self::exact_up_to)): the least
///   loaded, by a full scan (HAProxy's `leastconn`, Envoy's `FULL_SCAN`); ties go to
///   each tied endpoint in turn.
/// - **Above**: the least loaded of [`choice_count`](Self::choice_count) (default 2)
///   distinct endpoints drawn at random, as Envoy's `LEAST_REQUEST` and gRPC's
///   `least_request` do by default: power of two choices, O(1) whatever the number of
///   endpoints. It never chooses the most loaded of its candidates (with two, never
///   the most loaded endpoint of all), and keeps the spread of loads within a small
///   constant of the exact choice's, where a full scan would read every endpoint's
///   counter for every request.
///
/// [`exact`](Self::exact) scans at any size (O(N) per pick).
///
/// ```
/// use marina_balance::LeastConnections;
///
/// let default = LeastConnections::new(); // exact up to 16 endpoints, 2 choices above
/// let exact = LeastConnections::exact(); // always a full scan
/// let sampled = LeastConnections::with_seed(7).exact_up_to(0).choice_count(3);
/// # drop((default, exact, sampled));
/// ```
#[derive(Clone)]
pub struct LeastConnections {
    least: Least,
}

impl LeastConnections {
    /// The most candidates [`choice_count`](Self::choice_count) takes (gRPC clamps its
    /// `choice_count` to 10); the fewest is 2.
    pub const MAX_CHOICE_COUNT: usize = MAX_CHOICES;

    /// Exact up to 16 endpoints, the best of 2 random ones above; seeded from the OS.
    pub fn new() -> Self {
        LeastConnections {
            least: Least::new(fastrand::Rng::new()),
        }
    }

    /// As [`new`](Self::new), seeded, for reproducible picks.
    pub fn with_seed(seed: u64) -> Self {
        LeastConnections {
            least: Least::new(fastrand::Rng::with_seed(seed)),
        }
    }

    /// A full scan at any size: the least loaded endpoint, ties in turn. O(N) per pick:
    /// for small sets, or where the exact choice matters more than the cost.
    pub fn exact() -> Self {
        Self::new().exact_up_to(usize::MAX)
    }

    /// Scans every endpoint when there are at most `n` (default 16); samples above.
    /// 0: always sample.
    pub fn exact_up_to(mut self, n: usize) -> Self {
        self.least.exact_up_to = n;
        self
    }

    /// How many random candidates a pick compares above the exact threshold (Envoy's
    /// and gRPC's `choice_count`; default 2, clamped to
    /// 2..=[`MAX_CHOICE_COUNT`](Self::MAX_CHOICE_COUNT), 16). More candidates come closer
    /// to the exact choice, at a load read each.
    pub fn choice_count(mut self, n: usize) -> Self {
        self.least.choices = n.clamp(2, MAX_CHOICES);
        self
    }
}

impl Default for LeastConnections {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LeastConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LeastConnections");
        self.least.fmt_fields(&mut d);
        d.finish()
    }
}

impl Pick for LeastConnections {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        self.least.choose(endpoints.len(), |i| endpoints.load(i))
    }
}

/// The endpoint with the lowest expected wait: its response-time EWMA (peak-sensitive,
/// as the view reports it) times its load plus one. Endpoints with no latency yet count
/// as `default_latency`, so new endpoints get tried.
///
/// Chooses as [`LeastConnections`] does: the exact lowest by a full scan up to 16
/// endpoints ([`exact_up_to`](Self::exact_up_to); ties in turn), the lowest of
/// [`choice_count`](Self::choice_count) (default 2) random ones above (O(1)), or a
/// full scan at any size with [`exact`](Self::exact).
#[derive(Clone)]
pub struct LeastResponseTime {
    default_latency: Duration,
    least: Least,
}

impl Default for LeastResponseTime {
    fn default() -> Self {
        Self::new()
    }
}

impl LeastResponseTime {
    /// Unknown latencies count as 1 ms; exact up to 16 endpoints, the best of 2 random
    /// ones above; seeded from the OS.
    pub fn new() -> Self {
        LeastResponseTime {
            default_latency: Duration::from_millis(1),
            least: Least::new(fastrand::Rng::new()),
        }
    }

    /// As [`new`](Self::new), seeded, for reproducible picks.
    pub fn with_seed(seed: u64) -> Self {
        LeastResponseTime {
            default_latency: Duration::from_millis(1),
            least: Least::new(fastrand::Rng::with_seed(seed)),
        }
    }

    /// A full scan at any size (O(N) per pick).
    pub fn exact() -> Self {
        Self::new().exact_up_to(usize::MAX)
    }

    /// Scans every endpoint when there are at most `n` (default 16); samples above.
    /// 0: always sample.
    pub fn exact_up_to(mut self, n: usize) -> Self {
        self.least.exact_up_to = n;
        self
    }

    /// How many random candidates a pick compares above the exact threshold (default
    /// 2, clamped to 2..=[`LeastConnections::MAX_CHOICE_COUNT`], 16).
    pub fn choice_count(mut self, n: usize) -> Self {
        self.least.choices = n.clamp(2, MAX_CHOICES);
        self
    }

    /// Sets the latency assumed for endpoints with none measured yet.
    pub fn default_latency(mut self, latency: Duration) -> Self {
        self.default_latency = latency;
        self
    }
}

impl fmt::Debug for LeastResponseTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LeastResponseTime");
        d.field("default_latency", &self.default_latency);
        self.least.fmt_fields(&mut d);
        d.finish()
    }
}

impl Pick for LeastResponseTime {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let default = self.default_latency.as_secs_f64();
        self.least.choose(endpoints.len(), |i| {
            let rt = endpoints.latency(i).map_or(default, |d| d.as_secs_f64());
            rt * (endpoints.load(i) + 1.0)
        })
    }
}
