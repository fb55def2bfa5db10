//! The invariants every run is checked against, from its event log.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::log::{Entry, Event, Id};
use crate::scenario::Scenario;

/// How late past its deadline a request may end (the sim's tick, timers firing on the
/// next tick, the edge's own polling).
pub const DEADLINE_SLACK: Duration = Duration::from_millis(50);

/// How often the client host's monitor reads the backends' health.
pub const MONITOR_EVERY: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Req {
    key: String,
    session: String,
    idempotent: bool,
    outcomes: Vec<(Duration, Result<usize, String>, Duration, Duration)>,
    /// (when, backend)
    delivered: Vec<(Duration, usize)>,
    replied: Vec<(Duration, usize)>,
    sent: Vec<(Duration, usize)>,
}

/// Every invariant the run broke, as text (empty: none).
pub fn check(s: &Scenario, entries: &[Entry]) -> Vec<String> {
    let mut v = Vec::new();
    let mut reqs: BTreeMap<Id, Req> = BTreeMap::new();
    let mut shutdown = None;
    let mut sessions = None;
    let mut leftovers = Vec::new();
    let mut client_streams = None;
    let mut connected: std::collections::BTreeSet<(usize, u16)> = Default::default();
    for e in entries {
        match &e.event {
            Event::Issued {
                id,
                key,
                session,
                idempotent,
                ..
            } => {
                let r = reqs.entry(*id).or_default();
                if !r.key.is_empty() {
                    v.push(format!("request {id} issued twice"));
                }
                r.key = key.clone();
                r.session = session.clone();
                r.idempotent = *idempotent;
            }
            Event::Delivered { id, backend, .. } => {
                reqs.entry(*id)
                    .or_default()
                    .delivered
                    .push((e.at, *backend));
            }
            Event::Replied { id, backend } => {
                reqs.entry(*id).or_default().replied.push((e.at, *backend));
            }
            Event::Sent { id, backend } => {
                reqs.entry(*id).or_default().sent.push((e.at, *backend));
            }
            Event::Outcome {
                id,
                result,
                waited,
                took,
            } => {
                reqs.entry(*id)
                    .or_default()
                    .outcomes
                    .push((e.at, result.clone(), *waited, *took));
            }
            Event::WrongReply { id, reply } => {
                v.push(format!("request {id} got a reply not its own: {reply:?}"));
            }
            Event::Shutdown { left, pool_total } => shutdown = Some((*left, *pool_total)),
            Event::Sessions { created, repinned } => sessions = Some((*created, *repinned)),
            Event::Connected { backend, port } => {
                connected.insert((*backend, *port));
            }
            Event::Leftover {
                backend,
                open,
                established,
            } => leftovers.push((*backend, open.clone(), *established)),
            Event::ClientStreams { live, .. } => client_streams = Some(*live),
            Event::HostError(msg) => v.push(format!("a host failed: {msg}")),
            _ => {}
        }
    }

    // No request lost or answered twice; each answer its own; no non-idempotent
    // request delivered (or written) twice; every request within its deadline.
    for (id, r) in &reqs {
        if r.key.is_empty() {
            v.push(format!("request {id} seen but never issued"));
            continue;
        }
        match r.outcomes.as_slice() {
            [] => v.push(format!("request {id} lost: no outcome")),
            [(_, result, waited, took)] => {
                if let Ok(b) = result
                    && !r.replied.iter().any(|(_, rb)| rb == b)
                {
                    v.push(format!(
                        "request {id} answered as from b{b}, which never replied to it"
                    ));
                }
                if *waited > s.failfast + DEADLINE_SLACK {
                    v.push(format!(
                        "request {id} waited {waited:?} for the stack to be ready, past its fail-fast timeout {:?} (+{DEADLINE_SLACK:?})",
                        s.failfast
                    ));
                }
                if *took > s.deadline + DEADLINE_SLACK {
                    v.push(format!(
                        "request {id} took {took:?}, past its deadline {:?} (+{DEADLINE_SLACK:?}): {result:?}",
                        s.deadline
                    ));
                }
            }
            many => v.push(format!("request {id} ended {} times: {many:?}", many.len())),
        }
        let mut per_backend = BTreeMap::new();
        for (_, b) in &r.replied {
            *per_backend.entry(*b).or_insert(0) += 1;
        }
        for (b, n) in per_backend {
            if n > 1 {
                v.push(format!("b{b} answered request {id} {n} times"));
            }
        }
        if !r.idempotent {
            if r.delivered.len() > 1 {
                v.push(format!(
                    "non-idempotent request {id} delivered {} times: {:?}",
                    r.delivered.len(),
                    r.delivered
                ));
            }
            if r.sent.len() > 1 {
                v.push(format!(
                    "non-idempotent request {id} written {} times: {:?}",
                    r.sent.len(),
                    r.sent
                ));
            }
        }
    }

    // No connection leaked.
    match shutdown {
        None => v.push("the stack never shut down".into()),
        Some((left, pool_total)) => {
            if left != 0 {
                v.push(format!("{left} requests still in flight at shutdown"));
            }
            if pool_total != 0 {
                v.push(format!(
                    "{pool_total} pooled connections open after shutdown"
                ));
            }
        }
    }
    match client_streams {
        None => v.push("no count of the client's streams at the end".into()),
        Some(0) => {}
        Some(n) => v.push(format!(
            "the client side still holds {n} streams after shutdown"
        )),
    }
    if leftovers.is_empty() {
        v.push("no leftover count at the end".into());
    }
    // A partition drops segments for good (turmoil does not retransmit): a FIN lost in
    // one leaves the backend's side half-open forever, as a real server without
    // keepalive would be. The client's side is checked above; the backend's only for
    // backends never partitioned.
    let partitioned = |b: usize| {
        s.faults
            .iter()
            .any(|(_, f)| matches!(f, crate::Fault::Partition(p) if *p == b))
    };
    // A connect the client gave up on before it completed (its connect timeout ran
    // out while the SYN-ACK was on its way) leaves the backend's side open too:
    // turmoil sends no RST for it, as a real client's kernel would. Only connections
    // the client side got (`Connected`) must be closed at the backend.
    for (b, open, established) in leftovers {
        let real: Vec<_> = open
            .iter()
            .filter(|port| connected.contains(&(b, **port)))
            .collect();
        if !real.is_empty() && !partitioned(b) {
            v.push(format!(
                "b{b} still holds {} connections the client had (client ports {real:?}; {established} established streams) after shutdown",
                real.len()
            ));
        }
    }

    v.extend(check_ejections(s, entries));
    v.extend(check_sessions(s, &reqs, sessions));
    v.extend(check_concurrency(s, &reqs));
    v
}

