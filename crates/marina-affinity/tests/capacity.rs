//! The sticky table's bound under a flood of distinct session keys, through
//! `AffinityLayer::sticky` and a round-robin `Balance`: a table of 1,000 sessions fed a
//! million distinct keys never holds more than 1,000, counts every forgotten session as
//! purged, and keeps routing (its own test binary: the million requests take a few
//! seconds in a debug build).

mod support;

use marina_affinity::{AffinityLayer, TableConfig};
use support::{balance, served_by};
use tower::Layer;

/// Distinct keys sent (in a debug build this test takes a few seconds).
const KEYS: u64 = 1_000_000;
const CAPACITY: usize = 1000;

#[tokio::test]
async fn a_million_keys_stay_within_capacity() {
    let (lb, _) = balance(3);
    let layer = AffinityLayer::sticky(support::key_of, TableConfig::with_capacity(CAPACITY));
    let handle = layer.handle();
    let mut svc = layer.layer(lb);

    let mut served = [0u64; 3];
    for i in 0..KEYS {
        let key = format!("{i:016x}");
        served[served_by(&mut svc, &key).await] += 1;
        if i % 1000 == 999 {
            let stats = handle.stats();
            assert!(
                stats.sessions <= CAPACITY,
                "after {} keys: {stats:?}",
                i + 1
            );
        }
    }
    let stats = handle.stats();
    assert_eq!(stats.sessions, CAPACITY, "full at the end");
    assert_eq!(stats.created, KEYS);
    assert_eq!(stats.purged, KEYS - CAPACITY as u64);
    assert_eq!((stats.expired, stats.refused, stats.repinned), (0, 0, 0));
    assert!(handle.sessions(usize::MAX).len() == CAPACITY);
    // New sessions kept spreading over the endpoints (round robin).
    assert!(served.iter().all(|&n| n > KEYS / 4), "{served:?}");

    // The most recent sessions are the ones kept: the last key is held, the first not.
    assert!(handle.pinned(&format!("{:016x}", KEYS - 1)).is_some());
    assert!(handle.pinned(&format!("{:016x}", 0)).is_none());
}
