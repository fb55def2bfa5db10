//! A bounded, cancel-safe connection pool that is a tower `MakeConnection`.
//!
//! A [`Pool`] keeps connections to one target, made by any connector `C: Service<T>`
//! (a [`TcpConnector`], a TLS connector, a function that opens a protocol client).
//! [`Pool::get`] checks one out as a [`Pooled`] guard that goes back to the pool when
//! dropped. Because the pool is itself a `Service<T>` whose responses are
//! `AsyncRead + AsyncWrite` when the connections are, a pool of streams is a
//! [`tower::make::MakeConnection`] and fits any connector slot.
//!
//! - **Bounded and fair**: at most `max_size` connections; callers that find none free
//!   wait in FIFO order, and a returned connection goes straight to the oldest waiter.
//!   `max_connecting` bounds connects in flight (no reconnect storm after an outage).
//! - **Timeouts that say what happened**: `acquire_timeout` bounds the whole wait
//!   ([`PoolError::Timeout`]); a connect that fails for good (a wrong password, an
//!   unknown database) is reported at once as [`PoolError::Connect`] with the
//!   connector's error, never hidden behind a timeout.
//! - **Through a restart**: a connect refused, reset or timed out is retried with
//!   jittered backoff within `acquire_timeout` ([`ConnectRetry`]; by default once the
//!   pool has reached its target), so a short restart of a lone database costs callers
//!   no errors; [`PoolService`], the endpoint balancers use, fails at once instead so
//!   they can fail over.
//! - **No stale connections**: idle connections are checked at checkout (for TCP, the
//!   socket state: a peer's FIN or RST, or unread bytes, close it; for other clients,
//!   what their connector says: see below), closed after `idle_timeout` and
//!   `max_lifetime`, and validated in the background with an optional
//!   [`Probe`](marina_core::Probe). An I/O error or EOF seen through a [`Pooled`] closes
//!   it instead of returning it.
//! - **Panic safe**: a panic in user code the pool runs (a check, the connector, a
//!   probe, a tracing subscriber) closes the connection involved and frees its slot;
//!   the background task carries on.
//! - **Background upkeep**: a maintenance task per pool warms up to `min_idle`, refills
//!   (backing off while connects fail), evicts and health-checks; a second task, started
//!   by the first `get()` that has to wait while an `acquire_timeout` is set, times
//!   waiters out. Both end when the pool is closed or its last handle dropped, and
//!   restart if their runtime went away.
//! - **Visible**: [`Pool::stats`] (gauges, counters, per-connection details), `tracing`
//!   events, and `metrics` counters and gauges with the `metrics` feature.
//! - **Cancel safe** at every await point: a dropped `get()` leaves no slot, waiter or
//!   half-made connection behind.
//!
//! Also here: [`KeyedPool`] (one pool per target, bounded), [`PoolService`] (a
//! request-level service over a pool of clients, with [`tower::load::Load`]), and
//! [`Config`] with presets, Little's-law sizing ([`Config::for_load`]) and validation.
//!
//! # Add it
//!
//! ```toml
//! [dependencies]
//! marina-pool = "0.1"
//! # or, for pools of tokio-postgres clients and hyper connections:
//! # marina-pool = { version = "0.1", features = ["postgres", "hyper"] }
//! ```
//!
//! # Cargo features
//!
//! Default: none. TCP pools, [`Manage`] connectors of your own, [`KeyedPool`] and
//! [`PoolService`] need no feature.
//!
//! | feature | enables |
//! |---|---|
//! | `hyper` | hyper's `rt::Read`/`rt::Write` and hyper-util's `Connection` for [`Pooled`] (when the pooled stream has them), so a pool fits hyper-util's legacy `Client` as its connector |
//! | `http` | [`marina_pool::http`](http): [`HttpClient`](http::HttpClient), a hyper client service over pooled HTTP/1 connections and shared HTTP/2 ones, with streaming bodies (implies `hyper`) |
//! | `postgres` | `marina_pool::postgres`: a [`Manage`] connector for `tokio-postgres` clients, and the `PgPool` type |
//! | `redis` | `marina_pool::redis`: a [`Manage`] connector for redis-rs multiplexed connections, and the `RedisPool` type |
//! | `tls` | `marina_pool::tls`: `TlsConnector`, TLS (rustls with the *ring* provider) over any connector, with a stale-connection check that sees through TLS |
//! | `tls-native-roots` | `tls`, and `TlsConfig::native_roots()`: the operating system's trusted roots |
//! | `metrics` | counters, gauges and a histogram through the [`metrics`](https://docs.rs/metrics) facade, labelled by pool name: see [Metrics](#metrics) |
//!
//! # Metrics
//!
//! With the `metrics` feature, each pool registers its metrics once, when it is built
//! ([`Builder::build`], [`Pool::new`]), every label combination up front, so each
//! series exists (at 0) from then on; updates go through the stored handles (nothing
//! is formatted per checkout), and a checkout served at once from the idle queue reads
//! no clock (its wait is recorded as 0). Without the feature nothing is compiled in.
//!
//! **Install the recorder (a Prometheus exporter, …) before building the pool:**
//! handles taken before a recorder is installed are no-ops, and stay so.
//!
//! The `pool` label is the pool's name ([`Builder::name`]; by default its target's
//! `Debug` text, such as `127.0.0.1:6379`). Give each pool its own name: pools built
//! with the same name share their series.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `marina_pool_checkouts_total` | counter | `pool`, `outcome` = `ok` \| `timeout` \| `error` | checkouts that ended: a connection handed out, [`PoolError::Timeout`], or another error (a failed connect, the pool closed) |
//! | `marina_pool_checkout_wait_seconds` | histogram | `pool` | time from the start of a successful checkout to the connection in hand, waiting in the queue and connecting included (0 when an idle one was ready) |
//! | `marina_pool_connections_created_total` | counter | `pool` | connections opened |
//! | `marina_pool_connections_closed_total` | counter | `pool`, `reason` = `broken` \| `idle_timeout` \| `max_lifetime` \| `health_check` \| `closed` \| `shrunk` \| `detached` | connections closed (or detached), by why |
//! | `marina_pool_connections_evicted_total` | counter | `pool` | of those, closed by idle timeout, max lifetime or a failed health check |
//! | `marina_pool_timeouts_total` | counter | `pool` | checkouts that gave up after `acquire_timeout` |
//! | `marina_pool_connect_errors_total` | counter | `pool` | connects that failed, at checkout or in a background refill |
//! | `marina_pool_connections` | gauge | `pool`, `state` = `idle` \| `active` \| `connecting` | connections by state, at the last maintenance tick (about once a second) |
//! | `marina_pool_waiting` | gauge | `pool` | checkouts queued for a connection, at the last maintenance tick |
//!
//! A [`PoolService`] counts a checkout when its `poll_ready` reserves an idle
//! connection, when its call connects in a reserved slot (then the wait is the
//! connect's), or, for a call that found nothing reserved, as [`Pool::get`] does.
//!
//! # Cancel safety
//!
//! Every future of this crate can be dropped at any await point (a caller's timeout,
//! a `select!`, a balancer cancelling a hedge) and leaves the pool whole:
//!
//! - [`Pool::get`]: a queued waiter is withdrawn (a connection already handed to it
//!   goes to the next waiter or back to the idle queue), a connect in flight is
//!   dropped and its slot freed (counted in [`PoolStats::cancelled`]), a connection
//!   being recycled is closed.
//! - [`Pooled`]: dropped, the connection goes back to the pool, or is closed if it was
//!   marked broken; a [`PoolService`] marks its client broken while a request is in
//!   flight, so a call dropped half way closes the client instead of reusing it
//!   mid-protocol.
//! - [`Pool::ready_min`]: the connects it started are dropped and their slots freed.
//! - [`Pool::close`]: the pool is closed once the future is first polled; dropping it
//!   only stops the waiting for connections to come back.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use marina_pool::{Config, Pool, PoolError, TcpConnector};
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let addr = listener.local_addr()?;
//! # tokio::spawn(async move { loop {
//! #     let (mut s, _) = listener.accept().await.unwrap();
//! #     tokio::spawn(async move { let (mut r, mut w) = s.split(); let _ = tokio::io::copy(&mut r, &mut w).await; });
//! # } });
//! let pool = Pool::builder()
//!     .config(Config::balanced())
//!     .min_idle(2)
//!     .idle_timeout(Duration::from_secs(50)) // below the server's keep-alive
//!     .build(TcpConnector::new(), addr)?;
//! pool.ready_min().await?; // two connections are open and idle
//!
//! let mut conn = pool.get().await?;
//! conn.write_all(b"hello\n").await?;
//! let mut line = String::new();
//! BufReader::new(&mut conn).read_line(&mut line).await?; // through the guard: EOF poisons it
//! assert_eq!(line, "hello\n");
//! drop(conn);
//!
//! let stats = pool.stats();
//! assert_eq!(stats.active, 0);
//! assert!(stats.idle >= 2); // min_idle counts idle connections: refilled while one was out
//! pool.close().await;
//! assert!(matches!(pool.get().await, Err(PoolError::Closed)));
//! # Ok(()) }
//! ```
//!
//! # Pooling a client that is not a socket
//!
//! The pool checks socket state for the streams it knows (`TcpStream`, `UnixStream`).
//! A database or cache client owns its socket in a background task, so the pool cannot
//! see it die: after a server restart every idle client would be dead. Give the
//! connector a say instead: implement [`Manage`] for it — `connect`, and `is_broken`
//! (cheap and synchronous, like `Client::is_closed`), optionally an asynchronous
//! `recycle` (a ping before reuse) and `is_transient` (which connect errors to retry) —
//! and build pools over [`Managed::new`]`(connector)`. Every pool of that connector,
//! keyed pools included, then hands out only live clients, with no per-pool hook.
//!
//! Ready-made, behind features: `marina_pool::postgres` (`tokio-postgres` clients,
//! `PgPool`) and `marina_pool::redis` (redis-rs multiplexed connections, `RedisPool`):
//!
//! ```ignore
//! use marina_pool::postgres::{PgConnector, PgPool};
//! use marina_pool::{Managed, Pool};
//!
//! let pool: PgPool = Pool::builder()
//!     .max_size(16)
//!     .build(Managed::new(PgConnector::new(tokio_postgres::NoTls)), "host=127.0.0.1 user=postgres".parse()?)?;
//! let client = pool.get().await?; // never a client whose connection died
//! client.query_one("SELECT 1", &[]).await?;
//! ```
//!
//! (Compiled in the `postgres` module's docs.) For one-off rules on a single pool,
//! [`Builder::check`] still works, and runs after the connector's own check.
//!
//! As a `MakeConnection`:
//!
//! ```
//! use marina_pool::{Pool, TcpConnector};
//! use tower::make::MakeConnection;
//!
//! fn takes_a_connector<M: MakeConnection<std::net::SocketAddr>>(_: M) {}
//!
//! # fn main() -> Result<(), marina_pool::PoolError> {
//! let addr = "127.0.0.1:7000".parse().unwrap();
//! takes_a_connector(Pool::builder().build(TcpConnector::new(), addr)?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// Every item but the slot model is `cfg(not(loom))`: no badge for that on docs.rs.
#![cfg_attr(docsrs, doc(auto_cfg(hide(loom))))]
// Under `--cfg loom` only the slot accounting and its models are built (tokio's
// networking does not build under loom).
#![cfg_attr(loom, allow(dead_code, unused_imports))]

