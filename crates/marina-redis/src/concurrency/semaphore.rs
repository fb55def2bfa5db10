//! The fleet-wide semaphore: permits as leased members of a Redis sorted set per key,
//! renewed while held, released when done, expiring when their holder is gone.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::{ConnectionLimit, WithoutKey};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Fallback, InvalidConfig};
use crate::fleet::{CallError, RedisFleet};
use crate::scripts::{ACQUIRE, RENEW};

/// The highest per-key limit.
pub(crate) const MAX_LIMIT: usize = 1_000_000;

/// The default lease of a permit.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) admitted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) missing_key: AtomicU64,
    pub(crate) calls: AtomicU64,
    pub(crate) fallback: AtomicU64,
    pub(crate) renewals: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) release_failures: AtomicU64,
}

/// A key's Redis sorted set, and where the plain key starts in its name.
#[derive(Clone)]
pub(crate) struct SetKey {
    pub(crate) redis: Arc<str>,
    /// `None`: the set of the requests without a key.
    plain_from: Option<usize>,
}

impl SetKey {
    fn plain(&self) -> Option<String> {
        self.plain_from.map(|i| self.redis[i..].to_owned())
    }
}

pub(crate) struct Semaphore {
    pub(crate) fleet: RedisFleet,
    pub(crate) name: String,
    /// `{prefix}:conc:{name}`.
    base: String,
    pub(crate) limit: usize,
    pub(crate) lease: Duration,
    pub(crate) wait: Option<Duration>,
    pub(crate) fallback: Fallback,
    pub(crate) without_key: WithoutKey,
    /// This instance's permits, by set: what the renewal renews.
    held: Mutex<HashMap<Arc<str>, HashSet<Box<str>>, RandomState>>,
    /// Permits taken by [`Fallback::Local`], by set.
    local: Mutex<HashMap<Arc<str>, usize, RandomState>>,
    /// Woken when a permit of this instance is released: local waiters ask again.
    released: Notify,
    renewing: AtomicBool,
    pub(crate) counters: Counters,
}

