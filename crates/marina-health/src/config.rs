//! Health-check configuration, and its validation.

use std::fmt;
use std::time::Duration;

/// How the health layer decides that an endpoint is failing, and for how long it is
/// taken out. Defaults follow Envoy's outlier detection and HAProxy's checks.
///
/// Each field documents its unit and valid range. [`validate`](Self::validate) checks
/// them all, and the constructors ([`HealthLayer::new`](crate::HealthLayer::new),
/// [`Health::new`](crate::Health::new), [`HealthBuilder::build`](crate::HealthBuilder::build))
/// refuse a configuration out of range: their `try_` variants return
/// [`InvalidHealthConfig`], the others panic with the same message.
///
/// ```
/// use std::time::Duration;
/// use marina_health::{FailureRate, HealthConfig};
///
/// let ok = HealthConfig { consecutive_failures: 3, ..HealthConfig::default() };
/// assert!(ok.validate().is_ok());
///
/// let bad = HealthConfig {
///     failure_rate: Some(FailureRate { threshold: 50.0, ..FailureRate::default() }), // meant 50%
///     base_ejection: Duration::from_secs(600),
///     ..HealthConfig::default()
/// };
/// let err = bad.validate().unwrap_err();
/// assert_eq!(err.problems.len(), 2);
/// assert_eq!(err.problems[0].path, "failure_rate.threshold");
/// assert_eq!(err.problems[1].path, "base_ejection");
/// assert!(err.to_string().contains("a share, not a percentage"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Consecutive failed requests that eject the endpoint (default 5); 0 turns this
    /// detector off. Any value is valid.
    pub consecutive_failures: u32,
    /// The failure-rate detector; `None` turns it off. Its fields have ranges of their
    /// own (see [`FailureRate`]).
    pub failure_rate: Option<FailureRate>,
    /// How long the first ejection lasts (default 30 s); the n-th lasts `n × base`, up
    /// to `max_ejection`. Must be above 0 and at most `max_ejection`.
    pub base_ejection: Duration,
    /// The longest an ejection lasts (default 300 s). Must be at least `base_ejection`
    /// and at most 1 day ([`MAX_EJECTION_LIMIT`]): an endpoint ejected for longer
    /// than that by passive checks alone is a configuration mistake.
    pub max_ejection: Duration,
    /// After this long serving without an ejection, the ejection count starts again
    /// from zero, so the next ejection lasts `base_ejection` again (default 300 s). Any
    /// value is valid: 0 keeps every ejection at `base_ejection`; `Duration::MAX` never
    /// forgets.
    pub reset_after: Duration,
    /// Whether passing active probes end a passive ejection early (default `true`, as
    /// Envoy's `successful_active_health_check_uneject_host`).
    ///
    /// With a probe ([`HealthLayer::probe`](crate::HealthLayer::probe)), an endpoint
    /// ejected by the passive detectors comes back as soon as
    /// [`healthy_threshold`](ActiveConfig::healthy_threshold) probe rounds in a row pass,
    /// rather than when its ejection time runs out: a backend restarted after a crash
    /// takes traffic again after a few probe intervals, not after 30 s or more.
    ///
    /// - It comes straight back to serving (`Healthy`, or `Degraded` if the last probe
    ///   round was slow or recent rounds often failed), with no half-open trial: every
    ///   caller waiting in `poll_ready` is woken, and a balancer's
    ///   [`EjectionGate`](marina_core::EjectionGate) stops counting it as ejected.
    /// - Only rounds that *began* after the ejection count: a streak of passes from
    ///   before it, or a round already under way when it happened, does not bring the
    ///   endpoint back. A failing round starts the count again.
    /// - The ejection count is kept, so if requests fail again the next ejection is
    ///   longer (it still resets after `reset_after` healthy), and
    ///   [`HealthReport::ejections`](crate::HealthReport::ejections) includes the ejection
    ///   that ended early.
    ///
    /// Turn it off when the probe can pass while requests fail (a TCP connect probe in
    /// front of a service answering 5xx): then the endpoint would come back every few
    /// probe intervals only to fail `consecutive_failures` more requests, and each
    /// passive ejection should run its full time. Without a probe the setting changes
    /// nothing.
    pub uneject_on_probe_success: bool,
    /// A probe round slower than this fails its response-time check and makes the
    /// endpoint `Degraded` (default 1 s). Must be above 0 (every round would be slow).
    pub response_time_threshold: Duration,
    /// A share of failed probe rounds (over the last 20) above this fails the
    /// error-rate check and makes the endpoint `Degraded` (default 0.10, that is 10%).
    /// A share, not a percentage: within `0.0..=1.0` (1.0: never degraded by errors).
    pub error_rate_threshold: f64,
    /// Probe rounds kept for [`HealthReport`](crate::HealthReport) (default 100). At
    /// least 1: the report's last round is the newest one kept.
    pub history: usize,
}

