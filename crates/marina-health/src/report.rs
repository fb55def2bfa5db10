//! Status and reports.

use std::time::Duration;

use tokio::time::Instant;

/// An endpoint's health, as the layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Nothing is known yet: no request has completed and no probe has run.
    Unknown,
    /// Serving normally.
    Healthy,
    /// Serving, but something is off: the last probe round was slow or the recent error
    /// rate is high, or the endpoint is half-open after an ejection (one trial request
    /// decides).
    Degraded,
    /// Taken out: `poll_ready` is `Pending`. `until` is when a passive ejection ends at
    /// the latest (passing active probes can end it sooner; see
    /// [`HealthConfig::uneject_on_probe_success`](crate::HealthConfig::uneject_on_probe_success));
    /// `None` when active probes took it out (it comes back when they pass again).
    /// Without a tokio runtime to run the ejection's timer, the switch to half-open
    /// happens when the service is next polled, so `until` can lie in the past.
    Ejected {
        /// When the ejection ends, if it is timed.
        until: Option<Instant>,
    },
}

impl Status {
    /// True unless ejected. (A half-open endpoint whose one trial is taken is
    /// `Degraded`, and other callers still wait.)
    pub fn is_ready(self) -> bool {
        !matches!(self, Status::Ejected { .. })
    }
}

/// One named check of a probe round: socket state, response time, error rate, age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// `"socket"` (the probe got the expected answer; its error otherwise: refused, reset,
    /// closed, timed out, a wrong reply or status), `"response_time"`, `"error_rate"` or
    /// `"age"`.
    pub name: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// The measured value, as text (`"12ms"`, `"4%"`).
    pub value: String,
    /// Why it failed, or `"ok"`.
    pub message: String,
}

/// One probe round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRound {
    /// When it ended.
    pub at: Instant,
    /// True when the probe passed (the `socket` check: the endpoint answered as
    /// expected; otherwise its message is the probe's error).
    pub passed: bool,
    /// The probe's measured response time, when it answered.
    pub response_time: Option<Duration>,
    /// Each named check.
    pub checks: Vec<CheckResult>,
}

/// What [`HealthHandle::report`](crate::HealthHandle::report) returns.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HealthReport {
    /// The status now.
    pub status: Status,
    /// Share of passing probe rounds in the history, in percent (100 with no history).
    pub health_percent: f64,
    /// Probe rounds in the history (at most the configured `history`).
    pub recent: usize,
    /// Of those, the passing ones.
    pub healthy: usize,
    /// Of those, the failing ones.
    pub unhealthy: usize,
    /// The last probe round, if any.
    pub last: Option<CheckRound>,
    /// Requests that failed in a row, by the classifier.
    pub consecutive_failures: u32,
    /// Requests and failures in the failure-rate window.
    pub window: (u32, u32),
    /// Passive ejections so far, which set the next ejection's length (0 once the
    /// endpoint has been healthy for `reset_after`).
    pub ejections: u32,
}
