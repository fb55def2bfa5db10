//! The response futures: a global service's pass-through, a keyed service's wait.

use std::fmt;
use std::future::{Future, Pending};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use marina_core::{BoxError, WaitThenCall};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::limiter::Reservation;

pin_project! {
    /// The future of a global [`RateLimit`]'s calls.
    ///
    /// # Cancel safety
    ///
    /// Dropping it cancels the inner request; the rate-limit cell stays spent.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: WaitThenCall<Pending<Result<(F, ()), BoxError>>, F, ()>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn call(inner: F) -> Self {
        ResponseFuture {
            inner: WaitThenCall::calling(inner, ()),
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            inner: WaitThenCall::failed(error),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

pin_project! {
    /// The future of a keyed [`RateLimit`]'s calls: the inner response, after a
    /// bounded wait for the request's place in line in `Wait` mode.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it waits drops the request unsent. Its reserved cell is given
    /// back if no later request of the key has reserved one since (the next arrival
    /// takes it); otherwise that cell goes unused, and the requests behind it keep
    /// their places and times: nobody waits longer for it. Dropping it after
    /// admission cancels the inner request; the cell stays spent.
    pub struct KeyedFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: WaitThenCall<CellWait<S, Req>, S::Future, ()>,
    }
}

/// A keyed call over the limit: sleeps until its reserved cell's time, then calls.
pub(crate) struct CellWait<S, Req> {
    sleep: Pin<Box<Sleep>>,
    reservation: Option<Reservation>,
    svc: Option<S>,
    req: Option<Req>,
}

// Nothing in it is pinned structurally (the sleep is boxed; the service and the
// request are moved out, never pinned).
impl<S, Req> Unpin for CellWait<S, Req> {}

impl<S: Service<Req>, Req> KeyedFuture<S, Req> {
    pub(crate) fn call(fut: S::Future) -> Self {
        KeyedFuture {
            inner: WaitThenCall::calling(fut, ()),
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        KeyedFuture {
            inner: WaitThenCall::failed(error),
        }
    }

    pub(crate) fn wait(reservation: Reservation, svc: S, req: Req) -> Self {
        KeyedFuture {
            inner: WaitThenCall::waiting(CellWait {
                sleep: Box::pin(tokio::time::sleep_until(reservation.at)),
                reservation: Some(reservation),
                svc: Some(svc),
                req: Some(req),
            }),
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for KeyedFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for CellWait<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<(S::Future, ()), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The cell is reserved: at its time, no re-check.
        ready!(self.sleep.as_mut().poll(cx));
        if let Some(r) = self.reservation.take() {
            r.admit();
        }
        let mut svc = self.svc.take().expect("the readied service");
        let req = self.req.take().expect("the request");
        Poll::Ready(Ok((svc.call(req), ())))
    }
}

impl<S, Req> Future for KeyedFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
