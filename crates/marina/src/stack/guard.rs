//! The shutdown guard at the top of the stack: counts requests in flight, refuses new
//! ones once shutting down.

use super::*;
use marina_core::WaitThenCall;

/// The stack refuses new requests: it is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuttingDown;

impl fmt::Display for ShuttingDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the stack is shutting down")
    }
}

impl std::error::Error for ShuttingDown {}

#[derive(Default)]
pub(super) struct ShutdownState {
    pub(super) closed: AtomicBool,
    pub(super) in_flight: AtomicUsize,
    pub(super) idle: Notify,
}

/// Counts requests in flight and refuses new ones once shutting down (and bad ones
/// always).
pub(super) struct Guarded<S, T> {
    pub(super) inner: S,
    pub(super) state: Arc<ShutdownState>,
    pub(super) validate: Option<ValidateFn<T>>,
}

impl<S: Clone, T> Clone for Guarded<S, T> {
    fn clone(&self) -> Self {
        Guarded {
            inner: self.inner.clone(),
            state: self.state.clone(),
            validate: self.validate.clone(),
        }
    }
}

pub(super) struct InFlight(pub(super) Arc<ShutdownState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl<S, T> Service<Request<T>> for Guarded<S, T>
where
    S: Service<Request<T>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = GuardedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.state.closed.load(Acquire) {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<T>) -> Self::Future {
        // Counted before the check: a shutdown starting in between sees this request.
        self.state.in_flight.fetch_add(1, AcqRel);
        let guard = InFlight(self.state.clone());
        let failed = GuardedFuture::failed;
        if self.state.closed.load(Acquire) {
            return failed(ShuttingDown.into());
        }
        if let Some(validate) = &self.validate
            && let Err(e) = validate(&req.body)
        {
            return failed(e);
        }
        GuardedFuture::calling(self.inner.call(req), guard)
    }
}

/// A request through the shutdown guard: counted in flight until it completes or is
/// dropped (it never waits: the guard only counts and refuses).
pub(super) type GuardedFuture<F> =
    WaitThenCall<std::future::Pending<Result<(F, InFlight), BoxError>>, F, InFlight>;
