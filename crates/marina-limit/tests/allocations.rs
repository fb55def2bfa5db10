//! Heap allocations per request, counted with `allocation-counter` (which installs a
//! counting global allocator: this file is its own test binary).
//!
//! Once warm, a request through a global `RateLimit`, or through a keyed one or a
//! `ConcurrencyPerKey` whose key is already known, allocates nothing: the limiters
//! look the key up as the extractor lends it (`KeyExtractor::with_key`), and a
//! long-lived service counts its admissions in a slot of its own. The extractors
//! lend without allocating: `HeaderKey` and `CookieKey` a slice of the header,
//! `ClientIp` the address formatted on the stack (from the peer address, or through
//! trusted proxies' `X-Forwarded-For`).
//!
//! Requests are made before counting starts and moved into the calls; the backend's
//! futures are ready at once, so each call completes on its first poll, on the test
//! thread, where the counter counts.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use marina_core::{ClientIp, CookieKey, HasExtensions, HeaderKey, KeyExtractor, PeerAddr};
use marina_limit::{ConcurrencyPerKeyLayer, Rate, RateLimitLayer};
use tower::{Layer, Service};

/// A backend that answers at once.
#[derive(Debug, Clone, Copy)]
struct Answer;

impl<R> Service<R> for Answer {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        ready(Ok(()))
    }
}

/// Sends each of `requests`: ready, call, one poll to completion.
fn send_all<S, R>(svc: &mut S, requests: Vec<R>)
where
    S: Service<R, Response = ()>,
    S::Error: std::fmt::Display,
{
    let mut cx = Context::from_waker(Waker::noop());
    for req in requests {
        match svc.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => panic!("not ready: {e}"),
            Poll::Pending => panic!("not ready at once"),
        }
        match pin!(svc.call(req)).poll(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => panic!("refused: {e}"),
            Poll::Pending => panic!("pending"),
        }
    }
}

/// Allocations per request of `requests()` through `svc`: a first round warms it
/// (makes the keys' entries, the service's counting slot), the second is counted.
fn allocations_per_request<S, R>(svc: &mut S, requests: impl Fn() -> Vec<R>) -> f64
where
    S: Service<R, Response = ()>,
    S::Error: std::fmt::Display,
{
    send_all(svc, requests());
    let batch = requests();
    let n = batch.len() as f64;
    let counted = allocation_counter::measure(|| send_all(svc, batch));
    counted.count_total as f64 / n
}

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

fn with_header(name: &str, value: &str) -> http::Request<()> {
    http::Request::builder()
        .header(name, value)
        .body(())
        .unwrap()
}

/// 1,000 requests, round robin over the users, made by `make`.
fn round_robin<R>(make: impl Fn(&str) -> R) -> impl Fn() -> Vec<R> {
    move || (0..1000).map(|i| make(USERS[i % USERS.len()])).collect()
}

fn from_peer(peer: &str, xff: Option<&str>) -> http::Request<()> {
    let mut req = http::Request::builder();
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    let mut req = req.body(()).unwrap();
    req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
    req
}

const PLENTY: u32 = 1_000_000_000;

#[test]
fn a_global_rate_limit_allocates_nothing_per_request() {
    let mut svc = RateLimitLayer::global(Rate::per_second(PLENTY)).layer(Answer);
    let per = allocations_per_request(&mut svc, || vec![(); 1000]);
    assert_eq!(per, 0.0);
}

#[test]
fn a_keyed_rate_limit_allocates_nothing_for_a_known_key() {
    let rate = || Rate::per_second(PLENTY);
    let mut by_header = RateLimitLayer::keyed(HeaderKey::new("x-user"), rate()).layer(Answer);
    let per = allocations_per_request(&mut by_header, round_robin(|u| with_header("x-user", u)));
    assert_eq!(per, 0.0, "HeaderKey");

    let mut by_cookie = RateLimitLayer::keyed(CookieKey::new("SESSION"), rate()).layer(Answer);
    let per = allocations_per_request(
        &mut by_cookie,
        round_robin(|u| with_header("cookie", &format!("theme=dark; SESSION={u}"))),
    );
    assert_eq!(per, 0.0, "CookieKey");

    let ip = ClientIp::new().trust_proxy("10.0.0.0/8".parse().unwrap());
    let mut by_ip = RateLimitLayer::keyed(ip, rate()).layer(Answer);
    let peers = ["192.0.2.1:1", "[2001:db8::1]:1"];
    let per = allocations_per_request(&mut by_ip, || {
        (0..1000).map(|i| from_peer(peers[i % 2], None)).collect()
    });
    assert_eq!(per, 0.0, "ClientIp, peer address");
    let per = allocations_per_request(&mut by_ip, || {
        (0..1000)
            .map(|i| {
                from_peer(
                    "10.0.0.1:1",
                    Some(["203.0.113.9, 10.0.0.7", "6.6.6.6"][i % 2]),
                )
            })
            .collect()
    });
    assert_eq!(per, 0.0, "ClientIp, through a trusted proxy");

    // A closure returns an owned key: one allocation per request, the key's.
    let owned = |r: &http::Request<()>| {
        let value = r.headers().get("x-user")?.to_str().ok()?;
        Some(value.to_owned())
    };
    let mut by_closure = RateLimitLayer::keyed(owned, rate()).layer(Answer);
    let per = allocations_per_request(&mut by_closure, round_robin(|u| with_header("x-user", u)));
    assert_eq!(per, 1.0, "a closure's String");
}

#[test]
fn client_ip_on_a_raw_request_lends_its_key_without_allocating() {
    let ip = ClientIp::new();
    let mut req = marina_core::Request::new(());
    req.extensions_mut()
        .insert(PeerAddr("[2001:db8::42]:443".parse().unwrap()));
    let counted = allocation_counter::measure(|| {
        for _ in 0..100 {
            assert_eq!(ip.with_key(&req, str::len), Some("2001:db8::42".len()));
        }
    });
    assert_eq!(counted.count_total, 0);
}

#[test]
fn per_key_concurrency_allocates_nothing_for_a_key_in_use() {
    let layer = ConcurrencyPerKeyLayer::new(HeaderKey::new("x-user"), 1_000);
    let handle = layer.handle();
    let mut svc = layer.layer(Answer);
    // One request of each user held in flight (its future kept, not polled), so
    // their keys stay in use.
    let mut cx = Context::from_waker(Waker::noop());
    let held: Vec<_> = USERS
        .iter()
        .map(|u| {
            assert!(Service::<http::Request<()>>::poll_ready(&mut svc, &mut cx).is_ready());
            svc.call(with_header("x-user", u))
        })
        .collect();
    assert_eq!(handle.stats().active_keys, USERS.len());
    let per = allocations_per_request(&mut svc, round_robin(|u| with_header("x-user", u)));
    assert_eq!(per, 0.0);
    drop(held);
    assert_eq!(handle.stats().active_keys, 0);
}
