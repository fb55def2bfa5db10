//! The sticky table: session key → endpoint, bounded, with idle expiry.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use marina_core::EndpointId;
use tokio::time::Instant;

use crate::instruments::Metrics;

/// What the table does with a new session when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Forget the least recently used session to make room (HAProxy's stick tables).
    #[default]
    PurgeOldest,
    /// Refuse the new session: its request fails with [`SessionTableFull`](crate::SessionTableFull).
    Refuse,
}

/// The sticky table's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct TableConfig {
    /// The most sessions held (default 100,000). When full, `PurgeOldest` forgets the
    /// least recently used session of the new key's shard (the table has up to 16
    /// shards, so this approximates the table-wide LRU).
    pub max_sessions: usize,
    /// A session unused for this long is forgotten (default 30 minutes).
    pub idle_timeout: Duration,
    /// How often the background sweep drops idle sessions (default 60 s).
    pub sweep_interval: Duration,
    /// What happens to a new session when the table is full.
    pub when_full: WhenFull,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            max_sessions: 100_000,
            idle_timeout: Duration::from_secs(30 * 60),
            sweep_interval: Duration::from_secs(60),
            when_full: WhenFull::PurgeOldest,
        }
    }
}

impl TableConfig {
    /// The defaults with room for `max_sessions`.
    pub fn with_capacity(max_sessions: usize) -> Self {
        TableConfig {
            max_sessions,
            ..Self::default()
        }
    }

    /// Sets the idle timeout.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Sets the sweep interval.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// Sets what happens when the table is full.
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }
}

const NIL: u32 = u32::MAX;

/// One session, in a shard's slab and LRU list.
struct Node {
    key: Arc<str>,
    endpoint: EndpointId,
    /// Changes each time the session is pinned (created or moved): what a request's
    /// compare-and-set compares, so that a session moved away and back meanwhile is
    /// not taken for the pin the request saw.
    generation: u32,
    /// Milliseconds since the table's origin.
    created: u64,
    last: u64,
    requests: u32,
    prev: u32,
    next: u32,
}

/// A shard: a map into a slab of nodes on a doubly linked LRU list (head: most
/// recent).
struct Shard {
    map: HashMap<Arc<str>, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    /// The next pin's generation.
    generation: u32,
}

impl Shard {
    fn new() -> Self {
        Shard {
            map: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            generation: 0,
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.nodes[old as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    /// A generation for a new pin.
    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.generation
    }

    fn remove(&mut self, i: u32) {
        self.unlink(i);
        let key = std::mem::replace(&mut self.nodes[i as usize].key, Arc::from(""));
        self.map.remove(&key);
        self.free.push(i);
    }
}

/// The session table; shared by the layer's clones and its handle.
pub(crate) struct Table {
    shards: Box<[Mutex<Shard>]>,
    config: TableConfig,
    origin: Instant,
    counters: Arc<Counters>,
    /// Sessions in all shards (reserved before an insert, so it never passes the
    /// capacity).
    len: AtomicUsize,
    /// The table-full warning was logged, and the table has not had room since.
    full_warned: AtomicBool,
}

/// The layer's event counts.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Sessions created (pinned for the first time, or tokens issued to new sessions).
    pub(crate) created: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) purged: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) repinned: AtomicU64,
    /// Tokens that did not check out (forged, expired, garbled).
    pub(crate) rejected_tokens: AtomicU64,
    /// Completed requests whose hint no balancer read (no choice reported through it).
    pub(crate) unrouted: AtomicU64,
    /// Whether anything reads the layer's hints: [`HINTS_UNKNOWN`], [`HINTS_READ`] or
    /// [`HINTS_UNREAD`].
    pub(crate) hints: AtomicU8,
    /// The same events, exported (the `metrics` feature; nothing without it).
    pub(crate) metrics: Metrics,
}

/// No request has told yet whether a balancer reads the hints.
pub(crate) const HINTS_UNKNOWN: u8 = 0;
/// A balancer reported its choice through a hint at least once.
pub(crate) const HINTS_READ: u8 = 1;
/// [`UNREAD_BEFORE_WARNING`] requests completed with their hints unread and none was
/// ever read: the layer warned.
pub(crate) const HINTS_UNREAD: u8 = 2;

/// Completed requests whose hints went unread, with none ever read, before the layer
/// warns that nothing reads them.
pub(crate) const UNREAD_BEFORE_WARNING: u64 = 8;

impl Counters {
    pub(crate) fn add_created(&self) {
        self.created.fetch_add(1, Relaxed);
        self.metrics.created();
    }