/// The longest [`HealthConfig::max_ejection`] accepted: 1 day.
pub const MAX_EJECTION_LIMIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest [`FailureRate::window`] accepted: 10 ms (its 10 buckets of 1 ms).
pub const MIN_FAILURE_WINDOW: Duration = Duration::from_millis(10);

/// The shortest [`ActiveConfig::interval`] accepted: 10 ms.
///
/// Every round opens a connection or sends a request to the backend, from every client
/// instance: at 10 ms that is already 100 a second per backend per client. A zero
/// interval (an unset or mistyped setting) would probe as fast as the backend answers.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// The largest [`ActiveConfig::jitter`] accepted: 0.5, so probe rounds stay at least
/// half an interval apart.
pub const MAX_PROBE_JITTER: f64 = 0.5;

impl HealthConfig {
    /// Checks every field against its documented range.
    ///
    /// Returns every problem found, each with the field's path (`base_ejection`,
    /// `failure_rate.threshold`, …) and a message saying what is accepted and what was
    /// given. [`HealthLayer::try_new`](crate::HealthLayer::try_new) and the other
    /// constructors run it.
    pub fn validate(&self) -> Result<(), InvalidHealthConfig> {
        let mut problems = Vec::new();
        self.check("", &mut problems);
        InvalidHealthConfig::result(problems)
    }

    pub(crate) fn check(&self, prefix: &str, out: &mut Vec<HealthConfigProblem>) {
        let mut bad = |field: &str, message: String| {
            out.push(HealthConfigProblem {
                path: format!("{prefix}{field}"),
                message,
            })
        };
        if let Some(rate) = &self.failure_rate {
            let t = rate.threshold;
            if !(0.0..1.0).contains(&t) {
                let message = if t == 1.0 {
                    "must be below 1.0: a failure share never exceeds 1.0, so the detector \
                     would never eject (set failure_rate to None to turn it off)"
                        .to_string()
                } else {
                    format!("must be within 0.0..1.0 (a share, not a percentage), got {t:?}")
                };
                bad("failure_rate.threshold", message);
            }
            if rate.min_requests == 0 {
                bad(
                    "failure_rate.min_requests",
                    "must be at least 1 (the rate of an empty window means nothing)".into(),
                );
            }
            if rate.window < MIN_FAILURE_WINDOW {
                bad(
                    "failure_rate.window",
                    format!(
                        "must be at least {MIN_FAILURE_WINDOW:?} (10 buckets of 1ms), got {:?}",
                        rate.window
                    ),
                );
            }
        }
        if self.base_ejection.is_zero() {
            bad("base_ejection", "must be above 0".into());
        } else if self.base_ejection > self.max_ejection {
            bad(
                "base_ejection",
                format!(
                    "{:?} is above max_ejection ({:?})",
                    self.base_ejection, self.max_ejection
                ),
            );
        }
        if self.max_ejection > MAX_EJECTION_LIMIT {
            bad(
                "max_ejection",
                format!(
                    "must be at most 1 day ({MAX_EJECTION_LIMIT:?}), got {:?}",
                    self.max_ejection
                ),
            );
        }
        if self.response_time_threshold.is_zero() {
            bad(
                "response_time_threshold",
                "must be above 0 (every probe round would count as slow)".into(),
            );
        }
        let e = self.error_rate_threshold;
        if !(0.0..=1.0).contains(&e) {
            bad(
                "error_rate_threshold",
                format!("must be within 0.0..=1.0 (a share, not a percentage), got {e:?}"),
            );
        }
        if self.history == 0 {
            bad(
                "history",
                "must be at least 1 (the report's last round is kept there)".into(),
            );
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            consecutive_failures: 5,
            failure_rate: Some(FailureRate::default()),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            reset_after: Duration::from_secs(300),
            uneject_on_probe_success: true,
            response_time_threshold: Duration::from_secs(1),
            error_rate_threshold: 0.10,
            history: 100,
        }
    }
}

