//! Cost of one pick for each of marina-balance's pickers, over N = 2, 16, 256 endpoints.
//!
//! Each picker chooses among N in-memory endpoints (ids, weights 1–4, loads that the
//! pick itself bumps and a slow decay keeps bounded, latencies for the ones that use
//! them). The consistent-hash rows hash a fresh key per pick. Reported: ns per pick
//! (median of `--reps` runs of `--iters` picks). The picks run in a plain loop, so the
//! numbers are the pickers' own cost, not a balancer's.
//!
//! ```text
//! cargo bench -p marina-bench --bench pickers -- [--iters N] [--reps R]
//! ```
//!
//! Without `--bench` (as under `cargo test --benches`) it runs a few iterations as a
//! smoke test.

// A benchmark measures real wall time, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use marina_balance::{
    ConsistentHash, Endpoints, LeastConnections, LeastResponseTime, Pick, PowerOfTwoChoices,
    Random, RoundRobin, WeightedRoundRobin,
};
use marina_core::{EndpointId, RouteHint};

/// N endpoints with weights, loads and latencies.
struct View {
    ids: Vec<EndpointId>,
    weights: Vec<u32>,
    loads: Vec<f64>,
    latencies: Vec<Duration>,
}

impl View {
    fn new(n: usize) -> Self {
        View {
            ids: (0..n as u64)
                .map(|i| EndpointId::of(&format!("10.0.{}.{}:7000", i / 256, i % 256)))
                .collect(),
            weights: (0..n).map(|i| 1 + (i % 4) as u32).collect(),
            loads: vec![0.0; n],
            latencies: (0..n)
                .map(|i| Duration::from_micros(100 + (i as u64 * 37) % 900))
                .collect(),
        }
    }
}

impl Endpoints for View {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn id(&self, i: usize) -> EndpointId {
        self.ids[i]
    }
    fn weight(&self, i: usize) -> u32 {
        self.weights[i]
    }
    fn load(&self, i: usize) -> f64 {
        self.loads[i]
    }
    fn latency(&self, i: usize) -> Option<Duration> {
        Some(self.latencies[i])
    }
    fn generation(&self) -> Option<u64> {
        Some(0)
    }
}

/// ns per pick, median of `reps` runs of `iters` picks.
fn measure(picker: &mut dyn Pick, n: usize, hashed: bool, iters: u64, reps: usize) -> f64 {
    let mut view = View::new(n);
    let hints: Vec<RouteHint> = (0..1024u64)
        .map(|k| RouteHint::hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    // Warm up (and build any table) outside the timing.
    for k in 0..1000 {
        let hint = hashed.then(|| &hints[k % hints.len()]);
        black_box(picker.pick(&view, hint));
    }
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        for k in 0..iters as usize {
            let hint = hashed.then(|| &hints[k & 1023]);
            let i = picker.pick(black_box(&view), hint);
            // Keep loads moving so load-aware pickers do real comparisons.
            view.loads[i] += 1.0;
            if k & 63 == 0 {
                for l in &mut view.loads {
                    *l *= 0.5;
                }
            }
        }
        runs.push(start.elapsed().as_nanos() as f64 / iters as f64);
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let marina_bench::RunLength { iters, reps } = marina_bench::RunLength::from_args(2_000_000);
    let sizes = [2usize, 16, 256];
    println!("pickers bench: {iters} picks × {reps} reps (median), ns per pick");
    println!();
    println!("| picker | N = 2 | N = 16 | N = 256 |");
    println!("|---|---:|---:|---:|");
    type Make = fn() -> Box<dyn Pick>;
    let pickers: [(&str, Make, bool); 8] = [
        ("RoundRobin", || Box::new(RoundRobin::new()), false),
        (
            "WeightedRoundRobin",
            || Box::new(WeightedRoundRobin::new()),
            false,
        ),
        (
            "LeastConnections",
            || Box::new(LeastConnections::new()),
            false,
        ),
        (
            "LeastResponseTime",
            || Box::new(LeastResponseTime::new()),
            false,
        ),
        ("Random", || Box::new(Random::with_seed(1)), false),
        (
            "PowerOfTwoChoices",
            || Box::new(PowerOfTwoChoices::with_seed(1)),
            false,
        ),
        (
            "ConsistentHash (rendezvous ≤ 64, ring above)",
            || Box::new(ConsistentHash::new()),
            true,
        ),
        (
            "ConsistentHash, bounded load 1.25",
            || Box::new(ConsistentHash::new().bounded_load(1.25)),
            true,
        ),
    ];
    for (name, make, hashed) in pickers {
        let cells: Vec<String> = sizes
            .iter()
            .map(|&n| format!("{:.1}", measure(&mut *make(), n, hashed, iters, reps)))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}
