//! `RateLimit`: the service; a global one takes its cell in `poll_ready`, a keyed one
//! in `call`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use marina_core::{BoxError, KeyExtractor};
use tokio::time::Sleep;
use tower_service::Service;

use super::config::OnLimit;
use super::error::TooManyKeys;
use super::future::{KeyedFuture, KeyedState, ResponseFuture};
use super::handle::RateLimitHandle;
use super::layer::{Global, Keyed};
use super::limiter::{Check, Limiter, Reservation, Reserved};

/// Readiness of a global limiter's service.
pub(crate) enum Ready {
    /// No cell taken.
    Idle,
    /// A cell is reserved for later (`Wait` mode): waiting for its time.
    Waiting,
    /// A cell is taken for the next call.
    Permit,
    /// Over the limit: the next call fails with this wait.
    Denied(Duration),
}

/// The service of a [`RateLimitLayer`](crate::RateLimitLayer).
///
/// # Sharing
///
/// `Clone` when the inner service is. The quota lives in the layer: every clone, and
/// every service made by the same [`RateLimitLayer`](crate::RateLimitLayer) or a clone of it, draws on one
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
pub struct RateLimit<S, X = Global> {
    pub(crate) inner: S,
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) extractor: Arc<X>,
    pub(crate) state: Ready,
    /// The cell reserved while `Waiting`.
    pub(crate) reservation: Option<Reservation>,
    /// The reservation's timer, kept for the next one.
    pub(crate) sleep: Option<Pin<Box<Sleep>>>,
}

impl<S: Clone, X> Clone for RateLimit<S, X> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            state: Ready::Idle,
            reservation: None,
            sleep: None,
        }
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match self.state {
                Ready::Permit => return self.inner.poll_ready(cx).map_err(Into::into),
                Ready::Denied(_) => return Poll::Ready(Ok(())),
                Ready::Waiting => {
                    let sleep = self.sleep.as_mut().expect("a reservation's timer");
                    ready!(sleep.as_mut().poll(cx));
                    if let Some(r) = self.reservation.take() {
                        r.admit();
                    }
                    self.state = Ready::Permit;
                    continue;
                }
                Ready::Idle => {}
            }
            self.state = match self.limiter.check(None) {
                Ok(()) => Ready::Permit,
                Err(Check::Full(_) | Check::Missing) => {
                    unreachable!("a global limiter has no keys")
                }
                Err(Check::Wait(wait)) => match self.limiter.on_limit() {
                    OnLimit::Reject => Ready::Denied(wait),
                    // Take a place in line; refused at once if it is too far back.
                    OnLimit::Wait { max } => self.wait_for(max),
                },
            };
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, Ready::Idle) {
            Ready::Permit => ResponseFuture::call(self.inner.call(req)),
            Ready::Denied(wait) => ResponseFuture::failed(self.limiter.reject(wait)),
            state @ (Ready::Idle | Ready::Waiting) => {
                // Not ready (a reservation keeps its place).
                self.state = state;
                ResponseFuture::failed("RateLimit called before poll_ready".into())
            }
        }
    }
}

impl<S> RateLimit<S, Global> {
    /// Takes a place in line (`Wait` mode): the readiness it gives.
    fn wait_for(&mut self, max: Duration) -> Ready {
        match self.limiter.reserve(None, max) {
            Reserved::Now => Ready::Permit,
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = self.extractor.0.extract(&req);
        let wait = match self.limiter.check(key.as_ref()) {
            Ok(()) => {
                return KeyedState::Call {
                    fut: self.inner.call(req),
                }
                .into();
            }
            Err(Check::Full(max_keys)) => return self.too_many_keys(max_keys),
            Err(Check::Missing) => {
                return KeyedState::Failed {
                    error: Some(self.limiter.refuse_missing_key()),
                }
                .into();
            }
            Err(Check::Wait(wait)) => wait,
        };
        let OnLimit::Wait { max } = self.limiter.on_limit() else {
            return KeyedState::Failed {
                error: Some(self.limiter.reject(wait)),
            }
            .into();
        };
        // Take a place in the key's line; refused at once if it is too far back.
        match self.limiter.reserve(key, max) {
            Reserved::Now => KeyedState::Call {
                fut: self.inner.call(req),
            }
            .into(),
            Reserved::Later(reservation) => {
                // Take the readied service into the future; keep a fresh clone.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                KeyedState::Waiting {
                    sleep: Box::pin(tokio::time::sleep_until(reservation.at)),
                    reservation: Some(reservation),
                    svc: Some(svc),
                    req: Some(req),
                }
                .into()
            }
            Reserved::Refused(wait) => KeyedState::Failed {
                error: Some(self.limiter.reject(wait)),
            }
            .into(),
            Reserved::Full(max_keys) => self.too_many_keys(max_keys),
        }
    }
}

impl<S, X> RateLimit<S, Keyed<X>> {
    /// Refuses a new key the full table will not take.
    fn too_many_keys<Req>(&self, max_keys: usize) -> KeyedFuture<S, Req>
    where
        S: Service<Req>,
    {
        self.limiter.rejected.fetch_add(1, Relaxed);
        KeyedState::Failed {
            error: Some(TooManyKeys { max_keys }.into()),
        }
        .into()
    }
}
