//! Weighted round robin: nginx's smooth algorithm (exact windows, O(N) per pick) for
//! small sets, an earliest-deadline-first schedule (O(log N) per pick and per change)
//! above.

use std::fmt;

use marina_core::{EndpointId, RouteHint};

use super::{Endpoints, Pick, SetChange};

/// Up to this many endpoints, weighted round robin is nginx's smooth one by default.
const SMOOTH_UP_TO: usize = 16;

/// Weighted round robin: each endpoint chosen in proportion to its weight, interleaved
/// rather than in bursts.
///
/// - **Up to 16 endpoints** (see [`smooth_up_to`](Self::smooth_up_to)): nginx's smooth
///   weighted round robin. Over every window of Σweights consecutive picks each endpoint
///   is chosen exactly `weight` times. O(N) per pick (every endpoint's counter moves).
///   When the set changes, the sequence starts afresh over the new set.
/// - **Above**: an earliest-deadline-first schedule (Envoy's weighted round robin, gRPC's
///   A58 scheduler): each endpoint has a virtual deadline that advances by
///   `1 / weight` each time it is chosen, and the earliest deadline goes next, from a
///   4-ary heap: O(log N) per pick. On an unchanged set each run of k × Σweights picks
///   from the start chooses each endpoint k × weight times, give or take one, and no
///   endpoint runs more than its weight plus one in a row. Set changes are followed in
///   place (O(log N)): an endpoint that joins starts one step (`1 / weight`) after the
///   schedule's current time, one that leaves takes its entry with it, and the others
///   keep their place (so over k × Σweights picks after a change, each endpoint's count
///   is within two of k × weight).
///
/// [`smooth`](Self::smooth) keeps nginx's exact sequence at any size, [`edf`](Self::edf)
/// the schedule at any size. Weights come from the view ([`Balance::weights`] or
/// [`Weighted`](crate::Weighted)); equal weights give plain round robin.
///
/// [`Balance::weights`]: crate::Balance::weights
///
/// ```
/// use marina_balance::{Endpoints, Pick, WeightedRoundRobin};
/// use marina_core::EndpointId;
///
/// struct Weights(Vec<u32>);
/// impl Endpoints for Weights {
///     fn len(&self) -> usize { self.0.len() }
///     fn id(&self, i: usize) -> EndpointId { EndpointId(i as u64) }
///     fn weight(&self, i: usize) -> u32 { self.0[i] }
/// }
///
/// let view = Weights(vec![5, 1, 1]);
/// // nginx's documented sequence for weights 5, 1, 1.
/// let mut smooth = WeightedRoundRobin::new();
/// let picks: Vec<usize> = (0..7).map(|_| smooth.pick(&view, None)).collect();
/// assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
/// // The schedule: the same proportions over every 7 picks.
/// let mut edf = WeightedRoundRobin::edf();
/// let mut seen = [0; 3];
/// for _ in 0..700 {
///     seen[edf.pick(&view, None)] += 1;
/// }
/// assert_eq!(seen, [500, 100, 100]);
/// ```
#[derive(Clone)]
pub struct WeightedRoundRobin {
    smooth_up_to: usize,
    smooth: Smooth,
    edf: Edf,
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        WeightedRoundRobin {
            smooth_up_to: SMOOTH_UP_TO,
            smooth: Smooth::default(),
            edf: Edf::default(),
        }
    }
}

impl fmt::Debug for WeightedRoundRobin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightedRoundRobin")
            .field("smooth_up_to", &self.smooth_up_to)
            .field("scheduled", &self.edf.heap.len())
            .finish()
    }
}

impl WeightedRoundRobin {
    /// Smooth (exact) up to 16 endpoints, the earliest-deadline-first schedule above.
    pub fn new() -> Self {
        Self::default()
    }

    /// nginx's smooth weighted round robin at any size: exact over every window of
    /// Σweights picks, O(N) per pick.
    pub fn smooth() -> Self {
        Self::new().smooth_up_to(usize::MAX)
    }

    /// The earliest-deadline-first schedule at any size: O(log N) per pick and per
    /// change.
    pub fn edf() -> Self {
        Self::new().smooth_up_to(0)
    }

    /// Uses the smooth algorithm while there are at most `n` endpoints (default 16),
    /// the schedule above.
    pub fn smooth_up_to(mut self, n: usize) -> Self {
        self.smooth_up_to = n;
        self
    }
}

