//! The simulation scenarios, each over the seeds `marina_sim::seeds()` gives (the CI
//! set by default; `MARINA_SIM_SEED` replays one, `MARINA_SIM_SEEDS=N` sweeps N: see
//! the crate's docs). A failing seed is printed with the command that replays it.

use marina_sim::{Scenario, Target, run, sweep};

#[test]
fn partition() {
    sweep("partition", &Scenario::partition(), Target::Stack);
}

#[test]
fn crash_restart() {
    sweep("crash_restart", &Scenario::crash_restart(), Target::Stack);
}

#[test]
fn black_hole() {
    sweep("black_hole", &Scenario::black_hole(), Target::Stack);
}

#[test]
fn delay_spikes() {
    sweep("delay_spikes", &Scenario::delay_spikes(), Target::Stack);
}

#[test]
fn flapping() {
    sweep("flapping", &Scenario::flapping(), Target::Stack);
}

#[test]
fn discovery() {
    sweep("discovery", &Scenario::discovery(), Target::Stack);
}

#[test]
fn discovery_churn() {
    sweep(
        "discovery_churn",
        &Scenario::discovery_churn(),
        Target::Stack,
    );
}

#[test]
fn cancellations() {
    sweep("cancellations", &Scenario::cancellations(), Target::Stack);
}

#[test]
fn all_down_then_one() {
    sweep(
        "all_down_then_one",
        &Scenario::all_down_then_one(),
        Target::Stack,
    );
}

/// Same seed, same trace: a run of the busiest scenario twice gives the same log.
#[test]
fn same_seed_same_trace() {
    for s in [Scenario::flapping(), Scenario::discovery()] {
        let seed = marina_sim::seeds()[0];
        let a = run(&s, Target::Stack, seed);
        let b = run(&s, Target::Stack, seed);
        if let Some(i) =
            (0..a.entries.len().min(b.entries.len())).find(|&i| a.entries[i] != b.entries[i])
        {
            panic!(
                "{} seed {seed}: two runs part at event {i}:\n  {}\n  {}",
                s.name, a.entries[i], b.entries[i]
            );
        }
        assert_eq!(a.entries.len(), b.entries.len());
        assert_eq!(a.digest, b.digest);
    }
}

/// The harness itself, against a bare client (a connection per request, no health
/// checks, sessions or limits): its invariants hold there too.
#[test]
fn direct_baseline() {
    let s = Scenario {
        name: "direct_baseline",
        sessions: false,
        concurrency: None,
        ..Scenario::crash_restart()
    };
    sweep("direct_baseline", &s, Target::Direct);
}

/// Faults drawn from each seed: holds, partitions, crashes, black holes and delay
/// spikes, on every backend, overlapping.
#[test]
fn chaos() {
    marina_sim::sweep_with("chaos", Scenario::chaos, Target::Stack);
}

/// Four clients per session, sending concurrently, through a partition. The sticky
/// table is written by compare-and-set (the first answer pins or re-pins a session;
/// answers to requests routed before it leave that pin alone), so the table moves a
/// session at most once per failure: checked on the table's own re-pin count, since
/// requests routed before a re-pin (and failover attempts) still answer from other
/// backends.
#[test]
fn shared_sessions() {
    let s = Scenario {
        name: "shared_sessions",
        clients_per_session: 4,
        ..Scenario::partition()
    };
    sweep("shared_sessions", &s, Target::Stack);
}
