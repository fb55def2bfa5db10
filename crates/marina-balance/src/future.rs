//! `ResponseFuture`: one request's attempts — the first, failover attempts and retries,
//! a hedge — within its deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use marina_core::{BoxError, EndpointId, NotSent, PolledAfterCompletion, RouteHint, find};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::balance::{EndpointStats, FailoverShared, Peer};
use crate::failover::DeadlineExceeded;

pin_project! {
    /// The future of [`Balance`](crate::Balance)'s calls: the endpoint's response,
    /// timed and counted, and with [failover](crate::Balance::failover) on, further
    /// attempts on other endpoints, a hedge, and the deadline.
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops every attempt's future (cancelling the request at those
    /// endpoints) and stops counting them as in flight; a failover attempt not yet
    /// sent is abandoned. The same happens to the attempts that lose: a hedge's loser,
    /// and every attempt in flight when the deadline passes.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: State<S::Future>,
        track: Option<Track>,
        retry: RetryState<S, Req>,
    }
}

pin_project! {
    /// The current attempt: its endpoint's future, or an error to return at once.
    #[project = StateProj]
    enum State<F> {
        Call { #[pin] fut: F },
        /// An attempt sent as a hedge, carrying on after the other one failed.
        Boxed { fut: Pin<Box<F>> },
        Failed { error: Option<BoxError> },
        Done,
    }
}

/// A request's failover state, as cheap as the request allows.
pub(crate) enum RetryState<S: Service<Req>, Req> {
    /// No failover, or none this request can have (a strict route hint and no
    /// deadline, a single attempt).
    Off,
    /// Nothing kept up front (no copy, no deadline, no hedge): a failed attempt can
    /// only fail over when its endpoint gave the request back with the error, and the
    /// full state is built then, with the first attempt's endpoint (from its `Track`)
    /// and the route hint read again from the request given back. No allocation for
    /// the requests that never fail, and one word in the future.
    Lazy(Arc<FailoverShared<S, Req>>),
    /// A copy of the request, a deadline or a hedge to keep, or a failover under way.
    On(Box<Retry<S, Req>>),
}

/// A request's failover state past what [`RetryState::Lazy`] holds (boxed: the
/// future's size costs on every request, failover or not).
pub(crate) struct Retry<S: Service<Req>, Req> {
    shared: Arc<FailoverShared<S, Req>>,
    /// The request's route hint: told where an attempt that answers went.
    hint: Option<RouteHint>,
    /// The copy kept for the next attempt (none once attempts are used up), or the
    /// request taken back from an error, about to be sent again.
    req: Option<Req>,
    /// Copies are kept for further attempts (every request with `failover`, the
    /// idempotent ones with `failover_copy_idempotent`); otherwise a request fails
    /// over only when its endpoint gives it back.
    copying: bool,
    /// The current attempt's endpoint.
    first: EndpointId,
    /// Attempts sent or being readied, hedges included.
    attempts: u32,
    /// A strict route hint: no other endpoint, only the deadline.
    pinned: bool,
    /// The request may be retried after it may have been sent, and hedged.
    idempotent: bool,
    /// A failed attempt may have reached its endpoint (kept only with a deadline).
    maybe_sent: bool,
    /// The current attempt was sent as a hedge (the one before it failed).
    hedge_current: bool,
    deadline: Option<Instant>,
    /// When to send a hedge, if the current attempt is still alone and unanswered.
    hedge_at: Option<Instant>,
    /// Made when the request is first left pending with a deadline or hedge ahead.
    timer: Option<Pin<Box<Sleep>>>,
    /// Made at the first failover or hedge only.
    more: Option<Box<RetryMore<S, S::Future>>>,
}

/// The failover state past the first attempt.
struct RetryMore<S, F> {
    /// Endpoints tried: those of earlier attempts, and the hedge's.
    tried: Vec<EndpointId>,
    /// The next attempt's endpoint, being readied.
    readying: Option<Peer<S>>,
    /// A hedge in flight beside the current attempt.
    hedge: Option<Hedge<F>>,
}

struct Hedge<F> {
    fut: Pin<Box<F>>,
    track: Track,
    id: EndpointId,
}

/// What the endpoint being readied for a failover attempt did.
enum Readying<F> {
    /// Nothing being readied, or still waiting for it.
    Idle,
    Failed(BoxError),
    Sent(F, Track),
}

/// What the request's timer says.
enum Timer {
    Pending,
    Deadline,
    Hedge,
}

/// Counts one attempt in flight at an endpoint until it ends (as completed, or as
/// cancelled when dropped first).
pub(crate) struct Track {
    stats: Arc<EndpointStats>,
    start: Option<Instant>,
    done: bool,
}

/// Records the endpoint an attempt goes to and the attempt's number (1 for the first)
/// into the current span — the request's span, when the stack made one with `endpoint`
/// and `attempt` fields — if that span is enabled. A span without the fields ignores
/// them.
#[inline]
pub(crate) fn record_attempt(endpoint: &str, attempt: u32) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("endpoint", endpoint);
        span.record("attempt", attempt);
    }
}

