//! The hyper and tonic examples, run in their short mode, with their summaries checked.

use std::time::Duration;

use examples::{hyper_demo, tonic_demo};
use marina::health::Status;

/// Generous: a short run takes well under a second.
const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_client_sessions_stick_and_the_greedy_user_is_limited() {
    let s = tokio::time::timeout(LIMIT, hyper_demo::run(true))
        .await
        .expect("the demo finishes")
        .expect("the demo runs");
    println!("{s}");
    let o = s.options;
    let (normal, greedy) = s.users.split_at(o.users);
    let greedy = &greedy[0];
    assert_eq!(greedy.name, "greedy");

    // Nothing failed; every request was answered or refused by the rate limit.
    assert_eq!(s.failed, 0);
    assert_eq!(
        s.ok + s.rate_limited,
        (o.users * o.requests_per_user + o.greedy_requests) as u64
    );
    assert_eq!(s.limiter, (s.ok, s.rate_limited));
    // The balancer's counts agree with who answered.
    assert_eq!(s.balancer_requests, s.per_backend);

    // Well-behaved users stay under their limit: every request answered.
    for u in normal {
        assert_eq!(u.rate_limited, 0, "{u:?}");
        assert_eq!(u.backends.len(), o.requests_per_user, "{u:?}");
    }
    // The greedy user gets its burst, then refusals (40 requests back to back would
    // have to take 1.5 s to stay under 20/s with a burst of 10).
    assert!(greedy.backends.len() >= o.burst as usize, "{greedy:?}");
    assert!(greedy.rate_limited > 0, "{greedy:?}");
    assert_eq!(s.rate_limited, greedy.rate_limited);

    // One token per user, on its first response; then every request sticks.
    for u in &s.users {
        assert_eq!(u.tokens, 1, "{u:?}");
        assert!(u.stuck(), "{u:?} moved between backends");
    }
    assert_eq!(s.stuck_users(), s.users.len());
    assert_eq!(s.sessions_created, s.users.len() as u64);
    assert_eq!(s.sessions_repinned, 0);

    // New sessions are spread by round robin: the users do not all share one backend.
    let mut first: Vec<usize> = s.users.iter().map(|u| u.backends[0]).collect();
    first.sort_unstable();
    first.dedup();
    assert!(first.len() >= 2, "every session landed on {first:?}");

    // Pooled connections were reused: far fewer connects than requests.
    let connects: u64 = s.connections.iter().sum();
    assert!(
        connects >= 1 && connects < s.ok,
        "{connects} connects for {} requests",
        s.ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_balances_and_the_probe_ejects_a_not_serving_server() {
    let s = tokio::time::timeout(LIMIT, tonic_demo::run(true))
        .await
        .expect("the demo finishes")
        .expect("the demo runs");
    println!("{s}");
    let o = s.options;

    // Before: every server answers SERVING, round robin spreads the checks.
    assert_eq!(s.before.failed, 0);
    assert_eq!(s.before.not_serving, 0);
    assert!(
        s.before.per_backend.iter().all(|&n| n > 0),
        "{:?}",
        s.before
    );
    assert_eq!(s.before.per_backend.iter().sum::<u64>(), s.before.replies());
    // Only the greedy user went over its limit: its burst, then refusals.
    assert!(s.greedy.serving >= u64::from(o.burst), "{:?}", s.greedy);
    assert!(s.greedy.rate_limited > 0, "{:?}", s.greedy);
    assert_eq!(s.before.rate_limited, s.greedy.rate_limited);
    assert_eq!(
        s.before.replies() - s.greedy.replies(),
        (o.users * o.requests_per_phase) as u64
    );

    // Server 2 went NOT_SERVING: the gRPC probe ejected it.
    assert!(s.ejected_after.is_some(), "server 2 was not ejected");
    assert!(
        matches!(s.statuses[2], Status::Ejected { .. }),
        "{:?}",
        s.statuses
    );
    assert!(
        s.statuses[0].is_ready() && s.statuses[1].is_ready(),
        "{:?}",
        s.statuses
    );

    // After: every check answered, by servers 0 and 1; none reaches server 2 (its
    // health check shares the balancer's gate, so the probe's ejection takes it out of
    // the ready set at once).
    assert_eq!(s.after.failed, 0);
    assert_eq!(s.after.rate_limited, 0);
    assert_eq!(s.after.replies(), (o.users * o.requests_per_phase) as u64);
    assert_eq!(s.after.per_backend[2], 0, "{:?}", s.after);
    assert_eq!(s.after.not_serving, s.after.per_backend[2]);
    assert!(
        s.after.per_backend[0] > 0 && s.after.per_backend[1] > 0,
        "{:?}",
        s.after
    );

    // The limiter and the balancer saw the same traffic.
    let replies = s.before.replies() + s.after.replies();
    assert_eq!(s.limiter, (replies, s.before.rate_limited));
    assert_eq!(s.balancer_requests.iter().sum::<u64>(), replies);
}
