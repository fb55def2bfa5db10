//! Session ids, and session-pinned connections over marina-pool.

use std::collections::HashMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use marina_pool::{Connector, Pool, PoolError, Pooled, Target};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use crate::token::hex;

/// A new session id: 32 bytes from the operating system's CSPRNG, as 64 hex
/// characters.
///
/// # Panics
///
/// If the operating system has no random source (a broken system: nothing safe can be
/// done without one).
pub fn new_session_id() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source");
    hex(&bytes)
}

/// Too many sessions hold connections already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySessions {
    /// The limit.
    pub max_sessions: usize,
}

impl fmt::Display for TooManySessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sessions already hold connections", self.max_sessions)
    }
}

impl std::error::Error for TooManySessions {}

/// Why [`SessionPool::acquire`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionError {
    /// The pool could not give the new session a connection.
    Pool(PoolError),
    /// The session limit is reached.
    TooMany(TooManySessions),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Pool(e) => write!(f, "session connection: {e}"),
            SessionError::TooMany(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SessionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SessionError::Pool(e) => Some(e),
            SessionError::TooMany(e) => Some(e),
        }
    }
}

/// One session's state.
struct Session<X> {
    conn: Arc<tokio::sync::Mutex<Option<Pooled<X>>>>,
    /// The connection's id (it is listed even while a request holds it).
    conn_id: u64,
    /// Set by `end` and expiry: a request still waiting for the connection starts a
    /// new session instead.
    ended: std::sync::atomic::AtomicBool,
    created: Instant,
    /// Milliseconds since `created` of the last access.
    last_ms: AtomicU64,
    requests: AtomicU64,
    data: Mutex<HashMap<String, String>>,
}

impl<X> Session<X> {
    fn touch(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.created)
            .as_millis() as u64;
        self.last_ms.store(ms, Relaxed);
        self.requests.fetch_add(1, Relaxed);
    }

    fn idle(&self, now: Instant) -> Duration {
        let last = self.created + Duration::from_millis(self.last_ms.load(Relaxed));
        now.saturating_duration_since(last)
    }
}

/// A session in [`SessionPool::sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionSnapshot {
    /// The session's id.
    pub id: String,
    /// Since it was created.
    pub age: Duration,
    /// Since its last request.
    pub idle: Duration,
    /// Requests it made.
    pub requests: u64,
    /// The id of the connection it holds (marina-pool's connection id), if any.
    pub connection: Option<u64>,
}

struct Inner<C: tower_service::Service<T>, T> {
    pool: Pool<C, T>,
    sessions: Mutex<HashMap<String, Arc<Session<C::Response>>>>,
    idle_timeout: Duration,
    max_sessions: usize,
    ended: AtomicU64,
    expired: AtomicU64,
}

/// Session-pinned connections: each session checks one connection out of a
/// marina-pool [`Pool`] and keeps it until the session ends or sits idle past
/// `idle_timeout`; then the connection goes back to the pool. Requests of one session
/// take turns on its connection (a conversation that needs one connection throughout:
/// a transaction, a `SELECT` database, a login).
///
/// Each session counts its requests and keeps its creation and last-access times and a
/// small map of user data. A background sweep (every `idle_timeout / 4`, at least
/// 10 ms) ends idle sessions; it stops when the `SessionPool` and its clones are gone.
///
/// ```
/// use marina_affinity::SessionPool;
/// use marina_pool::Pool;
/// use std::time::Duration;
/// use tower::service_fn;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// // Connections here are plain numbers made by an in-memory connector.
/// let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
/// let connector = service_fn(move |_: &'static str| {
///     let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///     async move { Ok::<_, std::io::Error>(n) }
/// });
/// let pool = Pool::builder().max_size(4).build(connector, "memory")?;
/// let sessions = SessionPool::new(pool.clone(), 100, Duration::from_secs(60));
/// let first = **sessions.acquire("alice").await?;
/// let again = **sessions.acquire("alice").await?;
/// assert_eq!(first, again); // the same connection for the whole session
/// assert!(sessions.end("alice"));
/// assert_eq!(pool.stats().idle, 1); // back in the pool
/// # Ok(()) }
/// ```
pub struct SessionPool<C: tower_service::Service<T>, T> {
    inner: Arc<Inner<C, T>>,
}

