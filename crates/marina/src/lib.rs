//! marina: client-side connection management for tower services.
//!
//! A service that talks to backends over TCP gets, as separate crates that also stack
//! into one `tower::Service`:
//!
//! ```text
//! caller ─► rate limit ─► per-key concurrency ─► affinity ─► balance ─┬─► health ─► pool ─► backend A
//!           (limit)       (limit)                 (affinity)  (balance) ├─► health ─► pool ─► backend B
//!                                                                       └─► …
//! under every pool: TCP through the bandwidth limiter (limit), then the protocol
//! ```
//!
//! [`Stack`] builds all of it as one `Service` that you clone into each task; each crate
//! is also here as a module, to use alone or to assemble yourself (with tower's
//! `ServiceBuilder` and [`ServiceBuilderExt`]).
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`pool`] | [marina-pool](https://docs.rs/marina-pool) | a bounded, cancel-safe connection pool; a tower `MakeConnection` |
//! | [`health`] | [marina-health](https://docs.rs/marina-health) | passive outlier detection and active probes, as a readiness gate |
//! | [`balance`] | [marina-balance](https://docs.rs/marina-balance) | load balancing with pluggable pickers, failover, panic threshold |
//! | [`affinity`] | [marina-affinity](https://docs.rs/marina-affinity) | session affinity: sticky table, signed tokens, consistent hash |
//! | [`limit`] | [marina-limit](https://docs.rs/marina-limit) | rate limits (governor), per-key concurrency, bandwidth |
//! | `redis` | [marina-redis](https://docs.rs/marina-redis) | the limits and sticky sessions for a fleet of instances, on Redis (the `redis` feature) |
//! | [`core`] | [marina-core](https://docs.rs/marina-core) | the shared vocabulary: `RouteHint`, `NotSent`, `KeyExtractor`, … |
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina = "0.1"
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! tower = { version = "0.5", features = ["util"] }
//! ```
//!
//! Only some of the pieces, without the stack builder:
//!
//! ```toml
//! [dependencies]
//! marina = { version = "0.1", default-features = false, features = ["balance", "health"] }
//! ```
//!
//! # Cargo features
//!
//! Default: `full` and `serde`. [`core`] and [`line`](mod@line) (a line-protocol client)
//! need no feature.
//!
//! | feature | enables |
//! |---|---|
//! | `full` | all five crates below, and what needs them all: [`Stack`], [`ServiceBuilderExt`], [`RequestTimeoutLayer`], [`InvalidConfig`] |
//! | `pool` | [`pool`] (marina-pool) |
//! | `health` | [`health`] (marina-health) |
//! | `balance` | [`balance`] (marina-balance) |
//! | `affinity` | [`affinity`] (marina-affinity) |
//! | `limit` | [`limit`] (marina-limit) |
//! | `serde` | [`StackConfig`] and [`Stack::from_config`]: the stack from a TOML file; turns on `full` |
//! | `http` | marina-pool's `http`: `marina::pool::http::HttpClient`, a hyper client service (`Service<http::Request<B>>`) over pooled HTTP/1 and shared HTTP/2 connections, with streaming bodies; turns on `pool` |
//! | `redis` | `marina::redis` (marina-redis) and `StackBuilder::redis`: the stack's rate limits, per-key concurrency and sticky sessions shared by a fleet of instances through Redis (`[redis]` in a `StackConfig`); turns on `limit` and `affinity` |
//! | `tls` | marina-pool's `tls` (`marina::pool::tls`: `TlsConnector`, `TlsConfig`), [`StackBuilder::tls`] and a [`StackConfig`]'s `[tls]` table: the stack's connections over TLS (rustls, *ring*); turns on `pool` |
//! | `tls-native-roots` | `tls`, and `TlsConfig::native_roots()`: the system's trusted roots (what a `[tls]` table without `ca_file` uses) |
//! | `metrics` | metrics through the [`metrics`](https://docs.rs/metrics) facade: the stack's own (see [Metrics](#metrics)) and the `metrics` feature of each crate turned on (pool, health, balance, affinity, limit) |
//! | `pool-hyper` | marina-pool's `hyper`: hyper's `rt::Read`/`rt::Write` and hyper-util's `Connection` for `Pooled`; turns on `pool` |
//! | `pool-postgres` | marina-pool's `postgres`: `marina::pool::postgres`, a connector for tokio-postgres clients; turns on `pool` |
//! | `pool-redis` | marina-pool's `redis`: `marina::pool::redis`, a connector for redis-rs multiplexed connections (the fleet on Redis is `redis`); turns on `pool` |
//! | `health-http` | marina-health's `http`: a classifier that counts HTTP 5xx responses as failures; turns on `health` |
//! | `health-grpc` | marina-health's `grpc`: `GrpcProbe`, the standard gRPC health check; turns on `health` |
//! | `balance-hyper-util` | marina-balance's `hyper-util`: hyper-util's legacy client connect errors count as never sent; turns on `balance` |
//! | `balance-tonic` | marina-balance's `tonic`: tonic's `ConnectError` counts as never sent; turns on `balance` |
//! | `balance-buffer` | marina-balance's `buffer`: tower `Buffer`'s `Closed` and `ServiceError` count as never sent; turns on `balance` |
//!
//! # Metrics
//!
//! With the `metrics` feature, the [`Stack`] records its own metrics at its edge (above
//! the limits), and each crate records its own below (with `metrics` on, marina turns
//! on every crate's feature): the pool's (`marina_pool_*`, labelled `pool` = the
//! backend's address), health's (`marina_health_*`), the balancer's
//! (`marina_balance_*`), sessions' (`marina_affinity_*`) and the limits'
//! (`marina_limit_*`); each crate's page lists them. The stack labels each backend's
//! series with its address (`endpoint` and `pool` labels, e.g. `10.0.0.7:6379`). Every
//! handle is registered once, when the stack is built or a backend added, every label
//! combination up front, so each documented series exists (at 0) from then on.
//!
//! **Install the recorder (a Prometheus exporter, …) before building the stack:**
//! handles taken before a recorder is installed are no-ops, and stay so.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `marina_requests_total` | counter | `outcome` = `ok` \| `error` \| `timeout` \| `rejected` | requests through the stack that ended: a reply; an error; a timeout ([`RequestTimeout`] of the last attempt, the failover deadline, or the wait for a pooled connection); refused before it was sent (shutting down, the request's validation, a rate or concurrency limit). A request whose future was dropped first is not counted |
//! | `marina_request_duration_seconds` | histogram | | time from the call into the stack to the reply or error, limits, failover and hedging included |
//! | `marina_requests_in_flight` | gauge | | requests inside the stack now (called, not yet ended or dropped) |
//! | `marina_request_timeouts_total` | counter | `endpoint` | attempts at the backend that ran past the per-attempt request timeout ([`StackBuilder::request_timeout`]); each one is also an error the balancer counts, and failover may absorb it |
//!
//! # Tracing
//!
//! Each request through a [`Stack`] gets one span, `marina.request` at DEBUG level,
//! made at the stack's edge and entered while the layers below call and poll, with the
//! fields `endpoint` (the backend's address, recorded by the balancer for each
//! attempt), `attempt` (1 for the first, 2 after a failover…), `repinned` (`true` when
//! the affinity layer moved the request's session to another backend) and `outcome`
//! (as the `outcome` label above). Inside it, the DEBUG events `request started` and
//! `request finished` (with `outcome`, `latency_ms` and, on failure, `error`), as
//! tower-http's `TraceLayer` does; nothing is logged per request at INFO or above.
//! State changes are events of their own: an ejection (WARN), a readmission (INFO),
//! panic mode (WARN), a pool exhausted (WARN). Without a subscriber that wants DEBUG,
//! the span is disabled: no allocation and no clock read for it.
//!
//! # Cancel safety
//!
//! Dropping a request's future through the stack (a caller's timeout, a `select!`)
//! cancels it wherever it is and leaves nothing behind: waiting on a limit, it gives
//! up its place (a rate limit's reserved cell, a concurrency slot); waiting for a ready
//! backend or a pooled connection, it leaves the queue; once sent, the client's future
//! is dropped, and the pool closes that client instead of reusing it mid-reply (a
//! protocol of [`StackBuilder::build`] decides with its `check`). The in-flight counts
//! (balancer, health, [`StackHandle::shutdown`]'s wait, `marina_requests_in_flight`) go
//! down. [`StackHandle::shutdown`] itself runs on a task of its own: dropping its
//! future stops the waiting, not the shutdown. Each crate's page says the same of its
//! own futures.
//!
//! The crates' own features (marina-balance's `hyper-util`, `tonic` and `buffer`;
//! marina-health's `http` and `grpc`) are not forwarded. To turn one on, also depend on
//! that crate with the feature; Cargo then enables it for the copy marina uses:
//!
//! ```toml
//! [dependencies]
//! marina = "0.1"
//! marina-health = { version = "0.1", features = ["grpc"] }
//! ```
//!
//! # Examples
//!
//! The whole stack over three local echo servers, with sticky sessions by user:
//!
//! ```
//! use marina::{AffinityMode, KeyFnBox, Stack};
//! use marina::core::Request;
//! use marina::affinity::TableConfig;
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), marina::core::BoxError> {
//! # let mut addrs = Vec::new();
//! # for _ in 0..3 {
//! #     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! #     addrs.push(listener.local_addr()?);
//! #     tokio::spawn(async move {
//! #         while let Ok((s, _)) = listener.accept().await {
//! #             tokio::spawn(async move {
//! #                 let (r, mut w) = s.into_split();
//! #                 let mut lines = BufReader::new(r).lines();
//! #                 while let Ok(Some(l)) = lines.next_line().await {
//! #                     if w.write_all(format!("{l}\n").as_bytes()).await.is_err() { return; }
//! #                 }
//! #             });
//! #         }
//! #     });
//! # }
//! // `addrs`: three echo servers on 127.0.0.1. Requests are lines; the user rides in
//! // the request's extensions.
//! #[derive(Clone)]
//! struct User(String);
//! let user = KeyFnBox::new(|r: &Request<String>| r.extensions.get::<User>().map(|u| u.0.clone()));
//! let (mut svc, handle) = Stack::builder::<String>()
//!     .endpoints(addrs)
//!     .affinity(AffinityMode::Sticky(user, TableConfig::default()))
//!     .build_line()?;
//! for line in ["a", "b", "c"] {
//!     let mut req = Request::new(line.to_string());
//!     req.extensions.insert(User("alice".into()));
//!     let resp = svc.ready().await?.call(req).await?;
//!     assert_eq!(resp.body, line); // echoed
//! }
//! let stats = handle.stats();
//! // alice's three requests went to one backend.
//! assert_eq!(stats.backends.iter().filter(|b| b.balance.as_ref().is_some_and(|e| e.requests > 0)).count(), 1);
//! println!("{stats}");
//! assert_eq!(handle.shutdown(std::time::Duration::from_secs(1)).await, 0);
//! # Ok(()) }
//! ```
//!
//! # Under hyper and tonic
//!
//! With the `http` feature, each backend is a `marina::pool::http::HttpClient` — a
//! hyper client service over a pool of connections (streaming bodies both ways; the
//! connection follows the response body; HTTP/2 connections shared up to the server's
//! stream limit) — and the layers stack on it like on any endpoint service:
//!
//! ```ignore
//! use marina::pool::{Pool, http::HttpClient};
//!
//! let endpoints = addrs.iter().map(|&addr| {
//!     let client = HttpClient::builder().pool(Pool::builder().max_size(8)).build(addr)?;
//!     Ok(HealthLayer::new(HealthConfig::default()).classify(Http5xx).layer(client))
//! }).collect::<Result<Vec<_>, marina::pool::PoolError>>()?;
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::keyed(HeaderKey::new("x-user"), Rate::per_second(20)))
//!     .service(Balance::from_services(endpoints, RoundRobin::new()).failover_unsent(Failover::new()).shared());
//! let resp = svc.oneshot(http::Request::get("/").body(Full::new(Bytes::new()))?).await?;
//! let body = resp.into_body().collect().await?; // streamed; the connection goes back here
//! ```
//!
//! Under tonic, a `marina::pool::KeyedPool` is the connector of
//! `Endpoint::connect_with_connector`, and marina's balancer and health checks sit
//! over the `Channel`s. Both are whole programs in the repository's `examples/`
//! (`hyper_client.rs`, `tonic_client.rs`), tested as they run.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use marina_core as core;

