//! Slot accounting: the small concurrent core of the pool.
//!
//! A *slot* is the right to own one connection. `open` counts slots taken: idle
//! connections, checked-out connections and connects in flight. `open <= max` holds
//! except right after a shrink, when it only ever decreases until it fits again.
//!
//! Everything sits behind one mutex, held for a handful of instructions: the idle
//! queue, the counters and the FIFO queue of waiters. A connection put back while
//! someone waits goes straight to the oldest waiter (no barging: a newcomer never takes
//! it first), and a slot freed while someone waits becomes that waiter's permission to
//! connect. Because the decision "take or queue" and the decision "hand off or keep"
//! are made under the same lock, no wake-up can be lost.
//!
//! Cancelled waiters are marked, not searched for; they are skipped when popped and the
//! queue is compacted when dead entries outnumber live ones, so it stays bounded by
//! twice the live waiters.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use crate::sync::{Arc, Mutex, lock};

/// What an acquirer receives.
#[derive(Debug)]
pub(crate) enum Grant<E> {
    /// An idle connection, now checked out.
    Idle(E),
    /// A slot with no connection: the holder must connect, then `put` the connection
    /// or `release` the slot.
    Create,
}

/// The pool is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why a queued waiter got no grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// The pool was closed.
    Closed,
    /// Its deadline passed (see [`Slots::expire`]).
    TimedOut,
}

/// A waiter was queued.
pub(crate) struct Queued<E> {
    pub(crate) waiter: Arc<Waiter<E>>,
    /// The deadline timer is parked on an empty queue and must be woken.
    pub(crate) wake_timer: bool,
}

impl<E> std::fmt::Debug for Queued<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("wake_timer", &self.wake_timer)
            .finish()
    }
}

/// No deadline.
pub(crate) const NEVER: u64 = u64::MAX;

pub(crate) struct Slots<E> {
    state: Mutex<State<E>>,
}

/// Field order matters: what every checkout and return touches comes first, next to
/// the lock, so it shares the lock's cache line; the waiter queue and the rarely
/// written fields come after.
#[repr(C)]
struct State<E> {
    idle: VecDeque<E>,
    open: usize,
    waiting: usize,
    closed: bool,
    lifo: bool,
    /// The deadline timer found the queue empty and waits to be woken.
    timer_parked: bool,
    max: usize,
    waiters: VecDeque<Arc<Waiter<E>>>,
    /// Slots reserved by background refill whose connects are still in flight.
    refilling: usize,
}

/// A queued acquirer.
pub(crate) struct Waiter<E> {
    /// When it gives up, in the caller's time unit; [`NEVER`] for no deadline. Waiters
    /// share one timeout, so deadlines grow along the queue and the front one is due
    /// first: one timer per pool serves them all.
    deadline: u64,
    inner: Mutex<WaiterState<E>>,
}

struct WaiterState<E> {
    waker: Option<Waker>,
    grant: Option<Grant<E>>,
    /// A grant was assigned (and the waiter left the live count), taken or not.
    served: bool,
    cancelled: bool,
    closed: bool,
    timed_out: bool,
}

/// A point-in-time view of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) open: usize,
    pub(crate) idle: usize,
    pub(crate) waiting: usize,
    pub(crate) refilling: usize,
    pub(crate) max: usize,
    pub(crate) closed: bool,
}

/// Wakers collected under the lock, woken after it is released.
type Wakeups = Vec<Waker>;

fn wake_all(wakers: Wakeups) {
    for w in wakers {
        w.wake();
    }
}

impl<E> Slots<E> {
    pub(crate) fn new(max: usize, lifo: bool) -> Self {
        Slots {
            state: Mutex::new(State {
                idle: VecDeque::new(),
                lifo,
                max,
                open: 0,
                waiters: VecDeque::new(),
                waiting: 0,
                timer_parked: false,
                refilling: 0,
                closed: false,
            }),
        }
    }

    /// Takes an idle connection or a free slot without waiting. `Ok(None)` when the
    /// pool is exhausted or others already wait (they go first).
    pub(crate) fn try_acquire(&self) -> Result<Option<Grant<E>>, Closed> {
        let mut st = lock(&self.state);
        st.take()
    }

