//! Leasing: how many cells an instance takes from Redis at once.

use marina_limit::Rate;

use crate::config::InvalidConfig;

/// How many cells of the quota an instance takes from Redis in one call, to spend
/// locally without a call each.
///
/// A fleet limit that asks Redis about every request costs a round trip per request
/// (what go-redis/redis_rate, redis-cell and Envoy's global rate limit do). A lease
/// takes up to `n` *free* cells in that one call: the next `n - 1` requests of the key
/// on this instance are admitted locally. Cells are only ever taken while free, so
/// the fleet never admits more than its quota's cells; what leasing changes is *when*
/// a cell is spent: up to `n` cells per instance taken in one second may be spent in
/// the next. Over any window the fleet's admissions stay within `instances × n` of
/// the quota's (its burst aside), so
///
/// ```text
/// n ≤ 5% × rate × 1 s ÷ instances
/// ```
///
/// keeps the fleet within ±5% of the quota over any 1 s window: that is
/// [`Lease::Auto`]'s size. At 200/s over 3 instances it is 3 (a call for every 3
/// admissions at most); at 10,000/s over 10 instances, 50.
///
/// Unspent cells are dropped after 1 s ([`LEASE_MAX_AGE`]). Refusals need no lease:
/// Redis tells when its next cell frees, and the instance refuses locally until then
/// (with [`RateLimited`](marina_limit::RateLimited)'s exact `retry_after`), leasing or
/// not.
///
/// ```
/// use marina_limit::Rate;
/// use marina_redis::Lease;
///
/// let rate = Rate::per_second(200).burst(20);
/// assert_eq!(Lease::Off.size(&rate), 1);
/// assert_eq!(Lease::Auto { expected_instances: 3 }.size(&rate), 3);
/// assert_eq!(Lease::Tokens(10).size(&rate), 10);
/// assert!(Lease::Tokens(21).validate(&rate).is_err()); // above the burst
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lease {
    /// One cell per call: every admission is decided by Redis (refusals are still
    /// answered locally until the known `retry_after`).
    #[default]
    Off,
    /// `n` cells per call: 1 to the rate's burst.
    Tokens(u32),
    /// Sized so that `expected_instances` instances keep the fleet within ±5% of the
    /// quota over any 1 s window: `⌊5% × per_second ÷ expected_instances⌋`, at least
    /// 1, at most the burst.
    Auto {
        /// How many instances share the quota: at least 1.
        expected_instances: u32,
    },
}

/// How long unspent leased cells are kept: 1 s.
pub const LEASE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Lease {
    /// Cells per call at `rate` (1 when off).
    pub fn size(&self, rate: &Rate) -> u32 {
        let burst = rate.burst_size();
        match *self {
            Lease::Off => 1,
            Lease::Tokens(n) => n.clamp(1, burst),
            Lease::Auto { expected_instances } => {
                let n = 0.05 * rate.per_second_f64() / f64::from(expected_instances.max(1));
                (n.floor() as u32).clamp(1, burst)
            }
        }
    }

    /// Checks the lease against `rate`: [`Lease::Tokens`] from 1 to the burst (field
    /// `lease.tokens`), [`Lease::Auto`] with at least one instance (field
    /// `lease.expected_instances`).
    pub fn validate(&self, rate: &Rate) -> Result<(), InvalidConfig> {
        match *self {
            Lease::Off => Ok(()),
            Lease::Tokens(n) if n == 0 || n > rate.burst_size() => Err(InvalidConfig::new(
                "lease.tokens",
                format!(
                    "must be from 1 to the burst ({}), got {n}",
                    rate.burst_size()
                ),
            )),
            Lease::Tokens(_) => Ok(()),
            Lease::Auto {
                expected_instances: 0,
            } => Err(InvalidConfig::new(
                "lease.expected_instances",
                "must be above 0, got 0",
            )),
            Lease::Auto { .. } => Ok(()),
        }
    }
}
