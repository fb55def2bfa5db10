//! Tests of the sticky table through `AffinityLayer::sticky` over a round-robin
//! `marina_balance::Balance` of in-memory endpoints.
//!
//! - **Stickiness**: every request of a session reaches the endpoint its first one did;
//!   new sessions spread over the endpoints; the handle's stats, listing
//!   (`sessions(limit)`: bounded, most recently used first, with ages, idle times and
//!   request counts), `pinned` and `end_session`.
//! - **Idle expiry** (paused tokio time): a session idle past `idle_timeout` is forgotten
//!   when looked up (and counted as expired); the background sweep forgets idle sessions
//!   without lookups; sessions in use are refreshed and survive; `sweep()` by hand.
//! - **Full table**: it holds exactly `max_sessions`; `WhenFull::PurgeOldest` then
//!   forgets the least recently used session of the new key's shard (exactly, with keys
//!   in one shard; and, black box, a session in use is never the one purged);
//!   `WhenFull::Refuse` fails the new session's request with `SessionTableFull` while
//!   existing sessions carry on.
//!
//! The capacity bound under a million keys is in `capacity.rs`, the table's memory in
//! `memory.rs`.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use marina_affinity::{AffinityLayer, SessionTableFull, TableConfig, WhenFull};
use support::{balance, ids_by_position, key_of, send, served_by};
use tower::Layer;

fn session(i: usize) -> String {
    format!("session-{i}")
}

#[tokio::test]
async fn each_session_stays_on_one_endpoint() {
    let (lb, lb_handle) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // Five rounds over 100 sessions, interleaved: each session's requests are spread
    // among the others'.
    let mut seen: HashMap<String, HashSet<usize>> = HashMap::new();
    for _round in 0..5 {
        for i in 0..100 {
            let key = session(i);
            let ep = served_by(&mut svc, &key).await;
            seen.entry(key).or_default().insert(ep);
        }
    }
    for (key, eps) in &seen {
        assert_eq!(eps.len(), 1, "{key} reached several endpoints: {eps:?}");
    }
    // Round robin places the new sessions: 34, 33, 33.
    let mut per_endpoint = [0usize; 3];
    for eps in seen.values() {
        per_endpoint[*eps.iter().next().unwrap()] += 1;
    }
    assert!(
        per_endpoint.iter().all(|&n| n >= 30),
        "sessions per endpoint: {per_endpoint:?}"
    );

    let stats = handle.stats();
    assert_eq!(stats.sessions, 100);
    assert_eq!(stats.created, 100);
    assert_eq!(
        (stats.repinned, stats.expired, stats.purged, stats.refused),
        (0, 0, 0, 0)
    );
    assert_eq!(stats.rejected_tokens, 0);

    // The listing: bounded, and every session made 5 requests on its endpoint.
    let ids = ids_by_position(&lb_handle);
    assert_eq!(handle.sessions(10).len(), 10);
    assert!(handle.sessions(0).is_empty());
    let all = handle.sessions(1000);
    assert_eq!(all.len(), 100);
    for info in &all {
        assert_eq!(info.requests, 5, "{info:?}");
        let ep = *seen[&info.key].iter().next().unwrap();
        assert_eq!(info.endpoint, ids[&ep], "{info:?}");
    }
    let keys: HashSet<_> = all.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys.len(), 100);

    // `pinned` names the endpoint that served the session.
    for (key, eps) in &seen {
        let ep = *eps.iter().next().unwrap();
        assert_eq!(handle.pinned(key), Some(ids[&ep]));
    }
    assert_eq!(handle.pinned("no such session"), None);
}

#[tokio::test(start_paused = true)]
async fn sessions_are_listed_most_recently_used_first() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // Session i starts at second i.
    for i in 0..20 {
        served_by(&mut svc, &session(i)).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // Now: second 20.
    let top = handle.sessions(5);
    let keys: Vec<_> = top.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "session-19",
            "session-18",
            "session-17",
            "session-16",
            "session-15"
        ]
    );
    for (n, info) in top.iter().enumerate() {
        assert_eq!(info.idle, Duration::from_secs(n as u64 + 1), "{info:?}");
        assert_eq!(info.age, info.idle, "{info:?}");
        assert_eq!(info.requests, 1);
    }

    // A request moves a session to the front; its age keeps counting from its start.
    served_by(&mut svc, &session(3)).await;
    let first = &handle.sessions(1)[0];
    assert_eq!(first.key, "session-3");
    assert_eq!(first.idle, Duration::ZERO);
    assert_eq!(first.age, Duration::from_secs(17));
    assert_eq!(first.requests, 2);
    assert_eq!(handle.sessions(2)[1].key, "session-19");
}

