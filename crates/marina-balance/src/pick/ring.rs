//! The consistent-hash ring: few points per endpoint and several probes per key
//! (multi-probe consistent hashing), in an ordered linear-probing table that a change
//! of one endpoint updates in place.
//!
//! A key is hashed to `PROBES` places on the ring and goes to the point nearest after
//! any of them. With `POINTS` points per endpoint this spreads keys about as evenly as a
//! ketama ring with 16 times as many points (each endpoint's share within ±20% of the
//! mean at N = 100, where 16 single-probe points leave some endpoints with half or
//! twice their share), so the ring takes 16 points per endpoint instead of 256. Like
//! any ring it depends only on the set of endpoint ids: adding an endpoint moves keys
//! only to it (every probe's nearest point can only come closer, and only by becoming
//! one of the new endpoint's), removing one moves only its keys.
//!
//! The points are kept sorted in a table of slots where each point sits at or after
//! its *home* slot (its position scaled to the table's length), with no empty slot
//! between the two (ordered linear probing). Beside each home slot, a byte says how
//! far past it the points of that home (or later) start, so a key's successor is found
//! from its home slot in a slot or two (without it, at the table's load, the search
//! would wade through some 10–20 points displaced from earlier homes). Inserting or
//! removing a point shifts the points up to the next empty slot and fixes those bytes
//! over the same stretch. One endpoint's change is `POINTS` such steps, O(1) each on
//! average; the table grows or shrinks (a linear pass) when its load leaves 0.35–0.92.

use std::fmt;

use marina_core::EndpointId;

use super::{Endpoints, SetChange, mix};

/// Points on the ring per endpoint.
const POINTS: usize = 16;

/// Places on the ring each key is hashed to.
const PROBES: usize = 8;

/// A free slot (no point has member `u32::MAX`).
const EMPTY: u64 = u64::MAX;

/// Target load of the table after it is sized.
const LOAD: f64 = 0.8;

/// Slots reserved at a time past the home slots, for points pushed past the end (a
/// `Vec`'s own growth would double the table).
const TAIL: usize = 64;

const fn salts<const N: usize>(seed: u64) -> [u64; N] {
    let mut s = [0; N];
    let mut i = 0;
    while i < N {
        s[i] = mix(seed.wrapping_add(i as u64));
        i += 1;
    }
    s
}

/// Per point number: mixed into the endpoint id.
const POINT_SALTS: [u64; POINTS] = salts(0x7269_6e67_706f_696e);
/// Per probe number: mixed into the key.
const PROBE_SALTS: [u64; PROBES] = salts(0x7072_6f62_6573_6b65);

/// The position of endpoint `id`'s point `j`.
fn point(id: EndpointId, j: usize) -> u32 {
    (mix(id.0 ^ POINT_SALTS[j]) >> 32) as u32
}

/// Probe `p` of `key`.
fn probe(key: u64, p: usize) -> u32 {
    (mix(key ^ PROBE_SALTS[p]) >> 32) as u32
}

/// A table entry: position (high half) and member number (low half).
fn entry(pos: u32, member: u32) -> u64 {
    (u64::from(pos) << 32) | u64::from(member)
}

fn pos(e: u64) -> u32 {
    (e >> 32) as u32
}

fn member(e: u64) -> usize {
    e as u32 as usize
}

