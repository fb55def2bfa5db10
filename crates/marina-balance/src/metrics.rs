//! The balancer's `metrics` handles (feature `metrics`): registered once, per endpoint
//! when it is added and balancer-wide when the balancer is built, and incremented from
//! there (no name or label is built per request).

use metrics::{Counter, Gauge, Histogram, Unit};

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "marina_balance_requests_total",
        Unit::Count,
        "Attempts sent to the endpoint (failover attempts and hedges included)."
    );
    describe_counter!(
        "marina_balance_errors_total",
        Unit::Count,
        "Attempts sent to the endpoint that failed."
    );
    describe_gauge!(
        "marina_balance_in_flight",
        Unit::Count,
        "Attempts in flight at the endpoint."
    );
    describe_histogram!(
        "marina_balance_request_duration_seconds",
        Unit::Seconds,
        "Response time of the endpoint's timed attempts (one in 8 first attempts; every failover attempt and hedge)."
    );
    describe_counter!(
        "marina_balance_failovers_total",
        Unit::Count,
        "Requests sent again to another endpoint after an attempt failed."
    );
    describe_counter!(
        "marina_balance_failovers_refused_total",
        Unit::Count,
        "Failover attempts and hedges the retry budget refused."
    );
    describe_counter!(
        "marina_balance_hedges_total",
        Unit::Count,
        "Hedges sent (a second attempt beside a slow one)."
    );
    describe_counter!(
        "marina_balance_hedges_won_total",
        Unit::Count,
        "Hedges whose reply was the one returned."
    );
    describe_counter!(
        "marina_balance_deadline_exceeded_total",
        Unit::Count,
        "Requests that failed because their overall deadline passed."
    );
    describe_counter!(
        "marina_balance_no_ready_endpoints_total",
        Unit::Count,
        "Requests failed at once because no endpoint was ready (fail fast)."
    );
    describe_gauge!(
        "marina_balance_endpoints",
        Unit::Count,
        "Endpoints by state (ready, unready)."
    );
    describe_gauge!(
        "marina_balance_panic_mode",
        Unit::Count,
        "1 while the panic threshold is crossed (routing over every endpoint), else 0; summed over balancers."
    );
}

/// One endpoint's handles, labelled `endpoint` = its key as text.
#[derive(Debug)]
pub(crate) struct EndpointMetrics {
    requests: Counter,
    errors: Counter,
    in_flight: Gauge,
    duration: Histogram,
}

impl EndpointMetrics {
    /// Registers the endpoint's handles with the recorder installed now (described
    /// once, when the balancer was built).
    pub(crate) fn new(endpoint: &str) -> Self {
        let label = || [("endpoint", endpoint.to_owned())];
        EndpointMetrics {
            requests: metrics::counter!("marina_balance_requests_total", &label()),
            errors: metrics::counter!("marina_balance_errors_total", &label()),
            in_flight: metrics::gauge!("marina_balance_in_flight", &label()),
            duration: metrics::histogram!("marina_balance_request_duration_seconds", &label()),
        }
    }

    /// An attempt was sent.
    #[inline]
    pub(crate) fn started(&self) {
        self.requests.increment(1);
        self.in_flight.increment(1.0);
    }

    /// An attempt ended (completed or dropped).
    #[inline]
    pub(crate) fn finished(&self) {
        self.in_flight.decrement(1.0);
    }

    /// An attempt failed.
    #[inline]
    pub(crate) fn failed(&self) {
        self.errors.increment(1);
    }

    /// A timed attempt took `seconds`.
    #[inline]
    pub(crate) fn timed(&self, seconds: f64) {
        self.duration.record(seconds);
    }
}

/// The balancer-wide counters (shared with the response futures).
#[derive(Debug)]
pub(crate) struct BalanceMetrics {
    pub(crate) failovers: Counter,
    pub(crate) failovers_refused: Counter,
    pub(crate) hedges: Counter,
    pub(crate) hedges_won: Counter,
    pub(crate) deadline_exceeded: Counter,
    pub(crate) no_ready_endpoints: Counter,
}

impl Default for BalanceMetrics {
    /// Registers the handles with the recorder installed now.
    fn default() -> Self {
        BalanceMetrics {
            failovers: metrics::counter!("marina_balance_failovers_total"),
            failovers_refused: metrics::counter!("marina_balance_failovers_refused_total"),
            hedges: metrics::counter!("marina_balance_hedges_total"),
            hedges_won: metrics::counter!("marina_balance_hedges_won_total"),
            deadline_exceeded: metrics::counter!("marina_balance_deadline_exceeded_total"),
            no_ready_endpoints: metrics::counter!("marina_balance_no_ready_endpoints_total"),
        }
    }
}

/// The balancer's gauges: endpoints by state and panic mode. Each balancer adds its
/// own figures to the gauges (increments and decrements, never `set`), so several
/// balancers in one process sum up, and a balancer dropped takes its figures back out.
#[derive(Debug)]
pub(crate) struct SetGauges {
    ready: Gauge,
    unready: Gauge,
    panic: Gauge,
    /// What this balancer added to `ready` and `unready` so far.
    counted: (usize, usize),
    panicking: bool,
}

impl SetGauges {
    /// Registers the handles with the recorder installed now (every state, at 0), and
    /// describes every metric of the balancer to it.
    pub(crate) fn new() -> Self {
        describe();
        SetGauges {
            ready: metrics::gauge!("marina_balance_endpoints", "state" => "ready"),
            unready: metrics::gauge!("marina_balance_endpoints", "state" => "unready"),
            panic: metrics::gauge!("marina_balance_panic_mode"),
            counted: (0, 0),
            panicking: false,
        }
    }

    /// The balancer now has `ready` and `unready` endpoints. O(1).
    pub(crate) fn endpoints(&mut self, ready: usize, unready: usize) {
        let (was_ready, was_unready) = self.counted;
        move_gauge(&self.ready, was_ready, ready);
        move_gauge(&self.unready, was_unready, unready);
        self.counted = (ready, unready);
    }

    /// Panic mode started or ended.
    pub(crate) fn panic(&mut self, panicking: bool) {
        if panicking != self.panicking {
            self.panicking = panicking;
            if panicking {
                self.panic.increment(1.0);
            } else {
                self.panic.decrement(1.0);
            }
        }
    }
}

fn move_gauge(gauge: &Gauge, from: usize, to: usize) {
    if to > from {
        gauge.increment((to - from) as f64);
    } else if to < from {
        gauge.decrement((from - to) as f64);
    }
}

impl Drop for SetGauges {
    fn drop(&mut self) {
        self.endpoints(0, 0);
        self.panic(false);
    }
}
