use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::BoxError;

/// A boxed, `Send` future, as probes return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An asynchronous check of a `T`: a pooled connection, an endpoint's address, a client.
///
/// `probe` returns the measured response time when the check passes, or the error that
/// made it fail. Callers put their own timeout around it; a probe does not need one.
///
/// Implement it for a type of your own, or build one from a closure with [`probe_fn`].
///
/// # Cancel safety
///
/// A probe future may be dropped at any await point (when the caller's timeout fires).
/// The pool then treats the probed connection as broken and closes it, so a probe never
/// needs to leave the connection in a clean state when it is cancelled.
pub trait Probe<T: ?Sized>: Send + Sync + 'static {
    /// Checks `target`, returning how long the check took.
    fn probe<'a>(&'a self, target: &'a mut T) -> BoxFuture<'a, Result<Duration, BoxError>>;
}

/// A [`Probe`] made from a closure; see [`probe_fn`].
pub struct ProbeFn<F> {
    f: F,
}

/// Builds a [`Probe`] from a closure that checks a `&mut T`.
///
/// The closure returns a boxed future (`Box::pin(async move { ... })`) resolving to
/// `Ok(())` when the check passes; the probe measures the time it took with tokio's
/// clock, so paused-time tests see virtual time.
pub fn probe_fn<T, F>(f: F) -> ProbeFn<F>
where
    T: ?Sized,
    F: for<'a> Fn(&'a mut T) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync + 'static,
{
    ProbeFn { f }
}

impl<T, F> Probe<T> for ProbeFn<F>
where
    T: ?Sized,
    F: for<'a> Fn(&'a mut T) -> BoxFuture<'a, Result<(), BoxError>> + Send + Sync + 'static,
{
    fn probe<'a>(&'a self, target: &'a mut T) -> BoxFuture<'a, Result<Duration, BoxError>> {
        let check = (self.f)(target);
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            check.await?;
            Ok(started.elapsed())
        })
    }
}

impl<F> fmt::Debug for ProbeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeFn").finish_non_exhaustive()
    }
}
