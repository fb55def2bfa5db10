//! The fleet rate limit against a real Redis (`MARINA_REDIS_URL`, default
//! `redis://127.0.0.1:6379`; skipped with a message when none answers, outside CI).
//!
//! - 3 instances × 8 clients on one keyed quota of 200/s for 3 s: the fleet admits
//!   200/s within ±5% in every 1 s window, with leasing off and on; the Redis calls
//!   per request are printed.
//! - `Wait` mode paces a global quota across instances.
//! - The script is reloaded after `SCRIPT FLUSH` (`NOSCRIPT`); quota keys expire.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::{MissingKey, OnLimit, Rate, RateLimited};
use marina_redis::{FleetConfig, Lease, RedisFleet, RedisRateLimitLayer, RedisRateStats};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A request: the user it is for, if any.
#[derive(Debug, Clone, Copy)]
struct Req(Option<&'static str>);

fn backend() -> impl Service<Req, Response = (), Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|_: Req| async { Ok::<_, BoxError>(()) })
}

fn user(req: &Req) -> Option<String> {
    req.0.map(str::to_owned)
}

/// A fleet of its own (its own connection), as a separate process would have.
fn fleet(url: &str, prefix: &str) -> RedisFleet {
    // A loaded 2-core CI machine: a generous call timeout, so that a slow answer
    // is not mistaken for an outage here.
    RedisFleet::with_config(
        FleetConfig::new(url)
            .key_prefix(prefix)
            .call_timeout(Duration::from_millis(250)),
    )
    .unwrap()
}

const BURST: u64 = 20;

struct Report {
    windows: Vec<u64>,
    total: u64,
    stats: Vec<RedisRateStats>,
}

