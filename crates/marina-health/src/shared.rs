//! The state every clone of a `Health<S>` shares: detectors, ejection, probe history.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use marina_core::GateMember;

use crate::config::{FailureRate, HealthConfig};
use crate::meter::{Cause, Meter};
use crate::report::{CheckResult, CheckRound, HealthReport, Status};

pub(crate) struct Shared {
    /// This state itself, for the timer that ends an ejection.
    this: std::sync::Weak<Shared>,
    pub(crate) key: Arc<str>,
    pub(crate) config: HealthConfig,
    state: Mutex<State>,
    /// Serving and not probed out: `gate` answers `Open` without the lock. Written
    /// at every unlock of `state` (see [`StateGuard`]), so it never lags a change.
    serving: AtomicBool,
    status: watch::Sender<Status>,
    /// Membership in a balancer's ejection gate (panic threshold), if any.
    member: std::sync::OnceLock<GateMember>,
    /// Metrics handles (feature `metrics`; nothing without it).
    meter: Meter,
}

/// The passive state machine.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Serving,
    Ejected {
        until: Instant,
    },
    /// After an ejection: one trial request (or probe round) decides. `epoch` numbers
    /// the half-open periods, so a claim from an earlier one is recognised as stale.
    HalfOpen {
        trial: bool,
        epoch: u64,
    },
}

struct State {
    mode: Mode,
    seen_outcome: bool,
    consecutive: u32,
    window: Window,
    ejections: u32,
    serving_since: Option<Instant>,
    /// Half-open periods so far (the epoch of trial claims).
    half_opens: u64,
    /// Taken out by active probes.
    probed_out: bool,
    /// Passive ejections so far, never reset: the number a probe round notes when it
    /// starts ([`RoundStart`]), so only rounds begun during the current ejection count
    /// towards ending it.
    ejection_seq: u64,
    /// Passing probe rounds in a row, each begun during the current passive ejection.
    passes_while_ejected: u32,
    probe_passes: u32,
    probe_fails: u32,
    last_success: Option<Instant>,
    history: VecDeque<CheckRound>,
    degraded: bool,
    /// The status last published (saves the watch channel's lock when unchanged).
    published: Status,
    /// Serving (not ejected, not half-open, not probed out) when last published: a
    /// change to `true` is a readmission.
    was_serving: bool,
    wakers: Vec<Waker>,
}

/// The locked state; at unlock, publishes whether `gate` may answer without the lock.
struct StateGuard<'a> {
    state: MutexGuard<'a, State>,
    serving: &'a AtomicBool,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let serving = self.state.mode == Mode::Serving && !self.state.probed_out;
        // Still under the lock: an unlock orders it before the next locker's changes.
        if self.serving.load(Relaxed) != serving {
            self.serving.store(serving, Release);
        }
    }
}

/// Failure counts in 10 buckets over the window.
struct Window {
    epoch: Instant,
    bucket: Duration,
    slots: [(u64, u32, u32); 10],
}

impl Window {
    fn new(rate: Option<FailureRate>) -> Self {
        let window = rate.map_or(Duration::from_secs(10), |r| r.window);
        Window {
            epoch: Instant::now(),
            bucket: (window / 10).max(Duration::from_millis(1)),
            slots: [(u64::MAX, 0, 0); 10],
        }
    }

    fn index(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.bucket.as_nanos()) as u64
    }

    fn record(&mut self, idx: u64, failed: bool) {
        let slot = &mut self.slots[(idx % 10) as usize];
        if slot.0 != idx {
            *slot = (idx, 0, 0);
        }
        slot.1 += 1;
        slot.2 += failed as u32;
    }

    /// (requests, failures) within the window ending at bucket `idx`.
    fn totals(&self, idx: u64) -> (u32, u32) {
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 + 10 > idx && s.0 <= idx)
            .fold((0, 0), |(t, f), s| (t + s.1, f + s.2))
    }

    fn clear(&mut self) {
        self.slots = [(u64::MAX, 0, 0); 10];
    }
}

/// Noted when a probe round starts (see [`Shared::probe_started`]): which passive
/// ejection, if any, was in force by then.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoundStart {
    ejection_seq: u64,
}

/// What `poll_ready` may do now.
pub(crate) enum Gate {
    Open,
    /// Closed until this instant at the latest (a passive ejection); the caller sleeps
    /// until then. Its waker is registered too: passing probes can end the ejection
    /// sooner.
    Until(Instant),
    /// Closed until a status change wakes the registered waker.
    Wait,
}

