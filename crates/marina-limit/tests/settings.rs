//! Every setting of the limits refuses a value out of its range where it is given:
//! the `try_` constructors and setters return `InvalidLimit` naming the setting
//! (path-style, as marina's `[limits]` section does) with a message that says what is
//! accepted and what was given; their infallible twins panic with the same text.
//! Nothing is clamped: a burst of 0, a key table of 0 keys, a concurrency limit of 0,
//! a sweep every 0 s are refused, not raised.
//!
//! The edges of each range are accepted and work: the highest rate, the longest
//! period, the largest burst for a period, the highest concurrency limit, a slow-peer
//! grace or sweep interval too long to schedule.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_limit::{
    BandwidthLimit, Bucket, ConcurrencyPerKeyLayer, ConnectionLimit, InvalidLimit, KeyTable,
    MinRate, Rate, RateLimitLayer, RateLimited,
};
use tokio::io::AsyncWrite;
use tokio_test::{assert_pending, assert_ready};
use tower::{Layer, Service, ServiceExt};

/// A backend that answers every request at once with the request itself.
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

type Req = Option<String>;
type KeyFn = fn(&Req) -> Option<String>;

fn key_of(req: &Req) -> Option<String> {
    req.clone()
}

/// Asserts `result` is the error on `field` with `message`, and that its `Display`
/// is `"{field}: {message}"`.
#[track_caller]
fn assert_invalid<T>(result: Result<T, InvalidLimit>, field: &str, message: &str) {
    let Err(err) = result else {
        panic!("{field}: accepted, expected {message:?}");
    };
    assert_eq!((err.field, err.message.as_str()), (field, message));
    assert_eq!(err.to_string(), format!("{field}: {message}"));
}

// ---------------------------------------------------------------- the error

#[test]
fn invalid_limit_is_a_std_error_with_a_lowercase_message() {
    let err = Rate::try_per_second(0).unwrap_err();
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(err.clone());
    assert_eq!(boxed.to_string(), "rate_per_second: must be above 0, got 0");
    assert!(boxed.source().is_none());
    assert_eq!(boxed.downcast_ref::<InvalidLimit>(), Some(&err));
}

// ---------------------------------------------------------------- Rate

#[test]
fn rate_per_second_must_be_above_zero() {
    assert_invalid(
        Rate::try_per_second(0),
        "rate_per_second",
        "must be above 0, got 0",
    );
}

#[test]
fn rate_per_second_must_fit_the_nanosecond_resolution() {
    assert_invalid(
        Rate::try_per_second(Rate::MAX_PER_SECOND + 1),
        "rate_per_second",
        "must be at most 1000000000 (one request a nanosecond), got 1000000001",
    );
    assert_invalid(
        Rate::try_per_second(u32::MAX),
        "rate_per_second",
        "must be at most 1000000000 (one request a nanosecond), got 4294967295",
    );
    let max = Rate::try_per_second(Rate::MAX_PER_SECOND).unwrap();
    assert_eq!(max.per_second_f64(), 1e9);
    assert_eq!(max.burst_size(), Rate::MAX_PER_SECOND);
}

#[test]
fn rate_period_must_be_above_zero_and_within_a_century() {
    assert_invalid(
        Rate::try_every(Duration::ZERO),
        "rate_period",
        "must be above 0, got 0ns",
    );
    assert_invalid(
        Rate::try_every(Rate::MAX_REFILL + Duration::from_nanos(1)),
        "rate_period",
        "must be at most 3155760000s (100 years), got 3155760000.000000001s",
    );
    assert_invalid(
        Rate::try_every(Duration::MAX),
        "rate_period",
        &format!(
            "must be at most 3155760000s (100 years), got {:?}",
            Duration::MAX
        ),
    );
    let one_ns = Rate::try_every(Duration::from_nanos(1)).unwrap();
    assert_eq!(one_ns.per_second_f64(), 1e9);
    let century = Rate::try_every(Rate::MAX_REFILL).unwrap();
    assert_eq!(century.burst_size(), 1);
}

