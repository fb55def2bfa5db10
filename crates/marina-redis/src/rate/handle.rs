//! `RedisRateHandle`: a fleet limiter's figures on this instance.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::limiter::Limiter;

/// A [`RedisRateLimitLayer`](crate::RedisRateLimitLayer)'s figures on this instance,
/// from [`RedisRateHandle::stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RedisRateStats {
    /// Requests admitted here (by Redis, from a lease, or by the fallback).
    pub admitted: u64,
    /// Requests refused here (over the limit, without a key, or by a failing-closed
    /// fallback).
    pub rejected: u64,
    /// Requests refused because they had no key (also in `rejected`).
    pub missing_key: u64,
    /// Redis round trips this limiter made (a `NOSCRIPT` reload counts its two more).
    pub redis_calls: u64,
    /// Admissions without a call of their own: cells a lease took, or a call made
    /// for the requests queued behind it.
    pub from_lease: u64,
    /// Refusals answered here while Redis was known to have no free cell, without a
    /// call.
    pub refused_locally: u64,
    /// Requests the fallback decided (Redis timed out, failed, or was down).
    pub fallback: u64,
    /// Leased cells dropped unspent after a second.
    pub expired_tokens: u64,
    /// Keys whose local state is kept now (keyed limiters).
    pub keys: usize,
    /// The limit's average rate, requests per second, for the whole fleet.
    pub limit_per_second: f64,
    /// The limit's burst.
    pub burst: u32,
    /// Cells taken per call (1: no leasing).
    pub lease_size: u32,
}

impl RedisRateStats {
    /// Redis round trips per request decided here: 1 for the anchors' one call per
    /// check; below with leases and local refusals.
    pub fn calls_per_request(&self) -> f64 {
        let n = self.admitted + self.rejected;
        if n == 0 {
            0.0
        } else {
            self.redis_calls as f64 / n as f64
        }
    }
}

/// The figures of a fleet rate limiter on this instance, readable from anywhere.
#[derive(Clone)]
pub struct RedisRateHandle {
    pub(crate) limiter: Arc<Limiter>,
}

impl fmt::Debug for RedisRateHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisRateHandle {
    /// The counters.
    pub fn stats(&self) -> RedisRateStats {
        let l = &self.limiter;
        let c = &l.counters;
        RedisRateStats {
            admitted: c.admitted.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            missing_key: c.missing_key.load(Relaxed),
            redis_calls: c.calls.load(Relaxed),
            from_lease: c.from_lease.load(Relaxed),
            refused_locally: c.refused_locally.load(Relaxed),
            fallback: c.fallback.load(Relaxed),
            expired_tokens: c.expired_tokens.load(Relaxed),
            keys: l.tracked_keys(),
            limit_per_second: l.rate.per_second_f64(),
            burst: l.rate.burst_size(),
            lease_size: l.lease_size,
        }
    }

    /// Drops the local state of idle keys now, as the background sweep does; returns
    /// how many.
    pub fn sweep(&self) -> usize {
        self.limiter.sweep()
    }
}