impl<C: tower_service::Service<T>, T> Clone for SessionPool<C, T> {
    fn clone(&self) -> Self {
        SessionPool {
            inner: self.inner.clone(),
        }
    }
}

impl<C: tower_service::Service<T>, T> fmt::Debug for SessionPool<C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionPool")
            .field(
                "sessions",
                &self
                    .inner
                    .sessions
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len(),
            )
            .field("max_sessions", &self.inner.max_sessions)
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish()
    }
}

/// A session's connection, held for one request (or a few): derefs to the pooled
/// connection. Dropping it lets the session's next request use the connection; the
/// connection itself stays with the session.
pub struct SessionConn<X> {
    guard: OwnedMutexGuard<Option<Pooled<X>>>,
    session: Arc<Session<X>>,
}

impl<X> Drop for SessionConn<X> {
    fn drop(&mut self) {
        // A long request is activity too: idle time counts from its end.
        let s = &self.session;
        let ms = Instant::now()
            .saturating_duration_since(s.created)
            .as_millis() as u64;
        s.last_ms.store(ms, Relaxed);
    }
}

impl<X> fmt::Debug for SessionConn<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConn")
            .field("connection", &self.guard.as_ref().map(Pooled::id))
            .finish()
    }
}

impl<X> Deref for SessionConn<X> {
    type Target = Pooled<X>;
    fn deref(&self) -> &Pooled<X> {
        self.guard
            .as_ref()
            .expect("a session's connection while it is held")
    }
}

impl<X> DerefMut for SessionConn<X> {
    fn deref_mut(&mut self) -> &mut Pooled<X> {
        self.guard
            .as_mut()
            .expect("a session's connection while it is held")
    }
}

