//! What the echo run watches while it runs: per-backend request rates, latency
//! percentiles per tick, and a timeline of health changes and of what the demo did to
//! its backends. Both the dashboard and the plain progress lines read it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use marina::StackStats;
use marina::health::Status;

/// How many samples each history keeps (a minute at 4 ticks a second).
const KEEP: usize = 240;

/// Latencies of the requests completed since the last tick, in log-spaced buckets
/// (four per power of two: at most ~19 % off), lock-free for the clients.
pub(crate) struct LatencyWindow {
    buckets: Vec<AtomicU64>,
}

const BUCKETS: usize = 16 + 28 * 4;

fn bucket_of(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let log = 63 - u64::from(us.leading_zeros()); // ≥ 4
    let sub = (us >> (log - 2)) & 3;
    (16 + (log - 4) * 4 + sub).min(BUCKETS as u64 - 1) as usize
}

/// The upper end of bucket `i`, in µs.
fn bucket_top(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let log = (i - 16) / 4 + 4;
    let sub = ((i - 16) % 4) as u64;
    ((4 + sub + 1) << (log - 2)) - 1
}

impl LatencyWindow {
    pub(crate) fn new() -> Self {
        LatencyWindow {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
    }

    /// p50 and p99 (µs) of what was recorded since the last call, which empties it;
    /// `None` with nothing recorded.
    fn take_percentiles(&self) -> Option<(u64, u64)> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.swap(0, Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let at = |p: f64| {
            let rank = ((total as f64 * p).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_top(i);
                }
            }
            bucket_top(BUCKETS - 1)
        };
        Some((at(0.50), at(0.99)))
    }
}

/// One thing that happened to a backend.
#[derive(Clone, Debug)]
pub(crate) enum What {
    /// Its health changed (from, to, the new one in words when it changed).
    Health(Status, Status, String),
    /// The demo did something to it (killed, restarted, black hole).
    Demo(String),
}

/// Something that happened, `t` seconds into the run.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub(crate) t: f64,
    pub(crate) addr: SocketAddr,
    pub(crate) what: What,
}

impl Event {
    /// Worth a line in the event list and the summary: everything but the first
    /// `unknown → healthy` of each backend.
    pub(crate) fn notable(&self) -> bool {
        !matches!(self.what, What::Health(Status::Unknown, ..))
    }

    pub(crate) fn text(&self) -> String {
        match &self.what {
            // Out of an ejection into half-open: one trial request decides.
            What::Health(Status::Ejected { .. }, Status::Degraded, _) => {
                format!("{} half-open: one trial request decides", self.addr)
            }
            What::Health(Status::Ejected { .. }, _, to) => {
                format!("{} readmitted: {to}", self.addr)
            }
            What::Health(_, _, to) => format!("{} {to}", self.addr),
            What::Demo(what) => format!("{} {what}", self.addr),
        }
    }
}

/// A health status in a few words (marina-health's `Display`: "healthy", "ejected,
/// 0.7 s left").
pub(crate) fn status_text(s: &Status) -> String {
    s.to_string()
}

/// The run's timeline of events, shared with the health watchers.
#[derive(Default)]
pub(crate) struct Timeline(Mutex<Vec<Event>>);

impl Timeline {
    pub(crate) fn push(&self, t: f64, addr: SocketAddr, what: What) {
        self.0.lock().unwrap().push(Event { t, addr, what });
    }

    pub(crate) fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}

/// The histories, sampled once a tick.
pub(crate) struct Live {
    pub(crate) addrs: Vec<SocketAddr>,
    /// Per backend: requests per second over each tick.
    pub(crate) rates: Vec<VecDeque<u64>>,
    /// p50 and p99 latency per tick, in µs (0: nothing completed in that tick).
    pub(crate) p50: VecDeque<u64>,
    pub(crate) p99: VecDeque<u64>,
    last_requests: Vec<u64>,
    last_at: f64,
}

