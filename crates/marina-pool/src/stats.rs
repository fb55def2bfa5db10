//! Pool statistics.

use std::time::Duration;

/// A snapshot of a pool, from [`Pool::stats`](crate::Pool::stats).
///
/// Gauges (`total`, `idle`, `active`, `connecting`, `waiting`) are the state now;
/// counters (`created` … `cancelled`) count since the pool was built. After the pool
/// goes quiet, `acquired == released + active` and
/// `created == destroyed + total` hold, and `total <= max_size` while it is open.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// The current maximum size (after any [`resize`](crate::Pool::resize)); 0 once the
    /// pool is closed (it opens nothing more).
    pub max_size: usize,
    /// Open connections: idle plus checked out.
    pub total: usize,
    /// Connections waiting in the pool (including one being health-checked).
    pub idle: usize,
    /// Connections checked out.
    pub active: usize,
    /// Connects in flight, and free slots reserved for a connect (by a
    /// [`PoolService`](crate::PoolService) for its next call).
    pub connecting: usize,
    /// `get()` calls queued for a connection.
    pub waiting: usize,
    /// Connections opened.
    pub created: u64,
    /// Successful checkouts.
    pub acquired: u64,
    /// Checkouts that ended (connection returned, closed or detached).
    pub released: u64,
    /// Connections closed (or detached), for any reason.
    pub destroyed: u64,
    /// Of `destroyed`: closed by idle timeout, max lifetime or a failed health check.
    pub evicted: u64,
    /// `get()` calls that failed with [`PoolError::Timeout`](crate::PoolError::Timeout).
    pub timed_out: u64,
    /// Connects that failed.
    pub failed: u64,
    /// Connects abandoned before they finished: their `get()` or `ready_min()` was
    /// cancelled or timed out, or a background refill was stopped (the pool closed, its
    /// last handle was dropped, or its runtime shut down).
    pub cancelled: u64,
    /// True once the pool was closed.
    pub closed: bool,
    /// Every open connection, by id.
    pub connections: Vec<ConnStats>,
}

/// One open connection, in [`PoolStats::connections`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnStats {
    /// The pool's id for the connection (unique within the pool, increasing).
    pub id: u64,
    /// Time since it was opened.
    pub age: Duration,
    /// Time since it was last returned, if it is idle now (to the pool's clock
    /// granularity); `None` while checked out.
    pub idle_for: Option<Duration>,
    /// Times it was checked out.
    pub uses: u64,
    /// Errors reported with [`Pooled::record_error`](crate::Pooled::record_error) (a
    /// connection that sees an I/O error is closed instead, and leaves this list).
    pub errors: u64,
}
