//! How a request through the stack ended, and the stack's own `metrics` handles
//! (feature `metrics`), registered once when the stack is built.

#[cfg(feature = "metrics")]
use metrics::{Counter, Gauge, Histogram, Unit};

/// How a request through the stack ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A reply.
    Ok,
    /// An error other than the ones below.
    Error,
    /// A timeout: an attempt's request timeout, the deadline across attempts, or the
    /// wait for a pooled connection.
    Timeout,
    /// Refused before it was sent: shutting down, the request's validation, a rate or
    /// concurrency limit.
    Rejected,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
        }
    }
}

#[cfg(feature = "metrics")]
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "marina_requests_total",
        Unit::Count,
        "Requests through the stack that ended, by outcome (ok, error, timeout, rejected)."
    );
    describe_histogram!(
        "marina_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's call into the stack to its reply or error, failover included."
    );
    describe_gauge!(
        "marina_requests_in_flight",
        Unit::Count,
        "Requests inside the stack now."
    );
    describe_counter!(
        "marina_request_timeouts_total",
        Unit::Count,
        "Attempts at the endpoint that ran past the per-attempt request timeout."
    );
}

/// The stack-wide handles.
#[cfg(feature = "metrics")]
pub(crate) struct StackMetrics {
    ok: Counter,
    error: Counter,
    timeout: Counter,
    rejected: Counter,
    duration: Histogram,
    pub(crate) in_flight: Gauge,
}

#[cfg(feature = "metrics")]
impl StackMetrics {
    pub(crate) fn new() -> Self {
        describe();
        let requests = |o: &'static str| metrics::counter!("marina_requests_total", "outcome" => o);
        StackMetrics {
            ok: requests("ok"),
            error: requests("error"),
            timeout: requests("timeout"),
            rejected: requests("rejected"),
            duration: metrics::histogram!("marina_request_duration_seconds"),
            in_flight: metrics::gauge!("marina_requests_in_flight"),
        }
    }

    /// A request ended after `seconds`.
    pub(crate) fn ended(&self, outcome: Outcome, seconds: f64) {
        match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Error => &self.error,
            Outcome::Timeout => &self.timeout,
            Outcome::Rejected => &self.rejected,
        }
        .increment(1);
        self.duration.record(seconds);
    }
}

#[cfg(feature = "metrics")]
impl Default for StackMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "metrics")]
/// The per-attempt timeout counter of the endpoint labelled `endpoint`.
pub(crate) fn request_timeouts(endpoint: String) -> Counter {
    describe();
    metrics::counter!("marina_request_timeouts_total", "endpoint" => endpoint)
}

/// The outcome of a failed request, from its error.
pub(crate) fn classify(error: &(dyn std::error::Error + 'static)) -> Outcome {
    use marina_core::find;
    if find::<crate::RequestTimeout>(error).is_some()
        || find::<marina_balance::DeadlineExceeded>(error).is_some()
        || find::<marina_pool::PoolError>(error).is_some_and(marina_pool::PoolError::is_timeout)
    {
        Outcome::Timeout
    } else if find::<crate::ShuttingDown>(error).is_some()
        || find::<marina_limit::RateLimited>(error).is_some()
        || find::<marina_limit::ConnectionLimit>(error).is_some()
        || find::<marina_limit::TooManyActiveKeys>(error).is_some()
        || find::<marina_limit::TooManyKeys>(error).is_some()
        || find::<marina_limit::MissingKey>(error).is_some()
    {
        Outcome::Rejected
    } else {
        Outcome::Error
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn errors_are_classified_through_their_chain() {
        let timeout: marina_core::BoxError = crate::RequestTimeout {
            after: Duration::from_secs(1),
        }
        .into();
        let wrapped = marina_core::NotSent::new(timeout);
        assert_eq!(classify(&wrapped), Outcome::Timeout);
        assert_eq!(classify(&crate::ShuttingDown), Outcome::Rejected);
        let other = std::io::Error::other("boom");
        assert_eq!(classify(&other), Outcome::Error);
        assert_eq!(Outcome::Rejected.as_str(), "rejected");
    }
}