#[test]
fn burst_must_be_above_zero() {
    assert_invalid(
        Rate::per_second(10).try_burst(0),
        "burst",
        "must be above 0, got 0",
    );
    assert_invalid(
        Rate::every(Duration::from_secs(1)).try_burst(0),
        "burst",
        "must be above 0, got 0",
    );
}

#[test]
fn burst_must_refill_within_a_century() {
    let hourly = Rate::every(Duration::from_secs(3600));
    // 100 years of hours: 876,600.
    assert_eq!(hourly.try_burst(876_600).unwrap().burst_size(), 876_600);
    assert_invalid(
        hourly.try_burst(876_601),
        "burst",
        "must be at most 876600 at one request every 3600s (a full burst refills within \
         100 years), got 876601",
    );
    assert_invalid(
        Rate::every(Rate::MAX_REFILL).try_burst(2),
        "burst",
        "must be at most 1 at one request every 3155760000s (a full burst refills within \
         100 years), got 2",
    );
    // At one a second, 100 years of seconds; at two or more, any u32.
    assert!(Rate::per_second(1).try_burst(3_155_760_000).is_ok());
    assert!(Rate::per_second(1).try_burst(3_155_760_001).is_err());
    assert_eq!(
        Rate::per_second(2)
            .try_burst(u32::MAX)
            .unwrap()
            .burst_size(),
        u32::MAX
    );
}

#[test]
#[should_panic(expected = "rate_per_second: must be above 0, got 0")]
fn per_second_panics_on_zero() {
    let _ = Rate::per_second(0);
}

#[test]
#[should_panic(
    expected = "rate_per_second: must be at most 1000000000 (one request a nanosecond), got 4294967295"
)]
fn per_second_panics_above_one_a_nanosecond() {
    let _ = Rate::per_second(u32::MAX);
}

#[test]
#[should_panic(expected = "rate_period: must be above 0, got 0ns")]
fn every_panics_on_zero() {
    let _ = Rate::every(Duration::ZERO);
}

#[test]
#[should_panic(expected = "rate_period: must be at most 3155760000s (100 years)")]
fn every_panics_past_a_century() {
    let _ = Rate::every(Duration::MAX);
}

#[test]
#[should_panic(expected = "burst: must be above 0, got 0")]
fn burst_panics_on_zero() {
    let _ = Rate::per_second(10).burst(0);
}

#[test]
#[should_panic(expected = "burst: must be at most 876600 at one request every 3600s")]
fn burst_panics_past_a_century_of_refill() {
    let _ = Rate::every(Duration::from_secs(3600)).burst(u32::MAX);
}

/// The widest quotas in range build limiters that count to the nanosecond: no
/// overflow in governor's arithmetic or the limiter's own.
#[tokio::test(start_paused = true)]
async fn the_edges_of_the_rate_ranges_limit_exactly() {
    let cases = [
        (Rate::every(Rate::MAX_REFILL), 1, Rate::MAX_REFILL),
        (
            Rate::every(Duration::from_secs(3600)).burst(876_600),
            876_600,
            Duration::from_secs(3600),
        ),
        (
            Rate::per_second(1).burst(3_155_760_000),
            3_155_760_000,
            Duration::from_secs(1),
        ),
    ];
    for (rate, burst, period) in cases {
        assert_eq!(rate.burst_size(), burst);
        for mut svc in [
            RateLimitLayer::global(rate).layer(Echo).boxed(),
            RateLimitLayer::keyed(key_of as KeyFn, rate)
                .layer(Echo)
                .map_request(|()| Some("k".to_string()))
                .map_response(|_| ())
                .boxed(),
        ] {
            assert!(svc.ready().await.unwrap().call(()).await.is_ok());
            if burst == 1 {
                // The burst is spent: the next cell is one period away, exactly.
                let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
                let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
                assert_eq!(limited.retry_after, period);
            }
        }
    }
    // The highest rate: one request a nanosecond, to the nanosecond.
    let layer = RateLimitLayer::global(Rate::per_second(Rate::MAX_PER_SECOND).burst(2));
    let mut svc = ServiceExt::<()>::boxed(layer.layer(Echo));
    for _ in 0..2 {
        assert!(svc.ready().await.unwrap().call(()).await.is_ok());
    }
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after,
        Duration::from_nanos(1)
    );
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert!(svc.ready().await.unwrap().call(()).await.is_ok());
}

