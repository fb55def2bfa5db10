//! marina's limits and sticky sessions for a fleet of instances, on Redis.
//!
//! A service that uses marina runs as many instances, and every limit of
//! marina-limit is per instance: a user allowed 100 requests a second gets 100 × N
//! across N replicas, "at most 4 in flight per user" becomes 4 × N, and a sticky
//! session lives in one instance's memory. This crate keeps that state in the Redis
//! the fleet already runs, behind the same vocabulary:
//!
//! | here | fleet-wide version of | state in Redis | Redis calls |
//! |---|---|---|---|
//! | [`RedisRateLimitLayer`] | marina-limit's `RateLimitLayer` (same [`Rate`](marina_limit::Rate), [`RateLimited`](marina_limit::RateLimited), [`OnLimit`](marina_limit::OnLimit), [`WithoutKey`](marina_limit::WithoutKey)) | one GCRA state per quota | one per admission, one per `n` with a [`Lease`]; refusals answered locally |
//! | [`RedisConcurrencyLayer`] | marina-limit's `ConcurrencyPerKeyLayer` (same [`ConnectionLimit`](marina_limit::ConnectionLimit)) | a sorted set of leased permits per key | two per request, plus a renewal pipeline every third of the lease |
//! | [`RedisSessionStore`] + [`SharedSessionLayer`] | marina-affinity's sticky table ([`SessionStore`](marina_affinity::SessionStore)) | one string per session, TTL = idle timeout | one per session per cache TTL, one per pin |
//!
//! All of them share one [`RedisFleet`]: the `redis` crate's
//! [`ConnectionManager`](redis::aio::ConnectionManager) (one multiplexed connection
//! that reconnects by itself), a per-call timeout, and the down/up state that decides
//! when the [`Fallback`] applies.
//!
//! # How it works
//!
//! - **One script per step.** Each decision is one Lua script run with `EVALSHA`
//!   (loaded when the fleet opens, loaded again when Redis answers `NOSCRIPT`), so it
//!   is atomic and costs one round trip. The scripts take the time from Redis (`TIME`):
//!   the instances' clocks never matter.
//! - **Bounded memory.** Every key marina writes has a TTL: a quota's until its state
//!   is in the past, a semaphore's one lease past its last use, a session's its idle
//!   timeout. Keys are `{prefix}:{kind}:{name}:…` ([`FleetConfig::key_prefix`], each
//!   layer's `name`), so one Redis serves several fleets apart.
//! - **Fewer round trips than the anchors.** go-redis/redis_rate, redis-cell's
//!   `CL.THROTTLE` and Envoy's global rate limit pay a round trip per check. Here a
//!   refusal tells the instance when Redis's next cell frees, and the instance
//!   refuses locally until then; a contended key's requests share one call; and a
//!   [`Lease`] takes several free cells at once, sized to keep the fleet within ±5% of
//!   its quota over any 1 s window. See [`Lease`] for the arithmetic, and
//!   `docs/BENCHMARKS.md` ("Fleet limits on Redis") for the measurements.
//! - **Redis down or slow.** Every call has the fleet's
//!   [`call_timeout`](FleetConfig::call_timeout) (default 5 ms), so a request never
//!   waits longer on Redis; after [`down_after`](FleetConfig::down_after) failed calls
//!   in a row Redis is marked down and requests go straight to the [`Fallback`] (fail
//!   open, fail closed, or this instance's share of the limit) until a probe finds it
//!   back. Counted in [`FleetStats`] and each layer's stats, logged with `tracing`.
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina-redis = "0.1"
//! ```
//!
//! # Cargo features
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `sessions` | yes | [`RedisSessionStore`] and [`SharedSessionLayer`] (depends on marina-affinity) |
//!
//! The `redis` crate is used with `tokio-comp`, `connection-manager` and `script`
//! only; enable its TLS features in your own `Cargo.toml` for `rediss://` URLs.
//!
//! # Examples
//!
//! A client instance whose per-user rate and concurrency limits hold for the whole
//! fleet, with sessions any instance routes alike:
//!
//! ```no_run
//! use std::time::Duration;
//! use marina_balance::{Balance, RoundRobin};
//! use marina_core::HeaderKey;
//! use marina_limit::Rate;
//! use marina_redis::{
//!     Fallback, FleetConfig, Lease, RedisConcurrencyLayer, RedisFleet, RedisRateLimitLayer,
//!     RedisSessionStore, SessionConfig, SharedSessionLayer,
//! };
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), marina_core::BoxError> {
//! let fleet = RedisFleet::with_config(
//!     FleetConfig::new("redis://10.0.0.5:6379")
//!         .key_prefix("shop")
//!         // 4 replicas: each enforces a quarter of the limits while Redis is away.
//!         .fallback(Fallback::Local { expected_instances: 4 }),
//! )?;
//! let user = HeaderKey::new("x-user");
//! let backends = (0..3).map(|n| {
//!     service_fn(move |_req: http::Request<()>| async move {
//!         Ok::<_, std::io::Error>(http::Response::new(n))
//!     })
//! });
//! let balance = Balance::from_services(backends, RoundRobin::new())
//!     .route_hints_from_extensions()
//!     .shared();
//! let mut svc = ServiceBuilder::new()
//!     .layer(
//!         RedisRateLimitLayer::keyed(&fleet, "per-user", user.clone(), Rate::per_second(100))
//!             .lease(Lease::Auto { expected_instances: 4 }),
//!     )
//!     .layer(RedisConcurrencyLayer::new(&fleet, "per-user", user, 5).wait(Duration::from_millis(50)))
//!     .layer(SharedSessionLayer::new(
//!         HeaderKey::new("x-session"),
//!         RedisSessionStore::new(&fleet, "web", SessionConfig::default()),
//!     ))
//!     .service(balance);
//!
//! let req = http::Request::builder()
//!     .header("x-user", "alice")
//!     .header("x-session", "s-42")
//!     .body(())?;
//! let resp = svc.ready().await?.call(req).await?;
//! println!("served by backend {}; fleet: {:?}", resp.body(), fleet.stats());
//! # Ok(()) }
//! ```
//!
//! With marina's whole stack, no wiring is needed: `StackBuilder::redis` (marina's
//! `redis` feature, or `[redis]` in a `StackConfig`) puts these layers in place of the
//! stack's local rate limits, per-key concurrency limits and sticky table.
//! `examples/fleet.rs` runs three such stacks in one process sharing a quota and prints
//! each one's admitted rate and the fleet's.
//!
//! # Cancel safety
//!
//! Every future here can be dropped at any point (a caller's timeout, a `select!`) and
//! leaves nothing behind that outlives a lease:
//!
//! - **Rate limits**: dropped while asking Redis, the request is dropped unsent; the
//!   cells that call takes are spent unused (a cancelled request costs the quota at
//!   most its [`Lease`]). Dropped while waiting for a reserved cell, the cell goes
//!   unused and nobody behind it waits longer. After admission, dropping it cancels
//!   the inner request; the cell stays spent.
//! - **Per-key concurrency**: dropped while taking the permit, the request is dropped
//!   unsent and a permit Redis granted meanwhile is released in the background; after
//!   admission, dropping it cancels the inner request and releases the permit. A
//!   release that fails (Redis down) is made good by the lease: the permit comes back
//!   when it ends.
//! - **Sessions**: dropped while the store asks Redis, the request is dropped unsent;
//!   later, it cancels the inner request, and a session it would have pinned is not
//!   pinned.
//! - [`RedisFleet`]'s calls: dropping one drops the wait for the answer (the command
//!   may still run in Redis).
//!
//! //! # Tests
//!
//! The crate's tests run against a real Redis at `MARINA_REDIS_URL` (default
//! `redis://127.0.0.1:6379`), each under a key prefix of its own. Without one they
//! print why and skip, except in CI (`CI` set), where they fail.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod concurrency;
mod config;
mod error;
mod fleet;
mod rate;
mod scripts;
#[cfg(feature = "sessions")]
mod session;

pub use concurrency::{
    ConcurrencyFuture, RedisConcurrency, RedisConcurrencyHandle, RedisConcurrencyLayer,
    RedisConcurrencyStats,
};
pub use config::{Fallback, FleetConfig, InvalidConfig};
pub use error::{Outage, RedisUnavailable};
pub use fleet::{FleetStats, RedisFleet};
pub use rate::{
    KeyedFuture, LEASE_MAX_AGE, Lease, RedisRateHandle, RedisRateLimit, RedisRateLimitLayer,
    RedisRateStats, ResponseFuture,
};
#[cfg(feature = "sessions")]
#[cfg_attr(docsrs, doc(cfg(feature = "sessions")))]
pub use session::{
    RedisSessionStore, SessionConfig, SessionFuture, SessionStoreStats, SharedSession,
    SharedSessionLayer, SharedSessionStats,
};

#[cfg(test)]
mod tests {
    use marina_core::BoxError;
    use marina_limit::{Global, Keyed};
    use tower::util::BoxCloneSyncService;

    type Inner = BoxCloneSyncService<u8, u8, BoxError>;
    type Extract = fn(&u8) -> Option<String>;

    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}

    /// The services fit where marina's stack puts them (`BoxCloneSyncService`), and
    /// their futures are `Send`.
    #[test]
    fn services_are_send_sync_and_clone_and_futures_send() {
        send_sync_clone::<crate::RedisRateLimit<Inner, Global>>();
        send_sync_clone::<crate::RedisRateLimit<Inner, Keyed<Extract>>>();
        send_sync_clone::<crate::RedisConcurrency<Inner, Extract>>();
        send_sync_clone::<crate::RedisRateLimitLayer<Keyed<Extract>>>();
        send_sync_clone::<crate::RedisConcurrencyLayer<Extract>>();
        send_sync_clone::<crate::RedisFleet>();
        send::<crate::ResponseFuture<<Inner as tower::Service<u8>>::Future>>();
        send::<crate::KeyedFuture<Inner, u8>>();
        send::<crate::ConcurrencyFuture<Inner, u8>>();
        #[cfg(feature = "sessions")]
        {
            send_sync_clone::<crate::RedisSessionStore>();
            send_sync_clone::<crate::SharedSessionLayer<Extract>>();
            send_sync_clone::<crate::SharedSession<Inner, Extract>>();
        }
    }
}