impl Semaphore {
    pub(crate) fn new(fleet: &RedisFleet, name: &str, limit: usize) -> Result<Self, InvalidConfig> {
        crate::config::check_name("name", name)?;
        if limit == 0 || limit > MAX_LIMIT {
            return Err(InvalidConfig::new(
                "concurrency_per_key",
                format!("must be from 1 to {MAX_LIMIT}, got {limit}"),
            ));
        }
        Ok(Semaphore {
            fleet: fleet.clone(),
            name: name.to_owned(),
            base: fleet.key("conc", name),
            limit,
            lease: DEFAULT_LEASE,
            wait: None,
            fallback: fleet.config().fallback,
            without_key: WithoutKey::default(),
            held: Mutex::default(),
            local: Mutex::default(),
            released: Notify::new(),
            renewing: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }

    /// Checks a lease time: 100 ms to an hour, and at least 4 call timeouts (a renewal
    /// every third of it must fit a call or two).
    pub(crate) fn check_lease(&self, lease: Duration) -> Result<(), InvalidConfig> {
        crate::config::check_duration(
            "lease_time",
            lease,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        let min = self.fleet.config().call_timeout * 4;
        if lease < min {
            return Err(InvalidConfig::new(
                "lease_time",
                format!("must be at least 4 call timeouts ({min:?}), got {lease:?}"),
            ));
        }
        Ok(())
    }

    /// The set of `key`.
    pub(crate) fn set_key(&self, key: &str) -> SetKey {
        let redis = format!("{}:k:{key}", self.base);
        SetKey {
            plain_from: Some(redis.len() - key.len()),
            redis: redis.into(),
        }
    }

    /// The set of the requests without a key ([`WithoutKey::Shared`]).
    pub(crate) fn keyless(&self) -> SetKey {
        SetKey {
            redis: format!("{}:nokey", self.base).into(),
            plain_from: None,
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Arc<str>, HashSet<Box<str>>, RandomState>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn local(&self) -> MutexGuard<'_, HashMap<Arc<str>, usize, RandomState>> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Permits this instance holds now, every key together.
    pub(crate) fn in_flight(&self) -> usize {
        let redis: usize = self.held().values().map(HashSet::len).sum();
        redis + self.local().values().sum::<usize>()
    }

    /// Takes a permit of `key`'s set: at once, after waiting up to the layer's
    /// `wait` for one to free (asking again when one of this instance's is released,
    /// or as the earliest lease in the set ends, with backoff), or refused; the
    /// fallback when Redis cannot answer.
    pub(crate) async fn acquire(self: Arc<Self>, key: SetKey) -> Result<Permit, BoxError> {
        let start = Instant::now();
        let give_up = self.wait.and_then(|w| start.checked_add(w));
        let mut backoff = Duration::from_millis(1);
        let lease_us = self.lease.as_micros() as u64;
        self.start_renewal();
        loop {
            if !self.fleet.is_available() {
                let down = self.fleet.skip();
                return self.fall_back(key, down);
            }
            let member: Box<str> =
                format!("{}:{}", self.fleet.instance_id(), self.fleet.next_permit()).into();
            let mut cmd = ACQUIRE.cmd(&key.redis);
            cmd.arg(self.limit).arg(lease_us).arg(&*member);
            // Registered first, so that a permit Redis grants is renewed from the start;
            // dropped unanswered (the call failed, or this future was dropped), it is
            // released in the background, in case Redis granted it.
            let held = Held::register(self.clone(), key.redis.clone(), member);
            let deadline = Instant::now() + self.fleet.config().call_timeout;
            let out = self
                .fleet
                .eval::<(i64, i64)>(&ACQUIRE, &cmd, deadline, &self.counters.calls)
                .await;
            match out {
                Ok((1, _)) => {
                    self.counters.admitted.fetch_add(1, Relaxed);
                    return Ok(Permit::Held(held));
                }
                Ok((_, first_ends_in)) => {
                    held.refused();
                    let now = Instant::now();
                    match give_up {
                        Some(until) if now < until => {
                            let hint =
                                Duration::from_micros(u64::try_from(first_ends_in).unwrap_or(0));
                            let pause = backoff
                                .min(hint.max(Duration::from_millis(1)))
                                .min(until - now);
                            backoff = (backoff * 2).min(Duration::from_millis(50));
                            let released = self.released.notified();
                            let _ = tokio::time::timeout(pause, released).await;
                        }
                        _ => {
                            self.counters.rejected.fetch_add(1, Relaxed);
                            return Err(ConnectionLimit {
                                key: key.plain(),
                                limit: self.limit,
                            }
                            .into());
                        }
                    }
                }
                Err(e) => {
                    // Redis may have granted it before the answer was lost: given back
                    // in the background, or it ends with its lease.
                    drop(held);
                    return self.fall_back(key, e);
                }
            }
        }
    }

    /// Redis could not answer: the fallback decides.
    #[cold]
    fn fall_back(self: &Arc<Self>, key: SetKey, why: CallError) -> Result<Permit, BoxError> {
        self.counters.fallback.fetch_add(1, Relaxed);
        tracing::debug!(limiter = %self.name, fallback = self.fallback.name(), outage = %why.outage(), "fleet concurrency limit: fallback decides");
        match self.fallback {
            Fallback::FailOpen => {
                self.counters.admitted.fetch_add(1, Relaxed);
                Ok(Permit::Open)
            }
            Fallback::FailClosed => {
                self.counters.rejected.fetch_add(1, Relaxed);
                Err(why.unavailable().into())
            }
            Fallback::Local { expected_instances } => {
                let share = self.limit.div_ceil(expected_instances.max(1) as usize);
                let mut local = self.local();
                let n = local.entry(key.redis.clone()).or_insert(0);
                if *n < share {
                    *n += 1;
                    drop(local);
                    self.counters.admitted.fetch_add(1, Relaxed);
                    Ok(Permit::Local(LocalPermit {
                        sem: self.clone(),
                        key: key.redis,
                    }))
                } else {
                    if *n == 0 {
                        local.remove(&key.redis);
                    }
                    drop(local);
                    self.counters.rejected.fetch_add(1, Relaxed);
                    Err(ConnectionLimit {
                        key: key.plain(),
                        limit: self.limit,
                    }
                    .into())
                }
            }
        }
    }

    fn register(&self, key: &Arc<str>, member: &str) {
        self.held()
            .entry(key.clone())
            .or_default()
            .insert(member.into());
    }

    fn unregister(&self, key: &str, member: &str) {
        let mut held = self.held();
        if let Some(members) = held.get_mut(key) {
            members.remove(member);
            if members.is_empty() {
                held.remove(key);
            }
        }
    }

    /// `ZREM`s `member` in a background task (a response future cannot wait in
    /// `drop`); if it fails, the permit comes back when its lease ends.
    fn release_in_background(self: &Arc<Self>, key: Arc<str>, member: Box<str>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.counters.release_failures.fetch_add(1, Relaxed);
            return;
        };
        let sem = self.clone();
        rt.spawn(async move {
            if !sem.fleet.is_available() {
                sem.counters.release_failures.fetch_add(1, Relaxed);
                return;
            }
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&*key).arg(&*member);
            // Off the request path: a few call timeouts are fine.
            let deadline = Instant::now() + sem.fleet.config().call_timeout * 4;
            if let Err(e) = sem
                .fleet
                .query::<i64>(&cmd, deadline, &sem.counters.calls)
                .await
            {
                sem.counters.release_failures.fetch_add(1, Relaxed);
                tracing::debug!(limiter = %sem.name, outage = %e.outage(), "fleet concurrency limit: permit not released (it ends with its lease)");
            }
        });
    }

    /// Starts the renewal task once, on the current runtime.
    fn start_renewal(self: &Arc<Self>) {
        if self.renewing.load(Relaxed) || self.renewing.swap(true, Relaxed) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(renew(Arc::downgrade(self)));
        } else {
            self.renewing.store(false, Relaxed);
        }
    }

    /// Renews every permit this instance holds: one `EVALSHA` per key, all in one
    /// pipeline.
    async fn renew_all(&self) {
        let sets: Vec<(Arc<str>, Vec<Box<str>>)> = self
            .held()
            .iter()
            .map(|(k, m)| (k.clone(), m.iter().cloned().collect()))
            .collect();
        if sets.is_empty() || !self.fleet.is_available() {
            return;
        }
        let lease_us = self.lease.as_micros() as u64;
        let mut pipe = redis::pipe();
        for (key, members) in &sets {
            let mut cmd = RENEW.cmd(key);
            cmd.arg(lease_us);
            for m in members {
                cmd.arg(&**m);
            }
            pipe.add_command(cmd);
        }
        // A third of the lease to renew it: off the request path, it may take longer
        // than a call timeout.
        let deadline = Instant::now() + (self.lease / 3).max(self.fleet.config().call_timeout);
        match self
            .fleet
            .eval_pipeline::<Vec<i64>>(&RENEW, &pipe, deadline, &self.counters.calls)
            .await
        {
            Ok(renewed) => {
                let asked: usize = sets.iter().map(|(_, m)| m.len()).sum();
                let got: i64 = renewed.iter().sum();
                self.counters.renewals.fetch_add(got.max(0) as u64, Relaxed);
                let lost = asked.saturating_sub(got.max(0) as usize);
                if lost > 0 {
                    self.counters.lost.fetch_add(lost as u64, Relaxed);
                    tracing::warn!(limiter = %self.name, lost, "fleet concurrency limit: permits' leases ended while held (Redis was unreachable for longer than the lease); the fleet may exceed its limit until they are released");
                }
            }
            Err(e) => {
                tracing::debug!(limiter = %self.name, outage = %e.outage(), "fleet concurrency limit: renewal failed");
            }
        }
    }
}

/// Renews the semaphore's permits every third of the lease until it is gone.
async fn renew(sem: Weak<Semaphore>) {
    let every = match sem.upgrade() {
        Some(s) => s.lease / 3,
        None => return,
    };
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = sem.upgrade() else {
            return;
        };
        s.renew_all().await;
    }
}

/// A permit, held until dropped (what the variants hold is given back by their
/// `Drop`).
#[allow(dead_code)]
pub(crate) enum Permit {
    /// A member of the key's set in Redis.
    Held(Held),
    /// A permit of the local fallback.
    Local(LocalPermit),
    /// Let through by a failing-open fallback, or without a key
    /// ([`WithoutKey::Unlimited`]): nothing to give back.
    Open,
}

/// A permit in Redis (or one asked for: see [`Semaphore::acquire`]): renewed while it
/// lives, released when dropped.
pub(crate) struct Held {
    sem: Arc<Semaphore>,
    key: Arc<str>,
    /// `None`: refused by Redis, nothing to release.
    member: Option<Box<str>>,
}

impl Held {
    fn register(sem: Arc<Semaphore>, key: Arc<str>, member: Box<str>) -> Self {
        sem.register(&key, &member);
        Held {
            sem,
            key,
            member: Some(member),
        }
    }

    /// Redis refused it: forgets it, releasing nothing.
    fn refused(mut self) {
        if let Some(member) = self.member.take() {
            self.sem.unregister(&self.key, &member);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(member) = self.member.take() {
            self.sem.unregister(&self.key, &member);
            self.sem.release_in_background(self.key.clone(), member);
            self.sem.released.notify_waiters();
        }
    }
}

pub(crate) struct LocalPermit {
    sem: Arc<Semaphore>,
    key: Arc<str>,
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        let mut local = self.sem.local();
        if let Some(n) = local.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                local.remove(&self.key);
            }
        }
        drop(local);
        self.sem.released.notify_waiters();
    }
}
