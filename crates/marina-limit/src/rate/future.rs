//! The response futures: a global service's pass-through, a keyed service's wait.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use marina_core::BoxError;
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
        inner: Option<F>,
        error: Option<BoxError>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn call(inner: F) -> Self {
        ResponseFuture {
            inner: Some(inner),
            error: None,
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            inner: None,
            error: Some(error),
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(f) => f.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(this
                .error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
        }
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
        state: KeyedState<S, Req>,
    }
}

pin_project! {
    #[project = KeyedProj]
    pub(crate) enum KeyedState<S, Req>
    where
        S: Service<Req>,
    {
        /// Admitted: the inner call.
        Call { #[pin] fut: S::Future },
        /// Over the limit, waiting for its reserved cell.
        Waiting {
            sleep: Pin<Box<Sleep>>,
            reservation: Option<Reservation>,
            svc: Option<S>,
            req: Option<Req>,
        },
        /// Refused.
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> From<KeyedState<S, Req>> for KeyedFuture<S, Req> {
    fn from(state: KeyedState<S, Req>) -> Self {
        KeyedFuture { state }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for KeyedFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for KeyedFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                KeyedProj::Call { fut } => return fut.poll(cx).map_err(Into::into),
                KeyedProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into())));
                }
                KeyedProj::Waiting {
                    sleep,
                    reservation,
                    svc,
                    req,
                } => {
                    // The cell is reserved: at its time, no re-check.
                    ready!(sleep.as_mut().poll(cx));
                    if let Some(r) = reservation.take() {
                        r.admit();
                    }
                    let mut svc = svc.take().expect("the readied service");
                    let req = req.take().expect("the request");
                    KeyedState::Call { fut: svc.call(req) }
                }
            };
            state.set(next);
        }
    }
}
