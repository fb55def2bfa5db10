//! `IdIndex`: the balancer's endpoints by id, in 4 to 16 bytes each.

use marina_core::EndpointId;

/// A free bucket.
const FREE: u32 = u32::MAX;

/// Slot numbers by endpoint id: open addressing with linear probing, each bucket a
/// slot number (the id is read from the slot). An id is a SipHash of a discovery key,
/// so its own low bits place it: no hashing per lookup. Lookups may come from
/// requests (a route hint naming an endpoint), but only discovery inserts, so no
/// request can crowd a bucket's neighbourhood. Kept between a quarter and half full.
#[derive(Debug, Default)]
pub(crate) struct IdIndex {
    buckets: Vec<u32>,
    len: usize,
}

impl IdIndex {
    fn home(&self, id: EndpointId) -> usize {
        (id.0 as usize) & (self.buckets.len() - 1)
    }

    /// The slot holding `id`, if any; `id_of` reads a slot's id.
    pub(crate) fn get(&self, id: EndpointId, id_of: impl Fn(u32) -> EndpointId) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let mask = self.buckets.len() - 1;
        let mut b = self.home(id);
        loop {
            let slot = self.buckets[b];
            if slot == FREE {
                return None;
            }
            if id_of(slot) == id {
                return Some(slot);
            }
            b = (b + 1) & mask;
        }
    }

    /// Records that `slot` holds `id` (not already present).
    pub(crate) fn insert(&mut self, id: EndpointId, slot: u32, id_of: impl Fn(u32) -> EndpointId) {
        if 2 * (self.len + 1) > self.buckets.len() {
            self.resize((self.buckets.len() * 2).max(8), &id_of);
        }
        self.place(id, slot);
        self.len += 1;
    }

    fn place(&mut self, id: EndpointId, slot: u32) {
        let mask = self.buckets.len() - 1;
        let mut b = self.home(id);
        while self.buckets[b] != FREE {
            b = (b + 1) & mask;
        }
        self.buckets[b] = slot;
    }

    /// Forgets `id` (held by `slot`); `id_of` still reads every other slot's id.
    pub(crate) fn remove(&mut self, id: EndpointId, slot: u32, id_of: impl Fn(u32) -> EndpointId) {
        if self.len == 0 {
            return;
        }
        let mask = self.buckets.len() - 1;
        let mut b = self.home(id);
        loop {
            match self.buckets[b] {
                FREE => return,
                s if s == slot => break,
                _ => b = (b + 1) & mask,
            }
        }
        // Backward-shift deletion: move later entries of the run back over the hole
        // when their home allows it.
        let mut hole = b;
        let mut next = (b + 1) & mask;
        while self.buckets[next] != FREE {
            let home = self.home(id_of(self.buckets[next]));
            // Movable when its home is not within (hole, next], cyclically.
            let dist_home = next.wrapping_sub(home) & mask;
            let dist_hole = next.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                self.buckets[hole] = self.buckets[next];
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.buckets[hole] = FREE;
        self.len -= 1;
        if self.buckets.len() > 8 && 8 * self.len < self.buckets.len() {
            self.resize(self.buckets.len() / 2, &id_of);
        }
    }

    fn resize(&mut self, buckets: usize, id_of: &impl Fn(u32) -> EndpointId) {
        let old = std::mem::replace(&mut self.buckets, vec![FREE; buckets]);
        for slot in old.into_iter().filter(|&s| s != FREE) {
            self.place(id_of(slot), slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_inserts_and_removals() {
        let mut rng = fastrand::Rng::with_seed(3);
        // Slot number → id; a few ids share low bits, to make runs.
        let ids: Vec<EndpointId> = (0..600u64)
            .map(|i| EndpointId(if i % 5 == 0 { i << 20 } else { rng.u64(..) }))
            .collect();
        let id_of = |s: u32| ids[s as usize];
        let mut index = IdIndex::default();
        let mut present = vec![false; ids.len()];
        for step in 0..20_000 {
            let s = rng.usize(0..ids.len());
            if present[s] {
                index.remove(ids[s], s as u32, id_of);
            } else {
                index.insert(ids[s], s as u32, id_of);
            }
            present[s] = !present[s];
            if step % 97 == 0 {
                for (t, &p) in present.iter().enumerate() {
                    let want = p.then_some(t as u32);
                    assert_eq!(index.get(ids[t], id_of), want, "step {step}, slot {t}");
                }
            }
        }
    }
}
