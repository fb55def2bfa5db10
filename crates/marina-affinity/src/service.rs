//! `Affinity<S, X>`: pins each request's session to an endpoint through a `RouteHint`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use marina_core::{
    BoxError, EndpointId, HasExtensions, KeyExtractor, PolledAfterCompletion, RouteHint,
    stable_hash,
};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::session::new_session_id;
use crate::table::{Counters, HINTS_UNREAD, Inserted, SeenPin, SessionInfo, Table, TableConfig};
use crate::token::TokenCodec;

/// A new session was refused: the sticky table is full and set to
/// [`WhenFull::Refuse`](crate::WhenFull::Refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTableFull {
    /// The table's capacity.
    pub max_sessions: usize,
}

impl fmt::Display for SessionTableFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "session table full ({} sessions): new session refused",
            self.max_sessions
        )
    }
}

impl std::error::Error for SessionTableFull {}

/// In a response's extensions: the layer created a session for a request that had
/// none. Send the id back to the client (a cookie, a header, a field of your protocol)
/// so its next requests carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession(pub String);

/// In a response's extensions (token mode): the token the client should carry from
/// now on — new, re-pinned after a failover, or refreshed before it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken(pub String);

#[derive(Clone)]
enum Mode {
    Table(Arc<Table>),
    Token(TokenCodec),
    Hash,
}

/// Adds [`Affinity`] around a service (a balancer, usually).
///
/// Three modes, by constructor:
///
/// - [`sticky`](Self::sticky): a bounded table of session key → endpoint, with idle
///   expiry, refreshed on use (HAProxy's stick tables).
/// - [`token`](Self::token): no state; the client carries a signed
///   `{endpoint, expiry}` token ([`TokenCodec`]), so any number of instances share
///   sessions.
/// - [`hash`](Self::hash): no state; the key's hash is the route, and the balancer's
///   `ConsistentHash` picker maps it (IP hash, user hash).
///
/// When the pinned endpoint is not ready or gone, the balancer chooses another and the
/// layer re-pins the session there (the table entry or a new token); with
/// [`strict`](Self::strict) the request fails with
/// [`PinnedEndpointUnavailable`](marina_core::PinnedEndpointUnavailable) instead.
///
/// In table mode the pin is written when a response comes back, as a compare-and-set
/// against the pin its request saw when it was routed: when several requests of one
/// session are in flight, the first answer pins (or re-pins) the session and the
/// others leave that pin alone (HAProxy's stick tables keep the first server stored
/// the same way). Two first requests of a new session routed to two endpoints pin it
/// once, where the first answer came from; a failure with several requests in flight
/// moves the session once, counted once in [`AffinityStats::repinned`].
///
/// A pinned request's hint carries a failover key that tells its session apart
/// ([`RouteHint::with_failover_key`]): when the pinned endpoint fails under a request
/// and a balancer with failover sends it elsewhere, the session's requests failing
/// over together all go to one endpoint, the one the session moves to, while the
/// sessions of a dead endpoint spread over the survivors.
///
/// Requests must carry extensions ([`HasExtensions`]: `http::Request`,
/// `marina_core::Request`) and so must responses (where [`NewSession`] and
/// [`IssuedToken`] go).
///
/// # Wiring: the balancer must read the hints
///
/// The layer only *asks*: it puts a [`RouteHint`] in each request's extensions, and the
/// balancer under it must read that hint, route by it, and report the endpoint it chose
/// back through it. marina-balance's `Balance` does so only when built with
/// `.route_hints_from_extensions()` (or `.route_hint(..)` with a function that finds the
/// hint); `marina::Stack` wires this itself. A balancer that ignores the hints
/// (marina-balance's without that call, tower's `p2c`, a plain service) compiles and
/// serves every request, but no session is ever pinned: requests spread over all
/// backends, and the table stays empty.
///
/// The layer notices: when the first 8 requests that carried a hint complete without a
/// choice reported through it (and none ever was), it logs one `tracing` warning
/// naming the fix and sets [`AffinityStats::hint_unread`];
/// [`AffinityStats::unrouted`] counts every such request. On a correctly wired stack
/// the check is one relaxed atomic load per request.
///
/// ```
/// use marina_affinity::{AffinityLayer, TableConfig};
/// use marina_balance::{Balance, RoundRobin};
/// use marina_core::{Request, Response};
/// use tower::{Layer, Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let backends = (0..3).map(|n| {
///     service_fn(move |_req: Request<&'static str>| async move {
///         Ok::<_, std::io::Error>(Response::new(n))
///     })
/// });
/// // Mis-wired: this balancer never reads route hints.
/// let balance = Balance::from_services(backends, RoundRobin::new());
/// let user = |req: &Request<&'static str>| Some(req.body.to_string());
/// let layer = AffinityLayer::sticky(user, TableConfig::default());
/// let handle = layer.handle();
/// let mut svc = layer.layer(balance);
/// for _ in 0..8 {
///     svc.ready().await?.call(Request::new("alice")).await?;
/// }
/// let stats = handle.stats();
/// assert!(stats.hint_unread); // and a warning was logged
/// assert_eq!((stats.sessions, stats.unrouted), (0, 8));
/// # Ok(()) }
/// ```
///
/// See the [crate docs](crate) for correctly wired examples.
pub struct AffinityLayer<X> {
    extractor: Arc<X>,
    mode: Mode,
    strict: bool,
    new_sessions: bool,
    counters: Arc<Counters>,
}