#[tokio::test]
async fn end_session_forgets_the_session() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    for i in 0..3 {
        served_by(&mut svc, &session(i)).await;
    }
    assert_eq!(handle.stats().sessions, 3);
    assert!(handle.end_session("session-1"));
    assert!(!handle.end_session("session-1"), "ended twice");
    assert!(!handle.end_session("never existed"));
    assert_eq!(handle.stats().sessions, 2);
    assert_eq!(handle.pinned("session-1"), None);
    assert!(handle.sessions(10).iter().all(|s| s.key != "session-1"));

    // Its next request starts a new session; the others are untouched.
    served_by(&mut svc, "session-1").await;
    let stats = handle.stats();
    assert_eq!((stats.sessions, stats.created), (3, 4));
    assert_eq!((stats.expired, stats.purged), (0, 0));
}

#[tokio::test]
async fn keyless_requests_create_no_session() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // Round robin as usual, and nothing pinned.
    let mut eps = Vec::new();
    for _ in 0..6 {
        let resp = send(&mut svc, None).await.unwrap();
        assert!(
            resp.extensions
                .get::<marina_affinity::NewSession>()
                .is_none()
        );
        eps.push(resp.body);
    }
    let first: HashSet<_> = eps[..3].iter().copied().collect();
    assert_eq!(first.len(), 3, "each endpoint in turn: {eps:?}");
    assert_eq!(eps[..3], eps[3..], "{eps:?}");
    assert_eq!(handle.stats().sessions, 0);
    assert_eq!(handle.stats().created, 0);
}

#[tokio::test]
async fn overlong_keys_are_treated_as_absent() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::default());
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let long = "k".repeat(marina_core::MAX_KEY_LEN + 1);
    let mut eps = HashSet::new();
    for _ in 0..3 {
        eps.insert(served_by(&mut svc, &long).await);
    }
    assert_eq!(
        eps.len(),
        3,
        "an over-long key must not pin (round robin moves on)"
    );
    assert_eq!(handle.stats().sessions, 0);

    // The longest allowed key is a session key.
    let longest = "k".repeat(marina_core::MAX_KEY_LEN);
    let first = served_by(&mut svc, &longest).await;
    for _ in 0..3 {
        assert_eq!(served_by(&mut svc, &longest).await, first);
    }
    assert_eq!(handle.stats().sessions, 1);
}

// ---------------------------------------------------------------------------------------
// Idle expiry
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn idle_session_expires_on_lookup() {
    let (lb, _) = balance(3);
    // A sweep far away: only lookups expire sessions here.
    let config = TableConfig::default()
        .idle_timeout(Duration::from_secs(60))
        .sweep_interval(Duration::from_secs(24 * 3600));
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    served_by(&mut svc, "a").await;
    served_by(&mut svc, "b").await;
    tokio::time::advance(Duration::from_secs(59)).await;
    // Still alive at 59 s (and refreshed by this request).
    served_by(&mut svc, "a").await;
    assert_eq!(handle.stats().expired, 0);

    tokio::time::advance(Duration::from_secs(2)).await;
    // 61 s: "b" is idle past the timeout, "a" is not (2 s).
    assert_eq!(handle.stats().sessions, 2, "no sweep ran: both still held");
    served_by(&mut svc, "b").await;
    let stats = handle.stats();
    assert_eq!(stats.expired, 1);
    assert_eq!(stats.created, 3, "the expired session was pinned anew");
    assert_eq!(stats.sessions, 2);
    let b = handle
        .sessions(10)
        .into_iter()
        .find(|s| s.key == "b")
        .unwrap();
    assert_eq!(b.age, Duration::ZERO, "a new session: {b:?}");
    assert_eq!(b.requests, 1);

    // `pinned` looks up too: "a" expires when asked after its timeout.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(handle.pinned("a"), None);
    assert_eq!(handle.stats().expired, 2);
}

/// A session is not forgotten before it has been idle for the whole timeout.
#[tokio::test(start_paused = true)]
async fn sessions_are_not_forgotten_early() {
    let (lb, _) = balance(3);
    let config = TableConfig::default()
        .idle_timeout(Duration::from_secs(10))
        .sweep_interval(Duration::from_secs(24 * 3600));
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    tokio::time::advance(Duration::from_millis(900)).await;
    served_by(&mut svc, "s").await;
    tokio::time::advance(Duration::from_millis(9200)).await;
    // 9.2 s idle, under the 10 s timeout.
    served_by(&mut svc, "s").await;
    assert_eq!(handle.stats().expired, 0);
    assert_eq!(handle.stats().created, 1);
}

