use std::any::Any;
use std::error::Error;
use std::fmt;
use std::sync::Mutex;

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
///
/// An endpoint that still holds the unsent request can give it back with
/// [`with_request`](Self::with_request): a balancer can then fail it over without
/// having copied it first, so requests that are not `Clone` (an `http::Request` with a
/// streaming body, a tonic request) fail over too.
///
/// ```
/// use marina_core::{BoxError, NotSent, take_unsent_request};
/// use std::io;
///
/// struct Upload(Vec<u8>); // not Clone
///
/// let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "connect refused");
/// let err: BoxError = NotSent::with_request(refused, Upload(vec![1, 2, 3])).into();
/// let back: Upload = take_unsent_request(&*err).expect("given back");
/// assert_eq!(back.0, [1, 2, 3]);
/// assert!(take_unsent_request::<Upload>(&*err).is_none()); // taken once
/// ```
pub struct NotSent {
    inner: BoxError,
    request: Option<Mutex<Option<Box<dyn Any + Send>>>>,
}

impl NotSent {
    /// Marks `error` as happening before the request was sent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        NotSent {
            inner: error.into(),
            request: None,
        }
    }

    /// Marks `error` as happening before `request` was sent, and gives the request
    /// back with it (see [`take_request`](Self::take_request)).
    pub fn with_request<R: Send + 'static>(error: impl Into<BoxError>, request: R) -> Self {
        NotSent {
            inner: error.into(),
            request: Some(Mutex::new(Some(Box::new(request)))),
        }
    }

    /// Takes the request given back with the error, if there is one of type `R` and
    /// nobody took it yet.
    pub fn take_request<R: 'static>(&self) -> Option<R> {
        let slot = self.request.as_ref()?;
        let mut slot = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|r| r.is::<R>()) {
            return None;
        }
        slot.take()?.downcast::<R>().ok().map(|r| *r)
    }

    /// Reads the request given back with the error, if there is one of type `R` and
    /// nobody took it yet, without taking it.
    ///
    /// ```
    /// use marina_core::NotSent;
    /// let err = NotSent::with_request("refused", String::from("GET /"));
    /// assert_eq!(err.inspect_request(|r: &String| r.len()), Some(5));
    /// assert_eq!(err.take_request::<String>().as_deref(), Some("GET /"));
    /// assert_eq!(err.inspect_request(|r: &String| r.len()), None);
    /// ```
    pub fn inspect_request<R: 'static, T>(&self, f: impl FnOnce(&R) -> T) -> Option<T> {
        let slot = self.request.as_ref()?;
        let slot = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref()?.downcast_ref::<R>().map(f)
    }

    /// Whether a request was given back with the error and is still there.
    pub fn has_request(&self) -> bool {
        self.request.as_ref().is_some_and(|slot| {
            slot.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some()
        })
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
        f.debug_struct("NotSent")
            .field("inner", &self.inner)
            .field("request_given_back", &self.has_request())
            .finish()
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

/// Takes the request given back by the first [`NotSent`] in `error`'s chain (see
/// [`NotSent::with_request`]), if it is of type `R` and still there.
pub fn take_unsent_request<R: 'static>(error: &(dyn Error + 'static)) -> Option<R> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(n) = e.downcast_ref::<NotSent>()
            && let Some(r) = n.take_request::<R>()
        {
            return Some(r);
        }
        cur = e.source();
    }
    None
}
