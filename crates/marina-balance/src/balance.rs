//! `Balance`: a `Service` over discovered endpoints, choosing one per request with a
//! [`Pick`].

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use marina_core::{
    BoxError, EjectionGate, EndpointId, HasExtensions, HintTarget, Idempotent,
    PinnedEndpointUnavailable, RouteHint,
};
use tokio::time::{Instant, Sleep};
use tower::discover::{Change, Discover};
use tower_service::Service;

use crate::failover::Failover;
use crate::future::{ResponseFuture, Retry, RetryState, Track};
use crate::index::IdIndex;
use crate::pick::{Endpoints, Pick, SetChange};
use crate::slow_start::{SlowStart, SlowState};

/// Nothing was ready within the fail-fast timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoReadyEndpoints {
    /// How long the balancer waited for a ready endpoint.
    pub waited: Duration,
}

impl fmt::Display for NoReadyEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no endpoint became ready within {:?}", self.waited)
    }
}

impl std::error::Error for NoReadyEndpoints {}

/// One endpoint's counters, shared with its response futures and the handle.
#[derive(Debug)]
pub(crate) struct EndpointStats {
    /// The endpoint's id.
    pub(crate) id: EndpointId,
    /// Requests dropped before they completed.
    cancelled: AtomicU64,
    errors: AtomicU64,
    /// Requests in flight (low 24 bits) and finished (completed or cancelled, the rest):
    /// one atomic add starts a request, one ends it.
    flow: AtomicU64,
    latency_total_us: AtomicU64,
    /// Completed requests that were timed (one in `TIME_EVERY`).
    timed: AtomicU64,
    /// Peak EWMA of response time: its value in microseconds as `f32` bits (high
    /// half) and the time of its last change in milliseconds since `origin`, wrapping
    /// (low half), in one word so that one compare-exchange updates both; `NO_EWMA`
    /// before the first timed response.
    ewma: AtomicU64,
    /// What the balancer's endpoints share: the zero of `ewma`'s clock, the running
    /// count of requests in flight.
    common: Arc<Common>,
    /// The endpoint's key, as text (for [`BalanceHandle::stats`]).
    key: Box<str>,
    weight: u32,
    ready: AtomicBool,
    /// Its requests count in `common.in_flight` (for a picker that reads the total).
    counts_total: bool,
}

/// What a balancer's endpoints share.
#[derive(Debug)]
pub(crate) struct Common {
    /// The zero of every endpoint's EWMA clock.
    origin: Instant,
    /// Requests in flight over all endpoints, when a picker reads the total load.
    in_flight: AtomicU64,
    counts_total: bool,
}

impl Common {
    fn new(counts_total: bool) -> Arc<Self> {
        Arc::new(Common {
            origin: Instant::now(),
            in_flight: AtomicU64::new(0),
            counts_total,
        })
    }
}

/// `EndpointStats::ewma` before the first sample (an `f32` NaN: never a value).
const NO_EWMA: u64 = u64::MAX;

/// The peak EWMA's decay time constant, in milliseconds (tower's `PeakEwma` default,
/// 10 s): a past estimate weighs e^(−t/τ) after t.
const EWMA_DECAY_MS: f64 = 10_000.0;

/// A late update whose clock reading is at most this far behind the estimate's (a
/// thread that read the clock, then lost a race) counts as simultaneous; further
/// behind, the 32-bit millisecond clock wrapped (about 49.7 days without a sample).
const EWMA_LATE_MS: i32 = 60_000;

/// The weight left to the previous estimate after `elapsed_ms`: (1 − t/32τ)^32, an
/// approximation of e^(−t/τ) from five multiplications (no `exp` per sample): within
/// 0.01 of it everywhere, never above it, and 0 from 32τ on. Consecutive samples
/// compose to e^(−T/τ) over the total time T, so the decay follows the time that
/// passed, not the number of samples.
fn ewma_decay(elapsed_ms: u32) -> f64 {
    let x = f64::from(elapsed_ms) / (32.0 * EWMA_DECAY_MS);
    if x >= 1.0 {
        return 0.0;
    }
    let mut w = 1.0 - x;
    for _ in 0..5 {
        w *= w;
    }
    w
}

/// `flow` bits: in flight below, finished above.
const IN_FLIGHT_BITS: u32 = 24;
const IN_FLIGHT_MASK: u64 = (1 << IN_FLIGHT_BITS) - 1;
/// Added to `flow` when a request ends: one more finished, one fewer in flight.
const FINISH: u64 = (1 << IN_FLIGHT_BITS) - 1;

impl EndpointStats {
    pub(crate) fn in_flight(&self) -> u64 {
        self.flow.load(Relaxed) & IN_FLIGHT_MASK
    }

    #[cfg(test)]
    fn new(id: EndpointId) -> Self {
        Self::with(id, Box::from(""), 1, &Common::new(false))
    }

    fn with(id: EndpointId, key: Box<str>, weight: u32, common: &Arc<Common>) -> Self {
        EndpointStats {
            id,
            key,
            weight,
            counts_total: common.counts_total,
            common: common.clone(),
            cancelled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            flow: AtomicU64::new(0),
            latency_total_us: AtomicU64::new(0),
            timed: AtomicU64::new(0),
            ewma: AtomicU64::new(NO_EWMA),
            ready: AtomicBool::new(false),
        }
    }

    /// The zero of the EWMA's clock.
    fn origin(&self) -> Instant {
        self.common.origin
    }

    fn ewma(&self) -> Option<Duration> {
        let word = self.ewma.load(Relaxed);
        (word != NO_EWMA).then(|| {
            let us = f32::from_bits((word >> 32) as u32);
            Duration::from_secs_f64(f64::from(us) / 1e6)
        })
    }

    /// A request was sent.
    pub(crate) fn started(&self) {
        self.flow.fetch_add(1, Relaxed);
        if self.counts_total {
            self.common.in_flight.fetch_add(1, Relaxed);
        }
    }

    /// A request ended: completed, or `cancelled` (dropped first).
    pub(crate) fn finished(&self, cancelled: bool) {
        if cancelled {
            self.cancelled.fetch_add(1, Relaxed);
        }
        self.flow.fetch_add(FINISH, Relaxed);
        if self.counts_total {
            self.common.in_flight.fetch_sub(1, Relaxed);
        }
    }

    /// A request completed; `start` when it was one of the timed ones.
    #[inline]
    pub(crate) fn observe(&self, start: Option<Instant>, failed: bool) {
        if let Some(start) = start {
            self.observe_timed(start);
        }
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
    }

    /// A timed request sent at `start` completed.
    fn observe_timed(&self, start: Instant) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start);
        self.sample(now, elapsed);
        self.latency_total_us
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        self.timed.fetch_add(1, Relaxed);
    }

    /// Feeds a response time measured at `now` to the peak EWMA (tower's `PeakEwma`
    /// rule): a slower response than the estimate becomes the estimate at once; a
    /// faster one pulls it down by the time since the estimate last changed, so a
    /// burst of responses moves it by as little as the burst lasted, and after an idle
    /// gap of a few τ the next response all but replaces it. Lock-free: a
    /// compare-exchange loop over the value and its clock together, so concurrent
    /// samples never lose a peak nor decay the same time twice.
    fn sample(&self, now: Instant, rtt: Duration) {
        let us = rtt.as_secs_f64() * 1e6;
        // Milliseconds since `origin`, wrapping at 2^32.
        let stamp = now.saturating_duration_since(self.origin()).as_millis() as u32;
        let mut cur = self.ewma.load(Relaxed);
        loop {
            let (value, at) = if cur == NO_EWMA {
                (us, stamp)
            } else {
                let old = f64::from(f32::from_bits((cur >> 32) as u32));
                let last = cur as u32;
                let ahead = stamp.wrapping_sub(last) as i32;
                let (elapsed, at) = if ahead >= 0 {
                    (ahead.unsigned_abs(), stamp)
                } else if ahead > -EWMA_LATE_MS {
                    // Read the clock before the estimate's last change: no time passed.
                    (0, last)
                } else {
                    (u32::MAX, stamp)
                };
                if us >= old {
                    (us, at)
                } else {
                    let w = ewma_decay(elapsed);
                    if w == 1.0 {
                        return; // no time passed: a faster response changes nothing
                    }
                    (old * w + us * (1.0 - w), at)
                }
            };
            let word = (u64::from((value as f32).to_bits()) << 32) | u64::from(at);
            match self.ewma.compare_exchange_weak(cur, word, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(now_there) => cur = now_there,
            }
        }
    }
}

/// A snapshot of one endpoint, from [`BalanceHandle::stats`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointSnapshot {
    /// The endpoint's key, as text.
    pub key: String,
    /// Its id.
    pub id: EndpointId,
    /// Requests sent to it.
    pub requests: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// `errors / completed requests` (0 with none).
    pub error_rate: f64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Mean response time (of the timed requests: one in 8).
    pub avg_latency: Option<Duration>,
    /// Peak EWMA of response time (of the timed requests), as tower's `PeakEwma`
    /// keeps it: a response slower than the estimate becomes the estimate at once; a
    /// faster one pulls it toward itself by the time since the estimate last changed,
    /// with a decay time of 10 s (the old estimate weighs about e^(−t/10 s)), so a
    /// burst of fast responses moves it by as little as the burst lasted, and after an
    /// idle spell of a minute the next response all but replaces it. It changes only
    /// when a timed response completes (it does not decay while no request is timed).
    /// What [`LeastResponseTime`](crate::LeastResponseTime) reads.
    pub ewma_latency: Option<Duration>,
    /// Its weight (1 unless set by [`Balance::weights`] or [`Weighted`](crate::Weighted)).
    pub weight: u32,
    /// Ready at the last look (false: pending).
    pub ready: bool,
}

