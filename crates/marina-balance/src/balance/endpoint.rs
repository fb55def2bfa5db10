//! One endpoint in its slot, the waker that tells the balancer it became ready, and the
//! picker's view of the ready set.

use super::*;

/// One endpoint in its slot. Its id and weight live in its `stats`.
pub(crate) struct Endpoint<K, S> {
    pub(crate) key: K,
    pub(crate) svc: S,
    pub(crate) stats: Arc<EndpointStats>,
    /// Position in `ready` when ready, else `NOWHERE`.
    pub(crate) ready_pos: u32,
    /// Position in `pending` when pending, else `NOWHERE`.
    pub(crate) pending_pos: u32,
    /// Requests sent to it (for the one-in-`TIME_EVERY` latency sampling).
    pub(crate) calls: u32,
}

/// Pending endpoints that woke, and the balancer's task to wake for them.
#[derive(Default)]
pub(crate) struct Wakes {
    /// Slots of endpoints that woke since the last `poll_ready`.
    pub(crate) woken: Mutex<Vec<u32>>,
    /// Whether `woken` may hold any (read without its lock).
    pub(crate) any: AtomicBool,
    pub(crate) task: Mutex<Option<Waker>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The waker a pending endpoint is polled with: queues its slot (once) and wakes the
/// balancer's task. A wake-up that comes after the slot was reused only makes the
/// balancer poll that slot's endpoint once more.
pub(crate) struct SlotWaker {
    pub(crate) slot: u32,
    pub(crate) queued: AtomicBool,
    pub(crate) wakes: Arc<Wakes>,
}

impl std::task::Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Each waker queues its slot at most once: the balancer polls the endpoint
        // with a new waker then, so the queue never holds more than one entry per poll.
        if self.queued.swap(true, AcqRel) {
            return;
        }
        lock(&self.wakes.woken).push(self.slot);
        self.wakes.any.store(true, Release);
        let task = lock(&self.wakes.task).clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// `Endpoint::ready_pos` or `pending_pos` when it is not in that list.
pub(crate) const NOWHERE: u32 = u32::MAX;

/// The id of the endpoint in `slot` (a free slot reads as id 0; the index never holds
/// one).
pub(crate) fn id_in<K, S>(slots: &[Option<Endpoint<K, S>>], slot: u32) -> EndpointId {
    slots
        .get(slot as usize)
        .and_then(Option::as_ref)
        .map_or(EndpointId(0), Endpoint::id)
}

impl<K, S> Endpoint<K, S> {
    pub(crate) fn id(&self) -> EndpointId {
        self.stats.id
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready_pos != NOWHERE
    }
}

/// The picker's view: the ready endpoints, in the ready set's order.
pub(crate) struct ReadyView<'a, K, S> {
    pub(crate) slots: &'a [Option<Endpoint<K, S>>],
    pub(crate) ready: &'a [u32],
    pub(crate) generation: u64,
    /// The running count of requests in flight, when the picker reads it.
    pub(crate) total: Option<&'a AtomicU64>,
}

impl<K, S> ReadyView<'_, K, S> {
    pub(crate) fn ep(&self, i: usize) -> &Endpoint<K, S> {
        self.slots[self.ready[i] as usize]
            .as_ref()
            .expect("ready endpoints exist")
    }
}

impl<K, S> Endpoints for ReadyView<'_, K, S> {
    fn len(&self) -> usize {
        self.ready.len()
    }
    fn id(&self, i: usize) -> EndpointId {
        self.ep(i).id()
    }
    fn load(&self, i: usize) -> f64 {
        self.ep(i).stats.in_flight() as f64
    }
    fn total_load(&self) -> f64 {
        match self.total {
            Some(t) => t.load(Relaxed) as f64,
            None => (0..self.len()).map(|i| self.load(i)).sum(),
        }
    }
    fn latency(&self, i: usize) -> Option<Duration> {
        self.ep(i).stats.ewma()
    }
    fn weight(&self, i: usize) -> u32 {
        self.ep(i).stats.weight
    }
    fn generation(&self) -> Option<u64> {
        Some(self.generation)
    }
}
