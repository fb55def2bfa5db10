//! The response futures: a global service's pass-through, a keyed service's ask and
//! wait.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use marina_core::{BoxError, WaitThenCall, after_completion};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::limiter::Decision;

type Ask = Pin<Box<dyn Future<Output = Decision> + Send>>;

pin_project! {
    /// The future of a global [`RedisRateLimit`](crate::RedisRateLimit)'s calls.
    ///
    /// # Cancel safety
    ///
    /// Dropping it cancels the inner request; the cell stays spent.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: WaitThenCall<std::future::Pending<Result<(F, ()), BoxError>>, F, ()>,
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

pin_project! {
    /// The future of a keyed [`RedisRateLimit`](crate::RedisRateLimit)'s calls: the
    /// inner response, after asking Redis when the local state could not decide, and
    /// after a bounded wait for a reserved cell in `Wait` mode.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it asks Redis drops the request unsent; the cells that call
    /// takes are spent unused (a cancelled request costs the quota at most its lease).
    /// Dropping it while it waits for a reserved cell drops the request unsent, and
    /// the cell goes unused: nobody behind it waits longer. Dropping it after
    /// admission cancels the inner request; the cell stays spent.
    pub struct KeyedFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Call { #[pin] fut: S::Future },
        Asking { ask: Ask, svc: Option<S>, req: Option<Req> },
        Sleeping { sleep: Pin<Box<Sleep>>, svc: Option<S>, req: Option<Req> },
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> KeyedFuture<S, Req> {
    pub(crate) fn call(fut: S::Future) -> Self {
        KeyedFuture {
            state: State::Call { fut },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        KeyedFuture {
            state: State::Failed { error: Some(error) },
        }
    }

    pub(crate) fn sleeping(at: Instant, svc: S, req: Req) -> Self {
        KeyedFuture {
            state: State::Sleeping {
                sleep: Box::pin(tokio::time::sleep_until(at)),
                svc: Some(svc),
                req: Some(req),
            },
        }
    }

    pub(crate) fn asking(ask: Ask, svc: S, req: Req) -> Self {
        KeyedFuture {
            state: State::Asking {
                ask,
                svc: Some(svc),
                req: Some(req),
            },
        }
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
                StateProj::Call { fut } => {
                    let out = ready!(fut.poll(cx));
                    state.set(State::Failed { error: None });
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(after_completion(error)));
                }
                StateProj::Asking { ask, svc, req } => match ready!(ask.as_mut().poll(cx)) {
                    Decision::Admit => {
                        let (mut svc, req) = (svc.take(), req.take());
                        match (svc.as_mut(), req) {
                            (Some(svc), Some(req)) => State::Call { fut: svc.call(req) },
                            _ => State::Failed { error: None },
                        }
                    }
                    Decision::AdmitAt(at) => State::Sleeping {
                        sleep: Box::pin(tokio::time::sleep_until(at)),
                        svc: svc.take(),
                        req: req.take(),
                    },
                    Decision::Refuse(e) => State::Failed { error: Some(e) },
                },
                StateProj::Sleeping { sleep, svc, req } => {
                    ready!(sleep.as_mut().poll(cx));
                    let (mut svc, req) = (svc.take(), req.take());
                    match (svc.as_mut(), req) {
                        (Some(svc), Some(req)) => State::Call { fut: svc.call(req) },
                        _ => State::Failed { error: None },
                    }
                }
            };
            state.set(next);
        }
    }
}