impl Shared {
    pub(crate) fn new(key: Arc<str>, config: HealthConfig) -> Arc<Self> {
        let (status, _) = watch::channel(Status::Unknown);
        Arc::new_cyclic(|this| Shared {
            this: this.clone(),
            serving: AtomicBool::new(true),
            state: Mutex::new(State {
                mode: Mode::Serving,
                seen_outcome: false,
                consecutive: 0,
                window: Window::new(config.failure_rate),
                ejections: 0,
                serving_since: None,
                half_opens: 0,
                probed_out: false,
                ejection_seq: 0,
                passes_while_ejected: 0,
                probe_passes: 0,
                probe_fails: 0,
                last_success: None,
                history: VecDeque::new(),
                degraded: false,
                published: Status::Unknown,
                was_serving: true,
                wakers: Vec::new(),
            }),
            config,
            status,
            member: std::sync::OnceLock::new(),
            meter: Meter::new(&key),
            key,
        })
    }

    pub(crate) fn set_member(&self, member: Option<GateMember>) {
        if let Some(m) = member {
            let _ = self.member.set(m);
        }
    }

    /// The balancer is in panic mode: ejected endpoints take traffic.
    fn gate_open(&self) -> bool {
        self.member.get().is_some_and(GateMember::gate_open)
    }

    fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            state: self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            serving: &self.serving,
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    pub(crate) fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Readiness. `holds_trial` is the caller's claim on the half-open trial.
    pub(crate) fn gate(&self, waker: &Waker, holds_trial: &mut Option<u64>) -> Gate {
        if self.serving.load(Acquire) {
            // Serving (the common case): open, no lock. A claim from a half-open period
            // is stale then.
            *holds_trial = None;
            return Gate::Open;
        }
        if self.gate_open() {
            // Panic mode: the balancer routes over every endpoint, ejected or not.
            return Gate::Open;
        }
        let mut st = self.lock();
        if st.probed_out {
            register(&mut st.wakers, waker);
            return Gate::Wait;
        }
        if let Mode::Ejected { until } = st.mode {
            if Instant::now() < until {
                // The caller sleeps until `until` on its own timer; passing probe rounds
                // may end the ejection before that, and then wake it through here.
                register(&mut st.wakers, waker);
                return Gate::Until(until);
            }
            self.half_open(&mut st);
        }
        match st.mode {
            Mode::HalfOpen { trial, epoch } => {
                if *holds_trial == Some(epoch) {
                    Gate::Open
                } else if !trial {
                    st.mode = Mode::HalfOpen { trial: true, epoch };
                    *holds_trial = Some(epoch);
                    Gate::Open
                } else {
                    *holds_trial = None;
                    register(&mut st.wakers, waker);
                    Gate::Wait
                }
            }
            _ => {
                // A claim from a half-open period that has since been decided.
                *holds_trial = None;
                Gate::Open
            }
        }
    }

    /// A trial claim given up without a decision (its service or response dropped).
    pub(crate) fn release_trial(&self, claim: u64) {
        let mut st = self.lock();
        if let Mode::HalfOpen { trial: true, epoch } = st.mode
            && epoch == claim
        {
            st.mode = Mode::HalfOpen {
                trial: false,
                epoch,
            };
            wake(&mut st);
        }
    }

    /// A request completed; `trial` is its claim if it was sent as a half-open trial.
    pub(crate) fn record(&self, failed: bool, trial: Option<u64>) {
        if failed {
            self.meter.failure();
        }
        let mut st = self.lock();
        st.seen_outcome = true;
        match st.mode {
            Mode::Ejected { .. } => {} // a late answer from before the ejection
            Mode::HalfOpen { epoch, .. } if trial != Some(epoch) => {}
            Mode::HalfOpen { .. } => {
                if failed {
                    self.eject(&mut st, "half-open trial failed", Cause::Passive);
                } else {
                    self.recover(&mut st, "half-open trial succeeded");
                }
            }
            Mode::Serving => {
                if failed {
                    st.consecutive += 1;
                } else {
                    st.consecutive = 0;
                }
                let mut tripped = None;
                let threshold = self.config.consecutive_failures;
                if threshold > 0 && st.consecutive >= threshold {
                    tripped = Some("consecutive failures");
                }
                if let Some(rate) = self.config.failure_rate {
                    let idx = st.window.index(Instant::now());
                    st.window.record(idx, failed);
                    let (total, fails) = st.window.totals(idx);
                    if total >= rate.min_requests
                        && f64::from(fails) > rate.threshold * f64::from(total)
                    {
                        tripped = tripped.or(Some("failure rate"));
                    }
                }
                match tripped {
                    Some(reason) => self.eject(&mut st, reason, Cause::Passive),
                    None => self.publish(&mut st, "request completed"),
                }
            }
        }
    }

