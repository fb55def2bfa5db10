//! What a run does: the fleet, the load, the stack's settings, the faults and when.

use std::time::Duration;

/// A fault or a scenario step, applied at a time of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Messages between the client and backend `i` are held (queued, not delivered).
    Hold(usize),
    /// Held messages to and from backend `i` flow again.
    Release(usize),
    /// Messages between the client and backend `i` are dropped.
    Partition(usize),
    /// Backend `i`'s link is repaired.
    Repair(usize),
    /// Backend `i`'s host crashes (its software and connections gone).
    Crash(usize),
    /// Backend `i`'s host starts again (after a crash) or restarts.
    Restart(usize),
    /// Backend `i` accepts and reads, and never answers (true), or answers again (false).
    BlackHole(usize, bool),
    /// The link to backend `i` takes up to this long per message (a delay spike);
    /// `None` puts the run's usual latency back.
    Delay(usize, Option<Duration>),
    /// The stack adds backend `i` (discovery).
    Add(usize),
    /// The stack removes backend `i` (discovery).
    Remove(usize),
}

impl Fault {
    /// The backend it is about.
    pub fn backend(self) -> usize {
        match self {
            Fault::Hold(i)
            | Fault::Release(i)
            | Fault::Partition(i)
            | Fault::Repair(i)
            | Fault::Crash(i)
            | Fault::Restart(i)
            | Fault::BlackHole(i, _)
            | Fault::Delay(i, _)
            | Fault::Add(i)
            | Fault::Remove(i) => i,
        }
    }

    /// Whether it takes a backend away from the sessions pinned to it (a failure that
    /// may re-pin them).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Fault::Hold(_)
                | Fault::Partition(_)
                | Fault::Crash(_)
                | Fault::BlackHole(_, true)
                | Fault::Delay(_, Some(_))
                | Fault::Remove(_)
        )
    }

    /// Applied by the client host (the stack's handle) rather than the network.
    pub fn is_discovery(self) -> bool {
        matches!(self, Fault::Add(_) | Fault::Remove(_))
    }
}

