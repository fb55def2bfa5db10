//! Failover across pools on real loopback TCP: a `marina_balance::Balance` over one
//! `PoolService` per echo backend, each a pool of `LineClient`s.
//!
//! - Killing one backend while several tasks send requests loses none of them: requests
//!   that hit the dead backend (a checkout that cannot connect, or a connection reset
//!   or cut short mid-request) are sent again to a survivor. Run with pools that check
//!   a client's socket at checkout (most failures are then `NotSent`) and with pools
//!   that do not (dead clients are handed out and fail after sending).
//! - With the default policy, a backend whose connects are refused (`NotSent` errors)
//!   is failed over; without failover, the same requests fail, marked `NotSent` and
//!   carrying the pool's `PoolError`.
//! - In a full outage the retry budget bounds the retries.
//!
//! Counts are bounded and every wait is bounded by `within`; nothing sleeps for timing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use integration_tests::{
    EchoServer, LIMIT, LineConnector, check_invariants, hold_port, line_pool, line_pool_builder,
    refused_addr, within,
};
use marina_balance::{Balance, EndpointSnapshot, Failover, RetryBudget, RoundRobin};
use marina_core::{BoxError, find, is_not_sent};
use marina_pool::{Pool, PoolError, PoolService};
use tower::discover::ServiceList;
use tower::{Service, ServiceExt};

type LinePool = Pool<LineConnector, SocketAddr>;
type LineService = PoolService<LineConnector, SocketAddr>;
type LineBalance = Balance<ServiceList<Vec<LineService>>, String>;

/// A round-robin balancer over one `PoolService` per pool (endpoint keys: the pools'
/// positions, `"0"`, `"1"`…).
fn balancer_over(pools: &[LinePool]) -> LineBalance {
    let services = pools.iter().cloned().map(PoolService::new).collect();
    Balance::new(ServiceList::new(services), RoundRobin::new())
}