    /// Ends a timed ejection: half-open, one trial decides.
    fn half_open(&self, st: &mut State) {
        st.half_opens += 1;
        st.mode = Mode::HalfOpen {
            trial: false,
            epoch: st.half_opens,
        };
        self.publish(st, "ejection ended: half-open");
        wake(st);
    }

    /// Called by the ejection's timer: publishes the end of the ejection even if nobody
    /// polls the service (a subscriber learns the endpoint is half-open).
    fn ejection_due(&self, until: Instant) {
        let mut st = self.lock();
        if st.mode == (Mode::Ejected { until }) {
            self.half_open(&mut st);
        }
    }

    /// A timed ejection: by the passive detectors, or by a failed half-open trial
    /// (a request: `Cause::Passive`; a probe round: `Cause::Active`).
    fn eject(&self, st: &mut State, reason: &str, cause: Cause) {
        let now = Instant::now();
        if st
            .serving_since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.config.reset_after)
        {
            st.ejections = 0;
        }
        st.ejections += 1;
        // Probe rounds already under way, or passing before the ejection, do not count
        // towards ending it.
        st.ejection_seq += 1;
        st.passes_while_ejected = 0;
        let d = self
            .config
            .base_ejection
            .saturating_mul(st.ejections)
            .min(self.config.max_ejection);
        let until = now + d;
        st.mode = Mode::Ejected { until };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let this = self.this.clone();
            rt.spawn(async move {
                tokio::time::sleep_until(until).await;
                if let Some(shared) = this.upgrade() {
                    shared.ejection_due(until);
                }
            });
        }
        st.consecutive = 0;
        st.window.clear();
        st.serving_since = None;
        self.meter.ejected(cause);
        tracing::warn!(
            endpoint = %self.key,
            cause = cause.as_str(),
            reason,
            ejection = st.ejections,
            ejected_for = ?d,
            "endpoint ejected"
        );
        self.publish(st, reason);
        // Callers parked behind a half-open trial must learn the new deadline and set
        // their own timers.
        wake(st);
    }

    fn recover(&self, st: &mut State, reason: &str) {
        st.mode = Mode::Serving;
        st.consecutive = 0;
        st.window.clear();
        st.serving_since = Some(Instant::now());
        self.publish(st, reason);
        wake(st);
    }

    /// A probe round is starting: the mark goes back with its result to
    /// [`record_probe`](Self::record_probe).
    pub(crate) fn probe_started(&self) -> RoundStart {
        RoundStart {
            ejection_seq: self.lock().ejection_seq,
        }
    }

    /// A probe round, begun at `start`, ended: `Ok(response time)` or the failure.
    /// `rise`/`fall` are the active thresholds.
    pub(crate) fn record_probe(
        &self,
        result: Result<Duration, String>,
        start: RoundStart,
        rise: u32,
        fall: u32,
    ) {
        let (rise, fall) = (rise.max(1), fall.max(1));
        let now = Instant::now();
        let mut st = self.lock();
        let passed = result.is_ok();
        if passed {
            st.last_success = Some(now);
        }
        let cap = self.config.history.max(1);
        // The error rate of the recent rounds (this one and up to 19 before it), so one
        // blip does not mark the endpoint degraded for the whole history.
        let (fails, total) = st
            .history
            .iter()
            .rev()
            .take(19)
            .fold((u32::from(!passed), 1u32), |(f, t), r| {
                (f + u32::from(!r.passed), t + 1)
            });
        let error_rate = f64::from(fails) / f64::from(total);
        let mut checks = Vec::with_capacity(4);
        checks.push(match &result {
            Ok(_) => check("socket", true, "answered".into(), "ok".into()),
            Err(e) => check("socket", false, "no answer".into(), e.clone()),
        });
        let slow = result
            .as_ref()
            .is_ok_and(|rt| *rt > self.config.response_time_threshold);
        checks.push(match &result {
            Ok(rt) => check(
                "response_time",
                !slow,
                format!("{rt:?}"),
                if slow {
                    format!(
                        "over the {:?} threshold",
                        self.config.response_time_threshold
                    )
                } else {
                    "ok".into()
                },
            ),
            Err(_) => check("response_time", false, "-".into(), "no answer".into()),
        });
        let high = error_rate > self.config.error_rate_threshold;
        checks.push(check(
            "error_rate",
            !high,
            format!("{:.0}%", error_rate * 100.0),
            if high {
                format!("over {:.0}%", self.config.error_rate_threshold * 100.0)
            } else {
                "ok".into()
            },
        ));
        let age = st.last_success.map(|t| now.saturating_duration_since(t));
        checks.push(check(
            "age",
            passed,
            age.map_or("never".into(), |a| format!("{a:?} since the last answer")),
            if passed { "ok".into() } else { "stale".into() },
        ));
        st.history.push_back(CheckRound {
            at: now,
            passed,
            response_time: result.as_ref().ok().copied(),
            checks,
        });
        while st.history.len() > cap {
            st.history.pop_front();
        }
        // Slow answers, or a high recent error rate (failing rounds not yet enough to
        // take the endpoint out), mark it degraded.
        st.degraded = (passed && slow) || high;
        self.meter.probe(result.as_ref().ok().copied());
        match &result {
            Ok(rt) => {
                tracing::debug!(endpoint = %self.key, response_time = ?rt, "health probe passed")
            }
            Err(e) => tracing::debug!(endpoint = %self.key, error = %e, "health probe failed"),
        }
        // Transitions only (the first failing round after passing ones, and back), not
        // every round.
        match &result {
            Err(e) if st.probe_fails == 0 => tracing::info!(
                endpoint = %self.key,
                error = %e,
                unhealthy_threshold = fall,
                "health probe failing"
            ),
            Ok(_) if st.probe_fails > 0 => tracing::info!(
                endpoint = %self.key,
                failed_rounds = st.probe_fails,
                "health probe passing again"
            ),
            _ => {}
        }
        if passed {
            st.probe_fails = 0;
            st.probe_passes += 1;
        } else {
            st.probe_passes = 0;
            st.probe_fails += 1;
        }
        st.seen_outcome = true;
        // Half-open: a probe round decides like a trial request.
        if let Mode::Ejected { until } = st.mode
            && now >= until
        {
            self.half_open(&mut st);
        }
        if let Mode::HalfOpen { .. } = st.mode {
            if passed {
                self.recover(&mut st, "half-open probe passed");
            } else {
                self.eject(&mut st, "half-open probe failed", Cause::Active);
            }
        }
        // Still within a passive ejection: `rise` passing rounds in a row, each begun
        // after the ejection, end it now (Envoy's
        // `successful_active_health_check_uneject_host`). Straight back to serving, no
        // half-open trial: a half-open endpoint is decided by a single probe round.
        if !passed {
            st.passes_while_ejected = 0;
        } else if let Mode::Ejected { .. } = st.mode
            && start.ejection_seq == st.ejection_seq
        {
            st.passes_while_ejected += 1;
            if self.config.uneject_on_probe_success && st.passes_while_ejected >= rise {
                self.recover(
                    &mut st,
                    "active probes passing: passive ejection ended early",
                );
            }
        }
        if !st.probed_out && st.probe_fails >= fall {
            st.probed_out = true;
            self.meter.ejected(Cause::Active);
            tracing::warn!(
                endpoint = %self.key,
                cause = Cause::Active.as_str(),
                reason = "active probes failing",
                failed_rounds = st.probe_fails,
                until = "probes pass",
                "endpoint ejected"
            );
            self.publish(&mut st, "active probes failing");
        } else if st.probed_out && st.probe_passes >= rise {
            st.probed_out = false;
            self.publish(&mut st, "active probes passing again");
            wake(&mut st);
        } else {
            self.publish(&mut st, "probe round");
        }
    }

    fn publish(&self, st: &mut State, reason: &str) {
        // Back to serving (whatever the status reads: a half-open endpoint that passes
        // its trial can go from `Degraded` to `Degraded`) is a readmission.
        let serving = st.mode == Mode::Serving && !st.probed_out;
        if serving != st.was_serving {
            st.was_serving = serving;
            if serving {
                self.meter.readmitted();
                tracing::info!(endpoint = %self.key, reason, "endpoint readmitted");
            }
        }
        let new = status_of(st);
        // Most calls (a request completed, a probe passed) change nothing: no lock on
        // the watch channel then.
        if new == st.published {
            return;
        }
        st.published = new;
        self.meter.status(new);
        // The lock-free flag `gate` reads first, before anyone hears of the change (the
        // balancer through its gate, watchers through the channel): else a request right
        // after an ejection could still find it `true` (the guard writes it at unlock,
        // after this) and be let through.
        self.serving
            .store(st.mode == Mode::Serving && !st.probed_out, Release);
        if let Some(m) = self.member.get() {
            m.set_ejected(matches!(new, Status::Ejected { .. }));
        }
        let key = &self.key;
        self.status.send_if_modified(|old| {
            if *old == new {
                return false;
            }
            tracing::debug!(endpoint = %key, from = %*old, to = %new, reason, "health status changed");
            *old = new;
            true
        });
    }

    pub(crate) fn report(&self) -> HealthReport {
        let st = self.lock();
        let recent = st.history.len();
        let healthy = st.history.iter().filter(|r| r.passed).count();
        let idx = st.window.index(Instant::now());
        HealthReport {
            status: status_of(&st),
            health_percent: if recent == 0 {
                100.0
            } else {
                healthy as f64 * 100.0 / recent as f64
            },
            recent,
            healthy,
            unhealthy: recent - healthy,
            last: st.history.back().cloned(),
            consecutive_failures: st.consecutive,
            window: st.window.totals(idx),
            ejections: if st.serving_since.is_some_and(|since| {
                Instant::now().saturating_duration_since(since) >= self.config.reset_after
            }) {
                0
            } else {
                st.ejections
            },
        }
    }
}