    pub(crate) fn add_repinned(&self) {
        self.repinned.fetch_add(1, Relaxed);
        self.metrics.repinned();
    }

    fn add_expired(&self, n: u64) {
        if n > 0 {
            self.expired.fetch_add(n, Relaxed);
            self.metrics.expired(n);
        }
    }

    fn add_purged(&self) {
        self.purged.fetch_add(1, Relaxed);
        self.metrics.purged();
    }

    pub(crate) fn add_rejected_token(&self) {
        self.rejected_tokens.fetch_add(1, Relaxed);
        self.metrics.rejected_token();
    }

    /// A request that carried a hint completed successfully; `read`: a balancer reported
    /// its choice through it. On the wired path this is one relaxed load.
    pub(crate) fn hint_outcome(&self, read: bool, mode: &'static str) {
        if read {
            if self.hints.load(Relaxed) != HINTS_READ
                && self.hints.swap(HINTS_READ, Relaxed) == HINTS_UNREAD
            {
                self.metrics.miswired(false);
            }
            return;
        }
        let unread = self.unrouted.fetch_add(1, Relaxed) + 1;
        self.metrics.unrouted();
        if unread >= UNREAD_BEFORE_WARNING
            && self
                .hints
                .compare_exchange(HINTS_UNKNOWN, HINTS_UNREAD, Relaxed, Relaxed)
                .is_ok()
        {
            self.metrics.miswired(true);
            tracing::warn!(
                mode,
                unread,
                "session affinity is doing nothing: no balancer has read this AffinityLayer's \
                 route hints ({unread} requests served without one), so sessions are not \
                 pinned and requests spread over every backend. Put a marina-balance \
                 `Balance` built with `.route_hints_from_extensions()` (or `.route_hint(..)`) \
                 under the layer, or build the stack with `marina::Stack`, which wires it"
            );
        }
    }
}

/// A session as listed by [`AffinityHandle::sessions`](crate::AffinityHandle::sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The session key (id, user, client address: whatever the extractor reads).
    pub key: String,
    /// The endpoint it is pinned to.
    pub endpoint: EndpointId,
    /// Since the session was created.
    pub age: Duration,
    /// Since its last request.
    pub idle: Duration,
    /// Requests it has made.
    pub requests: u32,
}

/// A session's pin as a request saw it when it was routed: its endpoint, and which
/// pin that was (a session moved away and back has another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeenPin {
    pub(crate) endpoint: EndpointId,
    generation: u32,
}

