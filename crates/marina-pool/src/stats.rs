//! Pool statistics.

use std::fmt;
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

/// One line: the gauges, then the counters that are not zero, e.g.
/// `3 in use, 2 idle, 0 connecting, max 8, 1 waiting; 5 opened, 1 timed out`
/// (and ` (pool closed)` at the end once the pool is closed).
impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in use, {} idle, {} connecting, max {}, {} waiting",
            self.active, self.idle, self.connecting, self.max_size, self.waiting
        )?;
        let counters = [
            (self.created, "opened"),
            (self.destroyed, "closed"),
            (self.evicted, "evicted"),
            (self.timed_out, "timed out"),
            (self.failed, "failed to connect"),
            (self.cancelled, "connects cancelled"),
        ];
        let mut sep = "; ";
        for (n, what) in counters.into_iter().filter(|(n, _)| *n > 0) {
            write!(f, "{sep}{n} {what}")?;
            sep = ", ";
        }
        if self.closed {
            f.write_str(" (pool closed)")?;
        }
        Ok(())
    }
}

/// One line, e.g. `#3: open 12.0 s, idle 1.5 s, 7 uses` (`in use` instead of the idle
/// time while it is checked out; `, 2 errors` when it has some).
impl fmt::Display for ConnStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}: open {:.1} s, ", self.id, self.age.as_secs_f64())?;
        match self.idle_for {
            Some(idle) => write!(f, "idle {:.1} s", idle.as_secs_f64())?,
            None => f.write_str("in use")?,
        }
        let s = if self.uses == 1 { "" } else { "s" };
        write!(f, ", {} use{s}", self.uses)?;
        if self.errors > 0 {
            let s = if self.errors == 1 { "" } else { "s" };
            write!(f, ", {} error{s}", self.errors)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> PoolStats {
        PoolStats {
            max_size: 8,
            total: 5,
            idle: 2,
            active: 3,
            connecting: 0,
            waiting: 1,
            created: 0,
            acquired: 0,
            released: 0,
            destroyed: 0,
            evicted: 0,
            timed_out: 0,
            failed: 0,
            cancelled: 0,
            closed: false,
            connections: Vec::new(),
        }
    }

    #[test]
    fn pool_stats_display_gauges_only_when_counters_are_zero() {
        assert_eq!(
            stats().to_string(),
            "3 in use, 2 idle, 0 connecting, max 8, 1 waiting"
        );
    }

    #[test]
    fn pool_stats_display_lists_counters_that_are_not_zero() {
        let s = PoolStats {
            created: 5,
            timed_out: 1,
            failed: 2,
            closed: true,
            ..stats()
        };
        assert_eq!(
            s.to_string(),
            "3 in use, 2 idle, 0 connecting, max 8, 1 waiting; 5 opened, 1 timed out, \
             2 failed to connect (pool closed)"
        );
    }

    #[test]
    fn conn_stats_display() {
        let mut c = ConnStats {
            id: 3,
            age: Duration::from_millis(12_040),
            idle_for: Some(Duration::from_millis(1_500)),
            uses: 7,
            errors: 0,
        };
        assert_eq!(c.to_string(), "#3: open 12.0 s, idle 1.5 s, 7 uses");
        c.idle_for = None;
        c.uses = 1;
        c.errors = 2;
        assert_eq!(c.to_string(), "#3: open 12.0 s, in use, 1 use, 2 errors");
    }
}
