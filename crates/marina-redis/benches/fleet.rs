//! Fleet rate limits on Redis: checks per second and added latency, Redis calls per
//! request, and accuracy over 1 s windows, for marina's limiter with and without
//! leasing beside the anchors' approach (go-redis/redis_rate, redis-cell, Envoy: one
//! script call per check) measured in the same run.
//!
//! `cargo bench -p marina-redis --bench fleet [-- --secs S --url URL]`
//! (default 2 s per row, `MARINA_REDIS_URL` or `redis://127.0.0.1:6379`).
//!
//! 1. Cost: one instance, 16 concurrent clients, a quota no one reaches (every check
//!    admitted): checks per second, p50/p99 of each check's time (what the limiter
//!    adds in front of a backend that answers at once), Redis calls per check.
//! 2. Accuracy: 3 instances (each its own connection) × 8 clients on one keyed quota
//!    of 1,000/s (burst 20), greedy (a refused client sleeps for the `retry_after` it
//!    is told) and under quota (900/s offered in all): admissions per 1 s window,
//!    their largest deviation from the quota, Redis calls per request and per
//!    admission.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::{Keyed, Rate, RateLimited};
use marina_redis::{FleetConfig, Lease, RedisFleet, RedisRateLimit, RedisRateLimitLayer};
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

/// One check per call, the anchors' way: a GCRA script (written for this bench)
/// invoked per request with `EVALSHA` (redis-rs loads it on `NOSCRIPT`), the time from
/// Redis. Returns `(allowed, retry_after µs)`.
const ONE_CALL_GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, math.ceil(allow_at - now)}
end
tat = tat + period
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {1, 0}
"#;

#[derive(Clone, Copy, Debug)]
struct Req;

type Backend = tower::util::ServiceFn<fn(Req) -> std::future::Ready<Result<(), BoxError>>>;

fn backend() -> Backend {
    service_fn(|_| std::future::ready(Ok(())))
}

fn alice(_: &Req) -> Option<String> {
    Some("alice".to_owned())
}

type Limited = RedisRateLimit<Backend, Keyed<fn(&Req) -> Option<String>>>;

/// A limiter to check with.
#[derive(Clone)]
enum Checker {
    /// The anchors' way.
    OneCall {
        conn: ConnectionManager,
        script: Arc<redis::Script>,
        key: Arc<str>,
        period_us: f64,
        tolerance_us: f64,
        calls: Arc<AtomicU64>,
    },
    /// marina-redis.
    Marina(Limited),
}

impl Checker {
    /// One check: `Ok` admitted, `Err(retry_after)` refused.
    async fn check(&mut self) -> Result<(), Duration> {
        match self {
            Checker::OneCall {
                conn,
                script,
                key,
                period_us,
                tolerance_us,
                calls,
            } => {
                calls.fetch_add(1, Relaxed);
                let (ok, wait): (i64, i64) = script
                    .key(&**key)
                    .arg(*period_us)
                    .arg(*tolerance_us)
                    .invoke_async(conn)
                    .await
                    .expect("redis answers");
                if ok == 1 {
                    Ok(())
                } else {
                    Err(Duration::from_micros(wait as u64))
                }
            }
            Checker::Marina(svc) => match svc.ready().await.unwrap().call(Req).await {
                Ok(()) => Ok(()),
                Err(e) => Err(e
                    .downcast_ref::<RateLimited>()
                    .unwrap_or_else(|| panic!("unexpected error: {e}"))
                    .retry_after),
            },
        }
    }

