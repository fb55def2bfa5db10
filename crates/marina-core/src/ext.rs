use std::fmt;

pub use http::Extensions;

/// Request (or response) types that carry [`http::Extensions`]: where marina's layers
/// leave typed values for each other — the [`RouteHint`](crate::RouteHint) the affinity
/// layer writes and the balancer reads, the client's [`PeerAddr`](crate::PeerAddr), a
/// new session's id.
///
/// Implemented for `http::Request<B>` and `http::Response<B>`, and for marina's own
/// [`Request<T>`] and [`Response<T>`] wrappers, which give raw protocols (a line
/// protocol, a binary framing) the same slot.
pub trait HasExtensions {
    /// The extensions.
    fn extensions(&self) -> &Extensions;
    /// The extensions, mutably.
    fn extensions_mut(&mut self) -> &mut Extensions;
}

impl<B> HasExtensions for http::Request<B> {
    fn extensions(&self) -> &Extensions {
        http::Request::extensions(self)
    }
    fn extensions_mut(&mut self) -> &mut Extensions {
        http::Request::extensions_mut(self)
    }
}

impl<B> HasExtensions for http::Response<B> {
    fn extensions(&self) -> &Extensions {
        http::Response::extensions(self)
    }
    fn extensions_mut(&mut self) -> &mut Extensions {
        http::Response::extensions_mut(self)
    }
}

/// A request of any protocol with extensions: the body (a line, a frame, a command)
/// and typed values for marina's layers.
///
/// ```
/// use marina_core::{HasExtensions, Request, RouteHint};
///
/// let mut req = Request::new("PING".to_string());
/// req.extensions_mut().insert(RouteHint::hash(7));
/// assert!(req.extensions().get::<RouteHint>().is_some());
/// assert_eq!(req.into_body(), "PING");
/// ```
#[derive(Default)]
pub struct Request<T> {
    /// The payload.
    pub body: T,
    /// Typed values for the layers.
    pub extensions: Extensions,
}

impl<T> Request<T> {
    /// A request with no extensions.
    pub fn new(body: T) -> Self {
        Request {
            body,
            extensions: Extensions::new(),
        }
    }

    /// The payload, extensions dropped.
    pub fn into_body(self) -> T {
        self.body
    }

    /// Maps the payload, keeping the extensions.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Request<U> {
        Request {
            body: f(self.body),
            extensions: self.extensions,
        }
    }
}

/// Clones the body; extensions are not `Clone` and the copy gets none, except the
/// [`RouteHint`](crate::RouteHint), [`PeerAddr`](crate::PeerAddr) and
/// [`Idempotent`](crate::Idempotent) marker, which it keeps (so a balancer's failover
/// copy routes, and is retried, like the original).
impl<T: Clone> Clone for Request<T> {
    fn clone(&self) -> Self {
        let mut extensions = Extensions::new();
        if let Some(h) = self.extensions.get::<crate::RouteHint>() {
            extensions.insert(h.clone());
        }
        if let Some(p) = self.extensions.get::<crate::PeerAddr>() {
            extensions.insert(*p);
        }
        if self.extensions.get::<crate::Idempotent>().is_some() {
            extensions.insert(crate::Idempotent);
        }
        Request {
            body: self.body.clone(),
            extensions,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("body", &self.body)
            .field("extensions", &self.extensions.len())
            .finish()
    }
}

impl<T> HasExtensions for Request<T> {
    fn extensions(&self) -> &Extensions {
        &self.extensions
    }
    fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }
}

/// A response of any protocol with extensions (where the affinity layer reports a new
/// session, for one).
#[derive(Default)]
pub struct Response<T> {
    /// The payload.
    pub body: T,
    /// Typed values from the layers.
    pub extensions: Extensions,
}

impl<T> Response<T> {
    /// A response with no extensions.
    pub fn new(body: T) -> Self {
        Response {
            body,
            extensions: Extensions::new(),
        }
    }

    /// The payload, extensions dropped.
    pub fn into_body(self) -> T {
        self.body
    }
}

impl<T: fmt::Debug> fmt::Debug for Response<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("body", &self.body)
            .field("extensions", &self.extensions.len())
            .finish()
    }
}

impl<T> HasExtensions for Response<T> {
    fn extensions(&self) -> &Extensions {
        &self.extensions
    }
    fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }
}