/// The outcome of [`Table::pin`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// Pinned there: a new session, or one already pinned to that endpoint.
    Yes,
    /// Re-pinned: moved from the endpoint its request saw.
    Moved,
    /// Left alone: pinned (or moved) by another request of the session since this
    /// one was routed; the newer pin stands.
    Kept,
    /// A new session refused: the table is full.
    Refused,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("sessions", &self.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Table {
    pub(crate) fn new(config: TableConfig, counters: Arc<Counters>) -> Arc<Self> {
        let n = config.max_sessions.clamp(1, 16);
        let shards = (0..n).map(|_| Mutex::new(Shard::new())).collect();
        let table = Arc::new(Table {
            shards,
            config,
            origin: Instant::now(),
            counters,
            len: AtomicUsize::new(0),
            full_warned: AtomicBool::new(false),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&table), config.sweep_interval));
        } else {
            tracing::warn!("no tokio runtime: idle sessions expire only when looked up");
        }
        table
    }

    /// Milliseconds since the table's origin.
    fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_millis() as u64
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        self.shard_hashed(key).0
    }

    /// The key's shard, locked, and the key's stable hash (which chose it).
    fn shard_hashed(&self, key: &str) -> (MutexGuard<'_, Shard>, u64) {
        // A fixed hash to choose the shard: only the distribution matters here (each
        // shard's map has its own randomly seeded hasher).
        let hash = marina_core::stable_hash(key);
        let i = (hash % self.shards.len() as u64) as usize;
        let shard = self.shards[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (shard, hash)
    }

    /// The idle timeout in milliseconds (at least 1).
    fn idle_ms(&self) -> u64 {
        (self.config.idle_timeout.as_millis() as u64).max(1)
    }

    /// The session's endpoint, touching it; `None` if absent or expired (removed).
    pub(crate) fn get(&self, key: &str) -> Option<EndpointId> {
        let now = self.now();
        let mut s = self.shard(key);
        let i = *s.map.get(key)?;
        let n = &s.nodes[i as usize];
        if now.saturating_sub(n.last) >= self.idle_ms() {
            s.remove(i);
            drop(s);
            self.removed(1);
            self.counters.add_expired(1);
            return None;
        }
        let endpoint = n.endpoint;
        let n = &mut s.nodes[i as usize];
        n.last = now;
        n.requests = n.requests.saturating_add(1);
        s.unlink(i);
        s.push_front(i);
        Some(endpoint)
    }

    /// The session's pin, its key (shared, no copy) and the key's stable hash,
    /// touching it; `None` if absent or expired (removed).
    pub(crate) fn get_shared(&self, key: &str) -> Option<(SeenPin, Arc<str>, u64)> {
        let now = self.now();
        let (mut s, hash) = self.shard_hashed(key);
        let i = *s.map.get(key)?;
        let n = &s.nodes[i as usize];
        if now.saturating_sub(n.last) >= self.idle_ms() {
            s.remove(i);
            drop(s);
            self.removed(1);
            self.counters.add_expired(1);
            return None;
        }
        let found = (
            SeenPin {
                endpoint: n.endpoint,
                generation: n.generation,
            },
            n.key.clone(),
            hash,
        );
        let n = &mut s.nodes[i as usize];
        n.last = now;
        n.requests = n.requests.saturating_add(1);
        s.unlink(i);
        s.push_front(i);
        Some(found)
    }

    /// Whether a new session would be refused now.
    pub(crate) fn would_refuse(&self, key: &str) -> bool {
        if self.config.when_full != WhenFull::Refuse {
            return false;
        }
        self.len.load(Relaxed) >= self.capacity() && !self.shard(key).map.contains_key(key)
    }

    /// Pins `key` to `endpoint`, where a request of the session went; `seen` is the
    /// session's pin when that request was routed (`None`: it had no pin). A
    /// compare-and-set, so that concurrent requests of one session agree: a session
    /// already pinned moves to `endpoint` only if it still holds the pin `seen` (same
    /// endpoint, same generation). Pinned meanwhile (another request of a new session
    /// answered first) or moved meanwhile (another request re-pinned it after the same
    /// failure), the newer pin stays ([`Inserted::Kept`]). A session absent from the
    /// table (new, or forgotten since) is created.
    pub(crate) fn pin(&self, key: &str, endpoint: EndpointId, seen: Option<SeenPin>) -> Inserted {
        let now = self.now();
        let mut s = self.shard(key);
        if let Some(&i) = s.map.get(key) {
            let n = &s.nodes[i as usize];
            let held = SeenPin {
                endpoint: n.endpoint,
                generation: n.generation,
            };
            let outcome = if held.endpoint == endpoint {
                Inserted::Yes
            } else if seen == Some(held) {
                let generation = s.next_generation();
                let n = &mut s.nodes[i as usize];
                n.endpoint = endpoint;
                n.generation = generation;
                Inserted::Moved
            } else {
                Inserted::Kept
            };
            let n = &mut s.nodes[i as usize];
            n.last = now;
            s.unlink(i);
            s.push_front(i);
            drop(s);
            if outcome == Inserted::Moved {
                self.counters.add_repinned();
            }
            return outcome;
        }
        // Reserve a place; when the table is full, make room or refuse.
        if self.len.fetch_add(1, AcqRel) >= self.capacity() {
            if self.config.when_full == WhenFull::Refuse {
                self.len.fetch_sub(1, AcqRel);
                drop(s);
                self.refuse();
                return Inserted::Refused;
            }
            self.full();
            // The least recently used session of this key's shard (an approximation of
            // the table's LRU: one of 16 shards), or of another shard if this one is
            // empty.
            let tail = s.tail;
            if tail != NIL {
                s.remove(tail);
                self.removed(1);
                self.counters.add_purged();
            } else {
                drop(s);
                self.evict_elsewhere();
                s = self.shard(key);
                if s.map.contains_key(key) {
                    // Pinned meanwhile by a concurrent request of the same session.
                    self.len.fetch_sub(1, AcqRel);
                    drop(s);
                    return self.pin(key, endpoint, seen);
                }
            }
        }
        let key: Arc<str> = Arc::from(key);
        let generation = s.next_generation();
        let node = Node {
            key: key.clone(),
            endpoint,
            generation,
            created: now,
            last: now,
            requests: 1,
            prev: NIL,
            next: NIL,
        };
        let i = match s.free.pop() {
            Some(i) => {
                s.nodes[i as usize] = node;
                i
            }
            None => {
                s.nodes.push(node);
                (s.nodes.len() - 1) as u32
            }
        };
        s.map.insert(key, i);
        s.push_front(i);
        drop(s);
        self.counters.metrics.session_added();
        self.counters.add_created();
        Inserted::Yes
    }

    /// Purges the least recently used session of the first non-empty shard.
    fn evict_elsewhere(&self) {
        for shard in self.shards.iter() {
            let mut s = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let tail = s.tail;
            if tail != NIL {
                s.remove(tail);
                drop(s);
                self.removed(1);
                self.counters.add_purged();
                return;
            }
        }
    }

    /// Ends a session.
    pub(crate) fn remove(&self, key: &str) -> bool {
        let mut s = self.shard(key);
        match s.map.get(key).copied() {
            Some(i) => {
                s.remove(i);
                drop(s);
                self.removed(1);
                true
            }
            None => false,
        }
    }

    /// `n` sessions left the table: counts them out, and rearms the table-full
    /// warning once the table is down to 90% of its capacity (at least one session
    /// below it), so that sessions expiring one by one from a table that stays about
    /// full do not repeat the warning.
    fn removed(&self, n: usize) {
        let left = self.len.fetch_sub(n, AcqRel) - n;
        self.counters.metrics.sessions_removed(n);
        if self.full_warned.load(Relaxed) {
            let cap = self.capacity();
            if left <= cap - (cap / 10).max(1) {
                self.full_warned.store(false, Relaxed);
            }
        }
    }

    /// A new session found the table full: warns once, until the table has room
    /// again (see [`removed`](Self::removed)).
    fn full(&self) {
        if self.full_warned.load(Relaxed) || self.full_warned.swap(true, Relaxed) {
            return;
        }
        let max_sessions = self.capacity();
        match self.config.when_full {
            WhenFull::Refuse => tracing::warn!(
                max_sessions,
                when_full = "refuse",
                "session table full: new sessions are refused until sessions expire or end \
                 (raise TableConfig::max_sessions, or shorten idle_timeout)"
            ),
            WhenFull::PurgeOldest => tracing::warn!(
                max_sessions,
                when_full = "purge_oldest",
                "session table full: the least recently used sessions are forgotten to make \
                 room for new ones (raise TableConfig::max_sessions, or shorten idle_timeout)"
            ),
        }
    }

    /// A new session is refused: the table is full and set to refuse.
    pub(crate) fn refuse(&self) {
        self.counters.refused.fetch_add(1, Relaxed);
        self.counters.metrics.refused();
        self.full();
    }

    /// The most sessions the table holds.
    pub(crate) fn capacity(&self) -> usize {
        self.config.max_sessions.max(1)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .map
                    .len()
            })
            .sum()
    }

    /// Drops sessions idle past the timeout; returns how many.
    pub(crate) fn sweep(&self) -> usize {
        let now = self.now();
        let idle = self.idle_ms();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut s = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while s.tail != NIL {
                let t = s.tail;
                if now.saturating_sub(s.nodes[t as usize].last) < idle {
                    break;
                }
                s.remove(t);
                self.removed(1);
                dropped += 1;
            }
            // Give memory back after a large drop.
            if s.map.is_empty() && s.nodes.capacity() > 1024 {
                s.nodes = Vec::new();
                s.free = Vec::new();
                s.map.shrink_to_fit();
            }
        }
        self.counters.add_expired(dropped as u64);
        dropped
    }

    /// Up to `limit` sessions, most recently used first.
    pub(crate) fn list(&self, limit: usize) -> Vec<SessionInfo> {
        let now = self.now();
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let s = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut i = s.head;
            let mut taken = 0;
            while i != NIL && taken < limit {
                taken += 1;
                let n = &s.nodes[i as usize];
                out.push(SessionInfo {
                    key: n.key.to_string(),
                    endpoint: n.endpoint,
                    age: Duration::from_millis(now.saturating_sub(n.created)),
                    idle: Duration::from_millis(now.saturating_sub(n.last)),
                    requests: n.requests,
                });
                i = n.next;
            }
        }
        out.sort_by_key(|s| s.idle);
        out.truncate(limit);
        out
    }
}

