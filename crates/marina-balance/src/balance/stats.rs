//! Per-endpoint counters and the peak-EWMA latency estimate, shared by the balancer,
//! its response futures and the handle; snapshots and totals.

use super::*;

/// One endpoint's counters, shared with its response futures and the handle.
#[derive(Debug)]
pub(crate) struct EndpointStats {
    /// The endpoint's id.
    pub(crate) id: EndpointId,
    /// Requests dropped before they completed.
    pub(crate) cancelled: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Requests in flight (low 24 bits) and finished (completed or cancelled, the rest):
    /// one atomic add starts a request, one ends it.
    pub(crate) flow: AtomicU64,
    pub(crate) latency_total_us: AtomicU64,
    /// Completed requests that were timed (one in `TIME_EVERY`).
    pub(crate) timed: AtomicU64,
    /// Peak EWMA of response time: its value in microseconds as `f32` bits (high
    /// half) and the time of its last change in milliseconds since `origin`, wrapping
    /// (low half), in one word so that one compare-exchange updates both; `NO_EWMA`
    /// before the first timed response.
    pub(crate) ewma: AtomicU64,
    /// What the balancer's endpoints share: the zero of `ewma`'s clock, the running
    /// count of requests in flight.
    pub(crate) common: Arc<Common>,
    /// The endpoint's key, as text (for [`BalanceHandle::stats`]).
    pub(crate) key: Box<str>,
    pub(crate) weight: u32,
    pub(crate) ready: AtomicBool,
    /// Its requests count in `common.in_flight` (for a picker that reads the total).
    pub(crate) counts_total: bool,
    /// Its `metrics` handles, labelled with `key`.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::metrics::EndpointMetrics,
}

/// What a balancer's endpoints share.
#[derive(Debug)]
pub(crate) struct Common {
    /// The zero of every endpoint's EWMA clock.
    pub(crate) origin: Instant,
    /// Requests in flight over all endpoints, when a picker reads the total load.
    pub(crate) in_flight: AtomicU64,
    pub(crate) counts_total: bool,
}

impl Common {
    pub(crate) fn new(counts_total: bool) -> Arc<Self> {
        Arc::new(Common {
            origin: Instant::now(),
            in_flight: AtomicU64::new(0),
            counts_total,
        })
    }
}

/// `EndpointStats::ewma` before the first sample (an `f32` NaN: never a value).
pub(crate) const NO_EWMA: u64 = u64::MAX;

/// The peak EWMA's decay time constant, in milliseconds (tower's `PeakEwma` default,
/// 10 s): a past estimate weighs e^(−t/τ) after t.
pub(crate) const EWMA_DECAY_MS: f64 = 10_000.0;

/// A late update whose clock reading is at most this far behind the estimate's (a
/// thread that read the clock, then lost a race) counts as simultaneous; further
/// behind, the 32-bit millisecond clock wrapped (about 49.7 days without a sample).
pub(crate) const EWMA_LATE_MS: i32 = 60_000;

/// The weight left to the previous estimate after `elapsed_ms`: (1 − t/32τ)^32, an
/// approximation of e^(−t/τ) from five multiplications (no `exp` per sample): within
/// 0.01 of it everywhere, never above it, and 0 from 32τ on. Consecutive samples
/// compose to e^(−T/τ) over the total time T, so the decay follows the time that
/// passed, not the number of samples.
pub(crate) fn ewma_decay(elapsed_ms: u32) -> f64 {
    let x = f64::from(elapsed_ms) / (32.0 * EWMA_DECAY_MS);
    if x >= 1.0 {
        return 0.0;
    }
    let mut w = 1.0 - x;
    for _ in 0..5 {
        w *= w;
    }
    w
}

/// `flow` bits: in flight below, finished above.
pub(crate) const IN_FLIGHT_BITS: u32 = 24;
pub(crate) const IN_FLIGHT_MASK: u64 = (1 << IN_FLIGHT_BITS) - 1;
/// Added to `flow` when a request ends: one more finished, one fewer in flight.
pub(crate) const FINISH: u64 = (1 << IN_FLIGHT_BITS) - 1;

impl EndpointStats {
    pub(crate) fn in_flight(&self) -> u64 {
        self.flow.load(Relaxed) & IN_FLIGHT_MASK
    }

    #[cfg(test)]
    pub(crate) fn new(id: EndpointId) -> Self {
        Self::with(id, Box::from(""), 1, &Common::new(false))
    }

    pub(crate) fn with(id: EndpointId, key: Box<str>, weight: u32, common: &Arc<Common>) -> Self {
        EndpointStats {
            id,
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::EndpointMetrics::new(&key),
            key,
            weight,
            counts_total: common.counts_total,
            common: common.clone(),
            cancelled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            flow: AtomicU64::new(0),
            latency_total_us: AtomicU64::new(0),
            timed: AtomicU64::new(0),
            ewma: AtomicU64::new(NO_EWMA),
            ready: AtomicBool::new(false),
        }
    }

