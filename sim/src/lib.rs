//! Deterministic network simulation of the marina stack, on
//! [turmoil](https://docs.rs/turmoil).
//!
//! One run: echo backends (`b0`, `b1`, …, [`backend`]) and a client host running the
//! marina [`Stack`](marina::Stack) over turmoil's simulated TCP, driven by concurrent
//! clients ([`client`]); a [`Scenario`] injects faults at set times (partitions,
//! crashes, black holes, delay spikes, discovery); every host logs what it sees into
//! one [`Log`]; [`check`](check::check) then asserts the invariants on it. Everything
//! is decided by the seed: turmoil's network (latencies) from
//! `Builder::rng_seed`, the stack's random picks from fastrand's thread-local
//! generator (seeded here), the clients' jitter from the seed too. Same seed, same
//! log: [`digest`] of two runs of a seed must match.
//!
//! # Seeds
//!
//! [`seeds`] reads the environment: `MARINA_SIM_SEED=1234` runs that seed alone
//! (replaying a failure), `MARINA_SIM_SEEDS=200` runs seeds `1..=200` (a longer
//! sweep; `MARINA_SIM_SEED_BASE` moves the start), and without either the fixed CI
//! set [`CI_SEEDS`] runs. A failing seed is printed with the command that replays it.

use std::time::Duration;

pub mod backend;
pub mod check;
pub mod client;
pub mod log;
pub mod request;
pub mod scenario;
mod stack;
pub mod stream;

pub use backend::Backends;
pub use client::Target;
pub use log::{Entry, Event, Log, digest};
pub use scenario::{Fault, Scenario};

/// How many seeds CI runs per scenario when the environment names none.
pub const CI_SEEDS: u64 = 12;

/// The client host's name.
pub const CLIENT: &str = "client";

/// One run's result.
#[derive(Debug)]
pub struct Run {
    /// The seed.
    pub seed: u64,
    /// The log.
    pub entries: Vec<Entry>,
    /// The log's digest.
    pub digest: u64,
    /// The invariants broken (empty: none).
    pub violations: Vec<String>,
    /// Sim time the run took.
    pub sim_time: Duration,
}

impl Run {
    /// Ejections the stack's health checks made (as the monitor saw them).
    pub fn ejections(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.event, Event::Ejected { ejected: true, .. }))
            .count()
    }

    /// The longest a request took.
    pub fn slowest(&self) -> Duration {
        self.entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::Outcome { took, .. } => Some(*took),
                _ => None,
            })
            .max()
            .unwrap_or_default()
    }

    /// Requests answered with their own echo, and requests that failed.
    pub fn outcomes(&self) -> (usize, usize) {
        let mut ok = 0;
        let mut err = 0;
        for e in &self.entries {
            if let Event::Outcome { result, .. } = &e.event {
                if result.is_ok() {
                    ok += 1;
                } else {
                    err += 1;
                }
            }
        }
        (ok, err)
    }
}

/// Runs `scenario` once with `seed` against `target`.
pub fn run(scenario: &Scenario, target: Target, seed: u64) -> Run {
    let log = Log::default();
    let (min, max) = scenario.latency;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(scenario.limit)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(min)
        .max_message_latency(max)
        .build();
    // The stack's pickers (and pool jitter) draw from fastrand's thread-local
    // generator: turmoil runs every host on this thread.
    fastrand::seed(seed);
    let backends = Backends::new(scenario.backends);
    for i in 0..scenario.backends {
        let (b, l, t) = (backends.clone(), log.clone(), scenario.service_time);
        sim.host(backend::host_name(i), move || {
            backend::serve(i, b.clone(), l.clone(), t)
        });
    }
    {
        let (s, l, b) = (scenario.clone(), log.clone(), backends.clone());
        sim.client(CLIENT, client::host(s, target, l, b, seed));
    }
    let faults = scenario.sorted_faults();
    let mut next = 0;
    loop {
        let now = sim.elapsed();
        while next < faults.len() && faults[next].0 <= now {
            let (_, fault) = faults[next];
            apply(&mut sim, &backends, scenario, fault);
            log.push_at(now, Event::Fault(format!("{fault:?}")));
            next += 1;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                log.push_at(sim.elapsed(), Event::HostError(e.to_string()));
                break;
            }
        }
    }
    let sim_time = sim.elapsed();
    drop(sim);
    let entries = log.entries();
    let violations = check::check(scenario, &entries);
    Run {
        seed,
        digest: digest(&entries),
        entries,
        violations,
        sim_time,
    }
}

