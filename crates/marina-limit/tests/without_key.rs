//! Requests without a key, in both per-key limiters: refused with
//! `MissingKey` by default, let through unlimited, or limited together in one quota
//! (one set of slots) of their own that no key shares — not even the empty key — and
//! that the key table's bound does not touch. Keyed requests beside them are limited
//! as usual either way.
//!
//! Rate tests run on paused time, so `retry_after` and admission instants are exact.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::{
    ConcurrencyPerKeyLayer, ConnectionLimit, KeyTable, MissingKey, OnLimit, Rate, RateLimitLayer,
    RateLimited, TooManyActiveKeys, WhenKeysFull, WithoutKey,
};
use tokio::sync::oneshot;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_err, assert_ready_ok};
use tower::{Layer, Service, ServiceExt, service_fn};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn is_missing_key(e: &BoxError) -> bool {
    e.downcast_ref::<MissingKey>().is_some()
}

// ---------------------------------------------------------------- rate

/// A backend that answers at once with the request.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl<R> Service<R> for Echo {
    type Response = R;
    type Error = Infallible;
    type Future = Ready<Result<R, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        ready(Ok(req))
    }
}

/// A rate-limited request: its key, or none. `Some("")` is a key like any other (the
/// closure extractor passes it on).
type Req = Option<&'static str>;

type KeyFn = fn(&Req) -> Option<String>;

fn key_of(req: &Req) -> Option<String> {
    req.map(str::to_string)
}

fn rate_layer(rate: Rate) -> RateLimitLayer<marina_limit::Keyed<KeyFn>> {
    RateLimitLayer::keyed(key_of as KeyFn, rate)
}

async fn send<S: Service<R>, R>(svc: &mut S, req: R) -> Result<S::Response, S::Error> {
    svc.ready().await?.call(req).await
}

/// Sends `req` until the first refusal: how many were admitted, and the refusal.
async fn drain<S>(svc: &mut S, req: Req) -> (u32, BoxError)
where
    S: Service<Req, Error = BoxError>,
{
    let mut n = 0;
    loop {
        match send(svc, req).await {
            Ok(_) => n += 1,
            Err(e) => return (n, e),
        }
    }
}

fn retry_after(e: &BoxError) -> Duration {
    e.downcast_ref::<RateLimited>()
        .unwrap_or_else(|| panic!("not RateLimited: {e}"))
        .retry_after
}

#[tokio::test(start_paused = true)]
async fn rate_refuses_requests_without_a_key_by_default() {
    let layer = rate_layer(Rate::per_second(10).burst(2));
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    for _ in 0..3 {
        let e = send(&mut svc, None).await.unwrap_err();
        assert!(is_missing_key(&e), "{e}");
        assert_eq!(
            e.to_string(),
            "request has no key for the per-key limit: refused"
        );
    }
    // Keys are limited as usual, the empty one too.
    for key in ["alice", ""] {
        let (n, e) = drain(&mut svc, Some(key)).await;
        assert_eq!(n, 2, "{key:?}");
        assert_eq!(retry_after(&e), ms(100));
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.admitted, stats.rejected, stats.missing_key),
        (4, 5, 3)
    );
    // No state was kept for them.
    assert_eq!(stats.keys, 2);
}