    /// [`try_acquire`](Self::try_acquire) that also runs `f` under the lock when it
    /// hands out an idle connection (the checkout's reference to the pool is taken
    /// there, while the lock's cache line, which it shares, is held exclusively).
    #[inline]
    pub(crate) fn try_acquire_with<R>(
        &self,
        f: impl FnOnce() -> R,
    ) -> (Result<Option<Grant<E>>, Closed>, Option<R>) {
        let mut st = lock(&self.state);
        let g = st.take();
        let r = matches!(g, Ok(Some(Grant::Idle(_)))).then(f);
        (g, r)
    }

    /// Like [`try_acquire`](Self::try_acquire), but queues a waiter (giving up at
    /// `deadline`) when nothing is free. Deciding and queueing happen under one lock.
    pub(crate) fn acquire_or_wait(
        &self,
        deadline: u64,
    ) -> Result<Result<Grant<E>, Queued<E>>, Closed> {
        let mut st = lock(&self.state);
        if let Some(g) = st.take()? {
            return Ok(Ok(g));
        }
        if st.waiters.len() >= 2 * st.waiting + 16 {
            st.waiters.retain(|w| !lock(&w.inner).cancelled);
        }
        let w = Arc::new(Waiter {
            deadline,
            inner: Mutex::new(WaiterState {
                waker: None,
                grant: None,
                served: false,
                cancelled: false,
                closed: false,
                timed_out: false,
            }),
        });
        st.waiters.push_back(w.clone());
        st.waiting += 1;
        let wake_timer = deadline != NEVER && std::mem::take(&mut st.timer_parked);
        Ok(Err(Queued {
            waiter: w,
            wake_timer,
        }))
    }

