//! `Weighted<S>`: an endpoint service carrying its weight.

use std::task::{Context, Poll};

use tower::load::Load;
use tower_service::Service;

/// An endpoint service with a weight, for weighted pickers when discovery keys carry
/// none: build the balancer with `.service_weights(Weighted::weight)`. Calls, readiness
/// and load pass through to the inner service.
///
/// # Sharing
///
/// `Clone` when the inner service is: a clone has the same weight and a clone of the
/// inner service, so what clones share is what the inner service's clones share. It
/// is an endpoint, owned by the balancer it is given to: share the balancer (see
/// [`Balance::shared`](crate::Balance::shared)), not the endpoint.
///
/// ```
/// use marina_balance::{Balance, Weighted, WeightedRoundRobin};
/// use tower::discover::ServiceList;
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let endpoints = [(0, 1), (1, 2)].map(|(n, w)| {
///     Weighted::new(service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) }), w)
/// });
/// let mut lb = Balance::new(ServiceList::new(endpoints), WeightedRoundRobin::new())
///     .service_weights(Weighted::weight);
/// let mut seen = [0; 2];
/// for _ in 0..3 {
///     seen[lb.ready().await?.call(()).await?] += 1;
/// }
/// assert_eq!(seen, [1, 2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Weighted<S> {
    inner: S,
    weight: u32,
}

impl<S> Weighted<S> {
    /// Wraps `inner` with `weight` (at least 1).
    pub fn new(inner: S, weight: u32) -> Self {
        Weighted {
            inner,
            weight: weight.max(1),
        }
    }

    /// The weight.
    pub fn weight(&self) -> u32 {
        self.weight
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

impl<S: Service<Req>, Req> Service<Req> for Weighted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}

impl<S: Load> Load for Weighted<S> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}
