//! HTTP/2's shared pool mode: connections checked out of the pool are *leased* and
//! carry many requests at once, each up to its server's stream limit.
//!
//! A request takes a stream on the first leased connection with room. When every one is
//! full it waits for a connection being opened (if its expected streams are not all
//! spoken for) or opens one itself — checking out of the pool, which reuses an idle
//! connection first, and bounds them all by `max_size`. When the pool is at `max_size`
//! it waits for a stream to end. A leased connection goes back to the pool when its last
//! stream ends, so the pool's idle timeout, lifetime and health checks see it exactly as
//! an HTTP/1 connection; one that got a `GOAWAY`, closed or outlived `max_lifetime`
//! takes no new stream and is closed once its last stream ends.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use hyper::client::conn::http2;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::body::ReqBody;
use super::conn::{HttpConn, Kind};
use super::tap::Seen;
use crate::sync::lock_std;
use crate::{PoolError, Pooled};

/// How many streams a connection not yet opened is expected to carry, before any
/// server said: hyper's own initial limit.
const FIRST_GUESS: usize = 100;

/// A connection leased out of the pool for shared use.
pub(crate) struct Lease<B> {
    pub(crate) sender: http2::SendRequest<ReqBody<B>>,
    seen: Arc<Seen>,
    capacity: usize,
    /// Streams in flight; changed under the state lock.
    streams: AtomicUsize,
    draining: AtomicBool,
    expires: Option<Instant>,
}

impl<B> Lease<B> {
    fn usable(&self) -> bool {
        if self.draining.load(Relaxed) {
            return false;
        }
        if self.seen.goaway() || self.sender.is_closed() {
            self.draining.store(true, Relaxed);
            return false;
        }
        true
    }

    /// Takes no new streams from now on.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Relaxed);
    }
}

struct Slot<B> {
    lease: Arc<Lease<B>>,
    guard: Pooled<HttpConn<B>>,
}

struct State<B> {
    slots: Vec<Slot<B>>,
    connecting: usize,
    /// Requests waiting for a connection being opened.
    waiting: usize,
    /// Streams a connection being opened is expected to carry: the last server's limit.
    expected: usize,
    acquired: u64,
}

/// The shared leases of one client, and the count of its requests in flight.
pub(crate) struct Shared<B> {
    state: std::sync::Mutex<State<B>>,
    notify: Notify,
    pub(crate) in_flight: AtomicUsize,
    max_size: usize,
    max_streams: usize,
    max_lifetime: Option<Duration>,
}

/// What a request got: a connection of its own (HTTP/1), or a stream on a shared one.
pub(crate) enum Checkout<B> {
    Own(Pooled<HttpConn<B>>),
    Stream(Arc<Lease<B>>),
}

impl<B> Shared<B> {
    pub(crate) fn new(max_size: usize, max_streams: usize, max_lifetime: Option<Duration>) -> Self {
        Shared {
            state: std::sync::Mutex::new(State {
                slots: Vec::new(),
                connecting: 0,
                waiting: 0,
                expected: FIRST_GUESS.min(max_streams.max(1)),
                acquired: 0,
            }),
            notify: Notify::new(),
            in_flight: AtomicUsize::new(0),
            max_size,
            max_streams: max_streams.max(1),
            max_lifetime,
        }
    }

    /// Leased connections and the streams they carry now.
    pub(crate) fn leased(&self) -> (usize, usize) {
        let st = lock_std(&self.state);
        let streams = st.slots.iter().map(|s| s.lease.streams.load(Relaxed)).sum();
        (st.slots.len(), streams)
    }

