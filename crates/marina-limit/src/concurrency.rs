//! `ConcurrencyPerKey`: at most N requests in flight per key (user, client IP).

use std::borrow::{Borrow, Cow};
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::{BoxError, KeyExtractor, WaitThenCall};
use pin_project_lite::pin_project;
use tokio::sync::{Semaphore, SemaphorePermit};
use tower_layer::Layer;
use tower_service::Service;

use crate::instruments::{ConcurrencyMetrics, Name};
use crate::invalid::{InvalidLimit, or_panic};
use crate::keyless::{MissingKey, WithoutKey};

/// A key has its maximum of requests in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimit {
    /// The key (user, client address); `None` for the requests without a key, which
    /// share one limit ([`WithoutKey::Shared`]).
    pub key: Option<String>,
    /// Its limit.
    pub limit: usize,
}

impl fmt::Display for ConnectionLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(
                f,
                "{key:?} has its maximum of {} requests in flight",
                self.limit
            ),
            None => write!(
                f,
                "requests without a key have their maximum of {} in flight",
                self.limit
            ),
        }
    }
}

impl std::error::Error for ConnectionLimit {}

/// Too many distinct keys have requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyActiveKeys {
    /// The cap.
    pub max_keys: usize,
}

impl fmt::Display for TooManyActiveKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} keys already have requests in flight", self.max_keys)
    }
}

impl std::error::Error for TooManyActiveKeys {}

/// A key with requests in flight or waiting, and its permits. Whoever holds a slot
/// or waits for one holds the `Arc`; the table holds one more while the key is in use.
struct Active {
    key: Box<str>,
    permits: Semaphore,
}

/// The table's entry for an [`Active`] key, found by the key itself (`&str`): a
/// request whose key is in use allocates nothing.
struct Entry(Arc<Active>);

impl Borrow<str> for Entry {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Entry {}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it.
        self.0.key.hash(state);
    }
}

struct Table {
    /// Keys with requests in flight (or waiting). A randomly seeded hasher (std's):
    /// keys come from clients.
    keys: Mutex<HashSet<Entry>>,
    limit: usize,
    max_keys: usize,
    wait: Option<Duration>,
    without_key: WithoutKey,
    /// The permits shared by requests without a key ([`WithoutKey::Shared`]), not in
    /// `keys`.
    keyless: Arc<Active>,
    admitted: AtomicU64,
    rejected: AtomicU64,
    /// Requests refused for want of a key (also in `rejected`).
    missing_key: AtomicU64,
    /// The limiter's name: its `limiter` label.
    name: Name,
    /// The counts, exported (the `metrics` feature; nothing without it).
    metrics: ConcurrencyMetrics,
}

impl Table {
    /// The default name.
    const NAME: &'static str = "concurrency_per_key";

    fn lock(&self) -> MutexGuard<'_, HashSet<Entry>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `key`'s permits, its entry made if it has none: `None` when `max_keys` keys are
    /// in use already (the request is refused, and counted).
    fn enter(&self, key: &str) -> Option<Arc<Active>> {
        let mut keys = self.lock();
        if let Some(entry) = keys.get(key) {
            return Some(entry.0.clone());
        }
        if keys.len() >= self.max_keys {
            drop(keys);
            self.rejected.fetch_add(1, Relaxed);
            self.metrics.too_many_keys();
            return None;
        }
        let active = Arc::new(Active {
            key: key.into(),
            permits: Semaphore::new(self.limit),
        });
        keys.insert(Entry(active.clone()));
        drop(keys);
        self.metrics.keys.added(1);
        Some(active)
    }

    /// Lets go of `active` (its permit, if any, given back first): forgets the key if
    /// nothing else holds or awaits its permits (the table only holds keys in use).
    fn release(&self, active: Arc<Active>) {
        if Arc::ptr_eq(&active, &self.keyless) {
            return;
        }
        let mut keys = self.lock();
        // Only the table's reference and this one left. Checked and dropped under the
        // lock, so of two releases at once the second sees the first's gone.
        if Arc::strong_count(&active) == 2
            && active.permits.available_permits() == self.limit
            && keys.remove(&*active.key)
        {
            self.metrics.keys.removed(1);
        }
        drop(active);
        drop(keys);
    }

