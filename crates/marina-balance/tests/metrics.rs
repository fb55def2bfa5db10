//! Tests of the `metrics` feature: what a balancer records through the `metrics`
//! facade.
//!
//! Each test captures with its own `DebuggingRecorder`, installed with
//! `metrics::with_local_recorder` while the balancer is built and first polled (its
//! endpoints are discovered, and their handles taken, at the first `poll_ready`); the
//! handles keep recording into it afterwards. A snapshot of that recorder resets what
//! it read, so [`Seen`] adds snapshots up (the balancer moves its gauges only by
//! increments and decrements, so the sum is the gauge's value).
//!
//! Endpoints are `tower::service_fn`s or `tower_test` mocks in a `ServiceList` (keyed by
//! position: the `endpoint` label is "0", "1", ...) or a `ChangeStream` (keyed by
//! name). Time is paused where a timer matters.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::io;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use marina_balance::{
    Balance, ChangeStream, DeadlineExceeded, Failover, NoReadyEndpoints, RetryBudget, RoundRobin,
};
use marina_core::{BoxError, EjectionGate, NotSent, find};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::discover::{Change, ServiceList};
use tower::{Service, ServiceExt, service_fn};
use tower_test::mock;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Every series seen so far: (name, labels as `k=v` joined by `,`) to its value.
#[derive(Default)]
struct Seen {
    counters: HashMap<(String, String), u64>,
    gauges: HashMap<(String, String), f64>,
    histograms: HashMap<(String, String), Vec<f64>>,
    /// Names seen with no description or unit.
    undescribed: Vec<String>,
}

impl Seen {
    /// Adds what the recorder holds now (and resets it).
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, unit, description, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            if unit.is_none() || description.is_none_or(|d| d.is_empty()) {
                self.undescribed.push(key.name().to_string());
            }
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let id = (key.name().to_string(), labels.join(","));
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Gauge(g) => *self.gauges.entry(id).or_default() += g.into_inner(),
                DebugValue::Histogram(xs) => self
                    .histograms
                    .entry(id)
                    .or_default()
                    .extend(xs.into_iter().map(|x| x.into_inner())),
            }
        }
    }

    fn counter(&self, name: &str, labels: &str) -> u64 {
        *self
            .counters
            .get(&(name.to_string(), labels.to_string()))
            .unwrap_or_else(|| panic!("no counter {name}{{{labels}}} among {:?}", self.counters))
    }

    fn gauge(&self, name: &str, labels: &str) -> f64 {
        *self
            .gauges
            .get(&(name.to_string(), labels.to_string()))
            .unwrap_or_else(|| panic!("no gauge {name}{{{labels}}} among {:?}", self.gauges))
    }

    fn samples(&self, name: &str, labels: &str) -> &[f64] {
        self.histograms
            .get(&(name.to_string(), labels.to_string()))
            .map_or(&[], Vec::as_slice)
    }
}

/// Builds a balancer with `recorder` installed, and polls it once (no-op waker) so that
/// discovery's endpoints are added, and their handles taken, with it installed too.
fn build<B, Req>(recorder: &DebuggingRecorder, make: impl FnOnce() -> B) -> B
where
    B: Service<Req>,
{
    metrics::with_local_recorder(recorder, || {
        let mut lb = make();
        let _ = lb.poll_ready(&mut Context::from_waker(Waker::noop()));
        lb
    })
}

/// A refused connect, marked as never sent.
fn refused() -> NotSent {
    NotSent::new(io::Error::from(io::ErrorKind::ConnectionRefused))
}

const BALANCE_WIDE: [&str; 6] = [
    "marina_balance_failovers_total",
    "marina_balance_failovers_refused_total",
    "marina_balance_hedges_total",
    "marina_balance_hedges_won_total",
    "marina_balance_deadline_exceeded_total",
    "marina_balance_no_ready_endpoints_total",
];

