//! The `metrics` feature: every series exists once the endpoint is built, and reads
//! what happened after ejections and readmissions, passive and active.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use marina_core::probe_fn;
use marina_health::{ActiveConfig, Health, HealthConfig, Status};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::{Service, ServiceExt, service_fn};

type Series = (String, Vec<String>);

/// What the recorder saw, by name and sorted `key=value` labels. The debugging
/// recorder's snapshot drains values (counters and gauges back to 0), so counters are
/// summed over snapshots here, and a gauge is read only right after it changed.
struct Seen {
    snap: Snapshotter,
    counters: HashMap<Series, u64>,
    gauges: HashMap<Series, f64>,
}

impl Seen {
    fn new(snap: Snapshotter) -> Self {
        Seen {
            snap,
            counters: HashMap::new(),
            gauges: HashMap::new(),
        }
    }

    /// Takes a snapshot and adds it to what was seen before.
    fn update(&mut self) -> &Self {
        for (key, _, _, value) in self.snap.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let series = (key.name().to_string(), labels);
            match value {
                DebugValue::Counter(v) => *self.counters.entry(series).or_default() += v,
                DebugValue::Gauge(v) => {
                    self.gauges.insert(series, v.0);
                }
                DebugValue::Histogram(_) => {}
            }
        }
        self
    }

    fn counter(&self, name: &str, labels: &[&str]) -> u64 {
        let series = (name.into(), labels.iter().map(|l| l.to_string()).collect());
        match self.counters.get(&series) {
            Some(v) => *v,
            None => panic!("no counter {series:?}"),
        }
    }

    fn gauge(&self, name: &str, labels: &[&str]) -> f64 {
        let series = (name.into(), labels.iter().map(|l| l.to_string()).collect());
        match self.gauges.get(&series) {
            Some(v) => *v,
            None => panic!("no gauge {series:?}"),
        }
    }
}

const EP: &str = "endpoint=10.0.0.1:80";