    /// The key of a refusal (`None` for the requests without one).
    fn key_of(&self, active: &Arc<Active>) -> Option<String> {
        (!Arc::ptr_eq(active, &self.keyless)).then(|| active.key.to_string())
    }
}

/// Caps requests in flight per key: at most 5 per user and 10 per client IP, say, are
/// two of these layers, one keyed by user and one by client IP
/// ([`ClientIp`](marina_core::ClientIp)), each with its own [`name`](Self::name).
///
/// A request over its key's limit fails with [`ConnectionLimit`] at once, or, with
/// [`wait`](Self::wait), waits up to a bound for a slot. A slot is released when the
/// response future completes or is dropped (cancellation). Only keys with requests in
/// flight are kept, at most `max_keys` of them (default 100,000: past that, new keys
/// fail with [`TooManyActiveKeys`]).
///
/// A request without a key is refused with [`MissingKey`] unless
/// [`without_key`](Self::without_key) says otherwise ([`WithoutKey`]: let through
/// unlimited, or `limit` in flight for all of them together).
///
/// To cap *connections* rather than requests, put the layer in front of a service whose
/// calls hold a connection for their duration (a `PoolService`, a session).
///
/// The key is looked up as the extractor lends it
/// ([`KeyExtractor::with_key`](marina_core::KeyExtractor::with_key)): a request whose
/// key already has requests in flight allocates nothing with `HeaderKey`, `CookieKey`
/// or `ClientIp` (a closure extractor's `String` costs one).
///
/// ```
/// use marina_limit::{ConcurrencyPerKeyLayer, ConnectionLimit};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = ConcurrencyPerKeyLayer::new(|req: &(String, u32)| Some(req.0.clone()), 1);
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|req: (String, u32)| async move { Ok::<_, std::io::Error>(req.1) }));
/// let first = svc.ready().await.unwrap().call(("alice".into(), 1)); // in flight
/// let err = svc.ready().await.unwrap().call(("alice".into(), 2)).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<ConnectionLimit>().unwrap().limit, 1);
/// assert_eq!(svc.ready().await.unwrap().call(("bob".into(), 3)).await.unwrap(), 3);
/// assert_eq!(first.await.unwrap(), 1);
/// # }
/// ```
pub struct ConcurrencyPerKeyLayer<X> {
    extractor: Arc<X>,
    table: Arc<Table>,
}

impl<X> Clone for ConcurrencyPerKeyLayer<X> {
    fn clone(&self) -> Self {
        ConcurrencyPerKeyLayer {
            extractor: self.extractor.clone(),
            table: self.table.clone(),
        }
    }
}

impl<X> fmt::Debug for ConcurrencyPerKeyLayer<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyPerKeyLayer")
            .field("name", &self.table.name)
            .field("limit", &self.table.limit)
            .field("max_keys", &self.table.max_keys)
            .field("wait", &self.table.wait)
            .finish()
    }
}

impl<X> ConcurrencyPerKeyLayer<X> {
    /// The highest per-key limit: tokio's [`Semaphore::MAX_PERMITS`].
    pub const MAX_LIMIT: usize = Semaphore::MAX_PERMITS;

    /// At most `limit` requests in flight per key read by `extractor`.
    ///
    /// `limit` is in requests, `1..=`[`MAX_LIMIT`](Self::MAX_LIMIT).
    ///
    /// # Panics
    ///
    /// If `limit` is out of range, with [`try_new`](Self::try_new)'s message
    /// (`concurrency_per_key: must be above 0, got 0`).
    #[track_caller]
    pub fn new(extractor: X, limit: usize) -> Self {
        or_panic(Self::try_new(extractor, limit))
    }