impl<C, T> SessionPool<C, T>
where
    C: Connector<T>,
    T: Target,
{
    /// Sessions over `pool`: at most `max_sessions` hold connections at once; one idle
    /// for `idle_timeout` ends.
    pub fn new(pool: Pool<C, T>, max_sessions: usize, idle_timeout: Duration) -> Self {
        let inner = Arc::new(Inner {
            pool,
            sessions: Mutex::new(HashMap::new()),
            idle_timeout,
            max_sessions: max_sessions.max(1),
            ended: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let every = (idle_timeout / 4).max(Duration::from_millis(10));
            rt.spawn(sweep(Arc::downgrade(&inner), every));
        }
        SessionPool { inner }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session<C::Response>>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session's connection: the one it holds, or (a new session) one checked out
    /// of the pool. Waits while another request of the same session holds it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped while waiting for the pool, the new session is not
    /// created; dropped while waiting for the session's turn, nothing changes.
    pub async fn acquire(&self, id: &str) -> Result<SessionConn<C::Response>, SessionError> {
        let existing = self.lock().get(id).cloned();
        let session = match existing {
            Some(s) => s,
            None => {
                if self.lock().len() >= self.inner.max_sessions {
                    return Err(SessionError::TooMany(TooManySessions {
                        max_sessions: self.inner.max_sessions,
                    }));
                }
                let conn = self.inner.pool.get().await.map_err(SessionError::Pool)?;
                let mut map = self.lock();
                // Another request of the same new session may have won the race: keep
                // its connection, return ours to the pool.
                if let Some(s) = map.get(id) {
                    s.clone()
                } else if map.len() >= self.inner.max_sessions {
                    return Err(SessionError::TooMany(TooManySessions {
                        max_sessions: self.inner.max_sessions,
                    }));
                } else {
                    let conn_id = conn.id();
                    let s = Arc::new(Session {
                        conn: Arc::new(tokio::sync::Mutex::new(Some(conn))),
                        conn_id,
                        ended: std::sync::atomic::AtomicBool::new(false),
                        created: Instant::now(),
                        last_ms: AtomicU64::new(0),
                        requests: AtomicU64::new(0),
                        data: Mutex::new(HashMap::new()),
                    });
                    map.insert(id.to_string(), s.clone());
                    s
                }
            }
        };
        session.touch();
        let mut guard = session.conn.clone().lock_owned().await;
        if guard.is_none() || session.ended.load(Relaxed) {
            // The session ended while we waited: its connection goes back to the pool,
            // and this request starts a new session.
            drop(guard.take());
            drop(guard);
            return Box::pin(self.acquire(id)).await;
        }
        Ok(SessionConn {
            guard,
            session: session.clone(),
        })
    }

    /// Ends a session: its connection goes back to the pool (after the request that
    /// holds it, if any). True if the session existed.
    pub fn end(&self, id: &str) -> bool {
        let Some(s) = self.lock().remove(id) else {
            return false;
        };
        self.inner.ended.fetch_add(1, Relaxed);
        release(&s);
        true
    }

    /// Sets a value in the session's user data; false if there is no such session.
    pub fn set_data(&self, id: &str, key: impl Into<String>, value: impl Into<String>) -> bool {
        let Some(s) = self.lock().get(id).cloned() else {
            return false;
        };
        s.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.into(), value.into());
        true
    }

    /// A value from the session's user data.
    pub fn data(&self, id: &str, key: &str) -> Option<String> {
        let s = self.lock().get(id).cloned()?;
        let d = s
            .data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        d.get(key).cloned()
    }

    /// Sessions holding connections now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True with no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions ended by [`end`](Self::end), and expired by the idle timeout.
    pub fn ended(&self) -> (u64, u64) {
        (
            self.inner.ended.load(Relaxed),
            self.inner.expired.load(Relaxed),
        )
    }

    /// Up to `limit` sessions.
    pub fn sessions(&self, limit: usize) -> Vec<SessionSnapshot> {
        let now = Instant::now();
        let map = self.lock();
        map.iter()
            .take(limit)
            .map(|(id, s)| SessionSnapshot {
                id: id.clone(),
                age: now.saturating_duration_since(s.created),
                idle: s.idle(now),
                requests: s.requests.load(Relaxed),
                connection: (!s.ended.load(Relaxed)).then_some(s.conn_id),
            })
            .collect()
    }

    /// Ends the sessions idle past the timeout now (the sweep does it periodically);
    /// returns how many.
    pub fn expire_idle(&self) -> usize {
        expire(&self.inner)
    }
}

/// Returns the session's connection to the pool once no request holds it.
fn release<X: Send + 'static>(s: &Session<X>) {
    s.ended.store(true, Relaxed);
    match s.conn.clone().try_lock_owned() {
        Ok(mut g) => drop(g.take()),
        Err(_) => {
            let conn = s.conn.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    conn.lock().await.take();
                });
            }
        }
    }
}

fn expire<C: tower_service::Service<T>, T>(inner: &Inner<C, T>) -> usize
where
    C::Response: Send + 'static,
{
    let now = Instant::now();
    let gone: Vec<Arc<Session<C::Response>>> = {
        let mut map = inner
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ids: Vec<String> = map
            .iter()
            // A session whose connection is held by a request is not idle.
            .filter(|(_, s)| s.idle(now) >= inner.idle_timeout && s.conn.try_lock().is_ok())
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| map.remove(id)).collect()
    };
    for s in &gone {
        release(s);
    }
    inner.expired.fetch_add(gone.len() as u64, Relaxed);
    gone.len()
}

async fn sweep<C: tower_service::Service<T>, T>(inner: Weak<Inner<C, T>>, every: Duration)
where
    C::Response: Send + 'static,
{
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let n = expire(&inner);
        if n > 0 {
            tracing::debug!(expired = n, "idle sessions ended; connections returned");
        }
    }
}