// ---------------------------------------------------------------- KeyTable

#[test]
fn key_table_max_keys_must_be_above_zero() {
    assert_invalid(
        KeyTable::try_with_capacity(0),
        "key_table.max_keys",
        "must be above 0, got 0",
    );
    assert_eq!(KeyTable::try_with_capacity(1).unwrap().max_keys, 1);
}

#[test]
fn key_table_sweep_interval_must_be_at_least_ten_ms() {
    let table = KeyTable::default();
    assert_invalid(
        table.try_sweep_interval(Duration::ZERO),
        "key_table.sweep_interval",
        "must be at least 10ms, got 0ns",
    );
    assert_invalid(
        table.try_sweep_interval(Duration::from_micros(9_999)),
        "key_table.sweep_interval",
        "must be at least 10ms, got 9.999ms",
    );
    let ok = table
        .try_sweep_interval(KeyTable::MIN_SWEEP_INTERVAL)
        .unwrap();
    assert_eq!(ok.sweep_interval, Duration::from_millis(10));
    assert!(table.try_sweep_interval(Duration::MAX).is_ok());
}

#[tokio::test]
async fn keyed_with_checks_fields_set_directly() {
    let mut table = KeyTable::default();
    table.max_keys = 0;
    assert_eq!(table.validate().unwrap_err().field, "key_table.max_keys");
    assert_invalid(
        RateLimitLayer::try_keyed_with(key_of as KeyFn, Rate::per_second(1), table),
        "key_table.max_keys",
        "must be above 0, got 0",
    );

    let mut table = KeyTable::default();
    table.sweep_interval = Duration::from_millis(1);
    assert_invalid(
        RateLimitLayer::try_keyed_with(key_of as KeyFn, Rate::per_second(1), table),
        "key_table.sweep_interval",
        "must be at least 10ms, got 1ms",
    );

    assert!(KeyTable::default().validate().is_ok());
    assert!(
        RateLimitLayer::try_keyed_with(key_of as KeyFn, Rate::per_second(1), KeyTable::default())
            .is_ok()
    );
}

#[test]
#[should_panic(expected = "key_table.max_keys: must be above 0, got 0")]
fn with_capacity_panics_on_zero() {
    let _ = KeyTable::with_capacity(0);
}

#[test]
#[should_panic(expected = "key_table.sweep_interval: must be at least 10ms, got 0ns")]
fn sweep_interval_panics_below_ten_ms() {
    let _ = KeyTable::default().sweep_interval(Duration::ZERO);
}

#[test]
#[should_panic(expected = "key_table.max_keys: must be above 0, got 0")]
fn keyed_with_panics_on_a_table_set_out_of_range() {
    let mut table = KeyTable::default();
    table.max_keys = 0;
    let _ = RateLimitLayer::keyed_with(key_of as KeyFn, Rate::per_second(1), table);
}

/// A sweep interval too long to schedule (`Duration::MAX`) never sweeps; the shortest
/// one sweeps on time.
#[tokio::test(start_paused = true)]
async fn a_sweep_interval_past_a_century_never_sweeps() {
    for (every, swept) in [(Duration::MAX, false), (KeyTable::MIN_SWEEP_INTERVAL, true)] {
        let table = KeyTable::default().sweep_interval(every);
        let layer = RateLimitLayer::keyed_with(key_of as KeyFn, Rate::per_second(1), table);
        let handle = layer.handle();
        let mut svc = layer.layer(Echo);
        for k in ["a", "b", "c"] {
            svc.ready()
                .await
                .unwrap()
                .call(Some(k.into()))
                .await
                .unwrap();
        }
        assert_eq!(handle.stats().keys, 3);
        // Every quota has replenished; a sweep would drop the three keys.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(handle.stats().keys, if swept { 0 } else { 3 }, "{every:?}");
        assert_eq!(handle.retain_recent(), if swept { 0 } else { 3 });
    }
}