    /// At most `limit` requests in flight per key, or [`InvalidLimit`] on the field
    /// `concurrency_per_key` if `limit` is 0 or above [`MAX_LIMIT`](Self::MAX_LIMIT).
    pub fn try_new(extractor: X, limit: usize) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "concurrency_per_key";
        if limit == 0 {
            return Err(InvalidLimit::not_above_zero(FIELD, limit));
        }
        if limit > Self::MAX_LIMIT {
            return Err(InvalidLimit::new(
                FIELD,
                format!("must be at most {}, got {limit}", Self::MAX_LIMIT),
            ));
        }
        Ok(ConcurrencyPerKeyLayer {
            extractor: Arc::new(extractor),
            table: Arc::new(Table {
                keys: Mutex::new(HashSet::new()),
                limit,
                max_keys: 100_000,
                wait: None,
                without_key: WithoutKey::default(),
                keyless: Arc::new(Active {
                    key: "".into(),
                    permits: Semaphore::new(limit),
                }),
                admitted: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                missing_key: AtomicU64::new(0),
                name: Cow::Borrowed(Table::NAME),
                metrics: ConcurrencyMetrics::new(&Cow::Borrowed(Table::NAME)),
            }),
        })
    }

    fn table_mut(&mut self) -> &mut Table {
        Arc::get_mut(&mut self.table).expect("configure the layer before cloning or using it")
    }

    /// Names the limiter: the value of its `limiter` label in metrics (the `metrics`
    /// feature) and the name its handle reports. Default `"concurrency_per_key"`, so a
    /// stack with one per-key concurrency limit needs no name; give each its own when
    /// there are several (`"per_user"`, `"per_ip"`). Use a fixed name, never one made
    /// from a user's key.
    ///
    /// The limiter's metrics are registered under the new name now (the ones
    /// registered at construction under the default name stay, at 0).
    ///
    /// ```
    /// use marina_core::ClientIp;
    /// use marina_limit::ConcurrencyPerKeyLayer;
    ///
    /// let per_ip = ConcurrencyPerKeyLayer::new(ClientIp::new(), 10).name("per_ip");
    /// assert_eq!(per_ip.handle().name(), "per_ip");
    /// ```
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used (configure it first).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        let name = name.into();
        let table = self.table_mut();
        table.metrics = ConcurrencyMetrics::new(&name);
        table.name = name;
        self
    }

    /// Waits up to `max` for a slot instead of failing at once.
    ///
    /// Any `max` is valid: zero fails a request that finds no free slot as without a
    /// wait; `Duration::MAX` waits for as long as it takes.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used (configure it first).
    pub fn wait(mut self, max: Duration) -> Self {
        self.table_mut().wait = Some(max);
        self
    }

    /// The most keys with requests in flight at once (default 100,000): at least 1.
    ///
    /// # Panics
    ///
    /// If `max_keys` is 0, with [`try_max_keys`](Self::try_max_keys)'s message
    /// (`concurrency_max_keys: must be above 0, got 0`); if the layer was already
    /// cloned or used (configure it first).
    #[track_caller]
    pub fn max_keys(self, max_keys: usize) -> Self {
        or_panic(self.try_max_keys(max_keys))
    }

    /// The most keys with requests in flight at once, or [`InvalidLimit`] on the field
    /// `concurrency_max_keys` if `max_keys` is 0.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used (configure it first).
    pub fn try_max_keys(mut self, max_keys: usize) -> Result<Self, InvalidLimit> {
        if max_keys == 0 {
            return Err(InvalidLimit::not_above_zero("concurrency_max_keys", 0));
        }
        self.table_mut().max_keys = max_keys;
        Ok(self)
    }

    /// What happens to a request whose key `extractor` finds none (default
    /// [`WithoutKey::Refuse`]: it fails with [`MissingKey`]; see [`WithoutKey`] for
    /// why).
    ///
    /// With [`WithoutKey::Shared`], all those requests together have `limit` slots,
    /// apart from every key's (the empty key's included) and not counted against
    /// `max_keys`; a request that finds none fails with [`ConnectionLimit`] (its
    /// `key` is `None`) or waits, as [`wait`](Self::wait) says.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned or used (configure it first).
    pub fn without_key(mut self, without_key: WithoutKey) -> Self {
        self.table_mut().without_key = without_key;
        self
    }

    /// The handle to the counters.
    pub fn handle(&self) -> ConcurrencyHandle {
        ConcurrencyHandle {
            table: self.table.clone(),
        }
    }
}

impl<S, X> Layer<S> for ConcurrencyPerKeyLayer<X> {
    type Service = ConcurrencyPerKey<S, X>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyPerKey {
            inner,
            extractor: self.extractor.clone(),
            table: self.table.clone(),
        }
    }
}