impl Live {
    pub(crate) fn new(addrs: Vec<SocketAddr>) -> Self {
        let n = addrs.len();
        Live {
            addrs,
            rates: vec![VecDeque::new(); n],
            p50: VecDeque::new(),
            p99: VecDeque::new(),
            last_requests: vec![0; n],
            last_at: 0.0,
        }
    }

    /// Takes a sample at `t` seconds into the run.
    pub(crate) fn sample(&mut self, t: f64, stats: &StackStats, latency: &LatencyWindow) {
        let dt = (t - self.last_at).max(1e-3);
        self.last_at = t;
        for (i, addr) in self.addrs.iter().enumerate() {
            let requests = stats
                .backends
                .iter()
                .find(|b| b.addr == *addr)
                .and_then(|b| b.balance.as_ref())
                .map_or(0, |e| e.requests);
            let delta = requests.saturating_sub(self.last_requests[i]);
            self.last_requests[i] = requests;
            push(&mut self.rates[i], (delta as f64 / dt).round() as u64);
        }
        let (p50, p99) = latency.take_percentiles().unwrap_or((0, 0));
        push(&mut self.p50, p50);
        push(&mut self.p99, p99);
    }
}

fn push(history: &mut VecDeque<u64>, value: u64) {
    if history.len() == KEEP {
        history.pop_front();
    }
    history.push_back(value);
}

/// A duration in µs as short text: "850 µs", "12.3 ms".
pub(crate) fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// The client-seen error as one line with its causes: "request not sent: pool failed
/// to connect: connection refused" (a cause whose text the line already holds is not
/// repeated).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let t = cause.to_string();
        if !t.is_empty() && !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        next = cause.source();
    }
    text
}

/// `text` with each duration ("77.469µs", "1.2s") replaced by "…", so that errors
/// that differ only by a wait are counted together.
pub(crate) fn vague_durations(text: &str) -> String {
    let is_duration = |word: &str| {
        ["ns", "µs", "us", "ms", "s"].iter().any(|unit| {
            word.strip_suffix(unit).is_some_and(|n| {
                n.starts_with(|c: char| c.is_ascii_digit())
                    && n.chars().all(|c| c.is_ascii_digit() || c == '.')
            })
        })
    };
    text.split(' ')
        .map(|w| {
            // Punctuation after the duration stays.
            let core = w.trim_end_matches([',', ';', ')', '.']);
            if is_duration(core) {
                format!("…{}", &w[core.len()..])
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values() {
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            999,
            1000,
            123_456,
            u64::from(u32::MAX),
        ] {
            let i = bucket_of(us);
            assert!(
                bucket_top(i) >= us,
                "{us} in bucket {i} tops at {}",
                bucket_top(i)
            );
            if i > 0 {
                assert!(bucket_top(i - 1) < us, "{us} belongs below bucket {i}");
            }
        }
    }

    #[test]
    fn percentiles_of_a_window() {
        let w = LatencyWindow::new();
        assert_eq!(w.take_percentiles(), None);
        for _ in 0..99 {
            w.record(Duration::from_micros(100));
        }
        w.record(Duration::from_millis(50));
        let (p50, p99) = w.take_percentiles().unwrap();
        assert!((100..=120).contains(&p50), "{p50}");
        assert!((100..=120).contains(&p99), "{p99}");
        w.record(Duration::from_millis(50));
        let (p50, _) = w.take_percentiles().unwrap();
        assert!((50_000..=60_000).contains(&p50), "{p50}");
    }

    #[test]
    fn durations_are_blurred() {
        assert_eq!(
            vague_durations("rate limited: retry after 77.469µs"),
            "rate limited: retry after …"
        );
        assert_eq!(
            vague_durations("timed out after 300ms, 2 attempts on 127.0.0.1:80"),
            "timed out after …, 2 attempts on 127.0.0.1:80"
        );
    }

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_walks_sources_once() {
        let e = E(
            "request not sent",
            Some(Box::new(E(
                "pool failed to connect: connection refused",
                Some(Box::new(E("connection refused", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "request not sent: pool failed to connect: connection refused"
        );
    }
}
