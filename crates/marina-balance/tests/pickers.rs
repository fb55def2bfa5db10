//! Property tests and plain tests for the pickers, through a small in-memory
//! [`Endpoints`] view.

use std::time::Duration;

use marina_balance::{
    ConsistentHash, Endpoints, LeastConnections, LeastResponseTime, Pick, PowerOfTwoChoices,
    Random, RoundRobin, SetChange, WeightedRoundRobin,
};
use marina_core::{EndpointId, RouteHint};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// The test view
// ---------------------------------------------------------------------------------------

/// One endpoint as the view reports it.
#[derive(Debug, Clone)]
struct Ep {
    id: EndpointId,
    weight: u32,
    load: f64,
    latency: Option<Duration>,
}

impl Ep {
    /// Endpoint number `n`: id hashed from `n`, weight 1, no load, no latency.
    fn new(n: u64) -> Self {
        Ep {
            id: EndpointId::of(&n),
            weight: 1,
            load: 0.0,
            latency: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct View(Vec<Ep>);

impl View {
    /// Endpoints numbered `0..n`.
    fn numbered(n: usize) -> Self {
        View((0..n as u64).map(Ep::new).collect())
    }

    /// Endpoints numbered `0..`, one per load.
    fn with_loads(loads: &[f64]) -> Self {
        View(
            loads
                .iter()
                .enumerate()
                .map(|(i, &load)| Ep {
                    load,
                    ..Ep::new(i as u64)
                })
                .collect(),
        )
    }

    /// Endpoints numbered `0..`, one per weight.
    fn with_weights(weights: &[u32]) -> Self {
        View(
            weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Ep {
                    weight,
                    ..Ep::new(i as u64)
                })
                .collect(),
        )
    }
}

impl Endpoints for View {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn id(&self, i: usize) -> EndpointId {
        self.0[i].id
    }

    fn weight(&self, i: usize) -> u32 {
        self.0[i].weight
    }

    fn load(&self, i: usize) -> f64 {
        self.0[i].load
    }

    fn latency(&self, i: usize) -> Option<Duration> {
        self.0[i].latency
    }
}

/// `cases` cases, unless `PROPTEST_CASES` says otherwise.
/// `view`, reporting `generation` (the lead's O(1) set-change check) when `Some`; the
/// test bumps it whenever it changes the set.
#[derive(Debug, Clone, Copy)]
struct Versioned<'a> {
    view: &'a View,
    generation: Option<u64>,
}

impl Endpoints for Versioned<'_> {
    fn len(&self) -> usize {
        self.view.len()
    }

    fn id(&self, i: usize) -> EndpointId {
        self.view.id(i)
    }

    fn weight(&self, i: usize) -> u32 {
        self.view.weight(i)
    }

    fn load(&self, i: usize) -> f64 {
        self.view.load(i)
    }

    fn latency(&self, i: usize) -> Option<Duration> {
        self.view.latency(i)
    }

    fn generation(&self) -> Option<u64> {
        self.generation
    }
}

/// `view` at generation `g`, or without generations.
fn versioned(view: &View, with_generation: bool, g: u64) -> Versioned<'_> {
    Versioned {
        view,
        generation: with_generation.then_some(g),
    }
}

fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        // Keep failures in the report only: no regression files next to the tests.
        failure_persistence: None,
        ..default
    }
}

fn picks(p: &mut impl Pick, view: &dyn Endpoints, n: usize) -> Vec<usize> {
    (0..n).map(|_| p.pick(view, None)).collect()
}

fn counts(seq: &[usize], n: usize) -> Vec<u64> {
    let mut c = vec![0u64; n];
    for &i in seq {
        c[i] += 1;
    }
    c
}

/// The longest run of one index in `seq`, per index.
fn max_runs(seq: &[usize], n: usize) -> Vec<usize> {
    let mut best = vec![0usize; n];
    let mut run = 0;
    for (k, &i) in seq.iter().enumerate() {
        run = if k > 0 && seq[k - 1] == i { run + 1 } else { 1 };
        best[i] = best[i].max(run);
    }
    best
}