impl<X> Clone for AffinityLayer<X> {
    fn clone(&self) -> Self {
        AffinityLayer {
            extractor: self.extractor.clone(),
            mode: self.mode.clone(),
            strict: self.strict,
            new_sessions: self.new_sessions,
            counters: self.counters.clone(),
        }
    }
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Table(_) => "sticky table",
            Mode::Token(_) => "signed token",
            Mode::Hash => "consistent hash",
        }
    }
}

impl<X> fmt::Debug for AffinityLayer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AffinityLayer")
            .field("mode", &self.mode.name())
            .field("strict", &self.strict)
            .field("new_sessions", &self.new_sessions)
            .finish()
    }
}

impl<X> AffinityLayer<X> {
    fn with_mode(extractor: X, mode: Mode, counters: Arc<Counters>) -> Self {
        AffinityLayer {
            extractor: Arc::new(extractor),
            mode,
            strict: false,
            new_sessions: false,
            counters,
        }
    }

    /// Sticky-table mode: sessions keyed by what `extractor` reads. Starts the table's
    /// sweep task on the current tokio runtime, if any (it ends when the last clone of
    /// the layer and its services is dropped).
    pub fn sticky(extractor: X, config: TableConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let table = Table::new(config, counters.clone());
        Self::with_mode(extractor, Mode::Table(table), counters)
    }

    /// Signed-token mode: `extractor` reads the token the client carries (a cookie, a
    /// header); `codec` checks and issues them.
    pub fn token(extractor: X, codec: TokenCodec) -> Self {
        Self::with_mode(extractor, Mode::Token(codec), Arc::default())
    }

    /// Consistent-hash mode: the key's hash becomes the route.
    pub fn hash(extractor: X) -> Self {
        Self::with_mode(extractor, Mode::Hash, Arc::default())
    }

    /// Fail requests whose pinned endpoint is unavailable instead of re-pinning.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Create a session for requests without a key: a 256-bit id from the OS CSPRNG,
    /// hex-encoded, returned in the response's extensions as [`NewSession`] (in token
    /// mode the new token, as [`IssuedToken`], is the session).
    pub fn new_sessions(mut self, create: bool) -> Self {
        self.new_sessions = create;
        self
    }

    /// The handle to the layer's sessions and counters.
    pub fn handle(&self) -> AffinityHandle {
        AffinityHandle {
            table: match &self.mode {
                Mode::Table(t) => Some(t.clone()),
                _ => None,
            },
            counters: self.counters.clone(),
        }
    }
}

impl<S, X> Layer<S> for AffinityLayer<X> {
    type Service = Affinity<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        Affinity {
            inner,
            layer: self.clone(),
        }
    }
}

