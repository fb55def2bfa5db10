//! `RateLimitHandle`: a rate limiter's figures, readable from anywhere.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::limiter::{Kind, Limiter};

/// A [`RateLimitLayer`]'s figures, from [`RateLimitHandle::stats`].
///
/// [`RateLimitLayer`]: crate::RateLimitLayer
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateStats {
    /// Requests admitted (with those without a key let through by
    /// [`WithoutKey::Unlimited`]).
    ///
    /// [`WithoutKey::Unlimited`]: crate::WithoutKey::Unlimited
    pub admitted: u64,
    /// Requests refused (over the limit, a new key when the key table refuses, or a
    /// request without a key: [`WithoutKey::Refuse`]).
    ///
    /// [`WithoutKey::Refuse`]: crate::WithoutKey::Refuse
    pub rejected: u64,
    /// Requests refused because they had no key ([`WithoutKey::Refuse`]; keyed
    /// limiters), also counted in `rejected`.
    ///
    /// [`WithoutKey::Refuse`]: crate::WithoutKey::Refuse
    pub missing_key: u64,
    /// Requests admitted per second, averaged since the previous `stats()` reading at
    /// least a second earlier (or since the limiter was made): a scraper reading every
    /// 15 s sees the rate over those 15 s. (Counting costs no clock read, and no
    /// shared atomic add once a service has admitted a few dozen requests: each
    /// long-lived service counts in a slot of its own, summed here.)
    pub current_rate: u64,
    /// The limit's average rate, requests per second.
    pub limit_per_second: f64,
    /// The limit's burst.
    pub burst: u32,
    /// Keys tracked now (keyed limiters).
    pub keys: usize,
    /// Keys forgotten to make room (keyed limiters).
    pub evicted_keys: u64,
}

/// The figures of a rate limiter, readable from anywhere.
#[derive(Clone)]
pub struct RateLimitHandle {
    pub(crate) limiter: Arc<Limiter>,
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl RateLimitHandle {
    /// The counters.
    pub fn stats(&self) -> RateStats {
        let l = &self.limiter;
        let (keys, evicted_keys) = match &l.kind {
            Kind::Global(..) => (0, 0),
            Kind::Keyed(store) => (store.len(), store.evicted.load(Relaxed)),
        };
        RateStats {
            admitted: l.admissions.total(),
            rejected: l.rejected.load(Relaxed),
            missing_key: l.missing_key.load(Relaxed),
            current_rate: l.current_rate(),
            limit_per_second: l.rate.per_second_f64(),
            burst: l.rate.burst_size(),
            keys,
            evicted_keys,
        }
    }

    /// Forgets keys whose quota has fully replenished, as the sweep does; returns how
    /// many.
    pub fn retain_recent(&self) -> usize {
        match &self.limiter.kind {
            Kind::Global(..) => 0,
            Kind::Keyed(store) => store.retain_recent(self.limiter.state_now()),
        }
    }
}