    /// For the deadline timer: the front waiter's deadline, or `None` when nobody
    /// waits, in which case the timer counts as parked until a waiter with a deadline
    /// is queued (its [`Queued::wake_timer`] says so).
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        let mut st = lock(&self.state);
        while let Some(w) = st.waiters.front() {
            if lock(&w.inner).cancelled {
                st.waiters.pop_front();
            } else if w.deadline == NEVER {
                // Nothing to time out at the front; park until woken.
                break;
            } else {
                return Some(w.deadline);
            }
        }
        st.timer_parked = true;
        None
    }

    /// Times out every waiter whose deadline is at or before `now`, from the front.
    pub(crate) fn expire(&self, now: u64) {
        let mut wakeups = Wakeups::new();
        let mut st = lock(&self.state);
        while let Some(w) = st.waiters.front() {
            if w.deadline > now {
                // Not due yet (`NEVER` never is): neither is anyone behind it.
                break;
            }
            let w = st.waiters.pop_front().expect("front exists");
            let mut ws = lock(&w.inner);
            if ws.cancelled {
                continue;
            }
            st.waiting -= 1;
            ws.served = true;
            ws.timed_out = true;
            wakeups.extend(ws.waker.take());
        }
        drop(st);
        wake_all(wakeups);
    }

    /// Polls a queued waiter for its grant.
    pub(crate) fn poll_waiter(
        &self,
        w: &Waiter<E>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Grant<E>, WaitError>> {
        let mut ws = lock(&w.inner);
        if let Some(g) = ws.grant.take() {
            return Poll::Ready(Ok(g));
        }
        if ws.closed {
            return Poll::Ready(Err(WaitError::Closed));
        }
        if ws.timed_out {
            return Poll::Ready(Err(WaitError::TimedOut));
        }
        match &ws.waker {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => ws.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Withdraws a waiter that will not be polled again. A grant it already received
    /// is passed on (to the next waiter, or back to the idle queue), so nothing leaks.
    /// Returns a connection that must be destroyed, if passing it on was not possible.
    pub(crate) fn cancel(&self, w: &Waiter<E>) -> Option<E> {
        let mut wakeups = Wakeups::new();
        let mut st = lock(&self.state);
        let grant = {
            let mut ws = lock(&w.inner);
            if ws.cancelled {
                return None;
            }
            ws.cancelled = true;
            let g = ws.grant.take();
            if !ws.served && !ws.closed {
                st.waiting -= 1;
            }
            g
        };
        let out = match grant {
            Some(Grant::Idle(e)) => st.put(e, &mut wakeups),
            Some(Grant::Create) => {
                st.release(&mut wakeups);
                None
            }
            None => None,
        };
        drop(st);
        wake_all(wakeups);
        out
    }

    /// Returns a checked-out connection. Handed to the oldest waiter, or queued idle.
    /// Returns it back when the pool is closed or over its size: the caller destroys it.
    pub(crate) fn put(&self, e: E) -> Option<E> {
        let mut wakeups = Wakeups::new();
        let out = lock(&self.state).put(e, &mut wakeups);
        wake_all(wakeups);
        out
    }

    /// Gives up a slot whose connection is gone (destroyed, or a connect that failed).
    pub(crate) fn release(&self) {
        let mut wakeups = Wakeups::new();
        lock(&self.state).release(&mut wakeups);
        wake_all(wakeups);
    }

    /// Reserves a slot for a background connect (warm-up, refill) while fewer than
    /// `min_idle` connections are idle or being refilled, the pool has room and nobody
    /// waits. The caller ends the reservation with [`refilled`](Self::refilled).
    pub(crate) fn try_reserve_refill(&self, min_idle: usize) -> bool {
        let mut st = lock(&self.state);
        if st.closed
            || st.waiting > 0
            || st.open >= st.max
            || st.idle.len() + st.refilling >= min_idle
        {
            return false;
        }
        st.open += 1;
        st.refilling += 1;
        true
    }

    /// Ends a refill reservation: with a connection (queued idle, or handed to a waiter;
    /// returned back if it must be destroyed) or without one (the slot is freed).
    pub(crate) fn refilled(&self, e: Option<E>) -> Option<E> {
        let mut wakeups = Wakeups::new();
        let mut st = lock(&self.state);
        st.refilling -= 1;
        let out = match e {
            Some(e) => st.put(e, &mut wakeups),
            None => {
                st.release(&mut wakeups);
                None
            }
        };
        drop(st);
        wake_all(wakeups);
        out
    }

    /// Removes idle connections for which `evict` returns true, freeing their slots.
    /// The removed connections are returned for the caller to destroy.
    pub(crate) fn evict_idle(&self, mut evict: impl FnMut(&E) -> bool) -> Vec<E> {
        let mut wakeups = Wakeups::new();
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(st.idle.len());
        while let Some(e) = st.idle.pop_front() {
            if evict(&e) {
                out.push(e)
            } else {
                keep.push_back(e)
            }
        }
        st.idle = keep;
        for _ in 0..out.len() {
            st.release(&mut wakeups);
        }
        drop(st);
        wake_all(wakeups);
        out
    }

    /// Checks out up to `n` idle connections (oldest-returned first) that satisfy
    /// `pick`, keeping their slots: the caller probes them and then `put`s or `release`s
    /// each one.
    pub(crate) fn take_idle(&self, n: usize, mut pick: impl FnMut(&E) -> bool) -> Vec<E> {
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut i = 0;
        while i < st.idle.len() && out.len() < n {
            if pick(&st.idle[i]) {
                out.extend(st.idle.remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Changes the maximum. Growing lets waiters connect at once; shrinking drops idle
    /// connections over the new size (returned for destruction) and destroys checked-out
    /// ones as they come back until the pool fits.
    pub(crate) fn resize(&self, max: usize) -> Vec<E> {
        let mut wakeups = Wakeups::new();
        let mut st = lock(&self.state);
        if st.closed {
            // A closed pool has no size to change: it stays at 0.
            return Vec::new();
        }
        st.max = max;
        let mut out = Vec::new();
        while st.open > st.max {
            let Some(e) = st.pop_idle() else { break };
            st.open -= 1;
            out.push(e);
        }
        st.grant_slots(&mut wakeups);
        drop(st);
        wake_all(wakeups);
        out
    }

    /// Closes: waiters are woken with `Closed`, later acquires fail, idle connections
    /// are returned for destruction, and the maximum reads 0 from now on.
    pub(crate) fn close(&self) -> Vec<E> {
        let mut wakeups = Wakeups::new();
        let mut st = lock(&self.state);
        st.closed = true;
        st.max = 0;
        let idle: Vec<E> = st.idle.drain(..).collect();
        st.open -= idle.len();
        for w in st.waiters.drain(..) {
            let mut ws = lock(&w.inner);
            if !ws.cancelled {
                ws.closed = true;
                wakeups.extend(ws.waker.take());
            }
        }
        st.waiting = 0;
        drop(st);
        wake_all(wakeups);
        idle
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = lock(&self.state);
        Snapshot {
            open: st.open,
            idle: st.idle.len(),
            waiting: st.waiting,
            refilling: st.refilling,
            max: st.max,
            closed: st.closed,
        }
    }

    /// Calls `f` on each idle connection (for stats), under the lock.
    pub(crate) fn for_each_idle(&self, mut f: impl FnMut(&E)) {
        let st = lock(&self.state);
        st.idle.iter().for_each(&mut f);
    }
}

impl<E> State<E> {
    fn take(&mut self) -> Result<Option<Grant<E>>, Closed> {
        if self.closed {
            return Err(Closed);
        }
        if self.waiting > 0 {
            return Ok(None);
        }
        if let Some(e) = self.pop_idle() {
            return Ok(Some(Grant::Idle(e)));
        }
        if self.open < self.max {
            self.open += 1;
            return Ok(Some(Grant::Create));
        }
        Ok(None)
    }

    fn pop_idle(&mut self) -> Option<E> {
        if self.lifo {
            self.idle.pop_back()
        } else {
            self.idle.pop_front()
        }
    }

    fn put(&mut self, e: E, wakeups: &mut Wakeups) -> Option<E> {
        if self.closed || self.open > self.max {
            self.open -= 1;
            self.grant_slots(wakeups);
            return Some(e);
        }
        while let Some(w) = self.waiters.pop_front() {
            let mut ws = lock(&w.inner);
            if ws.cancelled {
                continue;
            }
            self.waiting -= 1;
            ws.served = true;
            ws.grant = Some(Grant::Idle(e));
            wakeups.extend(ws.waker.take());
            return None;
        }
        self.idle.push_back(e);
        None
    }

    fn release(&mut self, wakeups: &mut Wakeups) {
        self.open -= 1;
        self.grant_slots(wakeups);
    }

    /// Turns free capacity into `Create` grants for the oldest live waiters.
    fn grant_slots(&mut self, wakeups: &mut Wakeups) {
        if self.closed {
            return;
        }
        while self.open < self.max {
            let Some(w) = self.waiters.pop_front() else {
                return;
            };
            let mut ws = lock(&w.inner);
            if ws.cancelled {
                continue;
            }
            self.waiting -= 1;
            self.open += 1;
            ws.served = true;
            ws.grant = Some(Grant::Create);
            wakeups.extend(ws.waker.take());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::task::Waker;

    fn poll_once(s: &Slots<u32>, w: &Waiter<u32>) -> Poll<Result<Grant<u32>, WaitError>> {
        s.poll_waiter(w, &mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn lifo_and_fifo_reuse_order() {
        for (lifo, first) in [(true, 2), (false, 1)] {
            let s = Slots::<u32>::new(2, lifo);
            assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
            assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
            assert!(matches!(s.try_acquire(), Ok(None)));
            assert!(s.put(1).is_none());
            assert!(s.put(2).is_none());
            match s.try_acquire() {
                Ok(Some(Grant::Idle(e))) => assert_eq!(e, first, "lifo = {lifo}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn waiters_are_served_in_order_and_newcomers_do_not_barge() {
        let s = Slots::<u32>::new(1, true);
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        let waiters: Vec<_> = (0..3)
            .map(|_| s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter)
            .collect();
        assert_eq!(s.snapshot().waiting, 3);
        assert!(s.put(10).is_none());
        // The first waiter got it; a newcomer must not take anything while others wait.
        assert!(matches!(s.try_acquire(), Ok(None)));
        assert!(matches!(poll_once(&s, &waiters[1]), Poll::Pending));
        match poll_once(&s, &waiters[0]) {
            Poll::Ready(Ok(Grant::Idle(10))) => {}
            other => panic!("{other:?}"),
        }
        // A destroyed connection frees its slot for the next waiter to connect.
        s.release();
        assert!(matches!(
            poll_once(&s, &waiters[1]),
            Poll::Ready(Ok(Grant::Create))
        ));
        assert!(matches!(poll_once(&s, &waiters[2]), Poll::Pending));
        assert_eq!(s.snapshot().waiting, 1);
    }

    #[test]
    fn cancelled_waiter_passes_its_grant_on() {
        let s = Slots::<u32>::new(1, true);
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        let a = s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter;
        let b = s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter;
        assert!(s.put(5).is_none()); // granted to `a`, who never looks
        assert!(s.cancel(&a).is_none());
        match poll_once(&s, &b) {
            Poll::Ready(Ok(Grant::Idle(5))) => {}
            other => panic!("{other:?}"),
        }
        let snap = s.snapshot();
        assert_eq!((snap.open, snap.idle, snap.waiting), (1, 0, 0));
        // Cancelling twice, or after completion, changes nothing.
        assert!(s.cancel(&a).is_none());
        assert!(s.cancel(&b).is_none());
        assert_eq!(s.snapshot().waiting, 0);
    }

    #[test]
    fn cancelled_waiters_do_not_pile_up() {
        let s = Slots::<u32>::new(1, true);
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        for _ in 0..10_000 {
            let w = s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter;
            s.cancel(&w);
        }
        assert_eq!(s.snapshot().waiting, 0);
        assert!(lock(&s.state).waiters.len() <= 17);
    }

    #[test]
    fn shrink_closes_idle_then_returns_until_it_fits() {
        let s = Slots::<u32>::new(3, true);
        for _ in 0..3 {
            assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        }
        assert!(s.put(1).is_none());
        let out = s.resize(1);
        assert_eq!(out, vec![1]);
        assert_eq!(s.snapshot().open, 2);
        assert_eq!(s.put(2), Some(2), "over size: destroyed on return");
        assert!(s.put(3).is_none(), "fits now: kept");
        let snap = s.snapshot();
        assert_eq!((snap.open, snap.idle, snap.max), (1, 1, 1));
        // Growing lets a waiter connect at once.
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Idle(3)))));
        let w = s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter;
        assert!(s.resize(2).is_empty());
        assert!(matches!(poll_once(&s, &w), Poll::Ready(Ok(Grant::Create))));
    }

    #[test]
    fn close_rejects_everyone_and_hands_back_idle() {
        let s = Slots::<u32>::new(2, true);
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        assert!(s.put(1).is_none());
        let w = s.acquire_or_wait(NEVER);
        assert!(matches!(w, Ok(Ok(Grant::Idle(1)))));
        let w = s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter;
        assert!(s.close().is_empty());
        assert!(matches!(
            poll_once(&s, &w),
            Poll::Ready(Err(WaitError::Closed))
        ));
        assert!(matches!(s.try_acquire(), Err(Closed)));
        assert_eq!(s.put(1), Some(1));
        s.release();
        let snap = s.snapshot();
        assert_eq!(
            (snap.open, snap.idle, snap.waiting, snap.closed),
            (0, 0, 0, true)
        );
    }

    #[test]
    fn deadlines_expire_from_the_front_and_the_timer_parks_on_an_empty_queue() {
        let s = Slots::<u32>::new(1, true);
        assert_eq!(s.next_deadline(), None);
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        let a = s.acquire_or_wait(10).unwrap().unwrap_err();
        assert!(a.wake_timer, "the parked timer must be woken");
        let b = s.acquire_or_wait(20).unwrap().unwrap_err();
        assert!(!b.wake_timer, "the timer is awake already");
        let c = s.acquire_or_wait(30).unwrap().unwrap_err();
        assert_eq!(s.next_deadline(), Some(10));
        s.cancel(&b.waiter);
        s.expire(25);
        assert!(matches!(
            poll_once(&s, &a.waiter),
            Poll::Ready(Err(WaitError::TimedOut))
        ));
        assert!(matches!(poll_once(&s, &c.waiter), Poll::Pending));
        assert_eq!(s.snapshot().waiting, 1);
        assert_eq!(s.next_deadline(), Some(30));
        // A timed-out waiter's later cancel changes nothing; the live one still gets served.
        assert!(s.cancel(&a.waiter).is_none());
        assert!(s.put(4).is_none());
        assert!(matches!(
            poll_once(&s, &c.waiter),
            Poll::Ready(Ok(Grant::Idle(4)))
        ));
        assert_eq!(s.snapshot().waiting, 0);
        assert_eq!(s.next_deadline(), None);
        assert!(s.acquire_or_wait(40).unwrap().unwrap_err().wake_timer);
    }

    #[test]
    fn refill_reserves_only_what_is_missing() {
        let s = Slots::<u32>::new(4, true);
        assert!(s.try_reserve_refill(2));
        assert!(s.try_reserve_refill(2));
        assert!(!s.try_reserve_refill(2), "two already in flight");
        assert!(s.refilled(Some(1)).is_none());
        assert!(s.refilled(None).is_none());
        let snap = s.snapshot();
        assert_eq!((snap.open, snap.idle, snap.refilling), (1, 1, 0));
        assert!(s.try_reserve_refill(2));
        // Nobody waiting is ever starved by refill: with a waiter queued, refill stops.
        let s = Slots::<u32>::new(1, true);
        assert!(matches!(s.try_acquire(), Ok(Some(Grant::Create))));
        let _w = s.acquire_or_wait(NEVER).unwrap().unwrap_err().waiter;
        assert!(!s.try_reserve_refill(5));
    }
}
