//! `InvalidLimit`: a limit setting out of its range.

use std::fmt;

/// A limit setting out of its range: which setting, and why.
///
/// The `try_` constructors and setters return it ([`Rate::try_per_second`],
/// [`BandwidthLimit::try_shared_write`], …), so a value read from a user's settings
/// becomes an error at build time rather than a panic or a limiter that does
/// something else. Their infallible twins panic with the same text (its
/// [`Display`](fmt::Display): `"{field}: {message}"`).
///
/// `field` names the setting, path-style, as marina's `[limits]` configuration section
/// names it where there is such a key:
///
/// | `field` | set by | valid range |
/// |---|---|---|
/// | `rate_per_second` | [`Rate::per_second`] | 1 ..= [`Rate::MAX_PER_SECOND`] requests/s |
/// | `rate_period` | [`Rate::every`] | above 0, at most [`Rate::MAX_REFILL`] |
/// | `burst` | [`Rate::burst`] | 1 ..= as many as refill within [`Rate::MAX_REFILL`] |
/// | `key_table.max_keys` | [`KeyTable::with_capacity`], [`RateLimitLayer::keyed_with`] | at least 1 key |
/// | `key_table.sweep_interval` | [`KeyTable::sweep_interval`], [`RateLimitLayer::keyed_with`] | at least [`KeyTable::MIN_SWEEP_INTERVAL`] |
/// | `concurrency_per_key` | [`ConcurrencyPerKeyLayer::new`] | 1 ..= [`ConcurrencyPerKeyLayer::MAX_LIMIT`] requests |
/// | `concurrency_max_keys` | [`ConcurrencyPerKeyLayer::max_keys`] | at least 1 key |
/// | `bandwidth_bytes_per_sec` | [`Bucket::new`], [`BandwidthLimit`]'s limits | finite, at least 1 byte/s |
/// | `bandwidth_burst` | [`Bucket::new`], [`BandwidthLimit`]'s limits | at least 1 byte |
/// | `min_rate.bytes_per_sec` | [`BandwidthLimit::min_rate`] | finite, above 0 bytes/s |
/// | `min_rate.grace` | [`BandwidthLimit::min_rate`] | above 0 |
///
/// `message` says what is accepted and what was given, in lowercase: `"must be above
/// 0, got 0"`.
///
/// ```
/// use marina_limit::{InvalidLimit, Rate};
///
/// let err: InvalidLimit = Rate::try_per_second(0).unwrap_err();
/// assert_eq!(err.field, "rate_per_second");
/// assert_eq!(err.to_string(), "rate_per_second: must be above 0, got 0");
/// ```
///
/// [`Rate::try_per_second`]: crate::Rate::try_per_second
/// [`Rate::per_second`]: crate::Rate::per_second
/// [`Rate::every`]: crate::Rate::every
/// [`Rate::burst`]: crate::Rate::burst
/// [`Rate::MAX_PER_SECOND`]: crate::Rate::MAX_PER_SECOND
/// [`Rate::MAX_REFILL`]: crate::Rate::MAX_REFILL
/// [`KeyTable::with_capacity`]: crate::KeyTable::with_capacity
/// [`KeyTable::sweep_interval`]: crate::KeyTable::sweep_interval
/// [`KeyTable::MIN_SWEEP_INTERVAL`]: crate::KeyTable::MIN_SWEEP_INTERVAL
/// [`RateLimitLayer::keyed_with`]: crate::RateLimitLayer::keyed_with
/// [`ConcurrencyPerKeyLayer::new`]: crate::ConcurrencyPerKeyLayer::new
/// [`ConcurrencyPerKeyLayer::MAX_LIMIT`]: crate::ConcurrencyPerKeyLayer::MAX_LIMIT
/// [`ConcurrencyPerKeyLayer::max_keys`]: crate::ConcurrencyPerKeyLayer::max_keys
/// [`Bucket::new`]: crate::Bucket::new
/// [`BandwidthLimit`]: crate::BandwidthLimit
/// [`BandwidthLimit::try_shared_write`]: crate::BandwidthLimit::try_shared_write
/// [`BandwidthLimit::min_rate`]: crate::BandwidthLimit::min_rate
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidLimit {
    /// The setting at fault, path-style: `rate_per_second`, `burst`,
    /// `bandwidth_bytes_per_sec`, `concurrency_per_key`, …
    pub field: &'static str,
    /// What is wrong: the range accepted and the value given.
    pub message: String,
}

impl InvalidLimit {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidLimit {
            field,
            message: message.into(),
        }
    }

    /// `field: must be above 0, got {got}`.
    pub(crate) fn not_above_zero(field: &'static str, got: impl fmt::Display) -> Self {
        Self::new(field, format!("must be above 0, got {got}"))
    }
}

impl fmt::Display for InvalidLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidLimit {}

/// The value, or a panic with the error's text (the infallible setters).
#[track_caller]
pub(crate) fn or_panic<T>(checked: Result<T, InvalidLimit>) -> T {
    match checked {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// A rate in units per second: finite and above 0 (`min`: and at least that).
pub(crate) fn check_rate(
    field: &'static str,
    v: f64,
    min: Option<f64>,
) -> Result<(), InvalidLimit> {
    if v.is_nan() || v <= 0.0 {
        return Err(InvalidLimit::not_above_zero(field, v));
    }
    if v.is_infinite() {
        return Err(InvalidLimit::new(field, format!("must be finite, got {v}")));
    }
    if let Some(min) = min
        && v < min
    {
        return Err(InvalidLimit::new(
            field,
            format!("must be at least {min} (bytes per second), got {v}"),
        ));
    }
    Ok(())
}