#[tokio::test(start_paused = true)]
async fn rate_lets_requests_without_a_key_through_when_unlimited() {
    let layer =
        rate_layer(Rate::every(Duration::from_secs(3600))).without_key(WithoutKey::Unlimited);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    for _ in 0..1000 {
        assert_eq!(send(&mut svc, None).await.unwrap(), None);
    }
    // A key beside them gets one an hour.
    let (n, e) = drain(&mut svc, Some("alice")).await;
    assert_eq!((n, retry_after(&e)), (1, Duration::from_secs(3600)));
    let stats = handle.stats();
    assert_eq!(
        (
            stats.admitted,
            stats.rejected,
            stats.missing_key,
            stats.keys
        ),
        (1001, 1, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn rate_shared_requests_without_a_key_have_one_quota_apart_from_every_key() {
    let layer = rate_layer(Rate::per_second(10).burst(3)).without_key(WithoutKey::Shared);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);

    let (n, e) = drain(&mut svc, None).await;
    assert_eq!((n, retry_after(&e)), (3, ms(100)));
    // The empty key is a key of its own, not theirs: a full burst.
    let (n, _) = drain(&mut svc, Some("")).await;
    assert_eq!(n, 3);
    let (n, _) = drain(&mut svc, Some("alice")).await;
    assert_eq!(n, 3);
    // Their quota refills at the layer's rate.
    advance(ms(99)).await;
    let e = send(&mut svc, None).await.unwrap_err();
    assert_eq!(retry_after(&e), ms(1));
    advance(ms(1)).await;
    assert!(send(&mut svc, None).await.is_ok());
    assert!(send(&mut svc, None).await.is_err());

    let stats = handle.stats();
    assert_eq!(stats.missing_key, 0);
    assert_eq!(stats.admitted, 3 + 3 + 3 + 1);
    // Their quota is not one of the keys tracked.
    assert_eq!(stats.keys, 2);
}

#[tokio::test(start_paused = true)]
async fn rate_shared_quota_is_not_refused_by_a_full_key_table() {
    for when_full in [WhenKeysFull::Reject, WhenKeysFull::EvictOldest] {
        let table = KeyTable::with_capacity(1).when_full(when_full);
        let layer = RateLimitLayer::keyed_with(key_of as KeyFn, Rate::per_second(1), table)
            .without_key(WithoutKey::Shared);
        let mut svc = layer.layer(Echo);
        send(&mut svc, Some("a")).await.unwrap();
        assert!(send(&mut svc, None).await.is_ok(), "{when_full:?}");
        let e = send(&mut svc, None).await.unwrap_err();
        assert_eq!(retry_after(&e), Duration::from_secs(1), "{when_full:?}");
        if when_full == WhenKeysFull::Reject {
            // A new key is what the full table refuses.
            let e = send(&mut svc, Some("b")).await.unwrap_err();
            assert!(e.downcast_ref::<marina_limit::TooManyKeys>().is_some());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn rate_shared_requests_without_a_key_wait_in_line() {
    // One cell each 100 ms, no burst; waits of up to 250 ms.
    let layer = rate_layer(Rate::per_second(10).burst(1))
        .without_key(WithoutKey::Shared)
        .on_limit(OnLimit::Wait { max: ms(250) });
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    let start = Instant::now();
    send(&mut svc, None).await.unwrap();
    let mut second = tokio_test::task::spawn(svc.ready().await.unwrap().call(None));
    let mut third = tokio_test::task::spawn(svc.ready().await.unwrap().call(None));
    assert_pending!(second.poll());
    assert_pending!(third.poll());
    // The fourth's place, 300 ms away, is past the bound: refused at once.
    let e = send(&mut svc, None).await.unwrap_err();
    assert_eq!(retry_after(&e), ms(300));
    // A key is not held up by them.
    assert!(send(&mut svc, Some("alice")).await.is_ok());

    // The third gives its cell (at 200 ms) back: the next arrival takes that place.
    drop(third);
    let mut again = tokio_test::task::spawn(svc.ready().await.unwrap().call(None));
    assert_pending!(again.poll());
    advance(ms(100)).await;
    assert_eq!(assert_ready!(second.poll()).unwrap(), None);
    assert_pending!(again.poll());
    advance(ms(100)).await;
    assert_eq!(assert_ready!(again.poll()).unwrap(), None);
    assert_eq!(start.elapsed(), ms(200));
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (4, 1));
}

#[tokio::test(start_paused = true)]
async fn rate_without_key_applies_to_services_already_made() {
    let layer = rate_layer(Rate::per_second(1));
    let mut svc = layer.layer(Echo);
    assert!(is_missing_key(&send(&mut svc, None).await.unwrap_err()));
    let _ = layer.clone().without_key(WithoutKey::Unlimited);
    assert!(send(&mut svc, None).await.is_ok());
}

// ---------------------------------------------------------------- concurrency

/// A held request: its key (or none), and the channel its answer comes on.
type Held = (Option<&'static str>, oneshot::Receiver<u32>);

type HeldKeyFn = fn(&Held) -> Option<String>;

fn held_key(req: &Held) -> Option<String> {
    req.0.map(str::to_string)
}

fn concurrency(limit: usize) -> ConcurrencyPerKeyLayer<HeldKeyFn> {
    ConcurrencyPerKeyLayer::new(held_key as HeldKeyFn, limit)
}

/// A backend that answers each request with what is sent on its channel.
fn backend() -> impl Service<Held, Response = u32, Error = BoxError, Future: Send> + Clone {
    service_fn(|(_, answer): Held| async move { answer.await.map_err(BoxError::from) })
}

/// Calls `svc` with a request of `who`: the spawned response future, polled once,
/// and the sender that completes it.
macro_rules! start {
    ($svc:expr, $who:expr) => {{
        let (tx, rx) = oneshot::channel::<u32>();
        let fut = $svc.ready().await.unwrap().call(($who, rx));
        let mut f = tokio_test::task::spawn(fut);
        let first = f.poll();
        (f, first, tx)
    }};
}

#[tokio::test]
async fn concurrency_refuses_requests_without_a_key_by_default() {
    let layer = concurrency(1);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let (_f, first, _tx) = start!(svc, None);
    let e = match first {
        Poll::Ready(Err(e)) => e,
        other => panic!("not refused: {other:?}"),
    };
    assert!(is_missing_key(&e), "{e}");
    // A key (the empty one too) is limited as usual.
    let (_a, first, _a_tx) = start!(svc, Some(""));
    assert!(first.is_pending());
    let (_b, first, _b_tx) = start!(svc, Some(""));
    assert!(matches!(first, Poll::Ready(Err(_))));
    let stats = handle.stats();
    assert_eq!(
        (
            stats.admitted,
            stats.rejected,
            stats.missing_key,
            stats.keyless_in_flight
        ),
        (1, 2, 1, 0)
    );
}

#[tokio::test]
async fn concurrency_shared_requests_without_a_key_have_one_set_of_slots() {
    let layer = concurrency(2).without_key(WithoutKey::Shared);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let (mut a, first, a_tx) = start!(svc, None);
    assert!(first.is_pending());
    let (_b, first, _b_tx) = start!(svc, None);
    assert!(first.is_pending());
    let (_c, first, _c_tx) = start!(svc, None);
    let e = match first {
        Poll::Ready(Err(e)) => e,
        other => panic!("not refused: {other:?}"),
    };
    assert_eq!(
        e.downcast_ref::<ConnectionLimit>(),
        Some(&ConnectionLimit {
            key: None,
            limit: 2
        })
    );
    assert_eq!(
        e.to_string(),
        "requests without a key have their maximum of 2 in flight"
    );
    // The empty key has slots of its own.
    let (_e1, first, _e1_tx) = start!(svc, Some(""));
    assert!(first.is_pending());
    let (_e2, first, _e2_tx) = start!(svc, Some(""));
    assert!(first.is_pending());
    let stats = handle.stats();
    assert_eq!(
        (stats.keyless_in_flight, stats.in_flight, stats.active_keys),
        (2, 2, 1)
    );
    assert_eq!(handle.in_flight(""), 2);

    // A slot freed is taken by the next.
    a_tx.send(7).unwrap();
    assert_eq!(assert_ready_ok!(a.poll()), 7);
    assert_eq!(handle.stats().keyless_in_flight, 1);
    let (_d, first, _d_tx) = start!(svc, None);
    assert!(first.is_pending());
    assert_eq!(handle.stats().keyless_in_flight, 2);
}

#[tokio::test(start_paused = true)]
async fn concurrency_shared_requests_without_a_key_wait_for_a_slot() {
    let layer = concurrency(1).wait(ms(500)).without_key(WithoutKey::Shared);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let (mut a, first, a_tx) = start!(svc, None);
    assert!(first.is_pending());
    let (mut b, first, b_tx) = start!(svc, None);
    assert!(first.is_pending());
    // A cancelled wait leaves the slot alone.
    let (c, first, _c_tx) = start!(svc, None);
    assert!(first.is_pending());
    drop(c);
    a_tx.send(1).unwrap();
    assert_eq!(assert_ready_ok!(a.poll()), 1);
    // b got the slot a freed.
    assert!(b.is_woken());
    assert_pending!(b.poll());
    assert_eq!(handle.stats().keyless_in_flight, 1);
    b_tx.send(2).unwrap();
    assert_eq!(assert_ready_ok!(b.poll()), 2);
    // A wait runs out after its bound.
    let (_held, first, _held_tx) = start!(svc, None);
    assert!(first.is_pending());
    let (mut late, first, _late_tx) = start!(svc, None);
    assert!(first.is_pending());
    advance(ms(500)).await;
    let e = assert_ready_err!(late.poll());
    assert_eq!(e.downcast_ref::<ConnectionLimit>().unwrap().key, None);
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (3, 1));
    assert_eq!(stats.keyless_in_flight, 1);
}

#[tokio::test]
async fn concurrency_shared_slots_are_not_counted_against_max_keys() {
    let layer = concurrency(1).max_keys(1).without_key(WithoutKey::Shared);
    let mut svc = layer.layer(backend());
    let (_a, first, _a_tx) = start!(svc, Some("alice"));
    assert!(first.is_pending());
    let (_n, first, _n_tx) = start!(svc, None);
    assert!(first.is_pending());
    let (_b, first, _b_tx) = start!(svc, Some("bob"));
    match first {
        Poll::Ready(Err(e)) => assert!(e.downcast_ref::<TooManyActiveKeys>().is_some()),
        other => panic!("bob admitted past max_keys: {other:?}"),
    }
}

#[tokio::test]
async fn concurrency_lets_requests_without_a_key_through_when_unlimited() {
    let layer = concurrency(1).without_key(WithoutKey::Unlimited);
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    let mut held = Vec::new();
    for _ in 0..20 {
        let (f, first, tx) = start!(svc, None);
        assert!(first.is_pending());
        held.push((f, tx));
    }
    let (_k, first, _k_tx) = start!(svc, Some("alice"));
    assert!(first.is_pending());
    let (_k2, first, _k2_tx) = start!(svc, Some("alice"));
    assert!(matches!(first, Poll::Ready(Err(_))));
    let stats = handle.stats();
    assert_eq!((stats.admitted, stats.rejected), (21, 1));
    assert_eq!((stats.keyless_in_flight, stats.missing_key), (0, 0));
}
