//! `ServiceBuilderExt`: marina's layers as `ServiceBuilder` methods.

use marina_affinity::{AffinityLayer, TableConfig};
use marina_health::{HealthConfig, HealthLayer};
use marina_limit::{ConcurrencyPerKeyLayer, Global, Keyed, Rate, RateLimitLayer};
use tower::ServiceBuilder;
use tower::layer::util::Stack;

/// marina's layers as [`ServiceBuilder`] methods, for users who assemble a stack
/// themselves.
///
/// ```
/// use marina::ServiceBuilderExt;
/// use marina::limit::Rate;
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina::core::BoxError> {
/// let mut svc = ServiceBuilder::new()
///     .marina_rate_limit(Rate::per_second(100))
///     .marina_concurrency_per_key(|req: &(String, u32)| Some(req.0.clone()), 5)
///     .service(service_fn(|req: (String, u32)| async move { Ok::<_, std::io::Error>(req.1) }));
/// assert_eq!(svc.ready().await?.call(("alice".into(), 7)).await?, 7);
/// # Ok(()) }
/// ```
pub trait ServiceBuilderExt<L>: Sized {
    /// A global rate limit ([`RateLimitLayer::global`]).
    fn marina_rate_limit(self, rate: Rate) -> ServiceBuilder<Stack<RateLimitLayer<Global>, L>>;

    /// A rate limit per key ([`RateLimitLayer::keyed`]).
    fn marina_rate_limit_per_key<X>(
        self,
        extractor: X,
        rate: Rate,
    ) -> ServiceBuilder<Stack<RateLimitLayer<Keyed<X>>, L>>;

    /// At most `limit` requests in flight per key ([`ConcurrencyPerKeyLayer`]).
    ///
    /// # Panics
    ///
    /// If `limit` is 0 or above `ConcurrencyPerKeyLayer::MAX_LIMIT` (use
    /// `ConcurrencyPerKeyLayer::try_new` and `.layer(..)` for a limit read from
    /// settings).
    fn marina_concurrency_per_key<X>(
        self,
        extractor: X,
        limit: usize,
    ) -> ServiceBuilder<Stack<ConcurrencyPerKeyLayer<X>, L>>;

    /// Sticky sessions keyed by `extractor` ([`AffinityLayer::sticky`]).
    fn marina_sticky_sessions<X>(
        self,
        extractor: X,
        table: TableConfig,
    ) -> ServiceBuilder<Stack<AffinityLayer<X>, L>>;

    /// Passive health checks ([`HealthLayer`]) around the service: for one endpoint.
    fn marina_health(self, config: HealthConfig) -> ServiceBuilder<Stack<HealthLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn marina_rate_limit(self, rate: Rate) -> ServiceBuilder<Stack<RateLimitLayer<Global>, L>> {
        self.layer(RateLimitLayer::global(rate))
    }

    fn marina_rate_limit_per_key<X>(
        self,
        extractor: X,
        rate: Rate,
    ) -> ServiceBuilder<Stack<RateLimitLayer<Keyed<X>>, L>> {
        self.layer(RateLimitLayer::keyed(extractor, rate))
    }

    fn marina_concurrency_per_key<X>(
        self,
        extractor: X,
        limit: usize,
    ) -> ServiceBuilder<Stack<ConcurrencyPerKeyLayer<X>, L>> {
        self.layer(ConcurrencyPerKeyLayer::new(extractor, limit))
    }

    fn marina_sticky_sessions<X>(
        self,
        extractor: X,
        table: TableConfig,
    ) -> ServiceBuilder<Stack<AffinityLayer<X>, L>> {
        self.layer(AffinityLayer::sticky(extractor, table))
    }

    fn marina_health(self, config: HealthConfig) -> ServiceBuilder<Stack<HealthLayer, L>> {
        self.layer(HealthLayer::new(config))
    }
}
