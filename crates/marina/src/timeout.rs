//! A request timeout per attempt, inside the health layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use marina_core::BoxError;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

/// A request took longer than its timeout: the endpoint accepted it (or was still
/// connecting, or checking out a connection) and gave no reply in time.
///
/// It **may have been sent**: failover retries it on another backend only when the
/// request is marked idempotent. Inside a [`Stack`](crate::Stack) each attempt has its
/// own timeout, and the timeout counts as a failure for the backend's health checks (a
/// backend that accepts and never answers is ejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTimeout {
    /// The timeout that ran out.
    pub after: Duration,
}

impl fmt::Display for RequestTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no reply within {:?} (the request may have been sent)",
            self.after
        )
    }
}

impl std::error::Error for RequestTimeout {}

/// Bounds each call of the service it wraps to `after`: past it, the call's future is
/// dropped (cancelling the request) and the call fails with [`RequestTimeout`].
///
/// ```
/// use std::time::Duration;
/// use marina::{RequestTimeout, RequestTimeoutLayer};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let hung = service_fn(|_: ()| std::future::pending::<Result<(), std::io::Error>>());
/// let svc = RequestTimeoutLayer::new(Duration::from_secs(2)).layer(hung);
/// let err = svc.oneshot(()).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<RequestTimeout>().unwrap().after, Duration::from_secs(2));
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer {
    after: Duration,
}

impl RequestTimeoutLayer {
    /// Each call gets at most `after`.
    pub fn new(after: Duration) -> Self {
        RequestTimeoutLayer { after }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeoutService::new(inner, Some(self.after))
    }
}

/// The service of [`RequestTimeoutLayer`]. `Clone` when the inner service is; clones
/// share nothing but the inner service's own sharing.
#[derive(Debug, Clone)]
pub struct RequestTimeoutService<S> {
    inner: S,
    after: Option<Duration>,
    /// `marina_request_timeouts_total{endpoint}`, once labelled.
    #[cfg(feature = "metrics")]
    timeouts: Option<metrics::Counter>,
}

impl<S> RequestTimeoutService<S> {
    /// `inner` with each call bounded to `after`, or not bounded (`None`).
    pub fn new(inner: S, after: Option<Duration>) -> Self {
        RequestTimeoutService {
            inner,
            after,
            #[cfg(feature = "metrics")]
            timeouts: None,
        }
    }

    /// Names the endpoint this service calls, for the `endpoint` label of
    /// `marina_request_timeouts_total` (the `metrics` feature; without a name, its
    /// timeouts are not counted there). Keep it bounded: the endpoint's address, as a
    /// [`Stack`](crate::Stack) labels each backend, never a value per request. Without
    /// the feature it does nothing.
    ///
    /// The counter is registered here: install the metrics recorder before.
    ///
    /// ```
    /// use std::time::Duration;
    /// use marina::RequestTimeoutService;
    /// use tower::service_fn;
    ///
    /// let svc = RequestTimeoutService::new(
    ///     service_fn(|_: ()| async { Ok::<_, std::io::Error>(()) }),
    ///     Some(Duration::from_secs(2)),
    /// )
    /// .endpoint("10.0.0.7:6379");
    /// # drop(svc);
    /// ```
    pub fn endpoint(self, endpoint: impl Into<String>) -> Self {
        #[cfg(feature = "metrics")]
        {
            let mut this = self;
            this.timeouts = Some(crate::metrics::request_timeouts(endpoint.into()));
            this
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = endpoint;
            self
        }
    }
}

impl<S, Req> Service<Req> for RequestTimeoutService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RequestTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        RequestTimeoutFuture {
            inner: self.inner.call(req),
            sleep: self.after.map(tokio::time::sleep),
            after: self.after.unwrap_or_default(),
            #[cfg(feature = "metrics")]
            timeouts: self.after.and(self.timeouts.clone()),
            #[cfg(not(feature = "metrics"))]
            timeouts: (),
        }
    }
}

/// The counter a [`RequestTimeoutFuture`] increments when it times out (nothing without
/// the `metrics` feature).
#[cfg(feature = "metrics")]
type Timeouts = Option<metrics::Counter>;
#[cfg(not(feature = "metrics"))]
type Timeouts = ();

pin_project! {
    /// The future of [`RequestTimeoutService`].
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops the inner call's future: the request is cancelled as the
    /// inner service's own future says.
    pub struct RequestTimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        after: Duration,
        timeouts: Timeouts,
    }
}

impl<F: fmt::Debug> fmt::Debug for RequestTimeoutFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTimeoutFuture")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for RequestTimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out.map_err(Into::into));
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => {
                ready!(sleep.poll(cx));
                #[cfg(feature = "metrics")]
                if let Some(c) = this.timeouts.as_ref() {
                    c.increment(1);
                }
                Poll::Ready(Err(RequestTimeout { after: *this.after }.into()))
            }
            None => Poll::Pending,
        }
    }
}
