//! Status and reports.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// An endpoint's health, as the layer sees it.
///
/// Its `Display` is for people: `unknown`, `healthy`, `degraded`, `ejected, 2.1 s left`
/// (time left from now, by tokio's clock), `ejected, ending` (the ejection's time is
/// up and it ends at the next poll or probe round), `ejected until probes pass`.
///
/// ```
/// use marina_health::Status;
///
/// assert_eq!(Status::Degraded.to_string(), "degraded");
/// assert_eq!(Status::Ejected { until: None }.to_string(), "ejected until probes pass");
/// ```
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

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Status::Unknown => f.write_str("unknown"),
            Status::Healthy => f.write_str("healthy"),
            Status::Degraded => f.write_str("degraded"),
            Status::Ejected { until: None } => f.write_str("ejected until probes pass"),
            Status::Ejected { until: Some(until) } => {
                let left = until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64();
                // Under 0.05 s it would read "0.0 s left".
                if left < 0.05 {
                    f.write_str("ejected, ending")
                } else {
                    write!(f, "ejected, {left:.1} s left")
                }
            }
        }
    }
}

/// A duration as people read it: `850 µs`, `12.3 ms`, `2.10 s`.
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.001 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
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

impl fmt::Display for CheckResult {
    /// `socket ok: answered`, `response_time failed: 812ms (over the 500ms threshold)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed {
            write!(f, "{} ok: {}", self.name, self.value)
        } else {
            write!(f, "{} failed: {} ({})", self.name, self.value, self.message)
        }
    }
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

impl fmt::Display for CheckRound {
    /// `passed in 12.3 ms`, or `failed: ` and the probe's error (`failed: connection
    /// refused`). The round's time is left out (see [`at`](Self::at)).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.passed, self.response_time) {
            (true, Some(rt)) => write!(f, "passed in {}", human(rt)),
            (true, None) => f.write_str("passed"),
            (false, _) => match self.checks.iter().find(|c| c.name == "socket") {
                Some(c) => write!(f, "failed: {}", c.message),
                None => f.write_str("failed"),
            },
        }
    }
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

impl fmt::Display for HealthReport {
    /// The status, then what is worth knowing and not zero: `degraded, 3/5 probes
    /// passed`, `healthy, 2 failures in a row, 4/40 requests failed recently, ejected
    /// 1 time`. `{:#}` adds the last probe round and its checks, one a line.
    ///
    /// ```
    /// use marina_health::{Health, HealthConfig};
    /// use tower::service_fn;
    ///
    /// let svc = Health::new(
    ///     service_fn(|req: u32| async move { Ok::<_, std::io::Error>(req) }),
    ///     HealthConfig::default(),
    /// );
    /// assert_eq!(svc.handle().report().to_string(), "unknown");
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if self.recent > 0 {
            write!(f, ", {}/{} probes passed", self.healthy, self.recent)?;
        }
        if self.consecutive_failures > 0 {
            write!(f, ", {} failures in a row", self.consecutive_failures)?;
        }
        let (requests, failures) = self.window;
        if failures > 0 {
            write!(f, ", {failures}/{requests} requests failed recently")?;
        }
        match self.ejections {
            0 => {}
            1 => f.write_str(", ejected 1 time")?,
            n => write!(f, ", ejected {n} times")?,
        }
        if f.alternate()
            && let Some(last) = &self.last
        {
            write!(f, "\nlast probe: {last}")?;
            for c in &last.checks {
                write!(f, "\n  {c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn status_reads_as_text() {
        assert_eq!(Status::Unknown.to_string(), "unknown");
        assert_eq!(Status::Healthy.to_string(), "healthy");
        assert_eq!(Status::Degraded.to_string(), "degraded");
        assert_eq!(
            Status::Ejected { until: None }.to_string(),
            "ejected until probes pass"
        );
        let until = Instant::now() + Duration::from_millis(2100);
        let ejected = Status::Ejected { until: Some(until) };
        assert_eq!(ejected.to_string(), "ejected, 2.1 s left");
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(ejected.to_string(), "ejected, 1.1 s left");
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert_eq!(ejected.to_string(), "ejected, ending");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(ejected.to_string(), "ejected, ending");
    }

    fn round(passed: bool) -> CheckRound {
        let socket = if passed {
            CheckResult {
                name: "socket",
                passed: true,
                value: "answered".into(),
                message: "ok".into(),
            }
        } else {
            CheckResult {
                name: "socket",
                passed: false,
                value: "no answer".into(),
                message: "connection refused".into(),
            }
        };
        CheckRound {
            at: Instant::now(),
            passed,
            response_time: passed.then(|| Duration::from_micros(12_300)),
            checks: vec![socket],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn report_reads_as_text() {
        let mut report = HealthReport {
            status: Status::Degraded,
            health_percent: 60.0,
            recent: 5,
            healthy: 3,
            unhealthy: 2,
            last: Some(round(false)),
            consecutive_failures: 0,
            window: (0, 0),
            ejections: 0,
        };
        assert_eq!(report.to_string(), "degraded, 3/5 probes passed");
        assert_eq!(
            format!("{report:#}"),
            "degraded, 3/5 probes passed\nlast probe: failed: connection refused\n  \
             socket failed: no answer (connection refused)"
        );
        report.status = Status::Healthy;
        report.recent = 0;
        report.consecutive_failures = 2;
        report.window = (40, 4);
        report.ejections = 1;
        assert_eq!(
            report.to_string(),
            "healthy, 2 failures in a row, 4/40 requests failed recently, ejected 1 time"
        );
        report.ejections = 3;
        report.consecutive_failures = 0;
        report.window = (10, 0);
        assert_eq!(report.to_string(), "healthy, ejected 3 times");
    }

    #[test]
    fn rounds_and_checks_read_as_text() {
        let ok = round(true);
        assert_eq!(ok.to_string(), "passed in 12.3 ms");
        assert_eq!(ok.checks[0].to_string(), "socket ok: answered");
        assert_eq!(round(false).to_string(), "failed: connection refused");
        assert_eq!(human(Duration::from_micros(850)), "850 µs");
        assert_eq!(human(Duration::from_millis(2100)), "2.10 s");
    }
}