/// The affinity layer's sessions and counters, readable from anywhere.
#[derive(Clone)]
pub struct AffinityHandle {
    table: Option<Arc<Table>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for AffinityHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AffinityHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The affinity layer's figures, from [`AffinityHandle::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AffinityStats {
    /// Sessions in the table now (0 in token and hash modes: they keep no state).
    pub sessions: usize,
    /// Sessions created: pinned for the first time, or issued a first token.
    pub created: u64,
    /// Sessions moved to another endpoint because theirs was unavailable.
    pub repinned: u64,
    /// Sessions forgotten after their idle timeout.
    pub expired: u64,
    /// Sessions forgotten to make room for new ones (table full).
    pub purged: u64,
    /// New sessions refused (table full, set to refuse).
    pub refused: u64,
    /// Tokens that did not check out (forged, expired, garbled) and were replaced.
    pub rejected_tokens: u64,
    /// Requests that completed with a route hint no balancer read: the service under
    /// the layer never reported a choice through it, so the request went wherever that
    /// service sent it. Stays 0 when the layer sits over a balancer that reads hints
    /// (see [`AffinityLayer`]'s "Wiring"); it also counts requests that a service
    /// between the two answered without calling the balancer.
    pub unrouted: u64,
    /// The layer is mis-wired: the first requests' hints all went unread
    /// ([`unrouted`](Self::unrouted) reached 8) and no balancer has read one since the
    /// layer was built. The layer logged one `tracing` warning when this turned true.
    /// It turns false again as soon as a balancer reports a choice.
    pub hint_unread: bool,
}

/// One line for people: the sessions held, then the counts since the layer was built.
///
/// ```
/// # use marina_affinity::{AffinityLayer, TableConfig};
/// # use marina_core::Request;
/// let layer = AffinityLayer::sticky(|_: &Request<()>| None::<String>, TableConfig::default());
/// assert_eq!(
///     layer.handle().stats().to_string(),
///     "0 sessions; created 0, re-pinned 0, expired 0, purged 0, refused 0",
/// );
/// ```
impl fmt::Display for AffinityStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.sessions == 1 { "" } else { "s" };
        write!(
            f,
            "{} session{plural}; created {}, re-pinned {}, expired {}, purged {}, refused {}",
            self.sessions, self.created, self.repinned, self.expired, self.purged, self.refused
        )?;
        if self.rejected_tokens > 0 {
            write!(f, ", tokens rejected {}", self.rejected_tokens)?;
        }
        if self.unrouted > 0 {
            write!(f, ", unrouted {}", self.unrouted)?;
        }
        if self.hint_unread {
            f.write_str(" (not wired: no balancer reads the route hints)")?;
        }
        Ok(())
    }
}

impl AffinityHandle {
    /// The counters and the table's size.
    pub fn stats(&self) -> AffinityStats {
        let c = &self.counters;
        AffinityStats {
            sessions: self.table.as_ref().map_or(0, |t| t.len()),
            created: c.created.load(Relaxed),
            repinned: c.repinned.load(Relaxed),
            expired: c.expired.load(Relaxed),
            purged: c.purged.load(Relaxed),
            refused: c.refused.load(Relaxed),
            rejected_tokens: c.rejected_tokens.load(Relaxed),
            unrouted: c.unrouted.load(Relaxed),
            hint_unread: c.hints.load(Relaxed) == HINTS_UNREAD,
        }
    }

    /// Up to `limit` sessions of the table, most recently used first (none in token
    /// and hash modes).
    pub fn sessions(&self, limit: usize) -> Vec<SessionInfo> {
        self.table.as_ref().map_or_else(Vec::new, |t| t.list(limit))
    }

    /// The endpoint a session is pinned to (touching it, like a request would).
    pub fn pinned(&self, key: &str) -> Option<EndpointId> {
        self.table.as_ref()?.get(key)
    }

    /// Ends a session (table mode); true if it existed.
    pub fn end_session(&self, key: &str) -> bool {
        self.table.as_ref().is_some_and(|t| t.remove(key))
    }

    /// Drops the idle sessions now, as the background sweep does; returns how many.
    pub fn sweep(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.sweep())
    }
}