mod slots;
mod sync;

#[cfg(all(test, loom))]
mod loom_tests;

// Declared one by one (not through a macro) so that rustfmt sees every module.
#[cfg(not(loom))]
mod builder;
#[cfg(not(loom))]
mod check;
#[cfg(not(loom))]
mod config;
#[cfg(not(loom))]
mod core;
#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
mod keyed;
#[cfg(not(loom))]
mod maintain;
#[cfg(not(loom))]
mod manage;
#[cfg(all(feature = "metrics", not(loom)))]
mod metrics;
#[cfg(not(loom))]
mod pool;
#[cfg(not(loom))]
mod pooled;
#[cfg(not(loom))]
mod service;
#[cfg(not(loom))]
mod stats;
#[cfg(not(loom))]
mod tcp;

#[cfg(not(loom))]
pub use builder::Builder;
#[cfg(not(loom))]
pub use check::socket_is_open;
#[cfg(not(loom))]
pub use config::{Config, ConnectRetry, Problem, Reuse, Validation};
#[cfg(not(loom))]
pub use error::{ConnectTimeout, PoolError, RetriesExhausted};
#[cfg(not(loom))]
pub use keyed::KeyedPool;
#[cfg(not(loom))]
pub use manage::{Manage, Managed, ManagedFuture, is_transient};
#[cfg(not(loom))]
pub use pool::{Connector, Pool, PoolFuture, Target, TcpPool};
#[cfg(not(loom))]
pub use pooled::Pooled;
#[cfg(not(loom))]
pub use service::{PoolService, ResponseFuture};
#[cfg(not(loom))]
pub use stats::{ConnStats, PoolStats};
#[cfg(not(loom))]
pub use tcp::{ConnectError, ConnectFuture, TcpConnector};

#[cfg(all(feature = "http", not(loom)))]
pub mod http;
#[cfg(all(feature = "postgres", not(loom)))]
pub mod postgres;
#[cfg(all(feature = "redis", not(loom)))]
pub mod redis;
#[cfg(all(feature = "tls", not(loom)))]
pub mod tls;

#[cfg(all(test, not(loom)))]
mod tests;

/// The workspace README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