/// Checks that every window of `weights.iter().sum()` consecutive picks in `seq` holds each
/// index exactly its weight times; returns the first offending window (start, counts).
fn first_inexact_window(seq: &[usize], weights: &[u32]) -> Option<(usize, Vec<u64>)> {
    let total: usize = weights.iter().map(|&w| w as usize).sum();
    let want: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
    let mut c = counts(&seq[..total], weights.len());
    for start in 0..=seq.len() - total {
        if start > 0 {
            c[seq[start - 1]] -= 1;
            c[seq[start + total - 1]] += 1;
        }
        if c != want {
            return Some((start, c));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// 1. RoundRobin
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn round_robin_exact_cycles(n in 1usize..=16, k in 1usize..=8) {
        let view = View::numbered(n);
        let mut rr = RoundRobin::new();
        let seq = picks(&mut rr, &view, k * n);
        let want: Vec<usize> = (0..k * n).map(|i| i % n).collect();
        prop_assert_eq!(&seq, &want);
        prop_assert!(counts(&seq, n).iter().all(|&c| c == k as u64));
    }

    #[test]
    fn round_robin_survives_resizing(
        phases in prop::collection::vec((1usize..=16, 1usize..=40), 1..20),
    ) {
        let mut rr = RoundRobin::new();
        for (n, len) in phases {
            let view = View::numbered(n);
            let seq = picks(&mut rr, &view, len);
            prop_assert!(seq.iter().all(|&i| i < n), "n = {}, picks = {:?}", n, seq);
            // Under a fixed size, picks go in turn: every n consecutive picks cover all.
            for w in seq.windows(2) {
                prop_assert_eq!(w[1], (w[0] + 1) % n);
            }
            for w in seq.windows(n) {
                prop_assert!(counts(w, n).iter().all(|&c| c == 1));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. WeightedRoundRobin (smooth, nginx)
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn smooth_wrr_every_window_is_exact(weights in prop::collection::vec(1u32..=10, 1..=8)) {
        let view = View::with_weights(&weights);
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        let mut wrr = WeightedRoundRobin::new();
        let seq = picks(&mut wrr, &view, 4 * total);
        prop_assert!(seq.iter().all(|&i| i < weights.len()));
        let bad = first_inexact_window(&seq, &weights);
        prop_assert!(bad.is_none(), "window (start, counts) {:?}, seq {:?}", bad, seq);
        // Smoothness: a run of one endpoint never exceeds its weight (implied by the
        // window exactness, checked anyway).
        // (With one endpoint the run is the whole sequence.)
        prop_assume!(weights.len() > 1);
        let runs = max_runs(&seq, weights.len());
        for (i, (&run, &w)) in runs.iter().zip(&weights).enumerate() {
            prop_assert!(run <= w as usize, "index {} ran {} > weight {}", i, run, w);
        }
    }

    #[test]
    fn smooth_wrr_resettles_after_removal(
        weights in prop::collection::vec(1u32..=10, 2..=8),
        removed in any::<prop::sample::Index>(),
        warmup in any::<prop::sample::Index>(),
    ) {
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        let mut view = View::with_weights(&weights);
        let mut wrr = WeightedRoundRobin::new();
        // Arbitrary phase within the first cycle before the removal.
        let _ = picks(&mut wrr, &view, warmup.index(total));
        let r = removed.index(weights.len());
        view.0.remove(r);
        let mut rest = weights.clone();
        rest.remove(r);
        let rest_total: usize = rest.iter().map(|&w| w as usize).sum();
        // One full window to resettle, then exact proportions in every window.
        let _ = picks(&mut wrr, &view, rest_total);
        let seq = picks(&mut wrr, &view, 4 * rest_total);
        let bad = first_inexact_window(&seq, &rest);
        prop_assert!(
            bad.is_none(),
            "weights {:?}, removed index {}, remaining {:?}: window (start, counts) {:?}, seq {:?}",
            weights, r, rest, bad, seq
        );
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn smooth_wrr_resettles_after_addition(
        weights in prop::collection::vec(1u32..=10, 1..=7),
        added in 1u32..=10,
        at in any::<prop::sample::Index>(),
        warmup in any::<prop::sample::Index>(),
    ) {
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        let mut view = View::with_weights(&weights);
        let mut wrr = WeightedRoundRobin::new();
        let _ = picks(&mut wrr, &view, warmup.index(total));
        let pos = at.index(weights.len() + 1);
        view.0.insert(pos, Ep { weight: added, ..Ep::new(1_000) });
        let mut now = weights.clone();
        now.insert(pos, added);
        let now_total: usize = now.iter().map(|&w| w as usize).sum();
        let _ = picks(&mut wrr, &view, now_total);
        let seq = picks(&mut wrr, &view, 4 * now_total);
        let bad = first_inexact_window(&seq, &now);
        prop_assert!(
            bad.is_none(),
            "weights {:?} + {} at {}: window (start, counts) {:?}, seq {:?}",
            weights, added, pos, bad, seq
        );
    }
}

/// A change to the endpoint set.
#[derive(Debug, Clone)]
enum Change {
    /// Insert a new endpoint with this weight here.
    Add(prop::sample::Index, u32),
    /// Remove this one (unless it is the last).
    Remove(prop::sample::Index),
    /// Swap this one for a new endpoint with this weight: same length, new id.
    Replace(prop::sample::Index, u32),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u32..=10).prop_map(|(i, w)| Change::Add(i, w)),
        any::<prop::sample::Index>().prop_map(Change::Remove),
        (any::<prop::sample::Index>(), 1u32..=10).prop_map(|(i, w)| Change::Replace(i, w)),
    ]
}

/// Applies `c` to `view`; new endpoints are numbered from `*next`.
fn apply(view: &mut View, c: &Change, next: &mut u64) {
    let n = view.0.len();
    let fresh = |weight: u32, next: &mut u64| {
        *next += 1;
        Ep {
            weight,
            ..Ep::new(*next)
        }
    };
    match c {
        Change::Add(at, w) => view.0.insert(at.index(n + 1), fresh(*w, next)),
        Change::Remove(at) if n > 1 => {
            view.0.remove(at.index(n));
        }
        Change::Remove(_) => {}
        Change::Replace(at, w) => view.0[at.index(n)] = fresh(*w, next),
    }
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn smooth_wrr_follows_set_changes(
        weights in prop::collection::vec(1u32..=10, 1..=6),
        changes in prop::collection::vec((change(), 0usize..20), 1..8),
        with_generation in any::<bool>(),
    ) {
        let mut view = View::with_weights(&weights);
        let mut next = 1_000;
        let mut wrr = WeightedRoundRobin::new();
        let _ = picks(&mut wrr, &versioned(&view, with_generation, 0), 3);
        for (g, (c, gap)) in changes.iter().enumerate() {
            apply(&mut view, c, &mut next);
            let v = versioned(&view, with_generation, g as u64 + 1);
            let now: Vec<u32> = view.0.iter().map(|e| e.weight).collect();
            let total: usize = now.iter().map(|&w| w as usize).sum();
            let _ = picks(&mut wrr, &v, total);
            let seq = picks(&mut wrr, &v, 3 * total);
            let bad = first_inexact_window(&seq, &now);
            prop_assert!(
                bad.is_none(),
                "after {:?} (weights now {:?}): window (start, counts) {:?}, seq {:?}",
                c, now, bad, seq
            );
            let _ = picks(&mut wrr, &v, *gap);
        }
    }
}

#[test]
fn smooth_wrr_resettles_after_removal_known_case() {
    // Weights 1, 1, 5: three picks (2, 2, 0) leave current weights [-4, 3, 1]. Dropping
    // the weight-5 endpoint keeps [-4, 3] for the survivors, so the pair starts far
    // from nginx's steady state and index 1 runs ahead for more than one window:
    // 1, 1 | 1, 1, 0, 1, 0, 1, ...
    let mut view = View::with_weights(&[1, 1, 5]);
    let mut wrr = WeightedRoundRobin::new();
    assert_eq!(picks(&mut wrr, &view, 3), [2, 2, 0]);
    view.0.remove(2);
    let _ = picks(&mut wrr, &view, 2); // one window to resettle
    let seq = picks(&mut wrr, &view, 8);
    let bad = first_inexact_window(&seq, &[1, 1]);
    assert!(bad.is_none(), "window (start, counts) {bad:?}, seq {seq:?}");
}

#[test]
fn smooth_wrr_known_sequence() {
    // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    let view = View::with_weights(&[5, 1, 1]);
    let mut wrr = WeightedRoundRobin::new();
    assert_eq!(picks(&mut wrr, &view, 7), [0, 0, 1, 0, 2, 0, 0]);
}

// ---------------------------------------------------------------------------------------
// 3. LeastConnections
// ---------------------------------------------------------------------------------------

fn small_loads(max_len: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec((0u8..=5).prop_map(f64::from), 1..=max_len)
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn least_connections_never_picks_a_busier_one(
        rounds in prop::collection::vec(small_loads(12), 1..30),
    ) {
        let mut lc = LeastConnections::new();
        for loads in rounds {
            let view = View::with_loads(&loads);
            let i = lc.pick(&view, None);
            prop_assert!(i < loads.len());
            let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
            prop_assert!(loads[i] <= min, "picked {} (load {}) from {:?}", i, loads[i], loads);
        }
    }

    #[test]
    fn least_connections_ties_rotate(loads in small_loads(12), skip in 0usize..30) {
        let n = loads.len();
        let view = View::with_loads(&loads);
        let mut lc = LeastConnections::new();
        let _ = picks(&mut lc, &view, skip);
        let seq = picks(&mut lc, &view, 3 * n);
        let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
        prop_assert!(seq.iter().all(|&i| loads[i] <= min));
        // Every window of n picks reaches every tied endpoint.
        for w in seq.windows(n) {
            for (i, &l) in loads.iter().enumerate() {
                if l == min {
                    prop_assert!(w.contains(&i), "tied {} missing from {:?} ({:?})", i, w, loads);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. LeastResponseTime
// ---------------------------------------------------------------------------------------

fn lrt_endpoint() -> impl Strategy<Value = (f64, Option<u64>)> {
    (
        (0u8..=5).prop_map(f64::from),
        prop::option::of(prop::sample::select(vec![1u64, 2, 3, 5, 10, 20])),
    )
}

fn lrt_view(eps: &[(f64, Option<u64>)]) -> View {
    View(
        eps.iter()
            .enumerate()
            .map(|(i, &(load, ms))| Ep {
                load,
                latency: ms.map(Duration::from_millis),
                ..Ep::new(i as u64)
            })
            .collect(),
    )
}

fn lrt_cost(view: &View, i: usize, default: Duration) -> f64 {
    let e = &view.0[i];
    e.latency.unwrap_or(default).as_secs_f64() * (e.load + 1.0)
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn least_response_time_never_picks_a_slower_one(
        rounds in prop::collection::vec(prop::collection::vec(lrt_endpoint(), 1..=12), 1..30),
        default_ms in prop::option::of(prop::sample::select(vec![1u64, 2, 5, 10])),
    ) {
        let mut lrt = LeastResponseTime::new();
        let default = match default_ms {
            Some(ms) => {
                lrt = lrt.default_latency(Duration::from_millis(ms));
                Duration::from_millis(ms)
            }
            // The documented default.
            None => Duration::from_millis(1),
        };
        for eps in rounds {
            let view = lrt_view(&eps);
            let i = lrt.pick(&view, None);
            prop_assert!(i < eps.len());
            let costs: Vec<f64> = (0..eps.len()).map(|j| lrt_cost(&view, j, default)).collect();
            let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
            prop_assert!(costs[i] <= min, "picked {} (cost {}) from {:?}", i, costs[i], costs);
        }
    }

    #[test]
    fn least_response_time_ties_rotate(eps in prop::collection::vec(lrt_endpoint(), 1..=12)) {
        let n = eps.len();
        let view = lrt_view(&eps);
        let default = Duration::from_millis(1);
        let costs: Vec<f64> = (0..n).map(|j| lrt_cost(&view, j, default)).collect();
        let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
        let mut lrt = LeastResponseTime::new();
        let seq = picks(&mut lrt, &view, 2 * n);
        for w in seq.windows(n) {
            for (i, &c) in costs.iter().enumerate() {
                if c == min {
                    prop_assert!(w.contains(&i), "tied {} missing from {:?} ({:?})", i, w, costs);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. PowerOfTwoChoices
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn p2c_with_two_always_takes_the_less_loaded(
        seed in any::<u64>(),
        low in 0u8..=10,
        extra in 1u8..=10,
        busy_first in any::<bool>(),
    ) {
        let (low, high) = (f64::from(low), f64::from(low + extra));
        let (loads, want) = if busy_first { ([high, low], 1) } else { ([low, high], 0) };
        let view = View::with_loads(&loads);
        let mut p2c = PowerOfTwoChoices::with_seed(seed);
        for k in 0..10_000 {
            let i = p2c.pick(&view, None);
            prop_assert_eq!(i, want, "pick {} with loads {:?}", k, loads);
        }
    }

    #[test]
    fn p2c_never_picks_the_strict_max(
        seed in any::<u64>(),
        loads in prop::collection::vec((0u8..=5).prop_map(f64::from), 2..=16),
        busiest in any::<prop::sample::Index>(),
    ) {
        let mut loads = loads;
        let b = busiest.index(loads.len());
        loads[b] = 6.0; // strictly above every other load
        let view = View::with_loads(&loads);
        let mut p2c = PowerOfTwoChoices::with_seed(seed);
        for _ in 0..1_000 {
            let i = p2c.pick(&view, None);
            prop_assert!(i < loads.len());
            prop_assert_ne!(i, b, "loads {:?}", loads);
        }
    }

    #[test]
    fn p2c_same_seed_same_sequence(
        seed in any::<u64>(),
        loads in prop::collection::vec((0u8..=5).prop_map(f64::from), 1..=16),
    ) {
        let view = View::with_loads(&loads);
        let mut a = PowerOfTwoChoices::with_seed(seed);
        let mut b = PowerOfTwoChoices::with_seed(seed);
        prop_assert_eq!(picks(&mut a, &view, 500), picks(&mut b, &view, 500));
    }

    #[test]
    fn p2c_with_one_returns_zero(seed in any::<u64>(), load in 0u8..=5) {
        let view = View::with_loads(&[f64::from(load)]);
        let mut p2c = PowerOfTwoChoices::with_seed(seed);
        prop_assert!(picks(&mut p2c, &view, 100).iter().all(|&i| i == 0));
    }
}

#[test]
fn p2c_equal_loads_reach_everyone() {
    // On equal loads P2C degenerates to a uniform choice: every endpoint gets picked.
    let view = View::numbered(8);
    let mut p2c = PowerOfTwoChoices::with_seed(3);
    let c = counts(&picks(&mut p2c, &view, 8_000), 8);
    assert!(c.iter().all(|&c| c > 800), "{c:?}");
}

// ---------------------------------------------------------------------------------------
// 6. Random
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn random_stays_in_range(seed in any::<u64>(), n in 1usize..=64) {
        let view = View::numbered(n);
        let mut r = Random::with_seed(seed);
        prop_assert!(picks(&mut r, &view, 1_000).iter().all(|&i| i < n));
    }

    #[test]
    fn random_same_seed_same_sequence(seed in any::<u64>(), n in 1usize..=64) {
        let view = View::numbered(n);
        let mut a = Random::with_seed(seed);
        let mut b = Random::with_seed(seed);
        prop_assert_eq!(picks(&mut a, &view, 500), picks(&mut b, &view, 500));
    }
}

#[test]
fn random_is_roughly_uniform() {
    const N: usize = 10;
    const PICKS: usize = 100_000;
    let view = View::numbered(N);
    let mut r = Random::with_seed(0x5eed);
    let c = counts(&picks(&mut r, &view, PICKS), N);
    let mean = (PICKS / N) as f64;
    for (i, &c) in c.iter().enumerate() {
        let dev = (c as f64 - mean).abs() / mean;
        assert!(
            dev <= 0.10,
            "endpoint {i}: {c} picks, {dev:.3} off the mean"
        );
    }
    let chi2: f64 = c.iter().map(|&c| (c as f64 - mean).powi(2) / mean).sum();
    // 9 degrees of freedom: p = 0.001 at 27.9; loose.
    assert!(chi2 < 40.0, "chi-square {chi2:.1}, counts {c:?}");
}

// ---------------------------------------------------------------------------------------
// 7. ConsistentHash
// ---------------------------------------------------------------------------------------

const KEYS: u64 = 100_000;

fn hashed(ch: &mut ConsistentHash, view: &dyn Endpoints, key: u64) -> usize {
    let i = ch.pick(view, Some(&RouteHint::hash(key)));
    assert!(i < view.len(), "index {i} out of range {}", view.len());
    i
}

/// 0: rendezvous, 1: the ring, 2: Maglev (the tables forced at any size).
fn mode_picker(mode: u8) -> ConsistentHash {
    match mode {
        0 => ConsistentHash::new(),
        1 => ConsistentHash::new().table_above(0),
        _ => ConsistentHash::new().maglev().table_above(0),
    }
}

/// The endpoint id each key in `0..KEYS` lands on.
fn assign(ch: &mut ConsistentHash, view: &dyn Endpoints) -> Vec<EndpointId> {
    (0..KEYS).map(|k| view.id(hashed(ch, view, k))).collect()
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn consistent_hash_is_stable(
        n in 1usize..=24,
        mode in 0u8..3,
        keys in prop::collection::vec(any::<u64>(), 1..50),
    ) {
        let view = View::numbered(n);
        let make = || mode_picker(mode);
        let mut ch = make();
        let first: Vec<usize> = keys.iter().map(|&k| hashed(&mut ch, &view, k)).collect();
        let again: Vec<usize> = keys.iter().map(|&k| hashed(&mut ch, &view, k)).collect();
        prop_assert_eq!(&first, &again);
        // A fresh picker (another client) agrees.
        let mut other = make();
        let fresh: Vec<usize> = keys.iter().map(|&k| hashed(&mut other, &view, k)).collect();
        prop_assert_eq!(&first, &fresh);
        // Unloaded, a load bound changes nothing.
        let mut bounded = make().bounded_load(1.25);
        let b: Vec<usize> = keys.iter().map(|&k| hashed(&mut bounded, &view, k)).collect();
        prop_assert_eq!(&first, &b);
    }

    #[test]
    fn rendezvous_ignores_endpoint_order(
        n in 1usize..=16,
        keys in prop::collection::vec(any::<u64>(), 1..50),
        rotate in any::<prop::sample::Index>(),
    ) {
        let view = View::numbered(n);
        let mut shuffled = view.clone();
        shuffled.0.rotate_left(rotate.index(n));
        shuffled.0.reverse();
        let mut ch = ConsistentHash::new();
        for k in keys {
            let a = view.0[hashed(&mut ch, &view, k)].id;
            let b = shuffled.0[hashed(&mut ch, &shuffled, k)].id;
            prop_assert_eq!(a, b);
        }
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn consistent_hash_follows_set_changes(
        n in 1usize..=12,
        changes in prop::collection::vec(change(), 1..5),
        with_generation in any::<bool>(),
        mode in 0u8..3,
        keys in prop::collection::vec(any::<u64>(), 1..40),
    ) {
        // A long-lived picker routes every key as a fresh one would, after any change.
        let make = || mode_picker(mode);
        let mut view = View::numbered(n);
        let mut next = 1_000;
        let mut long = make();
        for &k in &keys {
            let _ = hashed(&mut long, &versioned(&view, with_generation, 0), k);
        }
        for (g, c) in changes.iter().enumerate() {
            apply(&mut view, c, &mut next);
            let v = versioned(&view, with_generation, g as u64 + 1);
            let mut fresh = make();
            for &k in &keys {
                let a = hashed(&mut long, &v, k);
                let b = hashed(&mut fresh, &v, k);
                prop_assert_eq!(a, b, "key {} after {:?}", k, c);
            }
        }
    }
}

struct Moves {
    moved: u64,
    /// Of those, moved somewhere other than the added endpoint (adding) or moved off an
    /// endpoint other than the removed one (removing).
    stray: u64,
}

fn within(actual: u64, ideal: f64, tolerance: f64) -> bool {
    (actual as f64 - ideal).abs() <= tolerance * ideal
}

/// Adds endpoint number `n` (at the end) to `0..n`.
fn add_one(n: usize, mut make: impl FnMut() -> ConsistentHash) -> Moves {
    let before = View::numbered(n);
    let after = View::numbered(n + 1);
    let new_id = after.0[n].id;
    // The same picker instance must notice the set changed.
    let mut ch = make();
    let a = assign(&mut ch, &before);
    let b = assign(&mut ch, &after);
    let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count() as u64;
    let stray = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y && **y != new_id)
        .count() as u64;
    Moves { moved, stray }
}

/// Removes endpoint number `n / 2` from `0..n`.
fn remove_one(n: usize, mut make: impl FnMut() -> ConsistentHash) -> Moves {
    let before = View::numbered(n);
    let mut after = before.clone();
    let gone = after.0.remove(n / 2).id;
    let mut ch = make();
    let a = assign(&mut ch, &before);
    let b = assign(&mut ch, &after);
    let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count() as u64;
    let stray = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y && **x != gone)
        .count() as u64;
    // Nothing may land on the removed endpoint.
    assert!(b.iter().all(|&id| id != gone));
    Moves { moved, stray }
}

fn check_add(n: usize, make: impl FnMut() -> ConsistentHash) {
    let m = add_one(n, make);
    let ideal = KEYS as f64 / (n + 1) as f64;
    assert!(
        within(m.moved, ideal, 0.20),
        "N = {n} + 1: {} keys moved, ideal {ideal:.0}",
        m.moved
    );
    assert_eq!(
        m.stray, 0,
        "N = {n} + 1: {} of {} moved keys went to an old endpoint",
        m.stray, m.moved
    );
}

fn check_remove(n: usize, make: impl FnMut() -> ConsistentHash) {
    let m = remove_one(n, make);
    let ideal = KEYS as f64 / n as f64;
    assert!(
        within(m.moved, ideal, 0.20),
        "N = {n} - 1: {} keys moved, ideal {ideal:.0}",
        m.moved
    );
    assert_eq!(
        m.stray, 0,
        "N = {n} - 1: {} of {} moved keys were not on the removed endpoint",
        m.stray, m.moved
    );
}

#[test]
fn rendezvous_adding_one_moves_only_to_it() {
    for n in [5, 10, 50] {
        check_add(n, ConsistentHash::new);
    }
}

#[test]
fn rendezvous_removing_one_moves_only_its_keys() {
    for n in [5, 10, 50] {
        check_remove(n, ConsistentHash::new);
    }
}

#[test]
fn ring_adding_one_moves_only_to_it() {
    // The default above 64 endpoints.
    for n in [100, 200] {
        check_add(n, ConsistentHash::new);
    }
}

#[test]
fn ring_removing_one_moves_only_its_keys() {
    for n in [100, 200] {
        check_remove(n, ConsistentHash::new);
    }
}

#[test]
fn ring_distribution_is_even() {
    check_even(100, ConsistentHash::new(), 0.25);
}

#[test]
fn ring_bounded_load_holds_under_skew() {
    let loads = check_bounded(
        100,
        ConsistentHash::new().bounded_load(1.25),
        1.25,
        &skewed_keys(),
    );
    assert_eq!(loads.iter().sum::<u64>(), 10_000);
}

// Maglev is not minimally disruptive: a new endpoint takes table slots other endpoints
// would have filled and their preference lists shift, so ~0.6% (N = 100) to ~0.7%
// (N = 200) of all keys also move between old endpoints (an independent reference
// Maglev with random permutations shows the same). The strict add/remove properties
// hold for rendezvous (above); this checks what Maglev does guarantee.
#[test]
fn maglev_disruption_is_small() {
    // What Maglev guarantees: the new endpoint takes ≈ 1/(N+1) of keys and a removed
    // one gives up all of its ≈ 1/N, each within 20% of ideal; the extra churn among
    // the other endpoints stays under 2% of all keys.
    for n in [100, 200] {
        let maglev = || ConsistentHash::new().maglev();
        let m = add_one(n, maglev);
        let ideal = KEYS as f64 / (n + 1) as f64;
        let to_new = m.moved - m.stray;
        assert!(
            within(to_new, ideal, 0.20),
            "N = {n} + 1: {to_new} keys moved to the new endpoint, ideal {ideal:.0}"
        );
        assert!(
            m.stray <= KEYS / 50,
            "N = {n} + 1: {} keys moved among old endpoints",
            m.stray
        );
        let m = remove_one(n, maglev);
        let ideal = KEYS as f64 / n as f64;
        let off_gone = m.moved - m.stray;
        assert!(
            within(off_gone, ideal, 0.20),
            "N = {n} - 1: {off_gone} keys moved off the removed endpoint, ideal {ideal:.0}"
        );
        assert!(
            m.stray <= KEYS / 50,
            "N = {n} - 1: {} keys moved among surviving endpoints",
            m.stray
        );
    }
}

fn check_even(n: usize, mut ch: ConsistentHash, tolerance: f64) {
    let view = View::numbered(n);
    let mut c = vec![0u64; n];
    for k in 0..KEYS {
        c[hashed(&mut ch, &view, k)] += 1;
    }
    let mean = KEYS as f64 / n as f64;
    for (i, &c) in c.iter().enumerate() {
        assert!(
            within(c, mean, tolerance),
            "N = {n}: endpoint {i} got {c} keys, mean {mean:.0}"
        );
    }
}

#[test]
fn maglev_distribution_is_even() {
    check_even(100, ConsistentHash::new().maglev(), 0.25);
}

#[test]
fn rendezvous_distribution_is_even() {
    check_even(10, ConsistentHash::new(), 0.25);
}

/// Picks `keys` in order under `bounded_load(factor)`, each pick adding 1 to the chosen
/// endpoint's load; asserts no endpoint goes over the bound when picked.
fn check_bounded(n: usize, mut ch: ConsistentHash, factor: f64, keys: &[u64]) -> Vec<u64> {
    let mut view = View::numbered(n);
    let mut total = 0.0f64;
    for (k, &key) in keys.iter().enumerate() {
        let i = hashed(&mut ch, &view, key);
        let cap = (factor * (total + 1.0) / n as f64).ceil();
        let load = view.0[i].load + 1.0;
        assert!(
            load <= cap,
            "pick {k} (key {key}): endpoint {i} would carry {load} > cap {cap} (total {total})"
        );
        view.0[i].load = load;
        total += 1.0;
    }
    view.0.iter().map(|e| e.load as u64).collect()
}

/// 10k keys, half of them one hot key.
fn skewed_keys() -> Vec<u64> {
    let mut rng = fastrand::Rng::with_seed(11);
    (0..10_000)
        .map(|k| if k % 2 == 0 { 42 } else { rng.u64(..) })
        .collect()
}

#[test]
fn rendezvous_bounded_load_holds_under_skew() {
    let loads = check_bounded(
        10,
        ConsistentHash::new().bounded_load(1.25),
        1.25,
        &skewed_keys(),
    );
    assert_eq!(loads.iter().sum::<u64>(), 10_000);
}

#[test]
fn maglev_bounded_load_holds_under_skew() {
    let loads = check_bounded(
        100,
        ConsistentHash::new().maglev().bounded_load(1.25),
        1.25,
        &skewed_keys(),
    );
    assert_eq!(loads.iter().sum::<u64>(), 10_000);
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn bounded_load_holds_for_any_skew(
        n in 1usize..=12,
        mode in 0u8..3,
        factor in prop::sample::select(vec![1.0f64, 1.1, 1.25, 1.5, 2.0]),
        keys in prop::collection::vec(prop::sample::select(vec![1u64, 2, 3, 7, 1_000]), 1..300),
    ) {
        let ch = mode_picker(mode);
        let _ = check_bounded(n, ch.bounded_load(factor), factor, &keys);
    }
}

#[test]
fn consistent_hash_without_hint_goes_round_robin() {
    for n in [1, 3, 10, 100] {
        let view = View::numbered(n);
        let mut ch = ConsistentHash::new();
        let seq = picks(&mut ch, &view, 3 * n);
        let want: Vec<usize> = (0..3 * n).map(|i| i % n).collect();
        assert_eq!(seq, want, "N = {n}");
        // Hinted picks in between do not disturb the rotation.
        let mut ch = ConsistentHash::new();
        let mut seq = Vec::new();
        for k in 0..2 * n as u64 {
            seq.push(ch.pick(&view, None));
            let _ = ch.pick(&view, Some(&RouteHint::hash(k)));
        }
        let want: Vec<usize> = (0..2 * n).map(|i| i % n).collect();
        assert_eq!(seq, want, "N = {n}, interleaved");
    }
}

#[test]
fn consistent_hash_keys_spread_by_id_not_index() {
    // The same ids in another order route every key to the same endpoint id, for the
    // Maglev table too.
    let view = View::numbered(100);
    let mut reversed = view.clone();
    reversed.0.reverse();
    // Rendezvous and the ring are order-free.
    let mut ch = ConsistentHash::new();
    assert_eq!(assign(&mut ch, &view), assign(&mut ch, &reversed));
    // Maglev's fill order follows the index order, so allow a little.
    let mut ch = ConsistentHash::new().maglev();
    let a = assign(&mut ch, &view);
    let b = assign(&mut ch, &reversed);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        same as u64 >= KEYS * 95 / 100,
        "{same} of {KEYS} keys kept their endpoint"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Many endpoints (issue #21): sampled least-load pickers, the EDF schedule, pickers
//    that follow changes in place
// ---------------------------------------------------------------------------------------

/// A view that records which endpoints' loads (or latencies) a pick read: a sampling
/// picker's candidates.
struct Recording<'a> {
    view: &'a View,
    read: std::cell::RefCell<Vec<usize>>,
}

impl<'a> Recording<'a> {
    fn new(view: &'a View) -> Self {
        Recording {
            view,
            read: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// The distinct endpoints read since the last call.
    fn take(&self) -> Vec<usize> {
        let mut read = std::mem::take(&mut *self.read.borrow_mut());
        read.sort_unstable();
        read.dedup();
        read
    }
}

impl Endpoints for Recording<'_> {
    fn len(&self) -> usize {
        self.view.len()
    }

    fn id(&self, i: usize) -> EndpointId {
        self.view.id(i)
    }

    fn load(&self, i: usize) -> f64 {
        self.read.borrow_mut().push(i);
        self.view.load(i)
    }

    fn latency(&self, i: usize) -> Option<Duration> {
        self.view.latency(i)
    }
}

/// Least connections or least response time, sampling at every size.
fn sampled(lrt: bool, seed: u64, choices: usize) -> Box<dyn Pick> {
    if lrt {
        Box::new(
            LeastResponseTime::with_seed(seed)
                .exact_up_to(0)
                .choice_count(choices),
        )
    } else {
        Box::new(
            LeastConnections::with_seed(seed)
                .exact_up_to(0)
                .choice_count(choices),
        )
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Above the exact threshold a least-load picker reads `choice_count` distinct
    /// endpoints and takes the cheapest of them: never the busier of its two
    /// candidates (so never the strictly busiest endpoint of all).
    #[test]
    fn sampled_least_load_never_takes_a_busier_candidate(
        seed in any::<u64>(),
        eps in prop::collection::vec(lrt_endpoint(), 3..=40),
        choices in 2usize..=4,
        lrt in any::<bool>(),
    ) {
        let view = lrt_view(&eps);
        let default = Duration::from_millis(1);
        let cost = |i: usize| {
            if lrt { lrt_cost(&view, i, default) } else { view.0[i].load }
        };
        let mut picker = sampled(lrt, seed, choices);
        let rec = Recording::new(&view);
        for _ in 0..200 {
            let i = picker.pick(&rec, None);
            let read = rec.take();
            prop_assert!(read.contains(&i), "chose {} without reading it ({:?})", i, read);
            prop_assert_eq!(read.len(), choices.min(eps.len()), "candidates {:?}", read);
            for &j in &read {
                prop_assert!(cost(i) <= cost(j), "chose {} over cheaper candidate {}", i, j);
            }
        }
    }

    /// Sampling spreads load: with every pick adding a request to the endpoint chosen
    /// (none finishing), the busiest and idlest endpoints stay within a few requests of
    /// each other, where uniform random choice drifts apart as sqrt(picks).
    #[test]
    fn sampled_least_load_spreads_load(
        seed in any::<u64>(),
        n in 17usize..=128,
        lrt in any::<bool>(),
    ) {
        let mut view = View::numbered(n);
        let mut picker = sampled(lrt, seed, 2);
        for _ in 0..30 * n {
            let i = picker.pick(&view, None);
            view.0[i].load += 1.0;
        }
        let loads: Vec<f64> = view.0.iter().map(|e| e.load).collect();
        let max = loads.iter().copied().fold(0.0, f64::max);
        let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
        // Two choices: 2 to 9 in 3,000 seeded runs; uniform random choice: 10 to 43,
        // median 25.
        prop_assert!(max - min <= 12.0, "spread {} over {:?}", max - min, loads);
    }

    /// Up to 16 endpoints the default least-load pickers are the exact ones.
    #[test]
    fn least_load_is_exact_up_to_sixteen(
        rounds in prop::collection::vec(prop::collection::vec(lrt_endpoint(), 1..=16), 1..20),
        seed in any::<u64>(),
    ) {
        let (mut lc, mut lc_exact) = (LeastConnections::with_seed(seed), LeastConnections::exact());
        let (mut lrt, mut lrt_exact) = (LeastResponseTime::with_seed(seed), LeastResponseTime::exact());
        for eps in rounds {
            let view = lrt_view(&eps);
            for _ in 0..3 {
                prop_assert_eq!(lc.pick(&view, None), lc_exact.pick(&view, None));
                prop_assert_eq!(lrt.pick(&view, None), lrt_exact.pick(&view, None));
            }
        }
    }
}

#[test]
fn sampled_least_load_reaches_everyone_on_equal_loads() {
    for lrt in [false, true] {
        let view = View::numbered(40);
        let mut picker = sampled(lrt, 3, 2);
        let c = counts(&picks(&mut picker, &view, 40_000), 40);
        assert!(c.iter().all(|&c| c > 600), "{c:?}");
    }
}

/// Counts over `picks` consecutive picks of `wrr`.
fn wrr_counts(wrr: &mut impl Pick, view: &dyn Endpoints, picks_n: usize) -> Vec<u64> {
    counts(&picks(wrr, view, picks_n), view.len())
}

proptest! {
    #![proptest_config(config(64))]

    /// The earliest-deadline-first schedule: over every stretch of k × Σweights picks
    /// from the start each endpoint is chosen k × weight times, give or take one, and
    /// its picks are interleaved (a run never exceeds its weight by more than one).
    #[test]
    fn edf_proportions_match_weights(
        weights in prop::collection::vec(1u32..=10, 1..=60),
        k in 1usize..=20,
    ) {
        let view = View::with_weights(&weights);
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        // The schedule at any size, and the default above 16 endpoints.
        let mut pickers = vec![WeightedRoundRobin::edf()];
        if weights.len() > 16 {
            pickers.push(WeightedRoundRobin::new());
        }
        for mut wrr in pickers {
            let seq = picks(&mut wrr, &view, k * total);
            let c = counts(&seq, weights.len());
            for (i, (&c, &w)) in c.iter().zip(&weights).enumerate() {
                let want = (k as u64) * u64::from(w);
                prop_assert!(c.abs_diff(want) <= 1, "endpoint {} (weight {}): {} picks, want {}", i, w, c, want);
            }
            if weights.len() > 1 {
                for (i, (&run, &w)) in max_runs(&seq, weights.len()).iter().zip(&weights).enumerate() {
                    prop_assert!(run <= w as usize + 1, "index {} ran {} with weight {}", i, run, w);
                }
            }
        }
    }

    /// nginx's exact sequence stays available above 16 endpoints: every window of
    /// Σweights picks is exact.
    #[test]
    fn explicit_smooth_wrr_windows_are_exact_at_any_size(
        weights in prop::collection::vec(1u32..=6, 17..=40),
    ) {
        let view = View::with_weights(&weights);
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        let mut wrr = WeightedRoundRobin::smooth();
        let seq = picks(&mut wrr, &view, 3 * total);
        let bad = first_inexact_window(&seq, &weights);
        prop_assert!(bad.is_none(), "window (start, counts) {:?}", bad);
    }

    /// Up to 16 endpoints the default is the smooth one, pick for pick.
    #[test]
    fn wrr_is_smooth_up_to_sixteen(weights in prop::collection::vec(1u32..=10, 1..=16)) {
        let view = View::with_weights(&weights);
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        let a = picks(&mut WeightedRoundRobin::new(), &view, 2 * total);
        let b = picks(&mut WeightedRoundRobin::smooth(), &view, 2 * total);
        prop_assert_eq!(a, b);
    }
}

/// A view that changes the way a balancer's ready set does (an endpoint joins at the
/// end; one leaves and the last takes its place) and reports each change to the
/// pickers given, with a new generation.
struct Following {
    view: View,
    generation: u64,
}

impl Following {
    fn new(view: View) -> Self {
        Following {
            view,
            generation: 1,
        }
    }

    fn v(&self) -> Versioned<'_> {
        versioned(&self.view, true, self.generation)
    }

    fn add(&mut self, ep: Ep, pickers: &mut [&mut dyn Pick]) {
        self.view.0.push(ep);
        self.generation += 1;
        let index = self.view.0.len() - 1;
        for p in pickers {
            p.update(&self.v(), SetChange::Added { index });
        }
    }

    fn remove(&mut self, index: usize, pickers: &mut [&mut dyn Pick]) {
        let id = self.view.0.swap_remove(index).id;
        self.generation += 1;
        for p in pickers {
            p.update(&self.v(), SetChange::Removed { index, id });
        }
    }

    /// Applies `c` (new endpoints numbered from `*next`, weights as given).
    fn apply(&mut self, c: &Change, next: &mut u64, pickers: &mut [&mut dyn Pick]) {
        let fresh = |weight: u32, next: &mut u64| {
            *next += 1;
            Ep {
                weight,
                ..Ep::new(*next)
            }
        };
        let n = self.view.0.len();
        match c {
            Change::Add(_, w) => self.add(fresh(*w, next), pickers),
            Change::Remove(at) if n > 1 => self.remove(at.index(n), pickers),
            Change::Remove(_) => {}
            Change::Replace(at, w) => {
                self.remove(at.index(n), pickers);
                self.add(fresh(*w, next), pickers);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(32))]

    /// A ring (or rendezvous) that followed the changes one at a time routes every key
    /// as a ring built afresh over the resulting set does.
    #[test]
    fn ring_updated_in_place_routes_as_a_fresh_build(
        n in 1usize..=90,
        changes in prop::collection::vec(change(), 1..40),
        table_above in prop::sample::select(vec![0usize, 8, 64]),
        bounded in any::<bool>(),
        keys in prop::collection::vec(any::<u64>(), 1..60),
    ) {
        let make = || {
            let ch = ConsistentHash::new().table_above(table_above);
            if bounded { ch.bounded_load(1.25) } else { ch }
        };
        let mut f = Following::new(View::numbered(n));
        let mut long = make();
        for &k in &keys {
            let _ = hashed(&mut long, &f.v(), k);
        }
        let mut next = 1_000;
        for c in &changes {
            f.apply(c, &mut next, &mut [&mut long]);
            let mut fresh = make();
            for &k in &keys {
                let a = f.view.0[hashed(&mut long, &f.v(), k)].id;
                let b = f.view.0[hashed(&mut fresh, &f.v(), k)].id;
                prop_assert_eq!(a, b, "key {} after {:?} (N = {})", k, c, f.view.len());
            }
        }
    }

    /// The schedule follows changes in place: after each, over k × Σweights picks each
    /// endpoint is chosen k × weight times, give or take two.
    #[test]
    fn edf_follows_changes_in_place(
        weights in prop::collection::vec(1u32..=10, 1..=30),
        changes in prop::collection::vec((change(), 0usize..50), 1..12),
        k in 4usize..=10,
    ) {
        let mut f = Following::new(View::with_weights(&weights));
        let mut wrr = WeightedRoundRobin::edf();
        let _ = picks(&mut wrr, &f.v(), 7);
        let mut next = 1_000;
        for (c, gap) in &changes {
            f.apply(c, &mut next, &mut [&mut wrr]);
            let _ = picks(&mut wrr, &f.v(), *gap);
            let now: Vec<u32> = f.view.0.iter().map(|e| e.weight).collect();
            let total: usize = now.iter().map(|&w| w as usize).sum();
            let c = wrr_counts(&mut wrr, &f.v(), k * total);
            for (i, (&c, &w)) in c.iter().zip(&now).enumerate() {
                let want = (k as u64) * u64::from(w);
                prop_assert!(c.abs_diff(want) <= 2, "endpoint {} (weight {}): {} picks, want {} (weights {:?})", i, w, c, want, now);
            }
        }
    }
}

/// Maglev under a balancer's change reports: each change is followed at once (a key
/// whose endpoint left goes on to one still there, every pick answers), the new table
/// is built on the picker's worker thread, and once it is in, every key routes as a
/// fresh table over the set does.
#[tokio::test]
async fn maglev_rebuilds_off_the_pick_path_and_settles_on_a_fresh_table() {
    let mut f = Following::new(View::numbered(120));
    let mut long = ConsistentHash::new().maglev();
    // No change reports yet: the first pick builds the table.
    for k in 0..50 {
        let _ = hashed(&mut long, &f.v(), k);
    }
    // Changes reported one at a time, as a balancer does.
    let mut next = 1_000;
    let mut rng = fastrand::Rng::with_seed(9);
    for round in 0..20 {
        let gone = f.view.0[rng.usize(0..f.view.len())].id;
        let at = f.view.0.iter().position(|e| e.id == gone).unwrap();
        f.remove(at, &mut [&mut long]);
        next += 1;
        f.add(Ep::new(next), &mut [&mut long]);
        // Picks go on at once, never to the endpoint that left.
        for k in 0..500u64 {
            let i = hashed(&mut long, &f.v(), k * 7 + round);
            assert_ne!(
                f.view.0[i].id, gone,
                "round {round}: key routed to a removed endpoint"
            );
        }
    }
    // Settles: the table built on the worker from the last snapshot comes in.
    let mut fresh = ConsistentHash::new().maglev();
    let want: Vec<EndpointId> = (0..2_000)
        .map(|k| f.view.0[hashed(&mut fresh, &f.v(), k)].id)
        .collect();
    for _ in 0..12_000 {
        let got: Vec<EndpointId> = (0..2_000)
            .map(|k| f.view.0[hashed(&mut long, &f.v(), k)].id)
            .collect();
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the worker's table never came in");
}
