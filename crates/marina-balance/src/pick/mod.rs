//! The `Pick` trait and the pickers.

use std::fmt;
use std::time::Duration;

use marina_core::{EndpointId, HintTarget, RouteHint, stable_hash};

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

    /// Its response-time EWMA, if known.
    fn latency(&self, _i: usize) -> Option<Duration> {
        None
    }

    /// A number that changes whenever the endpoint set (ids or order) changes, if the
    /// view tracks one. Pickers with per-set state ([`ConsistentHash`]'s ring or Maglev table,
    /// [`WeightedRoundRobin`]) then check it in O(1) instead of comparing every id.
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// Chooses an endpoint for one request.
pub trait Pick: Send + 'static {
    /// Returns an index in `0..endpoints.len()`; `endpoints` is never empty. `hint` is
    /// the request's route hint, for pickers that use one ([`ConsistentHash`]).
    fn pick(&mut self, endpoints: &dyn Endpoints, hint: Option<&RouteHint>) -> usize;
}

impl Pick for Box<dyn Pick> {
    fn pick(&mut self, endpoints: &dyn Endpoints, hint: Option<&RouteHint>) -> usize {
        (**self).pick(endpoints, hint)
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

/// Smooth weighted round robin (nginx): over every window of Σweights consecutive picks
/// each endpoint is chosen exactly `weight` times, interleaved rather than in bursts.
///
/// When the endpoint set changes, the sequence starts afresh over the new set.
#[derive(Debug, Clone, Default)]
pub struct WeightedRoundRobin {
    current: Vec<(EndpointId, i64)>,
    generation: Option<u64>,
}

impl WeightedRoundRobin {
    /// A picker with no history.
    pub fn new() -> Self {
        Self::default()
    }

    fn sync(&mut self, e: &dyn Endpoints) {
        let same = match (e.generation(), self.generation) {
            (Some(g), Some(seen)) => g == seen && self.current.len() == e.len(),
            _ => {
                self.current.len() == e.len()
                    && self
                        .current
                        .iter()
                        .enumerate()
                        .all(|(i, (id, _))| *id == e.id(i))
            }
        };
        self.generation = e.generation();
        if same {
            return;
        }
        // Start the new set from zero: nginx's sequence then repeats every Σweights picks,
        // so every window is exact at once (carrying old counters over can skew the
        // proportions for many windows).
        self.current.clear();
        self.current.extend((0..e.len()).map(|i| (e.id(i), 0)));
    }
}

impl Pick for WeightedRoundRobin {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        self.sync(endpoints);
        let mut total = 0i64;
        let mut best = 0;
        for i in 0..endpoints.len() {
            let w = i64::from(endpoints.weight(i).max(1));
            total += w;
            self.current[i].1 += w;
            if self.current[i].1 > self.current[best].1 {
                best = i;
            }
        }
        self.current[best].1 -= total;
        best
    }
}

/// The endpoint with the least load, by a full scan; ties go to each tied endpoint in
/// turn.
#[derive(Debug, Clone, Default)]
pub struct LeastConnections {
    offset: usize,
}

impl LeastConnections {
    /// A picker with no history.
    pub fn new() -> Self {
        Self::default()
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

impl Pick for LeastConnections {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let len = endpoints.len();
        let i = min_from(len, self.offset, |i| endpoints.load(i));
        self.offset = (self.offset + 1) % len;
        i
    }
}

/// The endpoint with the lowest expected wait: its response-time EWMA (peak-sensitive,
/// as the view reports it) times its load plus one. Endpoints with no latency yet count
/// as `default_latency`, so new endpoints get tried.
#[derive(Debug, Clone)]
pub struct LeastResponseTime {
    default_latency: Duration,
    offset: usize,
}

impl Default for LeastResponseTime {
    fn default() -> Self {
        LeastResponseTime {
            default_latency: Duration::from_millis(1),
            offset: 0,
        }
    }
}

impl LeastResponseTime {
    /// Unknown latencies count as 1 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the latency assumed for endpoints with none measured yet.
    pub fn default_latency(mut self, latency: Duration) -> Self {
        self.default_latency = latency;
        self
    }
}

impl Pick for LeastResponseTime {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        let len = endpoints.len();
        let default = self.default_latency.as_secs_f64();
        let i = min_from(len, self.offset, |i| {
            let rt = endpoints.latency(i).map_or(default, |d| d.as_secs_f64());
            rt * (endpoints.load(i) + 1.0)
        });
        self.offset = (self.offset + 1) % len;
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

/// Routes by the request's hash ([`RouteHint::hash`](marina_core::RouteHint::hash), or a
/// preferred endpoint's id), so the same key keeps reaching the same endpoint while the
/// set is stable, and only about 1/N of keys move when an endpoint is added or removed.
///
/// - Up to `table_above` endpoints (default 64): rendezvous (highest random weight)
///   hashing, O(N) per pick, no state. Adding or removing an endpoint moves exactly the
///   keys that go to or come from it.
/// - Above: a hash ring with up to 256 points per endpoint (ketama style), O(log N) per
///   pick. The ring is rebuilt only when the *set* of endpoint ids changes (an order
///   change costs an O(N) re-index); like rendezvous, a change moves only the keys of
///   the endpoint added or removed, ≈ 1/N of them (within 20% of ideal, measured over
///   100k keys at N = 100 and 200).
/// - [`maglev`](Self::maglev) swaps the ring for a Maglev lookup table (65,537
///   entries): O(1) per pick and a more even spread, but not minimally disruptive: when
///   one of N endpoints is added or removed, about 1.5 × the ideal 1/N of keys move
///   (measured at N = 100 and 200), some between endpoints that stayed.
/// - With [`bounded_load`](Self::bounded_load)`(c)`: an endpoint already carrying
///   `ceil(c × (total load + 1) / N)` or more is skipped for the next in the key's
///   preference order (Google's consistent hashing with bounded loads); this makes
///   each pick O(N) for the total.
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
    Maglev(Maglev),
}

impl Default for ConsistentHash {
    fn default() -> Self {
        ConsistentHash {
            table_above: 64,
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
        let total: f64 = (0..e.len()).map(|i| e.load(i)).sum();
        Some((c * (total + 1.0) / e.len() as f64).ceil())
    }
}

/// The rendezvous weight of endpoint `id` for `key`: SplitMix64's finalizer over both
/// (about 2 ns, against 13 for SipHash; every client computes the same).
fn rendezvous_score(id: EndpointId, key: u64) -> u64 {
    mix(id.0 ^ mix(key))
}

/// A fast 64-bit mix (SplitMix64's finalizer): spreads keys such as 1, 2, 3 over the
/// ring.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
            // Highest score first; under a load bound, the best that fits.
            let mut best: Option<(u64, usize)> = None;
            let mut best_fit: Option<(u64, usize)> = None;
            for i in 0..len {
                let s = rendezvous_score(endpoints.id(i), key);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i));
                }
                if fits(i) && best_fit.is_none_or(|(b, _)| s > b) {
                    best_fit = Some((s, i));
                }
            }
            return best_fit.or(best).map_or(0, |(_, i)| i);
        }
        if self.maglev {
            let table = match &mut self.table {
                Some(Table::Maglev(t)) if t.matches(endpoints) => t,
                slot => match slot.insert(Table::Maglev(Maglev::build(endpoints))) {
                    Table::Maglev(t) => t,
                    Table::Ring(_) => unreachable!("just built"),
                },
            };
            let start = (stable_hash(&key) % table.slots.len() as u64) as usize;
            // Walk the table from the key's slot to the first endpoint under the bound.
            let mut i = table.slots[start] as usize;
            if !fits(i) {
                for k in 1..table.slots.len() {
                    let j = table.slots[(start + k) % table.slots.len()] as usize;
                    if fits(j) {
                        i = j;
                        break;
                    }
                }
            }
            return i;
        }
        let ring = match &mut self.table {
            Some(Table::Ring(r)) => {
                r.sync(endpoints);
                r
            }
            slot => match slot.insert(Table::Ring(Ring::build(endpoints))) {
                Table::Ring(r) => r,
                Table::Maglev(_) => unreachable!("just built"),
            },
        };
        let n = ring.points.len();
        let start = ring.points.partition_point(|&(p, _)| p < mix(key)) % n;
        let first = ring.index_at(start);
        if fits(first) {
            return first;
        }
        (1..n)
            .map(|k| ring.index_at((start + k) % n))
            .find(|&i| fits(i))
            .unwrap_or(first)
    }
}

