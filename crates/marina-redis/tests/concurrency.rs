//! The fleet-wide concurrency limit against a real Redis (`MARINA_REDIS_URL`; skipped
//! with a message when none answers, outside CI).
//!
//! - 3 instances, 4 per user: never more than 4 of the user's requests in flight at
//!   the backend, and the limit is reached.
//! - An instance cut off from Redis and dropped without releasing: its permits come
//!   back to the fleet when their lease ends, not before.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use marina_core::BoxError;
use marina_limit::ConnectionLimit;
use marina_redis::{FleetConfig, RedisConcurrencyLayer, RedisFleet};
use support::{InFlight, Mode, Proxy};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A request: the user it is for.
#[derive(Debug, Clone, Copy)]
struct Req(&'static str);

fn user(req: &Req) -> Option<String> {
    Some(req.0.to_owned())
}

fn fleet(url: &str, prefix: &str) -> RedisFleet {
    RedisFleet::with_config(
        FleetConfig::new(url)
            .key_prefix(prefix)
            .call_timeout(Duration::from_millis(250)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_never_exceed_4_in_flight_per_user() {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("conc4");
    // Counted at the backend, which all instances share.
    let at_backend = Arc::new(InFlight::default());
    let served = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..3 {
        let fleet = fleet(&url, &prefix);
        let layer = RedisConcurrencyLayer::new(&fleet, "per-user", user, 4)
            .lease_time(Duration::from_secs(2))
            .wait(Duration::from_secs(2));
        handles.push(layer.handle());
        let backend = {
            let at_backend = at_backend.clone();
            let served = served.clone();
            service_fn(move |_req: Req| {
                let guard = at_backend.enter();
                let served = served.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    served.fetch_add(1, Relaxed);
                    drop(guard);
                    Ok::<_, BoxError>(())
                }
            })
        };
        let svc = layer.layer(backend);
        for _ in 0..5 {
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let out = svc.ready().await.unwrap().call(Req("alice")).await;
                    if let Err(e) = out {
                        assert!(e.is::<ConnectionLimit>(), "unexpected error: {e}");
                    }
                }
            }));
        }
    }
    tokio::time::timeout(Duration::from_secs(20), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("bounded run");
    let stats: Vec<_> = handles.iter().map(|h| h.stats()).collect();
    println!(
        "3 instances × 5 clients, 4 per user: {} served, at most {} in flight at the backend; \
         per instance (admitted, rejected, redis calls): {:?}",
        served.load(Relaxed),
        at_backend.max(),
        stats
            .iter()
            .map(|s| (s.admitted, s.rejected, s.redis_calls))
            .collect::<Vec<_>>()
    );
    assert!(at_backend.max() <= 4, "{} in flight > 4", at_backend.max());
    assert_eq!(at_backend.max(), 4, "the limit is reached");
    assert!(served.load(Relaxed) > 100);
    assert!(stats.iter().all(|s| s.admitted > 0 && s.fallback == 0));
    // Released in the background: all back shortly.
    let mut admin = support::admin(&url).await;
    let key = format!("{prefix}:conc:per-user:k:alice");
    let mut left = 1;
    for _ in 0..100 {
        left = redis::cmd("ZCARD")
            .arg(&key)
            .query_async::<i64>(&mut admin)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(left, 0, "every permit released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_instance_s_permits_return_after_the_lease() {
    let Some(url) = support::redis().await else {
        return;
    };
    const LEASE: Duration = Duration::from_millis(1200);
    let prefix = support::prefix("crash");
    let proxy = Proxy::start(support::target(&url)).await;

    // Instance A reaches Redis through the proxy, and holds bob's 4 permits with
    // requests that never complete.
    let fleet_a = fleet(&support::via(&url, proxy.addr), &prefix);
    let layer_a = RedisConcurrencyLayer::new(&fleet_a, "per-user", user, 4).lease_time(LEASE);
    let handle_a = layer_a.handle();
    let a_id = fleet_a.instance_id().to_owned();
    let at_backend = Arc::new(InFlight::default());
    let hang = {
        let at_backend = at_backend.clone();
        service_fn(move |_req: Req| {
            let guard = at_backend.enter();
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok::<_, BoxError>(())
            }
        })
    };
    let svc_a = layer_a.layer(hang);
    let stuck: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc_a.clone().oneshot(Req("bob"))))
        .collect();
    assert!(
        support::eventually(Duration::from_secs(5), || at_backend.now() == 4).await,
        "A's 4 requests are in flight"
    );

    // Instance B: bob has no permit left.
    let fleet_b = fleet(&url, &prefix);
    let layer_b = RedisConcurrencyLayer::new(&fleet_b, "per-user", user, 4).lease_time(LEASE);
    let mut svc_b = layer_b.layer(service_fn(|_req: Req| async { Ok::<_, BoxError>(()) }));
    let err = svc_b
        .ready()
        .await
        .unwrap()
        .call(Req("bob"))
        .await
        .unwrap_err();
    assert!(err.is::<ConnectionLimit>(), "{err}");

    // Let A renew once, so its leases run from a renewal.
    tokio::time::sleep(LEASE / 2).await;
    assert!(handle_a.stats().renewals >= 4, "{:?}", handle_a.stats());

    // A crashes: cut off from Redis, then dropped without any release reaching it.
    proxy.set(Mode::Kill);
    let crashed = Instant::now();
    for t in stuck {
        t.abort();
    }
    drop((svc_a, layer_a, fleet_a));

    // Still taken for a while (the last renewal was at most a third of a lease ago)...
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = svc_b
        .ready()
        .await
        .unwrap()
        .call(Req("bob"))
        .await
        .unwrap_err();
    assert!(
        err.is::<ConnectionLimit>(),
        "A's permits are still leased: {err}"
    );
    // ...and back by the end of the lease.
    let back = loop {
        match svc_b.ready().await.unwrap().call(Req("bob")).await {
            Ok(()) => break crashed.elapsed(),
            Err(e) => assert!(e.is::<ConnectionLimit>(), "{e}"),
        }
        assert!(
            crashed.elapsed() < LEASE + Duration::from_secs(2),
            "A's permits never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "a dropped instance's permits came back {back:?} after it was cut off (lease {LEASE:?})"
    );
    assert!(
        back >= LEASE / 2,
        "{back:?}: before the lease could have ended"
    );
    // A's members are gone from the set.
    let mut admin = support::admin(&url).await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:conc:per-user:k:bob"))
        .arg(0)
        .arg(-1)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        members.iter().all(|m| !m.starts_with(&a_id)),
        "A's permits are gone from Redis: {members:?}"
    );
}
