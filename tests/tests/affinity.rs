//! Session affinity on real loopback TCP: `marina_affinity::Affinity` over a
//! `marina_balance::Balance` whose endpoints are `PoolService`s of `LineClient`s, one per
//! echo backend. Each endpoint tags its responses with [`ServedBy`], so the tests see
//! where every request really went (failovers included), not only where the layer
//! thinks its session is pinned.
//!
//! - A thousand sessions of twenty requests each, many at a time: every session stays
//!   on one backend, the sessions spread over all three, and the table holds exactly
//!   one entry per session, pinned where its requests went.
//! - A backend is killed: once its health gate has ejected it, each of its sessions is
//!   re-pinned exactly once to one survivor and stays there; the other sessions do not
//!   move; no request fails.
//! - The same without a health gate: the dead endpoint stays in the ready set, each
//!   session's first request after the kill fails over, and the session follows it
//!   (re-pinned where the request was served), once.
//! - Two independent client instances in consistent-hash mode, their endpoints
//!   discovered in opposite orders, route 500 keys identically.
//!
//! Every wait is bounded by `within`; nothing sleeps for timing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, LineEndpoint, ServedBy, hold_port, line_endpoint, line_pool, within,
};
use marina_affinity::{Affinity, AffinityHandle, AffinityLayer, TableConfig};
use marina_balance::{
    Balance, BalanceHandle, ConsistentHash, EndpointSnapshot, Failover, RetryBudget, RoundRobin,
};
use marina_core::{BoxError, EndpointId, Request, Response};
use marina_health::{Health, HealthConfig, HealthHandle, Status};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tower::discover::{Change, ServiceList};
use tower::{Service, ServiceExt};

/// Reads the session from a request line `"session <id> ..."`; other lines have none.
type SessionOf = fn(&Request<String>) -> Option<String>;

fn session_of(req: &Request<String>) -> Option<String> {
    let rest = req.body.strip_prefix("session ")?;
    rest.split(' ').next().map(str::to_owned)
}

type Stack = Affinity<Balance<ServiceList<Vec<LineEndpoint>>, Request<String>>, SessionOf>;

/// Sessions run at a time (one task each).
const BATCH: usize = 50;

/// One request through a shared stack: ready and call under the lock, then the response
/// awaited without it, so requests overlap.
async fn send<S>(svc: &Mutex<S>, line: String) -> Result<Response<String>, BoxError>
where
    S: Service<Request<String>, Response = Response<String>, Error = BoxError>,
{
    let fut = {
        let mut svc = svc.lock().await;
        svc.ready().await?;
        svc.call(Request::new(line))
    };
    fut.await
}

/// The backend that served `resp` (from its [`ServedBy`] tag).
#[track_caller]
fn served_by(resp: &Response<String>) -> usize {
    resp.extensions
        .get::<ServedBy>()
        .unwrap_or_else(|| panic!("a response without ServedBy: {resp:?}"))
        .0
}

/// What one session saw: the backend of each request, and what went wrong.
#[derive(Debug, Default)]
struct Seen {
    served: Vec<usize>,
    failures: Vec<String>,
}