    fn calls(&self, handle: Option<&marina_redis::RedisRateHandle>) -> u64 {
        match (self, handle) {
            (Checker::OneCall { calls, .. }, _) => calls.load(Relaxed),
            (Checker::Marina(_), Some(h)) => h.stats().redis_calls,
            (Checker::Marina(_), None) => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Row {
    OneCall,
    LeaseOff,
    Lease(Lease),
}

impl Row {
    fn name(&self) -> String {
        match self {
            Row::OneCall => "one script call per check (redis_rate's approach)".into(),
            Row::LeaseOff => "marina-redis, lease off".into(),
            Row::Lease(Lease::Tokens(n)) => format!("marina-redis, lease {n}"),
            Row::Lease(Lease::Auto { expected_instances }) => {
                format!("marina-redis, lease auto ({expected_instances} instances)")
            }
            Row::Lease(l) => format!("marina-redis, {l:?}"),
        }
    }
}

/// An instance's checker for `row`, with its own connection.
async fn instance(
    url: &str,
    prefix: &str,
    rate: Rate,
    row: Row,
) -> (Checker, Option<marina_redis::RedisRateHandle>) {
    match row {
        Row::OneCall => {
            let client = redis::Client::open(url).unwrap();
            let conn = ConnectionManager::new(client).await.unwrap();
            let period_us = 1e6 / rate.per_second_f64();
            (
                Checker::OneCall {
                    conn,
                    script: Arc::new(redis::Script::new(ONE_CALL_GCRA)),
                    key: format!("{prefix}:onecall:alice").into(),
                    period_us,
                    tolerance_us: period_us * f64::from(rate.burst_size() - 1),
                    calls: Arc::default(),
                },
                None,
            )
        }
        Row::LeaseOff | Row::Lease(_) => {
            let fleet = RedisFleet::with_config(
                FleetConfig::new(url)
                    .key_prefix(prefix)
                    .call_timeout(Duration::from_millis(500)),
            )
            .unwrap();
            fleet.ping().await.expect("redis answers");
            let lease = match row {
                Row::Lease(l) => l,
                _ => Lease::Off,
            };
            let layer = RedisRateLimitLayer::keyed(
                &fleet,
                "bench",
                alice as fn(&Req) -> Option<String>,
                rate,
            )
            .lease(lease);
            let handle = layer.handle();
            (Checker::Marina(layer.layer(backend())), Some(handle))
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Part 1: one instance, 16 clients, every check admitted.
async fn cost(url: &str, secs: u64, row: Row) {
    let prefix = format!("marina-bench:{}:cost", std::process::id());
    let rate = Rate::per_second(1_000_000).burst(1_000_000);
    let (checker, handle) = instance(url, &prefix, rate, row).await;
    // Warm up (connect, load scripts).
    checker.clone().check().await.unwrap();
    let calls0 = checker.calls(handle.as_ref());
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = checker.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                c.check().await.expect("admitted");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort();
    let calls = checker.calls(handle.as_ref()) - calls0;
    println!(
        "| {} | {:.0} | {:.1} | {:.1} | {:.3} |",
        row.name(),
        lat.len() as f64 / secs as f64,
        percentile(&lat, 0.5).as_secs_f64() * 1e6,
        percentile(&lat, 0.99).as_secs_f64() * 1e6,
        calls as f64 / lat.len() as f64,
    );
}

/// Part 2: 3 instances × 8 clients on one quota of 1,000/s; `offered`: each client's
/// pace (`None`: greedy).
async fn accuracy(url: &str, secs: u64, row: Row, offered: Option<Duration>) {
    let prefix = format!(
        "marina-bench:{}:acc:{:?}:{}",
        std::process::id(),
        offered,
        row.name().len()
    );
    let rate = Rate::per_second(1000).burst(20);
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + Duration::from_secs(secs);
    let admitted = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let requests = Arc::new(AtomicU64::new(0));
    let mut checkers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3u32 {
        let (checker, handle) = instance(url, &prefix, rate, row).await;
        checkers.push((checker.clone(), handle));
        for j in 0..8u32 {
            let mut c = checker.clone();
            let admitted = admitted.clone();
            let requests = requests.clone();
            // Paced clients start spread over one pace, so that the load is smooth.
            let first = start + offered.map_or(Duration::ZERO, |every| every * (i * 8 + j) / 24);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(first).await;
                let mut next = first;
                while Instant::now() < end {
                    requests.fetch_add(1, Relaxed);
                    match c.check().await {
                        Ok(()) => {
                            let at = Instant::now();
                            if at < end {
                                admitted.lock().unwrap().push(at - start);
                            }
                        }
                        Err(wait) if offered.is_none() => {
                            tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                        }
                        Err(_) => {}
                    }
                    if let Some(every) = offered {
                        next += every;
                        tokio::time::sleep_until(next).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.lock().unwrap();
    let mut windows = vec![0u64; secs as usize];
    for d in admitted.iter() {
        windows[(d.as_secs() as usize).min(secs as usize - 1)] += 1;
    }
    // Against the quota when greedy, against the demand under it. The first window
    // also holds the burst.
    let expected = offered.map_or(1000.0, |every| 24.0 / every.as_secs_f64());
    let worst = windows
        .iter()
        .skip(1)
        .map(|&n| (n as f64 - expected) / expected * 100.0)
        .fold(0.0f64, |w, d| if d.abs() > w.abs() { d } else { w });
    let calls: u64 = checkers.iter().map(|(c, h)| c.calls(h.as_ref())).sum();
    let requests = requests.load(Relaxed);
    println!(
        "| {} | {} | {:?} | {:+.1}% | {:.3} | {:.3} |",
        row.name(),
        match offered {
            None => "greedy".to_string(),
            Some(_) => "900/s offered".to_string(),
        },
        windows,
        worst,
        calls as f64 / requests as f64,
        calls as f64 / admitted.len() as f64,
    );
}

fn main() {
    let mut secs = 2u64;
    let mut url =
        std::env::var("MARINA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).unwrap_or(secs),
            "--url" => url = args.next().unwrap_or(url),
            _ => {} // cargo bench passes --bench
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("## Cost: 1 instance, 16 clients, every check admitted ({secs} s per row)\n");
        println!("| limiter | checks/s | p50 µs | p99 µs | Redis calls/check |");
        println!("|---|---:|---:|---:|---:|");
        for row in [
            Row::OneCall,
            Row::LeaseOff,
            Row::Lease(Lease::Tokens(10)),
            Row::Lease(Lease::Tokens(100)),
        ] {
            cost(&url, secs, row).await;
        }
        let secs = secs.max(3);
        println!(
            "\n## Accuracy: 3 instances × 8 clients, one keyed quota of 1,000/s, burst 20 ({secs} s per row)\n"
        );
        println!(
            "| limiter | demand | admitted per 1 s window | worst window after the first, vs quota (greedy) or demand | Redis calls/request | Redis calls/admission |"
        );
        println!("|---|---|---|---:|---:|---:|");
        for offered in [None, Some(Duration::from_micros(1_000_000 * 24 / 900))] {
            for row in [
                Row::OneCall,
                Row::LeaseOff,
                Row::Lease(Lease::Auto {
                    expected_instances: 3,
                }),
            ] {
                accuracy(&url, secs, row, offered).await;
            }
        }
    });
}