/// An ejected backend gets no new requests: none written to it from `request_timeout`
/// after its ejection (attempts already under way end by then) until its readmission,
/// outside panic mode.
fn check_ejections(s: &Scenario, entries: &[Entry]) -> Vec<String> {
    let mut v = Vec::new();
    let grace = s.request_timeout + MONITOR_EVERY;
    // Per ejected backend: since when, the requests written to it since, and whether
    // panic mode was on at any time in between.
    type Window = (Duration, Vec<(Duration, Id)>, bool);
    let mut since: BTreeMap<usize, Window> = BTreeMap::new();
    let mut panicking = false;
    for e in entries {
        match &e.event {
            Event::Panic(p) => {
                panicking = *p;
                if *p {
                    for w in since.values_mut() {
                        w.2 = true;
                    }
                }
            }
            Event::Ejected {
                backend,
                ejected: true,
            } => {
                since.insert(*backend, (e.at, Vec::new(), panicking));
            }
            Event::Ejected {
                backend,
                ejected: false,
            }
            | Event::Discovery {
                backend,
                added: false,
            } => {
                if let Some((from, sends, panic)) = since.remove(backend) {
                    // The monitor sees a readmission up to one poll late.
                    let until = e.at.saturating_sub(MONITOR_EVERY);
                    let late: Vec<_> = sends
                        .iter()
                        .filter(|(t, _)| *t > from + grace && *t < until)
                        .collect();
                    if !panic && !late.is_empty() {
                        v.push(format!(
                            "b{backend} ejected from {from:?} to {:?} got {} requests: {late:?}",
                            e.at,
                            late.len()
                        ));
                    }
                }
            }
            Event::Sent { id, backend } => {
                if let Some(w) = since.get_mut(backend) {
                    w.1.push((e.at, *id));
                }
            }
            _ => {}
        }
    }
    v
}

/// How long after a fault ends its backend may still shed sessions: its ejection
/// (up to 4 s in the simulated stack) and a request timeout.
pub const FAILURE_GRACE: Duration = Duration::from_secs(5);

