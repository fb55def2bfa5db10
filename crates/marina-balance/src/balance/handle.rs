//! `BalanceHandle`: per-endpoint statistics of a running balancer, readable from
//! anywhere.

use super::*;

/// Per-endpoint statistics of a [`Balance`], readable from anywhere.
#[derive(Clone, Default)]
pub struct BalanceHandle {
    /// Each endpoint's counters, by the balancer's slot number (`None`: a free slot).
    pub(crate) endpoints: Arc<Mutex<Vec<Option<Arc<EndpointStats>>>>>,
    pub(crate) totals: Arc<Totals>,
}

impl fmt::Debug for BalanceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceHandle").finish_non_exhaustive()
    }
}

/// One endpoint's counters, read once.
pub(crate) struct Figures {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) completed: u64,
    pub(crate) in_flight: u64,
}

impl EndpointStats {
    pub(crate) fn figures(&self) -> Figures {
        let flow = self.flow.load(Relaxed);
        let in_flight = flow & IN_FLIGHT_MASK;
        let finished = flow >> IN_FLIGHT_BITS;
        let completed = finished.saturating_sub(self.cancelled.load(Relaxed));
        Figures {
            requests: finished + in_flight,
            errors: self.errors.load(Relaxed).min(completed),
            completed,
            in_flight,
        }
    }
}

impl BalanceHandle {
    /// Every current endpoint's counters.
    pub fn stats(&self) -> Vec<EndpointSnapshot> {
        let eps = self.lock();
        eps.iter()
            .flatten()
            .map(|s| {
                let f = s.figures();
                let timed = s.timed.load(Relaxed);
                EndpointSnapshot {
                    key: s.key.to_string(),
                    id: s.id,
                    requests: f.requests,
                    errors: f.errors,
                    error_rate: if f.completed == 0 {
                        0.0
                    } else {
                        f.errors as f64 / f.completed as f64
                    },
                    in_flight: f.in_flight,
                    avg_latency: (timed > 0)
                        .then(|| Duration::from_micros(s.latency_total_us.load(Relaxed) / timed)),
                    ewma_latency: s.ewma(),
                    weight: s.weight,
                    ready: s.ready.load(Relaxed),
                }
            })
            .collect()
    }

    /// The balancer-wide figures: endpoint counts, request totals over the current
    /// endpoints, failover and panic state. One pass over the endpoints' counters, no
    /// allocation.
    pub fn totals(&self) -> BalanceTotals {
        let t = &self.totals;
        let mut totals = BalanceTotals {
            endpoints: 0,
            ready: 0,
            pending: 0,
            requests: 0,
            errors: 0,
            in_flight: 0,
            retries: t.retries.load(Relaxed),
            sent_retries: t.sent_retries.load(Relaxed),
            retries_refused: t.retries_refused.load(Relaxed),
            hedges: t.hedges.load(Relaxed),
            hedges_won: t.hedges_won.load(Relaxed),
            deadlines_exceeded: t.deadlines_exceeded.load(Relaxed),
            panicking: t.panicking.load(Relaxed),
        };
        for s in self.lock().iter().flatten() {
            let f = s.figures();
            totals.endpoints += 1;
            if s.ready.load(Relaxed) {
                totals.ready += 1;
            } else {
                totals.pending += 1;
            }
            totals.requests += f.requests;
            totals.errors += f.errors;
            totals.in_flight += f.in_flight;
        }
        totals
    }

    /// Registers (or, with `None`, forgets) the counters of the endpoint in `slot`.
    pub(crate) fn set(&self, slot: usize, stats: Option<Arc<EndpointStats>>) {
        let mut eps = self.lock();
        if eps.len() <= slot {
            eps.resize(slot + 1, None);
        }
        eps[slot] = stats;
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<EndpointStats>>>> {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