/// One scenario: run once per seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name (the test's name: the replay command names it).
    pub name: &'static str,
    /// Backend hosts in all (`b0`, `b1`, …).
    pub backends: usize,
    /// The backends the stack starts with (the first ones); the others join by
    /// discovery ([`Fault::Add`]).
    pub initial: usize,
    /// Client tasks sending concurrently.
    pub clients: usize,
    /// Requests each client sends, one after another.
    pub requests: usize,
    /// Keys (users, the per-key limit's key): client `c` sends as `u{c % keys}`.
    pub keys: usize,
    /// The pause between a client's requests.
    pub think: Duration,
    /// How long a backend takes to answer.
    pub service_time: Duration,
    /// Every `n`th request of a client is marked idempotent (0: none).
    pub idempotent_every: usize,
    /// Sticky sessions (by the request's session).
    pub sessions: bool,
    /// Clients that share one session (client `c` is in session `s{c / n}`… see
    /// [`sessions_count`](Self::sessions_count)); 1: each client its own session, its
    /// requests one at a time.
    pub clients_per_session: usize,
    /// Callers that give up: each request's future is dropped after a time drawn
    /// from this range (ms), if it has not ended by then (cancel safety).
    pub cancel_after: Option<(u64, u64)>,
    /// Hedging of idempotent requests after this long (the stack's `hedge`).
    pub hedge: Option<Duration>,
    /// Active health checks (a `ping` line every 250 ms, through the same connector).
    pub probe: bool,
    /// Per-key concurrency limit.
    pub concurrency: Option<usize>,
    /// Each attempt's timeout (the stack's `request_timeout`).
    pub request_timeout: Duration,
    /// The deadline of a whole request from its `call` (the stack's `deadline`).
    pub deadline: Duration,
    /// How long the stack's `poll_ready` may wait for a ready backend (its
    /// `failfast_timeout`).
    pub failfast: Duration,
    /// The network's usual latency range.
    pub latency: (Duration, Duration),
    /// The faults, at their times since the start.
    pub faults: Vec<(Duration, Fault)>,
    /// How long the run may last in sim time at most (the load ends long before).
    pub limit: Duration,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Scenario {
    /// A baseline: 4 backends, 8 clients × 60 requests, sessions on, a per-key limit,
    /// every third request idempotent, no faults.
    pub fn base(name: &'static str) -> Self {
        Scenario {
            name,
            backends: 4,
            initial: 4,
            clients: 8,
            requests: 60,
            keys: 2,
            think: ms(100),
            service_time: ms(5),
            idempotent_every: 3,
            sessions: true,
            clients_per_session: 1,
            probe: false,
            hedge: None,
            cancel_after: None,
            concurrency: Some(2),
            request_timeout: ms(500),
            deadline: ms(800),
            failfast: ms(500),
            latency: (ms(1), ms(10)),
            faults: Vec::new(),
            limit: Duration::from_secs(120),
        }
    }

    /// How many sessions: client `c` is in session `s{c % sessions_count}`.
    pub fn sessions_count(&self) -> usize {
        (self.clients / self.clients_per_session.max(1)).max(1)
    }

    /// The faults sorted by time (stable: same-time faults keep their order).
    pub fn sorted_faults(&self) -> Vec<(Duration, Fault)> {
        let mut f = self.faults.clone();
        f.sort_by_key(|(at, _)| *at);
        f
    }

    /// How many failures (see [`Fault::is_failure`]) the scenario has.
    pub fn failures(&self) -> usize {
        self.faults.iter().filter(|(_, f)| f.is_failure()).count()
    }

    /// Backend `i` partitioned (held) at 2 s, released at 5 s.
    pub fn partition() -> Self {
        Scenario {
            faults: vec![(ms(2000), Fault::Hold(1)), (ms(5000), Fault::Release(1))],
            ..Self::base("partition")
        }
    }

    /// Backend 1 crashes at 2 s and comes back at 4.5 s.
    pub fn crash_restart() -> Self {
        Scenario {
            faults: vec![(ms(2000), Fault::Crash(1)), (ms(4500), Fault::Restart(1))],
            probe: true,
            ..Self::base("crash_restart")
        }
    }

    /// Backend 2 black-holes (accepts, reads, never answers) from 1.5 s to 5 s.
    pub fn black_hole() -> Self {
        Scenario {
            faults: vec![
                (ms(1500), Fault::BlackHole(2, true)),
                (ms(5000), Fault::BlackHole(2, false)),
            ],
            ..Self::base("black_hole")
        }
    }

    /// Delay spikes: backend 0's link up to 400 ms per message from 1 s to 2.5 s,
    /// backend 3's up to 900 ms from 3 s to 4 s.
    pub fn delay_spikes() -> Self {
        Scenario {
            faults: vec![
                (ms(1000), Fault::Delay(0, Some(ms(400)))),
                (ms(2500), Fault::Delay(0, None)),
                (ms(3000), Fault::Delay(3, Some(ms(900)))),
                (ms(4000), Fault::Delay(3, None)),
            ],
            ..Self::base("delay_spikes")
        }
    }

    /// Backend 3 goes down and up every 1.5 s (crash, restart) for 6 s.
    pub fn flapping() -> Self {
        let mut faults = Vec::new();
        let mut t = 1000;
        while t < 7000 {
            faults.push((ms(t), Fault::Crash(3)));
            faults.push((ms(t + 1500), Fault::Restart(3)));
            t += 3000;
        }
        Scenario {
            faults,
            probe: true,
            ..Self::base("flapping")
        }
    }

    /// Discovery under load: starts with backends 0-2 of 5; adds 3 and 4, removes 0
    /// and 1, adds 0 back.
    pub fn discovery() -> Self {
        Scenario {
            backends: 5,
            initial: 3,
            faults: vec![
                (ms(1000), Fault::Add(3)),
                (ms(2000), Fault::Remove(0)),
                (ms(3000), Fault::Add(4)),
                (ms(4000), Fault::Remove(1)),
                (ms(5000), Fault::Add(0)),
            ],
            ..Self::base("discovery")
        }
    }

    /// Discovery churn: backend 1 removed and added back within milliseconds, again
    /// and again, while backend 2 crashes and restarts, hedging on.
    pub fn discovery_churn() -> Self {
        let mut faults = Vec::new();
        let mut t = 800;
        while t < 6500 {
            faults.push((ms(t), Fault::Remove(1)));
            faults.push((ms(t + 5), Fault::Add(1)));
            t += 700;
        }
        faults.push((ms(1500), Fault::Crash(2)));
        faults.push((ms(3000), Fault::Restart(2)));
        faults.push((ms(3200), Fault::Remove(2)));
        faults.push((ms(4200), Fault::Add(2)));
        Scenario {
            faults,
            hedge: Some(ms(100)),
            ..Self::base("discovery_churn")
        }
    }

    /// Callers that give up (each request dropped after 5-400 ms) while backend 0
    /// black-holes, backend 1's link slows and backend 2 crashes; small pools.
    pub fn cancellations() -> Self {
        Scenario {
            faults: vec![
                (ms(1000), Fault::BlackHole(0, true)),
                (ms(3000), Fault::BlackHole(0, false)),
                (ms(1500), Fault::Delay(1, Some(ms(600)))),
                (ms(4000), Fault::Delay(1, None)),
                (ms(2000), Fault::Crash(2)),
                (ms(3500), Fault::Restart(2)),
            ],
            cancel_after: Some((5, 400)),
            hedge: Some(ms(60)),
            ..Self::base("cancellations")
        }
    }

    /// Every backend crashes at 2 s; backend 2 comes back at 4 s, the others at 7 s.
    pub fn all_down_then_one() -> Self {
        let mut faults: Vec<_> = (0..4).map(|i| (ms(2000), Fault::Crash(i))).collect();
        faults.push((ms(4000), Fault::Restart(2)));
        faults.extend([0, 1, 3].map(|i| (ms(7000), Fault::Restart(i))));
        Scenario {
            faults,
            probe: true,
            ..Self::base("all_down_then_one")
        }
    }

    /// Faults drawn from the seed: each backend in turn suffers up to three of them
    /// (held, partitioned, crashed, black-holed, slowed), each for 0.3-2.5 s, between
    /// 0.5 s and 8 s; every one is over by 9 s.
    pub fn chaos(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut faults = Vec::new();
        for b in 0..4 {
            let mut t = rng.u64(500..2000);
            for _ in 0..rng.usize(1..=3) {
                let len = rng.u64(300..2500);
                if t + len > 8500 {
                    break;
                }
                let (on, off) = match rng.u8(0..5) {
                    0 => (Fault::Hold(b), Fault::Release(b)),
                    1 => (Fault::Partition(b), Fault::Repair(b)),
                    2 => (Fault::Crash(b), Fault::Restart(b)),
                    3 => (Fault::BlackHole(b, true), Fault::BlackHole(b, false)),
                    _ => (
                        Fault::Delay(b, Some(ms(rng.u64(100..1200)))),
                        Fault::Delay(b, None),
                    ),
                };
                faults.push((ms(t), on));
                faults.push((ms(t + len), off));
                t += len + rng.u64(200..2000);
            }
        }
        Scenario {
            faults,
            probe: seed.is_multiple_of(2),
            hedge: seed.is_multiple_of(3).then(|| ms(150)),
            ..Self::base("chaos")
        }
    }
}
