//! `marina::Stack` on a fleet (the `redis` feature), against a real Redis at
//! `MARINA_REDIS_URL` (default `redis://127.0.0.1:6379`), over loopback line servers
//! that tag their replies with their port:
//!
//! - Two stacks built with the same fleet and name share one global quota: together
//!   they admit the quota's burst plus its rate over the time elapsed, not twice that
//!   (with leasing off and on), and each one's stats count its share.
//! - A session pinned through stack A is routed to the same backend through stack B,
//!   an instance with a connection and a cache of its own; and through a stack built
//!   after A is gone.
//! - Per-key concurrency is fleet-wide: with a limit of 2, a key's permits held through
//!   A and B (two stacks on one fleet connection) refuse its third request through
//!   either.
//! - `[redis]` in a `StackConfig` builds a stack on the fleet; bad values, in the file
//!   or the builder, fail with typed problems at their `redis.*` paths.
//! - With no Redis answering (a refused address; no server needed), the fleet's
//!   fallback decides each request at once: fail closed refuses with
//!   `RedisUnavailable`, fail open admits, `local` enforces the instance's share.
//!
//! Without a Redis the tests print why and pass, except in CI (`CI` set), where they
//! fail. Each test uses a key prefix of its own. Every wait is bounded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use integration_tests::{LIMIT, LineServer, refused_addr, split_tag, within};
use marina::affinity::TableConfig;
use marina::core::{BoxError, Request, find};
use marina::limit::{ConnectionLimit, Rate, RateLimited};
use marina::redis::{Fallback, FleetConfig, Lease, RedisFleet, RedisUnavailable};
use marina::{
    AffinityMode, InvalidConfig, KeyFnBox, Stack, StackBuilder, StackConfig, StackHandle,
    StackService,
};
use tower::{Service, ServiceExt};

/// The server the tests use: `MARINA_REDIS_URL`, default `redis://127.0.0.1:6379`.
fn url() -> String {
    std::env::var("MARINA_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Redis URL if a server answers `PING` there. Without one: in CI (`CI` set) the
/// test fails; elsewhere it prints why and the test is skipped (returns early).
async fn redis() -> Option<String> {
    let url = url();
    let answer = async {
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    let why = match tokio::time::timeout(Duration::from_secs(3), answer).await {
        Ok(Ok(_)) => return Some(url),
        Ok(Err(e)) => e,
        Err(_) => "no answer within 3 s".to_string(),
    };
    if std::env::var_os("CI").is_some() {
        panic!(
            "no Redis at MARINA_REDIS_URL={url} ({why}); CI must run these tests (.ci/run starts one)"
        );
    }
    eprintln!(
        "SKIPPED: no Redis at MARINA_REDIS_URL={url} ({why}). Start one \
         (redis-server --port 6379 --save '' --appendonly no) or set MARINA_REDIS_URL to run this test."
    );
    None
}

/// A key prefix of this test's own, so tests run in parallel (and again) apart.
fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("marina-test:stack-{test}:{}-{nanos:x}", std::process::id())
}

/// A fleet at `url` under `prefix`, with a call timeout generous enough for a busy
/// test machine (the fallback must not decide these tests' requests).
fn fleet(url: &str, prefix: &str) -> RedisFleet {
    RedisFleet::with_config(
        FleetConfig::new(url)
            .key_prefix(prefix)
            // Generous: on a loaded machine a slow first connect marks Redis down and
            // the fallback (not what these tests check) would decide instead.
            .call_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(10)),
    )
    .expect("a valid fleet")
}

async fn servers(n: usize) -> Vec<LineServer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(LineServer::tagged().await);
    }
    out
}

fn addrs(servers: &[LineServer]) -> Vec<SocketAddr> {
    servers.iter().map(LineServer::addr).collect()
}

/// The session key of a request: its body's first word.
fn session_key() -> KeyFnBox<String> {
    KeyFnBox::new(|r: &Request<String>| r.body.split(' ').next().map(str::to_owned))
}