/// The figures of a [`ConcurrencyPerKeyLayer`], from [`ConcurrencyHandle::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConcurrencyStats {
    /// Keys with requests in flight now.
    pub active_keys: usize,
    /// Requests in flight now, all keys together (not those without a key).
    pub in_flight: usize,
    /// Requests without a key in flight now, in their shared slots
    /// ([`WithoutKey::Shared`]; 0 otherwise, as those let through are not tracked).
    pub keyless_in_flight: usize,
    /// The five keys with the most requests in flight, most first.
    pub top: Vec<(String, usize)>,
    /// The per-key limit.
    pub limit: usize,
    /// Requests admitted (with those without a key let through by
    /// [`WithoutKey::Unlimited`]).
    pub admitted: u64,
    /// Requests refused.
    pub rejected: u64,
    /// Requests refused because they had no key ([`WithoutKey::Refuse`]), also
    /// counted in `rejected`.
    pub missing_key: u64,
}

/// One line for people: requests in flight and over how many keys, the counts, and the
/// busiest keys.
///
/// ```
/// use marina_limit::ConcurrencyPerKeyLayer;
///
/// let layer = ConcurrencyPerKeyLayer::new(|_: &()| None::<String>, 5);
/// assert_eq!(
///     layer.handle().stats().to_string(),
///     "0 in flight over 0 keys (limit 5 per key), admitted 0, rejected 0",
/// );
/// ```
impl fmt::Display for ConcurrencyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.active_keys == 1 { "" } else { "s" };
        write!(
            f,
            "{} in flight over {} key{plural} (limit {} per key)",
            self.in_flight, self.active_keys, self.limit
        )?;
        if self.keyless_in_flight > 0 {
            write!(f, ", {} without a key", self.keyless_in_flight)?;
        }
        write!(
            f,
            ", admitted {}, rejected {}",
            self.admitted, self.rejected
        )?;
        if self.missing_key > 0 {
            write!(f, " ({} without a key)", self.missing_key)?;
        }
        for (i, (key, n)) in self.top.iter().enumerate() {
            f.write_str(if i == 0 { "; busiest: " } else { ", " })?;
            write!(f, "{key} {n}")?;
        }
        Ok(())
    }
}

/// The counters of a [`ConcurrencyPerKeyLayer`], readable from anywhere.
#[derive(Clone)]
pub struct ConcurrencyHandle {
    table: Arc<Table>,
}

impl fmt::Debug for ConcurrencyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl ConcurrencyHandle {
    /// The limiter's name ([`ConcurrencyPerKeyLayer::name`]).
    pub fn name(&self) -> &str {
        &self.table.name
    }

    /// The counters, with the top five keys.
    pub fn stats(&self) -> ConcurrencyStats {
        let t = &self.table;
        // One pass under the lock, keeping only the top five (a scraper must not stall
        // requests while thousands of keys are in flight).
        let (mut active_keys, mut in_flight) = (0, 0);
        let mut top: Vec<(usize, &str)> = Vec::with_capacity(6);
        let keys = t.lock();
        for entry in keys.iter() {
            let (k, sem) = (&*entry.0.key, &entry.0.permits);
            let n = t.limit - sem.available_permits();
            if n == 0 {
                continue;
            }
            active_keys += 1;
            in_flight += n;
            let better = |&(m, key): &(usize, &str)| m > n || (m == n && key < k);
            let pos = top.iter().take_while(|e| better(e)).count();
            if pos < 5 {
                top.insert(pos, (n, k));
                top.truncate(5);
            }
        }
        let per: Vec<(String, usize)> = top.into_iter().map(|(n, k)| (k.to_owned(), n)).collect();
        drop(keys);
        ConcurrencyStats {
            active_keys,
            in_flight,
            keyless_in_flight: t.limit - t.keyless.permits.available_permits(),
            top: per,
            limit: t.limit,
            admitted: t.admitted.load(Relaxed),
            rejected: t.rejected.load(Relaxed),
            missing_key: t.missing_key.load(Relaxed),
        }
    }

