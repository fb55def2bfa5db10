//! `RedisRateLimit`: the service; a global one takes its cell in `poll_ready`, a keyed
//! one in `call` (and its future).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use marina_core::{BoxError, KeyExtractor};
use marina_limit::{Global, Keyed};
use tokio::time::Sleep;
use tower_service::Service;

use super::future::{KeyedFuture, ResponseFuture};
use super::handle::RedisRateHandle;
use super::limiter::{Check, Decision, Limiter};

type Ask = Pin<Box<dyn Future<Output = Decision> + Send>>;

/// Readiness of a global limiter's service.
enum Ready {
    /// No cell taken.
    Idle,
    /// Asking Redis. In a mutex only so that the service is `Sync` (the future is
    /// `Send` only): it is only ever reached through `&mut self`, with `get_mut`,
    /// never locked.
    Asking(Mutex<Ask>),
    /// A cell reserved for later (`Wait`): waiting for its time.
    Waiting(Pin<Box<Sleep>>),
    /// A cell taken for the next call.
    Permit,
    /// Refused: the next call fails with this.
    Denied(BoxError),
}

/// The service of a [`RedisRateLimitLayer`](crate::RedisRateLimitLayer).
///
/// # Sharing
///
/// `Clone` when the inner service is: clones, and every service of the same layer,
/// share the limiter (its local lease state and counters); every instance of the
/// fleet with the same prefix and name shares the quota. Each clone starts with no
/// cell taken. A global limiter takes its cell in `poll_ready`, so a clone made ready
/// and not called has spent one.
///
/// It is `Send + Sync` when the inner service and the key extractor are (so it fits
/// in a `BoxCloneSyncService`): clone it into each task.
///
/// # Cancel safety
///
/// A global service dropped while `poll_ready` asks Redis drops the wait for the
/// answer; the cells that call takes are spent unused. Dropped while waiting for a
/// reserved cell (`Wait`), that cell goes unused; nobody behind it waits longer.
pub struct RedisRateLimit<S, X = Global> {
    inner: S,
    limiter: Arc<Limiter>,
    extractor: Arc<X>,
    state: Ready,
}

impl<S: Clone, X> Clone for RedisRateLimit<S, X> {
    fn clone(&self) -> Self {
        RedisRateLimit::new(
            self.inner.clone(),
            self.limiter.clone(),
            self.extractor.clone(),
        )
    }
}

impl<S: fmt::Debug, X> fmt::Debug for RedisRateLimit<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimit")
            .field("inner", &self.inner)
            .field("name", &self.limiter.name)
            .field("rate", &self.limiter.rate)
            .finish_non_exhaustive()
    }
}

impl<S, X> RedisRateLimit<S, X> {
    pub(crate) fn new(inner: S, limiter: Arc<Limiter>, extractor: Arc<X>) -> Self {
        RedisRateLimit {
            inner,
            limiter,
            extractor,
            state: Ready::Idle,
        }
    }

    /// The handle to the counters.
    pub fn handle(&self) -> RedisRateHandle {
        RedisRateHandle {
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

impl Ready {
    fn of(decision: Decision) -> Self {
        match decision {
            Decision::Admit => Ready::Permit,
            Decision::AdmitAt(at) => Ready::Waiting(Box::pin(tokio::time::sleep_until(at))),
            Decision::Refuse(e) => Ready::Denied(e),
        }
    }
}

/// Global: the cell is taken in `poll_ready` (backpressure in `Wait` mode).
impl<S, Req> Service<Req> for RedisRateLimit<S, Global>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            self.state = match &mut self.state {
                Ready::Idle => match self.limiter.check_shared() {
                    Check::Now(d) => Ready::of(d),
                    Check::Ask(st) => {
                        Ready::Asking(Mutex::new(Box::pin(self.limiter.clone().ask(st))))
                    }
                },
                Ready::Asking(ask) => {
                    let ask = ask.get_mut().unwrap_or_else(PoisonError::into_inner);
                    Ready::of(ready!(ask.as_mut().poll(cx)))
                }
                Ready::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    Ready::Permit
                }
                Ready::Permit => return self.inner.poll_ready(cx).map_err(Into::into),
                // The call fails.
                Ready::Denied(_) => return Poll::Ready(Ok(())),
            };
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, Ready::Idle) {
            Ready::Permit => ResponseFuture::call(self.inner.call(req)),
            Ready::Denied(e) => ResponseFuture::failed(e),
            state => {
                self.state = state;
                ResponseFuture::failed("RedisRateLimit called before poll_ready".into())
            }
        }
    }
}

/// Keyed: the cell is taken in `call`, where the key is known, and in the future when
/// Redis has to be asked.
impl<S, X, Req> Service<Req> for RedisRateLimit<S, Keyed<X>>
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
        let limiter = &self.limiter;
        // The key is lent, not copied: a known key allocates nothing.
        let check = self
            .extractor
            .0
            .with_key(&req, |key| limiter.check_key(key))
            .unwrap_or_else(|| limiter.check_keyless());
        match check {
            Check::Now(Decision::Admit) => KeyedFuture::call(self.inner.call(req)),
            Check::Now(Decision::Refuse(e)) => KeyedFuture::failed(e),
            Check::Now(Decision::AdmitAt(at)) => {
                let svc = self.take_inner();
                KeyedFuture::sleeping(at, svc, req)
            }
            Check::Ask(st) => {
                let ask = Box::pin(limiter.clone().ask(st));
                let svc = self.take_inner();
                KeyedFuture::asking(ask, svc, req)
            }
        }
    }
}

impl<S: Clone, X> RedisRateLimit<S, Keyed<X>> {
    /// Takes the readied service into the future; keeps a fresh clone.
    fn take_inner(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}