/// 3 instances × 8 clients on the key "alice" at 200/s (burst 20) for 3 s; clients
/// refused sleep for the `retry_after` they are told.
async fn run_fleet(url: &str, lease: Lease) -> Report {
    const SECS: u64 = 3;
    let prefix = support::prefix("quota");
    // A burst of 20 (100 ms of cells) lets a client stalled by a busy machine catch
    // up; it is the quota's too, so the first window may hold it on top of the rate.
    let rate = Rate::per_second(200).burst(BURST as u32);
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + Duration::from_secs(SECS);
    let admitted = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let fleet = fleet(url, &prefix);
        let layer = RedisRateLimitLayer::keyed(&fleet, "api", user, rate).lease(lease);
        handles.push(layer.handle());
        let svc = layer.layer(backend());
        for _ in 0..8 {
            let mut svc = svc.clone();
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start).await;
                while Instant::now() < end {
                    match svc.ready().await.unwrap().call(Req(Some("alice"))).await {
                        Ok(()) => {
                            let at = Instant::now();
                            if at < end {
                                admitted.lock().unwrap().push(at - start);
                            }
                        }
                        Err(e) => {
                            let limited = e.downcast_ref::<RateLimited>().unwrap_or_else(|| {
                                panic!("only RateLimited refusals expected, got {e}")
                            });
                            tokio::time::sleep(limited.retry_after.max(Duration::from_micros(100)))
                                .await;
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.lock().unwrap();
    let mut windows = vec![0u64; SECS as usize];
    for d in admitted.iter() {
        windows[(d.as_secs() as usize).min(SECS as usize - 1)] += 1;
    }
    Report {
        windows,
        total: admitted.len() as u64,
        stats: handles.iter().map(|h| h.stats()).collect(),
    }
}

fn check(report: &Report, what: &str) {
    let calls: u64 = report.stats.iter().map(|s| s.redis_calls).sum();
    let decided: u64 = report.stats.iter().map(|s| s.admitted + s.rejected).sum();
    let fallback: u64 = report.stats.iter().map(|s| s.fallback).sum();
    println!(
        "{what}: admitted per 1 s window {:?} (quota 200/s, burst {BURST}), {} in 3 s; \
         Redis calls {calls} for {decided} requests ({} admitted): {:.3} calls/request, \
         {:.3} calls/admission; per instance: {:?}",
        report.windows,
        report.total,
        report.total,
        calls as f64 / decided as f64,
        calls as f64 / report.total as f64,
        report
            .stats
            .iter()
            .map(|s| (s.admitted, s.from_lease, s.refused_locally, s.redis_calls))
            .collect::<Vec<_>>(),
    );
    assert_eq!(fallback, 0, "no fallback expected with Redis up");
    // The rate: every 1 s window within ±5% of 200, the first less the burst the
    // quota allows on top after a quiet spell.
    for (i, &n) in report.windows.iter().enumerate() {
        let rate = if i == 0 { n.saturating_sub(BURST) } else { n };
        assert!(
            (190..=210).contains(&rate),
            "{what}: window {i} admitted {n} (burst {BURST}), outside 200/s ± 5%: {:?}",
            report.windows
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_three_admits_the_quota_within_5_percent_without_leasing() {
    let Some(url) = support::redis().await else {
        return;
    };
    let report = tokio::time::timeout(Duration::from_secs(30), run_fleet(&url, Lease::Off))
        .await
        .expect("bounded run");
    check(&report, "leasing off");
    // One cell a call (requests queued behind a call of their key may still share
    // it: one cell each, spent at once).
    for s in &report.stats {
        assert_eq!(s.lease_size, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_three_admits_the_quota_within_5_percent_with_leasing() {
    let Some(url) = support::redis().await else {
        return;
    };
    let lease = Lease::Auto {
        expected_instances: 3,
    };
    let report = tokio::time::timeout(Duration::from_secs(30), run_fleet(&url, lease))
        .await
        .expect("bounded run");
    check(&report, "leasing on (auto: 3 cells a call)");
    for s in &report.stats {
        assert_eq!(s.lease_size, 3);
    }
    let from_lease: u64 = report.stats.iter().map(|s| s.from_lease).sum();
    assert!(from_lease > 0, "some admissions came from leased cells");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_paces_a_global_quota_across_instances() {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("wait");
    let rate = Rate::per_second(100).burst(1);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(1);
    let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let fleet = fleet(&url, &prefix);
        let layer = RedisRateLimitLayer::global(&fleet, "paced", rate).on_limit(OnLimit::Wait {
            max: Duration::from_secs(2),
        });
        let svc = layer.layer(backend());
        for _ in 0..4 {
            let mut svc = svc.clone();
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start).await;
                while Instant::now() < end {
                    svc.ready().await.unwrap().call(Req(None)).await.unwrap();
                    if Instant::now() < end {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("bounded run");
    let n = admitted.load(std::sync::atomic::Ordering::Relaxed);
    println!("wait mode: {n} admitted in 1 s at 100/s (burst 1), 2 instances × 4 waiting clients");
    assert!((95..=106).contains(&n), "admitted {n}, expected 100 ± 5%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_is_reloaded_after_noscript_and_keys_expire() {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("noscript");
    let fleet = fleet(&url, &prefix);
    let layer = RedisRateLimitLayer::keyed(&fleet, "api", user, Rate::per_second(10).burst(2));
    let handle = layer.handle();
    let mut svc = layer.layer(backend());
    svc.ready()
        .await
        .unwrap()
        .call(Req(Some("bob")))
        .await
        .unwrap();

    let mut admin = support::admin(&url).await;
    let key = format!("{prefix}:rate:api:k:bob");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    // One cell of a burst of 2 spent: the state is 100 ms ahead at most.
    assert!((1..=102).contains(&ttl), "quota key TTL {ttl} ms");

    // The scripts the fleet loads when it opens (in the background).
    assert!(support::eventually(Duration::from_secs(5), || fleet.stats().script_loads >= 4).await);
    let loads = fleet.stats().script_loads;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    svc.ready()
        .await
        .unwrap()
        .call(Req(Some("bob")))
        .await
        .unwrap();
    // Reloaded on NOSCRIPT (by this fleet, unless another test's got there first:
    // tests run side by side on one Redis), and no fallback.
    let after = fleet.stats().script_loads;
    assert!((loads..=loads + 1).contains(&after), "{loads} -> {after}");
    assert_eq!(handle.stats().fallback, 0);
    // The burst of 2 is spent, and Redis said when its next cell frees with the
    // second answer: the third and the fourth are refused here, without a call.
    let calls = handle.stats().redis_calls;
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Req(Some("bob")))
        .await
        .unwrap_err();
    let wait = err
        .downcast_ref::<RateLimited>()
        .expect("over the limit")
        .retry_after;
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Req(Some("bob")))
        .await
        .unwrap_err();
    assert!(err.is::<RateLimited>());
    let s = handle.stats();
    assert_eq!(s.redis_calls, calls, "refused locally, no call");
    assert_eq!(s.refused_locally, 2);

    // No key: refused by default.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Req(None))
        .await
        .unwrap_err();
    assert!(err.is::<MissingKey>());
    assert_eq!(handle.stats().missing_key, 1);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the quota's key expired with its state");
}
