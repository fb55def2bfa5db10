//! The keyed rate limiter's key table in memory, measured with `allocation-counter`
//! (which installs a counting global allocator: this file is its own test binary).
//!
//! Requests go through `RateLimitLayer::keyed_with` around a backend whose futures are
//! ready at once, in `Reject` mode, so each call completes on its first poll on the
//! test thread, where `allocation_counter::measure` counts. The layer is made outside
//! any runtime (no sweep task): the table's cap alone bounds it. The quota is one
//! request an hour, so no key replenishes during a test. Keys are 16 hex characters
//! (a user id's size). The figures: bytes held per key in a table of capacity N after
//! N keys (printed; run with `--nocapture` to see it), and a table of 10,000 fed
//! 1,000,000 distinct keys holding nothing more over its last 500,000 keys and at most
//! twice what it held after its first 20,000 (its map doubles once under churn).

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use marina_limit::{
    KeyTable, Keyed, Rate, RateLimit, RateLimitHandle, RateLimitLayer, WhenKeysFull,
};
use tower::{Layer, Service};

/// A request: its key.
type Req = String;

/// A backend that answers at once.
#[derive(Debug, Clone, Copy)]
struct Ok;

impl Service<Req> for Ok {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Result::Ok(()))
    }

    fn call(&mut self, _: Req) -> Self::Future {
        ready(Result::Ok(()))
    }
}

type KeyFn = fn(&Req) -> Option<String>;
type Svc = RateLimit<Ok, Keyed<KeyFn>>;

fn key_of(req: &Req) -> Option<String> {
    Some(req.clone())
}

/// A keyed limiter (one request per hour per key) with room for `capacity` keys,
/// evicting the oldest when full; made outside any runtime, so without a sweep.
fn stack(capacity: usize) -> (Svc, RateLimitHandle) {
    let layer = RateLimitLayer::keyed_with(
        key_of as KeyFn,
        Rate::every(Duration::from_secs(3600)),
        KeyTable::with_capacity(capacity).when_full(WhenKeysFull::EvictOldest),
    );
    let handle = layer.handle();
    (layer.layer(Ok), handle)
}

/// A 16-hex-character key.
fn key(i: u64) -> String {
    format!("{i:016x}")
}

/// Sends one request for each key in `from..to` (each is new, so admitted, and
/// completes on its first poll).
fn send_keys(svc: &mut Svc, from: u64, to: u64) {
    let mut cx = Context::from_waker(Waker::noop());
    for i in from..to {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(key(i)));
        match fut.poll(&mut cx) {
            Poll::Ready(Result::Ok(())) => {}
            Poll::Ready(Err(e)) => panic!("key {i} refused: {e}"),
            Poll::Pending => panic!("key {i} pending"),
        }
    }
}

#[test]
fn bytes_per_key() {
    const N: u64 = 100_000;
    let (mut svc, handle) = stack(N as usize);
    let info = allocation_counter::measure(|| send_keys(&mut svc, 0, N));
    let stats = handle.stats();
    assert_eq!(stats.keys as u64, N, "a table of N holds N keys");
    assert_eq!(stats.evicted_keys, 0);
    let per_key = info.bytes_current as f64 / N as f64;
    println!(
        "rate-limit key table: {per_key:.0} bytes/key held ({} bytes for {N} keys of 16 \
         characters in a table of {N}; peak {} bytes, {} allocations in all)",
        info.bytes_current, info.bytes_max, info.count_total
    );
    assert!(
        per_key > 16.0,
        "{per_key} bytes/key: the keys alone take 16"
    );
    assert!(per_key < 300.0, "{per_key} bytes/key");
}

#[test]
fn a_million_keys_in_a_table_of_ten_thousand_hold_flat() {
    const CAP: u64 = 10_000;
    const KEYS: u64 = 1_000_000;
    let (mut svc, handle) = stack(CAP as usize);
    // Twice the capacity first: the table fills and starts evicting.
    let first = allocation_counter::measure(|| send_keys(&mut svc, 0, 2 * CAP));
    assert!(handle.stats().keys as u64 <= CAP);
    // Eviction churns the map (removals, then insertions): it may double once (a
    // hashbrown map more than half full grows rather than rehash its tombstones in
    // place), then rehashes in place.
    let settle = allocation_counter::measure(|| send_keys(&mut svc, 2 * CAP, KEYS / 2));
    let rest = allocation_counter::measure(|| send_keys(&mut svc, KEYS / 2, KEYS));
    let stats = handle.stats();
    assert!(stats.keys as u64 <= CAP, "{stats:?}");
    assert_eq!(stats.admitted, KEYS);
    assert_eq!(stats.evicted_keys, KEYS - stats.keys as u64);
    let held = first.bytes_current + settle.bytes_current + rest.bytes_current;
    println!(
        "key table of {CAP}: {} bytes held after {} keys, {held} after {KEYS} \
         ({:+} by {}, {:+} over the last {}; peak {} bytes over the last)",
        first.bytes_current,
        2 * CAP,
        settle.bytes_current,
        KEYS / 2,
        rest.bytes_current,
        KEYS / 2,
        rest.bytes_max,
    );
    assert!(first.bytes_current > 0);
    // Flat: the last half million keys add nothing lasting...
    assert!(
        rest.bytes_current <= first.bytes_current / 100,
        "{:+} bytes over the last {} keys",
        rest.bytes_current,
        KEYS / 2
    );
    // ...and all in all the table holds at most its one doubling more than when it
    // first filled, not a hundred times as many keys' worth.
    assert!(
        held <= first.bytes_current * 2,
        "{held} bytes held after {KEYS} keys, {} after {}",
        first.bytes_current,
        2 * CAP
    );
    assert!((held as u64) / CAP < 300, "{held} bytes for {CAP} keys");
}