/// Sends `requests` requests for each of `sessions` sessions (`"session s<n> request
/// <i> <phase>"`), one at a time per session and [`BATCH`] sessions at a time. Checks
/// every echo. Returns what each session saw, by session key.
async fn run_sessions<S>(
    stack: &Arc<Mutex<S>>,
    sessions: usize,
    requests: usize,
    phase: &str,
) -> BTreeMap<String, Seen>
where
    S: Service<Request<String>, Response = Response<String>, Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    let mut tasks = JoinSet::new();
    let mut seen = BTreeMap::new();
    for s in 0..sessions {
        if tasks.len() == BATCH
            && let Some(done) = tasks.join_next().await
        {
            let (key, one): (String, Seen) = done.expect("a session task panicked");
            seen.insert(key, one);
        }
        let stack = stack.clone();
        let phase = phase.to_owned();
        tasks.spawn(async move {
            let key = format!("s{s}");
            let mut one = Seen::default();
            for i in 0..requests {
                let line = format!("session {key} request {i} {phase}");
                match send(&stack, line.clone()).await {
                    Ok(resp) => {
                        one.served.push(served_by(&resp));
                        if resp.body != line {
                            one.failures
                                .push(format!("{line}: wrong echo {:?}", resp.body));
                        }
                    }
                    Err(e) => one.failures.push(format!("{line}: {e} ({e:?})")),
                }
            }
            (key, one)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (key, one) = done.expect("a session task panicked");
        seen.insert(key, one);
    }
    assert_eq!(seen.len(), sessions);
    seen
}

/// Panics with the first few failures, if any.
#[track_caller]
fn assert_no_failures(seen: &BTreeMap<String, Seen>) {
    let failures: Vec<&String> = seen.values().flat_map(|s| &s.failures).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed, first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

/// The one backend that served all of a session's requests; panics if there were more.
#[track_caller]
fn only_backend(key: &str, seen: &Seen) -> usize {
    let backends: BTreeSet<usize> = seen.served.iter().copied().collect();
    assert_eq!(
        backends.len(),
        1,
        "session {key} was served by one backend: {:?}",
        seen.served
    );
    seen.served[0]
}

/// The endpoint ids of a `ServiceList` balancer, by position (= backend index).
fn endpoint_ids(lb: &BalanceHandle, n: usize) -> Vec<EndpointId> {
    let stats = lb.stats();
    (0..n).map(|i| endpoint(&stats, i).id).collect()
}

/// The snapshot of endpoint `index` (its `ServiceList` position).
#[track_caller]
fn endpoint(stats: &[EndpointSnapshot], index: usize) -> &EndpointSnapshot {
    let key = index.to_string();
    stats
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no endpoint {key} in {stats:#?}"))
}

/// Requests that completed successfully at an endpoint.
fn successes(e: &EndpointSnapshot) -> u64 {
    e.requests - e.in_flight - e.errors
}

/// Three echo backends (pools of `pool_size` checked clients) and a sticky-table stack
/// over them: a round-robin balancer reading route hints, with `failover` if given, and
/// with `health`, a passive health gate around each endpoint.
async fn sticky_stack(
    pool_size: usize,
    failover: Option<Failover>,
    health: Option<HealthConfig>,
) -> (
    [EchoServer; 3],
    Stack,
    AffinityHandle,
    BalanceHandle,
    Vec<HealthHandle>,
) {
    let servers = [
        EchoServer::start().await,
        EchoServer::start().await,
        EchoServer::start().await,
    ];
    let mut healths = Vec::new();
    let endpoints: Vec<LineEndpoint> = servers
        .iter()
        .enumerate()
        .map(|(i, server)| {
            let ep = line_endpoint(line_pool(server.addr(), pool_size), i);
            match &health {
                Some(config) => {
                    let gated = Health::new(ep, config.clone());
                    healths.push(gated.handle());
                    gated.boxed_clone()
                }
                None => ep,
            }
        })
        .collect();
    let mut lb = Balance::from_services(endpoints, RoundRobin::new()).route_hints_from_extensions();
    if let Some(policy) = failover {
        lb = lb.failover(policy);
    }
    let lb_handle = lb.handle();
    let affinity = AffinityLayer::sticky(session_of as SessionOf, TableConfig::default());
    let handle = affinity.handle();
    let stack = tower::Layer::layer(&affinity, lb);
    (servers, stack, handle, lb_handle, healths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_sessions_stay_on_their_backend() {
    const SESSIONS: usize = 1000;
    const REQUESTS: usize = 20;

    within(LIMIT * 3, "a thousand sticky sessions", async {
        // No failover: a request that fails is a failure here, not a silent move.
        let (_servers, stack, affinity, lb, _) = sticky_stack(16, None, None).await;
        let stack = Arc::new(Mutex::new(stack));
        let seen = run_sessions(&stack, SESSIONS, REQUESTS, "only").await;

        assert_no_failures(&seen);
        let ids = endpoint_ids(&lb, 3);
        let mut per_backend = [0usize; 3];
        for (key, one) in &seen {
            assert_eq!(one.served.len(), REQUESTS, "session {key}");
            let backend = only_backend(key, one);
            per_backend[backend] += 1;
            assert_eq!(
                affinity.pinned(key),
                Some(ids[backend]),
                "session {key} is pinned where its requests went (backend {backend})"
            );
        }
        println!("sessions per backend: {per_backend:?}");
        for (i, &n) in per_backend.iter().enumerate() {
            assert!(
                n >= SESSIONS / 3 / 2,
                "backend {i} holds a fair share of the sessions: {per_backend:?}"
            );
        }

        let stats = affinity.stats();
        println!("affinity: {stats:#?}");
        assert_eq!(stats.sessions, SESSIONS, "{stats:#?}");
        assert_eq!(stats.created, SESSIONS as u64, "{stats:#?}");
        assert_eq!(stats.repinned, 0, "{stats:#?}");
        assert_eq!(
            stats.purged + stats.expired + stats.refused,
            0,
            "{stats:#?}"
        );

        let totals = lb.totals();
        assert_eq!(totals.requests, (SESSIONS * REQUESTS) as u64, "{totals:#?}");
        assert_eq!(totals.errors, 0, "{totals:#?}");
        let stats = lb.stats();
        for (i, &n) in per_backend.iter().enumerate() {
            assert_eq!(
                successes(endpoint(&stats, i)),
                (n * REQUESTS) as u64,
                "the balancer counted each request where the tag says it went: {stats:#?}"
            );
        }
    })
    .await;
}

/// The scenario of the two kill tests: 300 sessions of 3 requests, the backend holding
/// the most sessions killed, then (with `health`: once its health gate has ejected it)
/// 5 more requests per session. Asserts that no request fails, that each session of the
/// killed backend moved exactly once, to one survivor, and stayed, that no other
/// session moved, and that the dead backend cost no more failovers than it had to.
async fn kill_a_backend_under_sessions(health: Option<HealthConfig>) {
    const SESSIONS: usize = 300;
    const BEFORE: usize = 3;
    const AFTER: usize = 5;

    within(LIMIT, "kill a backend under sticky sessions", async {
        // The echoes are idempotent: any error may be failed over. A generous budget, so
        // that it is not what is tested.
        let failover = Failover::new().retry_if(|_| true).budget(RetryBudget::new(
            Duration::from_secs(10),
            1000,
            1.0,
        ));
        let eject_first = health.is_some();
        let (servers, stack, affinity, lb, healths) = sticky_stack(8, Some(failover), health).await;
        let stack = Arc::new(Mutex::new(stack));

        let before = run_sessions(&stack, SESSIONS, BEFORE, "before").await;
        assert_no_failures(&before);
        // (The balancer discovers its endpoints when first polled.)
        let ids = endpoint_ids(&lb, 3);
        let home: BTreeMap<&str, usize> = before
            .iter()
            .map(|(key, one)| (key.as_str(), only_backend(key, one)))
            .collect();
        let mut per_backend = [0usize; 3];
        home.values().for_each(|&b| per_backend[b] += 1);
        let killed = (0..3).max_by_key(|&i| per_backend[i]).expect("three");
        let on_killed = per_backend[killed];
        println!("sessions per backend: {per_backend:?}; killing backend {killed}");
        assert!(on_killed > 0);

        servers[killed].shutdown().await;
        // Keep the dead port refusing (no reuse, no self-connect) until the test ends.
        let _held = hold_port(servers[killed].addr()).expect("hold the killed backend's port");
        let at_kill = lb.stats();
        let mut at_eject = None;

        if eject_first {
            // Key-less requests (no hint: round robin) until one has failed on the dead
            // backend, ejected it, and the balancer has seen it go. Each is failed over.
            let mut probes = 0;
            while endpoint(&lb.stats(), killed).ready {
                assert!(
                    probes < 30,
                    "the dead backend was ejected: {:#?}",
                    lb.stats()
                );
                let line = format!("probe {probes}");
                let resp = send(&stack, line.clone())
                    .await
                    .unwrap_or_else(|e| panic!("{line} failed over: {e:?}"));
                assert_eq!(resp.body, line);
                assert_ne!(served_by(&resp), killed, "{line}");
                probes += 1;
            }
            let status = healths[killed].status();
            assert!(
                matches!(status, Status::Ejected { .. }),
                "the dead backend's gate is closed: {status:?}"
            );
            println!("ejected after {probes} probes");
            at_eject = Some(lb.stats());
        }

        let after = run_sessions(&stack, SESSIONS, AFTER, "after").await;
        let stats = affinity.stats();
        let totals = lb.totals();
        println!("affinity: {stats:#?}\nbalancer totals: {totals:#?}");
        println!(
            "endpoints at kill: {at_kill:#?}\nendpoints at end: {:#?}",
            lb.stats()
        );
        assert_no_failures(&after);

        let mut moved_to = [0usize; 3];
        for (key, one) in &after {
            let was = home[key.as_str()];
            let now = only_backend(key, one);
            if was == killed {
                assert_ne!(now, killed, "session {key} left the dead backend");
                moved_to[now] += 1;
            } else {
                assert_eq!(now, was, "session {key} (backend {was}) did not move");
            }
            assert_eq!(
                affinity.pinned(key),
                Some(ids[now]),
                "session {key} is pinned where its requests went (backend {now})"
            );
        }
        println!("sessions of the killed backend moved to: {moved_to:?}");
        assert_eq!(moved_to.iter().sum::<usize>(), on_killed);
        assert_eq!(
            stats.repinned, on_killed as u64,
            "each session of the dead backend re-pinned once: {stats:#?}"
        );
        assert_eq!(stats.sessions, SESSIONS, "{stats:#?}");
        assert_eq!(stats.created, SESSIONS as u64, "{stats:#?}");

        let at_end = lb.stats();
        let (then, now) = (endpoint(&at_kill, killed), endpoint(&at_end, killed));
        assert_eq!(
            successes(now),
            successes(then),
            "the dead backend served nothing after the kill: {now:#?}"
        );
        assert_eq!(totals.retries_refused, 0, "{totals:#?}");
        assert_eq!(
            totals.retries, totals.errors,
            "every failed attempt was failed over: {totals:#?}"
        );
        match at_eject {
            // Ejected before the sessions came back: none of them tried it again.
            Some(at_eject) => assert_eq!(
                endpoint(&at_eject, killed).requests,
                now.requests,
                "no session request went to the ejected backend: {now:#?}"
            ),
            // Still ready, so still honoured for each session's first request after the
            // kill; that request fails over and re-pins, and the later ones go straight
            // to the new backend.
            None => assert_eq!(
                totals.retries, on_killed as u64,
                "one failover per session of the dead backend: {totals:#?}"
            ),
        }
    })
    .await;
}

/// Each endpoint behind a passive health gate ejecting at the first failure: the dead
/// backend leaves the ready set, and the sessions pinned to it are re-pinned by the
/// picker (the pinned endpoint is not ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backend_sessions_repin_once_and_stay() {
    let health = HealthConfig {
        consecutive_failures: 1,
        failure_rate: None,
        ..HealthConfig::default()
    };
    kill_a_backend_under_sessions(Some(health)).await;
}

/// Without a health gate the dead backend stays ready (a `PoolService` always is), so
/// the balancer honours the pin to it and the request fails over: the session must
/// follow the failover (the balancer reports the failover attempt's endpoint through
/// the hint, the last report wins), once, and stay there. Before that was so, sessions
/// stayed pinned to the dead backend and every one of their requests failed over,
/// to whichever survivor was least loaded at the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_repins_sessions_to_the_backend_that_served() {
    kill_a_backend_under_sessions(None).await;
}

/// A consistent-hash stack over `servers`, its endpoints keyed by address and
/// discovered in `order`.
fn hash_stack(
    servers: &[EchoServer],
    order: &[usize],
) -> impl Service<Request<String>, Response = Response<String>, Error = BoxError, Future: Send + 'static>
+ Send
+ 'static {
    let (tx, lb) = Balance::<_, Request<String>>::from_channel(ConsistentHash::new());
    for &i in order {
        let addr: SocketAddr = servers[i].addr();
        tx.send(Change::Insert(addr, line_endpoint(line_pool(addr, 4), i)))
            .expect("the balancer holds the receiver");
    }
    let lb = lb.route_hints_from_extensions();
    let affinity = AffinityLayer::hash(session_of as SessionOf);
    tower::Layer::layer(&affinity, lb)
}

/// One request through `svc`; checks the echo and returns the backend that served it.
async fn call_once<S>(svc: &mut S, line: String) -> usize
where
    S: Service<Request<String>, Response = Response<String>, Error = BoxError>,
{
    let resp = svc
        .ready()
        .await
        .expect("the stack is ready")
        .call(Request::new(line.clone()))
        .await
        .unwrap_or_else(|e| panic!("{line}: {e:?}"));
    assert_eq!(resp.body, line);
    served_by(&resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_hash_mode_agree() {
    const KEYS: usize = 500;

    within(LIMIT, "two consistent-hash instances", async {
        let servers = [
            EchoServer::start().await,
            EchoServer::start().await,
            EchoServer::start().await,
        ];
        // Two client instances sharing nothing, their endpoints discovered in opposite
        // orders.
        let mut a = hash_stack(&servers, &[0, 1, 2]);
        let mut b = hash_stack(&servers, &[2, 1, 0]);

        let mut per_backend = [0usize; 3];
        for k in 0..KEYS {
            let served = [
                call_once(&mut a, format!("session key-{k} request 0 via a")).await,
                call_once(&mut b, format!("session key-{k} request 0 via b")).await,
                call_once(&mut a, format!("session key-{k} request 1 via a")).await,
            ];
            assert!(
                served.iter().all(|&s| s == served[0]),
                "key-{k} went to one backend from both instances (a, b, a again): {served:?}"
            );
            per_backend[served[0]] += 1;
        }
        println!("keys per backend: {per_backend:?}");
        for (i, &n) in per_backend.iter().enumerate() {
            assert!(
                n >= KEYS / 3 / 2,
                "backend {i} gets a fair share of the keys: {per_backend:?}"
            );
        }
    })
    .await;
}

/// Sends `n` requests of each session in `keys` at once; the backends that served each
/// session.
async fn send_together<S>(
    stack: &Arc<Mutex<S>>,
    keys: &[String],
    n: usize,
) -> BTreeMap<String, BTreeSet<usize>>
where
    S: Service<Request<String>, Response = Response<String>, Error = BoxError> + Send + 'static,
    S::Future: Send,
{
    let mut tasks = JoinSet::new();
    for key in keys {
        for i in 0..n {
            let stack = stack.clone();
            let key = key.clone();
            tasks.spawn(async move {
                let line = format!("session {key} request {i} concurrent");
                match send(&stack, line.clone()).await {
                    Ok(resp) if resp.body == line => (key, Ok(served_by(&resp))),
                    Ok(resp) => (key, Err(format!("{line}: wrong echo {:?}", resp.body))),
                    Err(e) => (key, Err(format!("{line}: {e} ({e:?})"))),
                }
            });
        }
    }
    let mut served: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (key, backend) = done.expect("a request task panicked");
        let backend = backend.unwrap_or_else(|e| panic!("{e}"));
        served.entry(key).or_default().insert(backend);
    }
    served
}

/// Several requests of each session in flight at once when its backend dies (no health
/// gate: the dead backend stays ready, each request fails over): a session's requests
/// all fail over to one backend, the one the session is re-pinned to, since its hint
/// carries a failover key that tells the session apart. With the least loaded endpoint
/// instead, concurrent requests of one session spread over both survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_of_a_session_fail_over_together() {
    const SESSIONS: usize = 120;
    const CONCURRENT: usize = 4;

    within(
        LIMIT,
        "concurrent session requests across a backend kill",
        async {
            let failover = Failover::new().retry_if(|_| true).budget(RetryBudget::new(
                Duration::from_secs(10),
                1000,
                1.0,
            ));
            let (servers, stack, affinity, lb, _) = sticky_stack(8, Some(failover), None).await;
            let stack = Arc::new(Mutex::new(stack));
            let before = run_sessions(&stack, SESSIONS, 2, "before").await;
            assert_no_failures(&before);
            let ids = endpoint_ids(&lb, 3);
            let home: BTreeMap<String, usize> = before
                .iter()
                .map(|(key, one)| (key.clone(), only_backend(key, one)))
                .collect();
            let killed = home.values().copied().max().expect("sessions");
            servers[killed].shutdown().await;
            let _held = hold_port(servers[killed].addr()).expect("hold the killed backend's port");
            let repinned_before = affinity.stats().repinned;

            // For each session of the dead backend, CONCURRENT requests sent together.
            let moved: Vec<String> = home
                .iter()
                .filter(|&(_, &b)| b == killed)
                .map(|(key, _)| key.clone())
                .collect();
            assert!(!moved.is_empty());
            let served = send_together(&stack, &moved, CONCURRENT).await;
            let mut spread = BTreeSet::new();
            for (key, backends) in &served {
                assert_eq!(
                    backends.len(),
                    1,
                    "session {key}'s concurrent requests failed over to one backend: {backends:?}"
                );
                let now = *backends.first().expect("one");
                assert_ne!(now, killed);
                assert_eq!(
                    affinity.pinned(key),
                    Some(ids[now]),
                    "session {key} is pinned where its requests went"
                );
                spread.insert(now);
            }
            assert_eq!(
                affinity.stats().repinned - repinned_before,
                moved.len() as u64,
                "each session re-pinned once"
            );
            if moved.len() >= 8 {
                assert_eq!(spread.len(), 2, "the sessions spread over both survivors");
            }
        },
    )
    .await;
}
