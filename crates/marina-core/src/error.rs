use std::error::Error;
use std::fmt;

use crate::BoxError;

/// Marks an error that happened **before the request was sent**: the connection could
/// not be made, the pool had nothing to check out in time, the endpoint was closed.
/// The request never reached the backend, so sending it elsewhere is safe even when it
/// is not idempotent; marina-balance's failover retries exactly these.
///
/// It wraps the original error, which stays reachable through
/// [`source`](Error::source), [`find`] and [`NotSent::inner`].
///
/// ```
/// use marina_core::{BoxError, NotSent, find, is_not_sent};
/// use std::io;
///
/// let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "connect refused");
/// let err: BoxError = NotSent::new(refused).into();
/// assert!(is_not_sent(&*err));
/// assert_eq!(find::<io::Error>(&*err).unwrap().kind(), io::ErrorKind::ConnectionRefused);
///
/// let sent: BoxError = io::Error::new(io::ErrorKind::UnexpectedEof, "reply cut short").into();
/// assert!(!is_not_sent(&*sent));
/// ```
pub struct NotSent {
    inner: BoxError,
}

impl NotSent {
    /// Marks `error` as happening before the request was sent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        NotSent {
            inner: error.into(),
        }
    }

    /// The original error.
    pub fn inner(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.inner
    }

    /// Takes the original error back.
    pub fn into_inner(self) -> BoxError {
        self.inner
    }
}

impl fmt::Debug for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NotSent").field(&self.inner).finish()
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request not sent: {}", self.inner)
    }
}

impl Error for NotSent {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.inner)
    }
}

/// The first error of type `E` in `error`'s chain (itself, then its
/// [`source`](Error::source)s): how to reach a crate's named error through wrappers
/// such as [`NotSent`].
pub fn find<'a, E: Error + 'static>(error: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// Whether `error`, or an error in its chain, is marked [`NotSent`].
pub fn is_not_sent(error: &(dyn Error + 'static)) -> bool {
    find::<NotSent>(error).is_some()
}
