//! The event log of one run, and its digest.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A request's id: unique within a run.
pub type Id = u64;

/// Something that happened in a run, in the order it happened (turmoil runs every host
/// on one thread, so the order is the run's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client sent a request into the stack.
    Issued {
        /// The request.
        id: Id,
        /// The client task that sent it.
        client: usize,
        /// Its key (user): the per-key limit's key.
        key: String,
        /// Its session: the sticky session's key.
        session: String,
        /// Marked idempotent (failover may send it again after it may have been sent).
        idempotent: bool,
    },
    /// A backend read a request line.
    Delivered {
        /// The request.
        id: Id,
        /// The backend's index.
        backend: usize,
        /// The backend-side connection it came on (a counter per backend).
        conn: u64,
    },
    /// The client side wrote a request line to backend `backend` (the stream under the
    /// stack saw the whole line go out).
    Sent {
        /// The request.
        id: Id,
        /// The backend's index.
        backend: usize,
    },
    /// A backend wrote its reply.
    Replied {
        /// The request.
        id: Id,
        /// The backend's index.
        backend: usize,
    },
    /// The client got its request's outcome.
    Outcome {
        /// The request.
        id: Id,
        /// `Ok(backend)`: its own echo, from that backend; `Err`: the error, as text.
        result: Result<usize, String>,
        /// How long the service took to be ready for it (`poll_ready`: the balancer
        /// waits for a ready backend, up to the stack's fail-fast timeout).
        waited: Duration,
        /// How long the call took, from `call` to its outcome (sim time).
        took: Duration,
    },
    /// A reply that was not the request's own echo.
    WrongReply {
        /// The request.
        id: Id,
        /// What came back.
        reply: String,
    },
    /// The client side's connect to a backend completed (the stack got the stream).
    Connected {
        /// The backend.
        backend: usize,
        /// The client's port.
        port: u16,
    },
    /// A backend accepted a connection.
    Accepted {
        /// The backend.
        backend: usize,
        /// Its connection number.
        conn: u64,
    },
    /// A backend's connection ended (closed by the peer, or the host crashed).
    Closed {
        /// The backend.
        backend: usize,
        /// Its connection number.
        conn: u64,
    },
    /// A fault or a scenario step was applied.
    Fault(String),
    /// The stack's health status of a backend changed (as the client host's monitor
    /// saw it): ejected or not.
    Ejected {
        /// The backend.
        backend: usize,
        /// Ejected now.
        ejected: bool,
    },
    /// The balancer entered or left panic mode.
    Panic(bool),
    /// A backend joined (true) or left (false) the stack by discovery.
    Discovery {
        /// The backend.
        backend: usize,
        /// Added (true) or removed (false).
        added: bool,
    },
    /// The stack shut down: requests left in flight, and connections its pools held
    /// after.
    Shutdown {
        /// `StackHandle::shutdown`'s answer.
        left: usize,
        /// Connections open in all pools after the shutdown.
        pool_total: usize,
    },
    /// The sticky table's counts at the end (`AffinityStats`).
    Sessions {
        /// Sessions created.
        created: u64,
        /// Sessions moved to another backend.
        repinned: u64,
    },
    /// After the shutdown and a grace period: a backend's open connections (its own
    /// count, and turmoil's count of established streams on its host).
    Leftover {
        /// The backend.
        backend: usize,
        /// Connections its handler tasks still hold: the client's port of each.
        open: Vec<u16>,
        /// Established TCP streams on its host (turmoil's view).
        established: usize,
    },
    /// A host's software failed, or the simulation did.
    HostError(String),
    /// After the shutdown and a grace period: the client side's streams still alive
    /// (connections the stack still holds), and turmoil's count of TCP sockets on the
    /// client host (which also keeps the socket of every connect that failed or was
    /// abandoned before it completed: not checked).
    ClientStreams {
        /// Streams the stack still holds.
        live: usize,
        /// Turmoil's sockets on the client host.
        sockets: usize,
    },
    /// Free text (scenario notes, stats).
    Note(String),
}

/// One entry: when (sim time since start) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sim time since the run started.
    pub at: Duration,
    /// What happened.
    pub event: Event,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>9.3}s {:?}", self.at.as_secs_f64(), self.event)
    }
}

/// The run's event log, shared by every host (`Arc<Mutex<…>>`: turmoil is
/// single-threaded, but the stack's tasks must be `Send`).
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Entry>>>, Arc<std::sync::atomic::AtomicUsize>);

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Log({} entries)", self.lock().len())
    }
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `event` now (the sim's time, as the current host sees it).
    pub fn push(&self, event: Event) {
        let at = turmoil::sim_elapsed().unwrap_or_default();
        self.push_at(at, event);
    }

    /// Records `event` at `at` (from outside a host: the driver).
    pub fn push_at(&self, at: Duration, event: Event) {
        self.lock().push(Entry { at, event });
    }

    /// The client side's streams alive now ([`SimStream`](crate::stream::SimStream)s
    /// not yet dropped): the connections the stack holds.
    pub fn live_streams(&self) -> &std::sync::atomic::AtomicUsize {
        &self.1
    }

    /// A copy of the entries so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().clone()
    }
}

/// A digest of the ordered entries: FNV-1a (64-bit) over each entry's text. The same
/// seed must give the same digest.
pub fn digest(entries: &[Entry]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in entries {
        for b in e.to_string().bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