/// A backend that fails while `down` is set.
fn backend(
    down: Arc<AtomicBool>,
) -> impl Service<(), Response = (), Error = std::io::Error, Future: Send> + Clone {
    service_fn(move |_: ()| {
        let down = down.load(Ordering::SeqCst);
        async move {
            if down {
                Err(std::io::Error::other("down"))
            } else {
                Ok(())
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn passive_ejection_then_readmission() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(recorder.snapshotter());
    let down = Arc::new(AtomicBool::new(true));
    let mut svc = metrics::with_local_recorder(&recorder, || {
        Health::builder(backend(down.clone()))
            .name("10.0.0.1:80")
            .config(HealthConfig {
                consecutive_failures: 3,
                ..HealthConfig::default()
            })
            .build()
    });
    let handle = svc.handle();

    // Every series exists, at 0, as soon as the endpoint is built.
    let m = seen.update();
    assert_eq!(m.gauge("marina_health_status", &[EP]), 0.0);
    for cause in ["cause=active", "cause=passive"] {
        assert_eq!(m.counter("marina_health_ejections_total", &[cause, EP]), 0);
    }
    for outcome in ["outcome=fail", "outcome=pass"] {
        assert_eq!(m.counter("marina_health_probes_total", &[EP, outcome]), 0);
    }
    assert_eq!(m.counter("marina_health_readmissions_total", &[EP]), 0);
    assert_eq!(m.counter("marina_health_failures_total", &[EP]), 0);

    // Three failures in a row: ejected by the passive detector.
    for _ in 0..3 {
        let r = svc.ready().await.unwrap().call(()).await;
        assert!(r.is_err());
    }
    assert!(matches!(
        handle.status(),
        Status::Ejected { until: Some(_) }
    ));
    let m = seen.update();
    assert_eq!(m.gauge("marina_health_status", &[EP]), 3.0);
    assert_eq!(
        m.counter("marina_health_ejections_total", &["cause=passive", EP]),
        1
    );
    assert_eq!(
        m.counter("marina_health_ejections_total", &["cause=active", EP]),
        0
    );
    assert_eq!(m.counter("marina_health_failures_total", &[EP]), 3);
    assert_eq!(m.counter("marina_health_readmissions_total", &[EP]), 0);

    // The ejection ends (30 s): half-open, which reads degraded, not yet readmitted.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(handle.status(), Status::Degraded);
    let m = seen.update();
    assert_eq!(m.gauge("marina_health_status", &[EP]), 2.0);
    assert_eq!(m.counter("marina_health_readmissions_total", &[EP]), 0);

    // The trial fails: ejected again, for longer.
    svc.ready().await.unwrap().call(()).await.unwrap_err();
    let m = seen.update();
    assert_eq!(m.gauge("marina_health_status", &[EP]), 3.0);
    assert_eq!(
        m.counter("marina_health_ejections_total", &["cause=passive", EP]),
        2
    );
    assert_eq!(m.counter("marina_health_failures_total", &[EP]), 4);

    // The backend is back: the next trial passes and readmits the endpoint.
    down.store(false, Ordering::SeqCst);
    svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(handle.status(), Status::Healthy);
    let m = seen.update();
    assert_eq!(m.gauge("marina_health_status", &[EP]), 1.0);
    assert_eq!(m.counter("marina_health_readmissions_total", &[EP]), 1);
    assert_eq!(
        m.counter("marina_health_ejections_total", &["cause=passive", EP]),
        2
    );
    assert_eq!(m.counter("marina_health_failures_total", &[EP]), 4);
    // No probe configured: no probe rounds.
    assert_eq!(
        m.counter("marina_health_probes_total", &[EP, "outcome=fail"]),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn active_ejection_then_readmission() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(recorder.snapshotter());
    let down = Arc::new(AtomicBool::new(true));
    let probe = {
        let down = down.clone();
        probe_fn(move |_: &mut ()| {
            let down = down.load(Ordering::SeqCst);
            Box::pin(async move { if down { Err("refused".into()) } else { Ok(()) } })
        })
    };
    let active = ActiveConfig {
        interval: Duration::from_secs(1),
        jitter: 0.0,
        healthy_threshold: 2,
        unhealthy_threshold: 3,
        ..ActiveConfig::default()
    };
    let svc = metrics::with_local_recorder(&recorder, || {
        Health::builder(backend(down.clone()))
            .name("10.0.0.1:80")
            .probe(active, probe, ())
            .build()
    });
    let mut changes = svc.handle().subscribe();

    // Three failing rounds take the endpoint out until probes pass.
    changes
        .wait_for(|s| *s == Status::Ejected { until: None })
        .await
        .unwrap();
    let m = seen.update();
    assert_eq!(m.gauge("marina_health_status", &[EP]), 3.0);
    assert_eq!(
        m.counter("marina_health_ejections_total", &["cause=active", EP]),
        1
    );
    assert_eq!(
        m.counter("marina_health_ejections_total", &["cause=passive", EP]),
        0
    );
    assert_eq!(
        m.counter("marina_health_probes_total", &[EP, "outcome=fail"]),
        3
    );
    assert_eq!(
        m.counter("marina_health_probes_total", &[EP, "outcome=pass"]),
        0
    );
    // Probe failures are not failures on real traffic.
    assert_eq!(m.counter("marina_health_failures_total", &[EP]), 0);

    // Two passing rounds bring it back.
    down.store(false, Ordering::SeqCst);
    changes.wait_for(|s| s.is_ready()).await.unwrap();
    let m = seen.update();
    assert_eq!(m.counter("marina_health_readmissions_total", &[EP]), 1);
    assert_eq!(
        m.counter("marina_health_probes_total", &[EP, "outcome=pass"]),
        2
    );
    // Serving again; the recent failing rounds mark it degraded (2), not ejected (3).
    let status = m.gauge("marina_health_status", &[EP]);
    assert!(status == 1.0 || status == 2.0, "status gauge {status}");
    drop(svc);
}