    /// Requests in flight for `key` now.
    pub fn in_flight(&self, key: &str) -> usize {
        self.table
            .lock()
            .get(key)
            .map_or(0, |e| self.table.limit - e.0.permits.available_permits())
    }
}

/// The service of a [`ConcurrencyPerKeyLayer`].
///
/// # Sharing
///
/// `Clone` when the inner service is (its `Service` impl needs that anyway). The key
/// table lives in the layer: every clone, and every service made by the same
/// [`ConcurrencyPerKeyLayer`] or a clone of it, counts against the same per-key limits
/// and in one [`ConcurrencyHandle`]; a layer built once per service gives each its own.
/// Each clone calls its own clone of the inner service. It is `Send + Sync` when the
/// inner service and the key extractor are: clone it into each task. A slot is held
/// by a call's [`ConcurrencyFuture`](crate::ConcurrencyFuture), never by the service,
/// so an idle clone holds none.
pub struct ConcurrencyPerKey<S, X> {
    inner: S,
    extractor: Arc<X>,
    table: Arc<Table>,
}

impl<S: Clone, X> Clone for ConcurrencyPerKey<S, X> {
    fn clone(&self) -> Self {
        ConcurrencyPerKey {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            table: self.table.clone(),
        }
    }
}

impl<S: fmt::Debug, X> fmt::Debug for ConcurrencyPerKey<S, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyPerKey")
            .field("inner", &self.inner)
            .field("limit", &self.table.limit)
            .finish()
    }
}

/// A key waited on: lets go of it when dropped unused (a cancelled wait). `None`:
/// the wait is over.
struct KeyGuard {
    active: Option<Arc<Active>>,
    table: Arc<Table>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Some(active) = self.active.take() {
            self.table.release(active);
        }
    }
}

/// A slot: one of its key's permits (or of those of the requests without a key),
/// given back when dropped, and the key forgotten when unused.
struct Slot {
    active: Option<Arc<Active>>,
    table: Arc<Table>,
}

impl Slot {
    /// Takes one of `active`'s permits now, if one is free.
    fn try_take(active: &Arc<Active>, table: &Arc<Table>) -> Option<Slot> {
        let permit = active.permits.try_acquire().ok()?;
        // Given back by hand, in `drop`: the slot holds the semaphore by its `Arc`.
        permit.forget();
        Some(Slot::taken(active.clone(), table.clone()))
    }

    /// A slot whose permit is taken: counted in flight until dropped.
    fn taken(active: Arc<Active>, table: Arc<Table>) -> Slot {
        table.metrics.in_flight(true);
        Slot {
            active: Some(active),
            table,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(active) = self.active.take() {
            active.permits.add_permits(1);
            self.table.metrics.in_flight(false);
            self.table.release(active);
        }
    }
}

impl<S, X, Req> Service<Req> for ConcurrencyPerKey<S, X>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let t = &self.table;
        // The key is lent, not copied: a key in use allocates nothing.
        let active = match self.extractor.with_key(&req, |key| t.enter(key)) {
            Some(Some(active)) => active,
            Some(None) => {
                return ResponseFuture::failed(
                    TooManyActiveKeys {
                        max_keys: t.max_keys,
                    }
                    .into(),
                );
            }
            None => match t.without_key {
                WithoutKey::Unlimited => {
                    t.admitted.fetch_add(1, Relaxed);
                    t.metrics.admitted();
                    return ResponseFuture::call(self.inner.call(req), None);
                }
                WithoutKey::Refuse => {
                    t.rejected.fetch_add(1, Relaxed);
                    t.missing_key.fetch_add(1, Relaxed);
                    t.metrics.missing_key();
                    return ResponseFuture::failed(MissingKey.into());
                }
                // One more key of their own, outside the table.
                WithoutKey::Shared => t.keyless.clone(),
            },
        };
        if let Some(slot) = Slot::try_take(&active, t) {
            drop(active);
            t.admitted.fetch_add(1, Relaxed);
            t.metrics.admitted();
            return ResponseFuture::call(self.inner.call(req), Some(slot));
        }
        match t.wait {
            Some(max) => {
                // Take the readied service into the future; keep a fresh clone.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                let waited = active.clone();
                let acquire: Pin<Box<dyn Future<Output = bool> + Send>> = Box::pin(async move {
                    let permit = tokio::time::timeout(max, waited.permits.acquire()).await;
                    // Given back by the slot made of it.
                    let taken = permit
                        .ok()
                        .and_then(Result::ok)
                        .map(SemaphorePermit::forget);
                    // Gone before the future completes: the guard then finds the key
                    // unused if it is.
                    drop(waited);
                    taken.is_some()
                });
                ResponseFuture {
                    inner: WaitThenCall::waiting(SlotWait {
                        acquire,
                        svc: Some(svc),
                        req: Some(req),
                        guard: KeyGuard {
                            active: Some(active),
                            table: t.clone(),
                        },
                        limit: t.limit,
                    }),
                }
            }
            None => {
                t.rejected.fetch_add(1, Relaxed);
                t.metrics.refused();
                let key = t.key_of(&active);
                t.release(active);
                ResponseFuture::failed(
                    ConnectionLimit {
                        key,
                        limit: t.limit,
                    }
                    .into(),
                )
            }
        }
    }
}