// ---------------------------------------------------------------- concurrency

fn user(req: &Req) -> Option<String> {
    req.clone()
}

#[test]
fn concurrency_limit_must_be_within_the_semaphores_range() {
    assert_invalid(
        ConcurrencyPerKeyLayer::try_new(user as KeyFn, 0),
        "concurrency_per_key",
        "must be above 0, got 0",
    );
    let max = ConcurrencyPerKeyLayer::<KeyFn>::MAX_LIMIT;
    assert_eq!(max, tokio::sync::Semaphore::MAX_PERMITS);
    assert_invalid(
        ConcurrencyPerKeyLayer::try_new(user as KeyFn, max + 1),
        "concurrency_per_key",
        &format!("must be at most {max}, got {}", max + 1),
    );
    assert_invalid(
        ConcurrencyPerKeyLayer::try_new(user as KeyFn, usize::MAX),
        "concurrency_per_key",
        &format!("must be at most {max}, got {}", usize::MAX),
    );
}

#[test]
fn concurrency_max_keys_must_be_above_zero() {
    let layer = ConcurrencyPerKeyLayer::new(user as KeyFn, 5);
    assert_invalid(
        layer.try_max_keys(0),
        "concurrency_max_keys",
        "must be above 0, got 0",
    );
}

#[test]
#[should_panic(expected = "concurrency_per_key: must be above 0, got 0")]
fn concurrency_new_panics_on_zero() {
    let _ = ConcurrencyPerKeyLayer::new(user as KeyFn, 0);
}

#[test]
#[should_panic(expected = "concurrency_per_key: must be at most")]
fn concurrency_new_panics_past_the_semaphores_range() {
    let _ = ConcurrencyPerKeyLayer::new(user as KeyFn, usize::MAX);
}

#[test]
#[should_panic(expected = "concurrency_max_keys: must be above 0, got 0")]
fn concurrency_max_keys_panics_on_zero() {
    let _ = ConcurrencyPerKeyLayer::new(user as KeyFn, 5).max_keys(0);
}

/// The highest limit builds a layer that admits (tokio's semaphore takes it), and a
/// wait of zero refuses at once as no wait does.
#[tokio::test(start_paused = true)]
async fn the_edges_of_the_concurrency_ranges_work() {
    let max = ConcurrencyPerKeyLayer::<KeyFn>::MAX_LIMIT;
    let layer = ConcurrencyPerKeyLayer::new(user as KeyFn, max);
    let handle = layer.handle();
    let mut svc = layer.layer(Echo);
    let pending = svc.ready().await.unwrap().call(Some("a".into()));
    assert_eq!(handle.in_flight("a"), 1);
    assert_eq!(pending.await.unwrap(), Some("a".into()));

    // One slot, taken by a request held in flight; a zero wait fails the next rather
    // than wait for it.
    type Held = (Req, tokio::sync::oneshot::Receiver<()>);
    let hold = tower::service_fn(|(who, rx): Held| async move {
        rx.await.ok();
        Ok::<_, Infallible>(who)
    });
    let layer = ConcurrencyPerKeyLayer::new(|r: &Held| r.0.clone(), 1).wait(Duration::ZERO);
    let mut svc = layer.layer(hold);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut first =
        tokio_test::task::spawn(svc.ready().await.unwrap().call((Some("a".into()), rx)));
    assert_pending!(first.poll());
    let (_tx2, rx2) = tokio::sync::oneshot::channel();
    let second = svc.ready().await.unwrap().call((Some("a".into()), rx2));
    let err = tokio::time::timeout(Duration::from_secs(1), second)
        .await
        .expect("refused, not waiting")
        .unwrap_err();
    assert_eq!(err.downcast_ref::<ConnectionLimit>().unwrap().limit, 1);
    tx.send(()).unwrap();
    assert_eq!(assert_ready!(first.poll()).unwrap(), Some("a".into()));
}

