//! The limiters' metrics (the `metrics` feature): handles registered once, when a
//! limiter is built or named, and bumped from here. Without the feature every method is
//! empty and the structs have no fields.
//!
//! The one label is `limiter`, the limiter's name (plus a fixed `outcome` or `reason`):
//! a user's key is never a label value.

use std::borrow::Cow;
#[cfg(feature = "metrics")]
use std::time::Duration;

#[cfg(feature = "metrics")]
use metrics::{Counter, Gauge, Histogram, Unit};

/// A limiter's name, the value of its `limiter` label.
pub(crate) type Name = Cow<'static, str>;

#[cfg(feature = "metrics")]
mod names {
    pub(super) const ADMITTED: &str = "marina_limit_admitted_total";
    pub(super) const RATE_LIMITED: &str = "marina_limit_rate_limited_total";
    pub(super) const CONCURRENCY_REFUSED: &str = "marina_limit_concurrency_refused_total";
    pub(super) const REFUSED: &str = "marina_limit_refused_total";
    pub(super) const IN_FLIGHT: &str = "marina_limit_in_flight";
    pub(super) const ACTIVE_KEYS: &str = "marina_limit_active_keys";
    pub(super) const BANDWIDTH_BYTES: &str = "marina_limit_bandwidth_bytes_total";
    pub(super) const BANDWIDTH_THROTTLED: &str = "marina_limit_bandwidth_throttled_seconds";
}

/// Describes every metric of the crate (once per limiter built: describing again is
/// harmless, and a recorder installed later still gets the descriptions).
#[cfg(feature = "metrics")]
fn describe() {
    use names::*;
    metrics::describe_counter!(
        ADMITTED,
        Unit::Count,
        "Requests a limiter let through (at once or after a wait)."
    );
    metrics::describe_counter!(
        RATE_LIMITED,
        Unit::Count,
        "Requests over a rate limit: refused (outcome=rejected) or made to wait for their \
         turn (outcome=delayed)."
    );
    metrics::describe_counter!(
        CONCURRENCY_REFUSED,
        Unit::Count,
        "Requests refused because their key had its maximum in flight (at once or after \
         waiting for a slot)."
    );
    metrics::describe_counter!(
        REFUSED,
        Unit::Count,
        "Requests a keyed limiter refused for their key: none (reason=missing_key) or no \
         room for a new one (reason=too_many_keys)."
    );
    metrics::describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Requests holding a slot of a per-key concurrency limiter now."
    );
    metrics::describe_gauge!(
        ACTIVE_KEYS,
        Unit::Count,
        "Keys a keyed limiter tracks now (rate: keys whose quota is not replenished; \
         concurrency: keys with requests in flight or waiting)."
    );
    metrics::describe_counter!(
        BANDWIDTH_BYTES,
        Unit::Bytes,
        "Bytes moved through a bandwidth limit's budgets (reads and writes it limits)."
    );
    metrics::describe_histogram!(
        BANDWIDTH_THROTTLED,
        Unit::Seconds,
        "Each wait of a read or write for its bandwidth budget; the sum is the total \
         throttled time."
    );
}

/// A rate limiter's handles.
#[derive(Debug)]
pub(crate) struct RateMetrics {
    #[cfg(feature = "metrics")]
    admitted: Counter,
    #[cfg(feature = "metrics")]
    rejected: Counter,
    #[cfg(feature = "metrics")]
    delayed: Counter,
    #[cfg(feature = "metrics")]
    missing_key: Counter,
    #[cfg(feature = "metrics")]
    too_many_keys: Counter,
}

impl RateMetrics {
    /// Registers a rate limiter's metrics; `keyed`: with those of a key table.
    pub(crate) fn new(name: &Name, keyed: bool) -> Self {
        #[cfg(feature = "metrics")]
        {
            use names::*;
            describe();
            let refused = |reason: &'static str| {
                if keyed {
                    metrics::counter!(REFUSED, "limiter" => name.clone(), "reason" => reason)
                } else {
                    // A global limiter refuses nothing for a key: no series.
                    Counter::noop()
                }
            };
            RateMetrics {
                admitted: metrics::counter!(ADMITTED, "limiter" => name.clone()),
                rejected: metrics::counter!(RATE_LIMITED, "limiter" => name.clone(), "outcome" => "rejected"),
                delayed: metrics::counter!(RATE_LIMITED, "limiter" => name.clone(), "outcome" => "delayed"),
                missing_key: refused("missing_key"),
                too_many_keys: refused("too_many_keys"),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (name, keyed);
            RateMetrics {}
        }
    }