impl Pick for WeightedRoundRobin {
    fn pick(&mut self, endpoints: &dyn Endpoints, _: Option<&RouteHint>) -> usize {
        if endpoints.len() <= self.smooth_up_to {
            self.edf.clear();
            self.smooth.pick(endpoints)
        } else {
            self.smooth.clear();
            self.edf.pick(endpoints)
        }
    }

    fn update(&mut self, endpoints: &dyn Endpoints, change: SetChange) {
        if endpoints.len() > self.smooth_up_to {
            self.edf.update(endpoints, change);
        } else {
            self.edf.clear();
        }
    }
}

/// nginx's smooth weighted round robin.
#[derive(Debug, Clone, Default)]
struct Smooth {
    current: Vec<(EndpointId, i64)>,
    generation: Option<u64>,
}

impl Smooth {
    fn clear(&mut self) {
        if !self.current.is_empty() {
            *self = Smooth::default();
        }
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

    fn pick(&mut self, endpoints: &dyn Endpoints) -> usize {
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

/// Children per node of the schedule's heap: a 4-ary heap is half as deep as a binary
/// one (6 levels at 4,096 endpoints), and a node's four children (16 bytes each) share
/// a cache line or two.
const ARITY: usize = 4;

/// An earliest-deadline-first schedule: a min-heap of virtual deadlines.
#[derive(Clone, Default)]
struct Edf {
    heap: Vec<Entry>,
    /// View index → its entry's position in `heap`.
    pos: Vec<u32>,
    /// View index → its step, `1 / weight`.
    steps: Vec<f64>,
    /// View index → id (to notice a change in a view that has no generation).
    ids: Vec<EndpointId>,
    /// The deadline of the last entry chosen: the schedule's current time.
    now: f64,
    /// Tie-breaker: entries with equal deadlines go in the order they joined.
    next_seq: u32,
    /// The view generation the schedule follows, if any.
    generation: Option<u64>,
    /// The schedule follows the view (false: rebuilt at the next pick).
    valid: bool,
}

#[derive(Clone, Copy)]
struct Entry {
    deadline: f64,
    seq: u32,
    /// Its index in the view.
    index: u32,
}

impl Entry {
    /// Whether this entry goes first: the earlier deadline, then the earlier to join
    /// (bitwise, not short-circuit: no branch).
    #[inline]
    fn before(&self, other: &Entry) -> bool {
        (self.deadline < other.deadline)
            | ((self.deadline == other.deadline) & (self.seq < other.seq))
    }
}

fn step(weight: u32) -> f64 {
    1.0 / f64::from(weight.max(1))
}

impl Edf {
    fn clear(&mut self) {
        if self.valid || !self.heap.is_empty() {
            *self = Edf::default();
        }
    }

    fn in_sync(&self, e: &dyn Endpoints) -> bool {
        if !self.valid || self.heap.len() != e.len() {
            return false;
        }
        match e.generation() {
            Some(g) => self.generation == Some(g),
            None => self.ids.iter().enumerate().all(|(i, id)| *id == e.id(i)),
        }
    }

    /// Starts afresh over the view: every endpoint half a step from time 0, so the
    /// sequence repeats every Σweights picks.
    fn rebuild(&mut self, e: &dyn Endpoints) {
        let n = e.len();
        self.steps.clear();
        self.steps.extend((0..n).map(|i| step(e.weight(i))));
        self.heap.clear();
        self.heap.extend((0..n).map(|i| Entry {
            deadline: self.steps[i] / 2.0,
            seq: i as u32,
            index: i as u32,
        }));
        self.pos.clear();
        self.pos.resize(n, 0);
        for (p, entry) in self.heap.iter().enumerate() {
            self.pos[entry.index as usize] = p as u32;
        }
        for p in (0..n.div_ceil(ARITY)).rev() {
            self.sift_down(p);
        }
        self.ids.clear();
        self.ids.extend((0..n).map(|i| e.id(i)));
        self.now = 0.0;
        self.next_seq = n as u32;
        self.generation = e.generation();
        self.valid = true;
    }

    fn pick(&mut self, e: &dyn Endpoints) -> usize {
        if !self.in_sync(e) {
            self.rebuild(e);
        }
        let mut top = self.heap[0];
        let chosen = top.index as usize;
        self.now = top.deadline;
        top.deadline += self.steps[chosen];
        self.replace_first(top);
        chosen
    }

    fn update(&mut self, e: &dyn Endpoints, change: SetChange) {
        if !self.valid {
            // Not built yet (or lost track): build from the view now, while the set is
            // small or at the latest at the next pick.
            self.rebuild(e);
            return;
        }
        match change {
            SetChange::Added { index } => {
                if index != self.heap.len() || index + 1 != e.len() {
                    self.valid = false;
                    return;
                }
                let step = step(e.weight(index));
                self.steps.push(step);
                let entry = Entry {
                    deadline: self.now + step,
                    seq: self.next_seq,
                    index: index as u32,
                };
                self.next_seq = self.next_seq.wrapping_add(1);
                self.heap.push(entry);
                self.pos.push((self.heap.len() - 1) as u32);
                self.ids.push(e.id(index));
                self.sift_up(self.heap.len() - 1);
            }
            SetChange::Removed { index, id } => {
                let len = e.len();
                if self.heap.len() != len + 1 || index > len || self.ids[index] != id {
                    self.valid = false;
                    return;
                }
                let p = self.pos[index] as usize;
                let last = self.heap.pop().expect("not empty");
                if p < self.heap.len() {
                    self.put(p, last);
                    self.sift_up(p);
                    let p = self.pos[last.index as usize] as usize;
                    self.sift_down(p);
                }
                // The view's last endpoint moved to `index`.
                self.ids.swap_remove(index);
                self.steps.swap_remove(index);
                self.pos.swap_remove(index);
                if index < len {
                    let p = self.pos[index] as usize;
                    self.heap[p].index = index as u32;
                }
            }
        }
        self.generation = e.generation();
    }

    /// The child of `p` with the earliest entry, if `p` has children. Without a
    /// branch on the comparison: which child is earlier is a coin toss a branch
    /// predictor loses half the time, at every level.
    #[inline]
    fn first_child(&self, p: usize) -> Option<usize> {
        let l = ARITY * p + 1;
        match self.heap.get(l..l + ARITY) {
            Some([a, b, c, d]) => {
                let ab = usize::from(b.before(a));
                let cd = 2 + usize::from(d.before(c));
                let (x, y) = (&self.heap[l + ab], &self.heap[l + cd]);
                Some(l + if y.before(x) { cd } else { ab })
            }
            _ => {
                let n = self.heap.len();
                (l < n).then(|| {
                    (l + 1..n).fold(l, |c, k| {
                        if self.heap[k].before(&self.heap[c]) {
                            k
                        } else {
                            c
                        }
                    })
                })
            }
        }
    }

    /// Moves the entry at `p` up to its place.
    fn sift_up(&mut self, mut p: usize) {
        let e = self.heap[p];
        while p > 0 {
            let parent = (p - 1) / ARITY;
            if !e.before(&self.heap[parent]) {
                break;
            }
            self.put(p, self.heap[parent]);
            p = parent;
        }
        self.put(p, e);
    }

    /// Moves the entry at `p` down to its place.
    fn sift_down(&mut self, mut p: usize) {
        let e = self.heap[p];
        while let Some(c) = self.first_child(p) {
            if !self.heap[c].before(&e) {
                break;
            }
            self.put(p, self.heap[c]);
            p = c;
        }
        self.put(p, e);
    }

    /// Replaces the first entry with `e` (the first one chosen, its deadline moved on):
    /// the hole goes down to a leaf along the earliest children, then `e` comes up from
    /// there (Floyd's way: a chosen entry's new deadline is usually among the latest,
    /// so it comes up little, and the way down compares children only).
    fn replace_first(&mut self, e: Entry) {
        let mut p = 0;
        while let Some(c) = self.first_child(p) {
            self.put(p, self.heap[c]);
            p = c;
        }
        while p > 0 {
            let parent = (p - 1) / ARITY;
            if !e.before(&self.heap[parent]) {
                break;
            }
            self.put(p, self.heap[parent]);
            p = parent;
        }
        self.put(p, e);
    }

    /// Puts `e` at heap position `p`.
    fn put(&mut self, p: usize, e: Entry) {
        self.heap[p] = e;
        self.pos[e.index as usize] = p as u32;
    }
}