/// Ejects when the share of failed requests over a sliding window exceeds a threshold,
/// once the window holds enough requests to judge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureRate {
    /// The failure share that ejects once exceeded (default 0.5, that is 50%). A share,
    /// not a percentage: within `0.0..1.0` (0.0: any failure ejects; 1.0 and above
    /// could never be exceeded — set [`HealthConfig::failure_rate`] to `None` instead).
    pub threshold: f64,
    /// Requests the window must hold before the rate counts (default 20); at least 1.
    pub min_requests: u32,
    /// The window's length (default 10 s), kept in 10 buckets; at least 10 ms
    /// ([`MIN_FAILURE_WINDOW`]).
    pub window: Duration,
}

impl Default for FailureRate {
    fn default() -> Self {
        FailureRate {
            threshold: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
        }
    }
}

/// Active checking: a probe round every `interval` (± `jitter`), bounded by `timeout`.
///
/// Each field documents its unit and valid range; [`validate`](Self::validate) checks
/// them, and so do [`HealthLayer::probe`](crate::HealthLayer::probe) (which panics) and
/// [`HealthLayer::try_probe`](crate::HealthLayer::try_probe) (which returns the error).
///
/// ```
/// use std::time::Duration;
/// use marina_health::ActiveConfig;
///
/// let zero = ActiveConfig { interval: Duration::ZERO, ..ActiveConfig::default() };
/// let err = zero.validate().unwrap_err();
/// assert_eq!(err.problems[0].path, "interval");
/// assert_eq!(err.problems[0].message, "must be at least 10ms, got 0ns");
/// ```
///
/// # Schedule
///
/// The first round starts as soon as the endpoint's service is made. Each later round
/// is due `interval × (1 + r)` after the *start* of the round before, however long
/// that round took, with `r` drawn anew each time from `-jitter..=jitter`. A round
/// still running when the next is due (possible when `timeout` exceeds `interval`)
/// holds the next one back until it ends: the next starts at once then. Rounds never
/// overlap, so a backend sees at most one probe at a time from each endpoint service.
///
/// Two consecutive rounds therefore start `max(interval × (1 + r), d)` apart, `d`
/// being how long the first took (at most `timeout`), and never more than
///
/// ```text
/// P = max(interval × (1 + jitter), timeout)
/// ```
///
/// # How soon a failing backend is taken out (and brought back)
///
/// Write `fall` for [`unhealthy_threshold`](Self::unhealthy_threshold) and `d` for
/// how long a failing round takes. The endpoint is taken out when its `fall`-th
/// failing round in a row ends, at most
///
/// ```text
/// (fall − 1) × max(interval × (1 + jitter), d) + d
/// ```
///
/// after the first of those rounds started; and that first failing round starts
/// less than `P` after the backend began failing (the round before it started
/// earlier, and the next one follows within `P`).
///
/// - A **black hole** (a backend that accepts and never answers: every round runs
///   into `timeout`, `d = timeout`) is taken out within `(fall − 1) × P + timeout` of
///   the first failing round's start, so within `fall × P + timeout` of the moment it
///   stopped answering. With the defaults (10 s ± 10%, 2 s, fall 3): `P` = 11 s,
///   24 s from the first failing round, 35 s from the failure at worst. Without
///   jitter, and failing from the first round, it is taken out exactly
///   `(fall − 1) × max(interval, timeout) + timeout` after the service is made.
/// - A backend that **refuses at once** (connection refused: `d` ≈ 0) is taken out
///   within about `(fall − 1) × interval × (1 + jitter)` of its first failing round.
///
/// Coming back is the same with `healthy_threshold` passing rounds and their duration
/// for `d`.
///
/// # Cancellation
///
/// A round that runs into `timeout` fails, and its probe future is dropped before the
/// next round starts (at its next `.await`, at once). A probe that blocks its thread
/// cannot be stopped that way: the prober waits one more `timeout` for it, then
/// leaves it running and goes on, so only such a probe can overlap the next round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActiveConfig {
    /// Time between the starts of probe rounds (default 10 s); at least 10 ms
    /// ([`MIN_PROBE_INTERVAL`]). A round that takes longer delays the next to its own
    /// end (see [Schedule](Self#schedule)).
    pub interval: Duration,
    /// Each round starts up to this share of `interval` early or late (default 0.1,
    /// that is ±10%), so many clients do not probe in step. A share, within
    /// `0.0..=0.5` ([`MAX_PROBE_JITTER`]).
    pub jitter: f64,
    /// A probe round slower than this fails (default 2 s); must be above 0. It may
    /// exceed `interval`: rounds never overlap, so a round that runs this long starts
    /// the next one when it ends.
    pub timeout: Duration,
    /// Consecutive passing rounds that bring an endpoint taken out by probes back
    /// (rise, default 2); at least 1. They also end a passive ejection early, unless
    /// [`HealthConfig::uneject_on_probe_success`] is off.
    pub healthy_threshold: u32,
    /// Consecutive failing rounds that take it out (fall, default 3); at least 1. See
    /// [how soon](Self#how-soon-a-failing-backend-is-taken-out-and-brought-back) that
    /// is.
    pub unhealthy_threshold: u32,
}

