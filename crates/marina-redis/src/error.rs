//! `RedisUnavailable`: what a request gets when Redis cannot decide and the fallback
//! says to fail.

use std::fmt;
use std::time::Duration;

/// Why Redis gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outage {
    /// The call took longer than the fleet's call timeout.
    TimedOut {
        /// The timeout.
        after: Duration,
    },
    /// The call failed (connection refused or lost, a server error).
    Failed {
        /// The `redis` crate's error, as text.
        message: String,
    },
    /// Redis is marked down after failed calls in a row; no call was made.
    Down,
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outage::TimedOut { after } => write!(f, "no answer within {after:?}"),
            Outage::Failed { message } => write!(f, "call failed: {message}"),
            Outage::Down => f.write_str("marked down, waiting for a probe to find it back"),
        }
    }
}

/// Redis could not decide on a request, and the fallback is
/// [`FailClosed`](crate::Fallback::FailClosed) (or a session store could not tell
/// where a session is pinned).
///
/// ```
/// use marina_redis::{Outage, RedisUnavailable};
///
/// let err = RedisUnavailable { outage: Outage::Down };
/// assert_eq!(
///     err.to_string(),
///     "redis unavailable (marked down, waiting for a probe to find it back): request refused"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUnavailable {
    /// Why.
    pub outage: Outage,
}

impl fmt::Display for RedisUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis unavailable ({}): request refused", self.outage)
    }
}

impl std::error::Error for RedisUnavailable {}