impl Track {
    /// Starts counting a request sent to the endpoint of `stats`.
    pub(crate) fn start(stats: Arc<EndpointStats>, start: Option<Instant>) -> Self {
        stats.started();
        Track {
            stats,
            start,
            done: false,
        }
    }

    /// The attempt completed.
    fn finish(mut self, failed: bool) {
        self.done = true;
        self.stats.observe(self.start, failed);
    }
}

impl Drop for Track {
    fn drop(&mut self) {
        self.stats.finished(!self.done);
    }
}

impl<S: Service<Req>, Req> Retry<S, Req> {
    /// The failover state of a request about to be sent to `first` (its route hint
    /// comes later, with [`RetryState::keep_hint`]). `idempotent` is asked only when a
    /// copy may be kept.
    pub(crate) fn start(
        shared: &Arc<FailoverShared<S, Req>>,
        req: &Req,
        strict: bool,
        first: EndpointId,
        idempotent: impl FnOnce(&Req) -> bool,
    ) -> RetryState<S, Req> {
        let policy = &shared.policy;
        if strict && policy.deadline.is_none() {
            return RetryState::Off;
        }
        // A strict hint never fails over to another endpoint.
        let more_attempts = !strict && policy.max_attempts > 1;
        if !strict {
            policy.budget.deposit();
        }
        let (copy, idempotent) = match shared.clone_req.filter(|_| more_attempts) {
            None => (None, false),
            Some(clone) if shared.copy_idempotent_only => {
                let idempotent = idempotent(req);
                (idempotent.then(|| clone(req)), idempotent)
            }
            Some(clone) => {
                let copy = clone(req);
                (Some(copy), idempotent(req))
            }
        };
        let hedge = policy.hedge.filter(|_| idempotent);
        if copy.is_none() && policy.deadline.is_none() {
            // (No copy: not idempotent, so no hedge either.) Only a request given back
            // with its error can fail over: nothing to keep until one is.
            return if more_attempts && shared.take_req.is_some() {
                RetryState::Lazy(shared.clone())
            } else {
                RetryState::Off
            };
        }
        let now = (policy.deadline.is_some() || hedge.is_some()).then(Instant::now);
        RetryState::On(Box::new(Retry {
            shared: shared.clone(),
            hint: None,
            copying: copy.is_some(),
            req: copy,
            first,
            attempts: 1,
            pinned: strict,
            idempotent,
            maybe_sent: false,
            hedge_current: false,
            deadline: now.zip(policy.deadline).and_then(|(n, d)| n.checked_add(d)),
            hedge_at: now.zip(hedge).and_then(|(n, d)| n.checked_add(d)),
            timer: None,
            more: None,
        }))
    }

    fn more(&mut self) -> &mut RetryMore<S, S::Future> {
        self.more.get_or_insert_with(|| {
            Box::new(RetryMore {
                tried: Vec::new(),
                readying: None,
                hedge: None,
            })
        })
    }

