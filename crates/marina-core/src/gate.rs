use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

/// The link between a balancer's **panic threshold** and the health checks of its
/// endpoints (Envoy's "panic mode").
///
/// Health layers [`join`](Self::join) the gate and report whether their endpoint is
/// ejected; the balancer reads the [`healthy_share`](Self::healthy_share) and, when it
/// falls below its threshold, [`open`s](Self::set_open) the gate. While the gate is
/// open, health layers let requests through to ejected endpoints: when most endpoints
/// look unhealthy, the health checks are more likely wrong (or the whole fleet is
/// overloaded) than all of those backends dead, and concentrating all traffic on the
/// few that remain would take them down too.
///
/// Clones share one gate.
///
/// ```
/// use marina_core::EjectionGate;
///
/// let gate = EjectionGate::new();
/// let a = gate.join();
/// let b = gate.join();
/// a.set_ejected(true);
/// assert_eq!(gate.healthy_share(), 0.5);
/// assert!(!gate.is_open());
/// gate.set_open(true); // the balancer's decision
/// assert!(b.gate_open());
/// drop(a); // a member that leaves takes its ejection with it
/// assert_eq!(gate.healthy_share(), 1.0);
/// ```
#[derive(Clone, Default)]
pub struct EjectionGate {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    members: AtomicUsize,
    ejected: AtomicUsize,
    open: AtomicBool,
    /// Bumped whenever a member's ejection changes.
    changes: std::sync::atomic::AtomicU64,
    /// The balancer's task, woken when a member's ejection changes.
    watcher: Mutex<Option<Waker>>,
}

impl fmt::Debug for EjectionGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EjectionGate")
            .field("members", &self.inner.members.load(Ordering::Relaxed))
            .field("ejected", &self.inner.ejected.load(Ordering::Relaxed))
            .field("open", &self.is_open())
            .finish()
    }
}

impl EjectionGate {
    /// A closed gate with no members.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a member (one endpoint's health check), not ejected.
    pub fn join(&self) -> GateMember {
        self.inner.members.fetch_add(1, Ordering::Relaxed);
        GateMember {
            gate: self.clone(),
            ejected: AtomicBool::new(false),
        }
    }

    /// The share of members not ejected, in `[0, 1]`; 1 with no members.
    pub fn healthy_share(&self) -> f64 {
        // Read `ejected` first: a member leaving lowers it before `members`.
        let ejected = self.inner.ejected.load(Ordering::Acquire);
        let members = self.inner.members.load(Ordering::Acquire);
        if members == 0 {
            return 1.0;
        }
        1.0 - ejected.min(members) as f64 / members as f64
    }

    /// Members now, and how many of them are ejected.
    pub fn counts(&self) -> (usize, usize) {
        let ejected = self.inner.ejected.load(Ordering::Acquire);
        let members = self.inner.members.load(Ordering::Acquire);
        (members, ejected.min(members))
    }

    /// Opens (true: ejected endpoints take traffic) or closes the gate.
    pub fn set_open(&self, open: bool) {
        self.inner.open.store(open, Ordering::Release);
    }

    /// Whether the gate is open.
    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    /// A number that changes whenever a member is ejected or readmitted (or leaves):
    /// the balancer compares it to notice ejections of endpoints it did not just call
    /// (an active probe's).
    pub fn changes(&self) -> u64 {
        self.inner.changes.load(Ordering::Acquire)
    }

    /// Wakes `waker` (once) the next time a member's ejection changes: the balancer
    /// registers its task so it re-evaluates the threshold even while it waits.
    pub fn watch(&self, waker: &Waker) {
        let mut w = self
            .inner
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !w.as_ref().is_some_and(|old| old.will_wake(waker)) {
            *w = Some(waker.clone());
        }
    }

    fn wake_watcher(&self) {
        self.inner.changes.fetch_add(1, Ordering::AcqRel);
        let w = self
            .inner
            .watcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// One member of an [`EjectionGate`]: reports its endpoint's ejection, reads the gate.
/// Dropping it leaves the gate.
pub struct GateMember {
    gate: EjectionGate,
    ejected: AtomicBool,
}

impl fmt::Debug for GateMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateMember")
            .field("ejected", &self.ejected.load(Ordering::Relaxed))
            .field("gate_open", &self.gate_open())
            .finish()
    }
}

impl GateMember {
    /// Reports whether this member's endpoint is ejected now.
    pub fn set_ejected(&self, ejected: bool) {
        if self.ejected.swap(ejected, Ordering::AcqRel) != ejected {
            if ejected {
                self.gate.inner.ejected.fetch_add(1, Ordering::AcqRel);
            } else {
                self.gate.inner.ejected.fetch_sub(1, Ordering::AcqRel);
            }
            self.gate.wake_watcher();
        }
    }

    /// Whether the gate is open: ejected endpoints should take traffic.
    pub fn gate_open(&self) -> bool {
        self.gate.is_open()
    }

    /// The gate this member belongs to.
    pub fn gate(&self) -> &EjectionGate {
        &self.gate
    }
}

impl Drop for GateMember {
    fn drop(&mut self) {
        self.set_ejected(false);
        self.gate.inner.members.fetch_sub(1, Ordering::AcqRel);
        self.gate.wake_watcher();
    }
}
