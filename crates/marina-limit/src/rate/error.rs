//! The rate limiter's errors: over the limit, and a full key table.

use std::fmt;
use std::time::Duration;

/// A request went over its rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// How long until the same request would be admitted (to the nanosecond; round
    /// up, not down, for a `Retry-After` header).
    pub retry_after: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited: retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}

/// The keyed limiter tracks its maximum number of keys and refuses new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyKeys {
    /// The cap.
    pub max_keys: usize,
}

impl fmt::Display for TooManyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limiter tracks its maximum of {} keys: new key refused",
            self.max_keys
        )
    }
}

impl std::error::Error for TooManyKeys {}
