//! Pools of `redis` connections (the `redis` feature).
//!
//! [`RedisConnector`] is a [`Manage`] connector for redis-rs
//! [`MultiplexedConnection`]s: it opens one from a [`ConnectionInfo`], checks a reused
//! connection with a `PING` before handing it out (a multiplexed connection cannot tell
//! on its own that the server closed it: after a `CLIENT KILL` or a restart, the `PING`
//! fails and the connection is replaced), and tells connect errors worth retrying
//! (refused, reset, timed out, the server loading its data set) from those that are not
//! (returned at once).
//!
//! [`RedisPool`] names the pool type.
//!
//! # Examples
//!
//! ```no_run
//! use marina_pool::redis::{RedisConnector, RedisPool};
//! use marina_pool::{Managed, Pool};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let info = "redis://127.0.0.1:6379".parse()?;
//! let pool: RedisPool = Pool::builder()
//!     .max_size(16)
//!     .build(Managed::new(RedisConnector::new()), info)?;
//!
//! let mut conn = pool.get().await?; // answered a PING just now, or was just opened
//! let pong: String = redis::cmd("PING").query_async(&mut *conn).await?;
//! assert_eq!(pong, "PONG");
//! # Ok(()) }
//! ```
//!
//! A command that fails with an I/O error leaves the connection unusable: call
//! [`Pooled::mark_broken`](crate::Pooled::mark_broken) on it, or let the next checkout's
//! `PING` find out.

use std::future::Future;

use ::redis::aio::MultiplexedConnection;
use ::redis::{ConnectionInfo, ErrorKind, RedisError, ServerErrorKind};

use crate::{Manage, Managed, Pool};

pub use ::redis as redis_rs;

/// A pool of redis multiplexed connections made by a [`RedisConnector`].
pub type RedisPool = Pool<Managed<MultiplexedConnection, ConnectionInfo>, ConnectionInfo>;

/// Opens redis [`MultiplexedConnection`]s and checks reused ones with a `PING`: see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct RedisConnector {
    ping: bool,
}

impl Default for RedisConnector {
    fn default() -> Self {
        RedisConnector::new()
    }
}

impl RedisConnector {
    /// A connector that pings reused connections at checkout.
    pub fn new() -> Self {
        RedisConnector { ping: true }
    }

    /// Whether a reused connection answers a `PING` before it is handed out (on by
    /// default; off saves a round trip per checkout, but a connection the server closed
    /// is then found only by the command that fails on it).
    pub fn ping_on_checkout(mut self, on: bool) -> Self {
        self.ping = on;
        self
    }
}

impl Manage<ConnectionInfo> for RedisConnector {
    type Conn = MultiplexedConnection;
    type Error = RedisError;

    async fn connect(&self, info: &ConnectionInfo) -> Result<MultiplexedConnection, RedisError> {
        ::redis::Client::open(info.clone())?
            .get_multiplexed_async_connection()
            .await
    }

    /// A multiplexed connection has no cheap way to tell: `false` (the `PING` of
    /// [`recycle`](Manage::recycle) does the checking).
    fn is_broken(&self, _conn: &mut MultiplexedConnection) -> bool {
        false
    }

    fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Option<impl Future<Output = Result<(), RedisError>> + Send> {
        self.ping.then_some(async move {
            let pong: String = ::redis::cmd("PING").query_async(conn).await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "unexpected PING reply",
                    pong,
                )))
            }
        })
    }

    /// Transient: a refused, dropped or timed-out connection (redis-rs's own
    /// predicates, and [`is_transient`](crate::is_transient)), and a server still
    /// loading its data set (`LOADING`). Anything else — an authentication error, a
    /// bad URL — is permanent.
    fn is_transient(&self, error: &RedisError) -> bool {
        error.is_connection_refusal()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.kind() == ErrorKind::Server(ServerErrorKind::BusyLoading)
            || crate::is_transient(error)
    }
}