/// Points on the ring per endpoint, at most; fewer for very large sets so the ring
/// stays under `RING_MAX_POINTS`.
const RING_POINTS: usize = 256;
const RING_MAX_POINTS: usize = 1 << 20;

/// A consistent-hash ring over endpoint ids.
#[derive(Clone)]
struct Ring {
    /// (position, member), sorted by position.
    points: Vec<(u64, u32)>,
    /// Member number → its index in the current view.
    index: Vec<u32>,
    /// Member id → member number.
    members: std::collections::HashMap<EndpointId, u32>,
    /// The ids in the order last seen.
    order: Vec<EndpointId>,
    /// Order-free fingerprint of the id set.
    fingerprint: (usize, u64),
    generation: Option<u64>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("endpoints", &self.index.len())
            .field("points", &self.points.len())
            .finish()
    }
}

fn fingerprint(e: &dyn Endpoints) -> (usize, u64) {
    let sum = (0..e.len()).fold(0u64, |acc, i| acc.wrapping_add(mix(e.id(i).0)));
    (e.len(), sum)
}

impl Ring {
    fn build(e: &dyn Endpoints) -> Self {
        let n = e.len();
        let per = RING_POINTS.min((RING_MAX_POINTS / n.max(1)).max(16));
        let mut members = std::collections::HashMap::with_capacity(n);
        let mut points = Vec::with_capacity(n * per);
        for i in 0..n {
            let id = e.id(i);
            let m = members.len() as u32;
            if members.insert(id, m).is_some() {
                continue; // a duplicate id: one member
            }
            for v in 0..per as u32 {
                points.push((stable_hash(&(id.0, v)), m));
            }
        }
        points.sort_unstable();
        let mut ring = Ring {
            points,
            index: vec![0; members.len()],
            members,
            order: Vec::new(),
            fingerprint: fingerprint(e),
            generation: e.generation(),
        };
        ring.reindex(e);
        ring
    }