/// Pins each request's session to an endpoint; see [`AffinityLayer`].
///
/// # Sharing
///
/// `Clone` when the inner service is. Clones share the layer's state — the sticky
/// table, the token codec, the counters behind [`AffinityHandle`] — as do all the
/// services one [`AffinityLayer`] made; each clone calls its own clone of the inner
/// service. A marina-balance `Balance` is not `Clone`: build it with `.shared()` under
/// the layer, and the `Affinity` over it is one to clone into each task.
///
/// ```
/// use marina_affinity::{AffinityLayer, TableConfig};
/// use marina_balance::{Balance, RoundRobin};
/// use marina_core::{Request, Response};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let backends = (0..3).map(|n| {
///     service_fn(move |_req: Request<&'static str>| async move {
///         Ok::<_, std::io::Error>(Response::new(n))
///     })
/// });
/// let balance = Balance::from_services(backends, RoundRobin::new())
///     .route_hints_from_extensions()
///     .shared();
/// let user = |req: &Request<&'static str>| Some(req.body.to_string());
/// let svc = AffinityLayer::sticky(user, TableConfig::default()).layer(balance);
///
/// // alice's first request pins her session...
/// let pinned = svc.clone().oneshot(Request::new("alice")).await?.body;
/// // ...and every clone, in any task, sees the same table and balancer.
/// let mut tasks = Vec::new();
/// for _ in 0..4 {
///     let svc = svc.clone();
///     tasks.push(tokio::spawn(svc.oneshot(Request::new("alice"))));
/// }
/// for task in tasks {
///     assert_eq!(task.await??.body, pinned);
/// }
/// # Ok(()) }
/// ```
pub struct Affinity<S, X> {
    inner: S,
    layer: AffinityLayer<X>,
}

impl<S: Clone, X> Clone for Affinity<S, X> {
    fn clone(&self) -> Self {
        Affinity {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, X> fmt::Debug for Affinity<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Affinity")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, X> Affinity<S, X> {
    /// The handle to the sessions and counters.
    pub fn handle(&self) -> AffinityHandle {
        self.layer.handle()
    }

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

/// Token mode's work when the response comes back.
struct TokenAfter {
    codec: TokenCodec,
    valid: Option<crate::token::Token>,
}

/// What to do when the response comes back.
enum After {
    Nothing,
    /// Table mode: pin `key` to the chosen endpoint (new, or re-pin from `pinned`, the
    /// pin the request saw when it was routed: compare-and-set).
    Pin {
        key: Arc<str>,
        pinned: Option<SeenPin>,
        new: bool,
    },
    /// Token mode: issue a token unless the chosen endpoint is `valid`'s and it is
    /// fresh enough. Boxed: the codec and token are large, and every request future
    /// of every mode carries the size of this enum.
    Token(Box<TokenAfter>),
    /// A session was created for this key-less request (hash mode).
    NewSession(String),
}

impl<S, X, Req> Service<Req> for Affinity<S, X>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: HasExtensions,
    X: KeyExtractor<Req>,
    Req: HasExtensions,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let l = &self.layer;
        // Table mode looks the key up as the extractor lends it: a known session costs
        // no copy of its key (the table's shared one is kept for the re-pin).
        if let Mode::Table(table) = &l.mode {
            let found = l.extractor.with_key(&req, |k| match table.get_shared(k) {
                Some((ep, key, hash)) => Ok((ep, key, hash)),
                None => Err(Arc::<str>::from(k)),
            });
            let (key, pinned, new) = match found {
                Some(Ok((pin, key, hash))) => (Some(key), Some((pin, hash)), false),
                Some(Err(key)) => (Some(key), None, false),
                None if l.new_sessions => (Some(Arc::from(new_session_id())), None, true),
                None => (None, None, false),
            };
            let (hint, after) = match (key, pinned) {
                (None, _) => (None, After::Nothing),
                (Some(key), Some((pin, hash))) => (
                    // The failover key: the stable hash of the session's key, which the
                    // table computed to find its shard (the same in every run).
                    Some(self.endpoint_hint(pin.endpoint, hash)),
                    After::Pin {
                        key,
                        pinned: Some(pin),
                        new,
                    },
                ),
                (Some(key), None) if table.would_refuse(&key) => {
                    table.refuse();
                    return ResponseFuture::failed(
                        SessionTableFull {
                            max_sessions: table.capacity(),
                        }
                        .into(),
                    );
                }
                (Some(key), None) => (
                    Some(RouteHint::any()),
                    After::Pin {
                        key,
                        pinned: None,
                        new,
                    },
                ),
            };
            return self.send(req, hint, after);
        }
        let key = l.extractor.extract(&req);
        let (hint, after) = match (&l.mode, key) {
            (Mode::Hash, Some(k)) => (Some(RouteHint::hash(stable_hash(&k))), After::Nothing),
            (Mode::Hash, None) if l.new_sessions => {
                let id = new_session_id();
                l.counters.add_created();
                (
                    Some(RouteHint::hash(stable_hash(&id))),
                    After::NewSession(id),
                )
            }
            (Mode::Table(_), _) => unreachable!("handled above"),
            (Mode::Token(codec), token) => {
                let valid = token.as_deref().and_then(|t| codec.check(t));
                if token.is_some() && valid.is_none() {
                    l.counters.add_rejected_token();
                }
                match valid {
                    Some(t) => (
                        Some(
                            self.endpoint_hint(t.endpoint, token.as_deref().map_or(0, stable_hash)),
                        ),
                        After::Token(Box::new(TokenAfter {
                            codec: codec.clone(),
                            valid,
                        })),
                    ),
                    None if token.is_some() || l.new_sessions => (
                        Some(RouteHint::any()),
                        After::Token(Box::new(TokenAfter {
                            codec: codec.clone(),
                            valid: None,
                        })),
                    ),
                    None => (None, After::Nothing),
                }
            }
            (Mode::Hash, None) => (None, After::Nothing),
        };
        self.send(req, hint, after)
    }
}

impl<S, X> Affinity<S, X> {
    /// Sends `req` with its hint, the session's bookkeeping in its future.
    fn send<Req>(
        &mut self,
        mut req: Req,
        hint: Option<RouteHint>,
        after: After,
    ) -> ResponseFuture<S::Future>
    where
        S: Service<Req>,
        Req: HasExtensions,
    {
        let l = &self.layer;
        if let Some(h) = &hint {
            req.extensions_mut().insert(h.clone());
        }
        ResponseFuture {
            inner: Some(self.inner.call(req)),
            error: None,
            hint,
            after: Some(after),
            layer: Some(Shared {
                mode: l.mode.name(),
                counters: l.counters.clone(),
                table: match &l.mode {
                    Mode::Table(t) => Some(t.clone()),
                    _ => None,
                },
            }),
        }
    }
}

impl<S, X> Affinity<S, X> {
    /// The hint of a request pinned to `ep`; `failover_key` tells its session apart,
    /// so that the session's requests failing over together go to one endpoint.
    fn endpoint_hint(&self, ep: EndpointId, failover_key: u64) -> RouteHint {
        let h = RouteHint::endpoint(ep).with_failover_key(failover_key);
        if self.layer.strict { h.strict() } else { h }
    }
}

/// What the response future needs of the layer.
struct Shared {
    mode: &'static str,
    counters: Arc<Counters>,
    table: Option<Arc<Table>>,
}

pin_project! {
    /// The future of [`Affinity`]'s calls: the inner response, then the session's
    /// bookkeeping (pin, re-pin, token).
    ///
    /// # Cancel safety
    ///
    /// Dropping it cancels the inner request; a session it would have created is not
    /// pinned.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        error: Option<BoxError>,
        hint: Option<RouteHint>,
        after: Option<After>,
        layer: Option<Shared>,
    }
}