#[tokio::test(start_paused = true)]
async fn background_sweep_forgets_idle_sessions() {
    let (lb, _) = balance(3);
    let config = TableConfig::default()
        .idle_timeout(Duration::from_secs(60))
        .sweep_interval(Duration::from_secs(10));
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    for i in 0..5 {
        served_by(&mut svc, &session(i)).await;
    }
    // The sweep runs every 10 s (the runtime advances the paused clock to each tick).
    tokio::time::sleep(Duration::from_secs(55)).await;
    assert_eq!(handle.stats().sessions, 5);
    assert_eq!(handle.stats().expired, 0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // 65 s: the sweep at 60 s dropped them all, with no lookup.
    let stats = handle.stats();
    assert_eq!(stats.sessions, 0);
    assert_eq!(stats.expired, 5);
    assert!(handle.sessions(10).is_empty());
}

#[tokio::test(start_paused = true)]
async fn sessions_in_use_survive_the_sweep() {
    let (lb, _) = balance(3);
    let config = TableConfig::default()
        .idle_timeout(Duration::from_secs(60))
        .sweep_interval(Duration::from_secs(10));
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let busy = served_by(&mut svc, "busy").await;
    served_by(&mut svc, "quiet").await;
    // Five minutes, "busy" making a request every 30 s.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(served_by(&mut svc, "busy").await, busy);
    }
    let stats = handle.stats();
    assert_eq!(stats.sessions, 1);
    assert_eq!(stats.expired, 1, "\"quiet\" went");
    assert_eq!(stats.created, 2, "\"busy\" was never re-created");
    let info = &handle.sessions(10)[0];
    assert_eq!(info.key, "busy");
    assert_eq!(info.requests, 11);
    assert_eq!(info.age, Duration::from_secs(300));
}

#[tokio::test(start_paused = true)]
async fn sweep_by_hand() {
    let (lb, _) = balance(3);
    let config = TableConfig::default()
        .idle_timeout(Duration::from_secs(60))
        .sweep_interval(Duration::from_secs(24 * 3600));
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    for i in 0..4 {
        served_by(&mut svc, &session(i)).await;
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    served_by(&mut svc, "session-0").await;
    assert_eq!(handle.sweep(), 0, "nothing idle for 60 s yet");
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(handle.sweep(), 3, "all but the one used at 30 s");
    assert_eq!(handle.stats().sessions, 1);
    assert_eq!(handle.stats().expired, 3);
    assert_eq!(handle.sessions(10)[0].key, "session-0");
}

// ---------------------------------------------------------------------------------------
// Full table
// ---------------------------------------------------------------------------------------

/// A full table purges one session per new session, and only once it is full.
#[tokio::test]
async fn purge_waits_until_the_table_is_full() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::with_capacity(100));
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    for i in 0..100 {
        served_by(&mut svc, &session(i)).await;
    }
    let stats = handle.stats();
    assert_eq!((stats.sessions, stats.purged), (100, 0), "room for 100");
    for extra in 1..=10 {
        served_by(&mut svc, &format!("extra-{extra}")).await;
        let stats = handle.stats();
        assert_eq!((stats.sessions, stats.purged), (100, extra));
    }
    // Ending sessions makes room again: no purge until the table is full once more.
    for i in 0..100 {
        handle.end_session(&session(i));
    }
    let left = handle.stats().sessions;
    assert!(left <= 10);
    for i in 0..(100 - left) {
        served_by(&mut svc, &format!("again-{i}")).await;
    }
    assert_eq!(handle.stats().sessions, 100);
    assert_eq!(handle.stats().purged, 10);
}

/// Keys that fall in the same shard of a table of at least 16 sessions (16 shards),
/// chosen the way the table does: `stable_hash(key) % 16` (white box: the table
/// purges the least recently used session of the new key's shard, which approximates
/// the table-wide LRU, so an exact test has to keep to one shard).
fn keys_in_one_shard(n: usize) -> Vec<String> {
    let shard = |k: &str| marina_core::stable_hash(k) % 16;
    let target = shard("k0");
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| shard(k) == target)
        .take(n)
        .collect()
}

/// The least recently used session of the shard goes, whichever was created first.
#[tokio::test]
async fn purge_oldest_forgets_the_least_recently_used() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::with_capacity(16));
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    // A full table, all its sessions in one shard, created k[0] first.
    let keys = keys_in_one_shard(18);
    for key in &keys[..16] {
        served_by(&mut svc, key).await;
    }
    assert_eq!((handle.stats().sessions, handle.stats().purged), (16, 0));
    // The oldest is used again: the least recently used is now k[1].
    let k0 = served_by(&mut svc, &keys[0]).await;
    served_by(&mut svc, &keys[16]).await;
    let stats = handle.stats();
    assert_eq!((stats.sessions, stats.purged), (16, 1));
    assert!(
        handle.pinned(&keys[1]).is_none(),
        "{} should be gone",
        keys[1]
    );
    // (`pinned` touches: check the next victim last.)
    served_by(&mut svc, &keys[17]).await;
    assert!(handle.sessions(100).iter().all(|s| s.key != keys[2]));
    assert_eq!(served_by(&mut svc, &keys[0]).await, k0, "k0 was kept");
    assert_eq!(handle.stats().created, 18);
}