    /// Notes a failed attempt's error for [`DeadlineExceeded::maybe_sent`].
    fn note_failure(&mut self, error: &BoxError) {
        if self.deadline.is_some() && !self.maybe_sent && !(self.shared.policy.not_sent)(error) {
            self.maybe_sent = true;
        }
    }

    /// The next copy to send, keeping another while attempts remain (`attempts`
    /// already counts the one being sent).
    fn take_copy(&mut self) -> Option<Req> {
        let req = self.req.take()?;
        if self.copying && self.attempts < self.shared.policy.max_attempts {
            self.req = self.shared.clone_req.map(|copy| copy(&req));
        }
        Some(req)
    }

    /// After a failed attempt (none other in flight): chooses the next endpoint if the
    /// error, the request, the attempt count, the deadline, the endpoints left and the
    /// budget allow.
    fn next(&mut self, error: &BoxError) -> bool {
        self.note_failure(error);
        if self.pinned {
            return false;
        }
        let f = &*self.shared;
        // Without a copy, the request must have come back with the error.
        let given_back = self.req.is_none()
            && f.take_req.is_some()
            && find::<NotSent>(&**error).is_some_and(NotSent::has_request);
        if (self.req.is_none() && !given_back) || self.attempts >= f.policy.max_attempts {
            return false;
        }
        // Never-sent errors (or the policy's own rule) for every request; for an
        // idempotent one, also the errors that came after it may have been sent.
        let unsent = (f.policy.retry_if)(error);
        let retryable =
            unsent || (self.idempotent && f.policy.retry_sent_if.as_ref().is_none_or(|r| r(error)));
        if !retryable {
            return false;
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        let first = self.first;
        let more = self.more.get_or_insert_with(|| {
            Box::new(RetryMore {
                tried: Vec::new(),
                readying: None,
                hedge: None,
            })
        });
        more.tried.push(first);
        if given_back && self.hint.is_none() {
            // A lazy state kept no hint: the request's own, read where it lies.
            self.hint = f.hint_in(error);
        }
        let key = failover_key(&self.hint);
        let Some(peer) = f.next_peer(&more.tried, key) else {
            tracing::debug!(%error, "no other ready endpoint to fail over to");
            return false;
        };
        if !f.policy.budget.withdraw() {
            f.totals.retry_refused();
            tracing::debug!(%error, "retry budget spent: not failing over");
            return false;
        }
        if given_back {
            // Taken out of the error only now that it is certain to be sent again.
            // (Its hint was read in place above.)
            self.req = f.take_req.and_then(|unsent| (unsent.take)(error));
            if self.req.is_none() {
                return false;
            }
        }
        f.totals.failed_over(!unsent);
        tracing::debug!(%error, to = ?peer.id, attempt = self.attempts + 1, sent_before = !unsent, "failing over");
        self.first = peer.id;
        self.attempts += 1;
        self.hedge_at = None;
        self.hedge_current = false;
        more.readying = Some(peer);
        true
    }

    /// The current attempt, sent to the endpoint named `endpoint`, answered.
    fn answered(&mut self, endpoint: Option<&str>) {
        // A hedge still in flight lost: cancelled now. It was sent last, so the span
        // names it: name the endpoint that answered instead.
        if let Some(hedge) = self.take_hedge() {
            drop(hedge);
            if let Some(endpoint) = endpoint {
                let span = tracing::Span::current();
                if !span.is_disabled() {
                    span.record("endpoint", endpoint);
                }
            }
        }
        if self.hedge_current {
            self.shared.totals.hedge_won();
            if let Some(h) = &self.hint {
                h.report_chosen(self.first);
            }
        }
    }

    /// Whether a failover attempt waits for its endpoint.
    fn readying(&self) -> bool {
        self.more.as_ref().is_some_and(|m| m.readying.is_some())
    }

    /// Drives the endpoint being readied for a failover attempt, and sends the attempt
    /// once it is ready.
    fn poll_readying(&mut self, cx: &mut Context<'_>) -> Readying<S::Future>
    where
        S::Error: Into<BoxError>,
    {
        loop {
            let Some(more) = self.more.as_mut() else {
                return Readying::Idle;
            };
            let Some(peer) = more.readying.as_mut() else {
                return Readying::Idle;
            };
            match peer.svc.poll_ready(cx) {
                // With the task's coop budget spent, a pending answer may be the budget
                // speaking: come back with a fresh budget (woken now, in case this
                // endpoint does not count the budget and is truly not ready) rather
                // than move a keyed request to another endpoint.
                Poll::Pending if !tokio::task::coop::has_budget_remaining() => {
                    cx.waker().wake_by_ref();
                    return Readying::Idle;
                }
                Poll::Pending => {
                    // Its readiness flag was stale (ejected, at a limit since the
                    // balancer last looked): prefer another ready endpoint, if any;
                    // wait on this one only when none is left.
                    let waiting = peer.id;
                    more.tried.push(waiting);
                    match self.shared.next_peer(&more.tried, failover_key(&self.hint)) {
                        Some(other) => {
                            tracing::debug!(skipped = ?waiting, to = ?other.id, "failover endpoint not ready: trying another");
                            self.first = other.id;
                            more.readying = Some(other);
                        }
                        None => {
                            more.tried.pop();
                            return Readying::Idle;
                        }
                    }
                }
                Poll::Ready(Err(e)) => {
                    more.readying = None;
                    return Readying::Failed(e.into());
                }
                Poll::Ready(Ok(())) => {
                    let mut peer = more.readying.take().expect("readying");
                    let req = self
                        .take_copy()
                        .expect("a copy is kept while attempts remain");
                    let fut = peer.svc.call(req);
                    record_attempt(&peer.stats.key, self.attempts);
                    if let Some(h) = &self.hint {
                        h.report_chosen(peer.id);
                    }
                    let now = Instant::now();
                    if let Some(delay) = self.shared.policy.hedge.filter(|_| self.idempotent)
                        && self.req.is_some()
                    {
                        self.hedge_at = now.checked_add(delay);
                    }
                    return Readying::Sent(fut, Track::start(peer.stats, Some(now)));
                }
            }
        }
    }

    /// The hedge's reply, once it has one.
    fn poll_hedge(&mut self, cx: &mut Context<'_>) -> Option<Result<S::Response, BoxError>>
    where
        S::Error: Into<BoxError>,
    {
        let more = self.more.as_mut()?;
        let out = match more.hedge.as_mut()?.fut.as_mut().poll(cx) {
            Poll::Pending => return None,
            Poll::Ready(out) => out,
        };
        let hedge = more.hedge.take().expect("a hedge");
        hedge.track.finish(out.is_err());
        match out {
            Ok(resp) => {
                self.shared.totals.hedge_won();
                if let Some(h) = &self.hint {
                    h.report_chosen(hedge.id);
                }
                self.first = hedge.id;
                Some(Ok(resp))
            }
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Takes the hedge in flight, if any.
    fn take_hedge(&mut self) -> Option<Hedge<S::Future>> {
        self.more.as_mut()?.hedge.take()
    }

    /// Polls the timer for the next of the deadline and the hedge's time.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Timer {
        let at = match (self.deadline, self.hedge_at) {
            (Some(d), Some(h)) => d.min(h),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => return Timer::Pending,
        };
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                timer
            }
            slot => slot.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        if timer.as_mut().poll(cx).is_pending() {
            return Timer::Pending;
        }
        if self.deadline.is_some_and(|d| d <= at) {
            Timer::Deadline
        } else {
            self.hedge_at = None;
            Timer::Hedge
        }
    }

    /// Sends a hedge to another endpoint ready now, if attempts, the request's copy
    /// and the budget allow.
    fn send_hedge(&mut self, cx: &mut Context<'_>) {
        if self.req.is_none() || self.attempts >= self.shared.policy.max_attempts {
            return;
        }
        let first = self.first;
        let shared = self.shared.clone();
        // A keyed request (a session, a hashed key) hedges where it would fail over.
        let key = failover_key(&self.hint);
        let more = self.more();
        if more.hedge.is_some() || more.readying.is_some() {
            return;
        }
        more.tried.push(first);
        // The least loaded ready endpoint not tried yet that is ready now (for a keyed
        // request, the one its key ranks first); those found not ready are skipped (and
        // tried again by a later failover).
        let before = more.tried.len();
        let peer = loop {
            let Some(mut peer) = shared.next_peer(&more.tried, key) else {
                break None;
            };
            if let Poll::Ready(Ok(())) = peer.svc.poll_ready(cx) {
                break Some(peer);
            }
            more.tried.push(peer.id);
        };
        more.tried.truncate(before);
        let Some(mut peer) = peer else {
            tracing::debug!("no other endpoint ready for a hedge");
            return;
        };
        if !shared.policy.budget.withdraw() {
            shared.totals.retry_refused();
            tracing::debug!("retry budget spent: no hedge");
            return;
        }
        self.attempts += 1;
        let req = self.take_copy().expect("checked above");
        let fut = peer.svc.call(req);
        shared.totals.hedged();
        record_attempt(&peer.stats.key, self.attempts);
        tracing::debug!(to = ?peer.id, attempt = self.attempts, "hedging");
        let more = self.more();
        more.tried.push(peer.id);
        more.hedge = Some(Hedge {
            fut: Box::pin(fut),
            track: Track::start(peer.stats, Some(Instant::now())),
            id: peer.id,
        });
    }

    /// The deadline passed: drops what is left of the request and says why.
    fn expire(&mut self, current_in_flight: bool) -> DeadlineExceeded {
        let (mut in_flight, mut readying) = (current_in_flight, false);
        if let Some(more) = self.more.as_mut() {
            in_flight |= more.hedge.take().is_some();
            readying = more.readying.take().is_some();
        }
        self.deadline = None;
        self.hedge_at = None;
        self.shared.totals.deadline_exceeded();
        let after = self.shared.policy.deadline.unwrap_or_default();
        tracing::debug!(
            ?after,
            attempts = self.attempts,
            "request deadline exceeded"
        );
        DeadlineExceeded {
            after,
            attempts: self.attempts - u32::from(readying),
            maybe_sent: self.maybe_sent || in_flight,
        }
    }
}

/// The failover key of a request's route hint, if it has one.
fn failover_key(hint: &Option<RouteHint>) -> Option<u64> {
    hint.as_ref().and_then(RouteHint::failover_key)
}

impl<S: Service<Req>, Req> RetryState<S, Req> {
    /// Keeps the request's route hint, to tell it where a later attempt went (a lazy
    /// state reads it again from the request given back, if it comes to that).
    #[inline]
    pub(crate) fn keep_hint(&mut self, route_hint: Option<RouteHint>) {
        if let RetryState::On(retry) = self {
            retry.hint = route_hint;
        }
    }

    /// The full failover state, if there is one.
    fn get(&mut self) -> Option<&mut Retry<S, Req>> {
        match self {
            RetryState::On(retry) => Some(retry),
            RetryState::Off | RetryState::Lazy { .. } => None,
        }
    }

    /// The failover state to handle the `error` of an attempt sent to `first` with: a
    /// lazy one becomes the full one when the endpoint gave the request back with the
    /// error (the only failure it could fail over), and stays as it is otherwise.
    fn for_error(
        &mut self,
        error: &BoxError,
        first: Option<EndpointId>,
    ) -> Option<&mut Retry<S, Req>> {
        if let RetryState::Lazy(_) = self {
            let first = first?;
            if !find::<NotSent>(&**error).is_some_and(NotSent::has_request) {
                return None;
            }
            let RetryState::Lazy(shared) = std::mem::replace(self, RetryState::Off) else {
                unreachable!("matched above");
            };
            *self = RetryState::On(Box::new(Retry {
                shared,
                hint: None,
                req: None,
                copying: false,
                first,
                attempts: 1,
                pinned: false,
                idempotent: false,
                maybe_sent: false,
                hedge_current: false,
                deadline: None,
                hedge_at: None,
                timer: None,
                more: None,
            }));
        }
        self.get()
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    /// The future of a request sent to an endpoint.
    pub(crate) fn sent(inner: S::Future, track: Track, retry: RetryState<S, Req>) -> Self {
        ResponseFuture {
            inner: State::Call { fut: inner },
            track: Some(track),
            retry,
        }
    }

    /// A future that fails with `error` at once.
    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            inner: State::Failed { error: Some(error) },
            track: None,
            retry: RetryState::Off,
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // A failover attempt whose endpoint is being readied.
            if let Some(retry) = this.retry.get() {
                match retry.poll_readying(cx) {
                    Readying::Idle => {}
                    Readying::Failed(e) => {
                        if retry.next(&e) {
                            continue;
                        }
                        return Poll::Ready(Err(e));
                    }
                    Readying::Sent(fut, track) => {
                        this.inner.set(State::Call { fut });
                        *this.track = Some(track);
                    }
                }
            }
            // The current attempt.
            let polled = match this.inner.as_mut().project() {
                StateProj::Call { fut } => fut.poll(cx),
                StateProj::Boxed { fut } => fut.as_mut().poll(cx),
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| PolledAfterCompletion.into())));
                }
                StateProj::Done => {
                    if !this.retry.get().is_some_and(|r| r.readying()) {
                        return Poll::Ready(Err(PolledAfterCompletion.into()));
                    }
                    Poll::Pending
                }
            };
            if let Poll::Ready(out) = polled {
                this.inner.set(State::Done);
                let track = this.track.take();
                let attempt_at = track.as_ref().map(|t| t.stats.id);
                if out.is_ok()
                    && let Some(retry) = this.retry.get()
                {
                    retry.answered(track.as_ref().map(|t| &*t.stats.key));
                }
                if let Some(track) = track {
                    track.finish(out.is_err());
                }
                match out {
                    Ok(resp) => return Poll::Ready(Ok(resp)),
                    Err(e) => {
                        let e: BoxError = e.into();
                        if let Some(retry) = this.retry.for_error(&e, attempt_at) {
                            if let Some(hedge) = retry.take_hedge() {
                                // The hedge carries on alone; the request fails only
                                // if it fails too.
                                retry.note_failure(&e);
                                tracing::debug!(error = %e, "attempt failed; its hedge carries on");
                                retry.first = hedge.id;
                                retry.hedge_current = true;
                                this.inner.set(State::Boxed { fut: hedge.fut });
                                *this.track = Some(hedge.track);
                                continue;
                            }
                            if retry.next(&e) {
                                continue;
                            }
                        }
                        return Poll::Ready(Err(e));
                    }
                }
            }
            let Some(retry) = this.retry.get() else {
                return Poll::Pending;
            };
            // The hedge.
            match retry.poll_hedge(cx) {
                Some(Ok(resp)) => {
                    // The hedge won: the other attempt is cancelled.
                    this.inner.set(State::Done);
                    *this.track = None;
                    return Poll::Ready(Ok(resp));
                }
                Some(Err(e)) => {
                    // The other attempt carries on alone.
                    retry.note_failure(&e);
                    tracing::debug!(error = %e, "hedge failed; the first attempt carries on");
                }
                None => {}
            }
            // The deadline, and the time to hedge.
            match retry.poll_timer(cx) {
                Timer::Pending => return Poll::Pending,
                Timer::Deadline => {
                    let in_flight = matches!(
                        this.inner.as_mut().project(),
                        StateProj::Call { .. } | StateProj::Boxed { .. }
                    );
                    let error = retry.expire(in_flight);
                    this.inner.set(State::Done);
                    *this.track = None;
                    return Poll::Ready(Err(error.into()));
                }
                Timer::Hedge => retry.send_hedge(cx),
            }
        }
    }
}
