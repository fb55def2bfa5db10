//! The shutdown guard at the top of the stack: counts requests in flight, refuses new
//! ones once shutting down.

use super::*;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::metrics::Outcome;

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
    /// Requests that ended with an error returned to their caller (refusals not
    /// counted): [`StackStats::client_errors`].
    pub(super) failed: AtomicU64,
    /// The stack's own metric handles, registered when the stack is built.
    #[cfg(feature = "metrics")]
    pub(super) metrics: crate::metrics::StackMetrics,
}

/// Counts requests in flight and refuses new ones once shutting down (and bad ones
/// always). The stack's edge: each request's `marina.request` span, its events and the
/// stack's metrics start and end here.
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

impl InFlight {
    fn start(state: &Arc<ShutdownState>) -> Self {
        state.in_flight.fetch_add(1, AcqRel);
        #[cfg(feature = "metrics")]
        state.metrics.in_flight.increment(1.0);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        self.0.metrics.in_flight.decrement(1.0);
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
        let guard = Some(InFlight::start(&self.state));
        // Disabled unless a subscriber wants it: then nothing is allocated and no
        // clock read for it (the metrics read one of their own).
        let span = tracing::debug_span!(
            "marina.request",
            endpoint = tracing::field::Empty,
            attempt = tracing::field::Empty,
            repinned = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let trace = (!span.is_disabled()).then(|| {
            Box::new(Trace {
                span,
                started: tokio::time::Instant::now(),
            })
        });
        let refused = if self.state.closed.load(Acquire) {
            Some(ShuttingDown.into())
        } else if let Some(validate) = &self.validate {
            validate(&req.body).err()
        } else {
            None
        };
        if let Some(error) = refused {
            return GuardedFuture {
                state: Edge::Refused { error: Some(error) },
                guard,
                trace,
                started: started_now(),
            };
        }
        // Entered through a handle of its own (a clone only when enabled), so the
        // future is built in place below (it holds the whole stack's future: a copy
        // of it costs more than the rest of this function).
        let entered = trace.as_ref().map(|t| t.span.clone());
        let _enter = entered.as_ref().map(tracing::Span::enter);
        tracing::debug!("request started");
        GuardedFuture {
            state: Edge::Calling {
                call: self.inner.call(req),
            },
            guard,
            trace,
            started: started_now(),
        }
    }
}

/// When a request entered the stack, for `marina_request_duration_seconds` (nothing
/// without the `metrics` feature).
#[cfg(feature = "metrics")]
type Started = tokio::time::Instant;
#[cfg(not(feature = "metrics"))]
type Started = ();

#[inline]
fn started_now() -> Started {
    #[cfg(feature = "metrics")]
    {
        tokio::time::Instant::now()
    }
}

/// A request's span and start, made only when a subscriber wants the span (boxed: the
/// future of every request stays small when none does).
pub(super) struct Trace {
    span: tracing::Span,
    started: tokio::time::Instant,
}

pin_project_lite::pin_project! {
    /// A request through the stack's edge: counted in flight until it completes or is
    /// dropped, inside its `marina.request` span when there is one (it never waits
    /// itself: the edge only counts, refuses and records).
    pub(super) struct GuardedFuture<F> {
        #[pin]
        state: Edge<F>,
        guard: Option<InFlight>,
        trace: Option<Box<Trace>>,
        started: Started,
    }
}

pin_project_lite::pin_project! {
    #[project = EdgeProj]
    enum Edge<F> {
        // Sent on through the stack.
        Calling { #[pin] call: F },
        // Refused at the edge (shutting down, invalid): returned at the first poll.
        Refused { error: Option<BoxError> },
        // Over: the inner future dropped.
        Done,
    }
}

impl<F, R> Future for GuardedFuture<F>
where
    F: Future<Output = Result<R, BoxError>>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let (out, outcome) = match this.state.as_mut().project() {
            EdgeProj::Refused { error } => match error.take() {
                Some(error) => (Err(error), Outcome::Rejected),
                None => return Poll::Ready(Err(marina_core::PolledAfterCompletion.into())),
            },
            EdgeProj::Done => {
                return Poll::Ready(Err(marina_core::PolledAfterCompletion.into()));
            }
            EdgeProj::Calling { call } => {
                let _enter = this.trace.as_ref().map(|t| t.span.enter());
                match std::task::ready!(call.poll(cx)) {
                    Ok(r) => (Ok(r), Outcome::Ok),
                    Err(e) => {
                        let outcome = crate::metrics::classify(&*e);
                        (Err(e), outcome)
                    }
                }
            }
        };
        this.state.set(Edge::Done);
        let guard = this.guard.take();
        if matches!(outcome, Outcome::Error | Outcome::Timeout)
            && let Some(g) = &guard
        {
            g.0.failed.fetch_add(1, Relaxed);
        }
        #[cfg(feature = "metrics")]
        if let Some(g) = &guard {
            g.0.metrics
                .ended(outcome, this.started.elapsed().as_secs_f64());
        }
        if let Some(t) = this.trace.as_ref() {
            let _enter = t.span.enter();
            t.span.record("outcome", outcome.as_str());
            let latency_ms = t.started.elapsed().as_secs_f64() * 1e3;
            match &out {
                Ok(_) => {
                    tracing::debug!(outcome = outcome.as_str(), latency_ms, "request finished")
                }
                Err(error) => tracing::debug!(
                    outcome = outcome.as_str(),
                    latency_ms,
                    error = %error,
                    "request finished"
                ),
            }
        }
        drop(guard);
        Poll::Ready(out)
    }
}