// ---------------------------------------------------------------- bandwidth

/// Each bad rate and burst, with the field and message every bandwidth setter gives.
fn bad_bandwidths() -> Vec<(f64, u64, &'static str, String)> {
    const RATE: &str = "bandwidth_bytes_per_sec";
    vec![
        (f64::NAN, 1024, RATE, "must be above 0, got NaN".into()),
        (0.0, 1024, RATE, "must be above 0, got 0".into()),
        (-0.0, 1024, RATE, "must be above 0, got -0".into()),
        (-1.0, 1024, RATE, "must be above 0, got -1".into()),
        (
            f64::NEG_INFINITY,
            1024,
            RATE,
            "must be above 0, got -inf".into(),
        ),
        (f64::INFINITY, 1024, RATE, "must be finite, got inf".into()),
        (
            0.5,
            1024,
            RATE,
            "must be at least 1 (bytes per second), got 0.5".into(),
        ),
        (1e6, 0, "bandwidth_burst", "must be above 0, got 0".into()),
    ]
}

#[test]
fn bucket_refuses_each_bad_rate_and_burst() {
    for (rate, burst, field, message) in bad_bandwidths() {
        assert_invalid(Bucket::try_new(rate, burst), field, &message);
    }
    let slowest = Bucket::try_new(1.0, 1).unwrap();
    assert_eq!((slowest.limit(), slowest.burst()), (1.0, 1));
    let fractional = Bucket::try_new(1.5, 1).unwrap();
    assert_eq!(fractional.limit(), 1.5);
}

#[test]
fn every_bandwidth_setter_refuses_each_bad_rate_and_burst() {
    type Setter = fn(BandwidthLimit<()>, f64, u64) -> Result<BandwidthLimit<()>, InvalidLimit>;
    let setters: [(&str, Setter); 5] = [
        (
            "per_connection_read",
            BandwidthLimit::try_per_connection_read,
        ),
        (
            "per_connection_write",
            BandwidthLimit::try_per_connection_write,
        ),
        ("shared_read", BandwidthLimit::try_shared_read),
        ("shared_write", BandwidthLimit::try_shared_write),
        ("shared", BandwidthLimit::try_shared),
    ];
    for (name, set) in setters {
        for (rate, burst, field, message) in bad_bandwidths() {
            let out = set(BandwidthLimit::new(()), rate, burst);
            let err = out
                .err()
                .unwrap_or_else(|| panic!("{name}({rate}, {burst}) accepted"));
            assert_eq!(
                (err.field, err.message.as_str()),
                (field, message.as_str()),
                "{name}"
            );
        }
        assert!(set(BandwidthLimit::new(()), 1.0, 1).is_ok(), "{name}");
    }
    // The shared ones keep their budget.
    let limit = BandwidthLimit::new(()).try_shared(1e6, 64 * 1024).unwrap();
    assert_eq!(limit.read_bucket().unwrap().limit(), 1e6);
    assert_eq!(limit.write_bucket().unwrap().burst(), 64 * 1024);
}

#[test]
fn min_rate_refuses_a_bad_rate_or_a_zero_grace() {
    let ok = MinRate {
        bytes_per_sec: 240.0,
        grace: Duration::from_secs(5),
    };
    assert!(ok.validate().is_ok());
    let cases = [
        (f64::NAN, "must be above 0, got NaN"),
        (0.0, "must be above 0, got 0"),
        (-240.0, "must be above 0, got -240"),
        (f64::INFINITY, "must be finite, got inf"),
    ];
    for (rate, message) in cases {
        let min = MinRate {
            bytes_per_sec: rate,
            ..ok
        };
        assert_invalid(min.validate(), "min_rate.bytes_per_sec", message);
        assert_invalid(
            BandwidthLimit::new(()).try_min_rate(min),
            "min_rate.bytes_per_sec",
            message,
        );
    }
    let zero_grace = MinRate {
        grace: Duration::ZERO,
        ..ok
    };
    assert_invalid(
        BandwidthLimit::new(()).try_min_rate(zero_grace),
        "min_rate.grace",
        "must be above 0, got 0ns",
    );
    // A fraction of a byte a second is a rate.
    let slow = MinRate {
        bytes_per_sec: 0.5,
        ..ok
    };
    assert!(BandwidthLimit::new(()).try_min_rate(slow).is_ok());
}