    /// The zero of the EWMA's clock.
    pub(crate) fn origin(&self) -> Instant {
        self.common.origin
    }

    pub(crate) fn ewma(&self) -> Option<Duration> {
        let word = self.ewma.load(Relaxed);
        (word != NO_EWMA).then(|| {
            let us = f32::from_bits((word >> 32) as u32);
            Duration::from_secs_f64(f64::from(us) / 1e6)
        })
    }

    /// A request was sent.
    pub(crate) fn started(&self) {
        self.flow.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.started();
        if self.counts_total {
            self.common.in_flight.fetch_add(1, Relaxed);
        }
    }

    /// A request ended: completed, or `cancelled` (dropped first).
    pub(crate) fn finished(&self, cancelled: bool) {
        if cancelled {
            self.cancelled.fetch_add(1, Relaxed);
        }
        self.flow.fetch_add(FINISH, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.finished();
        if self.counts_total {
            self.common.in_flight.fetch_sub(1, Relaxed);
        }
    }

    /// A request completed; `start` when it was one of the timed ones.
    #[inline]
    pub(crate) fn observe(&self, start: Option<Instant>, failed: bool) {
        if let Some(start) = start {
            self.observe_timed(start);
        }
        if failed {
            self.errors.fetch_add(1, Relaxed);
            #[cfg(feature = "metrics")]
            self.metrics.failed();
        }
    }

    /// A timed request sent at `start` completed.
    pub(crate) fn observe_timed(&self, start: Instant) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start);
        self.sample(now, elapsed);
        #[cfg(feature = "metrics")]
        self.metrics.timed(elapsed.as_secs_f64());
        self.latency_total_us
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        self.timed.fetch_add(1, Relaxed);
    }

    /// Feeds a response time measured at `now` to the peak EWMA (tower's `PeakEwma`
    /// rule): a slower response than the estimate becomes the estimate at once; a
    /// faster one pulls it down by the time since the estimate last changed, so a
    /// burst of responses moves it by as little as the burst lasted, and after an idle
    /// gap of a few τ the next response all but replaces it. Lock-free: a
    /// compare-exchange loop over the value and its clock together, so concurrent
    /// samples never lose a peak nor decay the same time twice.
    pub(crate) fn sample(&self, now: Instant, rtt: Duration) {
        let us = rtt.as_secs_f64() * 1e6;
        // Milliseconds since `origin`, wrapping at 2^32.
        let stamp = now.saturating_duration_since(self.origin()).as_millis() as u32;
        let mut cur = self.ewma.load(Relaxed);
        loop {
            let (value, at) = if cur == NO_EWMA {
                (us, stamp)
            } else {
                let old = f64::from(f32::from_bits((cur >> 32) as u32));
                let last = cur as u32;
                let ahead = stamp.wrapping_sub(last) as i32;
                let (elapsed, at) = if ahead >= 0 {
                    (ahead.unsigned_abs(), stamp)
                } else if ahead > -EWMA_LATE_MS {
                    // Read the clock before the estimate's last change: no time passed.
                    (0, last)
                } else {
                    (u32::MAX, stamp)
                };
                if us >= old {
                    (us, at)
                } else {
                    let w = ewma_decay(elapsed);
                    if w == 1.0 {
                        return; // no time passed: a faster response changes nothing
                    }
                    (old * w + us * (1.0 - w), at)
                }
            };
            let word = (u64::from((value as f32).to_bits()) << 32) | u64::from(at);
            match self.ewma.compare_exchange_weak(cur, word, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(now_there) => cur = now_there,
            }
        }
    }
}

/// A snapshot of one endpoint, from [`BalanceHandle::stats`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointSnapshot {
    /// The endpoint's key, as text.
    pub key: String,
    /// Its id.
    pub id: EndpointId,
    /// Requests sent to it.
    pub requests: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// `errors / completed requests` (0 with none).
    pub error_rate: f64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Mean response time (of the timed requests: one in 8).
    pub avg_latency: Option<Duration>,
    /// Peak EWMA of response time (of the timed requests), as tower's `PeakEwma`
    /// keeps it: a response slower than the estimate becomes the estimate at once; a
    /// faster one pulls it toward itself by the time since the estimate last changed,
    /// with a decay time of 10 s (the old estimate weighs about e^(−t/10 s)), so a
    /// burst of fast responses moves it by as little as the burst lasted, and after an
    /// idle spell of a minute the next response all but replaces it. It changes only
    /// when a timed response completes (it does not decay while no request is timed).
    /// What [`LeastResponseTime`](crate::LeastResponseTime) reads.
    pub ewma_latency: Option<Duration>,
    /// Its weight (1 unless set by [`Balance::weights`] or [`Weighted`](crate::Weighted)).
    pub weight: u32,
    /// Ready at the last look (false: pending).
    pub ready: bool,
}

