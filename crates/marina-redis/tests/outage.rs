//! Redis hung or dead mid-run, through a loopback proxy the test controls
//! (`MARINA_REDIS_URL`; skipped with a message when none answers, outside CI).
//!
//! For a hung Redis (the proxy holds every byte) and a dead one (the proxy drops every
//! connection): no request waits longer than the call timeout; each limiter applies
//! its fallback (fail open, fail closed, local share of the quota), the concurrency
//! limit and the session store theirs; Redis is marked down once and found back by
//! the probe; then the limits are Redis's again.

mod support;

use std::time::Duration;

use marina_affinity::{Lookup, SessionStore};
use marina_core::{BoxError, EndpointId};
use marina_limit::{ConnectionLimit, Rate, RateLimited};
use marina_redis::{
    Fallback, FleetConfig, RedisConcurrencyLayer, RedisFleet, RedisRateHandle, RedisRateLimitLayer,
    RedisSessionStore, RedisUnavailable, SessionConfig,
};
use support::{Mode, Proxy};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

const CALL_TIMEOUT: Duration = Duration::from_millis(20);

/// A request: the user it is for.
#[derive(Debug, Clone, Copy)]
struct Req(&'static str);

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: u64,
    limited: u64,
    unavailable: u64,
    slowest: Duration,
}