// ---------------------------------------------------------------------------------------
// Per endpoint, failover
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn counts_per_endpoint_and_failovers_and_returns_in_flight_to_zero() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Endpoint 0 refuses every connection; 1 and 2 answer.
    let mut lb = build(&recorder, || {
        let endpoints = (0..3u32).map(|n| {
            service_fn(move |req: u32| async move {
                if n == 0 {
                    return Err(refused());
                }
                Ok(req * 10 + n)
            })
        });
        Balance::new(
            ServiceList::new(endpoints.collect::<Vec<_>>()),
            RoundRobin::new(),
        )
        .failover(Failover::new())
    });
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    // Every documented series exists, at 0, before any request.
    for name in BALANCE_WIDE {
        assert_eq!(seen.counter(name, ""), 0, "{name}");
    }
    for ep in ["endpoint=0", "endpoint=1", "endpoint=2"] {
        assert_eq!(seen.counter("marina_balance_requests_total", ep), 0);
        assert_eq!(seen.counter("marina_balance_errors_total", ep), 0);
    }
    assert_eq!(seen.gauge("marina_balance_panic_mode", ""), 0.0);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=ready"), 3.0);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=unready"), 0.0);
    // Every series has a unit and a description, and the scheme's prefix.
    assert!(seen.undescribed.is_empty(), "{:?}", seen.undescribed);
    assert!(
        seen.counters
            .keys()
            .chain(seen.gauges.keys())
            .all(|(name, _)| name.starts_with("marina_balance_"))
    );

    for i in 0..6 {
        let reply = lb.ready().await.unwrap().call(i).await.unwrap();
        assert_ne!(reply % 10, 0, "request {i} answered by endpoint 0");
    }
    seen.take(&snapshotter);

    // Endpoint 0 had its two turns, both failed and went elsewhere.
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=0"),
        2
    );
    assert_eq!(seen.counter("marina_balance_errors_total", "endpoint=0"), 2);
    let others = seen.counter("marina_balance_requests_total", "endpoint=1")
        + seen.counter("marina_balance_requests_total", "endpoint=2");
    assert_eq!(others, 6, "four first attempts and two failovers");
    assert_eq!(seen.counter("marina_balance_errors_total", "endpoint=1"), 0);
    assert_eq!(seen.counter("marina_balance_errors_total", "endpoint=2"), 0);
    assert_eq!(seen.counter("marina_balance_failovers_total", ""), 2);
    assert_eq!(
        seen.counter("marina_balance_failovers_refused_total", ""),
        0
    );
    assert_eq!(
        seen.counter("marina_balance_no_ready_endpoints_total", ""),
        0
    );
    for ep in ["endpoint=0", "endpoint=1", "endpoint=2"] {
        assert_eq!(seen.gauge("marina_balance_in_flight", ep), 0.0, "{ep}");
        // Each endpoint's first attempt is one of the timed ones.
        let samples = seen.samples("marina_balance_request_duration_seconds", ep);
        assert!(!samples.is_empty(), "{ep}: no duration sample");
        assert!(
            samples.iter().all(|s| (0.0..60.0).contains(s)),
            "{samples:?}"
        );
    }
    // The same counts as the handle's.
    let totals = lb.handle().totals();
    assert_eq!((totals.requests, totals.errors, totals.retries), (8, 2, 2));
}

#[tokio::test]
async fn in_flight_counts_a_pending_request_and_releases_it_when_answered_or_dropped() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (svc, mut handle) = mock::pair::<u32, u32>();
    let mut lb = build(&recorder, || {
        Balance::new(ServiceList::new(vec![svc]), RoundRobin::new())
    });
    let mut seen = Seen::default();

    // One answered, one dropped while in flight.
    let mut answered = task::spawn(lb.ready().await.unwrap().call(1));
    let mut dropped = task::spawn(lb.ready().await.unwrap().call(2));
    assert_pending!(answered.poll());
    assert_pending!(dropped.poll());
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_in_flight", "endpoint=0"), 2.0);

    let (req, tx) = handle.next_request().await.unwrap();
    assert_eq!(req, 1);
    tx.send_response(10);
    assert_eq!(assert_ready_ok!(answered.poll()), 10);
    drop(dropped);
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_in_flight", "endpoint=0"), 0.0);
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=0"),
        2
    );
    // A cancelled request is not an error, and has no response time.
    assert_eq!(seen.counter("marina_balance_errors_total", "endpoint=0"), 0);
    assert_eq!(
        seen.samples("marina_balance_request_duration_seconds", "endpoint=0")
            .len(),
        1
    );
}

#[tokio::test]
async fn the_retry_budget_refusing_a_failover_is_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut lb = build(&recorder, || {
        let endpoints = (0..2u32).map(|n| {
            service_fn(move |req: u32| async move {
                if n == 0 {
                    return Err(refused());
                }
                Ok(req)
            })
        });
        // No retry allowed at all.
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.0);
        Balance::new(
            ServiceList::new(endpoints.collect::<Vec<_>>()),
            RoundRobin::new(),
        )
        .failover(Failover::new().budget(budget))
    });
    let error = lb.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(find::<NotSent>(&*error).is_some(), "{error}");
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(
        seen.counter("marina_balance_failovers_refused_total", ""),
        1
    );
    assert_eq!(seen.counter("marina_balance_failovers_total", ""), 0);
    assert_eq!(seen.counter("marina_balance_errors_total", "endpoint=0"), 1);
}

