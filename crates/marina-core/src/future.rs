//! The response future shape every waiting layer shares: wait for admission, then
//! call, holding what admission gave until the response completes.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use crate::BoxError;

/// The error of a marina response future polled again after it completed.
///
/// Futures must not be polled after they return [`Poll::Ready`]; marina's answer with
/// this error instead of panicking, so a misbehaving executor or combinator gets a
/// typed failure it can match.
///
/// ```
/// use marina_core::{BoxError, PolledAfterCompletion};
///
/// let e: BoxError = PolledAfterCompletion.into();
/// assert!(e.downcast_ref::<PolledAfterCompletion>().is_some());
/// assert_eq!(e.to_string(), "response future polled after completion");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolledAfterCompletion;

impl fmt::Display for PolledAfterCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("response future polled after completion")
    }
}

impl Error for PolledAfterCompletion {}

pin_project! {
    /// A response future in one of three states: **waiting** for admission (a
    /// rate-limit cell, a concurrency slot, a shared service's readiness), **calling**
    /// the inner service while holding what admission gave (a permit, a slot, an
    /// in-flight guard), or **failed** before anything was sent.
    ///
    /// The wait `W` ends by making the call itself: it resolves to the inner response
    /// future `F` and the value `H` to hold until that future completes (`H` is
    /// dropped as soon as the response is ready, before it is returned). An error from
    /// the wait ends the future with that error, the request unsent.
    ///
    /// Polled again after it returned a response or an error, it returns
    /// [`PolledAfterCompletion`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use marina_core::{BoxError, WaitThenCall};
    /// use std::future::{Ready, ready};
    ///
    /// // Admission that is granted at once and hands over a "permit" (here a String).
    /// type Fut = WaitThenCall<Ready<Result<(Ready<Result<u32, BoxError>>, String), BoxError>>,
    ///                         Ready<Result<u32, BoxError>>, String>;
    /// let fut: Fut = WaitThenCall::waiting(ready(Ok((ready(Ok(7)), "permit".to_string()))));
    /// assert_eq!(fut.await.unwrap(), 7);
    ///
    /// let failed: Fut = WaitThenCall::failed("refused".into());
    /// assert_eq!(failed.await.unwrap_err().to_string(), "refused");
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping it while it waits drops the wait (and with it the request, unsent);
    /// dropping it while it calls drops the inner future and then what it held.
    pub struct WaitThenCall<W, F, H> {
        #[pin]
        state: State<W, F, H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<W, F, H> {
        // Waiting for admission; the wait makes the call when admitted.
        Waiting { #[pin] wait: W },
        // Sent: the inner response future, and what it holds until it completes.
        Calling { #[pin] call: F, held: Option<H> },
        // Failed before sending (or done: the error was already taken).
        Failed { error: Option<BoxError> },
    }
}

impl<W, F, H> WaitThenCall<W, F, H> {
    /// A future that waits on `wait` first.
    pub fn waiting(wait: W) -> Self {
        WaitThenCall {
            state: State::Waiting { wait },
        }
    }

    /// A future already sent: `call` is the inner response future, `held` is dropped
    /// when it completes.
    pub fn calling(call: F, held: H) -> Self {
        WaitThenCall {
            state: State::Calling {
                call,
                held: Some(held),
            },
        }
    }

    /// A future that fails with `error` when first polled.
    pub fn failed(error: BoxError) -> Self {
        WaitThenCall {
            state: State::Failed { error: Some(error) },
        }
    }

    /// Whether it is still waiting for admission (nothing sent yet).
    pub fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting { .. })
    }
}

impl<W, F, H> fmt::Debug for WaitThenCall<W, F, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Waiting { .. } => "Waiting",
            State::Calling { .. } => "Calling",
            State::Failed { .. } => "Failed",
        };
        f.debug_tuple("WaitThenCall").field(&state).finish()
    }
}

impl<W, F, H, T, E> Future for WaitThenCall<W, F, H>
where
    W: Future<Output = Result<(F, H), BoxError>>,
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Calling { call, held } => {
                    let out = ready!(call.poll(cx));
                    drop(held.take());
                    state.set(State::Failed { error: None });
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(after_completion(error)));
                }
                StateProj::Waiting { wait } => match ready!(wait.poll(cx)) {
                    Ok((call, held)) => State::Calling {
                        call,
                        held: Some(held),
                    },
                    Err(error) => State::Failed { error: Some(error) },
                },
            };
            state.set(next);
        }
    }
}

/// The error to return from a hand-written response future polled after it completed,
/// taking a stored error first if there is one.
///
/// ```
/// use marina_core::{PolledAfterCompletion, after_completion};
///
/// let mut stored = None;
/// assert!(after_completion(&mut stored).is::<PolledAfterCompletion>());
/// ```
pub fn after_completion(stored: &mut Option<BoxError>) -> BoxError {
    stored
        .take()
        .unwrap_or_else(|| PolledAfterCompletion.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{Ready, ready};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::task::Waker;

    struct Held(Arc<AtomicUsize>);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    type Call = Ready<Result<u8, BoxError>>;
    type Fut = WaitThenCall<Ready<Result<(Call, Held), BoxError>>, Call, Held>;

    fn poll(fut: &mut Pin<Box<Fut>>) -> Poll<Result<u8, BoxError>> {
        fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn holds_until_the_response_then_says_polled_after_completion() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut fut: Pin<Box<Fut>> = Box::pin(WaitThenCall::waiting(ready(Ok((
            ready(Ok(3)),
            Held(drops.clone()),
        )))));
        assert_eq!(drops.load(SeqCst), 0);
        assert!(matches!(poll(&mut fut), Poll::Ready(Ok(3))));
        assert_eq!(
            drops.load(SeqCst),
            1,
            "held value dropped with the response"
        );
        match poll(&mut fut) {
            Poll::Ready(Err(e)) => assert!(e.is::<PolledAfterCompletion>()),
            other => panic!("expected PolledAfterCompletion, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_wait_returns_its_error_once() {
        let mut fut: Pin<Box<Fut>> = Box::pin(WaitThenCall::waiting(ready(Err("no".into()))));
        match poll(&mut fut) {
            Poll::Ready(Err(e)) => assert_eq!(e.to_string(), "no"),
            other => panic!("{other:?}"),
        }
        match poll(&mut fut) {
            Poll::Ready(Err(e)) => assert!(e.is::<PolledAfterCompletion>()),
            other => panic!("{other:?}"),
        }
    }
}