/// Sends a request every 2 ms for `dur`, sorting the outcomes.
async fn drive<S>(mut svc: S, dur: Duration) -> Tally
where
    S: Service<Req, Response = (), Error = BoxError>,
{
    let end = Instant::now() + dur;
    let mut t = Tally::default();
    while Instant::now() < end {
        let start = Instant::now();
        let out = match svc.ready().await {
            Ok(svc) => svc.call(Req("carol")).await,
            Err(e) => Err(e),
        };
        t.slowest = t.slowest.max(start.elapsed());
        match out {
            Ok(()) => t.ok += 1,
            Err(e) if e.is::<RateLimited>() || e.is::<ConnectionLimit>() => t.limited += 1,
            Err(e) if e.is::<RedisUnavailable>() => t.unavailable += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t
}

struct Limits {
    open: RedisRateHandle,
    closed: RedisRateHandle,
    local: RedisRateHandle,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

/// Drives the three rate limiters and the concurrency limit for `dur`, in parallel.
fn run(
    layers: &[RedisRateLimitLayer; 3],
    conc: &RedisConcurrencyLayer<fn(&Req) -> Option<String>>,
    dur: Duration,
) -> Limits {
    let backend = service_fn(|_: Req| async { Ok::<_, BoxError>(()) });
    let mut tasks: Vec<_> = layers
        .iter()
        .map(|l| tokio::spawn(drive(l.layer(backend), dur)))
        .collect();
    tasks.push(tokio::spawn(drive(conc.layer(backend), dur)));
    Limits {
        open: layers[0].handle(),
        closed: layers[1].handle(),
        local: layers[2].handle(),
        tasks,
    }
}

async fn tallies(limits: Limits) -> Vec<Tally> {
    let mut out = Vec::new();
    for t in limits.tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn user(req: &Req) -> Option<String> {
    Some(req.0.to_owned())
}

async fn outage(mode: Mode) {
    let Some(url) = support::redis().await else {
        return;
    };
    let prefix = support::prefix("outage");
    let proxy = Proxy::start(support::target(&url)).await;
    let fleet = RedisFleet::with_config(
        FleetConfig::new(support::via(&url, proxy.addr))
            .key_prefix(&prefix)
            .call_timeout(CALL_TIMEOUT)
            .down_after(3)
            .probe_interval(Duration::from_millis(50)),
    )
    .unwrap();
    fleet.ping().await.expect("Redis through the proxy");
    let rate = Rate::per_second(50).burst(2);
    let layers = [
        RedisRateLimitLayer::global(&fleet, "open", rate).fallback(Fallback::FailOpen),
        RedisRateLimitLayer::global(&fleet, "closed", rate).fallback(Fallback::FailClosed),
        RedisRateLimitLayer::global(&fleet, "local", rate).fallback(Fallback::Local {
            expected_instances: 2,
        }),
    ];
    let conc = RedisConcurrencyLayer::new(&fleet, "conc", user as fn(&Req) -> Option<String>, 4)
        .fallback(Fallback::FailClosed);
    let conc_handle = conc.handle();
    let store = RedisSessionStore::new(
        &fleet,
        "sessions",
        SessionConfig::default().cache_ttl(Duration::from_millis(50)),
    )
    .fallback(Fallback::Local {
        expected_instances: 1,
    });
    store.pin("s1", EndpointId(7), None);

    // Redis up: Redis limits.
    let up = tallies(run(&layers, &conc, Duration::from_millis(400))).await;
    println!("{mode:?}, up: {up:?}");
    for t in &up[..3] {
        assert!(t.ok > 0 && t.limited > 0 && t.unavailable == 0, "{t:?}");
    }
    assert_eq!(up[3].unavailable, 0);
    assert!(
        support::eventually(Duration::from_secs(2), || store.stats().pins == 1
            && store.stats().write_failures == 0)
        .await
    );
    assert_eq!(fleet.stats().outages, 0);

    // Redis hung or dead.
    proxy.set(mode);
    let limits = run(&layers, &conc, Duration::from_secs(1));
    let (open, closed, local) = (
        limits.open.clone(),
        limits.closed.clone(),
        limits.local.clone(),
    );
    let down = tallies(limits).await;
    println!("{mode:?}, down: {down:?}; fleet {:?}", fleet.stats());
    let budget = CALL_TIMEOUT + Duration::from_millis(100);
    for t in &down {
        assert!(
            t.slowest < budget,
            "a request waited {:?}: {t:?}",
            t.slowest
        );
    }
    let [o, c, l, k] = [down[0], down[1], down[2], down[3]];
    // What the instance already knew still holds: Redis's next cell was at most one
    // period (20 ms) away when it went, and requests until then are refused here.
    assert!(
        o.ok > 100 && o.limited <= 15 && o.unavailable == 0,
        "fail open: {o:?}"
    );
    assert!(c.ok == 0 && c.unavailable > 100, "fail closed: {c:?}");
    // Half of 50/s for a second (burst 1), on this instance alone.
    assert!(
        (15..=35).contains(&l.ok) && l.limited > 100,
        "local share: {l:?}"
    );
    assert!(
        k.ok == 0 && k.unavailable > 100,
        "concurrency, fail closed: {k:?}"
    );
    assert!(
        open.stats().fallback > 100
            && closed.stats().fallback > 100
            && local.stats().fallback > 100
    );
    let s = fleet.stats();
    assert!(!s.available && s.outages == 1 && s.skipped > 0, "{s:?}");
    // The session store answers from its cache, past its TTL (its local fallback).
    let start = Instant::now();
    let ep = match store.lookup("s1") {
        Lookup::Pinned(ep) => Some(ep),
        Lookup::Absent => None,
        Lookup::Fetch(f) => f.await.unwrap(),
    };
    assert_eq!(ep, Some(EndpointId(7)));
    assert!(start.elapsed() < budget);

    // Redis back: found by the probe, and the limits are Redis's again.
    proxy.set(Mode::Forward);
    let recovered = Instant::now();
    assert!(
        support::eventually(Duration::from_secs(5), || fleet.is_available()).await,
        "the probe finds Redis back: {:?}",
        fleet.stats()
    );
    println!(
        "{mode:?}: Redis found back {:?} after the proxy forwards again",
        recovered.elapsed()
    );
    let fallbacks = [
        open.stats().fallback,
        closed.stats().fallback,
        local.stats().fallback,
    ];
    let again = tallies(run(&layers, &conc, Duration::from_millis(400))).await;
    println!("{mode:?}, back: {again:?}; fleet {:?}", fleet.stats());
    for t in &again[..3] {
        assert!(t.ok > 0 && t.limited > 0 && t.unavailable == 0, "{t:?}");
    }
    assert!(
        again[3].ok > 0 && again[3].unavailable == 0,
        "{:?}",
        again[3]
    );
    assert_eq!(
        [
            open.stats().fallback,
            closed.stats().fallback,
            local.stats().fallback
        ],
        fallbacks,
        "no fallback once Redis is back"
    );
    let s = fleet.stats();
    assert!(s.available && s.recoveries == 1 && s.outages == 1, "{s:?}");
    assert_eq!(store.fetch("s1").await.unwrap(), Some(EndpointId(7)));
    let c = conc_handle.stats();
    assert!(c.fallback > 100 && c.in_flight == 0, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_waited_on_no_longer_than_the_timeout() {
    tokio::time::timeout(Duration::from_secs(30), outage(Mode::Pause))
        .await
        .expect("bounded run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_falls_back_and_limits_resume_when_it_returns() {
    tokio::time::timeout(Duration::from_secs(30), outage(Mode::Kill))
        .await
        .expect("bounded run");
}

/// Needs no Redis: an instance that starts while Redis is away (nothing listens at
/// the address) serves under its fallback at once, never waiting past the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_without_redis_serves_under_its_fallback() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener); // nothing listens there now
    let fleet = RedisFleet::with_config(
        FleetConfig::new(format!("redis://{addr}"))
            .key_prefix(support::prefix("absent"))
            .call_timeout(CALL_TIMEOUT)
            .fallback(Fallback::Local {
                expected_instances: 2,
            }),
    )
    .unwrap();
    assert!(fleet.ping().await.is_err());
    let layer = RedisRateLimitLayer::global(&fleet, "local", Rate::per_second(50).burst(2));
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|_: Req| async { Ok::<_, BoxError>(()) }));
    let t = tokio::time::timeout(Duration::from_secs(10), drive(svc, Duration::from_secs(1)))
        .await
        .expect("bounded run");
    println!("without Redis: {t:?}; fleet {:?}", fleet.stats());
    assert!(
        t.slowest < CALL_TIMEOUT + Duration::from_millis(100),
        "{t:?}"
    );
    // This instance's half of 50/s, burst 1, for a second.
    assert!((15..=35).contains(&t.ok) && t.limited > 100, "{t:?}");
    assert_eq!(
        handle.stats().fallback,
        t.ok + t.limited - handle.stats().refused_locally
    );
    let s = fleet.stats();
    assert!(!s.available && s.outages == 1, "{s:?}");
}