#[cfg(feature = "affinity")]
pub use marina_affinity as affinity;
#[cfg(feature = "balance")]
pub use marina_balance as balance;
#[cfg(feature = "health")]
pub use marina_health as health;
#[cfg(feature = "limit")]
pub use marina_limit as limit;
#[cfg(feature = "pool")]
pub use marina_pool as pool;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use marina_redis as redis;

pub mod line;

#[cfg(feature = "serde")]
mod config;
#[cfg(feature = "full")]
mod ext;
#[cfg(feature = "full")]
mod metrics;
#[cfg(feature = "full")]
mod problem;
#[cfg(feature = "full")]
mod stack;
#[cfg(feature = "full")]
mod timeout;

#[cfg(feature = "serde")]
pub use config::TlsSection;
#[cfg(feature = "serde")]
pub use config::{
    ConfigSyntax, FailoverSection, HealthSection, LimitsSection, PoolSection, StackConfig,
};
#[cfg(all(feature = "serde", feature = "redis"))]
pub use config::{RedisLease, RedisSection};
#[cfg(feature = "full")]
pub use ext::ServiceBuilderExt;
#[cfg(feature = "full")]
pub use problem::{ConfigProblem, InvalidConfig};
#[cfg(feature = "full")]
pub use timeout::{
    RequestTimeout, RequestTimeoutFuture, RequestTimeoutLayer, RequestTimeoutService,
};

#[cfg(feature = "full")]
pub use stack::{
    AffinityMode, BackendStats, Conn, CustomStream, DEFAULT_REQUEST_TIMEOUT, DEFAULT_WARM_BUDGET,
    EndpointService, KeyFnBox, Reply, ShuttingDown, Stack, StackBuilder, StackHandle, StackRequest,
    StackService, StackStats, Transport,
};
#[cfg(all(feature = "full", feature = "redis"))]
pub use stack::{DEFAULT_REDIS_NAME, RedisStackStats};

/// The names most programs use.
pub mod prelude {
    #[cfg(feature = "full")]
    pub use crate::{AffinityMode, KeyFnBox, ServiceBuilderExt, Stack, StackHandle};
    pub use marina_core::{BoxError, Request, Response, RouteHint};
}
