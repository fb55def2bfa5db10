//! What the per-key limiters do with a request that has no key.

use std::fmt;

/// What a per-key limiter — a keyed [`RateLimitLayer`](crate::RateLimitLayer) or a
/// [`ConcurrencyPerKeyLayer`](crate::ConcurrencyPerKeyLayer) — does with a request
/// whose key extractor finds no key: no such header or cookie, no client address, a
/// key longer than [`MAX_KEY_LEN`](marina_core::MAX_KEY_LEN), or a closure that
/// returns `None`. Set with the layers' `without_key`.
///
/// # Why `Refuse` is the default
///
/// A per-key limit is there to protect: it should not have a silent way around it,
/// and the choice of what to do about requests without a key belongs in the code
/// that sets the limit, where a reader sees it.
///
/// - `Unlimited` (what Envoy's local rate limit and nginx's `limit_req` do with a
///   missing key) lets any client escape its limit by leaving the header out, or by
///   sending one longer than the extractors accept; and a misconfigured extractor (a
///   client-IP limit where no address reaches the request) silently turns the limit
///   off for everyone.
/// - `Shared` keeps anonymous traffic flowing but lets one keyless client use up the
///   quota of all the others, and the same misconfiguration squeezes every request
///   into one key's quota, with nothing to say why.
/// - `Refuse` fails those requests at once with [`MissingKey`] (as tower-governor
///   does when it cannot extract a key): a misconfiguration shows on the first
///   request, and where requests without a key are expected (anonymous users next to
///   signed-in ones), one line says which of the other two they get.
///
/// ```
/// use marina_limit::{MissingKey, Rate, RateLimitLayer, WithoutKey};
/// use tower::{Layer, Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let user = |req: &Option<&'static str>| req.map(String::from);
/// let backend = service_fn(|_: Option<&'static str>| async { Ok::<_, std::io::Error>("ok") });
///
/// // By default a request without a user is refused.
/// let mut svc = RateLimitLayer::keyed(user, Rate::per_second(10)).layer(backend);
/// let err = svc.ready().await.unwrap().call(None).await.unwrap_err();
/// assert!(err.downcast_ref::<MissingKey>().is_some());
/// assert_eq!(svc.ready().await.unwrap().call(Some("alice")).await.unwrap(), "ok");
///
/// // Anonymous users allowed, all of them together limited as one user.
/// let mut svc = RateLimitLayer::keyed(user, Rate::per_second(10))
///     .without_key(WithoutKey::Shared)
///     .layer(backend);
/// assert_eq!(svc.ready().await.unwrap().call(None).await.unwrap(), "ok");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WithoutKey {
    /// Fail the request at once with [`MissingKey`] (the default). It counts as
    /// refused in the layer's stats, and in their `missing_key` count.
    #[default]
    Refuse,
    /// Let the request through untouched: no limit applies to it. It counts as
    /// admitted.
    Unlimited,
    /// Limit all requests without a key together, as if they had one key of their
    /// own, apart from every key the extractor returns (the empty string included):
    /// one quota at the layer's rate, or `limit` requests in flight together. That key
    /// is never evicted, swept, or counted against the layer's key bound; over its
    /// limit the request fails (or waits) as any key's would.
    Shared,
}

/// A per-key limiter refused a request that has no key ([`WithoutKey::Refuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MissingKey;

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request has no key for the per-key limit: refused")
    }
}

impl std::error::Error for MissingKey {}
