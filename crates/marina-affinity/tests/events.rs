//! `tracing`, with or without the `metrics` feature: a re-pin is recorded as
//! `repinned = true` in the request's span (the `marina.request` span the stack opens);
//! a full sticky table warns once each time it fills (not once per refused or purged
//! session, and not again while it stays about full).

mod support;

use std::fmt;
use std::sync::{Arc, Mutex};

use marina_affinity::{AffinityLayer, TableConfig, WhenFull};
use marina_balance::{Balance, RoundRobin};
use marina_core::Request;
use support::{Backend, balance, key_of, send, served_by};
use tower::discover::Change;
use tower::{Layer, Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// What the subscriber saw: `repinned` values recorded into spans, and WARN messages
/// from this crate.
#[derive(Clone, Default)]
struct Seen {
    repinned: Arc<Mutex<Vec<bool>>>,
    warnings: Arc<Mutex<Vec<String>>>,
}

struct Fields<'a> {
    seen: &'a Seen,
    message: String,
}

impl Visit for Fields<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "repinned" {
            self.seen.repinned.lock().unwrap().push(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Seen {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        attrs.record(&mut Fields {
            seen: self,
            message: String::new(),
        });
    }

    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        values.record(&mut Fields {
            seen: self,
            message: String::new(),
        });
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == Level::WARN && meta.target().starts_with("marina_affinity") {
            let mut fields = Fields {
                seen: self,
                message: String::new(),
            };
            event.record(&mut fields);
            self.warnings.lock().unwrap().push(fields.message);
        }
    }
}

fn capture() -> (Seen, tracing::subscriber::DefaultGuard) {
    let seen = Seen::default();
    let subscriber = tracing_subscriber::registry().with(seen.clone());
    (seen, tracing::subscriber::set_default(subscriber))
}

/// Sends a request for `key` inside a span like the one `marina::Stack` opens.
async fn send_in_span<S>(svc: &mut S, key: &str) -> usize
where
    S: Service<support::Req, Response = support::Resp, Error = marina_core::BoxError>,
{
    use tracing::Instrument;
    let span = tracing::debug_span!(
        "marina.request",
        endpoint = tracing::field::Empty,
        attempt = tracing::field::Empty,
        repinned = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let svc = svc.ready().await.unwrap();
    let fut = span.in_scope(|| svc.call(Request::new(Some(key.to_owned()))));
    fut.instrument(span).await.unwrap().body
}

#[tokio::test]
async fn a_repin_is_recorded_in_the_request_span() {
    let (seen, _guard) = capture();
    let (tx, lb) = Balance::from_channel(RoundRobin::new());
    let lb = lb.route_hints_from_extensions();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        tx.send(Change::Insert(*name, Backend(i))).unwrap();
    }
    let mut svc = AffinityLayer::sticky(key_of, TableConfig::default()).layer(lb);
    let first = send_in_span(&mut svc, "alice").await;
    send_in_span(&mut svc, "alice").await;
    assert!(seen.repinned.lock().unwrap().is_empty(), "no re-pin yet");

    tx.send(Change::Remove(["a", "b", "c"][first])).unwrap();
    assert_ne!(send_in_span(&mut svc, "alice").await, first);
    assert_eq!(*seen.repinned.lock().unwrap(), [true]);
}

#[tokio::test]
async fn a_full_table_warns_once_until_it_has_room_again() {
    let (seen, _guard) = capture();
    let layer = AffinityLayer::sticky(
        key_of,
        TableConfig::with_capacity(2).when_full(WhenFull::Refuse),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(balance(3).0);
    let warnings = || seen.warnings.lock().unwrap().clone();

    served_by(&mut svc, "a").await;
    served_by(&mut svc, "b").await;
    assert!(warnings().is_empty());
    for i in 0..5 {
        assert!(send(&mut svc, Some(&format!("x{i}"))).await.is_err());
    }
    assert_eq!(warnings().len(), 1, "{:?}", warnings());
    assert!(
        warnings()[0].contains("session table full"),
        "{:?}",
        warnings()
    );

    // Room again, then full again: a second warning.
    assert!(handle.end_session("a"));
    served_by(&mut svc, "c").await;
    assert!(send(&mut svc, Some("y")).await.is_err());
    assert!(send(&mut svc, Some("z")).await.is_err());
    assert_eq!(warnings().len(), 2, "{:?}", warnings());
    assert_eq!(handle.stats().refused, 7);
}

#[tokio::test]
async fn a_table_that_stays_about_full_does_not_repeat_the_warning() {
    let (seen, _guard) = capture();
    let layer = AffinityLayer::sticky(
        key_of,
        TableConfig::with_capacity(20).when_full(WhenFull::Refuse),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(balance(3).0);
    let warnings = || seen.warnings.lock().unwrap().len();
    for i in 0..20 {
        served_by(&mut svc, &format!("s{i}")).await;
    }
    assert!(send(&mut svc, Some("new")).await.is_err());
    assert_eq!(warnings(), 1);

    // One session ends, another takes its place: still about full, no new warning.
    assert!(handle.end_session("s0"));
    served_by(&mut svc, "t0").await;
    assert!(send(&mut svc, Some("new")).await.is_err());
    assert_eq!(warnings(), 1);

    // Down to 90% (18 of 20), then full again: warned again.
    assert!(handle.end_session("s1") && handle.end_session("s2"));
    served_by(&mut svc, "t1").await;
    served_by(&mut svc, "t2").await;
    assert!(send(&mut svc, Some("new")).await.is_err());
    assert_eq!(warnings(), 2);
}

#[tokio::test]
async fn purging_the_oldest_warns_once_not_per_purge() {
    let (seen, _guard) = capture();
    let mut svc = AffinityLayer::sticky(key_of, TableConfig::with_capacity(10)).layer(balance(3).0);
    for i in 0..30 {
        served_by(&mut svc, &format!("s{i}")).await;
    }
    let warnings = seen.warnings.lock().unwrap().clone();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("least recently used"), "{warnings:?}");
}
