//! The `metrics` feature: the pool's counters and gauges reach the installed recorder.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_pool::Pool;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tower::service_fn;

/// Records every counter and gauge by `name{label=value,…}`.
#[derive(Default, Clone)]
struct Captured {
    values: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
}

impl Captured {
    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.values.lock().unwrap().entry(name).or_default().clone()
    }

    fn get(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |v| v.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.get(name))
    }
}

impl Recorder for Captured {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn pool_events_are_counted_and_gauges_published() {
    let rec = Captured::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&rec, || {
        rt.block_on(async {
            let pool = Pool::builder()
                .name("m")
                .max_size(2)
                .acquire_timeout(Duration::from_secs(1))
                .build(service_fn(|_: ()| async { Ok::<_, Infallible>(0u8) }), ())
                .unwrap();
            let a = pool.get().await.unwrap();
            let b = pool.get().await.unwrap();
            assert!(pool.get().await.unwrap_err().is_timeout());
            b.poison();
            // Let the background task publish its gauges.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(a);
        })
    });
    assert_eq!(rec.get("marina_pool_connections_created_total{pool=m}"), 2);
    assert_eq!(rec.get("marina_pool_timeouts_total{pool=m}"), 1);
    assert_eq!(
        rec.get("marina_pool_connections_closed_total{pool=m,reason=broken}"),
        1
    );
    assert_eq!(
        rec.gauge("marina_pool_connections{pool=m,state=active}"),
        1.0
    );
    assert_eq!(rec.gauge("marina_pool_waiting{pool=m}"), 0.0);
    assert_eq!(rec.get("marina_pool_checkouts_total{pool=m,outcome=ok}"), 2);
    assert_eq!(
        rec.get("marina_pool_checkouts_total{pool=m,outcome=timeout}"),
        1
    );
    // Registered up front: present at 0.
    assert!(
        rec.values
            .lock()
            .unwrap()
            .contains_key("marina_pool_checkouts_total{pool=m,outcome=error}")
    );
    assert!(
        rec.values
            .lock()
            .unwrap()
            .contains_key("marina_pool_connections_closed_total{pool=m,reason=idle_timeout}")
    );
}
