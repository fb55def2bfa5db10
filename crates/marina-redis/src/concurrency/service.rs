//! `RedisConcurrency`: the service and its response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use marina_core::{BoxError, KeyExtractor, PolledAfterCompletion, WaitThenCall};
use marina_limit::{MissingKey, WithoutKey};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::RedisConcurrencyHandle;
use super::semaphore::{Permit, Semaphore};

type Acquire = Pin<Box<dyn Future<Output = Result<Permit, BoxError>> + Send>>;

/// The service of a [`RedisConcurrencyLayer`](crate::RedisConcurrencyLayer).
///
/// # Sharing
///
/// `Clone` when the inner service is (its `Service` impl needs that: the readied
/// service goes into the future while the permit is taken). Clones, and every service
/// of the same layer, share the layer's permits, renewal and counters; every instance
/// of the fleet with the same prefix and name shares the limit. A permit is held by a
/// call's [`ConcurrencyFuture`], never by the service.
pub struct RedisConcurrency<S, X> {
    inner: S,
    sem: Arc<Semaphore>,
    extractor: Arc<X>,
}

impl<S: Clone, X> Clone for RedisConcurrency<S, X> {
    fn clone(&self) -> Self {
        RedisConcurrency {
            inner: self.inner.clone(),
            sem: self.sem.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S: fmt::Debug, X> fmt::Debug for RedisConcurrency<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConcurrency")
            .field("inner", &self.inner)
            .field("name", &self.sem.name)
            .field("limit", &self.sem.limit)
            .finish_non_exhaustive()
    }
}

impl<S, X> RedisConcurrency<S, X> {
    pub(crate) fn new(inner: S, sem: Arc<Semaphore>, extractor: Arc<X>) -> Self {
        RedisConcurrency {
            inner,
            sem,
            extractor,
        }
    }

    /// The handle to the counters.
    pub fn handle(&self) -> RedisConcurrencyHandle {
        RedisConcurrencyHandle {
            sem: self.sem.clone(),
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

impl<S, X, Req> Service<Req> for RedisConcurrency<S, X>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ConcurrencyFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let sem = &self.sem;
        let key = match self.extractor.with_key(&req, |k| sem.set_key(k)) {
            Some(key) => key,
            None => match sem.without_key {
                WithoutKey::Refuse => {
                    sem.counters.rejected.fetch_add(1, Relaxed);
                    sem.counters.missing_key.fetch_add(1, Relaxed);
                    return ConcurrencyFuture::failed(MissingKey.into());
                }
                WithoutKey::Unlimited => {
                    sem.counters.admitted.fetch_add(1, Relaxed);
                    return ConcurrencyFuture::calling(self.inner.call(req), Permit::Open);
                }
                WithoutKey::Shared => sem.keyless(),
            },
        };
        let acquire = Box::pin(sem.clone().acquire(key));
        // Take the readied service into the future; keep a fresh clone.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        ConcurrencyFuture {
            inner: WaitThenCall::waiting(PermitWait {
                acquire,
                svc: Some(svc),
                req: Some(req),
            }),
        }
    }
}

pin_project! {
    /// The future of [`RedisConcurrency`]'s calls: takes the key's permit (one Redis
    /// call, or more while waiting), then holds it until the response completes.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it takes the permit drops the request unsent; a permit Redis
    /// granted meanwhile is released in the background. Dropping it after admission
    /// cancels the inner request and releases the permit (in the background: a
    /// release that cannot reach Redis ends with its lease).
    pub struct ConcurrencyFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: WaitThenCall<PermitWait<S, Req>, S::Future, Permit>,
    }
}

/// A call waiting for its key's permit; calls the inner service once granted.
pub(crate) struct PermitWait<S, Req> {
    acquire: Acquire,
    svc: Option<S>,
    req: Option<Req>,
}

// Nothing in it is pinned structurally (the acquire future is boxed; the service and
// the request are moved out, never pinned).
impl<S, Req> Unpin for PermitWait<S, Req> {}

impl<S: Service<Req>, Req> Future for PermitWait<S, Req> {
    type Output = Result<(S::Future, Permit), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let permit = ready!(self.acquire.as_mut().poll(cx))?;
        let this = &mut *self;
        match (this.svc.take(), this.req.take()) {
            (Some(mut svc), Some(req)) => Poll::Ready(Ok((svc.call(req), permit))),
            _ => Poll::Ready(Err(PolledAfterCompletion.into())),
        }
    }
}

impl<S: Service<Req>, Req> ConcurrencyFuture<S, Req> {
    fn failed(error: BoxError) -> Self {
        ConcurrencyFuture {
            inner: WaitThenCall::failed(error),
        }
    }

    fn calling(fut: S::Future, permit: Permit) -> Self {
        ConcurrencyFuture {
            inner: WaitThenCall::calling(fut, permit),
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ConcurrencyFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for ConcurrencyFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
