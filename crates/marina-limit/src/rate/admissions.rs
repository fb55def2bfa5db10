//! The admitted count, without an atomic read-modify-write per request: a service that
//! keeps admitting counts in a slot of its own.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

/// After this many admissions through one service (clone), it counts in a slot of its
/// own. A clone made per request never gets there, and costs what it did: one shared
/// atomic add. A long-lived one pays for its slot (an allocation and a lock) once.
const OWN_SLOT_AFTER: u32 = 64;

/// A limiter's admissions: a shared count, and the slots of the services that admit
/// often. Their sum, read under the lock that services take to join and to leave, is
/// the total: every admission is in exactly one place.
#[derive(Default)]
pub(crate) struct Admissions {
    /// Admissions counted by services without a slot, by waits admitted in a future,
    /// and by the slots of services gone.
    shared: AtomicU64,
    /// The slots of live services.
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// A service's own count, written by that service alone. Aligned to its own cache
/// lines, so that services on different threads do not write one line.
#[derive(Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

impl Admissions {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one admission in the shared count.
    pub(crate) fn add_shared(&self) {
        self.shared.fetch_add(1, Relaxed);
    }

    /// Admissions so far.
    pub(crate) fn total(&self) -> u64 {
        let slots = self.lock();
        slots
            .iter()
            .fold(self.shared.load(Relaxed), |n, s| n + s.0.load(Relaxed))
    }
}

/// One service's admission counter: the shared count for its first
/// [`OWN_SLOT_AFTER`] admissions, then a slot of its own, bumped with a plain load and
/// store (the service is its only writer: it counts under `&mut self`).
#[derive(Default)]
pub(crate) struct Counter {
    own: Option<Own>,
    /// Admissions counted in the shared count, up to `OWN_SLOT_AFTER`.
    shared: u32,
}

/// A slot in a limiter's list; its count goes to the shared one when the service goes.
struct Own {
    slot: Arc<Slot>,
    admissions: Arc<Admissions>,
}

impl Counter {
    /// Counts one admission.
    #[inline]
    pub(crate) fn add(&mut self, admissions: &Arc<Admissions>) {
        match &self.own {
            Some(own) => {
                let n = &own.slot.0;
                n.store(n.load(Relaxed) + 1, Relaxed);
            }
            None => self.add_shared(admissions),
        }
    }

    fn add_shared(&mut self, admissions: &Arc<Admissions>) {
        admissions.add_shared();
        self.shared += 1;
        if self.shared == OWN_SLOT_AFTER {
            let slot = Arc::new(Slot::default());
            admissions.lock().push(slot.clone());
            self.own = Some(Own {
                slot,
                admissions: admissions.clone(),
            });
        }
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        let mut slots = self.admissions.lock();
        // Under the lock: `total` sees the count in the slot or in the shared count,
        // never in both or neither.
        self.admissions
            .shared
            .fetch_add(self.slot.0.load(Relaxed), Relaxed);
        slots.retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_admission_counts_once_through_slots_and_their_retirement() {
        let admissions = Arc::new(Admissions::default());
        let mut long_lived = Counter::default();
        let mut casual = Counter::default();
        for _ in 0..1000 {
            long_lived.add(&admissions);
        }
        for _ in 0..10 {
            casual.add(&admissions);
        }
        assert!(long_lived.own.is_some() && casual.own.is_none());
        assert_eq!(admissions.lock().len(), 1);
        assert_eq!(admissions.total(), 1010);
        drop(long_lived);
        assert_eq!(admissions.lock().len(), 0);
        assert_eq!(admissions.total(), 1010);
        admissions.add_shared();
        assert_eq!(admissions.total(), 1011);
    }
}
