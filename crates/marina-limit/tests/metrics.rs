//! The `metrics` feature: every series a limiter records exists, at 0, once it is
//! built, labelled with the limiter's name (a default, or one given with `name`), and
//! counts what the traffic did: admitted, rate limited (rejected or delayed), refused
//! for a key, concurrency refusals and requests in flight, bandwidth bytes and throttled
//! time. No series carries a user's key.
//!
//! Each limiter is built inside `metrics::with_local_recorder`, so its handles are bound
//! to that test's `DebuggingRecorder` (handles are taken at construction; the traffic
//! afterwards needs no recorder installed). Waits run on paused time; the bandwidth
//! test moves bytes over real loopback TCP.

#![cfg(feature = "metrics")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::{
    BandwidthLimit, ConcurrencyPerKeyLayer, OnLimit, Rate, RateLimitLayer, RateLimited,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A series: its name and its labels as `key=value`, sorted.
type Series = (String, Vec<String>);

/// Every recorded series and its value. Counters are read (and reset) by the
/// snapshot: take one at the end.
fn series(snapshotter: &Snapshotter) -> BTreeMap<Series, DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            ((key.key().name().to_owned(), labels), value)
        })
        .collect()
}

fn key(name: &str, labels: &[&str]) -> Series {
    (
        name.to_owned(),
        labels.iter().map(|l| (*l).to_owned()).collect(),
    )
}

fn counter(all: &BTreeMap<Series, DebugValue>, name: &str, labels: &[&str]) -> u64 {
    match all.get(&key(name, labels)) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name}{labels:?}: not a counter: {other:?}\nall: {all:#?}"),
    }
}

fn gauge(all: &BTreeMap<Series, DebugValue>, name: &str, labels: &[&str]) -> f64 {
    match all.get(&key(name, labels)) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("{name}{labels:?}: not a gauge: {other:?}\nall: {all:#?}"),
    }
}

