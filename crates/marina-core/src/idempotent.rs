use crate::HasExtensions;

/// Marks a request as **idempotent**: sending it twice has the same effect as sending
/// it once (a read, a `PUT` of a whole value, a delete by key, a write carrying its own
/// idempotency key), so a balancer may send it again after it may already have
/// reached a backend.
///
/// A request without the marker is only ever re-sent when its endpoint proved it was
/// never sent (an error marked [`NotSent`](crate::NotSent)). With the marker, and only
/// where the balancer is told to read it (marina-balance's
/// `Balance::idempotent_from_extensions`), it may also be retried on another endpoint
/// after an error or a timeout that came after sending, and hedged (a second copy sent
/// to another endpoint when the first is slow, the first reply taken). Nothing marks a
/// request idempotent by default: the caller, who knows what the request does, puts
/// the marker in its extensions.
///
/// It travels in the request's [`Extensions`](crate::Extensions) (see
/// [`HasExtensions`]); [`Request`](crate::Request)'s `Clone` keeps it, so every copy a
/// balancer sends carries it too.
///
/// ```
/// use marina_core::{HasExtensions, Idempotent, Request};
///
/// let mut get = Request::new("GET /users/7");
/// assert!(!Idempotent::is_marked(&get));
/// Idempotent::mark(&mut get);
/// assert!(Idempotent::is_marked(&get));
/// assert!(Idempotent::is_marked(&get.clone()), "copies keep the marker");
///
/// // The same with an `http::Request`:
/// let mut req = http::Request::get("/users/7").body(()).unwrap();
/// req.extensions_mut().insert(Idempotent);
/// assert!(Idempotent::is_marked(&req));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Idempotent;

impl Idempotent {
    /// Whether `request` carries the marker.
    pub fn is_marked<R: HasExtensions + ?Sized>(request: &R) -> bool {
        request.extensions().get::<Idempotent>().is_some()
    }

    /// Puts the marker in `request`'s extensions.
    pub fn mark<R: HasExtensions + ?Sized>(request: &mut R) {
        request.extensions_mut().insert(Idempotent);
    }
}
