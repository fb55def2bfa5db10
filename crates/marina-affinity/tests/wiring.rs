//! A mis-wired stack is loud: an `AffinityLayer` over a balancer that does not read
//! route hints (marina-balance's `Balance` built without `.route_hints_from_extensions()`)
//! logs one warning naming the fix and sets `AffinityStats::hint_unread`, in every mode;
//! a correctly wired one stays quiet.

mod support;

use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use marina_affinity::{AffinityHandle, AffinityLayer, TableConfig, TokenCodec};
use marina_balance::{Balance, ConsistentHash, RoundRobin};
use marina_core::{BoxError, EndpointId, HasExtensions, Response, RouteHint};
use support::{Backend, Req, Resp, balance, send, served_by};
use tower::{Layer, Service, service_fn};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Warnings logged by marina-affinity while a [`Capture`] is the default subscriber.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A tracing layer that keeps the message of every WARN event from this crate.
struct Capture(Warnings);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == Level::WARN && meta.target().starts_with("marina_affinity") {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.0.lock().unwrap().push(message.0);
        }
    }
}

/// Captures this thread's warnings until the guard drops (the tests run on a
/// current-thread runtime, so every poll happens on this thread).
fn capture() -> (Warnings, tracing::subscriber::DefaultGuard) {
    let warnings = Warnings::default();
    let subscriber = tracing_subscriber::registry().with(Capture(warnings.clone()));
    (warnings, tracing::subscriber::set_default(subscriber))
}

/// Three backends behind a round-robin `Balance` that does NOT read route hints.
fn unwired_balance() -> support::Lb {
    Balance::from_services((0..3).map(Backend), RoundRobin::new())
}

fn assert_one_warning_naming_the_fix(warnings: &Warnings) {
    let all = warnings.all();
    assert_eq!(all.len(), 1, "exactly one warning: {all:?}");
    assert!(all[0].contains("route_hints_from_extensions"), "{}", all[0]);
    assert!(all[0].contains("marina::Stack"), "{}", all[0]);
}

#[tokio::test]
async fn sticky_over_a_balancer_without_route_hints_warns_once() {
    let (warnings, _guard) = capture();
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(unwired_balance());

    let mut served = [0; 3];
    for _ in 0..30 {
        served[served_by(&mut svc, "alice").await] += 1;
    }

    // The trap: alice is spread over every backend and no session exists...
    assert_eq!(served, [10, 10, 10]);
    let stats = handle.stats();
    assert_eq!((stats.sessions, stats.created), (0, 0));
    // ...but now it says so, once.
    assert!(stats.hint_unread);
    assert_eq!(stats.unrouted, 30);
    assert_one_warning_naming_the_fix(&warnings);
}

#[tokio::test]
async fn the_warning_comes_with_the_eighth_unread_hint() {
    let (warnings, _guard) = capture();
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(unwired_balance());

    for i in 0..7 {
        served_by(&mut svc, &format!("user{i}")).await;
    }
    let stats = handle.stats();
    assert_eq!(stats.unrouted, 7);
    assert!(!stats.hint_unread);
    assert!(warnings.all().is_empty());

    served_by(&mut svc, "user7").await;
    assert!(handle.stats().hint_unread);
    assert_one_warning_naming_the_fix(&warnings);
}

#[tokio::test]
async fn hash_mode_over_a_balancer_without_route_hints_warns() {
    let (warnings, _guard) = capture();
    let lb: support::Lb = Balance::from_services((0..3).map(Backend), ConsistentHash::new());
    let layer = AffinityLayer::hash(support::key_of);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    for _ in 0..10 {
        served_by(&mut svc, "alice").await;
    }
    let stats = handle.stats();
    assert!(stats.hint_unread);
    assert_eq!(stats.unrouted, 10);
    assert_one_warning_naming_the_fix(&warnings);
}