    #[inline]
    pub(crate) fn admitted(&self) {
        #[cfg(feature = "metrics")]
        self.admitted.increment(1);
    }

    /// Over the limit and refused (no wait allowed, or too far back in line).
    #[inline]
    pub(crate) fn rejected(&self) {
        #[cfg(feature = "metrics")]
        self.rejected.increment(1);
    }

    /// Over the limit and given a later place in line.
    #[inline]
    pub(crate) fn delayed(&self) {
        #[cfg(feature = "metrics")]
        self.delayed.increment(1);
    }

    #[inline]
    pub(crate) fn missing_key(&self) {
        #[cfg(feature = "metrics")]
        self.missing_key.increment(1);
    }

    #[inline]
    pub(crate) fn too_many_keys(&self) {
        #[cfg(feature = "metrics")]
        self.too_many_keys.increment(1);
    }
}

/// A keyed limiter's key count.
#[derive(Debug)]
pub(crate) struct KeysGauge {
    #[cfg(feature = "metrics")]
    keys: Gauge,
}

impl KeysGauge {
    pub(crate) fn new(name: &Name) -> Self {
        #[cfg(feature = "metrics")]
        {
            describe();
            KeysGauge {
                keys: metrics::gauge!(names::ACTIVE_KEYS, "limiter" => name.clone()),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = name;
            KeysGauge {}
        }
    }

    #[inline]
    pub(crate) fn added(&self, n: usize) {
        #[cfg(feature = "metrics")]
        self.keys.increment(n as f64);
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    #[inline]
    pub(crate) fn removed(&self, n: usize) {
        #[cfg(feature = "metrics")]
        if n > 0 {
            self.keys.decrement(n as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }
}

/// A per-key concurrency limiter's handles.
#[derive(Debug)]
pub(crate) struct ConcurrencyMetrics {
    #[cfg(feature = "metrics")]
    admitted: Counter,
    #[cfg(feature = "metrics")]
    refused: Counter,
    #[cfg(feature = "metrics")]
    missing_key: Counter,
    #[cfg(feature = "metrics")]
    too_many_keys: Counter,
    #[cfg(feature = "metrics")]
    in_flight: Gauge,
    pub(crate) keys: KeysGauge,
}

impl ConcurrencyMetrics {
    pub(crate) fn new(name: &Name) -> Self {
        #[cfg(feature = "metrics")]
        {
            use names::*;
            describe();
            ConcurrencyMetrics {
                admitted: metrics::counter!(ADMITTED, "limiter" => name.clone()),
                refused: metrics::counter!(CONCURRENCY_REFUSED, "limiter" => name.clone()),
                missing_key: metrics::counter!(REFUSED, "limiter" => name.clone(), "reason" => "missing_key"),
                too_many_keys: metrics::counter!(REFUSED, "limiter" => name.clone(), "reason" => "too_many_keys"),
                in_flight: metrics::gauge!(IN_FLIGHT, "limiter" => name.clone()),
                keys: KeysGauge::new(name),
            }
        }
        #[cfg(not(feature = "metrics"))]
        ConcurrencyMetrics {
            keys: KeysGauge::new(name),
        }
    }

    #[inline]
    pub(crate) fn admitted(&self) {
        #[cfg(feature = "metrics")]
        self.admitted.increment(1);
    }

    /// The key had its maximum in flight.
    #[inline]
    pub(crate) fn refused(&self) {
        #[cfg(feature = "metrics")]
        self.refused.increment(1);
    }

    #[inline]
    pub(crate) fn missing_key(&self) {
        #[cfg(feature = "metrics")]
        self.missing_key.increment(1);
    }

    #[inline]
    pub(crate) fn too_many_keys(&self) {
        #[cfg(feature = "metrics")]
        self.too_many_keys.increment(1);
    }

    /// A slot taken (`true`) or given back.
    #[inline]
    pub(crate) fn in_flight(&self, taken: bool) {
        #[cfg(feature = "metrics")]
        if taken {
            self.in_flight.increment(1.0);
        } else {
            self.in_flight.decrement(1.0);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = taken;
    }
}

/// A bandwidth limit's handles, shared by its connections.
#[derive(Debug)]
pub(crate) struct BandwidthMetrics {
    #[cfg(feature = "metrics")]
    bytes: Counter,
    #[cfg(feature = "metrics")]
    throttled: Histogram,
}

impl BandwidthMetrics {
    pub(crate) fn new(name: &Name) -> Self {
        #[cfg(feature = "metrics")]
        {
            use names::*;
            describe();
            BandwidthMetrics {
                bytes: metrics::counter!(BANDWIDTH_BYTES, "limiter" => name.clone()),
                throttled: metrics::histogram!(BANDWIDTH_THROTTLED, "limiter" => name.clone()),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = name;
            BandwidthMetrics {}
        }
    }

    #[cfg(feature = "metrics")]
    fn bytes(&self, n: usize) {
        if n > 0 {
            self.bytes.increment(n as u64);
        }
    }

    #[cfg(feature = "metrics")]
    fn throttled(&self, waited: Duration) {
        self.throttled.record(waited.as_secs_f64());
    }
}

/// A throttled connection's share of its limit's metrics: the handles (with the
/// feature) and the timing of each direction's current wait.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    #[cfg(feature = "metrics")]
    metrics: Option<std::sync::Arc<BandwidthMetrics>>,
    read: WaitTimer,
    write: WaitTimer,
}

impl Meter {
    pub(crate) fn new(metrics: &std::sync::Arc<BandwidthMetrics>) -> Self {
        #[cfg(feature = "metrics")]
        {
            Meter {
                metrics: Some(metrics.clone()),
                ..Meter::default()
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = metrics;
            Meter::default()
        }
    }

    /// `n` bytes moved through a budget.
    #[inline]
    pub(crate) fn bytes(&self, n: usize) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.bytes(n);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    /// A read (`write`: a write) must wait `wait` for its budget.
    #[inline]
    pub(crate) fn waiting(&mut self, write: bool, wait: std::time::Duration) {
        if write {
            self.write.waiting(wait);
        } else {
            self.read.waiting(wait);
        }
    }

    /// A read (`write`: a write) got budget.
    #[inline]
    pub(crate) fn granted(&mut self, write: bool) {
        #[cfg(feature = "metrics")]
        let m = self.metrics.as_deref();
        #[cfg(not(feature = "metrics"))]
        let m = None;
        if write {
            self.write.granted(m);
        } else {
            self.read.granted(m);
        }
    }
}

/// One direction's throttling wait, timed for the histogram: from the first time a
/// read (or write) finds no budget to when it gets some, at most until the last time
/// it was told to wait for (so a wait cancelled, and the connection idle after, does
/// not count the idle time). Without the feature: nothing, and no clock read.
#[derive(Debug, Default)]
struct WaitTimer {
    #[cfg(feature = "metrics")]
    since: Option<(tokio::time::Instant, tokio::time::Instant)>,
}

impl WaitTimer {
    /// The budget says: wait `wait` (from now).
    #[inline]
    fn waiting(&mut self, wait: std::time::Duration) {
        #[cfg(feature = "metrics")]
        {
            let now = tokio::time::Instant::now();
            let since = self.since.map_or(now, |(since, _)| since);
            self.since = Some((since, now + wait));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = wait;
    }

    /// The budget gave bytes: a wait before it, if any, is over.
    #[inline]
    fn granted(&mut self, metrics: Option<&BandwidthMetrics>) {
        #[cfg(feature = "metrics")]
        if let (Some((since, until)), Some(m)) = (self.since.take(), metrics) {
            let end = tokio::time::Instant::now().min(until);
            m.throttled(end.saturating_duration_since(since));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = metrics;
    }
}