impl Default for ActiveConfig {
    fn default() -> Self {
        ActiveConfig {
            interval: Duration::from_secs(10),
            jitter: 0.1,
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl ActiveConfig {
    /// Checks every field against its documented range; paths are the field names
    /// (`interval`, `jitter`, …). Where a layer or builder checks it beside a
    /// [`HealthConfig`], the paths start with `active.`.
    pub fn validate(&self) -> Result<(), InvalidHealthConfig> {
        let mut problems = Vec::new();
        self.check("", &mut problems);
        InvalidHealthConfig::result(problems)
    }

    pub(crate) fn check(&self, prefix: &str, out: &mut Vec<HealthConfigProblem>) {
        let mut bad = |field: &str, message: String| {
            out.push(HealthConfigProblem {
                path: format!("{prefix}{field}"),
                message,
            })
        };
        if self.interval < MIN_PROBE_INTERVAL {
            bad(
                "interval",
                format!(
                    "must be at least {MIN_PROBE_INTERVAL:?}, got {:?}",
                    self.interval
                ),
            );
        }
        let j = self.jitter;
        if !(0.0..=MAX_PROBE_JITTER).contains(&j) {
            bad(
                "jitter",
                format!(
                    "must be within 0.0..={MAX_PROBE_JITTER:?} (a share of interval, not a \
                     percentage), got {j:?}"
                ),
            );
        }
        if self.timeout.is_zero() {
            bad("timeout", "must be above 0".into());
        }
        if self.healthy_threshold == 0 {
            bad("healthy_threshold", "must be at least 1".into());
        }
        if self.unhealthy_threshold == 0 {
            bad("unhealthy_threshold", "must be at least 1".into());
        }
    }
}

/// One setting out of range, from [`HealthConfig::validate`] or
/// [`ActiveConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfigProblem {
    /// The setting at fault, as a path from the config checked: `base_ejection`,
    /// `failure_rate.threshold`, `interval`, or `active.interval` where a layer checked
    /// both configurations.
    pub path: String,
    /// What is wrong: the accepted range and the value given (lowercase, no period).
    pub message: String,
}

impl fmt::Display for HealthConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A health configuration that cannot be used: every problem found, each with its path.
///
/// Returned by [`HealthConfig::validate`], [`ActiveConfig::validate`] and the `try_`
/// constructors; its `Display` (one problem a line) is also the panic message of the
/// infallible ones.
///
/// ```
/// use std::time::Duration;
/// use marina_health::{ActiveConfig, HealthLayer, HealthConfig, TcpConnectProbe};
///
/// let addr: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
/// let active = ActiveConfig { interval: Duration::ZERO, healthy_threshold: 0, ..ActiveConfig::default() };
/// let err = HealthLayer::try_new(HealthConfig::default())
///     .unwrap()
///     .try_probe(active, TcpConnectProbe, addr)
///     .unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid health configuration:\n  \
///      active.interval: must be at least 10ms, got 0ns\n  \
///      active.healthy_threshold: must be at least 1",
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidHealthConfig {
    /// Every problem, in field order; never empty.
    pub problems: Vec<HealthConfigProblem>,
}

impl InvalidHealthConfig {
    pub(crate) fn result(problems: Vec<HealthConfigProblem>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidHealthConfig { problems })
        }
    }

    /// Whether the setting at `path` is among the problems.
    pub fn has(&self, path: &str) -> bool {
        self.problems.iter().any(|p| p.path == path)
    }
}

impl fmt::Display for InvalidHealthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid health configuration:")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidHealthConfig {}
