//! Slow start: an endpoint that comes back (or is new) gets a share of its picks that
//! grows over a window.

use std::time::Duration;

use tokio::time::Instant;

/// How [`Balance::slow_start`](crate::Balance::slow_start) ramps an endpoint's traffic
/// up (Envoy's `slow_start_window`, HAProxy's `slowstart`).
///
/// An endpoint *ramps* when it joins the ready set after being unready for at least
/// [`after_unready`](Self::after_unready) (default 1 s: an ejection by its health
/// checks ended, it reconnected — not a moment at a concurrency limit), or when it is
/// ready for the first time and was discovered after the balancer's first request (the
/// endpoints there at the start all begin cold together, so none ramps). While it
/// ramps, each time the picker chooses it the choice stands only a share of the time —
/// `max(min_share, elapsed / window)`, linear from `min_share` (default 10%) to 100%
/// at the end of the window — and otherwise the picker chooses again. The rest is
/// deterministic (a credit per endpoint, no random draw): over any stretch of its
/// ramp, the endpoint keeps that share of the choices that fell on it.
///
/// ```
/// use marina_balance::SlowStart;
/// use std::time::Duration;
///
/// let slow = SlowStart::new(Duration::from_secs(30))
///     .min_share(0.05)
///     .after_unready(Duration::from_secs(5));
/// assert_eq!(slow.window(), Duration::from_secs(30));
/// // A plain window converts.
/// let plain: SlowStart = Duration::from_secs(30).into();
/// assert_eq!(plain, SlowStart::new(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    window: Duration,
    min_share: f64,
    after_unready: Duration,
}

impl SlowStart {
    /// Ramps over `window` (zero: no ramp), from a 10% share, for endpoints unready
    /// for 1 s or more.
    pub fn new(window: Duration) -> Self {
        SlowStart {
            window,
            min_share: 0.1,
            after_unready: Duration::from_secs(1),
        }
    }

    /// The share of its picks a ramping endpoint keeps at the start of its window
    /// (Envoy's `min_weight_percent`, as a share; default 0.1).
    ///
    /// # Panics
    ///
    /// If `share` is not within `0.0..=1.0` (a share, not a percentage) or is NaN.
    pub fn min_share(mut self, share: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&share),
            "SlowStart::min_share: must be within 0.0..=1.0 (a share, not a percentage), got {share}"
        );
        self.min_share = share;
        self
    }

    /// How long an endpoint must have been unready for its return to ramp (default
    /// 1 s). Shorter unready spells — an endpoint at its concurrency limit, a pool
    /// momentarily full — do not restart a ramp.
    pub fn after_unready(mut self, unready: Duration) -> Self {
        self.after_unready = unready;
        self
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

impl From<Duration> for SlowStart {
    fn from(window: Duration) -> Self {
        SlowStart::new(window)
    }
}

/// One endpoint's slow-start state, kept by the balancer beside its slot.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlowState {
    /// Discovered after the balancer's first request and not yet ready: ramps when it
    /// first is.
    fresh: bool,
    /// When it left the ready set (while unready).
    down_since: Option<Instant>,
    /// Its ramp, while it lasts.
    ramp: Option<Ramp>,
}

#[derive(Debug, Clone)]
struct Ramp {
    since: Instant,
    /// Accumulated share: a choice stands when it reaches 1.
    credit: f64,
}

impl SlowState {
    /// A newly discovered endpoint's state.
    pub(crate) fn new(after_first_request: bool) -> Self {
        SlowState {
            fresh: after_first_request,
            down_since: None,
            ramp: None,
        }
    }

    /// It left the ready set.
    pub(crate) fn left(&mut self) {
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
    }

    /// It joined the ready set: starts a ramp if it is new or was unready long
    /// enough.
    pub(crate) fn joined(&mut self, config: &SlowStart) {
        let now = Instant::now();
        let long = self
            .down_since
            .take()
            .is_some_and(|t| now.saturating_duration_since(t) >= config.after_unready);
        if (self.fresh || long) && !config.window.is_zero() {
            self.ramp = Some(Ramp {
                since: now,
                credit: 0.0,
            });
        }
        self.fresh = false;
    }

    /// Whether it ramps (at the last look; the ramp's end is noticed at the next
    /// choice).
    pub(crate) fn ramping(&self) -> bool {
        self.ramp.is_some()
    }

    /// The picker chose it: whether the choice stands. `now` is read once per
    /// request, and only for a ramping endpoint.
    pub(crate) fn admit(&mut self, config: &SlowStart, now: &mut Option<Instant>) -> bool {
        let Some(ramp) = &mut self.ramp else {
            return true;
        };
        let now = *now.get_or_insert_with(Instant::now);
        let elapsed = now.saturating_duration_since(ramp.since);
        if elapsed >= config.window {
            self.ramp = None;
            return true;
        }
        let share = (elapsed.as_secs_f64() / config.window.as_secs_f64()).max(config.min_share);
        ramp.credit += share;
        if ramp.credit >= 1.0 {
            ramp.credit -= 1.0;
            true
        } else {
            false
        }
    }
}