/// One checked [`line_pool`] of at most `max_size` clients per address, and a
/// round-robin balancer over them.
fn balancer(addrs: &[SocketAddr], max_size: usize) -> (Vec<LinePool>, LineBalance) {
    let pools: Vec<LinePool> = addrs.iter().map(|&a| line_pool(a, max_size)).collect();
    let lb = balancer_over(&pools);
    (pools, lb)
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

/// Requests that completed successfully at an endpoint (nothing in these tests is
/// cancelled, so every finished request either failed or succeeded).
fn successes(e: &EndpointSnapshot) -> u64 {
    e.requests - e.in_flight - e.errors
}

/// One request through a shared balancer: picks (under the lock) and sends, then awaits
/// the response without holding the lock, so requests overlap.
async fn send(lb: &tokio::sync::Mutex<LineBalance>, line: String) -> Result<String, BoxError> {
    let fut = {
        let mut lb = lb.lock().await;
        lb.ready().await?;
        lb.call(line)
    };
    fut.await
}

/// Errors the failover policy saw in [`kill_one_backend_under_load`]: marked not sent,
/// and the others (after sending).
#[derive(Debug)]
struct Seen {
    not_sent: usize,
    sent: usize,
}

/// Three echo backends, one pool of 4 clients each (with `checked`, pools that check a
/// client's socket at checkout), a balancer failing over every error: 8 tasks send 100
/// requests each, and one backend is killed halfway. Asserts that no request is lost.
async fn kill_one_backend_under_load(checked: bool) -> Seen {
    const TASKS: usize = 8;
    const PER_TASK: usize = 100;
    const KILLED: usize = 1;

    within(LIMIT, "kill one backend under load", async {
        let servers = [
            EchoServer::start().await,
            EchoServer::start().await,
            EchoServer::start().await,
        ];
        let addrs: Vec<SocketAddr> = servers.iter().map(EchoServer::addr).collect();
        let pools: Vec<LinePool> = addrs
            .iter()
            .map(|&a| match checked {
                true => line_pool(a, 4),
                false => line_pool_builder(4)
                    .build(LineConnector::new(), a)
                    .expect("a valid pool"),
            })
            .collect();
        let lb = balancer_over(&pools);
        // The echoes are idempotent: errors after sending (a reset, a reply cut short by
        // the dying backend) are safe to retry too. Counts which kind each error was.
        let (not_sent, sent) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = (not_sent.clone(), sent.clone());
        let lb = lb.failover(
            Failover::new()
                .retry_if(move |e| {
                    let kind = if is_not_sent(&**e) { &seen.0 } else { &seen.1 };
                    kind.fetch_add(1, SeqCst);
                    true
                })
                .max_attempts(3),
        );
        let handle = lb.handle();
        let lb = Arc::new(tokio::sync::Mutex::new(lb));

        // Half the tasks send steadily throughout; the other half stop halfway at a
        // barrier (with the test) and go on once the backend is dead, so the kill
        // happens while requests flow and a known number of requests come after it.
        let arrived = Arc::new(tokio::sync::Barrier::new(TASKS / 2 + 1));
        let (killed_tx, killed_rx) = tokio::sync::watch::channel(false);
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let gated = t % 2 == 1;
            let (lb, arrived, done) = (lb.clone(), arrived.clone(), done.clone());
            let mut killed = killed_rx.clone();
            tasks.spawn(async move {
                let mut failures = Vec::new();
                for i in 0..PER_TASK {
                    if gated && i == PER_TASK / 2 {
                        arrived.wait().await;
                        killed
                            .wait_for(|k| *k)
                            .await
                            .expect("the test holds the sender");
                    }
                    let line = format!("task {t} request {i}");
                    match send(&lb, line.clone()).await {
                        Ok(reply) if reply == line => {}
                        Ok(reply) => failures.push(format!("{line}: wrong echo {reply:?}")),
                        Err(e) => failures.push(format!("{line}: {e} ({e:?})")),
                    }
                    done.fetch_add(1, SeqCst);
                }
                failures
            });
        }

        arrived.wait().await;
        let done_at_kill = done.load(SeqCst);
        servers[KILLED].shutdown().await;
        // Keep the dead port refusing (no reuse, no self-connect) until the test ends.
        let _held = hold_port(addrs[KILLED]).expect("hold the killed backend's port");
        let at_kill = handle.stats();
        killed_tx.send(true).expect("the gated tasks listen");

        let mut failures = Vec::new();
        while let Some(res) = tasks.join_next().await {
            failures.extend(res.expect("a sender task panicked"));
        }
        let totals = handle.totals();
        let stats = handle.stats();
        println!("requests done when the backend was killed: {done_at_kill}");
        println!("totals: {totals:#?}");
        println!("endpoints at kill: {at_kill:#?}");
        println!("endpoints at end: {stats:#?}");

        assert!(
            failures.is_empty(),
            "{} of {} requests failed, first ones: {:#?}",
            failures.len(),
            TASKS * PER_TASK,
            &failures[..failures.len().min(10)]
        );
        assert_eq!(done.load(SeqCst), TASKS * PER_TASK);
        assert_eq!(totals.in_flight, 0, "{totals:#?}");
        assert_eq!(
            stats.iter().map(successes).sum::<u64>(),
            (TASKS * PER_TASK) as u64,
            "each request succeeded exactly once, somewhere: {stats:#?}"
        );

        // The killed backend: still picked (a PoolService is always ready), so it failed
        // requests, and it completed none it had not already been sent at the kill.
        let (before, after) = (endpoint(&at_kill, KILLED), endpoint(&stats, KILLED));
        assert!(
            after.errors > 0,
            "the dead backend failed requests: {after:#?}"
        );
        assert!(
            successes(after) <= successes(before) + before.in_flight,
            "the dead backend served no request sent after the kill: {before:#?} {after:#?}"
        );
        // Every failed attempt was failed over, within the budget.
        assert_eq!(totals.retries, totals.errors, "{totals:#?}");
        assert_eq!(totals.retries_refused, 0, "{totals:#?}");

        // The survivors served the rest: at least every request the gated tasks sent
        // after the kill.
        let after_kill: u64 = (0..servers.len())
            .filter(|&i| i != KILLED)
            .map(|i| {
                let gained = successes(endpoint(&stats, i)) - successes(endpoint(&at_kill, i));
                assert!(gained > 0, "survivor {i} served requests after the kill");
                gained
            })
            .sum();
        assert!(
            after_kill >= (TASKS / 2 * (PER_TASK - PER_TASK / 2)) as u64,
            "the survivors served {after_kill} requests after the kill: {stats:#?}"
        );

        for pool in &pools {
            check_invariants(&pool.stats());
        }
        let killed = pools[KILLED].stats();
        assert_eq!(
            killed.total, 0,
            "no connection to the dead backend is left: {killed:#?}"
        );
        let seen = Seen {
            not_sent: not_sent.load(SeqCst),
            sent: sent.load(SeqCst),
        };
        println!("{seen:?}");
        // Once its clients are used up, the dead backend's connects are refused.
        assert!(
            seen.not_sent > 0,
            "refused checkouts were failed over: {seen:?}"
        );
        seen
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_one_backend_under_load_loses_nothing() {
    kill_one_backend_under_load(true).await;
}

/// Without a checkout check the dead backend's idle clients are handed out and fail
/// after the request was written: only a policy that retries any error saves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_one_backend_without_checkout_check_loses_nothing() {
    let seen = kill_one_backend_under_load(false).await;
    assert!(
        seen.sent > 0,
        "requests failed after sending were failed over: {seen:?}"
    );
}

#[tokio::test]
async fn refused_backend_fails_over_with_default_policy() {
    const N: usize = 20;

    within(LIMIT, "fail over from a refused backend", async {
        let server = EchoServer::start().await;
        let (_refusing, refused) = refused_addr();
        let (pools, lb) = balancer(&[server.addr(), refused], 2);
        let mut lb = lb.failover(Failover::new());
        let handle = lb.handle();

        for i in 0..N {
            let line = format!("request {i}");
            let reply = lb
                .ready()
                .await
                .expect("the balancer is ready")
                .call(line.clone())
                .await
                .unwrap_or_else(|e| panic!("{line} failed over to the live backend: {e:?}"));
            assert_eq!(reply, line);
        }

        let totals = handle.totals();
        let stats = handle.stats();
        println!("totals: {totals:#?}\nendpoints: {stats:#?}");
        let (live, dead) = (endpoint(&stats, 0), endpoint(&stats, 1));
        assert!(totals.retries > 0, "{totals:#?}");
        assert_eq!(totals.retries_refused, 0, "{totals:#?}");
        assert!(dead.errors > 0, "{dead:#?}");
        assert_eq!(
            dead.errors, dead.requests,
            "every attempt there failed: {dead:#?}"
        );
        assert_eq!(
            totals.retries, dead.errors,
            "each refused attempt was sent again: {totals:#?}"
        );
        assert_eq!(live.errors, 0, "{live:#?}");
        assert_eq!(successes(live), N as u64, "{live:#?}");
        assert_eq!(pools[1].stats().total, 0, "{:#?}", pools[1].stats());
        check_invariants(&pools[0].stats());
    })
    .await;
}

#[tokio::test]
async fn without_failover_a_dead_backend_fails_requests() {
    const N: usize = 20;

    within(LIMIT, "no failover from a refused backend", async {
        let server = EchoServer::start().await;
        let (_refusing, refused) = refused_addr();
        let (_pools, mut lb) = balancer(&[server.addr(), refused], 2);
        let handle = lb.handle();

        let mut failed = 0u64;
        for i in 0..N {
            let line = format!("request {i}");
            match lb
                .ready()
                .await
                .expect("the balancer is ready")
                .call(line.clone())
                .await
            {
                Ok(reply) => assert_eq!(reply, line),
                Err(e) => {
                    failed += 1;
                    assert!(is_not_sent(&*e), "a refused connect is not sent: {e:?}");
                    let pool_err = find::<PoolError>(&*e)
                        .unwrap_or_else(|| panic!("the pool's error is in the chain: {e:?}"));
                    assert!(pool_err.is_connect(), "{pool_err:?}");
                }
            }
        }

        let totals = handle.totals();
        let stats = handle.stats();
        println!("totals: {totals:#?}\nendpoints: {stats:#?}");
        let (live, dead) = (endpoint(&stats, 0), endpoint(&stats, 1));
        assert!(failed > 0, "some requests went to the refused backend");
        assert!(failed < N as u64, "some went to the live one");
        assert_eq!(dead.errors, failed, "{dead:#?}");
        assert_eq!(successes(live), N as u64 - failed, "{live:#?}");
        assert_eq!(totals.retries, 0, "{totals:#?}");
        assert_eq!(totals.retries_refused, 0, "{totals:#?}");
    })
    .await;
}

#[tokio::test]
async fn budget_bounds_retries_in_full_outage() {
    const N: u64 = 50;
    const RATIO: f64 = 0.2;

    within(LIMIT, "full outage", async {
        let (_a, refused_a) = refused_addr();
        let (_b, refused_b) = refused_addr();
        let (_pools, lb) = balancer(&[refused_a, refused_b], 2);
        // No floor: only a share of the requests may be retried.
        let budget = RetryBudget::new(Duration::from_secs(10), 0, RATIO);
        let mut lb = lb.failover(Failover::new().budget(budget));
        let handle = lb.handle();

        for i in 0..N {
            let e = lb
                .ready()
                .await
                .expect("the balancer is ready")
                .call(format!("request {i}"))
                .await
                .expect_err("every backend refuses");
            assert!(is_not_sent(&*e), "{e:?}");
            assert!(
                find::<PoolError>(&*e).is_some_and(PoolError::is_connect),
                "{e:?}"
            );
        }

        let totals = handle.totals();
        println!("totals: {totals:#?}\nendpoints: {:#?}", handle.stats());
        let bound = (RATIO * N as f64).ceil() as u64;
        assert!(totals.retries > 0, "the budget allowed some: {totals:#?}");
        assert!(
            totals.retries <= bound,
            "at most {bound} retries: {totals:#?}"
        );
        assert!(totals.retries_refused > 0, "{totals:#?}");
        // With two endpoints each request has one other to try: it is either retried
        // or refused by the budget.
        assert_eq!(totals.retries + totals.retries_refused, N, "{totals:#?}");
        assert_eq!(totals.requests, N + totals.retries, "{totals:#?}");
        assert_eq!(totals.errors, totals.requests, "{totals:#?}");
    })
    .await;
}
