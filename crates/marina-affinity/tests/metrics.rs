//! The `metrics` feature: every documented metric exists once a layer is built, and
//! counts what the traffic did (sessions created, re-pinned, expired, purged, refused,
//! the sessions gauge). The `tracing` side (span field, warnings) is in `events.rs`.
//!
//! Each layer is built inside `metrics::with_local_recorder`, so its handles are bound
//! to that test's `DebuggingRecorder` (the handles are taken at construction; traffic
//! afterwards needs no recorder installed).

#![cfg(feature = "metrics")]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use marina_affinity::{AffinityLayer, TableConfig, WhenFull};
use marina_balance::{Balance, RoundRobin};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{Backend, balance, key_of, send, served_by};
use tower::Layer;
use tower::discover::Change;

const ALL: [&str; 9] = [
    "marina_affinity_sessions",
    "marina_affinity_sessions_created_total",
    "marina_affinity_sessions_repinned_total",
    "marina_affinity_sessions_expired_total",
    "marina_affinity_sessions_purged_total",
    "marina_affinity_table_full_total",
    "marina_affinity_rejected_tokens_total",
    "marina_affinity_unrouted_requests_total",
    "marina_affinity_miswired_layers",
];

/// The recorded values by name (none of these metrics has labels). Counters are read
/// (and reset) by the snapshot: take one at the end.
fn values(snapshotter: &Snapshotter) -> HashMap<String, DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            assert_eq!(key.key().labels().count(), 0, "{key:?} has labels");
            (key.key().name().to_owned(), value)
        })
        .collect()
}

fn counter(values: &HashMap<String, DebugValue>, name: &str) -> u64 {
    match values.get(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name}: not a counter: {other:?}"),
    }
}

fn gauge(values: &HashMap<String, DebugValue>, name: &str) -> f64 {
    match values.get(name) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("{name}: not a gauge: {other:?}"),
    }
}

#[test]
fn every_metric_exists_once_the_layer_is_built() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _layer = metrics::with_local_recorder(&recorder, || {
        AffinityLayer::sticky(key_of, TableConfig::default())
    });
    let values = values(&snapshotter);
    for name in ALL {
        assert!(values.contains_key(name), "{name} missing: {values:?}");
    }
    assert_eq!(
        counter(&values, "marina_affinity_sessions_created_total"),
        0
    );
    assert_eq!(gauge(&values, "marina_affinity_sessions"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn sessions_created_repinned_expired_and_the_gauge_follow_the_traffic() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (tx, lb) = Balance::from_channel(RoundRobin::new());
    let lb = lb.route_hints_from_extensions();
    let names = ["a", "b", "c"];
    for (i, name) in names.iter().enumerate() {
        tx.send(Change::Insert(*name, Backend(i))).unwrap();
    }
    let config = TableConfig::default()
        .idle_timeout(Duration::from_secs(60))
        .sweep_interval(Duration::from_secs(3600));
    let layer = metrics::with_local_recorder(&recorder, || AffinityLayer::sticky(key_of, config));
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // Three sessions, several requests each.
    let mut home = HashMap::new();
    for key in ["alice", "bob", "carol"] {
        for _ in 0..3 {
            let at = served_by(&mut svc, key).await;
            assert_eq!(*home.entry(key).or_insert(at), at);
        }
    }
    // alice's endpoint goes away: her next request re-pins her.
    tx.send(Change::Remove(names[home["alice"]])).unwrap();
    assert_ne!(served_by(&mut svc, "alice").await, home["alice"]);
    // bob ends his session; carol's expires.
    assert!(handle.end_session("bob"));
    tokio::time::advance(Duration::from_secs(30)).await;
    served_by(&mut svc, "alice").await;
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(handle.sweep(), 1); // carol

    let stats = handle.stats();
    assert_eq!(
        (stats.created, stats.repinned, stats.expired, stats.sessions),
        (3, 1, 1, 1)
    );
    let values = values(&snapshotter);
    assert_eq!(
        counter(&values, "marina_affinity_sessions_created_total"),
        3
    );
    assert_eq!(
        counter(&values, "marina_affinity_sessions_repinned_total"),
        1
    );
    assert_eq!(
        counter(&values, "marina_affinity_sessions_expired_total"),
        1
    );
    assert_eq!(counter(&values, "marina_affinity_sessions_purged_total"), 0);
    assert_eq!(counter(&values, "marina_affinity_table_full_total"), 0);
    assert_eq!(gauge(&values, "marina_affinity_sessions"), 1.0);
}

#[tokio::test]
async fn a_full_table_counts_purges_or_refusals() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (purging, refusing) = metrics::with_local_recorder(&recorder, || {
        (
            AffinityLayer::sticky(key_of, TableConfig::with_capacity(2)),
            AffinityLayer::sticky(
                key_of,
                TableConfig::with_capacity(2).when_full(WhenFull::Refuse),
            ),
        )
    });
    let mut purging = purging.layer(balance(3).0);
    let mut refusing = refusing.layer(balance(3).0);
    for i in 0..5 {
        served_by(&mut purging, &format!("p{i}")).await;
    }
    let mut refused = 0;
    for i in 0..5 {
        refused += usize::from(send(&mut refusing, Some(&format!("r{i}"))).await.is_err());
    }
    assert_eq!(refused, 3);

    let values = values(&snapshotter);
    // Both layers count into the same (unlabelled) series.
    assert_eq!(
        counter(&values, "marina_affinity_sessions_created_total"),
        7
    );
    assert_eq!(counter(&values, "marina_affinity_sessions_purged_total"), 3);
    assert_eq!(counter(&values, "marina_affinity_table_full_total"), 3);
    assert_eq!(gauge(&values, "marina_affinity_sessions"), 4.0);
}

#[tokio::test]
async fn token_sessions_and_rejected_tokens_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let codec = marina_affinity::TokenCodec::new(
        b"keep this secret, 32 bytes long.",
        Duration::from_secs(3600),
    )
    .unwrap();
    let layer = metrics::with_local_recorder(&recorder, || {
        AffinityLayer::token(key_of, codec).new_sessions(true)
    });
    let mut svc = layer.layer(balance(3).0);
    send(&mut svc, None).await.unwrap(); // a new session: a first token
    send(&mut svc, Some("forged")).await.unwrap(); // rejected, replaced

    let values = values(&snapshotter);
    assert_eq!(
        counter(&values, "marina_affinity_sessions_created_total"),
        2
    );
    assert_eq!(counter(&values, "marina_affinity_rejected_tokens_total"), 1);
    assert_eq!(gauge(&values, "marina_affinity_sessions"), 0.0);
}

#[tokio::test]
async fn unread_hints_are_counted_and_the_layer_shows_as_miswired() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let layer = metrics::with_local_recorder(&recorder, || {
        AffinityLayer::sticky(key_of, TableConfig::default())
    });
    // A balancer that does not read route hints.
    let mut svc = layer.layer(Balance::from_services(
        (0..3).map(Backend),
        RoundRobin::new(),
    ));
    for _ in 0..10 {
        served_by(&mut svc, "alice").await;
    }
    let values = values(&snapshotter);
    assert_eq!(
        counter(&values, "marina_affinity_unrouted_requests_total"),
        10
    );
    assert_eq!(gauge(&values, "marina_affinity_miswired_layers"), 1.0);
}
