//! `RateLimit`: the service; a global one takes its cell in `poll_ready`, a keyed one
//! in `call`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use marina_core::{BoxError, KeyExtractor};
use tokio::time::Sleep;
use tower_service::Service;

use super::admissions::Counter;
use super::config::OnLimit;
use super::future::{KeyedFuture, ResponseFuture};
use super::handle::RateLimitHandle;
use super::layer::{Global, Keyed};
use super::limiter::{Admission, Limiter, Reservation, Reserved};

/// Readiness of a global limiter's service.
enum Ready {
    /// No cell taken.
    Idle,
    /// A cell is reserved for later (`Wait` mode): waiting for its time.
    Waiting,
    /// A cell is taken for the next call.
    Permit,
    /// Over the limit: the next call fails with this wait.
    Denied(Duration),
}

/// The service of a [`RateLimitLayer`].
///
/// # Sharing
///
/// `Clone` when the inner service is. The quota lives in the layer: every clone, and
/// every service made by the same [`RateLimitLayer`] or a clone of it, draws on one
/// quota (for a keyed limiter, one key table) and counts in one [`RateLimitHandle`]; a
/// layer built once per service gives each its own. Each clone calls its own clone of
/// the inner service and starts with no cell taken. It is `Send + Sync` when the inner
/// service and the key extractor are: clone it into each task. A global limiter takes
/// its cell in `poll_ready`, so a clone made ready and then not called has spent one.
///
/// # Cancel safety
///
/// A global service in `Wait` mode holds its reserved cell while `poll_ready` is
/// pending. Dropped then, it gives the cell back if no later one has been reserved
/// since (the next arrival takes it); otherwise that cell goes unused, and the
/// requests behind it keep their places and times: nobody waits longer for it.
///
/// [`RateLimitLayer`]: crate::RateLimitLayer
pub struct RateLimit<S, X = Global> {
    inner: S,
    limiter: Arc<Limiter>,
    extractor: Arc<X>,
    state: Ready,
    /// This service's admissions (in the limiter's count).
    counter: Counter,
    /// The cell reserved while `Waiting`.
    reservation: Option<Reservation>,
    /// The reservation's timer, kept for the next one.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S: Clone, X> Clone for RateLimit<S, X> {
    fn clone(&self) -> Self {
        RateLimit::new(
            self.inner.clone(),
            self.limiter.clone(),
            self.extractor.clone(),
        )
    }
}

impl<S: fmt::Debug, X> fmt::Debug for RateLimit<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("rate", &self.limiter.rate)
            .finish_non_exhaustive()
    }
}

impl<S, X> RateLimit<S, X> {
    pub(crate) fn new(inner: S, limiter: Arc<Limiter>, extractor: Arc<X>) -> Self {
        RateLimit {
            inner,
            limiter,
            extractor,
            state: Ready::Idle,
            counter: Counter::default(),
            reservation: None,
            sleep: None,
        }
    }

    /// The handle to the counters.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle {
            limiter: self.limiter.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Global: the cell is taken in `poll_ready` (backpressure in `Wait` mode).
impl<S, Req> Service<Req> for RateLimit<S, Global>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !matches!(self.state, Ready::Permit) && !ready!(self.take_cell(cx)) {
            // Over the limit: the call fails.
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Ready::Permit = self.state {
            self.state = Ready::Idle;
            return ResponseFuture::call(self.inner.call(req));
        }
        ResponseFuture::failed(self.refusal())
    }
}

impl<S> RateLimit<S, Global> {
    /// Takes the cell for the next call: `Ready(true)` once taken, `Ready(false)` when
    /// refused (the next call fails), `Pending` while waiting for a reserved one.
    #[inline]
    fn take_cell(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if let Ready::Idle = self.state {
            // The hot path: one check of governor's, one count of this service's.
            match self.limiter.check_global() {
                Ok(()) => {
                    self.counter.add(&self.limiter.admissions);
                    self.limiter.metrics.admitted();
                    self.state = Ready::Permit;
                    return Poll::Ready(true);
                }
                Err(nu) => self.over_limit(self.limiter.wait_of(&nu)),
            }
        }
        self.poll_cell(cx)
    }

    /// Over the limit by `wait`: refused, or (`Wait` mode) a place in line.
    #[cold]
    fn over_limit(&mut self, wait: Duration) {
        self.state = match self.limiter.on_limit() {
            OnLimit::Reject => Ready::Denied(wait),
            // Take a place in line; refused at once if it is too far back.
            OnLimit::Wait { max } => self.wait_for(max),
        };
    }

    /// A cell denied, or reserved for later: waits for the reserved one.
    #[cold]
    fn poll_cell(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        match self.state {
            Ready::Waiting => {
                let sleep = self.sleep.as_mut().expect("a reservation's timer");
                ready!(sleep.as_mut().poll(cx));
                if let Some(r) = self.reservation.take() {
                    r.admit();
                }
                self.state = Ready::Permit;
                Poll::Ready(true)
            }
            Ready::Permit => Poll::Ready(true),
            Ready::Denied(_) => Poll::Ready(false),
            Ready::Idle => unreachable!("an idle service checks first"),
        }
    }

    /// Takes a place in line (`Wait` mode): the readiness it gives.
    fn wait_for(&mut self, max: Duration) -> Ready {
        match self.limiter.reserve(None, max) {
            Reserved::Now => {
                self.counter.add(&self.limiter.admissions);
                self.limiter.metrics.admitted();
                Ready::Permit
            }
            Reserved::Later(r) => {
                match self.sleep.as_mut() {
                    Some(sleep) => sleep.as_mut().reset(r.at),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(r.at))),
                }
                self.reservation = Some(r);
                Ready::Waiting
            }
            Reserved::Refused(wait) => Ready::Denied(wait),
            Reserved::Full(_) => unreachable!("a global limiter has no key table"),
        }
    }

    /// The error of a call without a cell: refused over the limit, or not ready (a
    /// reservation keeps its place).
    #[cold]
    fn refusal(&mut self) -> BoxError {
        match std::mem::replace(&mut self.state, Ready::Idle) {
            Ready::Denied(wait) => self.limiter.reject(wait),
            state => {
                self.state = state;
                "RateLimit called before poll_ready".into()
            }
        }
    }
}

/// Keyed: the cell is taken in `call`, where the key is known.
impl<S, X, Req> Service<Req> for RateLimit<S, Keyed<X>>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = KeyedFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // The key is lent, not copied: a known key allocates nothing.
        let limiter = &self.limiter;
        let admission = self
            .extractor
            .0
            .with_key(&req, |key| limiter.admit_key(key))
            .unwrap_or_else(|| limiter.admit_keyless());
        match admission {
            Admission::Now => {
                self.counter.add(&self.limiter.admissions);
                self.limiter.metrics.admitted();
                KeyedFuture::call(self.inner.call(req))
            }
            Admission::Later(reservation) => self.wait(reservation, req),
            Admission::Refused(error) => KeyedFuture::failed(error),
        }
    }
}

impl<S, X> RateLimit<S, Keyed<X>> {
    /// Waits in the future for the reserved cell, then calls.
    #[cold]
    fn wait<Req>(&mut self, reservation: Reservation, req: Req) -> KeyedFuture<S, Req>
    where
        S: Service<Req> + Clone,
    {
        // Take the readied service into the future; keep a fresh clone.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        KeyedFuture::wait(reservation, svc, req)
    }
}
