//! The pool's error type.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use marina_core::BoxError;

use crate::config::Problem;

/// Why [`Pool::get`](crate::Pool::get) (or a build) failed.
///
/// Match on the kind, or use the `is_*` predicates. A connect failure carries the
/// connector's own error as its [`source`](Error::source), never hidden behind a timeout.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// No connection became available within `acquire_timeout` (the duration waited).
    Timeout(Duration),
    /// Opening a connection failed; the connector's error (or a [`ConnectTimeout`]), or a
    /// [`RetriesExhausted`] when transient failures were retried until `acquire_timeout`
    /// ran out.
    Connect(BoxError),
    /// The pool was closed.
    Closed,
    /// The configuration is invalid; every error [`Config::validate`](crate::Config::validate) found.
    Invalid(Vec<Problem>),
    /// The pool was asked (as a `Service<T>`) for a target other than its own.
    WrongTarget,
    /// A [`KeyedPool`](crate::KeyedPool) already holds its maximum number of targets
    /// (the limit), all in use.
    TooManyTargets(usize),
}

impl PoolError {
    /// True for [`PoolError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, PoolError::Timeout(_))
    }

    /// True for [`PoolError::Connect`].
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }

    /// True for [`PoolError::Closed`].
    pub fn is_closed(&self) -> bool {
        matches!(self, PoolError::Closed)
    }
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Timeout(d) => {
                write!(f, "timed out after {d:?} waiting for a pooled connection")
            }
            // The connect error itself is the `source()`, as error chains expect.
            PoolError::Connect(_) => f.write_str("pool failed to connect"),
            PoolError::Closed => f.write_str("pool is closed"),
            PoolError::Invalid(problems) => {
                f.write_str("invalid pool configuration")?;
                for (i, p) in problems.iter().enumerate() {
                    write!(f, "{} {p}", if i == 0 { ":" } else { ";" })?;
                }
                Ok(())
            }
            PoolError::WrongTarget => f.write_str("pool was asked for a target other than its own"),
            PoolError::TooManyTargets(n) => write!(
                f,
                "keyed pool already holds its maximum of {n} targets, all in use"
            ),
        }
    }
}

impl Error for PoolError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            PoolError::Connect(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Connects kept failing for a transient reason until `acquire_timeout` ran out (see
/// [`ConnectRetry`](crate::ConnectRetry)): the source of the [`PoolError::Connect`] that
/// [`Pool::get`](crate::Pool::get) then returns. Its own [`source`](Error::source) is the
/// last connect error.
///
/// A `Connect` error rather than a `Timeout`: the pool was not too busy, the backend
/// could not be reached.
#[derive(Debug)]
pub struct RetriesExhausted {
    attempts: u32,
    waited: Duration,
    last: BoxError,
}

impl RetriesExhausted {
    pub(crate) fn new(attempts: u32, waited: Duration, last: BoxError) -> Self {
        RetriesExhausted {
            attempts,
            waited,
            last,
        }
    }

    /// How many connects were tried (and failed).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How long the checkout waited in all: its `acquire_timeout`.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The last connect error (also the [`source`](Error::source)).
    pub fn last_error(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.last
    }
}

impl fmt::Display for RetriesExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connect attempts failed within the acquire timeout of {:?}",
            self.attempts, self.waited
        )
    }
}

impl Error for RetriesExhausted {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.last)
    }
}

/// A connect did not finish within `connect_timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTimeout {
    /// The timeout that elapsed.
    pub timeout: Duration,
    /// What was being connected to, as text.
    pub target: String,
}

impl fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connect to {} timed out after {:?}",
            self.target, self.timeout
        )
    }
}

impl Error for ConnectTimeout {}
