//! The pool's `metrics` handles, registered once when the pool is built (feature
//! `metrics`).

use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;

use crate::core::Reason;
use crate::error::PoolError;

/// Every [`Reason`] a connection is closed for, in the order of [`reason_index`].
const REASONS: [Reason; 7] = [
    Reason::Broken,
    Reason::IdleTimeout,
    Reason::Lifetime,
    Reason::HealthCheck,
    Reason::Closed,
    Reason::Shrunk,
    Reason::Detached,
];

fn reason_index(r: Reason) -> usize {
    match r {
        Reason::Broken => 0,
        Reason::IdleTimeout => 1,
        Reason::Lifetime => 2,
        Reason::HealthCheck => 3,
        Reason::Closed => 4,
        Reason::Shrunk => 5,
        Reason::Detached => 6,
    }
}

/// A pool's metric handles, labelled `pool` = its name; every label combination is
/// registered up front, so each metric exists (at 0) as soon as the pool is built.
pub(crate) struct PoolMetrics {
    created: Counter,
    closed: [Counter; 7],
    evicted: Counter,
    timeouts: Counter,
    pub(crate) connect_errors: Counter,
    checkout_ok: Counter,
    checkout_timeout: Counter,
    checkout_error: Counter,
    checkout_wait: Histogram,
    pub(crate) idle: Gauge,
    pub(crate) active: Gauge,
    pub(crate) connecting: Gauge,
    pub(crate) waiting: Gauge,
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "marina_pool_connections_created_total",
        Unit::Count,
        "Connections the pool opened."
    );
    describe_counter!(
        "marina_pool_connections_closed_total",
        Unit::Count,
        "Connections the pool closed (or detached), by reason."
    );
    describe_counter!(
        "marina_pool_connections_evicted_total",
        Unit::Count,
        "Connections closed by idle timeout, max lifetime or a failed health check."
    );
    describe_counter!(
        "marina_pool_timeouts_total",
        Unit::Count,
        "Checkouts that gave up after acquire_timeout."
    );
    describe_counter!(
        "marina_pool_connect_errors_total",
        Unit::Count,
        "Connects that failed (at checkout or in a background refill)."
    );
    describe_counter!(
        "marina_pool_checkouts_total",
        Unit::Count,
        "Checkouts that ended, by outcome (ok, timeout, error)."
    );
    describe_histogram!(
        "marina_pool_checkout_wait_seconds",
        Unit::Seconds,
        "Time from the start of a successful checkout to a connection in hand, connect included."
    );
    describe_gauge!(
        "marina_pool_connections",
        Unit::Count,
        "Connections by state (idle, active, connecting), at the last maintenance tick."
    );
    describe_gauge!(
        "marina_pool_waiting",
        Unit::Count,
        "Checkouts queued for a connection, at the last maintenance tick."
    );
}

impl PoolMetrics {
    /// Registers the pool's handles with the recorder installed now.
    pub(crate) fn new(name: &str) -> Self {
        describe();
        let pool = || name.to_owned();
        let counter = |n: &'static str| metrics::counter!(n, "pool" => pool());
        let checkouts = |o: &'static str| metrics::counter!("marina_pool_checkouts_total", "pool" => pool(), "outcome" => o);
        let conns = |s: &'static str| metrics::gauge!("marina_pool_connections", "pool" => pool(), "state" => s);
        PoolMetrics {
            created: counter("marina_pool_connections_created_total"),
            closed: REASONS.map(|r| {
                metrics::counter!(
                    "marina_pool_connections_closed_total",
                    "pool" => pool(),
                    "reason" => r.as_str()
                )
            }),
            evicted: counter("marina_pool_connections_evicted_total"),
            timeouts: counter("marina_pool_timeouts_total"),
            connect_errors: counter("marina_pool_connect_errors_total"),
            checkout_ok: checkouts("ok"),
            checkout_timeout: checkouts("timeout"),
            checkout_error: checkouts("error"),
            checkout_wait: metrics::histogram!("marina_pool_checkout_wait_seconds", "pool" => pool()),
            idle: conns("idle"),
            active: conns("active"),
            connecting: conns("connecting"),
            waiting: metrics::gauge!("marina_pool_waiting", "pool" => pool()),
        }
    }