/// Each backend's failure windows: from a failure to the fault that ends it, plus
/// [`FAILURE_GRACE`].
fn failure_windows(s: &Scenario) -> Vec<(usize, Duration, Duration)> {
    let faults = s.sorted_faults();
    let mut windows = Vec::new();
    for (i, (start, f)) in faults.iter().enumerate() {
        if !f.is_failure() {
            continue;
        }
        let b = f.backend();
        let end = faults[i + 1..]
            .iter()
            .find(|(_, g)| g.backend() == b && !g.is_failure())
            .map_or(Duration::MAX, |(at, _)| at.saturating_add(FAILURE_GRACE));
        windows.push((b, *start, end));
    }
    windows
}

/// Sessions re-pin at most once per failure: a session only leaves a backend that
/// was failing (within a failure window), and moves at most as many times as the
/// scenario has failures, plus once more each time it landed on a backend that was
/// still failing (a re-pin onto a slow backend, say, that then sheds it again).
///
/// With several clients per session, answers are not moves: requests routed before a
/// re-pin (and failover attempts, which go where the balancer sends each one) still
/// answer from other backends. There the table's own count is judged: at most one
/// re-pin per session per failure.
fn check_sessions(
    s: &Scenario,
    reqs: &BTreeMap<Id, Req>,
    table: Option<(u64, u64)>,
) -> Vec<String> {
    if !s.sessions {
        return Vec::new();
    }
    let mut v = Vec::new();
    if s.clients_per_session > 1 {
        match table {
            Some((created, repinned)) if repinned > created * s.failures() as u64 => {
                v.push(format!(
                    "{repinned} re-pins for {created} sessions with {} failures",
                    s.failures()
                ));
            }
            Some(_) => {}
            None => v.push("no sticky table counts at the end".to_string()),
        }
        return v;
    }
    let mut by_key: BTreeMap<&str, Vec<(Duration, usize)>> = BTreeMap::new();
    for r in reqs.values() {
        if let [(at, Ok(b), _, _)] = r.outcomes.as_slice() {
            by_key.entry(&r.session).or_default().push((*at, *b));
        }
    }
    let windows = failure_windows(s);
    let failing = |b: usize, from: Duration, to: Duration| {
        windows
            .iter()
            .any(|&(wb, ws, we)| wb == b && ws <= to && from <= we)
    };
    let failures = s.failures();
    for (key, mut served) in by_key {
        served.sort();
        let (mut moves, mut onto_failing) = (0, 0);
        for w in served.windows(2) {
            let ((t0, from), (t1, to)) = (w[0], w[1]);
            if from == to {
                continue;
            }
            moves += 1;
            if !failing(from, t0, t1) {
                v.push(format!(
                    "session {key} moved from b{from} (not failing) to b{to} between {t0:?} and {t1:?}"
                ));
            }
            if failing(to, t0, t1) {
                onto_failing += 1;
            }
        }
        if moves > failures + onto_failing {
            v.push(format!(
                "session {key} moved {moves} times with {failures} failures ({onto_failing} moves onto a failing backend): {served:?}"
            ));
        }
    }
    v
}

