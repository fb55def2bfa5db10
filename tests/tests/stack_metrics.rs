//! The `metrics` feature of the whole stack, and its `marina.request` span.
//!
//! - A global `DebuggingRecorder`, installed before the stack is built: requests over
//!   two loopback echo backends, one of them shut down half-way; the stack's own
//!   metrics, and the pool, balance and health ones under it, exist with values that
//!   match the traffic (every request ok, failover absorbing the dead backend's errors).
//! - A backend that never answers: each attempt's request timeout is counted for its
//!   endpoint, and the requests end with the `timeout` outcome.
//! - A tracing layer that captures span fields sees one `marina.request` span per
//!   request, with the endpoint, attempt and outcome recorded, and the DEBUG events
//!   "request started" and "request finished".

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use integration_tests::{EchoServer, LIMIT, LineServer, LineServerOptions, within};
use marina::Stack;
use marina::core::Request;
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::ServiceExt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// The recorder of this test binary, installed once, before any stack is built.
fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snap
    })
}

/// The tests of this binary run one at a time: the recorder is global, and a
/// snapshot drains it (counters restart from 0, histograms empty).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Metrics = Vec<(CompositeKey, DebugValue)>;

fn snapshot() -> Metrics {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k, v))
        .collect()
}

/// Every series of `name` with all of `labels`.
fn series<'a>(m: &'a Metrics, name: &str, labels: &[(&str, &str)]) -> Vec<&'a DebugValue> {
    m.iter()
        .filter(|(k, _)| {
            k.key().name() == name
                && labels
                    .iter()
                    .all(|(l, v)| k.key().labels().any(|x| x.key() == *l && x.value() == *v))
        })
        .map(|(_, v)| v)
        .collect()
}

