//! Tests of what the balancer records into the request's span: `endpoint` (the key as
//! text) and `attempt` (1, then 2 and on for failover attempts and hedges).
//!
//! A small `tracing-subscriber` layer over the registry, set as the default for the
//! test's thread, keeps every value recorded into a span after its creation, in order;
//! the request's span is the one the stack's edge opens (`marina.request` with empty
//! `endpoint` and `attempt` fields), entered around `call` and instrumenting the
//! response future.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_balance::{Balance, Failover, RoundRobin};
use marina_core::{BoxError, NotSent};
use tower::discover::ServiceList;
use tower::{Service, ServiceExt, service_fn};
use tracing::Instrument;
use tracing::field::{Field, Visit};
use tracing::span::{Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Values recorded into spans after they were created, as (field, value) in order.
type Records = Arc<Mutex<Vec<(String, String)>>>;

struct Recorder(Records);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        values.record(&mut Fields(&mut self.0.lock().unwrap()));
    }
}

/// Sets a registry with a [`Recorder`] as this thread's default subscriber.
fn record() -> (Records, tracing::subscriber::DefaultGuard) {
    let records = Records::default();
    let subscriber = tracing_subscriber::registry().with(Recorder(records.clone()));
    (records, tracing::subscriber::set_default(subscriber))
}

/// Sends `req` through `lb` within a fresh request span, as the stack's edge does.
async fn send<S>(lb: &mut S, req: u32) -> Result<S::Response, S::Error>
where
    S: Service<u32>,
{
    let span = tracing::debug_span!(
        "marina.request",
        endpoint = tracing::field::Empty,
        attempt = tracing::field::Empty
    );
    let lb = lb.ready().await?;
    let fut = span.in_scope(|| lb.call(req));
    fut.instrument(span).await
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn the_span_names_each_attempt_s_endpoint_and_number() {
    let (records, _guard) = record();
    // Endpoint 0 refuses every connection; 1 and 2 answer.
    let endpoints = (0..3u32).map(|n| {
        service_fn(move |req: u32| async move {
            if n == 0 {
                return Err(NotSent::new(io::Error::from(
                    io::ErrorKind::ConnectionRefused,
                )));
            }
            Ok(req * 10 + n)
        })
    });
    let mut lb = Balance::new(
        ServiceList::new(endpoints.collect::<Vec<_>>()),
        RoundRobin::new(),
    )
    .failover(Failover::new());

    // Round robin: endpoint 0 first, which fails; the failover goes to endpoint 1 (the
    // first of the least loaded not tried).
    assert_eq!(send(&mut lb, 1).await.unwrap(), 11);
    assert_eq!(
        *records.lock().unwrap(),
        pairs(&[
            ("endpoint", "0"),
            ("attempt", "1"),
            ("endpoint", "1"),
            ("attempt", "2")
        ])
    );
    records.lock().unwrap().clear();
    // Endpoint 1's turn: one attempt.
    assert_eq!(send(&mut lb, 2).await.unwrap(), 21);
    assert_eq!(
        *records.lock().unwrap(),
        pairs(&[("endpoint", "1"), ("attempt", "1")])
    );
}

#[tokio::test(start_paused = true)]
async fn when_a_hedge_loses_the_span_names_the_endpoint_that_answered() {
    let (records, _guard) = record();
    // Endpoint 0 answers after 100 ms, endpoint 1 after 1 s: the hedge sent to 1 at
    // 50 ms loses.
    let endpoints = (0..2u32).map(|n| {
        service_fn(move |req: u32| async move {
            let wait = if n == 0 { 100 } else { 1000 };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Ok::<_, BoxError>(req * 10 + n)
        })
    });
    let mut lb = Balance::new(
        ServiceList::new(endpoints.collect::<Vec<_>>()),
        RoundRobin::new(),
    )
    .failover(Failover::new().hedge(Duration::from_millis(50)))
    .idempotent_if(|_: &u32| true);
    assert_eq!(send(&mut lb, 3).await.unwrap(), 30);
    assert_eq!(lb.handle().totals().hedges, 1);
    assert_eq!(
        *records.lock().unwrap(),
        pairs(&[
            ("endpoint", "0"),
            ("attempt", "1"),
            ("endpoint", "1"),
            ("attempt", "2"),
            ("endpoint", "0"),
        ])
    );
}

#[tokio::test]
async fn without_a_span_or_a_subscriber_nothing_is_recorded_and_nothing_fails() {
    let endpoints =
        (0..2u32).map(|n| service_fn(move |req: u32| async move { Ok::<_, BoxError>(req + n) }));
    let mut lb = Balance::new(
        ServiceList::new(endpoints.collect::<Vec<_>>()),
        RoundRobin::new(),
    );
    assert_eq!(lb.ready().await.unwrap().call(1).await.unwrap(), 1);
    // A subscriber, but no span entered: the current span is none.
    let (records, _guard) = record();
    assert_eq!(lb.ready().await.unwrap().call(1).await.unwrap(), 2);
    assert!(records.lock().unwrap().is_empty());
}