/// Balancer-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) retries: AtomicU64,
    pub(crate) sent_retries: AtomicU64,
    pub(crate) retries_refused: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) hedges_won: AtomicU64,
    pub(crate) deadlines_exceeded: AtomicU64,
    panicking: AtomicBool,
}

/// Balancer-wide figures, from [`BalanceHandle::totals`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BalanceTotals {
    /// Endpoints known now.
    pub endpoints: usize,
    /// Of those, ready at the last look.
    pub ready: usize,
    /// Of those, pending (not ready: ejected, at a concurrency limit, connecting).
    pub pending: usize,
    /// Requests sent, over the current endpoints (failover attempts included).
    pub requests: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Failover attempts made (a request sent again to another endpoint after its
    /// attempt failed), retries of idempotent requests included.
    pub retries: u64,
    /// Of `retries`, those of idempotent requests after an error that did not prove
    /// the request unsent (it may have run twice). See
    /// [`Failover::retry_idempotent_if`](crate::Failover::retry_idempotent_if).
    pub sent_retries: u64,
    /// Failover attempts and hedges the retry budget refused.
    pub retries_refused: u64,
    /// Hedges sent (see [`Failover::hedge`](crate::Failover::hedge)).
    pub hedges: u64,
    /// Of `hedges`, those whose reply was the one returned (the other attempt was
    /// cancelled).
    pub hedges_won: u64,
    /// Requests that failed with [`DeadlineExceeded`](crate::DeadlineExceeded).
    pub deadlines_exceeded: u64,
    /// The panic threshold is crossed: requests go to every endpoint, healthy or not.
    pub panicking: bool,
}

/// Per-endpoint statistics of a [`Balance`], readable from anywhere.
#[derive(Clone, Default)]
pub struct BalanceHandle {
    /// Each endpoint's counters, by the balancer's slot number (`None`: a free slot).
    endpoints: Arc<Mutex<Vec<Option<Arc<EndpointStats>>>>>,
    totals: Arc<Totals>,
}

impl fmt::Debug for BalanceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceHandle").finish_non_exhaustive()
    }
}

/// One endpoint's counters, read once.
struct Figures {
    requests: u64,
    errors: u64,
    completed: u64,
    in_flight: u64,
}

impl EndpointStats {
    fn figures(&self) -> Figures {
        let flow = self.flow.load(Relaxed);
        let in_flight = flow & IN_FLIGHT_MASK;
        let finished = flow >> IN_FLIGHT_BITS;
        let completed = finished.saturating_sub(self.cancelled.load(Relaxed));
        Figures {
            requests: finished + in_flight,
            errors: self.errors.load(Relaxed).min(completed),
            completed,
            in_flight,
        }
    }
}

impl BalanceHandle {
    /// Every current endpoint's counters.
    pub fn stats(&self) -> Vec<EndpointSnapshot> {
        let eps = self.lock();
        eps.iter()
            .flatten()
            .map(|s| {
                let f = s.figures();
                let timed = s.timed.load(Relaxed);
                EndpointSnapshot {
                    key: s.key.to_string(),
                    id: s.id,
                    requests: f.requests,
                    errors: f.errors,
                    error_rate: if f.completed == 0 {
                        0.0
                    } else {
                        f.errors as f64 / f.completed as f64
                    },
                    in_flight: f.in_flight,
                    avg_latency: (timed > 0)
                        .then(|| Duration::from_micros(s.latency_total_us.load(Relaxed) / timed)),
                    ewma_latency: s.ewma(),
                    weight: s.weight,
                    ready: s.ready.load(Relaxed),
                }
            })
            .collect()
    }

    /// The balancer-wide figures: endpoint counts, request totals over the current
    /// endpoints, failover and panic state. One pass over the endpoints' counters, no
    /// allocation.
    pub fn totals(&self) -> BalanceTotals {
        let t = &self.totals;
        let mut totals = BalanceTotals {
            endpoints: 0,
            ready: 0,
            pending: 0,
            requests: 0,
            errors: 0,
            in_flight: 0,
            retries: t.retries.load(Relaxed),
            sent_retries: t.sent_retries.load(Relaxed),
            retries_refused: t.retries_refused.load(Relaxed),
            hedges: t.hedges.load(Relaxed),
            hedges_won: t.hedges_won.load(Relaxed),
            deadlines_exceeded: t.deadlines_exceeded.load(Relaxed),
            panicking: t.panicking.load(Relaxed),
        };
        for s in self.lock().iter().flatten() {
            let f = s.figures();
            totals.endpoints += 1;
            if s.ready.load(Relaxed) {
                totals.ready += 1;
            } else {
                totals.pending += 1;
            }
            totals.requests += f.requests;
            totals.errors += f.errors;
            totals.in_flight += f.in_flight;
        }
        totals
    }

