//! Pools of `tokio-postgres` clients (the `postgres` feature).
//!
//! [`PgConnector`] is a [`Manage`] connector for [`tokio_postgres::Client`]s: it opens a
//! client from a [`tokio_postgres::Config`] (spawning its connection task on the current
//! tokio runtime), calls a client whose connection ended broken
//! ([`Client::is_closed`](tokio_postgres::Client::is_closed): a server restart, an
//! administrator's `pg_terminate_backend`, a network cut), so checkouts never hand out a
//! dead client, and tells connect errors worth retrying (refused, reset, timed out, the
//! server starting up or shutting down) from those that are not (a wrong password, an
//! unknown database or user: returned at once, with the server's message).
//!
//! [`PgPool`] names the pool type.
//!
//! # Examples
//!
//! ```no_run
//! use marina_pool::postgres::{PgConnector, PgPool};
//! use marina_pool::{Managed, Pool};
//! use tokio_postgres::NoTls;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let config = "host=127.0.0.1 user=postgres dbname=test".parse()?;
//! let pool: PgPool = Pool::builder()
//!     .max_size(16)
//!     .build(Managed::new(PgConnector::new(NoTls)), config)?;
//!
//! let client = pool.get().await?; // a live client, or a new one
//! let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
//! assert_eq!(one, 1);
//! # Ok(()) }
//! ```
//!
//! Through a restart of the server, idle clients are found dead at checkout and closed
//! (counted in [`PoolStats::destroyed`](crate::PoolStats::destroyed)), and new connects
//! are retried until the server is back or `acquire_timeout` runs out (see
//! [`ConnectRetry`](crate::ConnectRetry)).
//!
//! A checkout costs no round trip. To also run an empty query on every reused client
//! before handing it out (catching a connection that died silently, at the price of a
//! round trip), use [`PgConnector::ping_on_checkout`].

use std::fmt;
use std::future::Future;

use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, Error, Socket};

use crate::{Manage, Managed, Pool};

pub use tokio_postgres;

/// A pool of `tokio-postgres` clients made by a [`PgConnector`] (with any TLS).
pub type PgPool = Pool<Managed<Client, Config>, Config>;

/// Opens `tokio-postgres` clients and knows when one is dead: see the
/// [module docs](self).
///
/// `Tls` is the TLS connector, as for [`Config::connect`]: `tokio_postgres::NoTls`, or
/// one from `postgres-native-tls` or `tokio-postgres-rustls`.
#[derive(Clone)]
pub struct PgConnector<Tls> {
    tls: Tls,
    ping: bool,
}

impl<Tls> fmt::Debug for PgConnector<Tls> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnector")
            .field("tls", &std::any::type_name::<Tls>())
            .field("ping_on_checkout", &self.ping)
            .finish()
    }
}

impl<Tls> PgConnector<Tls> {
    /// A connector that opens clients with `tls`.
    pub fn new(tls: Tls) -> Self {
        PgConnector { tls, ping: false }
    }

    /// Runs an empty query on every reused client before handing it out (off by
    /// default: [`Client::is_closed`] already catches a connection the server or the
    /// network closed). A client that fails it, or outlasts the pool's
    /// `health_check_timeout`, is closed and replaced.
    pub fn ping_on_checkout(mut self, on: bool) -> Self {
        self.ping = on;
        self
    }
}

impl<Tls> Manage<Config> for PgConnector<Tls>
where
    Tls: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    Tls::Stream: Send + 'static,
    Tls::TlsConnect: Send,
    <Tls::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    type Conn = Client;
    type Error = Error;

    async fn connect(&self, config: &Config) -> Result<Client, Error> {
        let (client, connection) = config.connect(self.tls.clone()).await?;
        // The connection task ends when the client is dropped or the server closes the
        // connection; the client then reads `is_closed()`.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "postgres connection ended");
            }
        });
        Ok(client)
    }

    fn is_broken(&self, client: &mut Client) -> bool {
        client.is_closed()
    }

    fn recycle(
        &self,
        client: &mut Client,
    ) -> Option<impl Future<Output = Result<(), Error>> + Send> {
        self.ping
            .then_some(async move { client.simple_query("").await.map(drop) })
    }

    /// Transient: an I/O error of a transient kind (see [`is_transient`](crate::is_transient)),
    /// a connection closed during start-up, and the server errors `57P01`
    /// (`admin_shutdown`), `57P02` (`crash_shutdown`), `57P03` (`cannot_connect_now`: the
    /// server is starting up or shutting down) and `53300` (`too_many_connections`).
    /// Anything else — a wrong password, an unknown database or user, a TLS failure —
    /// is permanent.
    fn is_transient(&self, error: &Error) -> bool {
        if let Some(code) = error.code() {
            return [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
            ]
            .contains(code);
        }
        error.is_closed() || crate::is_transient(error)
    }
}