pin_project! {
    /// The future of [`ConcurrencyPerKey`]'s calls: holds the key's slot until the
    /// response completes.
    ///
    /// # Cancel safety
    ///
    /// Dropping it releases the slot (and, while waiting for one, drops the request
    /// unsent).
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: WaitThenCall<SlotWait<S, Req>, S::Future, Option<Slot>>,
    }
}

/// A call waiting for one of its key's slots.
struct SlotWait<S, Req> {
    // Dropped first (declaration order): its reference to the key goes before the
    // guard checks whether the key is still in use. `true`: a permit taken.
    acquire: Pin<Box<dyn Future<Output = bool> + Send>>,
    svc: Option<S>,
    req: Option<Req>,
    guard: KeyGuard,
    limit: usize,
}

// Nothing in it is pinned structurally (the wait is boxed; the service and the
// request are moved out, never pinned).
impl<S, Req> Unpin for SlotWait<S, Req> {}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    fn call(fut: S::Future, slot: Option<Slot>) -> Self {
        ResponseFuture {
            inner: WaitThenCall::calling(fut, slot),
        }
    }

    fn failed(error: BoxError) -> Self {
        ResponseFuture {
            inner: WaitThenCall::failed(error),
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for SlotWait<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<(S::Future, Option<Slot>), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let taken = std::task::ready!(self.acquire.as_mut().poll(cx));
        let this = &mut *self;
        let table = this.guard.table.clone();
        let active = this.guard.active.take().expect("the key waited on");
        if taken {
            table.admitted.fetch_add(1, Relaxed);
            table.metrics.admitted();
            let mut svc = this.svc.take().expect("the readied service");
            let req = this.req.take().expect("the request");
            let slot = Slot::taken(active, table);
            Poll::Ready(Ok((svc.call(req), Some(slot))))
        } else {
            table.rejected.fetch_add(1, Relaxed);
            table.metrics.refused();
            let key = table.key_of(&active);
            table.release(active);
            Poll::Ready(Err(ConnectionLimit {
                key,
                limit: this.limit,
            }
            .into()))
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> ConcurrencyStats {
        ConcurrencyStats {
            active_keys: 2,
            in_flight: 7,
            keyless_in_flight: 0,
            top: vec![("alice".into(), 5), ("bob".into(), 2)],
            limit: 5,
            admitted: 120,
            rejected: 4,
            missing_key: 0,
        }
    }

    #[test]
    fn stats_read_as_one_line_with_the_busiest_keys() {
        assert_eq!(
            stats().to_string(),
            "7 in flight over 2 keys (limit 5 per key), admitted 120, rejected 4; \
             busiest: alice 5, bob 2"
        );
    }

    #[test]
    fn stats_name_requests_without_a_key() {
        let s = ConcurrencyStats {
            active_keys: 1,
            in_flight: 1,
            keyless_in_flight: 3,
            top: vec![("carol".into(), 1)],
            missing_key: 2,
            ..stats()
        };
        assert_eq!(
            s.to_string(),
            "1 in flight over 1 key (limit 5 per key), 3 without a key, admitted 120, \
             rejected 4 (2 without a key); busiest: carol 1"
        );
    }
}