/// The background sweep: ends when the table is dropped.
async fn sweep(table: Weak<Table>, every: Duration) {
    let every = every.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(t) = table.upgrade() else {
            return;
        };
        let n = t.sweep();
        if n > 0 {
            tracing::debug!(expired = n, "sticky table sweep");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_exactly_its_capacity_across_shards() {
        let counters = Arc::new(Counters::default());
        let t = Table::new(TableConfig::with_capacity(1000), counters.clone());
        for k in 0..1000 {
            assert_eq!(
                t.pin(&format!("s{k}"), EndpointId(k % 3), None),
                Inserted::Yes
            );
        }
        assert_eq!(t.len(), 1000);
        assert_eq!(counters.purged.load(Relaxed), 0);
        for k in 1000..1500 {
            t.pin(&format!("s{k}"), EndpointId(1), None);
        }
        assert_eq!(t.len(), 1000);
        assert_eq!(counters.purged.load(Relaxed), 500);
        let listed: usize = t.shards.iter().map(|s| s.lock().unwrap().map.len()).sum();
        assert_eq!(listed, 1000);
    }

    #[test]
    fn refuses_only_when_the_whole_table_is_full() {
        let counters = Arc::new(Counters::default());
        let t = Table::new(
            TableConfig::with_capacity(1000).when_full(WhenFull::Refuse),
            counters.clone(),
        );
        for k in 0..1000 {
            assert!(!t.would_refuse(&format!("s{k}")));
            assert_eq!(t.pin(&format!("s{k}"), EndpointId(0), None), Inserted::Yes);
        }
        assert!(t.would_refuse("new"));
        assert_eq!(t.pin("new", EndpointId(0), None), Inserted::Refused);
        // An existing session still re-pins.
        let seen = t.get_shared("s5").unwrap().0;
        assert_eq!(t.pin("s5", EndpointId(9), Some(seen)), Inserted::Moved);
        assert_eq!(t.get("s5"), Some(EndpointId(9)));
        assert!(t.remove("s5"));
        assert_eq!(t.pin("new", EndpointId(0), None), Inserted::Yes);
        assert_eq!(counters.refused.load(Relaxed), 1);
    }

    #[test]
    fn first_pin_wins_and_a_session_moves_once_per_failure() {
        let counters = Arc::new(Counters::default());
        let t = Table::new(TableConfig::with_capacity(100), counters.clone());
        // Two first requests, routed before either answered, to two endpoints.
        assert_eq!(t.pin("s", EndpointId(1), None), Inserted::Yes);
        assert_eq!(t.pin("s", EndpointId(2), None), Inserted::Kept);
        assert_eq!(t.get("s"), Some(EndpointId(1)));
        // Three requests that saw endpoint 1, failed over to 2, 3 and 2.
        let seen = t.get_shared("s").unwrap().0;
        assert_eq!(seen.endpoint, EndpointId(1));
        assert_eq!(t.pin("s", EndpointId(2), Some(seen)), Inserted::Moved);
        assert_eq!(t.pin("s", EndpointId(3), Some(seen)), Inserted::Kept);
        assert_eq!(t.pin("s", EndpointId(2), Some(seen)), Inserted::Yes);
        assert_eq!(t.get("s"), Some(EndpointId(2)));
        assert_eq!(counters.repinned.load(Relaxed), 1);
        assert_eq!(counters.created.load(Relaxed), 1);
        // A request that saw a pin since forgotten creates the session again.
        let gone = t.get_shared("s").unwrap().0;
        assert!(t.remove("s"));
        assert_eq!(t.pin("s", EndpointId(3), Some(gone)), Inserted::Yes);
        assert_eq!(t.get("s"), Some(EndpointId(3)));
        assert_eq!(counters.created.load(Relaxed), 2);
        assert_eq!(counters.repinned.load(Relaxed), 1);
    }

    #[test]
    fn a_session_moved_away_and_back_is_not_the_pin_a_request_saw() {
        let counters = Arc::new(Counters::default());
        let t = Table::new(TableConfig::with_capacity(100), counters.clone());
        t.pin("s", EndpointId(1), None);
        let old = t.get_shared("s").unwrap().0;
        // Moved to 2 after a failure of 1, then back to 1 after a failure of 2...
        assert_eq!(t.pin("s", EndpointId(2), Some(old)), Inserted::Moved);
        let on_two = t.get_shared("s").unwrap().0;
        assert_eq!(t.pin("s", EndpointId(1), Some(on_two)), Inserted::Moved);
        // ...a request routed before both answers at last, from 3: it saw another pin.
        assert_eq!(t.pin("s", EndpointId(3), Some(old)), Inserted::Kept);
        assert_eq!(t.get("s"), Some(EndpointId(1)));
        assert_eq!(counters.repinned.load(Relaxed), 2);
    }
}
