//! Consistent hashing: rendezvous for small sets, a ring (or a Maglev table) above.

use marina_core::{EndpointId, HintTarget, RouteHint};

use super::maglev::Maglev;
use super::ring::Ring;
use super::{Endpoints, Pick, RoundRobin, SetChange, mix};

/// Rendezvous up to this many endpoints by default, a table above.
const TABLE_ABOVE: usize = 64;

/// Routes by the request's hash ([`RouteHint::hash`](marina_core::RouteHint::hash), or a
/// preferred endpoint's id), so the same key keeps reaching the same endpoint while the
/// set is stable, and only about 1/N of keys move when an endpoint is added or removed.
///
/// - Up to `table_above` endpoints (default 64): rendezvous (highest random weight)
///   hashing, O(N) per pick, no state. Adding or removing an endpoint moves exactly the
///   keys that go to or come from it.
/// - Above: a hash ring, O(1) per pick on average. Each endpoint has 16 points on the
///   ring and each key is hashed to 8 places, going to the point nearest after any of
///   them (multi-probe consistent hashing): keys spread about as evenly as over a
///   ketama ring of 256 points per endpoint (each endpoint's share within ±20% of the
///   mean at N = 100), in a sixteenth of the memory (about 190 bytes per endpoint).
///   Like rendezvous, a change moves only the keys of the endpoint added or removed,
///   ≈ 1/N of them (within 20% of ideal, measured over 100k keys at N = 100 and 200).
///   The ring depends only on the set of endpoint ids (not their order), and follows a
///   balancer's changes in place ([`Pick::update`]): an endpoint that joins or leaves,
///   ready or not, costs the ring 16 point insertions or removals, O(1) each (about a
///   microsecond in all at N = 4,096).
/// - [`maglev`](Self::maglev) swaps the ring for a Maglev lookup table (65,537
///   entries): O(1) per pick and the most even spread, but not minimally disruptive:
///   when one of N endpoints is added or removed, about 1.5 × the ideal 1/N of keys
///   move (measured at N = 100 and 200), some between endpoints that stayed. The
///   table takes 256 KiB whatever the number of endpoints. A change means a new table
///   (a millisecond or two of work), so under a balancer it is
///   rebuilt on a thread of the picker's own while requests go through the table in use
///   (a key whose endpoint left goes to the next endpoint in its slot order; an endpoint
///   that joined gets keys once the new table is in).
/// - With [`bounded_load`](Self::bounded_load)`(c)`: an endpoint already carrying
///   `ceil(c × (total load + 1) / N)` or more is skipped for the next in the key's
///   preference order (Google's consistent hashing with bounded loads). The total load
///   is [`Endpoints::total_load`]: under a balancer a running count, O(1).
///
/// Requests without a hint go round robin.
///
/// ```
/// use marina_balance::{ConsistentHash, Endpoints, Pick};
/// use marina_core::{EndpointId, RouteHint};
///
/// struct Ids(Vec<u64>);
/// impl Endpoints for Ids {
///     fn len(&self) -> usize { self.0.len() }
///     fn id(&self, i: usize) -> EndpointId { EndpointId(self.0[i]) }
/// }
///
/// let mut ch = ConsistentHash::new();
/// let hint = RouteHint::hash(0xc0ffee);
/// let first = Ids((1..=5).collect());
/// let chosen = first.id(ch.pick(&first, Some(&hint)));
/// // Reordering the endpoints does not move the key.
/// let shuffled = Ids(vec![4, 2, 5, 1, 3]);
/// assert_eq!(shuffled.id(ch.pick(&shuffled, Some(&hint))), chosen);
/// ```
#[derive(Debug, Clone)]
pub struct ConsistentHash {
    table_above: usize,
    maglev: bool,
    bound: Option<f64>,
    table: Option<Table>,
    fallback: RoundRobin,
}

#[derive(Debug, Clone)]
enum Table {
    Ring(Ring),
    Maglev(Box<Maglev>),
}

impl Default for ConsistentHash {
    fn default() -> Self {
        ConsistentHash {
            table_above: TABLE_ABOVE,
            maglev: false,
            bound: None,
            table: None,
            fallback: RoundRobin::new(),
        }
    }
}

impl ConsistentHash {
    /// Rendezvous up to 64 endpoints, a hash ring above; no load bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses the ring (or the Maglev table) above `n` endpoints, rendezvous up to it.
    pub fn table_above(mut self, n: usize) -> Self {
        self.table_above = n;
        self
    }

    /// Uses a Maglev table instead of the ring above the threshold.
    pub fn maglev(mut self) -> Self {
        self.maglev = true;
        self.table = None;
        self
    }

