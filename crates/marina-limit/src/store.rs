//! The rate limiters' GCRA states: a bounded key table (a hard cap on keys, and a
//! sweep) for a keyed limiter, and one atomic state for a global one, shared with
//! governor.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::AcqRel, Ordering::Relaxed};
use std::sync::atomic::{Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard};

use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};

use crate::instruments::KeysGauge;

/// What a full store does with a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenKeysFull {
    /// Forget the least active keys (those with the oldest rate-limiting state; keys
    /// whose quota has fully replenished go first, as they carry no information).
    #[default]
    EvictOldest,
    /// Refuse the new key's requests with [`TooManyKeys`](crate::TooManyKeys).
    Reject,
}

/// One key's GCRA state: the theoretical arrival time, in clock nanoseconds (0: none).
type Tat = u64;

/// A part of the key table, under its lock.
type Shard = Mutex<HashMap<Box<str>, Tat>>;

/// Keys → GCRA state, sharded, with a hard cap on keys.
///
/// Looked up by a borrowed key (`&str`): a request whose key is known allocates
/// nothing; a new key is copied in once.
pub(crate) struct BoundedStore {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    len: AtomicUsize,
    max_keys: usize,
    pub(crate) when_full: WhenKeysFull,
    pub(crate) evicted: std::sync::atomic::AtomicU64,
    /// The key count, exported (the `metrics` feature).
    keys: KeysGauge,
}

impl BoundedStore {
    pub(crate) fn new(max_keys: usize, when_full: WhenKeysFull, keys: KeysGauge) -> Self {
        // One shard: a second hash per check (to choose the shard) cost more than the
        // lock contention it saves on a few cores. More shards would suit many cores.
        let n = 1;
        BoundedStore {
            shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            len: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
            when_full,
            evicted: std::sync::atomic::AtomicU64::new(0),
            keys,
        }
    }

    #[inline]
    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<Box<str>, Tat>> {
        let i = if self.shards.len() == 1 {
            0
        } else {
            (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
        };
        self.shards[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Relaxed).min(self.max_keys)
    }

    pub(crate) fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Makes room for `key` if it is new; false when the store is full and refuses.
    /// `now` is the clock reading (keys whose state is at or before it are
    /// replenished).
    #[inline]
    pub(crate) fn admit(&self, key: &str, now: impl FnOnce() -> u64) -> bool {
        // Room left: nothing to check (the insert itself re-checks the cap).
        self.len.load(Relaxed) < self.max_keys || self.admit_when_full(key, now)
    }

    /// [`admit`](Self::admit) when the store is full.
    #[cold]
    fn admit_when_full(&self, key: &str, now: impl FnOnce() -> u64) -> bool {
        if self.shard(key).contains_key(key) {
            return true;
        }
        // Full: replenished keys go first, in every shard.
        self.retain_recent(now());
        if self.len.load(Relaxed) < self.max_keys {
            return true;
        }
        match self.when_full {
            WhenKeysFull::Reject => false,
            WhenKeysFull::EvictOldest => {
                self.evict_oldest(key);
                true
            }
        }
    }

    /// Drops the eighth of `key`'s shard (at least one key) with the oldest state
    /// (amortized: one scan makes room for many new keys).
    fn evict_oldest(&self, key: &str) {
        let mut s = self.shard(key);
        if s.is_empty() {
            drop(s);
            for shard in self.shards.iter() {
                let mut s = shard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(k) = s.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                    s.remove(&k);
                    self.len.fetch_sub(1, AcqRel);
                    self.keys.removed(1);
                    self.evicted.fetch_add(1, Relaxed);
                    return;
                }
            }
            return;
        }
        let mut tats: Vec<Tat> = s.values().copied().collect();
        let n = (tats.len() / 8).max(1);
        let (_, &mut cut, _) = tats.select_nth_unstable(n - 1);
        let before = s.len();
        let mut left = n;
        s.retain(|_, t| {
            if left > 0 && *t <= cut {
                left -= 1;
                false
            } else {
                true
            }
        });
        let gone = before - s.len();
        self.len.fetch_sub(gone, AcqRel);
        self.keys.removed(gone);
        self.evicted.fetch_add(gone as u64, Relaxed);
    }

    /// Forgets every key whose quota has fully replenished by `now` (its state is in
    /// the past): they would be admitted as if new (governor's `retain_recent`).
    pub(crate) fn retain_recent(&self, now: u64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut s = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = s.len();
            s.retain(|_, t| *t > now);
            let gone = before - s.len();
            if s.is_empty() && s.capacity() > 1024 {
                s.shrink_to_fit();
            }
            dropped += gone;
        }
        self.len.fetch_sub(dropped, AcqRel);
        self.keys.removed(dropped);
        dropped
    }
}

impl BoundedStore {
    /// Governor's `StateStore::measure_and_replace` for `key`: `f` decides on the
    /// key's state (`None`: none yet) and gives the next one, stored on success.
    pub(crate) fn measure_and_replace<T, E>(
        &self,
        key: &str,
        f: impl FnOnce(Option<Nanos>) -> Result<(T, Nanos), E>,
    ) -> Result<T, E> {
        let mut s = self.shard(key);
        match s.get_mut(key) {
            Some(tat) => {
                let prev = (*tat != 0).then(|| Nanos::from(*tat));
                let (out, next) = f(prev)?;
                *tat = next.as_u64().max(1);
                Ok(out)
            }
            None => {
                let (out, next) = f(None)?;
                // `admit` made room; a race with another new key may have taken it, in
                // which case this cell passes untracked rather than break the cap.
                if self.len.fetch_add(1, AcqRel) < self.max_keys {
                    s.insert(key.into(), next.as_u64().max(1));
                    self.keys.added(1);
                } else {
                    self.len.fetch_sub(1, AcqRel);
                }
                Ok(out)
            }
        }
    }
}

/// The global limiter's state: one theoretical arrival time in governor's nanoseconds
/// (0: none yet), shared by governor's limiter (its checks) and the layer (its
/// reservations and the cells given back).
#[derive(Clone, Default)]
pub(crate) struct GlobalState(Arc<AtomicU64>);

impl GlobalState {
    /// Overwrites the state (when the limiter is made, before it is shared).
    pub(crate) fn set(&self, tat: u64) {
        self.0.store(tat, Release);
    }
}

impl StateStore for GlobalState {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // Lock-free: decide on the state read, store the decision only if the state
        // is still that one, else decide again on the newer state.
        let mut seen = self.0.load(Acquire);
        loop {
            let (out, next) = f((seen != 0).then(|| Nanos::from(seen)))?;
            match self
                .0
                .compare_exchange_weak(seen, next.as_u64(), Release, Acquire)
            {
                Ok(_) => return Ok(out),
                Err(newer) => seen = newer,
            }
        }
    }
}