/// A backend whose calls complete when the test answers on the request's channel.
type Req = (Option<&'static str>, oneshot::Receiver<u32>);

fn req(who: Option<&'static str>) -> (Req, oneshot::Sender<u32>) {
    let (tx, rx) = oneshot::channel();
    ((who, rx), tx)
}

fn user(req: &Req) -> Option<String> {
    req.0.map(str::to_owned)
}

#[tokio::test]
async fn every_series_exists_with_the_default_names_once_built() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _limiters = metrics::with_local_recorder(&recorder, || {
        (
            RateLimitLayer::global(Rate::per_second(10)),
            RateLimitLayer::keyed(user, Rate::per_second(10)),
            ConcurrencyPerKeyLayer::new(user, 2),
            BandwidthLimit::new(()).shared(1e6, 64 * 1024),
        )
    });
    let all = series(&snapshotter);
    let expected = [
        key("marina_limit_admitted_total", &["limiter=rate"]),
        key(
            "marina_limit_rate_limited_total",
            &["limiter=rate", "outcome=delayed"],
        ),
        key(
            "marina_limit_rate_limited_total",
            &["limiter=rate", "outcome=rejected"],
        ),
        key("marina_limit_admitted_total", &["limiter=rate_per_key"]),
        key(
            "marina_limit_rate_limited_total",
            &["limiter=rate_per_key", "outcome=delayed"],
        ),
        key(
            "marina_limit_rate_limited_total",
            &["limiter=rate_per_key", "outcome=rejected"],
        ),
        key(
            "marina_limit_refused_total",
            &["limiter=rate_per_key", "reason=missing_key"],
        ),
        key(
            "marina_limit_refused_total",
            &["limiter=rate_per_key", "reason=too_many_keys"],
        ),
        key("marina_limit_active_keys", &["limiter=rate_per_key"]),
        key(
            "marina_limit_admitted_total",
            &["limiter=concurrency_per_key"],
        ),
        key(
            "marina_limit_concurrency_refused_total",
            &["limiter=concurrency_per_key"],
        ),
        key(
            "marina_limit_refused_total",
            &["limiter=concurrency_per_key", "reason=missing_key"],
        ),
        key(
            "marina_limit_refused_total",
            &["limiter=concurrency_per_key", "reason=too_many_keys"],
        ),
        key("marina_limit_in_flight", &["limiter=concurrency_per_key"]),
        key("marina_limit_active_keys", &["limiter=concurrency_per_key"]),
        key("marina_limit_bandwidth_bytes_total", &["limiter=bandwidth"]),
        key(
            "marina_limit_bandwidth_throttled_seconds",
            &["limiter=bandwidth"],
        ),
    ];
    let found: BTreeSet<Series> = all.keys().cloned().collect();
    assert_eq!(found, expected.into_iter().collect::<BTreeSet<_>>());
    for (series, value) in &all {
        let zero = match value {
            DebugValue::Counter(n) => *n == 0,
            DebugValue::Gauge(v) => v.into_inner() == 0.0,
            DebugValue::Histogram(v) => v.is_empty(),
        };
        assert!(zero, "{series:?} = {value:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_named_global_rate_limit_counts_admitted_and_rejected() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        RateLimitLayer::global(Rate::per_second(2)).name("outbound")
    });
    let handle = layer.handle();
    assert_eq!(handle.name(), "outbound");
    let mut svc = layer.layer(service_fn(|r: u32| async move { Ok::<_, BoxError>(r) }));
    let mut rejected = 0;
    for i in 0..5 {
        match svc.ready().await.unwrap().call(i).await {
            Ok(_) => {}
            Err(e) if e.downcast_ref::<RateLimited>().is_some() => rejected += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(rejected, 3);

    let all = series(&snapshotter);
    let l = "limiter=outbound";
    assert_eq!(counter(&all, "marina_limit_admitted_total", &[l]), 2);
    let rejected = &[l, "outcome=rejected"];
    assert_eq!(
        counter(&all, "marina_limit_rate_limited_total", rejected),
        3
    );
    let delayed = &[l, "outcome=delayed"];
    assert_eq!(counter(&all, "marina_limit_rate_limited_total", delayed), 0);
    // The figures agree with the handle's.
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (2, 3));
    // The default name's series were registered at construction and stay at 0.
    assert_eq!(
        counter(&all, "marina_limit_admitted_total", &["limiter=rate"]),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_keyed_rate_limit_counts_delays_missing_keys_and_keys_never_by_key() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        RateLimitLayer::keyed(user, Rate::per_second(10).burst(1))
            .on_limit(OnLimit::Wait {
                max: Duration::from_secs(1),
            })
            .name("per_user")
    });
    let mut svc = layer.layer(service_fn(|(_, answer): Req| async move {
        answer.await.map_err(BoxError::from)
    }));
    // alice: one at once, two made to wait their turn; bob: one at once.
    for who in ["alice", "alice", "alice", "bob"] {
        let (r, tx) = req(Some(who));
        tx.send(1).unwrap();
        svc.ready().await.unwrap().call(r).await.unwrap();
    }
    // No key: refused.
    let (r, _tx) = req(None);
    let err = svc.ready().await.unwrap().call(r).await.unwrap_err();
    assert!(
        err.downcast_ref::<marina_limit::MissingKey>().is_some(),
        "{err}"
    );

    let all = series(&snapshotter);
    let l = "limiter=per_user";
    assert_eq!(counter(&all, "marina_limit_admitted_total", &[l]), 4);
    let delayed = &[l, "outcome=delayed"];
    assert_eq!(counter(&all, "marina_limit_rate_limited_total", delayed), 2);
    let rejected = &[l, "outcome=rejected"];
    assert_eq!(
        counter(&all, "marina_limit_rate_limited_total", rejected),
        0
    );
    let missing = &[l, "reason=missing_key"];
    assert_eq!(counter(&all, "marina_limit_refused_total", missing), 1);
    assert_eq!(gauge(&all, "marina_limit_active_keys", &[l]), 2.0);
    // Bounded cardinality: no label value is a user's key.
    for (_, labels) in all.keys() {
        assert!(
            labels
                .iter()
                .all(|l| !l.contains("alice") && !l.contains("bob")),
            "{labels:?}"
        );
    }
}

