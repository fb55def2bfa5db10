//! `SharedSessionLayer`: sticky sessions through a [`SessionStore`], the route written
//! as a `RouteHint` for the balancer under it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};

use marina_affinity::{Lookup, NewSession, SessionStore, StoreFuture, new_session_id};
use marina_core::{BoxError, EndpointId, HasExtensions, KeyExtractor, RouteHint, after_completion};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// Sticky sessions kept in a [`SessionStore`] shared by a fleet (a
/// [`RedisSessionStore`](crate::RedisSessionStore)): marina-affinity's sticky
/// [`AffinityLayer`](marina_affinity::AffinityLayer) with its table in the store
/// instead of this instance's memory.
///
/// Same wiring as the sticky layer: a key extractor reads the session key, the layer
/// writes a [`RouteHint`] into the request's extensions, and the balancer under it
/// (marina-balance's `Balance` built with `.route_hints_from_extensions()`) routes by
/// it and reports the endpoint it chose; the layer pins new sessions there, and
/// re-pins a session whose endpoint was unavailable (or, with
/// [`strict`](Self::strict), fails it with `PinnedEndpointUnavailable`). Endpoint ids
/// are stable hashes of the discovery keys, the same on every instance.
///
/// A lookup the store answers from its cache costs nothing more than the sticky
/// table's; one it must ask Redis about waits for that call (bounded by the fleet's
/// call timeout) in the response future, so the inner service must be `Clone`. Pins
/// are written in the background. Each request copies its key once (for the pin after
/// the response).
///
/// # Examples
///
/// ```no_run
/// use marina_balance::{Balance, RoundRobin};
/// use marina_core::{HeaderKey, Response};
/// use marina_redis::{RedisFleet, RedisSessionStore, SessionConfig, SharedSessionLayer};
/// use tower::{Layer, Service, ServiceExt, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let fleet = RedisFleet::open("redis://127.0.0.1:6379")?;
/// let store = RedisSessionStore::new(&fleet, "web", SessionConfig::default());
/// let backends = (0..3).map(|n| {
///     service_fn(move |_req: http::Request<()>| async move {
///         Ok::<_, std::io::Error>(http::Response::new(n))
///     })
/// });
/// let balance = Balance::from_services(backends, RoundRobin::new())
///     .route_hints_from_extensions()
///     .shared();
/// let mut svc = SharedSessionLayer::new(HeaderKey::new("x-session"), store).layer(balance);
/// let req = http::Request::builder().header("x-session", "s-1").body(())?;
/// let backend = *svc.ready().await?.call(req).await?.body();
/// // Any instance of the fleet now routes session s-1 to `backend`.
/// # Ok(()) }
/// ```
pub struct SharedSessionLayer<X> {
    extractor: Arc<X>,
    store: Arc<dyn SessionStore>,
    strict: bool,
    new_sessions: bool,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    created: AtomicU64,
    repinned: AtomicU64,
    unrouted: AtomicU64,
}

impl<X> Clone for SharedSessionLayer<X> {
    fn clone(&self) -> Self {
        SharedSessionLayer {
            extractor: self.extractor.clone(),
            store: self.store.clone(),
            strict: self.strict,
            new_sessions: self.new_sessions,
            counters: self.counters.clone(),
        }
    }
}

impl<X> fmt::Debug for SharedSessionLayer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSessionLayer")
            .field("strict", &self.strict)
            .field("new_sessions", &self.new_sessions)
            .finish_non_exhaustive()
    }
}

/// A [`SharedSessionLayer`]'s figures on this instance, from
/// [`SharedSessionLayer::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedSessionStats {
    /// Sessions pinned for the first time through this instance.
    pub created: u64,
    /// Sessions moved to another endpoint because theirs was unavailable.
    pub repinned: u64,
    /// Requests that completed with a route hint no balancer read (the layer is not
    /// over a balancer that reads hints: nothing is pinned).
    pub unrouted: u64,
}

impl<X> SharedSessionLayer<X> {
    /// Sessions keyed by what `extractor` reads, pinned in `store`.
    pub fn new(extractor: X, store: impl SessionStore) -> Self {
        SharedSessionLayer {
            extractor: Arc::new(extractor),
            store: Arc::new(store),
            strict: false,
            new_sessions: false,
            counters: Arc::default(),
        }
    }

    /// Fail requests whose pinned endpoint is unavailable instead of re-pinning.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Create a session for requests without a key: a 256-bit id from the OS CSPRNG,
    /// returned in the response's extensions as [`NewSession`].
    pub fn new_sessions(mut self, create: bool) -> Self {
        self.new_sessions = create;
        self
    }

    /// The counters (shared by the layer's clones and services).
    pub fn stats(&self) -> SharedSessionStats {
        let c = &self.counters;
        SharedSessionStats {
            created: c.created.load(Relaxed),
            repinned: c.repinned.load(Relaxed),
            unrouted: c.unrouted.load(Relaxed),
        }
    }
}