    /// A stream on a leased connection, or a connection from `get` (the pool's
    /// checkout), leased if it is HTTP/2.
    ///
    /// Cancel safe: dropped while waiting, it leaves no count behind; dropped while
    /// `get` runs, the pool's own cancel safety applies.
    pub(crate) async fn acquire<F, Fut>(&self, get: F) -> Result<Checkout<B>, PoolError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Pooled<HttpConn<B>>, PoolError>>,
    {
        // The common case first: a leased connection has room. No waiter registered
        // (that takes `Notify`'s own lock, twice).
        {
            let mut done = Vec::new();
            let found = self.find(&mut lock_std(&self.state), &mut done);
            drop(done);
            if let Some(lease) = found {
                return Ok(Checkout::Stream(lease));
            }
        }
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut done = Vec::new();
            let step = {
                let mut st = lock_std(&self.state);
                let found = self.find(&mut st, &mut done);
                if let Some(lease) = found {
                    Step::Got(lease)
                } else if st.connecting > 0 && st.waiting < st.connecting * st.expected {
                    st.waiting += 1;
                    Step::Wait(true)
                } else if st.slots.len() + st.connecting < self.max_size {
                    st.connecting += 1;
                    Step::Connect
                } else {
                    Step::Wait(false)
                }
            };
            drop(done); // closed leases' guards, outside the lock
            match step {
                Step::Got(lease) => return Ok(Checkout::Stream(lease)),
                Step::Wait(for_pending) => {
                    let _waiting = for_pending.then(|| Counted(self, |st| &mut st.waiting, false));
                    notified.await;
                }
                Step::Connect => {
                    let connecting = Counted(self, |st| &mut st.connecting, true);
                    let lease = self.lease(get().await?);
                    std::mem::forget(connecting);
                    let mut st = lock_std(&self.state);
                    st.connecting -= 1;
                    let checkout = match lease {
                        Ok((lease, guard)) => {
                            st.expected = lease.capacity;
                            st.slots.push(Slot {
                                lease: lease.clone(),
                                guard,
                            });
                            Checkout::Stream(lease)
                        }
                        Err(own) => Checkout::Own(own),
                    };
                    drop(st);
                    self.notify.notify_waiters();
                    return Ok(checkout);
                }
            }
        }
    }

    /// The first leased connection with room, its stream taken. Leases that can take no
    /// more streams and carry none are removed into `done`.
    fn find(&self, st: &mut State<B>, done: &mut Vec<Slot<B>>) -> Option<Arc<Lease<B>>> {
        st.acquired += 1;
        if st.acquired.is_multiple_of(64)
            && let Some(_) = self.max_lifetime
        {
            let now = Instant::now();
            for s in &st.slots {
                if s.lease.expires.is_some_and(|e| e <= now) {
                    s.lease.drain();
                }
            }
        }
        let mut i = 0;
        while i < st.slots.len() {
            let lease = &st.slots[i].lease;
            if lease.usable() {
                let n = lease.streams.load(Relaxed);
                if n < lease.capacity {
                    lease.streams.store(n + 1, Relaxed);
                    return Some(lease.clone());
                }
            } else if lease.streams.load(Relaxed) == 0 {
                let mut slot = st.slots.swap_remove(i);
                slot.guard.mark_broken();
                done.push(slot);
                continue;
            }
            i += 1;
        }
        None
    }

    /// Leases an HTTP/2 connection (one stream taken); gives an HTTP/1 one back.
    #[allow(clippy::type_complexity)]
    fn lease(
        &self,
        conn: Pooled<HttpConn<B>>,
    ) -> Result<(Arc<Lease<B>>, Pooled<HttpConn<B>>), Pooled<HttpConn<B>>> {
        let (sender, seen) = match &conn.kind {
            Kind::H1(_) => return Err(conn),
            Kind::H2 { sender, seen } => (sender.clone(), seen.clone()),
        };
        let capacity = seen.max_streams().clamp(1, self.max_streams);
        let expires = self.max_lifetime.map(|l| conn.born + l);
        let lease = Arc::new(Lease {
            sender,
            seen,
            capacity,
            streams: AtomicUsize::new(1),
            draining: AtomicBool::new(false),
            expires,
        });
        Ok((lease, conn))
    }

    /// Ends a stream of `lease`; its connection goes back to the pool (or is closed, if
    /// draining) when it was the last.
    pub(crate) fn release(&self, lease: &Arc<Lease<B>>) {
        let freed = {
            let mut st = lock_std(&self.state);
            let n = lease.streams.load(Relaxed).saturating_sub(1);
            lease.streams.store(n, Relaxed);
            if n == 0 {
                st.slots
                    .iter()
                    .position(|s| Arc::ptr_eq(&s.lease, lease))
                    .map(|i| st.slots.swap_remove(i))
            } else {
                None
            }
        };
        if let Some(mut slot) = freed
            && !slot.lease.usable()
        {
            slot.guard.mark_broken();
        }
        self.notify.notify_one();
    }
}

enum Step<B> {
    Got(Arc<Lease<B>>),
    /// Wait for a change; `true` when counted as waiting for a connection being opened.
    Wait(bool),
    Connect,
}

/// A count in the state, taken back on drop (cancellation, a failed connect), waking
/// the waiters if it says so.
struct Counted<'a, B>(&'a Shared<B>, fn(&mut State<B>) -> &mut usize, bool);

impl<B> Drop for Counted<'_, B> {
    fn drop(&mut self) {
        {
            let mut st = lock_std(&self.0.state);
            let n = (self.1)(&mut st);
            *n = n.saturating_sub(1);
        }
        if self.2 {
            self.0.notify.notify_waiters();
        }
    }
}