impl<F> ResponseFuture<F> {
    fn failed(error: BoxError) -> Self {
        ResponseFuture {
            inner: None,
            error: Some(error),
            hint: None,
            after: None,
            layer: None,
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    R: HasExtensions,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(this
                .error
                .take()
                .unwrap_or_else(|| PolledAfterCompletion.into())));
        };
        let out = ready!(inner.poll(cx));
        this.inner.set(None);
        let mut resp = out.map_err(Into::into)?;
        let chosen = this.hint.as_ref().and_then(RouteHint::chosen);
        let (Some(after), Some(shared)) = (this.after.take(), this.layer.take()) else {
            return Poll::Ready(Ok(resp));
        };
        if this.hint.is_some() {
            // Did a balancer read the hint? Warns once if nothing ever does.
            shared.counters.hint_outcome(chosen.is_some(), shared.mode);
        }
        match (after, chosen) {
            (After::Nothing, _) => {}
            (After::NewSession(id), _) => {
                resp.extensions_mut().insert(NewSession(id));
            }
            (After::Pin { key, pinned, new }, Some(chosen)) => {
                if let Some(table) = &shared.table {
                    // A compare-and-set against the pin this request saw: `pin` counts
                    // created and re-pinned sessions itself, and leaves a pin made by
                    // another request of the session since alone.
                    match table.pin(&key, chosen, pinned) {
                        Inserted::Refused => {
                            tracing::debug!(session = %key, "session table full: not pinned");
                        }
                        outcome => {
                            if outcome == Inserted::Moved {
                                tracing::debug!(session = %key, from = ?pinned.map(|p| p.endpoint), to = ?chosen, "session re-pinned");
                                record_repinned();
                            }
                            if new {
                                resp.extensions_mut().insert(NewSession(key.to_string()));
                            }
                        }
                    }
                }
            }
            (After::Pin { .. }, None) => {
                // The inner service reported no choice (no balancer reading hints):
                // counted as unrouted above, nothing to pin.
            }
            (After::Token(token), chosen) => {
                let TokenAfter { codec, valid } = *token;
                let Some(chosen) = chosen.or(valid.map(|t| t.endpoint)) else {
                    return Poll::Ready(Ok(resp));
                };
                let now = codec.now();
                let refresh = match valid {
                    None => {
                        shared.counters.add_created();
                        true
                    }
                    Some(t) if t.endpoint != chosen => {
                        shared.counters.add_repinned();
                        record_repinned();
                        true
                    }
                    // Refreshed once half its life is gone.
                    Some(t) => t.expires.saturating_sub(now) < codec.ttl().as_secs() / 2,
                };
                if refresh {
                    resp.extensions_mut()
                        .insert(IssuedToken(codec.issue(chosen)));
                }
            }
        }
        Poll::Ready(Ok(resp))
    }
}