fn check(name: &'static str, passed: bool, value: String, message: String) -> CheckResult {
    CheckResult {
        name,
        passed,
        value,
        message,
    }
}

fn status_of(st: &State) -> Status {
    if st.probed_out {
        return Status::Ejected { until: None };
    }
    match st.mode {
        Mode::Ejected { until } => Status::Ejected { until: Some(until) },
        Mode::HalfOpen { .. } => Status::Degraded,
        Mode::Serving if !st.seen_outcome => Status::Unknown,
        Mode::Serving if st.degraded => Status::Degraded,
        Mode::Serving => Status::Healthy,
    }
}

fn register(wakers: &mut Vec<Waker>, waker: &Waker) {
    // Waiters that gave up leave their wakers behind; past a bound, wake everyone (a
    // spurious wake-up only makes a task poll again) and start over.
    if wakers.len() >= 256 {
        for w in wakers.drain(..) {
            w.wake();
        }
    }
    if !wakers.iter().any(|w| w.will_wake(waker)) {
        wakers.push(waker.clone());
    }
}

fn wake(st: &mut State) {
    for w in st.wakers.drain(..) {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_only_its_last_ten_buckets() {
        let mut w = Window::new(Some(FailureRate::default()));
        for i in 0..10 {
            w.record(i, i % 2 == 0);
        }
        assert_eq!(w.totals(9), (10, 5));
        // Bucket 10 reuses slot 0: bucket 0's counts drop out of the window.
        w.record(10, false);
        assert_eq!(w.totals(10), (10, 4));
        // Far in the future, everything has aged out.
        assert_eq!(w.totals(100), (0, 0));
        w.clear();
        assert_eq!(w.totals(10), (0, 0));
    }

    #[test]
    fn status_follows_mode_probes_and_outcomes() {
        let shared = Shared::new("t".into(), HealthConfig::default());
        assert_eq!(shared.status(), Status::Unknown);
        shared.record(false, None);
        assert_eq!(shared.status(), Status::Healthy);
        // Probes taking the endpoint out win over a healthy passive state.
        for _ in 0..3 {
            shared.record_probe(Err("refused".into()), shared.probe_started(), 2, 3);
        }
        assert_eq!(shared.status(), Status::Ejected { until: None });
        shared.record_probe(Ok(Duration::from_millis(1)), shared.probe_started(), 2, 3);
        assert_eq!(
            shared.status(),
            Status::Ejected { until: None },
            "one pass is not enough"
        );
        shared.record_probe(Ok(Duration::from_millis(1)), shared.probe_started(), 2, 3);
        // Back in, but the recent error rate (3 of 5 rounds) is over 10%: degraded.
        assert_eq!(shared.status(), Status::Degraded);
        let report = shared.report();
        assert_eq!((report.recent, report.healthy, report.unhealthy), (5, 2, 3));
        let last = report.last.unwrap();
        let names: Vec<_> = last.checks.iter().map(|c| c.name).collect();
        assert_eq!(names, ["socket", "response_time", "error_rate", "age"]);
        assert!(last.checks[0].passed && !last.checks[2].passed);
    }

    #[test]
    fn history_is_bounded() {
        let shared = Shared::new(
            "t".into(),
            HealthConfig {
                history: 4,
                ..HealthConfig::default()
            },
        );
        for _ in 0..10 {
            shared.record_probe(Ok(Duration::from_millis(1)), shared.probe_started(), 2, 3);
        }
        let r = shared.report();
        assert_eq!((r.recent, r.health_percent), (4, 100.0));
    }
}
