//! The sticky table's memory, measured with `allocation-counter` (which installs a
//! counting global allocator: this file is its own test binary).
//!
//! Sessions are created through `AffinityLayer::sticky` around a stand-in for a
//! balancer that accepts every route hint and reports endpoint 7; its futures are ready
//! at once, so each request is polled to completion on the test thread, where
//! `allocation_counter::measure` counts. Keys are 64 hex characters (a session id's
//! size). The figures: bytes held per session in a table of capacity N after N
//! sessions (printed, run with `--nocapture` to see it), and a table of 10,000 fed
//! 1,000,000 distinct keys holding no more than it did after its first 10,000.

use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use marina_affinity::{Affinity, AffinityHandle, AffinityLayer, TableConfig};
use marina_core::{EndpointId, HasExtensions, Request, Response, RouteHint};
use tower::{Layer, Service};

type Req = Request<String>;

/// Stands in for a balancer: honours the hint by reporting endpoint 7.
#[derive(Debug, Clone, Copy)]
struct Chooser;

impl Service<Req> for Chooser {
    type Response = Response<()>;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Response<()>, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(hint) = req.extensions().get::<RouteHint>() {
            hint.report_chosen(EndpointId(7));
        }
        ready(Ok(Response::new(())))
    }
}

type Svc = Affinity<Chooser, fn(&Req) -> Option<String>>;

fn key_of(req: &Req) -> Option<String> {
    Some(req.body.clone())
}

/// A sticky stack over [`Chooser`], built outside any runtime (so no sweep task).
fn stack(capacity: usize) -> (Svc, AffinityHandle) {
    let layer = AffinityLayer::sticky(
        key_of as fn(&Req) -> Option<String>,
        TableConfig::with_capacity(capacity),
    );
    let handle = layer.handle();
    (layer.layer(Chooser), handle)
}

/// A 64-hex-character key.
fn key(i: u64) -> String {
    format!("{i:064x}")
}

/// Sends requests for keys `from..to` (each completes on its first poll).
fn send_keys(svc: &mut Svc, from: u64, to: u64) {
    let mut cx = Context::from_waker(Waker::noop());
    for i in from..to {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(Request::new(key(i))));
        match fut.poll(&mut cx) {
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => panic!("request {i} failed: {e}"),
            Poll::Pending => panic!("request {i} pending"),
        }
    }
}

#[test]
fn bytes_per_session() {
    const N: u64 = 100_000;
    let (mut svc, handle) = stack(N as usize);
    let info = allocation_counter::measure(|| send_keys(&mut svc, 0, N));
    let sessions = handle.stats().sessions as u64;
    assert_eq!(sessions, N, "a table of N holds N sessions");
    let per_session = info.bytes_current as f64 / sessions as f64;
    println!(
        "sticky table: {per_session:.0} bytes/session held ({} bytes for {sessions} sessions \
         of 64-character keys in a table of {N}; peak {} bytes)",
        info.bytes_current, info.bytes_max
    );
    assert!(
        per_session > 64.0,
        "{per_session} bytes/session: the keys alone take 64"
    );
    assert!(per_session < 400.0, "{per_session} bytes/session");
}

#[test]
fn a_million_keys_in_a_table_of_ten_thousand_hold_flat() {
    const CAP: u64 = 10_000;
    const KEYS: u64 = 1_000_000;
    let (mut svc, handle) = stack(CAP as usize);
    // Twice the capacity first: every shard fills and starts purging.
    let first = allocation_counter::measure(|| send_keys(&mut svc, 0, 2 * CAP));
    assert_eq!(handle.stats().sessions, CAP as usize);
    // Purging churns each shard's map (a removal and an insertion per new session):
    // the map may grow once to make room for its tombstones, then rehashes in place.
    let settle = allocation_counter::measure(|| send_keys(&mut svc, 2 * CAP, KEYS / 2));
    let rest = allocation_counter::measure(|| send_keys(&mut svc, KEYS / 2, KEYS));
    let stats = handle.stats();
    assert_eq!(stats.sessions, CAP as usize);
    assert_eq!(stats.created, KEYS);
    assert_eq!(stats.purged, KEYS - CAP);
    let held = first.bytes_current + settle.bytes_current + rest.bytes_current;
    println!(
        "table of {CAP}: {} bytes held after {} keys, {held} after {KEYS} \
         ({:+} by {}, {:+} over the last {})",
        first.bytes_current,
        2 * CAP,
        settle.bytes_current,
        KEYS / 2,
        rest.bytes_current,
        KEYS / 2,
    );
    assert!(first.bytes_current > 0);
    // Flat: the last half million keys add nothing lasting...
    assert!(
        rest.bytes_current <= first.bytes_current / 100,
        "{:+} bytes over the last {} keys",
        rest.bytes_current,
        KEYS / 2
    );
    // ...and all in all the table holds about what it did when it first filled, not
    // a hundred times as many keys' worth.
    assert!(
        held <= first.bytes_current * 3 / 2,
        "{held} bytes held after {KEYS} keys, {} after {}",
        first.bytes_current,
        2 * CAP
    );
    assert!((held as u64) / CAP < 400, "{held} bytes for {CAP} sessions");
}