    pub(crate) fn created(&self) {
        self.created.increment(1);
    }

    pub(crate) fn closed(&self, reason: Reason) {
        self.closed[reason_index(reason)].increment(1);
        if reason.is_eviction() {
            self.evicted.increment(1);
        }
    }

    pub(crate) fn timed_out(&self) {
        self.timeouts.increment(1);
    }

    /// A checkout ended with `result`; `started` is when it began, `None` when it was
    /// served at once from the idle queue (no clock read on that path: it waited 0 s).
    pub(crate) fn checkout<T>(&self, started: Option<Instant>, result: &Result<T, PoolError>) {
        self.ended(started, result.as_ref().err());
    }

    /// [`checkout`](Self::checkout), from the error it ended with, if any.
    pub(crate) fn ended(&self, started: Option<Instant>, error: Option<&PoolError>) {
        match error {
            None => {
                self.checkout_ok.increment(1);
                let waited = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                self.checkout_wait.record(waited);
            }
            Some(PoolError::Timeout(_)) => self.checkout_timeout.increment(1),
            Some(_) => self.checkout_error.increment(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};

    use super::*;
    use crate::Pool;

    type Snapshot = [(
        CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )];

    fn find<'a>(
        snap: &'a Snapshot,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<&'a DebugValue> {
        snap.iter()
            .find(|(k, ..)| {
                k.kind() == kind
                    && k.key().name() == name
                    && labels
                        .iter()
                        .all(|(l, v)| k.key().labels().any(|x| x.key() == *l && x.value() == *v))
            })
            .map(|(.., v)| v)
    }

    #[test]
    fn checkouts_and_wait_are_recorded_on_handles_taken_at_build() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        // Only the construction sees the recorder: the handles are kept.
        let pool = metrics::with_local_recorder(&recorder, || {
            let _rt = rt.enter();
            Pool::builder()
                .name("p")
                .max_size(1)
                .acquire_timeout(Duration::from_secs(1))
                .build(
                    tower::service_fn(|_: ()| async {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        Ok::<_, Infallible>(0u8)
                    }),
                    (),
                )
                .unwrap()
        });
        rt.block_on(async {
            let a = pool.get().await.unwrap(); // connects: waits 250 ms
            assert!(pool.get().await.unwrap_err().is_timeout());
            drop(a);
            drop(pool.get().await.unwrap()); // idle: waits 0 s
        });
        let snap = snapshotter.snapshot().into_vec();
        let counter = |o| {
            find(
                &snap,
                MetricKind::Counter,
                "marina_pool_checkouts_total",
                &[("pool", "p"), ("outcome", o)],
            )
        };
        assert_eq!(counter("ok"), Some(&DebugValue::Counter(2)));
        assert_eq!(counter("timeout"), Some(&DebugValue::Counter(1)));
        assert_eq!(counter("error"), Some(&DebugValue::Counter(0)));
        let Some(DebugValue::Histogram(waits)) = find(
            &snap,
            MetricKind::Histogram,
            "marina_pool_checkout_wait_seconds",
            &[("pool", "p")],
        ) else {
            panic!("no checkout wait histogram")
        };
        let mut waits: Vec<f64> = waits.iter().map(|w| w.into_inner()).collect();
        waits.sort_by(f64::total_cmp);
        assert_eq!(waits.len(), 2);
        assert_eq!(waits[0], 0.0);
        assert!(waits[1] >= 0.25, "{waits:?}");
        assert_eq!(
            find(
                &snap,
                MetricKind::Counter,
                "marina_pool_connections_created_total",
                &[("pool", "p")]
            ),
            Some(&DebugValue::Counter(1))
        );
    }

    #[test]
    fn reasons_map_one_to_one() {
        for (i, r) in REASONS.iter().enumerate() {
            assert_eq!(reason_index(*r), i, "{r:?}");
        }
    }
}