    /// Bounds each endpoint's load to `factor` (≥ 1, e.g. 1.25) times the average.
    pub fn bounded_load(mut self, factor: f64) -> Self {
        self.bound = Some(factor.max(1.0));
        self
    }

    /// The capacity under the load bound, if any.
    fn capacity(&self, e: &dyn Endpoints) -> Option<f64> {
        let c = self.bound?;
        Some((c * (e.total_load() + 1.0) / e.len() as f64).ceil())
    }

    /// A table for `e`, built now (a ring, or a Maglev table whose first build runs on
    /// its worker).
    fn build(&self, e: &dyn Endpoints) -> Table {
        if self.maglev {
            Table::Maglev(Box::new(Maglev::follow(e)))
        } else {
            Table::Ring(Ring::build(e))
        }
    }
}

/// The rendezvous weight of endpoint `id` for `key`: SplitMix64's finalizer over both
/// (about 2 ns, against 13 for SipHash; every client computes the same).
/// Failover ranks the endpoints left for a key with it too, so a hashed key fails over
/// to the endpoint this picker chooses for it once the failed one is gone.
pub(crate) fn rendezvous_score(id: EndpointId, key: u64) -> u64 {
    mix(id.0 ^ mix(key))
}

/// Rendezvous: the endpoint of highest score; under a load bound, the best that fits.
fn rendezvous(e: &dyn Endpoints, key: u64, fits: impl Fn(usize) -> bool) -> usize {
    let mut best: Option<(u64, usize)> = None;
    let mut best_fit: Option<(u64, usize)> = None;
    for i in 0..e.len() {
        let s = rendezvous_score(e.id(i), key);
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, i));
        }
        if fits(i) && best_fit.is_none_or(|(b, _)| s > b) {
            best_fit = Some((s, i));
        }
    }
    best_fit.or(best).map_or(0, |(_, i)| i)
}

impl Pick for ConsistentHash {
    fn pick(&mut self, endpoints: &dyn Endpoints, hint: Option<&RouteHint>) -> usize {
        let key = match hint.map(RouteHint::target) {
            Some(HintTarget::Hash(h)) => h,
            Some(HintTarget::Endpoint(id)) => id.0,
            Some(HintTarget::Any) | None => return self.fallback.pick(endpoints, None),
        };
        let len = endpoints.len();
        let cap = self.capacity(endpoints);
        let fits = |i: usize| cap.is_none_or(|c| endpoints.load(i) < c);
        if len <= self.table_above {
            return rendezvous(endpoints, key, fits);
        }
        if self.maglev {
            let m = match &mut self.table {
                Some(Table::Maglev(m)) => m,
                slot => {
                    // No change reports before (a view used without a balancer): the
                    // table is built at this pick.
                    *slot = Some(Table::Maglev(Box::default()));
                    match slot {
                        Some(Table::Maglev(m)) => m,
                        _ => unreachable!("just set"),
                    }
                }
            };
            // Until a balancer's first table is in: rendezvous.
            return m
                .pick(endpoints, key, fits)
                .unwrap_or_else(|| rendezvous(endpoints, key, fits));
        }
        let ring = match &mut self.table {
            Some(Table::Ring(r)) if r.in_sync(endpoints) => r,
            slot => {
                // Changed without a report (a view used without a balancer), or first
                // use: built now.
                *slot = Some(Table::Ring(Ring::build(endpoints)));
                match slot {
                    Some(Table::Ring(r)) => r,
                    _ => unreachable!("just built"),
                }
            }
        };
        let start = ring.lookup(key);
        let first = ring.index_at(start);
        if fits(first) {
            return first;
        }
        // Under the bound: the next endpoint around the ring that fits.
        let mut s = start;
        for _ in 1..ring.points() {
            s = ring.next(s);
            let i = ring.index_at(s);
            if fits(i) {
                return i;
            }
        }
        first
    }

    fn update(&mut self, endpoints: &dyn Endpoints, change: SetChange) {
        let len = endpoints.len();
        if len <= self.table_above / 2 {
            // Well below the threshold: rendezvous only, the table's memory freed.
            self.table = None;
            return;
        }
        match &mut self.table {
            Some(Table::Ring(r)) if r.valid() => r.update(endpoints, change),
            Some(Table::Maglev(m)) => m.update(endpoints, change),
            _ if len > self.table_above => self.table = Some(self.build(endpoints)),
            _ => {}
        }
    }

    fn reads_total_load(&self) -> bool {
        self.bound.is_some()
    }
}