/// Per-key concurrency at the backends within the limit: the requests answered (whose
/// permits the client held from before sending to after the reply) overlap at most
/// `limit` at a time per key.
fn check_concurrency(s: &Scenario, reqs: &BTreeMap<Id, Req>) -> Vec<String> {
    let Some(limit) = s.concurrency else {
        return Vec::new();
    };
    let mut v = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<(Duration, i32)>> = BTreeMap::new();
    for r in reqs.values() {
        let [(_, Ok(b), _, _)] = r.outcomes.as_slice() else {
            continue;
        };
        let (Some(d), Some(e)) = (
            r.delivered.iter().find(|(_, db)| db == b),
            r.replied.iter().find(|(_, rb)| rb == b),
        ) else {
            continue;
        };
        let edges = by_key.entry(&r.key).or_default();
        edges.push((d.0, 1));
        edges.push((e.0, -1));
    }
    for (key, mut edges) in by_key {
        // Ends before starts at the same instant.
        edges.sort();
        let (mut now, mut max) = (0, 0);
        for (_, d) in edges {
            now += d;
            max = max.max(now);
        }
        if max > limit as i32 {
            v.push(format!(
                "key {key} had {max} requests at the backends at once, limit {limit}"
            ));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, event: Event) -> Entry {
        Entry {
            at: Duration::from_millis(ms),
            event,
        }
    }

    fn issued(id: Id, idempotent: bool) -> Event {
        Event::Issued {
            id,
            client: 0,
            key: "u0".into(),
            session: "s0".into(),
            idempotent,
        }
    }

    fn ok(id: Id, b: usize, took: u64) -> Event {
        Event::Outcome {
            id,
            result: Ok(b),
            waited: Duration::ZERO,
            took: Duration::from_millis(took),
        }
    }

    /// A clean run of one request, and the end of a run.
    fn clean() -> Vec<Entry> {
        vec![
            at(0, issued(1, false)),
            at(1, Event::Sent { id: 1, backend: 0 }),
            at(
                2,
                Event::Delivered {
                    id: 1,
                    backend: 0,
                    conn: 1,
                },
            ),
            at(3, Event::Replied { id: 1, backend: 0 }),
            at(4, ok(1, 0, 4)),
            at(
                10,
                Event::Shutdown {
                    left: 0,
                    pool_total: 0,
                },
            ),
            at(
                20,
                Event::Leftover {
                    backend: 0,
                    open: vec![],
                    established: 0,
                },
            ),
            at(
                20,
                Event::ClientStreams {
                    live: 0,
                    sockets: 0,
                },
            ),
        ]
    }

    fn scenario() -> Scenario {
        Scenario {
            concurrency: Some(1),
            ..Scenario::base("test")
        }
    }

    fn broken(mut log: Vec<Entry>, extra: Vec<Entry>) -> Vec<String> {
        log.extend(extra);
        log.sort_by_key(|e| e.at);
        check(&scenario(), &log)
    }

    #[test]
    fn a_clean_log_passes() {
        assert_eq!(check(&scenario(), &clean()), Vec::<String>::new());
        // A backend-side connection of a connect the client abandoned is no leak.
        let mut log = clean();
        log.push(at(
            20,
            Event::Leftover {
                backend: 1,
                open: vec![60000],
                established: 1,
            },
        ));
        assert_eq!(check(&scenario(), &log), Vec::<String>::new());
    }

    #[test]
    fn each_invariant_is_caught() {
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            ("lost", vec![at(5, issued(2, true))]),
            ("ended 2 times", vec![at(5, ok(1, 0, 5))]),
            (
                "delivered 2 times",
                vec![at(
                    5,
                    Event::Delivered {
                        id: 1,
                        backend: 1,
                        conn: 1,
                    },
                )],
            ),
            (
                "written 2 times",
                vec![at(5, Event::Sent { id: 1, backend: 1 })],
            ),
            (
                "answered request 1 2 times",
                vec![at(5, Event::Replied { id: 1, backend: 0 })],
            ),
            (
                "past its deadline",
                vec![
                    at(5, issued(3, true)),
                    at(3000, Event::Replied { id: 3, backend: 0 }),
                    at(3001, ok(3, 0, 3000)),
                ],
            ),
            (
                "never replied",
                vec![at(5, issued(4, true)), at(6, ok(4, 2, 1))],
            ),
            (
                "still holds 1 connections",
                vec![
                    at(
                        1,
                        Event::Connected {
                            backend: 1,
                            port: 50000,
                        },
                    ),
                    at(
                        20,
                        Event::Leftover {
                            backend: 1,
                            open: vec![50000],
                            established: 1,
                        },
                    ),
                ],
            ),
            (
                "client side still holds",
                vec![at(
                    21,
                    Event::ClientStreams {
                        live: 1,
                        sockets: 1,
                    },
                )],
            ),
            (
                "got 1 requests",
                vec![
                    at(
                        100,
                        Event::Ejected {
                            backend: 0,
                            ejected: true,
                        },
                    ),
                    at(900, issued(5, true)),
                    at(901, Event::Sent { id: 5, backend: 0 }),
                    at(950, Event::Replied { id: 5, backend: 0 }),
                    at(951, ok(5, 0, 51)),
                    at(
                        2000,
                        Event::Ejected {
                            backend: 0,
                            ejected: false,
                        },
                    ),
                ],
            ),
            (
                "session s0 moved",
                vec![
                    at(5, issued(6, true)),
                    at(7, Event::Replied { id: 6, backend: 1 }),
                    at(8, ok(6, 1, 3)),
                ],
            ),
            (
                "at once, limit 1",
                vec![
                    at(1, issued(7, true)),
                    at(
                        2,
                        Event::Delivered {
                            id: 7,
                            backend: 1,
                            conn: 1,
                        },
                    ),
                    at(6, Event::Replied { id: 7, backend: 1 }),
                    at(7, ok(7, 1, 6)),
                ],
            ),
        ];
        for (what, extra) in cases {
            let mut s = scenario();
            // Moving sessions is allowed once per failure: none here.
            s.faults.clear();
            let v = broken(clean(), extra);
            assert!(
                v.iter().any(|m| m.contains(what)),
                "{what:?} not caught: {v:?}"
            );
        }
    }
}