/// The same rule, seen in a way that holds whether the least recently used session is
/// chosen over the whole table or within a part of it: a session used between every
/// new one is never purged, the untouched old ones are.
#[tokio::test]
async fn purge_oldest_keeps_a_session_in_use() {
    let (lb, lb_handle) = balance(3);
    let layer = AffinityLayer::sticky(key_of, TableConfig::with_capacity(100));
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let kept = served_by(&mut svc, "kept").await;
    served_by(&mut svc, "old").await;
    for i in 0..2000 {
        served_by(&mut svc, &session(i)).await;
        assert_eq!(served_by(&mut svc, "kept").await, kept);
    }
    let stats = handle.stats();
    assert!(stats.sessions <= 100, "{stats:?}");
    assert_eq!(stats.created, 2002);
    assert_eq!(stats.purged, stats.created - stats.sessions as u64);
    assert_eq!(stats.repinned, 0);
    let ids = ids_by_position(&lb_handle);
    assert_eq!(handle.pinned("kept"), Some(ids[&kept]));
    assert_eq!(
        handle.pinned("old"),
        None,
        "the untouched oldest session went"
    );
    assert_eq!(handle.pinned("session-0"), None);
    assert!(handle.pinned("session-1999").is_some(), "the newest stays");
}

#[tokio::test]
async fn refuse_fails_new_sessions_and_keeps_the_old() {
    let (lb, _) = balance(3);
    // One session of room (a one-shard table, whatever the sharding).
    let config = TableConfig::with_capacity(1).when_full(WhenFull::Refuse);
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let a = served_by(&mut svc, "a").await;
    for _ in 0..2 {
        let err = send(&mut svc, Some("b")).await.unwrap_err();
        let full = err
            .downcast_ref::<SessionTableFull>()
            .unwrap_or_else(|| panic!("not SessionTableFull: {err}"));
        assert_eq!(full.max_sessions, 1);
        assert!(err.to_string().contains("session table full"), "{err}");
    }
    // The existing session carries on, where it was.
    for _ in 0..3 {
        assert_eq!(served_by(&mut svc, "a").await, a);
    }
    let stats = handle.stats();
    assert_eq!((stats.sessions, stats.created), (1, 1));
    assert_eq!(stats.refused, 2);
    assert_eq!(stats.purged, 0);
    assert_eq!(handle.pinned("b"), None);

    // Key-less requests still go through (they ask for no session).
    send(&mut svc, None).await.unwrap();
    // Ending the session makes room.
    assert!(handle.end_session("a"));
    served_by(&mut svc, "b").await;
    assert_eq!(handle.stats().sessions, 1);
    assert_eq!(handle.stats().refused, 2);
}

/// A table set to refuse takes `max_sessions` sessions before it refuses one.
#[tokio::test]
async fn refuse_takes_max_sessions_first() {
    let (lb, _) = balance(3);
    let config = TableConfig::with_capacity(1000).when_full(WhenFull::Refuse);
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    for i in 0..1000 {
        if let Err(e) = send(&mut svc, Some(&session(i))).await {
            panic!(
                "session {i} refused with {} held: {e}",
                handle.stats().sessions
            );
        }
    }
    assert_eq!(handle.stats().sessions, 1000);
    let err = send(&mut svc, Some("one more")).await.unwrap_err();
    assert!(err.is::<SessionTableFull>());
}

#[tokio::test]
async fn refuse_counts_every_refused_request() {
    let (lb, _) = balance(3);
    let config = TableConfig::with_capacity(50).when_full(WhenFull::Refuse);
    let layer = AffinityLayer::sticky(key_of, config);
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let (mut ok, mut refused) = (0u64, 0u64);
    for i in 0..500 {
        match send(&mut svc, Some(&session(i))).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.is::<SessionTableFull>(), "{e}");
                refused += 1;
            }
        }
    }
    let stats = handle.stats();
    assert!(stats.sessions <= 50);
    assert_eq!(stats.sessions as u64, ok, "every accepted session is held");
    assert_eq!((stats.created, stats.refused), (ok, refused));
    assert_eq!(stats.purged, 0, "a refusing table never purges");
    assert!(refused >= 450);
}