/// A consistent-hash ring over a view's endpoints (see the module docs).
#[derive(Clone)]
pub(super) struct Ring {
    /// Points as `entry`s, sorted by (position, member's id), each at or after its home
    /// slot with no free slot in between; `EMPTY` where free. May run past `homes`.
    slots: Vec<u64>,
    /// Home slots: positions scale to `0..homes`.
    homes: usize,
    /// Per home slot `b`: how many slots past `b` the first point of home `b` or later
    /// (or a free slot) sits — the number of points from earlier homes at `b` and past
    /// it — at most 255 (a lower bound then).
    skip: Vec<u8>,
    /// Points held.
    points: usize,
    /// Member number → its endpoint's id.
    ids: Vec<EndpointId>,
    /// Member number → its endpoint's index in the view.
    index: Vec<u32>,
    /// View index → member number.
    member_at: Vec<u32>,
    /// Member numbers free for reuse.
    free: Vec<u32>,
    /// The view generation the ring follows, if any.
    generation: Option<u64>,
    /// The ring follows the view (false: it lost track, rebuilt at the next pick).
    valid: bool,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("endpoints", &self.member_at.len())
            .field("points", &self.points)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Ring {
    /// The ring over every endpoint of the view.
    pub(super) fn build(e: &dyn Endpoints) -> Self {
        let n = e.len();
        let mut sorted: Vec<(u32, EndpointId, u32)> = Vec::with_capacity(n * POINTS);
        for m in 0..n {
            let id = e.id(m);
            sorted.extend((0..POINTS).map(|j| (point(id, j), id, m as u32)));
        }
        sorted.sort_unstable();
        let mut ring = Ring {
            slots: Vec::new(),
            homes: 0,
            skip: Vec::new(),
            points: 0,
            ids: (0..n).map(|m| e.id(m)).collect(),
            index: (0..n as u32).collect(),
            member_at: (0..n as u32).collect(),
            free: Vec::new(),
            generation: e.generation(),
            valid: true,
        };
        ring.place(sorted.into_iter().map(|(p, _, m)| entry(p, m)), n * POINTS);
        ring
    }

    /// Lays `sorted` entries (`count` of them) out in a table sized for them.
    fn place(&mut self, sorted: impl Iterator<Item = u64>, count: usize) {
        self.homes = ((count as f64 / LOAD).ceil() as usize).max(POINTS);
        self.slots = Vec::with_capacity(self.homes + TAIL);
        self.slots.resize(self.homes, EMPTY);
        self.points = 0;
        let mut next = 0;
        for e in sorted {
            let s = self.home(pos(e)).max(next);
            if s >= self.slots.len() {
                self.slots.reserve_exact(s + 1 - self.slots.len() + TAIL);
                self.slots.resize(s + 1, EMPTY);
            }
            self.slots[s] = e;
            self.points += 1;
            next = s + 1;
        }
        self.skip = vec![0; self.homes];
        self.fix_skip(0, self.homes);
    }

    /// Recomputes `skip` for the home slots `from..=to` (those past the end ignored).
    fn fix_skip(&mut self, from: usize, to: usize) {
        let to = to.min(self.homes - 1);
        let n = self.slots.len();
        let mut t = from;
        for b in from..=to {
            t = t.max(b);
            while t < n && self.slots[t] != EMPTY && self.home(pos(self.slots[t])) < b {
                t += 1;
            }
            self.skip[b] = (t - b).min(255) as u8;
        }
    }

    /// Resizes the table for `count` points (a linear pass; the order is kept).
    fn resize(&mut self, count: usize) {
        let old = std::mem::take(&mut self.slots);
        self.place(old.into_iter().filter(|&e| e != EMPTY), count);
    }

    /// Whether the ring follows this view: O(1) with a generation, a comparison of
    /// every id without.
    pub(super) fn in_sync(&self, e: &dyn Endpoints) -> bool {
        if !self.valid || self.member_at.len() != e.len() {
            return false;
        }
        match e.generation() {
            Some(g) => self.generation == Some(g),
            None => self
                .member_at
                .iter()
                .enumerate()
                .all(|(i, &m)| self.ids[m as usize] == e.id(i)),
        }
    }

    /// Whether the ring still follows its view (updates found nothing amiss).
    pub(super) fn valid(&self) -> bool {
        self.valid
    }

    /// Follows one change of the view, in place.
    pub(super) fn update(&mut self, e: &dyn Endpoints, change: SetChange) {
        if !self.valid {
            return;
        }
        let len = e.len();
        match change {
            SetChange::Added { index } => {
                if index != self.member_at.len() || index + 1 != len {
                    self.valid = false;
                    return;
                }
                let id = e.id(index);
                let m = match self.free.pop() {
                    Some(m) => m,
                    None => {
                        self.ids.push(id);
                        self.index.push(0);
                        (self.ids.len() - 1) as u32
                    }
                };
                self.ids[m as usize] = id;
                self.index[m as usize] = index as u32;
                self.member_at.push(m);
                if (self.points + POINTS) as f64 > 0.92 * self.homes as f64 {
                    self.resize(self.points + POINTS);
                }
                for j in 0..POINTS {
                    self.insert(entry(point(id, j), m));
                }
            }
            SetChange::Removed { index, id } => {
                if self.member_at.len() != len + 1 || index > len {
                    self.valid = false;
                    return;
                }
                let m = self.member_at[index];
                if self.ids[m as usize] != id {
                    self.valid = false;
                    return;
                }
                for j in 0..POINTS {
                    if !self.remove(entry(point(id, j), m)) {
                        self.valid = false;
                        return;
                    }
                }
                self.free.push(m);
                self.member_at.swap_remove(index);
                if index < len {
                    let moved = self.member_at[index] as usize;
                    self.index[moved] = index as u32;
                }
                if self.homes > 4 * POINTS && (self.points as f64) < 0.35 * self.homes as f64 {
                    self.resize(self.points);
                }
            }
        }
        self.generation = e.generation();
    }

    fn home(&self, pos: u32) -> usize {
        ((u64::from(pos) * self.homes as u64) >> 32) as usize
    }

    /// Whether entry `a` sorts before `b`: by position, then by the members' ids (so
    /// the order depends on the set of ids only), then by member number (one id twice).
    fn before(&self, a: u64, b: u64) -> bool {
        let (pa, pb) = (pos(a), pos(b));
        pa < pb || (pa == pb && (self.ids[member(a)], member(a)) < (self.ids[member(b)], member(b)))
    }

    /// The first slot where a point of home `b` may sit.
    fn start(&self, b: usize) -> usize {
        b + usize::from(self.skip[b])
    }

    fn insert(&mut self, e: u64) {
        let n = self.slots.len();
        let mut s = self.start(self.home(pos(e)));
        while s < n && self.slots[s] != EMPTY && self.before(self.slots[s], e) {
            s += 1;
        }
        let mut end = s;
        while end < n && self.slots[end] != EMPTY {
            end += 1;
        }
        if end == n {
            if n == self.slots.capacity() {
                self.slots.reserve_exact(TAIL);
            }
            self.slots.push(EMPTY);
        }
        self.slots.copy_within(s..end, s + 1);
        self.slots[s] = e;
        self.points += 1;
        // Every home past `e`'s up to the end of the run has one more point from an
        // earlier home in front of its own (`e`, or the one shifted onto it).
        self.bump_skip(self.home(pos(e)) + 1, end, true);
    }

    /// Adds one to (or takes one from) `skip` for the homes `from..=to` (those past the
    /// end ignored), saturating: a saturated skip stays a lower bound.
    fn bump_skip(&mut self, from: usize, to: usize, up: bool) {
        let to = to.min(self.homes - 1);
        if from > to {
            return;
        }
        let range = &mut self.skip[from..=to];
        if up {
            range.iter_mut().for_each(|k| *k = k.saturating_add(1));
        } else {
            range.iter_mut().for_each(|k| *k = k.saturating_sub(1));
        }
    }

    /// Removes entry `e`; false if it is not there.
    fn remove(&mut self, e: u64) -> bool {
        let n = self.slots.len();
        let mut s = self.start(self.home(pos(e)));
        loop {
            if s >= n || self.slots[s] == EMPTY {
                return false;
            }
            if self.slots[s] == e {
                break;
            }
            s += 1;
        }
        // Shift the points after it back while they may sit earlier.
        let mut q = s;
        while q + 1 < n && self.slots[q + 1] != EMPTY && self.home(pos(self.slots[q + 1])) <= q {
            self.slots[q] = self.slots[q + 1];
            q += 1;
        }
        self.slots[q] = EMPTY;
        self.points -= 1;
        // Every home past `e`'s up to the end of the shift has one point fewer from an
        // earlier home in front of its own.
        self.bump_skip(self.home(pos(e)) + 1, q, false);
        while self.slots.len() > self.homes && self.slots.last() == Some(&EMPTY) {
            self.slots.pop();
        }
        true
    }

    /// The slot of the first point at or after position `h`, around the ring, where
    /// `s` is the first slot of `h`'s home ([`start`](Self::start)).
    #[inline]
    fn successor_at(&self, s: usize, h: u32) -> usize {
        // Nearly always within the first four slots from the start of `h`'s home:
        // looked at without branches (a key's probes land anywhere, so a branch per
        // slot would be mispredicted about once per probe).
        if let Some(w) = self.slots.get(s..s + 4) {
            let mut found = 0u32;
            for (i, &e) in w.iter().enumerate() {
                found |= u32::from((e != EMPTY) & (pos(e) >= h)) << i;
            }
            if found != 0 {
                return s + found.trailing_zeros() as usize;
            }
            return self.successor_from(s + 4, h);
        }
        self.successor_from(s, h)
    }

    /// `successor`, scanning from slot `s`.
    fn successor_from(&self, mut s: usize, h: u32) -> usize {
        let n = self.slots.len();
        while s < n {
            let e = self.slots[s];
            if e != EMPTY && pos(e) >= h {
                return s;
            }
            s += 1;
        }
        self.next(n - 1)
    }

    /// The slot of the point after the one at `slot`, around the ring.
    pub(super) fn next(&self, slot: usize) -> usize {
        let n = self.slots.len();
        let mut s = slot;
        loop {
            s = if s + 1 == n { 0 } else { s + 1 };
            if self.slots[s] != EMPTY {
                return s;
            }
        }
    }

    /// The slot of the point `key` goes to: the nearest after any of its probes.
    pub(super) fn lookup(&self, key: u64) -> usize {
        // In three passes over the probes, each pass's reads independent of one
        // another: every probe's place, then every home's start (a read of `skip`), then
        // every successor (a read of `slots`). The reads of a large ring miss the cache,
        // and so they are in flight together instead of one probe after another.
        let mut h = [0u32; PROBES];
        let mut start = [0usize; PROBES];
        for p in 0..PROBES {
            h[p] = probe(key, p);
            start[p] = self.home(h[p]);
        }
        for s in &mut start {
            *s = self.start(*s);
        }
        // Distance, then probe number (the earlier probe wins a tie), in one word.
        let mut best = u64::MAX;
        let mut found = [0usize; PROBES];
        for p in 0..PROBES {
            found[p] = self.successor_at(start[p], h[p]);
            let d = u64::from(pos(self.slots[found[p]]).wrapping_sub(h[p]));
            best = best.min((d << 8) | p as u64);
        }
        found[(best & 0xff) as usize]
    }

    /// The view index of the endpoint whose point is at `slot`.
    pub(super) fn index_at(&self, slot: usize) -> usize {
        self.index[member(self.slots[slot])] as usize
    }

    /// Points on the ring.
    pub(super) fn points(&self) -> usize {
        self.points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ids(Vec<u64>);

    impl Endpoints for Ids {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn id(&self, i: usize) -> EndpointId {
            EndpointId(self.0[i])
        }
    }

    /// Every point sits at or after its home with no gap, in order, and the counts
    /// agree.
    fn check(ring: &Ring) {
        let mut last: Option<u64> = None;
        let mut count = 0;
        for (s, &e) in ring.slots.iter().enumerate() {
            if e == EMPTY {
                continue;
            }
            count += 1;
            let home = ring.home(pos(e));
            assert!(home <= s, "point at {s} before its home {home}");
            assert!(
                ring.slots[home..s].iter().all(|&x| x != EMPTY),
                "gap between home {home} and {s}"
            );
            if let Some(l) = last {
                assert!(ring.before(l, e), "out of order at {s}");
            }
            last = Some(e);
        }
        assert_eq!(count, ring.points);
        assert_eq!(count, ring.member_at.len() * POINTS);
        // Each skip is exact (or saturated).
        for b in 0..ring.homes {
            let t = (b..ring.slots.len())
                .find(|&t| ring.slots[t] == EMPTY || ring.home(pos(ring.slots[t])) >= b)
                .unwrap_or(ring.slots.len());
            assert_eq!(usize::from(ring.skip[b]), (t - b).min(255), "skip at {b}");
        }
    }

    #[test]
    fn points_stay_ordered_through_changes() {
        let mut ids: Vec<u64> = (0..40).map(|i| mix(i) | 1).collect();
        let mut ring = Ring::build(&Ids(ids.clone()));
        check(&ring);
        let mut rng = fastrand::Rng::with_seed(5);
        for step in 0..2_000u64 {
            if ids.len() > 1 && rng.bool() {
                let i = rng.usize(0..ids.len());
                let id = EndpointId(ids.swap_remove(i));
                ring.update(&Ids(ids.clone()), SetChange::Removed { index: i, id });
            } else {
                ids.push(mix(step + 1_000));
                let view = Ids(ids.clone());
                ring.update(
                    &view,
                    SetChange::Added {
                        index: ids.len() - 1,
                    },
                );
            }
            assert!(ring.valid(), "step {step}");
            check(&ring);
            assert!(ring.in_sync(&Ids(ids.clone())));
        }
    }

    /// A key's endpoint the long way: for each probe, the first point at or after it in
    /// ring order (around the end), then the nearest of those (the earlier probe on a
    /// tie).
    fn lookup_by_scan(ring: &Ring, key: u64) -> usize {
        let points: Vec<u64> = ring.slots.iter().copied().filter(|&e| e != EMPTY).collect();
        let mut best = (u64::MAX, 0);
        for p in 0..PROBES {
            let h = probe(key, p);
            let e = points
                .iter()
                .copied()
                .find(|&e| pos(e) >= h)
                .unwrap_or(points[0]);
            let d = (u64::from(pos(e).wrapping_sub(h)) << 8) | p as u64;
            if d < best.0 {
                best = (d, member(e));
            }
        }
        ring.index[best.1] as usize
    }

    #[test]
    fn lookups_find_the_nearest_point_after_a_probe() {
        let mut rng = fastrand::Rng::with_seed(21);
        let mut ids: Vec<u64> = (0..300).map(|i| mix(i + 7)).collect();
        let mut ring = Ring::build(&Ids(ids.clone()));
        for step in 0..12u64 {
            for _ in 0..300 {
                let key = rng.u64(..);
                assert_eq!(
                    ring.index_at(ring.lookup(key)),
                    lookup_by_scan(&ring, key),
                    "step {step}, key {key}"
                );
            }
            // Keys near the top of the ring, where lookups wrap around.
            for key in [0, 1, u64::MAX, u64::MAX - 1] {
                assert_eq!(ring.index_at(ring.lookup(key)), lookup_by_scan(&ring, key));
            }
            // A point at the very top: it must not pass for a free slot.
            ring.insert(entry(u32::MAX, 0));
            for h in [u32::MAX - 1, u32::MAX] {
                let at = ring.successor_at(ring.start(ring.home(h)), h);
                assert_eq!(ring.slots[at], entry(u32::MAX, 0));
            }
            for _ in 0..200 {
                let key = rng.u64(..);
                assert_eq!(ring.index_at(ring.lookup(key)), lookup_by_scan(&ring, key));
            }
            assert!(ring.remove(entry(u32::MAX, 0)));
            // The set changes: the lookups follow.
            let i = rng.usize(0..ids.len());
            let id = EndpointId(ids.swap_remove(i));
            ring.update(&Ids(ids.clone()), SetChange::Removed { index: i, id });
            ids.push(mix(step + 1_000));
            ring.update(
                &Ids(ids.clone()),
                SetChange::Added {
                    index: ids.len() - 1,
                },
            );
            check(&ring);
        }
    }

    #[test]
    fn equal_positions_sort_by_id() {
        let mut ring = Ring::build(&Ids(vec![3, 1]));
        // Two points at one position: the one of the smaller id first, whichever
        // member number it has.
        ring.insert(entry(7, 0));
        ring.insert(entry(7, 1));
        let at: Vec<u64> = ring
            .slots
            .iter()
            .copied()
            .filter(|&e| pos(e) == 7)
            .collect();
        assert_eq!(at, [entry(7, 1), entry(7, 0)]);
    }
}