impl<S, X> Layer<S> for SharedSessionLayer<X> {
    type Service = SharedSession<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        SharedSession {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of a [`SharedSessionLayer`].
///
/// # Sharing
///
/// `Clone` when the inner service is: clones share the layer's store and counters; a
/// marina-balance `Balance` is not `Clone`, build it with `.shared()` under the layer.
pub struct SharedSession<S, X> {
    inner: S,
    layer: SharedSessionLayer<X>,
}

impl<S: Clone, X> Clone for SharedSession<S, X> {
    fn clone(&self) -> Self {
        SharedSession {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, X> fmt::Debug for SharedSession<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSession")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, X> SharedSession<S, X> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What the response future does for the session.
struct Session {
    key: Arc<str>,
    /// Where the store has it pinned (`None`: a new session).
    pinned: Option<EndpointId>,
    /// Created here for a request without a key (returned as [`NewSession`]).
    issued: bool,
    store: Arc<dyn SessionStore>,
    counters: Arc<Counters>,
    strict: bool,
}

impl Session {
    fn hint(&self) -> RouteHint {
        match self.pinned {
            Some(ep) if self.strict => RouteHint::endpoint(ep).strict(),
            Some(ep) => RouteHint::endpoint(ep),
            None => RouteHint::any(),
        }
    }

    /// The response is back: pin where the balancer sent it.
    fn settle<R: HasExtensions>(self, chosen: Option<EndpointId>, resp: &mut R) {
        let Some(chosen) = chosen else {
            self.counters.unrouted.fetch_add(1, Relaxed);
            return;
        };
        match self.pinned {
            Some(p) if p == chosen => {}
            Some(p) => {
                tracing::debug!(session = %self.key, from = ?p, to = ?chosen, "shared session re-pinned");
                self.counters.repinned.fetch_add(1, Relaxed);
                self.store.pin(&self.key, chosen, Some(p));
            }
            None => {
                self.counters.created.fetch_add(1, Relaxed);
                self.store.pin(&self.key, chosen, None);
            }
        }
        if self.issued {
            resp.extensions_mut()
                .insert(NewSession(self.key.to_string()));
        }
    }
}

impl<S, X, Req> Service<Req> for SharedSession<S, X>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    S::Response: HasExtensions,
    X: KeyExtractor<Req>,
    Req: HasExtensions,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = SessionFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let l = &self.layer;
        let found = l
            .extractor
            .with_key(&req, |k| (Arc::<str>::from(k), l.store.lookup(k)));
        let (key, lookup, issued) = match found {
            Some((key, lookup)) => (key, lookup, false),
            None if l.new_sessions => (Arc::from(new_session_id()), Lookup::Absent, true),
            None => return SessionFuture::call(self.inner.call(req), None, None),
        };
        let session = |pinned| Session {
            key,
            pinned,
            issued,
            store: l.store.clone(),
            counters: l.counters.clone(),
            strict: l.strict,
        };
        match lookup {
            Lookup::Pinned(ep) => self.send(req, session(Some(ep))),
            Lookup::Absent => self.send(req, session(None)),
            Lookup::Fetch(fetch) => {
                let session = session(None);
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                SessionFuture {
                    state: State::Fetching {
                        fetch,
                        svc: Some(svc),
                        req: Some(req),
                        session: Some(session),
                    },
                }
            }
        }
    }
}

impl<S, X> SharedSession<S, X> {
    fn send<Req>(&mut self, mut req: Req, session: Session) -> SessionFuture<S, Req>
    where
        S: Service<Req>,
        Req: HasExtensions,
    {
        let hint = session.hint();
        req.extensions_mut().insert(hint.clone());
        SessionFuture::call(self.inner.call(req), Some(hint), Some(session))
    }
}

pin_project! {
    /// The future of [`SharedSession`]'s calls: the store's answer when it has to ask
    /// Redis, the inner response, then the session's pin.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while the store asks Redis drops the request unsent. Dropping it
    /// later cancels the inner request; a session it would have pinned is not pinned.
    pub struct SessionFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Fetching {
            fetch: StoreFuture<Option<EndpointId>>,
            svc: Option<S>,
            req: Option<Req>,
            session: Option<Session>,
        },
        Call {
            #[pin]
            fut: S::Future,
            hint: Option<RouteHint>,
            session: Option<Session>,
        },
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> SessionFuture<S, Req> {
    fn call(fut: S::Future, hint: Option<RouteHint>, session: Option<Session>) -> Self {
        SessionFuture {
            state: State::Call { fut, hint, session },
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for SessionFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for SessionFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: HasExtensions,
    Req: HasExtensions,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Call { fut, hint, session } => {
                    let out = ready!(fut.poll(cx));
                    let (hint, session) = (hint.take(), session.take());
                    state.set(State::Failed { error: None });
                    let mut resp = out.map_err(Into::into)?;
                    if let Some(session) = session {
                        let chosen = hint.as_ref().and_then(RouteHint::chosen);
                        session.settle(chosen, &mut resp);
                    }
                    return Poll::Ready(Ok(resp));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(after_completion(error)));
                }
                StateProj::Fetching {
                    fetch,
                    svc,
                    req,
                    session,
                } => match ready!(fetch.as_mut().poll(cx)) {
                    Err(e) => State::Failed { error: Some(e) },
                    Ok(pinned) => match (svc.take(), req.take(), session.take()) {
                        (Some(mut svc), Some(mut req), Some(mut session)) => {
                            session.pinned = pinned;
                            let hint = session.hint();
                            req.extensions_mut().insert(hint.clone());
                            State::Call {
                                fut: svc.call(req),
                                hint: Some(hint),
                                session: Some(session),
                            }
                        }
                        _ => State::Failed { error: None },
                    },
                },
            };
            state.set(next);
        }
    }
}