#[test]
#[should_panic(expected = "bandwidth_bytes_per_sec: must be above 0, got NaN")]
fn bucket_new_panics_on_nan() {
    let _ = Bucket::new(f64::NAN, 1024);
}

#[test]
#[should_panic(expected = "bandwidth_burst: must be above 0, got 0")]
fn bucket_new_panics_on_a_zero_burst() {
    let _ = Bucket::new(1e6, 0);
}

#[test]
#[should_panic(expected = "bandwidth_bytes_per_sec: must be above 0, got 0")]
fn per_connection_read_panics_on_zero() {
    let _ = BandwidthLimit::new(()).per_connection_read(0.0, 1024);
}

#[test]
#[should_panic(expected = "bandwidth_bytes_per_sec: must be finite, got inf")]
fn per_connection_write_panics_on_infinity() {
    let _ = BandwidthLimit::new(()).per_connection_write(f64::INFINITY, 1024);
}

#[test]
#[should_panic(expected = "bandwidth_burst: must be above 0, got 0")]
fn shared_read_panics_on_a_zero_burst() {
    let _ = BandwidthLimit::new(()).shared_read(1e6, 0);
}

#[test]
#[should_panic(expected = "bandwidth_bytes_per_sec: must be above 0, got -1")]
fn shared_write_panics_on_a_negative_rate() {
    let _ = BandwidthLimit::new(()).shared_write(-1.0, 1024);
}

#[test]
#[should_panic(
    expected = "bandwidth_bytes_per_sec: must be at least 1 (bytes per second), got 0.5"
)]
fn shared_panics_under_a_byte_a_second() {
    let _ = BandwidthLimit::new(()).shared(0.5, 1024);
}

#[test]
#[should_panic(expected = "min_rate.grace: must be above 0, got 0ns")]
fn min_rate_panics_on_a_zero_grace() {
    let _ = BandwidthLimit::new(()).min_rate(MinRate {
        bytes_per_sec: 240.0,
        grace: Duration::ZERO,
    });
}

#[test]
#[should_panic(expected = "min_rate.bytes_per_sec: must be above 0, got NaN")]
fn min_rate_panics_on_nan() {
    let _ = BandwidthLimit::new(()).min_rate(MinRate {
        bytes_per_sec: f64::NAN,
        grace: Duration::from_secs(5),
    });
}

/// A grace too long to schedule (`Duration::MAX`) never judges the peer: a write
/// that waits on it stays pending, however long.
#[tokio::test(start_paused = true)]
async fn a_min_rate_grace_too_long_to_schedule_never_cuts_off() {
    let forever = MinRate {
        bytes_per_sec: 1e9,
        grace: Duration::MAX,
    };
    let (client, _server) = tokio::io::duplex(16);
    let mut conn = BandwidthLimit::new(()).min_rate(forever).wrap(client);
    let data = [7u8; 64];
    let mut write = tokio_test::task::spawn(());
    let first = write.enter(|cx, _| std::pin::Pin::new(&mut conn).poll_write(cx, &data));
    assert!(matches!(first, Poll::Ready(Ok(16))));
    // The duplex is full: the peer does not read. Pending, not an error.
    let second = write.enter(|cx, _| std::pin::Pin::new(&mut conn).poll_write(cx, &data));
    assert!(second.is_pending());
    tokio::time::advance(Duration::from_secs(3600 * 24 * 365)).await;
    let third = write.enter(|cx, _| std::pin::Pin::new(&mut conn).poll_write(cx, &data));
    assert!(third.is_pending());
}