/// Applies a network or host fault (discovery steps are the client host's).
fn apply(sim: &mut turmoil::Sim<'_>, backends: &Backends, s: &Scenario, fault: Fault) {
    let host = |i: usize| backend::host_name(i);
    match fault {
        Fault::Hold(i) => sim.hold(CLIENT, host(i)),
        Fault::Release(i) => sim.release(CLIENT, host(i)),
        Fault::Partition(i) => sim.partition(CLIENT, host(i)),
        Fault::Repair(i) => sim.repair(CLIENT, host(i)),
        Fault::Crash(i) => sim.crash(host(i)),
        Fault::Restart(i) => sim.bounce(host(i)),
        Fault::BlackHole(i, on) => backends.lock()[i].black_hole = on,
        Fault::Delay(i, spike) => {
            sim.set_link_max_message_latency(CLIENT, host(i), spike.unwrap_or(s.latency.1))
        }
        Fault::Add(_) | Fault::Remove(_) => {}
    }
}

/// The seeds to run: `MARINA_SIM_SEED` alone, or `MARINA_SIM_SEEDS` of them from
/// `MARINA_SIM_SEED_BASE` (default 1), or [`CI_SEEDS`] from 1.
pub fn seeds() -> Vec<u64> {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
    };
    if let Some(seed) = var("MARINA_SIM_SEED") {
        return vec![seed];
    }
    let base = var("MARINA_SIM_SEED_BASE").unwrap_or(1);
    let n = var("MARINA_SIM_SEEDS").unwrap_or(CI_SEEDS);
    (base..base + n).collect()
}

/// The command that replays `seed` of the scenario whose test is `test`.
pub fn replay_command(test: &str, seed: u64) -> String {
    format!(
        "MARINA_SIM_SEED={seed} cargo test -p marina-sim --test sim {test} -- --exact --nocapture"
    )
}

/// Runs `scenario` for every seed of [`seeds`] against `target`; panics listing the
/// failing seeds, each with its violations and replay command. With
/// `MARINA_SIM_TRACE=1` the whole log of each run is printed. `test` is the test's
/// name (for the replay command).
pub fn sweep(test: &str, scenario: &Scenario, target: Target) -> Vec<Run> {
    sweep_with(test, |_| scenario.clone(), target)
}

/// As [`sweep`], with each seed's scenario made by `make` (faults drawn from the
/// seed: [`Scenario::chaos`]).
pub fn sweep_with(test: &str, make: impl Fn(u64) -> Scenario, target: Target) -> Vec<Run> {
    let trace = std::env::var("MARINA_SIM_TRACE").is_ok_and(|v| v == "1");
    let mut failed = Vec::new();
    let mut runs = Vec::new();
    for seed in seeds() {
        let scenario = &make(seed);
        // The wall time a run takes, outside the simulation (whose clock is turmoil's).
        #[allow(clippy::disallowed_methods, clippy::disallowed_types)]
        let started = std::time::Instant::now();
        let r = run(scenario, target, seed);
        let (ok, err) = r.outcomes();
        println!(
            "{test} seed {seed}: {ok} ok, {err} errors, {} ejections, slowest {:.0?}, {} events, sim {:.1?}, wall {:.1?}, digest {:016x}{}",
            r.ejections(),
            r.slowest(),
            r.entries.len(),
            r.sim_time,
            started.elapsed(),
            r.digest,
            if r.violations.is_empty() {
                ""
            } else {
                "  FAILED"
            },
        );
        if trace {
            for (at, f) in scenario.sorted_faults() {
                println!("  fault at {at:?}: {f:?}");
            }
            for e in &r.entries {
                println!("  {e}");
            }
        }
        if !r.violations.is_empty() {
            for v in r.violations.iter().take(20) {
                println!("  violated: {v}");
            }
            if r.violations.len() > 20 {
                println!("  … {} more", r.violations.len() - 20);
            }
            println!("  replay: {}", replay_command(test, seed));
            failed.push(seed);
        }
        runs.push(r);
    }
    if !failed.is_empty() {
        let cmds: Vec<_> = failed.iter().map(|&s| replay_command(test, s)).collect();
        panic!(
            "{test}: invariants broken for seeds {failed:?}; replay with:\n  {}",
            cmds.join("\n  ")
        );
    }
    runs
}