/// Sends `line`; the port of the backend that answered.
async fn send(svc: &mut StackService<String, String>, line: &str) -> Result<u16, BoxError> {
    let reply = within(LIMIT, "a request", async {
        svc.ready()
            .await?
            .call(Request::new(line.to_string()))
            .await
    })
    .await?;
    let (port, echoed) = split_tag(&reply.body).expect("a tagged reply");
    assert_eq!(echoed, line);
    Ok(port)
}

/// The stack's problems at build, by path.
fn build_problems(b: StackBuilder<String>) -> Vec<String> {
    match b.build_line() {
        Ok(_) => Vec::new(),
        Err(e) => find::<InvalidConfig>(&*e)
            .unwrap_or_else(|| panic!("not an InvalidConfig: {e}"))
            .0
            .iter()
            .map(|p| p.path.clone())
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stacks_on_one_fleet_share_one_global_quota() {
    let Some(url) = redis().await else { return };
    let backends = servers(2).await;
    for lease in [Lease::Off, Lease::Tokens(4)] {
        let prefix = prefix("quota");
        let fleet = fleet(&url, &prefix);
        // 10 at once, then 2 a second: within this test's second or two the fleet
        // admits 10 + 2 × elapsed, where two local limits would admit twice that.
        let rate = Rate::per_second(2).burst(10);
        let stack = || {
            Stack::builder::<String>()
                .endpoints(addrs(&backends))
                .rate_limit(rate)
                .redis(fleet.clone())
                .redis_lease(lease)
                .redis_name("shared")
                .build_line()
                .expect("a stack")
        };
        let (a, a_handle) = stack();
        let (b, b_handle) = stack();
        let start = tokio::time::Instant::now();
        let mut admitted = [0u64; 2];
        // Both stacks at once, 20 requests each.
        let run = |mut svc: StackService<String, String>| async move {
            let mut ok = 0u64;
            for i in 0..20 {
                match send(&mut svc, &format!("req-{i}")).await {
                    Ok(_) => ok += 1,
                    Err(e) => assert!(
                        find::<RateLimited>(&*e).is_some(),
                        "a refusal other than RateLimited: {e}"
                    ),
                }
            }
            ok
        };
        let (ra, rb) = tokio::join!(tokio::spawn(run(a)), tokio::spawn(run(b)));
        admitted[0] = ra.unwrap();
        admitted[1] = rb.unwrap();
        let elapsed = start.elapsed().as_secs_f64();
        let total = admitted[0] + admitted[1];
        let most = 10 + (2.0 * elapsed).ceil() as u64;
        assert!(
            (10..=most).contains(&total),
            "{lease:?}: the fleet admitted {total} ({admitted:?}) in {elapsed:.2} s; \
             its quota allows 10 to {most}"
        );
        // Each stack's figures count its own share; the fleet's connection is one.
        for (handle, ours) in [(&a_handle, admitted[0]), (&b_handle, admitted[1])] {
            let r = handle.redis().expect("a stack on a fleet");
            let rate = r.rate.expect("the fleet's global rate limit");
            assert_eq!(rate.admitted, ours, "{lease:?}");
            assert_eq!(rate.admitted + rate.rejected, 20, "{lease:?}");
            assert_eq!(rate.fallback, 0, "{lease:?}: Redis answered every call");
            assert!(r.fleet.available && r.fleet.calls > 0, "{:?}", r.fleet);
            // The local limiter is not there: its figures are the fleet's.
            let stats = handle.stats();
            assert!(stats.rate.is_none());
            let text = stats.to_string();
            assert!(text.contains("fleet rate limit: "), "{text}");
            assert!(text.contains("redis: up"), "{text}");
            assert!(handle.redis_fleet().is_some());
        }
        for h in [a_handle, b_handle] {
            within(LIMIT, "shutdown", h.shutdown(Duration::from_secs(2))).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pinned_through_one_stack_is_routed_alike_through_another() {
    let Some(url) = redis().await else { return };
    let prefix = prefix("sessions");
    let backends = servers(3).await;
    // Each stack its own fleet connection and session cache: two instances.
    let stack = || {
        Stack::builder::<String>()
            .endpoints(addrs(&backends))
            .affinity(AffinityMode::Sticky(session_key(), TableConfig::default()))
            .redis(fleet(&url, &prefix))
            .build_line()
            .expect("a stack")
    };
    let (mut a, a_handle) = stack();
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Six sessions through A: round robin spreads the new ones over the backends, and
    // each stays where it was pinned.
    let mut pinned = Vec::new();
    for s in 0..6 {
        let session = format!("s-{s}");
        let port = send(&mut a, &format!("{session} first")).await.unwrap();
        assert_eq!(
            send(&mut a, &format!("{session} again")).await.unwrap(),
            port
        );
        pinned.push((session, port));
    }
    let used: BTreeSet<u16> = pinned.iter().map(|(_, p)| *p).collect();
    assert!(
        used.len() > 1,
        "new sessions all went to one backend: {pinned:?}"
    );
    // A writes its pins in the background: wait until Redis has them all.
    within(LIMIT, "the pins in Redis", async {
        loop {
            let keys: Vec<String> = pinned
                .iter()
                .map(|(s, _)| format!("{prefix}:session:{}:{s}", marina::DEFAULT_REDIS_NAME))
                .collect();
            let found: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut admin)
                .await
                .unwrap();
            if found.iter().all(Option::is_some) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let a_stats = a_handle.redis().unwrap();
    assert_eq!(a_stats.sessions.unwrap().created, 6);
    // B, another instance, routes every session where A pinned it.
    let (mut b, b_handle) = stack();
    for (session, port) in &pinned {
        for n in 0..2 {
            let got = send(&mut b, &format!("{session} from-b-{n}"))
                .await
                .unwrap();
            assert_eq!(
                got, *port,
                "session {session} moved from {port} to {got} through B"
            );
        }
    }
    let b_stats = b_handle.redis().unwrap();
    assert_eq!(b_stats.sessions.unwrap().created, 0, "B pinned nothing new");
    assert!(
        b_stats.session_store.unwrap().fetches >= 6,
        "B read the pins from Redis"
    );
    // A is gone (an instance restarting): a new instance still routes them alike.
    within(LIMIT, "shutdown", a_handle.shutdown(Duration::from_secs(2))).await;
    drop(a);
    let (mut c, c_handle) = stack();
    for (session, port) in &pinned {
        assert_eq!(
            send(&mut c, &format!("{session} from-c")).await.unwrap(),
            *port
        );
    }
    for h in [b_handle, c_handle] {
        within(LIMIT, "shutdown", h.shutdown(Duration::from_secs(2))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_concurrency_holds_across_stacks() {
    let Some(url) = redis().await else { return };
    let prefix = prefix("concurrency");
    // A backend that holds its replies until released.
    let backend = LineServer::start(integration_tests::LineServerOptions {
        tag: true,
        hold: true,
        ..Default::default()
    })
    .await;
    // Two stacks on one fleet connection (one instance id): their permits must still
    // be told apart in Redis.
    let fleet = fleet(&url, &prefix);
    // Connected before the first permit is asked for: a request the fallback admitted
    // while connecting would wait on the held backend.
    within(LIMIT, "a first PING", fleet.ping())
        .await
        .expect("Redis answers");
    let stack = || {
        Stack::builder::<String>()
            .endpoints([backend.addr()])
            .concurrency_per_key(session_key(), 2)
            .redis(fleet.clone())
            .build_line()
            .expect("a stack")
    };
    let (a, a_handle) = stack();
    let (b, b_handle) = stack();
    let in_flight = |h: &StackHandle| h.redis().unwrap().concurrency[0].in_flight;
    // alice's two permits: one held through A, one through B.
    let mut held = Vec::new();
    for (svc, handle, line) in [(&a, &a_handle, "alice one"), (&b, &b_handle, "alice two")] {
        let mut svc = svc.clone();
        held.push(tokio::spawn(async move { send(&mut svc, line).await }));
        within(LIMIT, "alice's request in flight", async {
            while in_flight(handle) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    // A third is refused through either stack; bob is not.
    for (svc, line) in [(&a, "alice three"), (&b, "alice four")] {
        let refused = send(&mut svc.clone(), line)
            .await
            .expect_err("over alice's limit");
        assert!(find::<ConnectionLimit>(&*refused).is_some(), "{refused}");
    }
    held.push(tokio::spawn({
        let mut b = b.clone();
        async move { send(&mut b, "bob one").await }
    }));
    within(LIMIT, "bob's request in flight", async {
        while in_flight(&b_handle) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    backend.release();
    for h in held {
        h.await.unwrap().expect("an admitted request");
    }
    for (handle, admitted) in [(&a_handle, 1), (&b_handle, 2)] {
        let c = handle.redis().unwrap().concurrency[0];
        assert_eq!(
            (c.admitted, c.rejected, c.in_flight),
            (admitted, 1, 0),
            "{c:?}"
        );
    }
    for h in [a_handle, b_handle] {
        within(LIMIT, "shutdown", h.shutdown(Duration::from_secs(2))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_section_builds_a_stack_and_bad_values_are_typed_problems() {
    // Bad values need no Redis: they are refused before it is asked.
    let base = "endpoints = [\"127.0.0.1:7001\"]\n[limits]\nrate_per_second = 100\nburst = 10\n";
    let cases: &[(&str, &[&str])] = &[
        ("[redis]\nkey_prefix = \"x\"", &["redis.url"]),
        ("[redis]\nurl = \"http://127.0.0.1\"", &["redis.url"]),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nkey_prefix = \"a b\"",
            &["redis.key_prefix"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\ncall_timeout_ms = 0",
            &["redis.call_timeout_ms"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nfallback = \"maybe\"",
            &["redis.fallback"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nfallback = \"local\"",
            &["redis.expected_instances"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nfallback = \"local\"\nexpected_instances = 0",
            &["redis.expected_instances"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nexpected_instances = 3",
            &["redis.expected_instances"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nlease = \"always\"",
            &["redis.lease"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nlease = 11",
            &["redis.lease"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nlease = 0",
            &["redis.lease"],
        ),
        (
            "[redis]\nurl = \"redis://127.0.0.1\"\nname = \"\"",
            &["redis.name"],
        ),
    ];
    for (text, want) in cases {
        let config = StackConfig::from_toml(&format!("{base}{text}"))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let paths: Vec<String> = config.validate().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, *want, "{text}");
        let err = Stack::from_config::<String>(&config).expect_err(text);
        assert_eq!(err.0[0].path, want[0], "{text}");
    }
    let typo = StackConfig::from_toml(&format!("{base}[redis]\nurl = \"redis://x\"\nleese = 3"));
    assert!(typo.unwrap_err().to_string().contains("leese"));
    // The builder's own settings, at the same paths.
    let builder = || {
        Stack::builder::<String>()
            .endpoints(["127.0.0.1:7001".parse().unwrap()])
            .rate_limit(Rate::per_second(100).burst(10))
    };
    assert_eq!(build_problems(builder().redis_url("nope")), ["redis.url"]);
    assert_eq!(
        build_problems(
            builder()
                .redis_url("redis://127.0.0.1")
                .redis_lease(Lease::Tokens(50))
        ),
        ["redis.lease"]
    );
    assert_eq!(
        build_problems(
            builder()
                .redis_url("redis://127.0.0.1")
                .redis_name("two words")
        ),
        ["redis.name"]
    );
    assert_eq!(
        build_problems(builder().redis_lease(Lease::Tokens(2))),
        ["redis"],
        "fleet settings without a fleet"
    );
    assert_eq!(
        build_problems(
            builder()
                .redis_url("redis://127.0.0.1")
                .affinity(AffinityMode::Sticky(
                    session_key(),
                    TableConfig::default().idle_timeout(Duration::from_millis(10)),
                ))
        ),
        ["redis.sessions"]
    );

    // A good file builds a stack on the fleet, over real backends.
    let Some(url) = redis().await else { return };
    let prefix = prefix("config");
    let backends = servers(2).await;
    let endpoints: Vec<String> = backends
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect();
    let text = format!(
        "endpoints = [{}]\n\
         [limits]\nrate_per_second = 1\nburst = 3\n\
         [redis]\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\nname = \"cfg\"\n\
         call_timeout_ms = 2000\nfallback = \"local\"\nexpected_instances = 2\n\
         lease = \"auto\"\nsessions = true\n",
        endpoints.join(", ")
    );
    let config = StackConfig::from_toml(&text).unwrap();
    assert_eq!(config.validate(), Vec::new());
    let (mut svc, handle): (StackService<String, String>, StackHandle) =
        Stack::from_config::<String>(&config)
            .unwrap()
            .build_line()
            .unwrap();
    let mut ok = 0;
    for i in 0..6 {
        match send(&mut svc, &format!("line-{i}")).await {
            Ok(_) => ok += 1,
            Err(e) => assert!(find::<RateLimited>(&*e).is_some(), "{e}"),
        }
    }
    assert!(
        (3..=4).contains(&ok),
        "the fleet's burst of 3 admitted {ok}"
    );
    let r = handle.redis().expect("the stack is on the fleet");
    let rate = r.rate.unwrap();
    assert_eq!((rate.burst, rate.lease_size), (3, 1));
    assert_eq!(
        handle.redis_fleet().unwrap().config().key_prefix,
        prefix,
        "the file's prefix"
    );
    // The quota is in Redis under the file's prefix and name.
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:rate:cfg:rate*"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no quota under {prefix}:rate:cfg:rate");
    within(LIMIT, "shutdown", handle.shutdown(Duration::from_secs(2))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_fleets_fallback_decides_at_once() {
    // Nothing listens there: every call fails at once (connection refused).
    let (_hold, nowhere) = refused_addr();
    let backends = servers(1).await;
    for fallback in [
        Fallback::FailClosed,
        Fallback::FailOpen,
        Fallback::Local {
            expected_instances: 2,
        },
    ] {
        let fleet = RedisFleet::with_config(
            FleetConfig::new(format!("redis://{nowhere}"))
                .key_prefix(prefix("outage"))
                .call_timeout(Duration::from_millis(100))
                .fallback(fallback),
        )
        .unwrap();
        // A quota of 4 at once: 2 for this instance on its own with `Local`.
        let (mut svc, handle) = Stack::builder::<String>()
            .endpoints(addrs(&backends))
            .rate_limit(Rate::per_second(1).burst(4))
            .redis(fleet)
            .build_line()
            .unwrap();
        let start = tokio::time::Instant::now();
        let mut outcomes = Vec::new();
        for i in 0..6 {
            outcomes.push(match send(&mut svc, &format!("req-{i}")).await {
                Ok(_) => "admitted",
                Err(e) if find::<RedisUnavailable>(&*e).is_some() => "unavailable",
                Err(e) if find::<RateLimited>(&*e).is_some() => "limited",
                Err(e) => panic!("{fallback:?}: {e}"),
            });
        }
        // Each request waited at most a call timeout (or none, once Redis is down).
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{fallback:?}: {:?}",
            start.elapsed()
        );
        let admitted = outcomes.iter().filter(|o| **o == "admitted").count();
        match fallback {
            Fallback::FailClosed => assert_eq!(admitted, 0, "{outcomes:?}"),
            Fallback::FailOpen => assert_eq!(admitted, 6, "{outcomes:?}"),
            Fallback::Local { .. } => {
                assert_eq!(admitted, 2, "{outcomes:?}");
                assert!(outcomes.contains(&"limited"), "{outcomes:?}");
            }
        }
        let r = handle.redis().unwrap();
        assert_eq!(r.rate.unwrap().fallback, 6, "{fallback:?}: {r:?}");
        assert!(r.fleet.errors + r.fleet.timeouts > 0, "{:?}", r.fleet);
        within(LIMIT, "shutdown", handle.shutdown(Duration::from_secs(1))).await;
    }
}
