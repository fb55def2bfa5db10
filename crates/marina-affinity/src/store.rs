//! `SessionStore`: where sticky sessions live when they must outlive one instance.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use marina_core::{BoxError, EndpointId};

/// The future of a [`SessionStore`] lookup that has to ask the shared store.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;

/// What a [`SessionStore`] knows of a session when asked.
pub enum Lookup {
    /// Pinned to this endpoint, known without waiting (the store's local cache).
    Pinned(EndpointId),
    /// No such session, known without waiting: the request starts one.
    Absent,
    /// The store has to ask its shared backend: the future resolves to the session's
    /// endpoint, `None` for no session, or an error when the store cannot tell (its
    /// backend is down and its fallback says to fail).
    Fetch(StoreFuture<Option<EndpointId>>),
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lookup::Pinned(ep) => f.debug_tuple("Pinned").field(ep).finish(),
            Lookup::Absent => f.write_str("Absent"),
            Lookup::Fetch(_) => f.write_str("Fetch(..)"),
        }
    }
}

/// A table of sticky sessions (session key → endpoint) that several client instances
/// can share, so that a session pinned through one instance is routed to the same
/// backend through any other, and outlives the instance that created it.
///
/// The sticky [`AffinityLayer`](crate::AffinityLayer) keeps its table in this
/// instance's memory; a store keeps it elsewhere (marina-redis's `RedisSessionStore`
/// keeps it in Redis, with a short-lived local cache in front). The layer asks the
/// store on the request path, so the methods are built for it:
///
/// - [`lookup`](Self::lookup) answers at once when it can ([`Lookup::Pinned`],
///   [`Lookup::Absent`]: no allocation, no wait), and returns a future only when it
///   must ask its backend ([`Lookup::Fetch`]).
/// - [`pin`](Self::pin) and [`end_session`](Self::end_session) never wait: the store
///   updates what it answers from at once and writes to its backend in the
///   background.
///
/// A session's idle expiry is the store's: each lookup that reaches the backend
/// refreshes it.
///
/// # Cancel safety
///
/// A [`Lookup::Fetch`] future is dropped whenever its request is (a client gone, a
/// deadline): it must leave nothing half-done that a later lookup would trip on. A
/// read is safe to drop at any point.
///
/// # Examples
///
/// A store in one process's memory (what the sticky table already does, so only a
/// sketch of the contract):
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use marina_affinity::{Lookup, SessionStore};
/// use marina_core::EndpointId;
///
/// #[derive(Default)]
/// struct Memory(Mutex<HashMap<String, EndpointId>>);
///
/// impl SessionStore for Memory {
///     fn lookup(&self, key: &str) -> Lookup {
///         match self.0.lock().unwrap().get(key) {
///             Some(&ep) => Lookup::Pinned(ep),
///             None => Lookup::Absent,
///         }
///     }
///     fn pin(&self, key: &str, endpoint: EndpointId, _previous: Option<EndpointId>) {
///         self.0.lock().unwrap().insert(key.to_owned(), endpoint);
///     }
///     fn end_session(&self, key: &str) {
///         self.0.lock().unwrap().remove(key);
///     }
/// }
///
/// let store = Memory::default();
/// assert!(matches!(store.lookup("alice"), Lookup::Absent));
/// store.pin("alice", EndpointId(7), None);
/// assert!(matches!(store.lookup("alice"), Lookup::Pinned(EndpointId(7))));
/// ```
pub trait SessionStore: Send + Sync + 'static {
    /// The endpoint session `key` is pinned to: at once when known locally, or a
    /// future that asks the shared store.
    fn lookup(&self, key: &str) -> Lookup;

    /// Pins session `key` to `endpoint`, where the balancer sent its request:
    /// `previous` is the endpoint the lookup returned (`None` for a new session). A
    /// store shared by instances may keep another instance's pin when two raced for
    /// a new session, or when the session moved meanwhile; later lookups return the
    /// pin it kept. Never waits.
    fn pin(&self, key: &str, endpoint: EndpointId, previous: Option<EndpointId>);

    /// Ends session `key`. Never waits.
    fn end_session(&self, key: &str);
}

impl<T: SessionStore + ?Sized> SessionStore for Arc<T> {
    fn lookup(&self, key: &str) -> Lookup {
        (**self).lookup(key)
    }

    fn pin(&self, key: &str, endpoint: EndpointId, previous: Option<EndpointId>) {
        (**self).pin(key, endpoint, previous)
    }

    fn end_session(&self, key: &str) {
        (**self).end_session(key)
    }
}

impl<T: SessionStore + ?Sized> SessionStore for Box<T> {
    fn lookup(&self, key: &str) -> Lookup {
        (**self).lookup(key)
    }

    fn pin(&self, key: &str, endpoint: EndpointId, previous: Option<EndpointId>) {
        (**self).pin(key, endpoint, previous)
    }

    fn end_session(&self, key: &str) {
        (**self).end_session(key)
    }
}
