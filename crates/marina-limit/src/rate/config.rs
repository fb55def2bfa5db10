//! The settings of a rate limit: the rate, what happens over it, the key table.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;

use super::limiter::Gcra;
use crate::invalid::{InvalidLimit, or_panic};
use crate::store::WhenKeysFull;

/// What happens to a request over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Fail it at once with [`RateLimited`].
    ///
    /// [`RateLimited`]: crate::RateLimited
    #[default]
    Reject,
    /// Queue it: first come, first served. On arrival the request takes the next free
    /// cell, now or later (its place in line), and learns when it will be admitted; it
    /// waits for that time and no longer, with no re-check, so later arrivals never
    /// overtake it. If its place in line is more than `max` away it fails at once with
    /// [`RateLimited`] (its `retry_after` is that wait), taking no cell.
    ///
    /// [`RateLimited`]: crate::RateLimited
    Wait {
        /// The longest delay. Any value: zero refuses every request that would have
        /// to wait, as `Reject` does; `Duration::MAX` waits however long the line is.
        max: Duration,
    },
}

/// A rate: `per_second` requests each second on average, bursts of up to `burst`.
///
/// Every `Rate` is valid: its constructors check their argument. Those named `try_`
/// return [`InvalidLimit`] for a value out of range (for values read from settings);
/// the others panic with the same message.
///
/// ```
/// use marina_limit::Rate;
/// use std::time::Duration;
///
/// let rate = Rate::try_per_second(100)?.try_burst(20)?;
/// assert_eq!((rate.per_second_f64(), rate.burst_size()), (100.0, 20));
///
/// let slow = Rate::try_every(Duration::from_secs(10))?;
/// assert_eq!(slow.per_second_f64(), 0.1);
///
/// let err = Rate::try_per_second(0).unwrap_err();
/// assert_eq!(err.to_string(), "rate_per_second: must be above 0, got 0");
/// # Ok::<(), marina_limit::InvalidLimit>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub(crate) quota: Quota,
}

impl Rate {
    /// The highest rate, requests per second: one a nanosecond, the limiter's
    /// resolution.
    pub const MAX_PER_SECOND: u32 = 1_000_000_000;

    /// The longest a full burst may take to refill (the period times the burst): 100
    /// years (of 365.25 days). Longer ones are mistakes, and would overflow the
    /// limiter's nanosecond arithmetic.
    pub const MAX_REFILL: Duration = Duration::from_secs(3_155_760_000);

    /// `n` requests per second, bursts of `n`.
    ///
    /// `n` is in requests per second, `1..=`[`MAX_PER_SECOND`](Self::MAX_PER_SECOND).
    ///
    /// # Panics
    ///
    /// If `n` is out of range, with [`try_per_second`](Self::try_per_second)'s
    /// message (`rate_per_second: must be above 0, got 0`).
    #[track_caller]
    pub fn per_second(n: u32) -> Self {
        or_panic(Self::try_per_second(n))
    }

    /// `n` requests per second, bursts of `n`, or [`InvalidLimit`] on the field
    /// `rate_per_second` if `n` is 0 or above [`MAX_PER_SECOND`](Self::MAX_PER_SECOND).
    pub fn try_per_second(n: u32) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "rate_per_second";
        let Some(nz) = NonZeroU32::new(n) else {
            return Err(InvalidLimit::not_above_zero(FIELD, n));
        };
        if n > Self::MAX_PER_SECOND {
            return Err(InvalidLimit::new(
                FIELD,
                format!(
                    "must be at most {} (one request a nanosecond), got {n}",
                    Self::MAX_PER_SECOND
                ),
            ));
        }
        Ok(Rate {
            quota: Quota::per_second(nz),
        })
    }

    /// One request every `period`, bursts of 1.
    ///
    /// `period` is above zero and at most [`MAX_REFILL`](Self::MAX_REFILL) (100
    /// years); its resolution is a nanosecond.
    ///
    /// # Panics
    ///
    /// If `period` is out of range, with [`try_every`](Self::try_every)'s message
    /// (`rate_period: must be above 0, got 0ns`).
    #[track_caller]
    pub fn every(period: Duration) -> Self {
        or_panic(Self::try_every(period))
    }

    /// One request every `period`, bursts of 1, or [`InvalidLimit`] on the field
    /// `rate_period` if `period` is zero or above [`MAX_REFILL`](Self::MAX_REFILL).
    pub fn try_every(period: Duration) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "rate_period";
        if period > Self::MAX_REFILL {
            return Err(InvalidLimit::new(
                FIELD,
                format!(
                    "must be at most {:?} (100 years), got {period:?}",
                    Self::MAX_REFILL
                ),
            ));
        }
        match Quota::with_period(period) {
            Some(quota) => Ok(Rate { quota }),
            None => Err(InvalidLimit::not_above_zero(
                FIELD,
                format_args!("{period:?}"),
            )),
        }
    }

    /// Allows bursts of `burst` requests: that many at once after a quiet spell, with
    /// the average rate unchanged.
    ///
    /// `burst` is in requests, at least 1, and at most as many as refill within
    /// [`MAX_REFILL`](Self::MAX_REFILL) at this rate (3,155,760,000 at one request a
    /// second; any `u32` at two or more).
    ///
    /// # Panics
    ///
    /// If `burst` is out of range, with [`try_burst`](Self::try_burst)'s message
    /// (`burst: must be above 0, got 0`).
    #[track_caller]
    pub fn burst(self, burst: u32) -> Self {
        or_panic(self.try_burst(burst))
    }

    /// Allows bursts of `burst` requests, or [`InvalidLimit`] on the field `burst` if
    /// it is 0, or so large that a full burst would take more than
    /// [`MAX_REFILL`](Self::MAX_REFILL) to refill.
    pub fn try_burst(self, burst: u32) -> Result<Self, InvalidLimit> {
        const FIELD: &str = "burst";
        let Some(nz) = NonZeroU32::new(burst) else {
            return Err(InvalidLimit::not_above_zero(FIELD, burst));
        };
        let period = Gcra::of(self.quota).t;
        let max = Self::MAX_REFILL.as_nanos() as u64 / period;
        if u64::from(burst) > max {
            return Err(InvalidLimit::new(
                FIELD,
                format!(
                    "must be at most {max} at one request every {:?} (a full burst refills \
                     within 100 years), got {burst}",
                    Duration::from_nanos(period)
                ),
            ));
        }
        Ok(Rate {
            quota: self.quota.allow_burst(nz),
        })
    }

    /// The average requests per second.
    pub fn per_second_f64(&self) -> f64 {
        // One division, correctly rounded: exact for whole rates that divide 1e9.
        1e9 / self.quota.replenish_interval().as_nanos() as f64
    }

    /// The burst.
    pub fn burst_size(&self) -> u32 {
        self.quota.burst_size().get()
    }
}