/// Balancer-wide counters.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) retries: AtomicU64,
    pub(crate) sent_retries: AtomicU64,
    pub(crate) retries_refused: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) hedges_won: AtomicU64,
    pub(crate) deadlines_exceeded: AtomicU64,
    pub(crate) panicking: AtomicBool,
    /// The balancer-wide `metrics` handles.
    #[cfg(feature = "metrics")]
    metrics: crate::metrics::BalanceMetrics,
}

impl Totals {
    /// A request goes to another endpoint; `sent`: its failed attempt may have
    /// reached its endpoint (an idempotent request's retry).
    pub(crate) fn failed_over(&self, sent: bool) {
        self.retries.fetch_add(1, Relaxed);
        if sent {
            self.sent_retries.fetch_add(1, Relaxed);
        }
        #[cfg(feature = "metrics")]
        self.metrics.failovers.increment(1);
    }

    /// The retry budget refused a failover attempt or a hedge.
    pub(crate) fn retry_refused(&self) {
        self.retries_refused.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.failovers_refused.increment(1);
    }

    /// A hedge was sent.
    pub(crate) fn hedged(&self) {
        self.hedges.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.hedges.increment(1);
    }

    /// A hedge's reply was the one returned.
    pub(crate) fn hedge_won(&self) {
        self.hedges_won.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.hedges_won.increment(1);
    }

    /// A request's deadline passed.
    pub(crate) fn deadline_exceeded(&self) {
        self.deadlines_exceeded.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics.deadline_exceeded.increment(1);
    }

    /// A request failed at once: no endpoint was ready.
    #[inline]
    pub(crate) fn no_ready_endpoints(&self) {
        #[cfg(feature = "metrics")]
        self.metrics.no_ready_endpoints.increment(1);
    }
}

/// Balancer-wide figures, from [`BalanceHandle::totals`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BalanceTotals {
    /// Endpoints known now.
    pub endpoints: usize,
    /// Of those, ready at the last look.
    pub ready: usize,
    /// Of those, pending (not ready: ejected, at a concurrency limit, connecting).
    pub pending: usize,
    /// Requests sent, over the current endpoints (failover attempts included).
    pub requests: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Failover attempts made (a request sent again to another endpoint after its
    /// attempt failed), retries of idempotent requests included.
    pub retries: u64,
    /// Of `retries`, those of idempotent requests after an error that did not prove
    /// the request unsent (it may have run twice). See
    /// [`Failover::retry_idempotent_if`](crate::Failover::retry_idempotent_if).
    pub sent_retries: u64,
    /// Failover attempts and hedges the retry budget refused.
    pub retries_refused: u64,
    /// Hedges sent (see [`Failover::hedge`](crate::Failover::hedge)).
    pub hedges: u64,
    /// Of `hedges`, those whose reply was the one returned (the other attempt was
    /// cancelled).
    pub hedges_won: u64,
    /// Requests that failed with [`DeadlineExceeded`](crate::DeadlineExceeded).
    pub deadlines_exceeded: u64,
    /// The panic threshold is crossed: requests go to every endpoint, healthy or not.
    pub panicking: bool,
}

/// `n` and the noun, plural unless `n` is 1.
fn count(f: &mut fmt::Formatter<'_>, n: u64, one: &str, many: &str) -> fmt::Result {
    write!(f, "{n} {}", if n == 1 { one } else { many })
}

/// A response time as a person reads it: "850 µs", "12.3 ms", "2.50 s".
struct Human(Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs_f64();
        if secs < 1e-3 {
            write!(f, "{} µs", self.0.as_micros())
        } else if secs < 1.0 {
            write!(f, "{:.1} ms", secs * 1e3)
        } else {
            write!(f, "{secs:.2} s")
        }
    }
}

impl fmt::Display for EndpointSnapshot {
    /// One line: the key, readiness, counts, latency and (when not 1) the weight, e.g.
    /// `127.0.0.1:8080: ready, 120 requests, 3 errors (2.5%), 1 in flight, avg 1.2 ms,
    /// ewma 1.5 ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}, ",
            self.key,
            if self.ready { "ready" } else { "not ready" }
        )?;
        count(f, self.requests, "request", "requests")?;
        f.write_str(", ")?;
        count(f, self.errors, "error", "errors")?;
        if self.errors > 0 {
            write!(f, " ({:.1}%)", self.error_rate * 100.0)?;
        }
        write!(f, ", {} in flight", self.in_flight)?;
        if let Some(avg) = self.avg_latency {
            write!(f, ", avg {}", Human(avg))?;
        }
        if let Some(ewma) = self.ewma_latency {
            write!(f, ", ewma {}", Human(ewma))?;
        }
        if self.weight != 1 {
            write!(f, ", weight {}", self.weight)?;
        }
        Ok(())
    }
}