#[tokio::test]
async fn token_mode_over_a_balancer_without_route_hints_warns() {
    let (warnings, _guard) = capture();
    let codec = TokenCodec::new(
        b"0123456789abcdef0123456789abcdef",
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let layer = AffinityLayer::token(support::key_of, codec).new_sessions(true);
    let handle = layer.handle();
    let mut svc = layer.layer(unwired_balance());

    for _ in 0..8 {
        let resp = send(&mut svc, None).await.unwrap();
        // With no choice reported there is no endpoint to put in a token.
        assert!(
            resp.extensions()
                .get::<marina_affinity::IssuedToken>()
                .is_none()
        );
    }
    let stats = handle.stats();
    assert_eq!(stats.created, 0);
    assert!(stats.hint_unread);
    assert_one_warning_naming_the_fix(&warnings);
}

#[tokio::test]
async fn a_correctly_wired_stack_is_quiet() {
    let (warnings, _guard) = capture();
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let users = ["alice", "bob", "carol", "dave"];
    let mut first = [0; 4];
    for (i, user) in users.iter().enumerate() {
        first[i] = served_by(&mut svc, user).await;
    }
    for _ in 0..5 {
        for (i, user) in users.iter().enumerate() {
            assert_eq!(
                served_by(&mut svc, user).await,
                first[i],
                "{user} stays put"
            );
        }
    }
    let stats = handle.stats();
    assert_eq!((stats.sessions, stats.created), (4, 4));
    assert_eq!(stats.unrouted, 0);
    assert!(!stats.hint_unread);
    assert!(warnings.all().is_empty(), "{:?}", warnings.all());
}

#[tokio::test]
async fn requests_without_a_hint_are_not_judged() {
    let (warnings, _guard) = capture();
    // Key-less requests and no new sessions: the layer writes no hint at all.
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(unwired_balance());
    for _ in 0..20 {
        send(&mut svc, None).await.unwrap();
    }
    let stats = handle.stats();
    assert_eq!(stats.unrouted, 0);
    assert!(!stats.hint_unread);
    assert!(warnings.all().is_empty());
}

#[tokio::test]
async fn failed_requests_are_not_judged() {
    let (warnings, _guard) = capture();
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::default());
    let handle = layer.handle();
    let failing = service_fn(|_: Req| async { Err::<Resp, _>(std::io::Error::other("down")) });
    let mut svc = layer.layer(failing);
    for _ in 0..20 {
        assert!(send(&mut svc, Some("alice")).await.is_err());
    }
    let stats = handle.stats();
    assert_eq!(stats.unrouted, 0);
    assert!(!stats.hint_unread);
    assert!(warnings.all().is_empty());
}

/// A stand-in for a balancer that starts reading hints at some point: reports
/// endpoint 1 through the hint while `reads` is set.
fn switchable(reads: Arc<AtomicBool>) -> impl Service<Req, Response = Resp, Error = Infallible> {
    service_fn(move |req: Req| {
        if reads.load(Ordering::SeqCst)
            && let Some(hint) = req.extensions().get::<RouteHint>()
        {
            hint.report_chosen(EndpointId(1));
        }
        async { Ok::<_, Infallible>(Response::new(1)) }
    })
}

#[tokio::test]
async fn a_hint_read_later_clears_the_flag_and_it_never_warns_twice() {
    let (warnings, _guard) = capture();
    let reads = Arc::new(AtomicBool::new(false));
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::default());
    let handle: AffinityHandle = layer.handle();
    let mut svc = layer.layer(switchable(reads.clone()));

    for _ in 0..8 {
        send(&mut svc, Some("alice")).await.unwrap();
    }
    assert!(handle.stats().hint_unread);

    reads.store(true, Ordering::SeqCst);
    send(&mut svc, Some("alice")).await.unwrap();
    let stats = handle.stats();
    assert!(!stats.hint_unread);
    assert_eq!(stats.sessions, 1);
    assert_eq!(handle.pinned("alice"), Some(EndpointId(1)));

    // Unread hints after a read: counted, but no second warning.
    reads.store(false, Ordering::SeqCst);
    for _ in 0..20 {
        send(&mut svc, Some("bob")).await.unwrap();
    }
    let stats = handle.stats();
    assert_eq!(stats.unrouted, 28);
    assert!(!stats.hint_unread);
    assert_eq!(warnings.all().len(), 1);
}

#[tokio::test]
async fn http_requests_over_a_tower_test_mock_warn() {
    let (warnings, _guard) = capture();
    let (mock, mut backend) = tower_test::mock::pair::<http::Request<()>, http::Response<()>>();
    let layer = AffinityLayer::hash(marina_core::HeaderKey::new("x-user"));
    let handle = layer.handle();
    let mut svc = tower_test::mock::Spawn::new(layer.layer(mock));
    backend.allow(100);

    for _ in 0..8 {
        assert!(svc.poll_ready().is_ready());
        let req = http::Request::builder()
            .header("x-user", "alice")
            .body(())
            .unwrap();
        let fut = svc.call(req);
        let (got, reply) = backend.next_request().await.expect("a request");
        // The hint is there, but nothing reads it.
        assert!(got.extensions().get::<RouteHint>().is_some());
        reply.send_response(http::Response::new(()));
        let _resp: Result<_, BoxError> = fut.await;
    }
    assert!(handle.stats().hint_unread);
    assert_one_warning_naming_the_fix(&warnings);
}