/// Settings of a keyed limiter's key table.
///
/// Its fields can be set directly; [`RateLimitLayer::keyed_with`] checks them
/// ([`validate`](Self::validate)), as the setters do.
///
/// [`RateLimitLayer::keyed_with`]: crate::RateLimitLayer::keyed_with
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct KeyTable {
    /// The most keys tracked (default 100,000): at least 1.
    pub max_keys: usize,
    /// What happens to a new key when full.
    pub when_full: WhenKeysFull,
    /// How often replenished keys are dropped (default 60 s): at least
    /// [`MIN_SWEEP_INTERVAL`](Self::MIN_SWEEP_INTERVAL). Over 100 years
    /// ([`Rate::MAX_REFILL`]; `Duration::MAX`, say): no sweep task at all, and a full
    /// table still drops replenished keys before it evicts or refuses.
    pub sweep_interval: Duration,
}

impl Default for KeyTable {
    fn default() -> Self {
        KeyTable {
            max_keys: 100_000,
            when_full: WhenKeysFull::EvictOldest,
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl KeyTable {
    /// The shortest sweep interval: 10 ms (a sweep scans every key under the table's
    /// lock).
    pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);

    /// Room for `max_keys` keys (at least 1).
    ///
    /// # Panics
    ///
    /// If `max_keys` is 0: `key_table.max_keys: must be above 0, got 0`.
    #[track_caller]
    pub fn with_capacity(max_keys: usize) -> Self {
        or_panic(Self::try_with_capacity(max_keys))
    }

    /// Room for `max_keys` keys, or [`InvalidLimit`] on the field `key_table.max_keys`
    /// if it is 0.
    pub fn try_with_capacity(max_keys: usize) -> Result<Self, InvalidLimit> {
        let table = KeyTable {
            max_keys,
            ..Self::default()
        };
        table.check_max_keys()?;
        Ok(table)
    }

    /// What happens to a new key when full.
    pub fn when_full(mut self, when_full: WhenKeysFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// How often replenished keys are dropped: at least
    /// [`MIN_SWEEP_INTERVAL`](Self::MIN_SWEEP_INTERVAL) (10 ms); over 100 years, never.
    ///
    /// # Panics
    ///
    /// If `every` is shorter:
    /// `key_table.sweep_interval: must be at least 10ms, got 0ns`.
    #[track_caller]
    pub fn sweep_interval(self, every: Duration) -> Self {
        or_panic(self.try_sweep_interval(every))
    }

    /// How often replenished keys are dropped, or [`InvalidLimit`] on the field
    /// `key_table.sweep_interval` if `every` is shorter than
    /// [`MIN_SWEEP_INTERVAL`](Self::MIN_SWEEP_INTERVAL).
    pub fn try_sweep_interval(mut self, every: Duration) -> Result<Self, InvalidLimit> {
        self.sweep_interval = every;
        self.check_sweep_interval()?;
        Ok(self)
    }

    /// Checks every field against its range: the first one out of range.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        self.check_max_keys()?;
        self.check_sweep_interval()
    }

    fn check_max_keys(&self) -> Result<(), InvalidLimit> {
        if self.max_keys == 0 {
            return Err(InvalidLimit::not_above_zero("key_table.max_keys", 0));
        }
        Ok(())
    }

    fn check_sweep_interval(&self) -> Result<(), InvalidLimit> {
        if self.sweep_interval < Self::MIN_SWEEP_INTERVAL {
            return Err(InvalidLimit::new(
                "key_table.sweep_interval",
                format!(
                    "must be at least {:?}, got {:?}",
                    Self::MIN_SWEEP_INTERVAL,
                    self.sweep_interval
                ),
            ));
        }
        Ok(())
    }
}
