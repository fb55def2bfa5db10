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

/// One line for people: admissions and refusals, the current rate against the limit,
/// and (keyed limiters) the keys.
///
/// ```
/// use marina_limit::{Rate, RateLimitLayer};
///
/// let layer = RateLimitLayer::global(Rate::per_second(100).burst(10));
/// assert_eq!(
///     layer.handle().stats().to_string(),
///     "admitted 0, rejected 0, 0/s of 100/s (burst 10)",
/// );
/// ```
impl fmt::Display for RateStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "admitted {}, rejected {}", self.admitted, self.rejected)?;
        if self.missing_key > 0 {
            write!(f, " ({} without a key)", self.missing_key)?;
        }
        write!(
            f,
            ", {}/s of {}/s (burst {})",
            self.current_rate, self.limit_per_second, self.burst
        )?;
        if self.keys > 0 || self.evicted_keys > 0 {
            let plural = if self.keys == 1 { "" } else { "s" };
            write!(f, ", {} key{plural}", self.keys)?;
            if self.evicted_keys > 0 {
                write!(f, " ({} evicted)", self.evicted_keys)?;
            }
        }
        Ok(())
    }
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
    /// The limiter's name ([`RateLimitLayer::name`]).
    ///
    /// [`RateLimitLayer::name`]: crate::RateLimitLayer::name
    pub fn name(&self) -> &str {
        &self.limiter.name
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> RateStats {
        RateStats {
            admitted: 1200,
            rejected: 30,
            missing_key: 0,
            current_rate: 95,
            limit_per_second: 100.0,
            burst: 10,
            keys: 0,
            evicted_keys: 0,
        }
    }

    #[test]
    fn a_global_limiter_reads_as_one_line() {
        assert_eq!(
            stats().to_string(),
            "admitted 1200, rejected 30, 95/s of 100/s (burst 10)"
        );
        let slow = RateStats {
            limit_per_second: 0.5,
            ..stats()
        };
        assert!(slow.to_string().contains("95/s of 0.5/s"), "{slow}");
    }

    #[test]
    fn a_keyed_limiter_adds_its_keys() {
        let s = RateStats {
            missing_key: 3,
            keys: 42,
            evicted_keys: 5,
            ..stats()
        };
        assert_eq!(
            s.to_string(),
            "admitted 1200, rejected 30 (3 without a key), 95/s of 100/s (burst 10), \
             42 keys (5 evicted)"
        );
        let one = RateStats { keys: 1, ..stats() };
        assert!(one.to_string().ends_with(", 1 key"), "{one}");
    }
}