/// Records `repinned = true` in the current span (the request's span at the stack's
/// edge, `marina.request`), if it is enabled; a span without the field ignores it.
fn record_repinned() {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("repinned", true);
    }
}

/// Writes the session a response carries ([`NewSession`] or [`IssuedToken`] in its
/// extensions) as a `Set-Cookie` header named `cookie`, with `attributes` appended
/// (for example `"Path=/; HttpOnly; Secure; SameSite=Lax"`). Returns whether there was
/// one to write. Pair it with [`CookieKey`](marina_core::CookieKey) reading the same
/// cookie.
///
/// ```
/// use marina_affinity::{NewSession, write_session_cookie};
///
/// let mut resp = http::Response::new(());
/// resp.extensions_mut().insert(NewSession("ab12".into()));
/// assert!(write_session_cookie(&mut resp, "SESSION", "Path=/; HttpOnly"));
/// assert_eq!(resp.headers()["set-cookie"], "SESSION=ab12; Path=/; HttpOnly");
/// ```
pub fn write_session_cookie<B>(
    resp: &mut http::Response<B>,
    cookie: &str,
    attributes: &str,
) -> bool {
    let value = match (
        resp.extensions().get::<IssuedToken>(),
        resp.extensions().get::<NewSession>(),
    ) {
        (Some(t), _) => t.0.clone(),
        (None, Some(s)) => s.0.clone(),
        (None, None) => return false,
    };
    let mut header = format!("{cookie}={value}");
    if !attributes.is_empty() {
        header.push_str("; ");
        header.push_str(attributes);
    }
    match http::HeaderValue::from_str(&header) {
        Ok(v) => {
            resp.headers_mut().append(http::header::SET_COOKIE, v);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> AffinityStats {
        AffinityStats {
            sessions: 3,
            created: 10,
            repinned: 2,
            expired: 4,
            purged: 1,
            refused: 0,
            rejected_tokens: 0,
            unrouted: 0,
            hint_unread: false,
        }
    }

    #[test]
    fn stats_read_as_one_line() {
        assert_eq!(
            stats().to_string(),
            "3 sessions; created 10, re-pinned 2, expired 4, purged 1, refused 0"
        );
        let one = AffinityStats {
            sessions: 1,
            ..stats()
        };
        assert!(one.to_string().starts_with("1 session; "));
    }

    #[test]
    fn stats_name_rejected_tokens_and_a_miswired_layer() {
        let s = AffinityStats {
            sessions: 0,
            rejected_tokens: 5,
            unrouted: 8,
            hint_unread: true,
            ..stats()
        };
        assert_eq!(
            s.to_string(),
            "0 sessions; created 10, re-pinned 2, expired 4, purged 1, refused 0, \
             tokens rejected 5, unrouted 8 (not wired: no balancer reads the route hints)"
        );
    }
}