impl fmt::Display for BalanceTotals {
    /// One line: endpoints ready, request counts, failovers, and the rest only when it
    /// happened, e.g. `2/3 endpoints ready, 1200 requests, 12 errors, 0 in flight, 10
    /// failovers, 2 refused by the retry budget, panic mode`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {} ready, ",
            self.ready,
            self.endpoints,
            if self.endpoints == 1 {
                "endpoint"
            } else {
                "endpoints"
            }
        )?;
        count(f, self.requests, "request", "requests")?;
        f.write_str(", ")?;
        count(f, self.errors, "error", "errors")?;
        write!(f, ", {} in flight, ", self.in_flight)?;
        count(f, self.retries, "failover", "failovers")?;
        if self.sent_retries > 0 {
            write!(f, " ({} after sending)", self.sent_retries)?;
        }
        if self.retries_refused > 0 {
            write!(f, ", {} refused by the retry budget", self.retries_refused)?;
        }
        if self.hedges > 0 {
            f.write_str(", ")?;
            count(f, self.hedges, "hedge", "hedges")?;
            write!(f, " ({} won)", self.hedges_won)?;
        }
        if self.deadlines_exceeded > 0 {
            f.write_str(", ")?;
            count(
                f,
                self.deadlines_exceeded,
                "deadline exceeded",
                "deadlines exceeded",
            )?;
        }
        if self.panicking {
            f.write_str(", panic mode")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;

    fn snapshot() -> EndpointSnapshot {
        EndpointSnapshot {
            key: "127.0.0.1:8080".into(),
            id: EndpointId(7),
            requests: 120,
            errors: 3,
            error_rate: 3.0 / 119.0,
            in_flight: 1,
            avg_latency: Some(Duration::from_micros(1_240)),
            ewma_latency: Some(Duration::from_micros(1_510)),
            weight: 1,
            ready: true,
        }
    }

    #[test]
    fn an_endpoint_reads_as_one_line() {
        assert_eq!(
            snapshot().to_string(),
            "127.0.0.1:8080: ready, 120 requests, 3 errors (2.5%), 1 in flight, avg 1.2 ms, ewma 1.5 ms"
        );
        let fresh = EndpointSnapshot {
            requests: 1,
            errors: 0,
            error_rate: 0.0,
            in_flight: 0,
            avg_latency: None,
            ewma_latency: Some(Duration::from_micros(850)),
            weight: 3,
            ready: false,
            ..snapshot()
        };
        assert_eq!(
            fresh.to_string(),
            "127.0.0.1:8080: not ready, 1 request, 0 errors, 0 in flight, ewma 850 µs, weight 3"
        );
        let slow = EndpointSnapshot {
            avg_latency: Some(Duration::from_millis(2_500)),
            ewma_latency: None,
            ..snapshot()
        };
        assert!(slow.to_string().ends_with(", avg 2.50 s"), "{slow}");
    }

    #[test]
    fn totals_read_as_one_line_naming_only_what_happened() {
        let mut t = BalanceTotals {
            endpoints: 3,
            ready: 2,
            pending: 1,
            requests: 1200,
            errors: 12,
            in_flight: 0,
            retries: 10,
            sent_retries: 0,
            retries_refused: 0,
            hedges: 0,
            hedges_won: 0,
            deadlines_exceeded: 0,
            panicking: false,
        };
        assert_eq!(
            t.to_string(),
            "2/3 endpoints ready, 1200 requests, 12 errors, 0 in flight, 10 failovers"
        );
        t.sent_retries = 4;
        t.retries_refused = 2;
        t.hedges = 5;
        t.hedges_won = 1;
        t.deadlines_exceeded = 1;
        t.panicking = true;
        assert_eq!(
            t.to_string(),
            "2/3 endpoints ready, 1200 requests, 12 errors, 0 in flight, 10 failovers (4 after sending), \
             2 refused by the retry budget, 5 hedges (1 won), 1 deadline exceeded, panic mode"
        );
        let one = BalanceTotals {
            endpoints: 1,
            ready: 1,
            pending: 0,
            requests: 1,
            errors: 1,
            in_flight: 1,
            retries: 1,
            ..t
        };
        assert!(
            one.to_string()
                .starts_with("1/1 endpoint ready, 1 request, 1 error, 1 in flight, 1 failover ("),
            "{one}"
        );
    }
}