    /// Registers (or, with `None`, forgets) the counters of the endpoint in `slot`.
    fn set(&self, slot: usize, stats: Option<Arc<EndpointStats>>) {
        let mut eps = self.lock();
        if eps.len() <= slot {
            eps.resize(slot + 1, None);
        }
        eps[slot] = stats;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<EndpointStats>>>> {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One endpoint in its slot. Its id and weight live in its `stats`.
struct Endpoint<K, S> {
    key: K,
    svc: S,
    stats: Arc<EndpointStats>,
    /// Position in `ready` when ready, else `NOWHERE`.
    ready_pos: u32,
    /// Position in `pending` when pending, else `NOWHERE`.
    pending_pos: u32,
    /// Requests sent to it (for the one-in-`TIME_EVERY` latency sampling).
    calls: u32,
}

/// Pending endpoints that woke, and the balancer's task to wake for them.
#[derive(Default)]
struct Wakes {
    /// Slots of endpoints that woke since the last `poll_ready`.
    woken: Mutex<Vec<u32>>,
    /// Whether `woken` may hold any (read without its lock).
    any: AtomicBool,
    task: Mutex<Option<Waker>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The waker a pending endpoint is polled with: queues its slot (once) and wakes the
/// balancer's task. A wake-up that comes after the slot was reused only makes the
/// balancer poll that slot's endpoint once more.
struct SlotWaker {
    slot: u32,
    queued: AtomicBool,
    wakes: Arc<Wakes>,
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
const NOWHERE: u32 = u32::MAX;

/// The id of the endpoint in `slot` (a free slot reads as id 0; the index never holds
/// one).
fn id_in<K, S>(slots: &[Option<Endpoint<K, S>>], slot: u32) -> EndpointId {
    slots
        .get(slot as usize)
        .and_then(Option::as_ref)
        .map_or(EndpointId(0), Endpoint::id)
}

impl<K, S> Endpoint<K, S> {
    fn id(&self) -> EndpointId {
        self.stats.id
    }

    fn is_ready(&self) -> bool {
        self.ready_pos != NOWHERE
    }
}

/// A `Service<Req>` that spreads requests over the endpoints a
/// [`Discover`](tower::discover::Discover) yields, choosing among the ready ones with a
/// [`Pick`].
///
/// - **Never sent to an endpoint that cannot take it**: the endpoint chosen for a
///   request is polled for readiness just before the call (one `poll_ready`; none
///   more when it is the endpoint `poll_ready` itself checked), so one that failed or
///   went pending while ready and idle — a hyper `SendRequest` or tonic `Channel`
///   whose connection closed, a `Buffer` whose worker ended, an ejected endpoint —
///   leaves the ready set then and the request goes to another ready one. An endpoint
///   whose `poll_ready` fails is dropped at once.
/// - **Readiness without churn**: an endpoint that stays ready keeps its place in the
///   ready set. Each `poll_ready` after a call polls the endpoint called last (the
///   tower contract) and one more ready endpoint in turn, so an endpoint that dies
///   unpicked still leaves within one pass over the set: dead endpoints never pile
///   up. A pending endpoint is polled when it wakes, with a waker of its own (as
///   tower's ready cache does), not on every `poll_ready`: a thousand ejected
///   endpoints cost a request nothing. The picker sees a stable, indexed view (with a
///   generation that changes only when the set does), so stateful pickers keep their
///   state.
/// - **Fail fast**: when no endpoint is ready for `failfast_timeout`, the balancer turns
///   ready and each call fails at once with [`NoReadyEndpoints`] (inside a `BoxError`),
///   until an endpoint is ready again — rather than leaving callers hanging.
/// - **Drain**: an endpoint removed by discovery gets no new requests; its requests in
///   flight complete.
/// - **Stats** through [`BalanceHandle`]: per endpoint requests, errors, error rate,
///   in flight, average and peak-EWMA response time, readiness.
///
/// The load the pickers see is the balancer's own count of requests in flight per
/// endpoint, and the latency is its own peak EWMA of response times.
///
/// Route hints: see [`route_hint`](Self::route_hint).
///
/// Needs a tokio runtime with timers (the fail-fast timer); without one, the first
/// `poll_ready` with nothing ready panics, like any tokio timer.
///
/// **Many endpoints.** Nothing a request or a change costs grows with the number of
/// endpoints (with the default pickers; the exact ones,
/// [`LeastConnections::exact`](crate::LeastConnections::exact) and the like, scan on
/// purpose). Each endpoint that becomes ready or unready (including the one just
/// called going pending, behind a concurrency limit say), is ejected or readmitted,
/// added or removed by discovery, is reported to the picker as one [`SetChange`]
/// through [`Pick::update`], and the built-in pickers follow it in place: the
/// consistent-hash ring in O(1), the weighted schedule in O(log N), the Maglev table on
/// a thread of its own. The balancer's own bookkeeping per change is O(1) too: a
/// removal touches the endpoint's own entries, and an ejection does not make the
/// balancer poll its other endpoints (the ejected endpoint leaves the ready set the
/// next time it is polled, at the latest before a request would be sent to it), and a
/// pending endpoint is polled when it wakes, not per request. Per endpoint the
/// balancer keeps about 180 bytes, plus what the picker keeps (the consistent-hash
/// ring about 190, the weighted schedule about 40; the Maglev table is 256 KiB in all).
///
/// Weights: see [`weights`](Self::weights).
///
/// Failover: see [`failover`](Self::failover); the panic threshold: see
/// [`panic_threshold`](Self::panic_threshold); slow start after recovery: see
/// [`slow_start`](Self::slow_start).
///
/// # Deadlines, retries and hedging
///
/// With [`failover`](Self::failover) on (a [`Failover`] policy), a request may be sent
/// to more than one endpoint. Exactly these are sent again, each time to an endpoint
/// not tried yet for that request:
///
/// - **Never sent**, any request: its attempt failed with an error that proves the
///   request never reached the endpoint — [`never_sent`](crate::never_sent)'s (the
///   [`NotSent`](marina_core::NotSent) marker, which marina-pool puts on connect and
///   checkout failures and a connect timeout should carry; a refused TCP connect)
///   and those of [`Failover::not_sent_if`]. With [`failover_unsent`](Self::failover_unsent),
///   only when the endpoint gave the request back; with
///   [`failover_copy_idempotent`](Self::failover_copy_idempotent), a request not
///   marked idempotent only when the endpoint gave it back.
/// - **Maybe sent, idempotent only**: any other error (a reset connection, a
///   per-attempt timeout, a protocol error; narrowed with
///   [`Failover::retry_idempotent_if`]) of a request that
///   [`idempotent_if`](Self::idempotent_if) or
///   [`idempotent_from_extensions`](Self::idempotent_from_extensions) marks. Needs a
///   copy of the request: `failover` or `failover_copy_idempotent`, not
///   `failover_unsent`.
/// - **Hedged, idempotent only**: with [`Failover::hedge`], a marked request whose
///   attempt has been alone in flight for the delay gets a second attempt on another
///   ready endpoint; the first reply wins and the other attempt is dropped.
///
/// Never sent again:
///
/// - a request not marked idempotent after an error that does not prove it unsent —
///   a per-attempt timeout included, unless the endpoint marks it `NotSent`;
///   nothing is idempotent by default, and [`Failover::retry_if`] (which widens the
///   rule for every request) is only for request types that are all idempotent;
/// - a reply, whatever it says (an HTTP 503 is a reply: turn such replies into errors
///   in the endpoint's stack to have them retried);
/// - a request with a strict route hint (only the deadline applies to it);
/// - past [`Failover::max_attempts`] (the first attempt, failovers, retries and hedges
///   all count), when the [`RetryBudget`](crate::RetryBudget) that failovers, retries
///   and hedges share is spent, or after the [`Failover::deadline`].
///
/// The **deadline** covers the request from `call` to its reply, every attempt
/// included: retries never extend a request past it, and when it passes the request
/// fails with [`DeadlineExceeded`](crate::DeadlineExceeded), whose `maybe_sent` says
/// whether it may have reached a backend. The per-attempt timeout belongs inside each
/// endpoint (below its health checks, so a timed-out attempt counts as a failure
/// there); its error is then retried by the rules above. Counters:
/// [`BalanceTotals`]'s `retries`, `sent_retries`, `retries_refused`, `hedges`,
/// `hedges_won`, `deadlines_exceeded`.
///
/// ```
/// use marina_balance::{Balance, Failover, RoundRobin};
/// use marina_core::Request;
/// use std::time::Duration;
/// use tower::service_fn;
///
/// let endpoints = (0..3).map(|n| service_fn(move |_: Request<String>| async move { Ok::<_, std::io::Error>(n) }));
/// let lb = Balance::from_services(endpoints, RoundRobin::new())
///     .failover(
///         Failover::new()
///             .max_attempts(3)
///             .deadline(Duration::from_secs(2)) // the whole request
///             .hedge(Duration::from_millis(80)), // about the backends' p99
///     )
///     // Retries after sending, and hedges, for requests carrying `marina_core::Idempotent`.
///     .idempotent_from_extensions();
/// # drop(lb);
/// ```
///
/// # Sharing
///
/// Not `Clone`: a balancer is one ready set and one picker state, and copies would
/// each keep their own. To send from many tasks, call [`shared`](Self::shared) for a
/// `Clone` [`Shared`](crate::Shared) handle whose clones all use this one balancer, or
/// put it behind tower's `Buffer` (a worker task owns it and requests reach it through
/// a channel). The statistics [`handle`](Self::handle) is `Clone` and readable from
/// anywhere.
///
/// # Examples
///
/// ```
/// use marina_balance::{Balance, RoundRobin};
/// use tower::discover::ServiceList;
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let endpoints = (0..3).map(|n| service_fn(move |req: u32| async move { Ok::<_, std::io::Error>(req * 10 + n) }));
/// let mut lb = Balance::new(ServiceList::new(endpoints), RoundRobin::new());
/// let mut answers = Vec::new();
/// for _ in 0..3 {
///     answers.push(lb.ready().await?.call(1).await?);
/// }
/// answers.sort();
/// assert_eq!(answers, [10, 11, 12]); // each endpoint once
/// assert_eq!(lb.handle().stats().iter().map(|s| s.requests).sum::<u64>(), 3);
/// # Ok(()) }
/// ```
pub struct Balance<D, Req>
where
    D: Discover,
{
    discover: D,
    slots: Vec<Option<Endpoint<D::Key, D::Service>>>,
    free: Vec<u32>,
    /// Slots by endpoint id, for route hints and to find a key discovery names (an id
    /// is hashed from its key; the first of two keys sharing an id).
    by_id: IdIndex,
    /// Endpoints inserted whose id another one had already.
    id_clashes: usize,
    /// The ready endpoints' slots: the picker's view, by index.
    ready: Vec<u32>,
    /// The pending endpoints' slots.
    pending: Vec<u32>,
    /// A ready endpoint `poll_ready` checked with the caller's context for the next
    /// request: used without another poll if the picker chooses it, and the fallback
    /// when the picker's choices are not ready any more.
    candidate: Option<usize>,
    /// The endpoint called last, polled again by the next `poll_ready`.
    just_called: Option<usize>,
    /// Position in `ready` of the next endpoint `poll_ready` checks.
    sweep: usize,
    generation: u64,
    /// What the endpoints share (the EWMA clock's zero, the count of requests in
    /// flight over all of them for a picker that reads the total load).
    common: Arc<Common>,
    picker: Box<dyn Pick>,
    failfast: Duration,
    failfast_sleep: Option<Pin<Box<Sleep>>>,
    failing: bool,
    discover_done: bool,
    handle: BalanceHandle,
    hint: Option<HintFn<Req>>,
    weigh: Option<WeighFn<D::Key>>,
    weigh_service: Option<WeighFn<D::Service>>,
    failover: Option<Arc<FailoverShared<D::Service, Req>>>,
    idempotent: Option<IdempotentFn<Req>>,
    slow_start: Option<SlowStart>,
    /// Each slot's slow-start state (empty without slow start).
    slow: Vec<SlowState>,
    /// A request was called (endpoints discovered from now on ramp up).
    started: bool,
    gate: Option<EjectionGate>,
    panic_threshold: f64,
    panicking: bool,
    /// The gate's change count at the last look.
    gate_changes: u64,
    /// Pending endpoints' wake-ups.
    wakes: Arc<Wakes>,
    /// The task waker last given to `wakes`, and the raw parts (data, vtable) of the
    /// waker it was cloned from (compared without the lock).
    task: Option<(Waker, (usize, usize))>,
    /// Pending endpoints to poll with a waker of their own at the next `poll_ready`:
    /// new ones, ones that just went pending (polled with another waker, or none), and
    /// the woken ones.
    to_poll: Vec<u32>,
    _req: PhantomData<fn(Req)>,
}

/// Gives an endpoint's weight from its key or service (see [`Balance::weights`]).
type WeighFn<K> = Box<dyn Fn(&K) -> u32 + Send + Sync>;

/// Says whether a request is idempotent (see [`Balance::idempotent_if`]).
type IdempotentFn<Req> = Box<dyn Fn(&Req) -> bool + Send + Sync>;

/// What failover needs beyond the balancer: the policy, how to copy requests and
/// endpoint services, and a copy of every endpoint to fail over to.
pub(crate) struct FailoverShared<S, Req> {
    pub(crate) policy: Failover,
    /// Copies each request before it is sent (`failover`), or none are copied and a
    /// request is taken back from its `NotSent` error (`failover_unsent`), or both:
    /// only idempotent requests are copied (`failover_copy_idempotent`).
    pub(crate) clone_req: Option<fn(&Req) -> Req>,
    /// `clone_req` copies only the requests marked idempotent.
    pub(crate) copy_idempotent_only: bool,
    pub(crate) take_req: Option<fn(&BoxError) -> Option<Req>>,
    /// The balancer's route hint reader, for a request taken back from its error (the
    /// response future keeps no hint until then).
    hint: Mutex<Option<HintFn<Req>>>,
    clone_svc: fn(&S) -> S,
    /// By the balancer's slot number (`None`: a free slot).
    peers: Mutex<Vec<Option<Peer<S>>>>,
    pub(crate) totals: Arc<Totals>,
}

/// An endpoint a failed request may go to instead.
pub(crate) struct Peer<S> {
    pub(crate) id: EndpointId,
    pub(crate) stats: Arc<EndpointStats>,
    pub(crate) svc: S,
}

impl<S, Req> FailoverShared<S, Req> {
    fn lock_hint(&self) -> std::sync::MutexGuard<'_, Option<HintFn<Req>>> {
        self.hint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The route hint of a request taken back from its error.
    pub(crate) fn hint_of(&self, req: &Req) -> Option<RouteHint> {
        let hint = self.lock_hint().clone()?;
        hint(req)
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Vec<Option<Peer<S>>>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The ready endpoint, not yet tried, with the fewest requests in flight.
    pub(crate) fn next_peer(&self, tried: &[EndpointId]) -> Option<Peer<S>> {
        let peers = self.peers();
        let best = peers
            .iter()
            .flatten()
            .filter(|p| p.stats.ready.load(Relaxed) && !tried.contains(&p.id))
            .min_by_key(|p| p.stats.in_flight())?;
        Some(Peer {
            id: best.id,
            stats: best.stats.clone(),
            svc: (self.clone_svc)(&best.svc),
        })
    }
}

/// Reads a request's route hint (see [`Balance::route_hint`]).
type HintFn<Req> = Arc<dyn Fn(&Req) -> Option<RouteHint> + Send + Sync>;

/// Takes a request of type `Req` back from a `NotSent` error.
fn take_unsent<Req: 'static>(error: &BoxError) -> Option<Req> {
    marina_core::take_unsent_request::<Req>(&**error)
}

/// At most this many discovery changes are applied in one `poll_ready`.
const DISCOVER_PER_POLL: usize = 65_536;

/// One request in this many is timed for the latency statistics.
const TIME_EVERY: u64 = 8;

impl<D: Discover, Req> fmt::Debug for Balance<D, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("endpoints", &(self.slots.len() - self.free.len()))
            .field("ready", &self.ready.len())
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

/// The picker's view: the ready endpoints, in the ready set's order.
struct ReadyView<'a, K, S> {
    slots: &'a [Option<Endpoint<K, S>>],
    ready: &'a [u32],
    generation: u64,
    /// The running count of requests in flight, when the picker reads it.
    total: Option<&'a AtomicU64>,
}

impl<K, S> ReadyView<'_, K, S> {
    fn ep(&self, i: usize) -> &Endpoint<K, S> {
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

impl<D: Discover, Req> Balance<D, Req> {
    /// A balancer over `discover`'s endpoints, choosing with `picker`; fail-fast after
    /// 10 s with nothing ready.
    pub fn new(discover: D, picker: impl Pick) -> Self {
        Balance {
            discover,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: IdIndex::default(),
            id_clashes: 0,
            ready: Vec::new(),
            pending: Vec::new(),
            candidate: None,
            just_called: None,
            sweep: 0,
            generation: 0,
            common: Common::new(picker.reads_total_load()),
            picker: Box::new(picker),
            failfast: Duration::from_secs(10),
            failfast_sleep: None,
            failing: false,
            discover_done: false,
            handle: BalanceHandle::default(),
            hint: None,
            weigh: None,
            weigh_service: None,
            failover: None,
            idempotent: None,
            slow_start: None,
            slow: Vec::new(),
            started: false,
            gate: None,
            panic_threshold: 0.5,
            panicking: false,
            gate_changes: 0,
            wakes: Arc::default(),
            task: None,
            to_poll: Vec::new(),
            _req: PhantomData,
        }
    }

    /// Links the balancer to its endpoints' health checks through `gate` (give the same
    /// gate to each endpoint's `marina_health::HealthLayer::ejection_gate`), enabling
    /// the [panic threshold](Self::panic_threshold): a change of the gate wakes the
    /// balancer, which compares the healthy share to the threshold (O(1)). An endpoint
    /// ejected while in the ready set — by an active probe, not a request this balancer
    /// sent — gets no request, gate or not: every endpoint is polled before it is sent
    /// a request, and the ejected one leaves the ready set then (or sooner, when polled
    /// in turn after a request). The balancer does not poll its other endpoints on an
    /// ejection, so one costs the same with 8 endpoints or 4,096.
    pub fn ejection_gate(mut self, gate: EjectionGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The panic threshold (default 0.5): when the share of endpoints not ejected by
    /// their health checks falls below it, the balancer opens its
    /// [`EjectionGate`](Self::ejection_gate) and routes over every endpoint, ejected or
    /// not, until the share recovers (Envoy's panic mode). 0 turns it off. Without a
    /// gate, nothing reports ejections and the threshold has no effect.
    ///
    /// # Panics
    ///
    /// If `healthy_share` is not within `0.0..=1.0` (a share, not a percentage: 0.5
    /// for 50%) or is NaN. `marina::Stack`'s builder reports the same mistake as an
    /// error at build, under the path `health.panic_threshold`.
    pub fn panic_threshold(mut self, healthy_share: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&healthy_share),
            "panic_threshold: must be within 0.0..=1.0 (a share, not a percentage), got {healthy_share}"
        );
        self.panic_threshold = healthy_share;
        self
    }

    /// Gives each endpoint a weight read from its service, for example from a
    /// [`Weighted`](crate::Weighted) wrapper with
    /// `.service_weights(Weighted::weight)`. Applies to endpoints discovered from now
    /// on; a weight from [`weights`](Self::weights) wins over this one.
    pub fn service_weights(
        mut self,
        weigh: impl Fn(&D::Service) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.weigh_service = Some(Box::new(weigh));
        self
    }

    /// How long nothing may be ready before calls fail with [`NoReadyEndpoints`].
    pub fn failfast_timeout(mut self, timeout: Duration) -> Self {
        self.failfast = timeout;
        self
    }

    /// Reads each request's [`RouteHint`] with `hint` (for example from its extensions,
    /// where marina-affinity puts it), passes it to the picker, and reports the chosen
    /// endpoint back through the hint. A hint naming an endpoint that is ready is
    /// honoured whatever the picker. With failover, the endpoint of the attempt that
    /// answered is reported too; a request that fails over after its endpoint gave it
    /// back ([`failover_unsent`](Self::failover_unsent),
    /// [`failover_copy_idempotent`](Self::failover_copy_idempotent)) has its hint read
    /// again from the request given back, so read the hint from the request itself
    /// (its extensions, a field) rather than make a new one on each call.
    ///
    /// ```
    /// use marina_balance::{Balance, ConsistentHash};
    /// use marina_core::RouteHint;
    /// use tower::discover::ServiceList;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..4).map(|n| service_fn(move |_: (u64, RouteHint)| async move { Ok::<_, std::io::Error>(n) }));
    /// let mut lb = Balance::new(ServiceList::new(endpoints), ConsistentHash::new())
    ///     .route_hint(|req: &(u64, RouteHint)| Some(req.1.clone()));
    /// // The same key reaches the same endpoint.
    /// let a = lb.ready().await?.call((1, RouteHint::hash(42))).await?;
    /// let b = lb.ready().await?.call((2, RouteHint::hash(42))).await?;
    /// assert_eq!(a, b);
    /// # Ok(()) }
    /// ```
    pub fn route_hint(
        mut self,
        hint: impl Fn(&Req) -> Option<RouteHint> + Send + Sync + 'static,
    ) -> Self {
        let hint: HintFn<Req> = Arc::new(hint);
        if let Some(f) = &self.failover {
            *f.lock_hint() = Some(hint.clone());
        }
        self.hint = Some(hint);
        self
    }

    /// Gives each endpoint a weight from its discovery key (discovery metadata usually
    /// travels in the key), for [`WeightedRoundRobin`](crate::WeightedRoundRobin) and
    /// any picker that reads weights. Weights below 1 count as 1; applies to endpoints
    /// discovered from now on.
    ///
    /// ```
    /// use marina_balance::{Balance, WeightedRoundRobin};
    /// use tower::discover::ServiceList;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..2).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
    /// // ServiceList keys endpoints by position: give the second three times the weight.
    /// let mut lb = Balance::new(ServiceList::new(endpoints), WeightedRoundRobin::new())
    ///     .weights(|index: &usize| if *index == 1 { 3 } else { 1 });
    /// let mut seen = [0; 2];
    /// for _ in 0..8 {
    ///     seen[lb.ready().await?.call(()).await?] += 1;
    /// }
    /// assert_eq!(seen, [2, 6]);
    /// # Ok(()) }
    /// ```
    pub fn weights(mut self, weigh: impl Fn(&D::Key) -> u32 + Send + Sync + 'static) -> Self {
        self.weigh = Some(Box::new(weigh));
        self
    }

    /// Reads each request's [`RouteHint`] from its extensions, where marina-affinity
    /// puts it: [`route_hint`](Self::route_hint) for `http::Request`s and
    /// `marina_core::Request`s.
    pub fn route_hints_from_extensions(self) -> Self
    where
        Req: HasExtensions,
    {
        self.route_hint(|req: &Req| req.extensions().get::<RouteHint>().cloned())
    }

    /// Turns on failover: a request whose endpoint fails with an error the policy
    /// accepts (by default, [`never_sent`](crate::never_sent) errors: the request never
    /// reached the endpoint) is sent again to another ready endpoint, one not tried yet
    /// for it (the least loaded), up to the policy's attempts and within its
    /// [`RetryBudget`](crate::RetryBudget).
    ///
    /// Needs `Req: Clone` (each request is copied before it is sent, so it can be sent
    /// again after a failure; for request types that are not `Clone`, see
    /// [`failover_unsent`](Self::failover_unsent); to copy only the idempotent ones and
    /// have the endpoint give the others back, see
    /// [`failover_copy_idempotent`](Self::failover_copy_idempotent)) and `Clone`
    /// endpoint services (an attempt goes through a copy of the endpoint, readied in
    /// the response future). Each request's copy is kept in a failover state of its
    /// own, one heap allocation per request beside what the copy itself allocates.
    /// Counts:
    /// [`BalanceTotals::retries`] and [`retries_refused`](BalanceTotals::retries_refused).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::NotSent;
    /// use tower::discover::ServiceList;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 refuses every connection; endpoint 1 answers.
    /// let endpoints = (0..2).map(|n| service_fn(move |req: u32| async move {
    ///     if n == 0 {
    ///         Err(NotSent::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)))
    ///     } else {
    ///         Ok(req + 1)
    ///     }
    /// }));
    /// let mut lb = Balance::new(ServiceList::new(endpoints), RoundRobin::new())
    ///     .failover(Failover::new());
    /// for _ in 0..4 {
    ///     assert_eq!(lb.ready().await?.call(1).await?, 2); // never fails
    /// }
    /// assert_eq!(lb.handle().totals().retries, 2); // the two that went to endpoint 0
    /// # Ok(()) }
    /// ```
    pub fn failover(self, policy: Failover) -> Self
    where
        Req: Clone,
        D::Service: Clone,
    {
        self.failover_with(policy, Some(Req::clone), false, None, D::Service::clone)
    }

    fn failover_with(
        mut self,
        policy: Failover,
        clone_req: Option<fn(&Req) -> Req>,
        copy_idempotent_only: bool,
        take_req: Option<fn(&BoxError) -> Option<Req>>,
        clone_svc: fn(&D::Service) -> D::Service,
    ) -> Self {
        let shared = FailoverShared {
            policy,
            clone_req,
            copy_idempotent_only,
            take_req,
            hint: Mutex::new(self.hint.clone()),
            clone_svc,
            peers: Mutex::new(Vec::new()),
            totals: self.handle.totals.clone(),
        };
        {
            let mut peers = shared.peers();
            peers.extend(self.slots.iter().map(|ep| {
                ep.as_ref().map(|ep| Peer {
                    id: ep.id(),
                    stats: ep.stats.clone(),
                    svc: clone_svc(&ep.svc),
                })
            }));
        }
        self.failover = Some(Arc::new(shared));
        self
    }

    /// Failover for requests that are not `Clone` (an `http::Request` with a streaming
    /// body, a tonic request, a proxy's incoming request): nothing is copied; a request
    /// is sent again to another endpoint only when its endpoint gave it back with the
    /// error, through [`NotSent::with_request`](marina_core::NotSent::with_request) (marina-pool's `PoolService` does when
    /// a connection cannot be had; for hyper, wrap `SendRequest::try_send_request`'s
    /// `TrySendError::into_message()` the same way). Otherwise as
    /// [`failover`](Self::failover): the policy decides which errors, how many attempts,
    /// and the budget; the error returned when no attempt is left still carries the
    /// request, for the caller to take back with
    /// [`take_unsent_request`](marina_core::take_unsent_request).
    ///
    /// Needs `Clone` endpoint services (an attempt goes through a copy of the endpoint).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::NotSent;
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// struct Upload(Vec<u8>); // not Clone
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 cannot connect and gives each request back; endpoint 1 answers.
    /// let endpoints = (0..2).map(|n| service_fn(move |req: Upload| async move {
    ///     if n == 0 {
    ///         let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    ///         Err(NotSent::with_request(refused, req))
    ///     } else {
    ///         Ok(req.0.len())
    ///     }
    /// }));
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover_unsent(Failover::new());
    /// for _ in 0..4 {
    ///     assert_eq!(lb.ready().await?.call(Upload(vec![0; 3])).await?, 3);
    /// }
    /// assert_eq!(lb.handle().totals().retries, 2);
    /// # Ok(()) }
    /// ```
    pub fn failover_unsent(self, policy: Failover) -> Self
    where
        Req: 'static,
        D::Service: Clone,
    {
        self.failover_with(
            policy,
            None,
            false,
            Some(take_unsent::<Req>),
            D::Service::clone,
        )
    }

    /// Failover as with [`failover`](Self::failover), without a copy of every request:
    /// only the requests marked idempotent
    /// ([`idempotent_if`](Self::idempotent_if),
    /// [`idempotent_from_extensions`](Self::idempotent_from_extensions)) are copied
    /// before they are sent, for their retries after sending and their
    /// [hedges](crate::Failover::hedge); every other request fails over, as with
    /// [`failover_unsent`](Self::failover_unsent), only when its endpoint gave it back
    /// with its never-sent error through
    /// [`NotSent::with_request`](marina_core::NotSent::with_request). The policy decides
    /// the rest as with `failover`: which errors, how many attempts, the budget, the
    /// deadline.
    ///
    /// **Your endpoint must give requests back** with `NotSent::with_request`, as
    /// marina-pool's `PoolService` does when it cannot check out or connect a
    /// connection (for hyper, wrap `SendRequest::try_send_request`'s
    /// `TrySendError::into_message()` the same way). A never-sent error that did not
    /// bring its request back — a bare `NotSent::new`, a refused connect from a client
    /// that keeps the request — is not retried for a request that is not idempotent
    /// (`failover` would retry it from its copy): the error reaches the caller.
    ///
    /// What it saves: `failover` copies every request before sending it, and keeps the
    /// copy in the request's failover state, a heap allocation of its own, though
    /// almost no request ever fails over. Here a request that is not idempotent, under
    /// a policy without a [deadline](crate::Failover::deadline), costs the balancer no
    /// copy and no allocation: its failover state is built when an attempt fails with
    /// the request given back, not before. Idempotent requests cost what they cost with
    /// `failover`. The idempotent predicate is asked once per request (with
    /// `max_attempts` above 1 and no strict route hint). A request given back has its
    /// route hint read again from it (see [`route_hint`](Self::route_hint)).
    ///
    /// Needs `Req: Clone` (for the copies of idempotent requests) and `Clone` endpoint
    /// services (an attempt goes through a copy of the endpoint). Counts as
    /// `failover`: [`BalanceTotals::retries`], [`sent_retries`](BalanceTotals::sent_retries),
    /// [`retries_refused`](BalanceTotals::retries_refused).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::{Idempotent, NotSent, Request};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 cannot connect and gives each request back (as marina-pool's
    /// // `PoolService` does); endpoint 1 answers.
    /// let endpoints = (0..2).map(|n| service_fn(move |req: Request<u32>| async move {
    ///     if n == 0 {
    ///         let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    ///         return Err(NotSent::with_request(refused, req));
    ///     }
    ///     Ok(req.body)
    /// }));
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover_copy_idempotent(Failover::new())
    ///     .idempotent_from_extensions();
    /// for n in 0..4 {
    ///     // Not copied: the two sent to endpoint 0 come back with its error and go to 1.
    ///     assert_eq!(lb.ready().await?.call(Request::new(n)).await?, n);
    /// }
    /// // Marked idempotent: copied before it is sent (and hedged if the policy hedges).
    /// let mut get = Request::new(7);
    /// Idempotent::mark(&mut get);
    /// assert_eq!(lb.ready().await?.call(get).await?, 7);
    /// assert_eq!(lb.handle().totals().retries, 3);
    /// # Ok(()) }
    /// ```
    pub fn failover_copy_idempotent(self, policy: Failover) -> Self
    where
        Req: Clone + 'static,
        D::Service: Clone,
    {
        self.failover_with(
            policy,
            Some(Req::clone),
            true,
            Some(take_unsent::<Req>),
            D::Service::clone,
        )
    }

    /// Says which requests are **idempotent** (safe to send twice): with
    /// [`failover`](Self::failover) or
    /// [`failover_copy_idempotent`](Self::failover_copy_idempotent) (which copies only
    /// these), such a request is also retried on another endpoint after an error that
    /// came after it may have been sent (a reset connection, a per-attempt timeout: see
    /// [`Failover::retry_idempotent_if`](crate::Failover::retry_idempotent_if)), and
    /// [hedged](crate::Failover::hedge) when the policy hedges. No request is
    /// idempotent unless a predicate says so; with several predicates (this one,
    /// [`idempotent_from_extensions`](Self::idempotent_from_extensions)), any one
    /// suffices. Asked once per request, only where failover may keep a copy (not with
    /// [`failover_unsent`](Self::failover_unsent), not with `max_attempts(1)`, not for
    /// a request with a strict route hint).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// // Endpoint 0 resets every connection after reading the request.
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let endpoints = (0..2).map(|n| {
    ///     let calls = calls.clone();
    ///     service_fn(move |req: &'static str| {
    ///         calls.fetch_add(1, Ordering::SeqCst);
    ///         async move {
    ///             if n == 0 {
    ///                 return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    ///             }
    ///             Ok(format!("{req}: ok"))
    ///         }
    ///     })
    /// });
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover(Failover::new())
    ///     .idempotent_if(|req: &&str| req.starts_with("GET "));
    /// // A read goes to endpoint 0, fails after it was sent, and is retried on 1.
    /// assert_eq!(lb.ready().await?.call("GET /a").await?, "GET /a: ok");
    /// // A write is never sent twice: endpoint 0's error reaches the caller.
    /// assert_eq!(lb.ready().await?.call("POST /b").await?, "POST /b: ok"); // endpoint 1's turn
    /// assert!(lb.ready().await?.call("POST /c").await.is_err()); // endpoint 0's turn
    /// assert_eq!(calls.load(Ordering::SeqCst), 4);
    /// assert_eq!(lb.handle().totals().sent_retries, 1);
    /// # Ok(()) }
    /// ```
    pub fn idempotent_if(
        mut self,
        idempotent: impl Fn(&Req) -> bool + Send + Sync + 'static,
    ) -> Self
    where
        Req: 'static,
    {
        self.idempotent = Some(match self.idempotent.take() {
            None => Box::new(idempotent),
            Some(before) => Box::new(move |req: &Req| before(req) || idempotent(req)),
        });
        self
    }

    /// Counts a request as idempotent when it carries the
    /// [`Idempotent`](marina_core::Idempotent) marker in its extensions (for
    /// `http::Request`s and `marina_core::Request`s): see
    /// [`idempotent_if`](Self::idempotent_if).
    ///
    /// ```
    /// use marina_balance::{Balance, Failover, RoundRobin};
    /// use marina_core::{Idempotent, Request};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..2).map(|n| service_fn(move |req: Request<u32>| async move {
    ///     if n == 0 {
    ///         return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    ///     }
    ///     Ok(req.body)
    /// }));
    /// let mut lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .failover(Failover::new())
    ///     .idempotent_from_extensions();
    /// let mut get = Request::new(7);
    /// Idempotent::mark(&mut get);
    /// assert_eq!(lb.ready().await?.call(get).await?, 7); // retried on endpoint 1
    /// # Ok(()) }
    /// ```
    pub fn idempotent_from_extensions(self) -> Self
    where
        Req: HasExtensions + 'static,
    {
        self.idempotent_if(|req: &Req| Idempotent::is_marked(req))
    }

    /// Turns on **slow start** (Envoy's `slow_start_window`, HAProxy's `slowstart`;
    /// default off): an endpoint that comes back after being unready — its ejection by
    /// the health checks ended, it reconnected — or that discovery added after the
    /// balancer's first request gets a share of the picks that would go to it, growing
    /// linearly from 10% to all of them over `window`, so a cold or just-recovered
    /// backend is not flooded at once. Takes a window, or a [`SlowStart`] for the
    /// starting share and the shortest unready spell that counts (1 s by default, so
    /// an endpoint at its concurrency limit for a moment does not ramp).
    ///
    /// Works with every picker: when the picker chooses a ramping endpoint and the
    /// ramp turns the choice down, the picker chooses again (up to 4 choices in all),
    /// then the least loaded ready endpoint not ramping takes the request; when every
    /// ready endpoint ramps, the choice stands. Requests with a route hint (a pinned
    /// endpoint, a consistent-hash key) are not turned away: affinity wins. Failover
    /// attempts and hedges go to the least loaded endpoint, ramping or not.
    ///
    /// The endpoints there before the first request do not ramp (they all start
    /// cold together). Cost, only while on: a clock read when an endpoint enters or
    /// leaves the ready set, and one per request whose picker chooses a ramping
    /// endpoint.
    ///
    /// ```
    /// use marina_balance::{Balance, RoundRobin, SlowStart};
    /// use std::time::Duration;
    /// use tower::service_fn;
    ///
    /// let endpoints = (0..3).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
    /// let lb = Balance::from_services(endpoints, RoundRobin::new())
    ///     .slow_start(Duration::from_secs(30));
    /// # let _: Balance<_, ()> = lb;
    /// // Or with a starting share of 5%, ramping after any unready spell of 5 s or more:
    /// let slow = SlowStart::new(Duration::from_secs(30)).min_share(0.05).after_unready(Duration::from_secs(5));
    /// # drop(slow);
    /// ```
    pub fn slow_start(mut self, slow_start: impl Into<SlowStart>) -> Self {
        let config = slow_start.into();
        self.slow = (0..self.slots.len())
            .map(|_| SlowState::new(self.started))
            .collect();
        self.slow_start = Some(config);
        self
    }

    /// The handle to the per-endpoint statistics.
    pub fn handle(&self) -> BalanceHandle {
        self.handle.clone()
    }

    /// A `Clone` handle to this balancer for every task that sends requests: see
    /// [`Shared`](crate::Shared). `Balance` itself is not `Clone` (one ready set, one
    /// picker state); share it this way, or behind tower's `Buffer`.
    ///
    /// ```
    /// use marina_balance::{Balance, RoundRobin};
    /// use tower::{ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let endpoints = (0..3).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }));
    /// let lb = Balance::from_services(endpoints, RoundRobin::new()).shared();
    /// let (a, b) = (lb.clone(), lb.clone());
    /// // One round robin for both: they get different endpoints.
    /// assert_ne!(a.oneshot(()).await?, b.oneshot(()).await?);
    /// # Ok(()) }
    /// ```
    pub fn shared(self) -> crate::Shared<Self> {
        crate::Shared::new(self)
    }
}

impl<D, Req> Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + fmt::Debug,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    D::Error: Into<BoxError>,
{
    /// The slot of the endpoint with `key`, if any: found by its id (hashed from the
    /// key), or by a scan when two keys share an id.
    fn slot_of(&self, key: &D::Key, id: EndpointId) -> Option<usize> {
        let is = |slot: usize| self.slots[slot].as_ref().is_some_and(|e| e.key == *key);
        match self.by_id.get(id, |s| id_in(&self.slots, s)) {
            Some(slot) if is(slot as usize) => Some(slot as usize),
            _ if self.id_clashes > 0 => (0..self.slots.len()).find(|&slot| is(slot)),
            _ => None,
        }
    }

    fn insert(&mut self, key: D::Key, svc: D::Service) {
        let text = format!("{key:?}");
        let id = EndpointId::of(&text);
        if let Some(old) = self.slot_of(&key, id) {
            self.remove_slot(old);
        }
        let weight = match (&self.weigh, &self.weigh_service) {
            (Some(f), _) => f(&key).max(1),
            (None, Some(f)) => f(&svc).max(1),
            (None, None) => 1,
        };
        let stats = Arc::new(EndpointStats::with(
            id,
            text.into_boxed_str(),
            weight,
            &self.common,
        ));
        let slot = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.handle.set(slot, Some(stats.clone()));
        if let Some(f) = &self.failover {
            let peer = Peer {
                id,
                stats: stats.clone(),
                svc: (f.clone_svc)(&svc),
            };
            let mut peers = f.peers();
            if peers.len() <= slot {
                peers.resize_with(slot + 1, || None);
            }
            peers[slot] = Some(peer);
        }
        self.slots[slot] = Some(Endpoint {
            key,
            svc,
            stats,
            ready_pos: NOWHERE,
            pending_pos: self.pending.len() as u32,
            calls: 0,
        });
        self.pending.push(slot as u32);
        self.to_poll.push(slot as u32);
        if self.slow_start.is_some() {
            if self.slow.len() <= slot {
                self.slow.resize_with(slot + 1, SlowState::default);
            }
            self.slow[slot] = SlowState::new(self.started);
        }
        let slots = &self.slots;
        match self.by_id.get(id, |s| id_in(slots, s)) {
            Some(s) if s != slot as u32 => self.id_clashes += 1,
            _ => self.by_id.insert(id, slot as u32, |s| id_in(slots, s)),
        }
        tracing::debug!(endpoint = ?self.slots[slot].as_ref().map(|e| &e.key), "endpoint added");
    }

    fn remove_slot(&mut self, slot: usize) {
        let Some(ep) = self.slots[slot].as_ref() else {
            return;
        };
        if ep.is_ready() {
            self.unready_at(ep.ready_pos as usize);
        }
        let id = self.slots[slot]
            .as_ref()
            .map_or(EndpointId(0), Endpoint::id);
        let holder = self.by_id.get(id, |s| id_in(&self.slots, s)) == Some(slot as u32);
        let Some(ep) = self.slots[slot].take() else {
            return;
        };
        if holder {
            let slots = &self.slots;
            self.by_id.remove(id, slot as u32, |s| id_in(slots, s));
            // Another endpoint with the same id (two keys, one id) takes its place.
            if self.id_clashes > 0
                && let Some(other) = slots
                    .iter()
                    .position(|e| e.as_ref().is_some_and(|e| e.id() == id))
            {
                self.by_id.insert(id, other as u32, |s| id_in(slots, s));
                self.id_clashes -= 1;
            }
        } else {
            self.id_clashes = self.id_clashes.saturating_sub(1);
        }
        self.handle.set(slot, None);
        if let Some(f) = &self.failover
            && let Some(p) = f.peers().get_mut(slot)
        {
            *p = None;
        }
        if ep.pending_pos != NOWHERE {
            self.leave_pending(ep.pending_pos as usize);
        }
        if self.candidate == Some(slot) {
            self.candidate = None;
        }
        if self.just_called == Some(slot) {
            self.just_called = None;
        }
        self.free.push(slot as u32);
        tracing::debug!(endpoint = ?ep.key, "endpoint removed (its requests in flight complete)");
        // Dropping `ep.svc` here: requests in flight own their futures and finish.
    }

    /// Takes the entry at `pos` out of the pending list (swap-remove).
    fn leave_pending(&mut self, pos: usize) -> usize {
        let slot = self.pending.swap_remove(pos) as usize;
        if let Some(&moved) = self.pending.get(pos)
            && let Some(ep) = self.slots[moved as usize].as_mut()
        {
            ep.pending_pos = pos as u32;
        }
        if let Some(ep) = self.slots[slot].as_mut() {
            ep.pending_pos = NOWHERE;
        }
        slot
    }

    /// Takes the endpoint at `pos` out of the ready set (swap-remove; the set changes
    /// and the picker follows) and into the pending list.
    fn unready_at(&mut self, pos: usize) {
        let slot = self.ready.swap_remove(pos) as usize;
        if let Some(&moved) = self.ready.get(pos)
            && let Some(ep) = self.slots[moved as usize].as_mut()
        {
            ep.ready_pos = pos as u32;
        }
        let Some(ep) = self.slots[slot].as_mut() else {
            return;
        };
        ep.ready_pos = NOWHERE;
        ep.stats.ready.store(false, Relaxed);
        ep.pending_pos = self.pending.len() as u32;
        let id = ep.id();
        self.pending.push(slot as u32);
        self.to_poll.push(slot as u32);
        self.generation += 1;
        if self.slow_start.is_some() {
            self.slow[slot].left();
        }
        let view = ReadyView {
            slots: &self.slots,
            ready: &self.ready,
            generation: self.generation,
            total: self.common.counts_total.then_some(&self.common.in_flight),
        };
        self.picker
            .update(&view, SetChange::Removed { index: pos, id });
    }

    /// Moves the pending endpoint at `pending_pos` into the ready set (the picker
    /// follows).
    fn make_ready(&mut self, pending_pos: usize) {
        let slot = self.leave_pending(pending_pos);
        let Some(ep) = self.slots[slot].as_mut() else {
            return;
        };
        ep.ready_pos = self.ready.len() as u32;
        ep.stats.ready.store(true, Relaxed);
        self.ready.push(slot as u32);
        self.generation += 1;
        if let Some(config) = &self.slow_start {
            self.slow[slot].joined(config);
        }
        let view = ReadyView {
            slots: &self.slots,
            ready: &self.ready,
            generation: self.generation,
            total: self.common.counts_total.then_some(&self.common.in_flight),
        };
        self.picker.update(
            &view,
            SetChange::Added {
                index: self.ready.len() - 1,
            },
        );
    }

    /// Enters or leaves panic mode as the share of ejected endpoints crosses the
    /// threshold. O(1): an endpoint ejected while in the ready set leaves it when it is
    /// next polled — the one each request is sent to, or the one polled in turn after
    /// it — so it gets no request (issue #21: re-polling every ready endpoint whenever
    /// the gate moved cost O(N) per ejection and readmission).
    /// Returns whether panic mode started (the ejected endpoints may be ready now,
    /// though none of them woke).
    fn check_panic(&mut self) -> bool {
        let Some(gate) = &self.gate else {
            return false;
        };
        // The share moves only when a member's ejection changes (or a member leaves),
        // which moves the count: nothing to compute on most polls.
        let changes = gate.changes();
        if changes == self.gate_changes {
            return false;
        }
        self.gate_changes = changes;
        // An ejection or readmission somewhere: the endpoint checked for the next
        // request is checked again before it is used (it may be the one ejected).
        self.candidate = None;
        let share = gate.healthy_share();
        let panic = share < self.panic_threshold;
        if panic != self.panicking {
            self.panicking = panic;
            gate.set_open(panic);
            self.handle.totals.panicking.store(panic, Relaxed);
            if panic {
                tracing::warn!(
                    healthy_share = share,
                    threshold = self.panic_threshold,
                    "panic threshold crossed: routing over every endpoint, ejected or not"
                );
                // The pending endpoints are polled next, and the gate lets ejected ones
                // through.
                return true;
            }
            tracing::info!(healthy_share = share, "panic mode over");
        }
        false
    }

    fn poll_discover(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        if self.discover_done {
            return Ok(());
        }
        // Every change already sent is applied before the next pick: discovery is
        // drained outside tokio's cooperative budget (a channel would otherwise hand
        // over at most 128 changes per task poll, and a fresh balancer over 512
        // backends would route over the first 128). Bounded per poll: past the bound,
        // the task is woken to come back for the rest.
        let mut taken = 0;
        loop {
            if taken == DISCOVER_PER_POLL {
                cx.waker().wake_by_ref();
                return Ok(());
            }
            taken += 1;
            let discover = &mut self.discover;
            let polled = {
                let mut next = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
                    Pin::new(&mut *discover).poll_discover(cx)
                }));
                Pin::new(&mut next).poll(cx)
            };
            match polled {
                Poll::Ready(Some(Ok(Change::Insert(key, svc)))) => self.insert(key, svc),
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    let id = EndpointId::of(&format!("{key:?}"));
                    if let Some(slot) = self.slot_of(&key, id) {
                        self.remove_slot(slot);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Err(e.into()),
                Poll::Ready(None) => {
                    // Discovery ended: keep the endpoints, never poll it again (a stream
                    // may panic when polled after its end).
                    self.discover_done = true;
                    return Ok(());
                }
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// Polls the pending endpoints that woke (or are new to the pending list), each
    /// with a waker of its own; the ready ones join the ready set. The others are not
    /// polled: their wakers bring them back, and wake the task.
    fn poll_pending(&mut self, cx: &Context<'_>) {
        if self.pending.is_empty() {
            self.to_poll.clear();
            return;
        }
        // The task to wake when a pending endpoint wakes: handed over (a clone and a
        // lock) only when it is not the one given last time, before any endpoint is
        // polled (so no wake-up is lost). Recognised by the raw parts of the waker
        // given, not by `will_wake` on the clone kept: a clone may carry a copy of the
        // same vtable at another address, and `will_wake` would then say no on every
        // request. (The clone keeps the waker's data alive, so those parts cannot come
        // back for another waker.)
        let given = (
            cx.waker().data() as usize,
            std::ptr::from_ref(cx.waker().vtable()) as usize,
        );
        if self.task.as_ref().is_none_or(|(_, last)| *last != given) {
            let task = cx.waker().clone();
            *lock(&self.wakes.task) = Some(task.clone());
            self.task = Some((task, given));
        }
        // (A plain load first: no read-modify-write per request while nothing woke.)
        if self.wakes.any.load(Acquire) && self.wakes.any.swap(false, Acquire) {
            let mut woken = lock(&self.wakes.woken);
            self.to_poll.append(&mut woken);
        }
        // In the order they came (endpoints discovered together join the ready set in
        // discovery order).
        let mut i = 0;
        while let Some(&slot) = self.to_poll.get(i) {
            i += 1;
            let Some(pos) = self.slots[slot as usize]
                .as_ref()
                .map(|e| e.pending_pos)
                .filter(|&p| p != NOWHERE)
            else {
                continue; // gone, or ready already
            };
            let waker = Waker::from(Arc::new(SlotWaker {
                slot,
                queued: AtomicBool::new(false),
                wakes: self.wakes.clone(),
            }));
            if self.poll_endpoint(slot as usize, &mut Context::from_waker(&waker)) {
                self.make_ready(pos as usize);
            }
        }
        self.to_poll.clear();
    }

    /// Polls one endpoint; `true` if it is ready. An endpoint whose `poll_ready` fails is
    /// removed (it cannot serve).
    fn poll_endpoint(&mut self, slot: usize, cx: &mut Context<'_>) -> bool {
        let Some(ep) = self.slots[slot].as_mut() else {
            return false;
        };
        match ep.svc.poll_ready(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
            Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                tracing::warn!(endpoint = ?ep.key, error = %e, "endpoint failed; removed");
                self.remove_slot(slot);
                false
            }
        }
    }
}

impl<D, Req> Service<Req> for Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + fmt::Debug,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    D::Error: Into<BoxError>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<D::Service, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll_discover(cx)?;
        if self.check_panic() {
            // The gate opened: ejected endpoints let requests through now, without
            // waking. Once per crossing of the threshold.
            self.to_poll.extend_from_slice(&self.pending);
        }
        self.poll_pending(cx);
        // A fallback for the next request, its readiness checked now with this task's
        // context: the ready endpoints are taken in turn, so one that failed or went
        // pending while ready and idle (a connection closed, an ejection) leaves the set
        // even if no picker chooses it, and dead endpoints never pile up.
        if self.candidate.is_none() {
            // The endpoint called last first (the tower contract: polled again before
            // its next request; its ready flag in the stats stays true to it).
            if let Some(slot) = self.just_called.take() {
                self.recheck(slot, cx);
            }
            while !self.ready.is_empty() {
                if self.sweep >= self.ready.len() {
                    self.sweep = 0;
                }
                let slot = self.ready[self.sweep] as usize;
                self.sweep += 1;
                if self.recheck(slot, cx) {
                    self.candidate = Some(slot);
                    break;
                }
            }
        }
        if !self.ready.is_empty() {
            self.failfast_sleep = None;
            self.failing = false;
            return Poll::Ready(Ok(()));
        }
        if self.failing {
            return Poll::Ready(Ok(()));
        }
        let failfast = self.failfast;
        // (tokio's `sleep` caps an over-long timeout instead of overflowing.)
        let sleep = self
            .failfast_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(failfast)));
        if sleep.as_mut().poll(cx).is_ready() {
            tracing::warn!(waited = ?self.failfast, "no endpoint ready: failing fast");
            self.failing = true;
            return Poll::Ready(Ok(()));
        }
        if let Some(gate) = &self.gate {
            // An ejection or recovery may cross the panic threshold.
            gate.watch(cx.waker());
        }
        Poll::Pending
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let hint = self.hint.as_ref().and_then(|f| f(&req));
        let target = hint.as_ref().map(RouteHint::target);
        let strict = hint.as_ref().is_some_and(RouteHint::is_strict);
        // Every endpoint is checked before it is sent a request: the picker's choice is
        // polled once more (an endpoint that failed since it joined the ready set leaves
        // it, one that went pending goes back to the pending ones), unless it is the
        // endpoint `poll_ready` just checked.
        // A hint naming a ready endpoint is honoured whatever the picker.
        let mut chosen = match target {
            Some(HintTarget::Endpoint(id)) => self
                .by_id
                .get(id, |s| id_in(&self.slots, s))
                .map(|slot| slot as usize)
                .filter(|&slot| self.is_ready_slot(slot) && self.usable_now(slot)),
            _ => None,
        };
        if let (true, None, Some(HintTarget::Endpoint(endpoint))) = (strict, chosen, target) {
            return ResponseFuture::failed(PinnedEndpointUnavailable { endpoint }.into());
        }
        // The picker chooses; a choice that is not ready any more leaves the set and the
        // picker chooses again (for a consistent hash, the key moves to its next
        // endpoint); past a few tries, the endpoint `poll_ready` checked.
        if self.slow_start.is_some() {
            self.started = true;
            // Slow start turns some choices of ramping endpoints down; a hint's
            // affinity wins over it.
            if chosen.is_none()
                && !matches!(target, Some(HintTarget::Endpoint(_) | HintTarget::Hash(_)))
            {
                chosen = self.pick_slow_start(hint.as_ref());
            }
        }
        for _ in 0..PICK_TRIES {
            if chosen.is_some() || self.ready.is_empty() {
                break;
            }
            let slot = self.pick_slot(hint.as_ref());
            if self.usable_now(slot) {
                chosen = Some(slot);
            }
        }
        if chosen.is_none() {
            chosen = self.candidate.filter(|&slot| self.is_ready_slot(slot));
        }
        while chosen.is_none() && !self.ready.is_empty() {
            let slot = self.ready[0] as usize;
            if self.usable_now(slot) {
                chosen = Some(slot);
            }
        }
        let Some(slot) = chosen else {
            return ResponseFuture::failed(
                NoReadyEndpoints {
                    waited: self.failfast,
                }
                .into(),
            );
        };
        // The next `poll_ready` checks this endpoint again, and another one in turn (the
        // one it checked for this request may have aged).
        self.candidate = None;
        self.just_called = Some(slot);
        let ep = self.slots[slot].as_mut().expect("ready endpoints exist");
        let idempotent = &self.idempotent;
        let (fut, retry) = match &self.failover {
            None => {
                let fut = ep.svc.call(req);
                if let Some(h) = &hint {
                    h.report_chosen(ep.id());
                }
                (fut, RetryState::Off)
            }
            Some(f) => {
                let mut retry = Retry::start(f, &req, strict, ep.id(), |req| {
                    idempotent.as_ref().is_some_and(|is| is(req))
                });
                let fut = ep.svc.call(req);
                if let Some(h) = &hint {
                    h.report_chosen(ep.id());
                }
                // Moved, not copied: the failover state tells it where later attempts go.
                retry.keep_hint(hint);
                (fut, retry)
            }
        };
        // Time one request in `TIME_EVERY` (a clock read costs about as much as the rest
        // of a pick and call together): the latency EWMA and average come from those.
        // Counted per endpoint, so a picker's periodic pattern cannot hide one.
        let timed = ep.calls.is_multiple_of(TIME_EVERY as u32);
        ep.calls = ep.calls.wrapping_add(1);
        let start = timed.then(Instant::now);
        ResponseFuture::sent(fut, Track::start(ep.stats.clone(), start), retry)
    }
}

/// How many times `call` lets the picker choose again when the endpoint it chose is no
/// longer ready.
const PICK_TRIES: usize = 4;

impl<D, Req> Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + fmt::Debug,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    D::Error: Into<BoxError>,
{
    /// The slot of the ready endpoint the picker chooses; the ready set is not empty.
    fn pick_slot(&mut self, hint: Option<&RouteHint>) -> usize {
        let view = ReadyView {
            slots: &self.slots,
            ready: &self.ready,
            generation: self.generation,
            total: self.common.counts_total.then_some(&self.common.in_flight),
        };
        let i = self.picker.pick(&view, hint).min(self.ready.len() - 1);
        self.ready[i] as usize
    }

    /// With slow start on: the picker's choice, where the ramps of the endpoints it
    /// chooses let it stand (up to `PICK_TRIES` choices); otherwise the least loaded
    /// ready endpoint not ramping, or (every ready one ramps) the first choice.
    /// `None` when no choice was usable (the caller's fallbacks follow).
    fn pick_slow_start(&mut self, hint: Option<&RouteHint>) -> Option<usize> {
        let config = self.slow_start?;
        let mut now = None;
        let mut turned_down = [usize::MAX; PICK_TRIES];
        for i in 0..PICK_TRIES {
            if self.ready.is_empty() {
                return None;
            }
            let slot = self.pick_slot(hint);
            // Once turned down, an endpoint stays down for this request (asking its ramp
            // again would let it through more often than its share).
            if turned_down.contains(&slot)
                || (self.ready.len() > 1 && !self.slow[slot].admit(&config, &mut now))
            {
                turned_down[i] = slot;
                continue;
            }
            if self.usable_now(slot) {
                return Some(slot);
            }
        }
        if turned_down.iter().all(|&slot| slot == usize::MAX) {
            return None;
        }
        // Every choice was turned down: the least loaded endpoint that does not ramp.
        while !self.ready.is_empty() {
            let steady = self
                .ready
                .iter()
                .map(|&slot| slot as usize)
                .filter(|&slot| !self.slow[slot].ramping())
                .min_by_key(|&slot| self.slots[slot].as_ref().map_or(0, |e| e.stats.in_flight()));
            match steady {
                Some(slot) if self.usable_now(slot) => return Some(slot),
                Some(_) => continue, // it left the ready set; look again
                None => break,
            }
        }
        turned_down
            .into_iter()
            .find(|&slot| slot != usize::MAX && self.is_ready_slot(slot) && self.usable_now(slot))
    }

    fn is_ready_slot(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(Endpoint::is_ready)
    }

    /// Polls a ready endpoint again; one that is not ready any more leaves the ready set
    /// (pending: to the pending ones, polled with the next `poll_ready`'s context;
    /// failed: removed). `true` if it is ready.
    fn recheck(&mut self, slot: usize, cx: &mut Context<'_>) -> bool {
        if self.poll_endpoint(slot, cx) {
            return true;
        }
        if let Some(ep) = self.slots[slot].as_ref()
            && ep.is_ready()
        {
            self.unready_at(ep.ready_pos as usize);
        }
        if self.candidate == Some(slot) {
            self.candidate = None;
        }
        false
    }

    /// In `call` (no task context): whether a ready endpoint can take the request now.
    /// The endpoint `poll_ready` checked with the task's context counts as ready; any
    /// other is polled once with a no-op waker (one found pending is polled with a real
    /// context by the next `poll_ready`).
    fn usable_now(&mut self, slot: usize) -> bool {
        if self.candidate == Some(slot) {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.recheck(slot, &mut cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate, in milliseconds.
    fn ewma_ms(stats: &EndpointStats) -> f64 {
        stats.ewma().expect("a sample").as_secs_f64() * 1e3
    }

    #[test]
    fn ewma_decay_approximates_exp_from_below_and_ends_at_32_tau() {
        let mut last = 1.0;
        for ms in (0..=400_000u32).step_by(50) {
            let w = ewma_decay(ms);
            let exact = (-f64::from(ms) / EWMA_DECAY_MS).exp();
            assert!(w <= exact + 1e-12, "{ms} ms: {w} above e^-x = {exact}");
            assert!(exact - w <= 0.01, "{ms} ms: {w} too far below {exact}");
            assert!(w <= last, "{ms} ms: not decreasing");
            last = w;
        }
        assert_eq!(ewma_decay(0), 1.0);
        assert_eq!(ewma_decay(320_000), 0.0);
        assert_eq!(ewma_decay(u32::MAX), 0.0);
        // Within 2% of e^-1 after one τ.
        assert!((ewma_decay(10_000) / (-1.0f64).exp() - 1.0).abs() < 0.02);
    }

    #[test]
    fn ewma_follows_time_not_sample_count() {
        let stats = EndpointStats::new(EndpointId(0));
        let t0 = stats.origin();
        let ms = Duration::from_millis;
        assert_eq!(stats.ewma(), None);
        stats.sample(t0, ms(1000));
        // A burst of fast responses within 100 ms barely moves it.
        for i in 1..=100 {
            stats.sample(t0 + ms(i), ms(10));
        }
        let after_burst = ewma_ms(&stats);
        assert!(after_burst > 985.0, "{after_burst}");
        // One τ later, one fast response: about e^-1 of the peak is left.
        stats.sample(t0 + ms(10_100), ms(10));
        let w = ewma_decay(10_000);
        let want = after_burst * w + 10.0 * (1.0 - w);
        assert!((ewma_ms(&stats) - want).abs() < 0.01, "{}", ewma_ms(&stats));
        assert!((340.0..380.0).contains(&ewma_ms(&stats)));
        // The same time in many small steps decays about as much as in one gap.
        let stepped = EndpointStats::new(EndpointId(0));
        let t0 = stepped.origin();
        stepped.sample(t0, ms(1000));
        for i in 1..=100 {
            stepped.sample(t0 + ms(100 * i), ms(10));
        }
        let one_gap = EndpointStats::new(EndpointId(0));
        let t0 = one_gap.origin();
        one_gap.sample(t0, ms(1000));
        one_gap.sample(t0 + ms(10_000), ms(10));
        let (a, b) = (ewma_ms(&stepped), ewma_ms(&one_gap));
        assert!((a - b).abs() < 0.02 * b, "{a} against {b}");
        // A slower response is the new estimate at once.
        one_gap.sample(t0 + ms(10_001), ms(2000));
        assert_eq!(ewma_ms(&one_gap), 2000.0);
        // After 32 τ and more without a sample, the next response replaces it.
        one_gap.sample(t0 + ms(10_001 + 320_000), ms(10));
        assert_eq!(ewma_ms(&one_gap), 10.0);
    }

    #[test]
    fn ewma_late_clock_readings_count_as_simultaneous() {
        let stats = EndpointStats::new(EndpointId(0));
        let t0 = stats.origin();
        let ms = Duration::from_millis;
        stats.sample(t0 + ms(5000), ms(1000));
        // Read before the estimate's last change (a thread that lost a race): no time
        // passed, so a faster response changes nothing and the clock stays.
        stats.sample(t0 + ms(4000), ms(10));
        assert_eq!(ewma_ms(&stats), 1000.0);
        stats.sample(t0 + ms(4500), ms(3000));
        assert_eq!(ewma_ms(&stats), 3000.0);
        assert_eq!(stats.ewma.load(Relaxed) as u32, 5000);
    }

    #[test]
    fn concurrent_samples_never_lose_a_peak() {
        // Two threads draw rising response times from one counter (whole µs, exact in
        // the estimate's f32) and feed them at one instant, so nothing decays: the
        // estimate is the largest sample fed so far, and each thread reads back at least
        // its own. A load-then-store update loses the other thread's peak when it
        // stores a smaller sample over it.
        const EACH: u32 = 200_000;
        let stats = EndpointStats::new(EndpointId(0));
        let now = stats.origin() + Duration::from_secs(1);
        let next = std::sync::atomic::AtomicU32::new(1);
        let value_us =
            |stats: &EndpointStats| f32::from_bits((stats.ewma.load(Relaxed) >> 32) as u32);
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (stats, next, barrier) = (&stats, &next, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..EACH {
                        let us = next.fetch_add(1, Relaxed);
                        stats.sample(now, Duration::from_micros(u64::from(us)));
                        // Read back a few times: a peak stored over lands any time.
                        for _ in 0..8 {
                            let seen = value_us(stats);
                            assert!(seen >= us as f32, "peak lost: {seen} µs after {us} µs");
                        }
                    }
                });
            }
        });
        assert_eq!(value_us(&stats), (2 * EACH) as f32);
    }
}
