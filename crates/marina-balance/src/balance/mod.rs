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
    BoxError, EjectionGate, EndpointId, HasExtensions, HintTarget, Idempotent, NotSent,
    PinnedEndpointUnavailable, RouteHint, find,
};
use tokio::time::{Instant, Sleep};
use tower::discover::{Change, Discover};
use tower_service::Service;

use crate::failover::Failover;
use crate::future::{ResponseFuture, Retry, RetryState, Track, record_attempt};
use crate::index::IdIndex;
use crate::pick::{Endpoints, Pick, SetChange, rendezvous_score};
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

mod builder;
mod choose;
mod endpoint;
mod handle;
mod ready;
mod stats;

use choose::*;
use endpoint::*;
pub use handle::BalanceHandle;
pub(crate) use stats::EndpointStats;
use stats::*;
pub use stats::{BalanceTotals, EndpointSnapshot};

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
    /// The gauges of endpoints by state and of panic mode.
    #[cfg(feature = "metrics")]
    gauges: crate::metrics::SetGauges,
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
    pub(crate) take_req: Option<TakeUnsent<Req>>,
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

    /// The route hint of the request given back with `error`, read in place.
    pub(crate) fn hint_in(&self, error: &BoxError) -> Option<RouteHint> {
        let read = self.take_req?.read_hint;
        let hint = self.lock_hint().clone()?;
        read(error, &*hint)
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Vec<Option<Peer<S>>>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The ready endpoint, not yet tried, with the fewest requests in flight; with a
    /// failover `key` (see [`RouteHint::with_failover_key`]), the one the key ranks
    /// first (rendezvous hashing: the highest score of key and endpoint id), so requests
    /// sharing a key go to one endpoint and different keys spread.
    pub(crate) fn next_peer(&self, tried: &[EndpointId], key: Option<u64>) -> Option<Peer<S>> {
        let peers = self.peers();
        let left = peers
            .iter()
            .flatten()
            .filter(|p| p.stats.ready.load(Relaxed) && !tried.contains(&p.id));
        let best = match key {
            // ConsistentHash's own rendezvous score: a hashed key fails over to the
            // endpoint that picker (up to `table_above` endpoints) gives it once the
            // failed one has left, and every client agrees.
            Some(key) => left.max_by_key(|p| (rendezvous_score(p.id, key), p.id.0))?,
            None => left.min_by_key(|p| p.stats.in_flight())?,
        };
        Some(Peer {
            id: best.id,
            stats: best.stats.clone(),
            svc: (self.clone_svc)(&best.svc),
        })
    }
}

/// Reads a request's route hint (see [`Balance::route_hint`]).
type HintFn<Req> = Arc<dyn Fn(&Req) -> Option<RouteHint> + Send + Sync>;

/// How failover takes a request of type `Req` back from its `NotSent` error, and
/// reads its route hint there first.
pub(crate) struct TakeUnsent<Req> {
    pub(crate) take: fn(&BoxError) -> Option<Req>,
    pub(crate) read_hint: ReadHint<Req>,
}

/// Reads the route hint of a request given back in an error, with the hint reader.
pub(crate) type ReadHint<Req> =
    fn(&BoxError, &(dyn Fn(&Req) -> Option<RouteHint> + Send + Sync)) -> Option<RouteHint>;

impl<Req> Clone for TakeUnsent<Req> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req> Copy for TakeUnsent<Req> {}

impl<Req: 'static> TakeUnsent<Req> {
    pub(crate) fn new() -> Self {
        TakeUnsent {
            take: |error| marina_core::take_unsent_request::<Req>(&**error),
            read_hint: |error, hint| {
                find::<NotSent>(&**error)?
                    .inspect_request(|req: &Req| hint(req))
                    .flatten()
            },
        }
    }
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
            if self.failing {
                self.failing = false;
                tracing::info!(
                    ready = self.ready.len(),
                    "an endpoint is ready again: no longer failing fast"
                );
            }
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
            self.handle.totals.no_ready_endpoints();
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
        record_attempt(&ep.stats.key, 1);
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
