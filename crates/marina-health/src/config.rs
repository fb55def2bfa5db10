//! Health-check configuration.

use std::time::Duration;

/// How the health layer decides that an endpoint is failing, and for how long it is
/// taken out. Defaults follow Envoy's outlier detection and HAProxy's checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Consecutive failed requests that eject the endpoint (default 5); 0 disables.
    pub consecutive_failures: u32,
    /// The failure-rate detector; `None` disables it.
    pub failure_rate: Option<FailureRate>,
    /// Ejection time for the first ejection (default 30 s); the n-th lasts `n × base`.
    pub base_ejection: Duration,
    /// The longest an ejection lasts (default 300 s).
    pub max_ejection: Duration,
    /// After this long healthy, the ejection count starts again from zero (default 300 s).
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
    /// endpoint `Degraded` (default 1 s).
    pub response_time_threshold: Duration,
    /// A share of failed probe rounds (over the last 20) above this fails the
    /// error-rate check and makes the endpoint `Degraded` (default 0.10).
    pub error_rate_threshold: f64,
    /// Probe rounds kept for [`HealthReport`](crate::HealthReport) (default 100).
    pub history: usize,
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
    /// The failure share (0.0–1.0) that ejects (default 0.5).
    pub threshold: f64,
    /// Requests the window must hold before the rate counts (default 20).
    pub min_requests: u32,
    /// The window's length (default 10 s), kept in 10 buckets.
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

/// Active checking: a probe every `interval` (± `jitter`), bounded by `timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActiveConfig {
    /// Time between probe rounds (default 10 s).
    pub interval: Duration,
    /// Each round starts up to this share of `interval` early or late (default 0.1), so
    /// many clients do not probe in step.
    pub jitter: f64,
    /// A probe slower than this fails (default 2 s).
    pub timeout: Duration,
    /// Consecutive passing rounds that bring an endpoint taken out by probes back
    /// (rise, default 2). They also end a passive ejection early, unless
    /// [`HealthConfig::uneject_on_probe_success`] is off.
    pub healthy_threshold: u32,
    /// Consecutive failing rounds that take it out (fall, default 3).
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
