//! The active prober's schedule: a round starts every `interval` (± `jitter`) from the
//! start of the round before, a round that runs long holds the next back (no overlap),
//! and a failing backend is taken out within the bound `ActiveConfig` documents.
//!
//! Every test runs on a paused clock, so the instants compared are exact: each round's
//! start as the probe sees it, and the instant the status turns `Ejected`.

use std::convert::Infallible;
use std::future::{Ready, pending, ready};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_core::{Probe, probe_fn};
use marina_health::{ActiveConfig, Health, HealthHandle, Status};
use tokio::time::Instant;
use tower::service_fn;
use tower::util::ServiceFn;

const MS: Duration = Duration::from_millis(1);

/// What the backend does with one probe round.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Answers at once.
    Pass,
    /// Fails at once (connection refused).
    Refuse,
    /// Accepts and never answers (a black hole).
    Never,
}

/// What the probe saw: when each round started, and how many ran at once.
#[derive(Debug, Default)]
struct Rounds {
    starts: Mutex<Vec<Instant>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Rounds {
    fn starts(&self) -> Vec<Instant> {
        self.starts.lock().unwrap().clone()
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

/// One round in flight: counted from its first poll until its future is dropped
/// (completed, or cancelled at its timeout).
struct InFlight(Arc<Rounds>);

impl InFlight {
    fn enter(rounds: &Arc<Rounds>) -> Self {
        rounds.starts.lock().unwrap().push(Instant::now());
        let n = rounds.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        rounds.max_in_flight.fetch_max(n, Ordering::SeqCst);
        InFlight(rounds.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A probe whose rounds answer as `answer` says at the time each starts.
fn probe(
    rounds: &Arc<Rounds>,
    answer: impl Fn() -> Answer + Send + Sync + 'static,
) -> impl Probe<()> {
    let rounds = rounds.clone();
    probe_fn(move |_: &mut ()| {
        let rounds = rounds.clone();
        let answer = answer();
        Box::pin(async move {
            let _round = InFlight::enter(&rounds);
            match answer {
                Answer::Pass => Ok(()),
                Answer::Refuse => Err("connection refused".into()),
                Answer::Never => pending().await,
            }
        })
    })
}

type Backend = ServiceFn<fn(()) -> Ready<Result<(), Infallible>>>;

fn backend() -> Backend {
    fn answer(_: ()) -> Ready<Result<(), Infallible>> {
        ready(Ok(()))
    }
    service_fn(answer as fn(()) -> Ready<Result<(), Infallible>>)
}

fn active(interval: Duration, jitter: f64, timeout: Duration, fall: u32) -> ActiveConfig {
    ActiveConfig {
        interval,
        jitter,
        timeout,
        healthy_threshold: 2,
        unhealthy_threshold: fall,
    }
}

/// An endpoint probed by `probe` under `cfg`, and the instant its prober started.
fn endpoint(cfg: ActiveConfig, probe: impl Probe<()>) -> (Health<Backend>, Instant) {
    let t0 = Instant::now();
    let svc = Health::builder(backend()).probe(cfg, probe, ()).build();
    (svc, t0)
}

/// The instant the endpoint is taken out by its probes (fails after a simulated hour).
async fn ejected_at(handle: &HealthHandle) -> Instant {
    let mut rx = handle.subscribe();
    let wait = async {
        loop {
            if matches!(*rx.borrow_and_update(), Status::Ejected { until: None }) {
                return Instant::now();
            }
            rx.changed().await.expect("the endpoint is alive");
        }
    };
    tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .expect("the endpoint is ejected")
}

/// The bound `ActiveConfig` documents for a black hole, from its first failing round:
/// `(fall − 1) × max(interval × (1 + jitter), timeout) + timeout`.
fn black_hole_bound(cfg: &ActiveConfig) -> Duration {
    let p = cfg.interval.mul_f64(1.0 + cfg.jitter).max(cfg.timeout);
    p * (cfg.unhealthy_threshold - 1) + cfg.timeout
}

fn gaps(starts: &[Instant]) -> Vec<Duration> {
    starts.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn rounds_start_every_interval_from_the_start_of_the_one_before() {
    // A black hole with a timeout below the interval: rounds start 1 s apart, not
    // 1 s after the previous round timed out (that would be 1.3 s apart).
    let rounds = Arc::new(Rounds::default());
    let cfg = active(1000 * MS, 0.0, 300 * MS, 3);
    let (svc, t0) = endpoint(cfg, probe(&rounds, || Answer::Never));

    let out = ejected_at(&svc.handle()).await;
    // Three rounds at 0, 1 s and 2 s; the third times out at 2.3 s.
    assert_eq!(out - t0, 2300 * MS);
    assert_eq!(out - t0, black_hole_bound(&cfg));
    let starts = rounds.starts();
    assert_eq!(starts[..3], [t0, t0 + 1000 * MS, t0 + 2000 * MS]);

    // And on it goes, on the same beat.
    tokio::time::sleep_until(t0 + 5500 * MS).await;
    let starts = rounds.starts();
    assert_eq!(gaps(&starts), vec![1000 * MS; 5], "{starts:?}");
    assert_eq!(rounds.max_in_flight(), 1);
    drop(svc);
}

#[tokio::test(start_paused = true)]
async fn a_round_past_its_interval_holds_the_next_back_without_overlap() {
    // The timeout is ten intervals: each round runs it out, and the next starts the
    // moment the one before is gone.
    let rounds = Arc::new(Rounds::default());
    let cfg = active(100 * MS, 0.0, 1000 * MS, 3);
    let (svc, t0) = endpoint(cfg, probe(&rounds, || Answer::Never));

    let out = ejected_at(&svc.handle()).await;
    assert_eq!(out - t0, 3000 * MS);
    assert_eq!(out - t0, black_hole_bound(&cfg));

    tokio::time::sleep_until(t0 + 5500 * MS).await;
    let starts = rounds.starts();
    assert_eq!(gaps(&starts), vec![1000 * MS; 5], "{starts:?}");
    assert_eq!(rounds.max_in_flight(), 1, "rounds overlapped");
    drop(svc);
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_refuses_at_once_is_out_after_fall_minus_one_intervals() {
    let rounds = Arc::new(Rounds::default());
    let cfg = active(1000 * MS, 0.0, 2000 * MS, 3);
    let (svc, t0) = endpoint(cfg, probe(&rounds, || Answer::Refuse));

    let out = ejected_at(&svc.handle()).await;
    // Rounds at 0, 1 s and 2 s, each failing at once: out when the third fails.
    assert_eq!(out - t0, 2000 * MS);
    assert_eq!(rounds.starts(), [t0, t0 + 1000 * MS, t0 + 2000 * MS]);
    assert_eq!(rounds.max_in_flight(), 1);
    drop(svc);
}

#[tokio::test(start_paused = true)]
async fn jittered_rounds_stay_within_the_documented_bounds() {
    // Many endpoints, each with its own random draws, at the largest jitter.
    for timeout in [300 * MS, 1400 * MS] {
        let cfg = active(1000 * MS, 0.5, timeout, 4);
        let mut probers = Vec::new();
        for _ in 0..20 {
            let rounds = Arc::new(Rounds::default());
            let (svc, t0) = endpoint(cfg, probe(&rounds, || Answer::Never));
            // Each watched from now, so every ejection instant is its own.
            let handle = svc.handle();
            let out = tokio::spawn(async move { ejected_at(&handle).await });
            probers.push((svc, t0, rounds, out));
        }
        let mut probers2 = Vec::new();
        for (svc, t0, rounds, out) in probers {
            let out = out.await.unwrap();
            let bound = black_hole_bound(&cfg);
            assert!(out - t0 <= bound, "out after {:?} > {bound:?}", out - t0);
            // Never sooner than the shortest spacing allows either.
            let least = (500 * MS).max(timeout) * 3 + timeout;
            assert!(out - t0 >= least, "out after {:?} < {least:?}", out - t0);
            assert_eq!(rounds.starts()[0], t0);
            probers2.push((svc, rounds));
        }
        // Every gap between round starts is a jittered interval, or a round's
        // timeout where that is longer.
        tokio::time::sleep(Duration::from_secs(20)).await;
        for (_, rounds) in &probers2 {
            let starts = rounds.starts();
            assert!(starts.len() >= 10, "{starts:?}");
            for gap in gaps(&starts) {
                assert!(
                    gap >= (500 * MS).max(timeout) && gap <= (1500 * MS).max(timeout),
                    "gap {gap:?} with a timeout of {timeout:?}"
                );
            }
            assert_eq!(rounds.max_in_flight(), 1, "rounds overlapped");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_goes_dark_is_out_within_the_bound_from_when_it_stopped() {
    // Healthy, then a black hole from 1.5 s on (between two round starts).
    let rounds = Arc::new(Rounds::default());
    let dark = Arc::new(AtomicBool::new(false));
    let cfg = active(1000 * MS, 0.0, 300 * MS, 3);
    let answer = {
        let dark = dark.clone();
        move || {
            if dark.load(Ordering::SeqCst) {
                Answer::Never
            } else {
                Answer::Pass
            }
        }
    };
    let (svc, t0) = endpoint(cfg, probe(&rounds, answer));
    let handle = svc.handle();

    tokio::time::sleep_until(t0 + 1500 * MS).await;
    assert_eq!(handle.status(), Status::Healthy);
    dark.store(true, Ordering::SeqCst);
    let went_dark = Instant::now();

    let out = ejected_at(&handle).await;
    // Failing rounds at 2 s, 3 s and 4 s: out at 4.3 s, within
    // `fall × P + timeout` (3.3 s) of going dark, and within the black-hole bound
    // (2.3 s) of the first failing round.
    assert_eq!(out - t0, 4300 * MS);
    let p = cfg.interval.max(cfg.timeout);
    assert!(out - went_dark <= p * cfg.unhealthy_threshold + cfg.timeout);
    assert_eq!(out - (t0 + 2000 * MS), black_hole_bound(&cfg));
    assert_eq!(rounds.max_in_flight(), 1);
    drop(svc);
}

#[tokio::test(start_paused = true)]
async fn the_prober_stops_with_the_last_clone_even_between_long_rounds() {
    let rounds = Arc::new(Rounds::default());
    let cfg = active(100 * MS, 0.0, 1000 * MS, 3);
    let (svc, t0) = endpoint(cfg, probe(&rounds, || Answer::Never));
    tokio::time::sleep_until(t0 + 2500 * MS).await;
    drop(svc);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Rounds at 0, 1 s and 2 s; the one under way when the service went ends at its
    // timeout, and no round starts after it.
    assert_eq!(rounds.starts().len(), 3);
    assert_eq!(rounds.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_never_overlap_on_a_multi_thread_runtime() {
    // Real time here (paused time needs a current-thread runtime), and nothing about
    // it is asserted: only that no round starts before the one it follows is gone,
    // across workers. Each round runs into its timeout, three intervals long.
    let rounds = Arc::new(Rounds::default());
    let cfg = active(10 * MS, 0.0, 30 * MS, 3);
    let (svc, _) = endpoint(cfg, probe(&rounds, || Answer::Never));
    let twenty = async {
        while rounds.starts().len() < 20 {
            tokio::time::sleep(10 * MS).await;
        }
    };
    // A cap for a prober that stopped, not a timing: 20 rounds take about 0.6 s.
    tokio::time::timeout(Duration::from_secs(60), twenty)
        .await
        .expect("20 rounds started");
    assert_eq!(rounds.max_in_flight(), 1, "rounds overlapped");
    drop(svc);
}