// ---------------------------------------------------------------------------------------
// Deadlines, hedges, fail fast
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_deadline_passed_is_counted_and_its_attempt_leaves_flight() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let mut lb = build(&recorder, || {
        // An endpoint that never answers.
        let endpoints = vec![service_fn(|_: u32| {
            std::future::pending::<Result<u32, BoxError>>()
        })];
        Balance::new(ServiceList::new(endpoints), RoundRobin::new())
            .failover(Failover::new().deadline(Duration::from_secs(1)))
    });
    let error = lb.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(
        seen.counter("marina_balance_deadline_exceeded_total", ""),
        1
    );
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=0"),
        1
    );
    assert_eq!(seen.gauge("marina_balance_in_flight", "endpoint=0"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn hedges_sent_and_won_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Endpoint 0 answers after 1 s, endpoint 1 at once.
    let mut lb = build(&recorder, || {
        let endpoints = (0..2u32).map(|n| {
            service_fn(move |req: u32| async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok::<_, BoxError>(req * 10 + n)
            })
        });
        Balance::new(
            ServiceList::new(endpoints.collect::<Vec<_>>()),
            RoundRobin::new(),
        )
        .failover(Failover::new().hedge(Duration::from_millis(50)))
        .idempotent_if(|_: &u32| true)
    });
    // Round robin sends the first attempt to endpoint 0; the hedge to 1 answers first.
    let reply = lb.ready().await.unwrap().call(7).await.unwrap();
    assert_eq!(reply, 71);
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.counter("marina_balance_hedges_total", ""), 1);
    assert_eq!(seen.counter("marina_balance_hedges_won_total", ""), 1);
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=0"),
        1
    );
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=1"),
        1
    );
    // The losing attempt was cancelled: nothing left in flight anywhere.
    assert_eq!(seen.gauge("marina_balance_in_flight", "endpoint=0"), 0.0);
    assert_eq!(seen.gauge("marina_balance_in_flight", "endpoint=1"), 0.0);
    assert_eq!(
        seen.samples("marina_balance_request_duration_seconds", "endpoint=1")
            .len(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn failing_fast_with_nothing_ready_is_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // One endpoint, never ready.
    let (svc, mut handle) = mock::pair::<u32, u32>();
    handle.allow(0);
    let mut lb = build(&recorder, || {
        Balance::new(ServiceList::new(vec![svc]), RoundRobin::new())
            .failfast_timeout(Duration::from_secs(1))
    });
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=ready"), 0.0);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=unready"), 1.0);
    for _ in 0..2 {
        let error = lb.ready().await.unwrap().call(1).await.unwrap_err();
        assert!(error.is::<NoReadyEndpoints>(), "{error}");
    }
    seen.take(&snapshotter);
    assert_eq!(
        seen.counter("marina_balance_no_ready_endpoints_total", ""),
        2
    );
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=0"),
        0
    );
}

// ---------------------------------------------------------------------------------------
// Endpoints by state, panic mode
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn endpoint_gauges_follow_discovery_and_a_dropped_balancer_takes_its_figures_back() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    type Svc = tower::util::BoxService<u32, u32, BoxError>;
    let (tx, discover) = ChangeStream::<&'static str, Svc>::channel();
    let echo = || Svc::new(service_fn(|req: u32| async move { Ok::<_, BoxError>(req) }));
    tx.send(Change::Insert("a", echo())).unwrap();
    tx.send(Change::Insert("b", echo())).unwrap();
    let mut lb = build(&recorder, || Balance::new(discover, RoundRobin::new()));
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    // The key's `Debug` text is the label.
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=ready"), 2.0);
    for _ in 0..2 {
        lb.ready().await.unwrap().call(1).await.unwrap();
    }
    tx.send(Change::Remove("a")).unwrap();
    lb.ready().await.unwrap().call(2).await.unwrap();
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=ready"), 1.0);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=unready"), 0.0);
    // The removed endpoint's series keep their values.
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=\"a\""),
        1
    );
    assert_eq!(
        seen.counter("marina_balance_requests_total", "endpoint=\"b\""),
        2
    );

    drop(lb);
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=ready"), 0.0);
    assert_eq!(seen.gauge("marina_balance_endpoints", "state=unready"), 0.0);
}

#[tokio::test]
async fn the_panic_mode_gauge_follows_the_threshold() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let gate = EjectionGate::new();
    let members = [gate.join(), gate.join()];
    let mut lb = build(&recorder, || {
        let endpoints =
            (0..2u32).map(|n| service_fn(move |_: u32| async move { Ok::<_, BoxError>(n) }));
        Balance::new(
            ServiceList::new(endpoints.collect::<Vec<_>>()),
            RoundRobin::new(),
        )
        .ejection_gate(gate.clone())
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut seen = Seen::default();

    // Both ejected: 0% healthy, below the default 50%.
    for m in &members {
        m.set_ejected(true);
    }
    assert!(matches!(lb.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_panic_mode", ""), 1.0);
    assert!(lb.handle().totals().panicking);

    members[0].set_ejected(false);
    assert!(matches!(lb.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    seen.take(&snapshotter);
    assert_eq!(seen.gauge("marina_balance_panic_mode", ""), 0.0);
    assert!(!lb.handle().totals().panicking);
}
