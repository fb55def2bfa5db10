//! `tracing` events: state changes at WARN (ejection) and INFO (readmission, probe
//! transitions), with structured fields; nothing per request above DEBUG.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_core::probe_fn;
use marina_health::{ActiveConfig, Health, HealthConfig, Status};
use tower::{Service, ServiceExt, service_fn};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt;

/// One event: level, message and the other fields as `name=value` text.
#[derive(Debug, Clone)]
struct Event {
    level: tracing::Level,
    message: String,
    fields: Vec<(String, String)>,
}

impl Event {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Fields<'a>(&'a mut Event);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.message = format!("{value:?}");
        } else {
            self.0
                .fields
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.message = value.to_string();
        } else {
            self.0
                .fields
                .push((field.name().to_string(), value.to_string()));
        }
    }
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Recorder {
    /// The events at INFO or above recorded since the last call.
    fn take_info(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_iter()
            .filter(|e| e.level <= tracing::Level::INFO)
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut e = Event {
            level: *event.metadata().level(),
            message: String::new(),
            fields: Vec::new(),
        };
        event.record(&mut Fields(&mut e));
        self.0.lock().unwrap().push(e);
    }
}

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
async fn passive_ejection_warns_and_readmission_informs() {
    let events = Recorder::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(events.clone()));
    let down = Arc::new(AtomicBool::new(false));
    let mut svc = Health::builder(backend(down.clone()))
        .name("10.0.0.1:80")
        .config(HealthConfig {
            consecutive_failures: 3,
            ..HealthConfig::default()
        })
        .build();

    // Requests that pass, then two that fail: nothing at INFO or above.
    for _ in 0..10 {
        svc.ready().await.unwrap().call(()).await.unwrap();
    }
    down.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        svc.ready().await.unwrap().call(()).await.unwrap_err();
    }
    let quiet = events.take_info();
    assert!(
        quiet.is_empty(),
        "per-request events above DEBUG: {quiet:?}"
    );

    // The third failure ejects: one WARN with the endpoint, cause and length.
    svc.ready().await.unwrap().call(()).await.unwrap_err();
    let ejected = events.take_info();
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    let e = &ejected[0];
    assert_eq!(e.level, tracing::Level::WARN);
    assert_eq!(e.message, "endpoint ejected");
    assert_eq!(e.field("endpoint"), Some("10.0.0.1:80"));
    assert_eq!(e.field("cause"), Some("passive"));
    assert_eq!(e.field("reason"), Some("consecutive failures"));
    assert_eq!(e.field("ejected_for"), Some("30s"));

    // The ejection ends, the trial passes: one INFO readmission.
    down.store(false, Ordering::SeqCst);
    svc.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(svc.handle().status(), Status::Healthy);
    let back = events.take_info();
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].level, tracing::Level::INFO);
    assert_eq!(back[0].message, "endpoint readmitted");
    assert_eq!(back[0].field("endpoint"), Some("10.0.0.1:80"));
}

#[tokio::test(start_paused = true)]
async fn probes_log_transitions_not_rounds() {
    let events = Recorder::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(events.clone()));
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
        ..ActiveConfig::default()
    };
    let svc = Health::builder(backend(down.clone()))
        .name("b")
        .probe(active, probe, ())
        .build();
    let mut changes = svc.handle().subscribe();
    changes
        .wait_for(|s| *s == Status::Ejected { until: None })
        .await
        .unwrap();
    // Three failing rounds: the first logs the transition, the third the ejection.
    let out = events.take_info();
    let seen: Vec<_> = out.iter().map(|e| (e.level, e.message.as_str())).collect();
    assert_eq!(
        seen,
        [
            (tracing::Level::INFO, "health probe failing"),
            (tracing::Level::WARN, "endpoint ejected"),
        ]
    );
    assert_eq!(out[0].field("error"), Some("refused"));
    assert_eq!(out[1].field("cause"), Some("active"));
    assert_eq!(out[1].field("until"), Some("probes pass"));

    // More failing rounds: nothing new above DEBUG.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(events.take_info().is_empty());

    down.store(false, Ordering::SeqCst);
    changes.wait_for(|s| s.is_ready()).await.unwrap();
    let seen: Vec<_> = events
        .take_info()
        .iter()
        .map(|e| (e.level, e.message.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                tracing::Level::INFO,
                "health probe passing again".to_string()
            ),
            (tracing::Level::INFO, "endpoint readmitted".to_string()),
        ]
    );
    drop(svc);
}