#[tokio::test]
async fn concurrency_per_key_counts_refusals_and_requests_in_flight() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        ConcurrencyPerKeyLayer::new(user, 1).name("per_user")
    });
    assert_eq!(layer.handle().name(), "per_user");
    let mut svc = layer.layer(service_fn(|(_, answer): Req| async move {
        answer.await.map_err(BoxError::from)
    }));
    let l = "limiter=per_user";

    // alice and bob have one request in flight each; alice's second is refused.
    let (a1, a1_tx) = req(Some("alice"));
    let a1 = svc.ready().await.unwrap().call(a1);
    let (b1, b1_tx) = req(Some("bob"));
    let b1 = svc.ready().await.unwrap().call(b1);
    let (a2, _a2_tx) = req(Some("alice"));
    let err = svc.ready().await.unwrap().call(a2).await.unwrap_err();
    assert!(
        err.downcast_ref::<marina_limit::ConnectionLimit>()
            .is_some(),
        "{err}"
    );
    let during = series(&snapshotter);
    assert_eq!(gauge(&during, "marina_limit_in_flight", &[l]), 2.0);
    assert_eq!(gauge(&during, "marina_limit_active_keys", &[l]), 2.0);

    a1_tx.send(1).unwrap();
    b1_tx.send(2).unwrap();
    assert_eq!(a1.await.unwrap(), 1);
    assert_eq!(b1.await.unwrap(), 2);
    let (r, _tx) = req(None);
    assert!(svc.ready().await.unwrap().call(r).await.is_err());

    let after = series(&snapshotter);
    // The first snapshot reset counters and gauges to 0: add both readings.
    let gauges = |name: &str| gauge(&during, name, &[l]) + gauge(&after, name, &[l]);
    assert_eq!(gauges("marina_limit_in_flight"), 0.0);
    assert_eq!(gauges("marina_limit_active_keys"), 0.0);
    let both = |name: &str, labels: &[&str]| {
        counter(&during, name, labels) + counter(&after, name, labels)
    };
    assert_eq!(both("marina_limit_admitted_total", &[l]), 2);
    assert_eq!(both("marina_limit_concurrency_refused_total", &[l]), 1);
    assert_eq!(
        both("marina_limit_refused_total", &[l, "reason=missing_key"]),
        1
    );
    assert_eq!(
        both("marina_limit_refused_total", &[l, "reason=too_many_keys"]),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn bandwidth_counts_bytes_and_throttled_time_over_loopback() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // 10,000 B/s for writes, bursts of 1,000 B.
    let limit = metrics::with_local_recorder(&recorder, || {
        BandwidthLimit::new(service_fn(|addr: std::net::SocketAddr| {
            TcpStream::connect(addr)
        }))
        .shared_write(10_000.0, 1_000)
        .name("uploads")
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        sock.read_to_end(&mut got).await.unwrap();
        got.len()
    });
    let mut conn = limit.clone().oneshot(addr).await.unwrap();
    conn.write_all(&[7u8; 5_000]).await.unwrap();
    conn.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), 5_000);

    let all = series(&snapshotter);
    let l = "limiter=uploads";
    assert_eq!(
        counter(&all, "marina_limit_bandwidth_bytes_total", &[l]),
        5_000
    );
    let Some(DebugValue::Histogram(waits)) =
        all.get(&key("marina_limit_bandwidth_throttled_seconds", &[l]))
    else {
        panic!("no throttled-time histogram: {all:#?}");
    };
    // The burst covers the first 1,000 B; the other 4,000 wait for the budget at
    // 10,000 B/s: 0.4 s of (paused, simulated) time in all.
    assert!(!waits.is_empty());
    let total: f64 = waits.iter().map(|w| w.into_inner()).sum();
    assert!(
        (0.39..=0.41).contains(&total),
        "throttled {total} s in {waits:?}"
    );
}