fn counter(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    let found = series(m, name, labels);
    assert!(!found.is_empty(), "no {name}{labels:?}");
    found
        .iter()
        .map(|v| match v {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn gauge(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    match series(m, name, labels).as_slice() {
        [DebugValue::Gauge(g)] => g.into_inner(),
        other => panic!("{name}{labels:?}: {other:?}"),
    }
}

fn histogram_len(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> usize {
    series(m, name, labels)
        .iter()
        .map(|v| match v {
            DebugValue::Histogram(h) => h.len(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test]
async fn stack_metrics_follow_the_traffic_and_a_dead_backend() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Drained: what other tests of this binary recorded is gone.
    let _ = snapshot();
    let a = EchoServer::start().await;
    let b = EchoServer::start().await;
    let (ea, eb) = (a.addr().to_string(), b.addr().to_string());
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([a.addr(), b.addr()])
        .build_line()
        .expect("a valid stack");

    // Registered at build: the stack's, pools' and health series exist before any
    // request (the balancer's, once it has taken its endpoints in).
    let m = snapshot();
    for outcome in ["ok", "error", "timeout", "rejected"] {
        assert_eq!(
            counter(&m, "marina_requests_total", &[("outcome", outcome)]),
            0
        );
    }
    for e in [&ea, &eb] {
        assert_eq!(
            counter(&m, "marina_request_timeouts_total", &[("endpoint", e)]),
            0
        );
        for outcome in ["ok", "timeout", "error"] {
            counter(
                &m,
                "marina_pool_checkouts_total",
                &[("pool", e), ("outcome", outcome)],
            );
        }
        gauge(&m, "marina_health_status", &[("endpoint", e)]);
        counter(&m, "marina_health_ejections_total", &[("endpoint", e)]);
    }

    let mut sent = 0u64;
    for i in 0..20 {
        let line = format!("hello {i}");
        let reply = within(
            LIMIT,
            "a reply",
            svc.clone().oneshot(Request::new(line.clone())),
        )
        .await
        .expect("a reply");
        assert_eq!(reply.into_body(), line);
        sent += 1;
    }
    // One backend goes away: failover sends its requests to the other.
    a.shutdown().await;
    for i in 0..20 {
        let line = format!("after {i}");
        let reply = within(
            LIMIT,
            "a reply",
            svc.clone().oneshot(Request::new(line.clone())),
        )
        .await
        .expect("failover hides the dead backend");
        assert_eq!(reply.into_body(), line);
        sent += 1;
    }

    let m = snapshot();
    assert_eq!(
        counter(&m, "marina_requests_total", &[("outcome", "ok")]),
        sent
    );
    assert_eq!(
        counter(&m, "marina_requests_total", &[("outcome", "error")]),
        0
    );
    assert_eq!(
        histogram_len(&m, "marina_request_duration_seconds", &[]),
        sent as usize
    );
    assert_eq!(gauge(&m, "marina_requests_in_flight", &[]), 0.0);
    // The pools: every attempt checked a connection out of one of them, and the dead
    // backend's pool failed to connect.
    let checkouts = counter(&m, "marina_pool_checkouts_total", &[("outcome", "ok")]);
    assert!(
        checkouts >= sent,
        "{checkouts} checkouts for {sent} requests"
    );
    assert!(histogram_len(&m, "marina_pool_checkout_wait_seconds", &[("pool", &eb)]) > 0);
    assert!(
        counter(
            &m,
            "marina_pool_connections_created_total",
            &[("pool", &eb)]
        ) >= 1
    );
    // The balancer: attempts at both endpoints, errors at the dead one only.
    let attempts = counter(&m, "marina_balance_requests_total", &[]);
    assert!(attempts >= sent, "{attempts} attempts for {sent} requests");
    let errors_a = counter(&m, "marina_balance_errors_total", &[("endpoint", &ea)]);
    assert!(errors_a >= 1, "the dead backend's errors were seen");
    assert_eq!(
        counter(&m, "marina_balance_errors_total", &[("endpoint", &eb)]),
        0
    );
    // The stats table tells endpoint errors from the callers' (none).
    let stats = handle.stats();
    assert_eq!(stats.client_errors, 0, "{stats}");
    let text = stats.to_string();
    assert!(
        text.contains(&format!(
            "{errors_a} seen by endpoints, 0 returned to callers ({errors_a} absorbed by failover)"
        )),
        "{text}"
    );
    assert!(!text.contains("Ejected {"), "health in Debug form: {text}");
    // The health checks: the dead backend's failures ejected it (the table says so in
    // words); the live one was never ejected.
    assert_eq!(
        counter(&m, "marina_health_failures_total", &[("endpoint", &ea)]),
        errors_a
    );
    assert!(counter(&m, "marina_health_ejections_total", &[("endpoint", &ea)]) >= 1);
    assert_eq!(
        counter(&m, "marina_health_ejections_total", &[("endpoint", &eb)]),
        0
    );
    assert!(text.contains("  ejected, "), "{text}");
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);

    // Refused at the edge once shut down: `rejected`.
    let err = svc
        .clone()
        .oneshot(Request::new("late".into()))
        .await
        .expect_err("refused");
    assert!(
        err.downcast_ref::<marina::ShuttingDown>().is_some(),
        "{err}"
    );
    let m = snapshot();
    assert_eq!(
        counter(&m, "marina_requests_total", &[("outcome", "rejected")]),
        1
    );
    b.shutdown().await;
}

#[tokio::test]
async fn request_timeouts_are_counted_per_endpoint_and_as_the_outcome() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _ = snapshot();
    // Accepts, reads, never answers.
    let hole = LineServer::start(LineServerOptions {
        hold: true,
        ..LineServerOptions::default()
    })
    .await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([hole.addr()])
        .request_timeout(std::time::Duration::from_millis(50))
        .health(None)
        .failover(None)
        .build_line()
        .expect("a valid stack");
    for line in ["a", "b"] {
        let err = within(
            LIMIT,
            "a timeout",
            svc.clone().oneshot(Request::new(line.into())),
        )
        .await
        .expect_err("held");
        assert!(
            marina::core::find::<marina::RequestTimeout>(&*err).is_some(),
            "{err}"
        );
    }
    let m = snapshot();
    let endpoint = hole.addr().to_string();
    assert_eq!(
        counter(
            &m,
            "marina_request_timeouts_total",
            &[("endpoint", &endpoint)]
        ),
        2
    );
    assert_eq!(
        counter(&m, "marina_requests_total", &[("outcome", "timeout")]),
        2
    );
    assert_eq!(
        counter(&m, "marina_requests_total", &[("outcome", "ok")]),
        0
    );
    assert_eq!(handle.stats().client_errors, 2);
    hole.release();
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
}

/// The fields of every closed `marina.request` span, and the messages of the events
/// inside one.
#[derive(Clone, Default)]
struct Captured {
    open: Arc<Mutex<HashMap<Id, BTreeMap<String, String>>>>,
    closed: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
    events: Arc<Mutex<Vec<(tracing::Level, String)>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Captured {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "marina.request" {
            let mut fields = BTreeMap::new();
            attrs.record(&mut Fields(&mut fields));
            self.open.lock().unwrap().insert(id.clone(), fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().get_mut(id) {
            values.record(&mut Fields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let in_request = ctx
            .event_span(event)
            .is_some_and(|s| s.name() == "marina.request");
        if in_request {
            let mut fields = BTreeMap::new();
            event.record(&mut Fields(&mut fields));
            let message = fields.remove("message").unwrap_or_default();
            self.events
                .lock()
                .unwrap()
                .push((*event.metadata().level(), message));
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().remove(&id) {
            self.closed.lock().unwrap().push(fields);
        }
    }
}

#[tokio::test]
async fn each_request_has_a_span_with_endpoint_attempt_and_outcome() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _ = snapshotter();
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(
        captured
            .clone()
            .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
    );
    // This test's thread only (the runtime is current-thread).
    let _default = tracing::subscriber::set_default(subscriber);
    let server = EchoServer::start().await;
    let (svc, handle) = Stack::builder::<String>()
        .endpoints([server.addr()])
        .build_line()
        .expect("a valid stack");
    for i in 0..3 {
        let reply = within(
            LIMIT,
            "a reply",
            svc.clone().oneshot(Request::new(format!("m{i}"))),
        )
        .await
        .expect("a reply");
        assert_eq!(reply.into_body(), format!("m{i}"));
    }
    assert_eq!(within(LIMIT, "shutdown", handle.shutdown(LIMIT)).await, 0);
    let closed = captured.closed.lock().unwrap().clone();
    assert_eq!(closed.len(), 3, "{closed:?}");
    let endpoint = server.addr().to_string();
    for span in &closed {
        assert_eq!(
            span.get("outcome").map(String::as_str),
            Some("ok"),
            "{span:?}"
        );
        assert_eq!(span.get("endpoint"), Some(&endpoint), "{span:?}");
        assert_eq!(
            span.get("attempt").map(String::as_str),
            Some("1"),
            "{span:?}"
        );
        assert!(
            !span.contains_key("repinned"),
            "no affinity, no re-pin: {span:?}"
        );
    }
    let events = captured.events.lock().unwrap().clone();
    let count = |msg: &str| events.iter().filter(|(_, m)| m == msg).count();
    assert_eq!(count("request started"), 3, "{events:?}");
    assert_eq!(count("request finished"), 3, "{events:?}");
    assert!(
        events
            .iter()
            .all(|(level, _)| *level > tracing::Level::INFO),
        "nothing per request at INFO or above: {events:?}"
    );
    server.shutdown().await;
}
