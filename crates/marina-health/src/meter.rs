//! Metrics for one endpoint (feature `metrics`): handles registered once, when the
//! endpoint's `Health` is built, and updated from there. Without the feature every
//! method is empty and `Meter` has no size.

use std::time::Duration;

use crate::report::Status;

/// What took an endpoint out: the `cause` label and the ejection event's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Real traffic: the passive detectors, or a failed half-open trial request.
    Passive,
    /// Active probes: failing rounds, or a failed half-open probe round.
    Active,
}

impl Cause {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Cause::Passive => "passive",
            Cause::Active => "active",
        }
    }
}

/// The `marina_health_status` gauge's value for a status.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn status_code(status: Status) -> f64 {
    match status {
        Status::Unknown => 0.0,
        Status::Healthy => 1.0,
        Status::Degraded => 2.0,
        Status::Ejected { .. } => 3.0,
    }
}

#[cfg(feature = "metrics")]
pub(crate) struct Meter {
    status: metrics::Gauge,
    ejections_passive: metrics::Counter,
    ejections_active: metrics::Counter,
    readmissions: metrics::Counter,
    probes_pass: metrics::Counter,
    probes_fail: metrics::Counter,
    probe_duration: metrics::Histogram,
    failures: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl Meter {
    /// Registers every metric of the endpoint `endpoint` with the recorder installed
    /// now (a no-op recorder if none is), each label combination up front, so each
    /// reads 0 until something happens.
    pub(crate) fn new(endpoint: &str) -> Self {
        describe();
        let ep = || endpoint.to_owned();
        let status = metrics::gauge!("marina_health_status", "endpoint" => ep());
        status.set(status_code(Status::Unknown));
        Meter {
            status,
            ejections_passive: metrics::counter!(
                "marina_health_ejections_total", "endpoint" => ep(), "cause" => "passive"
            ),
            ejections_active: metrics::counter!(
                "marina_health_ejections_total", "endpoint" => ep(), "cause" => "active"
            ),
            readmissions: metrics::counter!("marina_health_readmissions_total", "endpoint" => ep()),
            probes_pass: metrics::counter!(
                "marina_health_probes_total", "endpoint" => ep(), "outcome" => "pass"
            ),
            probes_fail: metrics::counter!(
                "marina_health_probes_total", "endpoint" => ep(), "outcome" => "fail"
            ),
            probe_duration: metrics::histogram!(
                "marina_health_probe_duration_seconds", "endpoint" => ep()
            ),
            failures: metrics::counter!("marina_health_failures_total", "endpoint" => ep()),
        }
    }

    pub(crate) fn status(&self, status: Status) {
        self.status.set(status_code(status));
    }

    pub(crate) fn ejected(&self, cause: Cause) {
        match cause {
            Cause::Passive => self.ejections_passive.increment(1),
            Cause::Active => self.ejections_active.increment(1),
        }
    }

    pub(crate) fn readmitted(&self) {
        self.readmissions.increment(1);
    }

    /// A probe round ended; `response_time` when it passed.
    pub(crate) fn probe(&self, response_time: Option<Duration>) {
        match response_time {
            Some(rt) => {
                self.probes_pass.increment(1);
                self.probe_duration.record(rt.as_secs_f64());
            }
            None => self.probes_fail.increment(1),
        }
    }

    /// A request on real traffic the classifier counted as a failure.
    pub(crate) fn failure(&self) {
        self.failures.increment(1);
    }
}

/// Describes each metric to the recorder installed now (once per endpoint built: the
/// recorder may change between builds, as in tests).
#[cfg(feature = "metrics")]
fn describe() {
    use metrics::Unit;
    metrics::describe_gauge!(
        "marina_health_status",
        "Endpoint health: 0 unknown, 1 healthy, 2 degraded (or half-open), 3 ejected"
    );
    metrics::describe_counter!(
        "marina_health_ejections_total",
        Unit::Count,
        "Times the endpoint was taken out, by cause (passive: real traffic; active: probes)"
    );
    metrics::describe_counter!(
        "marina_health_readmissions_total",
        Unit::Count,
        "Times the endpoint went back to serving after being taken out"
    );
    metrics::describe_counter!(
        "marina_health_probes_total",
        Unit::Count,
        "Active probe rounds, by outcome (pass or fail)"
    );
    metrics::describe_histogram!(
        "marina_health_probe_duration_seconds",
        Unit::Seconds,
        "Response time of passing active probe rounds"
    );
    metrics::describe_counter!(
        "marina_health_failures_total",
        Unit::Count,
        "Requests on real traffic that the classifier counted as failures"
    );
}

#[cfg(not(feature = "metrics"))]
pub(crate) struct Meter;

#[cfg(not(feature = "metrics"))]
impl Meter {
    #[inline(always)]
    pub(crate) fn new(_endpoint: &str) -> Self {
        Meter
    }

    #[inline(always)]
    pub(crate) fn status(&self, _status: Status) {}

    #[inline(always)]
    pub(crate) fn ejected(&self, _cause: Cause) {}

    #[inline(always)]
    pub(crate) fn readmitted(&self) {}

    #[inline(always)]
    pub(crate) fn probe(&self, _response_time: Option<Duration>) {}

    #[inline(always)]
    pub(crate) fn failure(&self) {}
}