    fn reindex(&mut self, e: &dyn Endpoints) {
        self.order.clear();
        self.order.extend((0..e.len()).map(|i| e.id(i)));
        for i in 0..e.len() {
            if let Some(&m) = self.members.get(&e.id(i)) {
                self.index[m as usize] = i as u32;
            }
        }
    }

    /// Follows the view: O(1) while its generation holds, a re-index when only the
    /// order changed, a rebuild when the id set did.
    fn sync(&mut self, e: &dyn Endpoints) {
        if let (Some(g), Some(built)) = (e.generation(), self.generation)
            && g == built
        {
            return;
        }
        if e.generation().is_none()
            && self.order.len() == e.len()
            && self.order.iter().enumerate().all(|(i, id)| *id == e.id(i))
        {
            return;
        }
        let fp = fingerprint(e);
        if fp != self.fingerprint || (0..e.len()).any(|i| !self.members.contains_key(&e.id(i))) {
            *self = Ring::build(e);
        } else {
            self.generation = e.generation();
            self.reindex(e);
        }
    }

    fn index_at(&self, point: usize) -> usize {
        self.index[self.points[point].1 as usize] as usize
    }
}

/// A Maglev lookup table over endpoint indices.
#[derive(Clone)]
struct Maglev {
    ids: Vec<EndpointId>,
    generation: Option<u64>,
    slots: Vec<u32>,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("endpoints", &self.ids.len())
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// Table size: a prime well above the endpoint count.
const MAGLEV_SIZE: usize = 65_537;

impl Maglev {
    fn matches(&self, e: &dyn Endpoints) -> bool {
        match (e.generation(), self.generation) {
            (Some(g), Some(built)) => g == built && self.ids.len() == e.len(),
            _ => {
                self.ids.len() == e.len()
                    && self.ids.iter().enumerate().all(|(i, id)| *id == e.id(i))
            }
        }
    }

    fn build(e: &dyn Endpoints) -> Self {
        let n = e.len();
        let m = MAGLEV_SIZE as u64;
        let ids: Vec<EndpointId> = (0..n).map(|i| e.id(i)).collect();
        let perms: Vec<(u64, u64)> = ids
            .iter()
            .map(|id| {
                let offset = stable_hash(&(id.0, 0x6f66_6673u32)) % m;
                let skip = stable_hash(&(id.0, 0x736b_6970u32)) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut slots = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'outer: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    break 'outer;
                }
            }
        }
        Maglev {
            ids,
            generation: e.generation(),
            slots,
        }
    }
}
