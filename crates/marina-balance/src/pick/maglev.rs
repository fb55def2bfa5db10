//! The Maglev lookup table, rebuilt off the request path.
//!
//! A Maglev table (65,537 slots, each an endpoint) is filled from every endpoint's
//! preference permutation at once, so one change of the set means a new table: about a
//! millisecond or two of work, which a balancer must not do while it holds its lock. So
//! the table is rebuilt on a worker thread (one per picker, started at its first build,
//! ended when the picker is dropped) from a snapshot of the set's ids, while requests
//! keep going through the table in use: it maps endpoints by id to their current index
//! (kept up to date change by change, O(log N) each), a key whose endpoint has left
//! walks on to the next slot whose endpoint is there, and an endpoint that joined gets
//! keys once the new table is in. Changes that come while a build runs are logged and
//! applied to the new table when it comes in; further changes after a snapshot start
//! another build then (builds coalesce: at most one runs at a time).
//!
//! A picker used without a balancer's change reports (a view that changes between
//! picks) builds its table at the pick, as before.

use std::fmt;
use std::sync::mpsc;

use marina_core::EndpointId;

use super::{Endpoints, SetChange, mix};

/// Table size: a prime well above the endpoint count (the Maglev paper's). Fixed: a
/// smaller table for a small set would move more keys between endpoints that stayed
/// when one joins or leaves (about 2.7% of all keys at N = 100 with 41 slots per
/// endpoint, against 0.6% here), and a size that followed the set would move most keys
/// whenever it changed. So the table takes 256 KiB whatever the set's size: under 400
/// bytes per endpoint from about 700 endpoints on.
const SIZE: usize = 65_537;

/// `Table::index` of an endpoint that left.
const GONE: u32 = u32::MAX;

/// A Maglev table.
#[derive(Clone)]
struct Table {
    /// Its endpoints' ids, sorted (member numbers are positions here).
    ids: Vec<EndpointId>,
    /// Slot → member.
    slots: Vec<u32>,
    /// Member → its index in the view, `GONE` once it left.
    index: Vec<u32>,
}

impl Table {
    /// The table over `view_ids` (the view's ids by index). Members are taken in id
    /// order, so the table depends on the set of ids, not on their order.
    fn build(view_ids: &[EndpointId]) -> Table {
        let size = SIZE;
        let mut members: Vec<(EndpointId, u32)> = view_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        members.sort_unstable();
        members.dedup_by_key(|m| m.0);
        let n = members.len();
        let m = size as u64;
        let perms: Vec<(u64, u64)> = members
            .iter()
            .map(|(id, _)| {
                let offset = mix(id.0 ^ 0x6f66_6673_6574_0000) % m;
                let skip = mix(id.0 ^ 0x736b_6970_0000_0000) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut slots = vec![u32::MAX; size];
        let mut filled = 0;
        'outer: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'outer;
                }
            }
        }
        Table {
            ids: members.iter().map(|m| m.0).collect(),
            slots,
            index: members.iter().map(|m| m.1).collect(),
        }
    }

    /// Records that endpoint `id` is now at `index` (or `GONE`); nothing if the table
    /// does not hold it.
    fn set(&mut self, id: EndpointId, index: u32) {
        if let Ok(m) = self.ids.binary_search(&id) {
            self.index[m] = index;
        }
    }
}

/// Builds tables on a thread of its own.
struct Worker {
    jobs: mpsc::Sender<Vec<EndpointId>>,
    done: mpsc::Receiver<Table>,
}

impl Worker {
    fn spawn() -> Option<Worker> {
        let (jobs, job_rx) = mpsc::channel::<Vec<EndpointId>>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("marina-maglev".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                // Ends when the picker (the job sender) is dropped.
                while let Ok(ids) = job_rx.recv() {
                    if done_tx.send(Table::build(&ids)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Worker { jobs, done })
    }
}

/// One id's new index, logged while a build runs (applied to the new table).
type Logged = (EndpointId, u32);

/// A Maglev table that follows a view (see the module docs).
pub(super) struct Maglev {
    /// The table in use, if any yet.
    table: Option<Table>,
    /// The view's ids, by index (the snapshot the next build starts from).
    ids: Vec<EndpointId>,
    /// A build in flight: the changes since its snapshot.
    building: Option<Vec<Logged>>,
    /// The set changed since the snapshot of the table in use or in flight.
    stale: bool,
    /// The thread that builds, once started; `None` after a failed start too (then
    /// builds run in place).
    worker: Option<Worker>,
    worker_failed: bool,
    /// The view generation `ids` follows, if any.
    generation: Option<u64>,
    /// `ids` follows the view (false: resynchronised at the next pick).
    valid: bool,
}

impl Default for Maglev {
    /// No table yet: built at the first pick.
    fn default() -> Self {
        Maglev {
            table: None,
            ids: Vec::new(),
            building: None,
            stale: true,
            worker: None,
            worker_failed: false,
            generation: None,
            valid: false,
        }
    }
}

impl Clone for Maglev {
    /// A copy with the table in use; it builds its next tables on a thread of its own.
    fn clone(&self) -> Self {
        Maglev {
            table: self.table.clone(),
            ids: self.ids.clone(),
            building: None,
            stale: self.stale || self.building.is_some(),
            worker: None,
            worker_failed: self.worker_failed,
            generation: self.generation,
            valid: self.valid,
        }
    }
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("endpoints", &self.ids.len())
            .field("table", &self.table.as_ref().map(|t| t.ids.len()))
            .field("building", &self.building.is_some())
            .finish()
    }
}

impl Maglev {
    /// Follows `e` from now on, its first table built on the worker.
    pub(super) fn follow(e: &dyn Endpoints) -> Self {
        let mut m = Maglev::default();
        m.resync(e, false);
        m
    }

    /// Takes the view's ids afresh; with `now`, builds the table in place at once (a
    /// view without change reports), else on the worker.
    fn resync(&mut self, e: &dyn Endpoints, now: bool) {
        self.ids.clear();
        self.ids.extend((0..e.len()).map(|i| e.id(i)));
        self.generation = e.generation();
        self.valid = true;
        // A build in flight started from older ids: its table is dropped when it comes.
        self.stale = true;
        if now {
            self.table = Some(Table::build(&self.ids));
            self.stale = false;
            self.drain_worker();
        } else {
            self.start_build();
        }
    }

    /// Forgets a build in flight (its result is discarded when it comes).
    fn drain_worker(&mut self) {
        if self.building.take().is_some() {
            // The worker is busy with a snapshot no longer wanted: start afresh.
            self.worker = None;
        }
    }

    fn in_sync(&self, e: &dyn Endpoints) -> bool {
        if !self.valid || self.ids.len() != e.len() {
            return false;
        }
        match e.generation() {
            Some(g) => self.generation == Some(g),
            None => self.ids.iter().enumerate().all(|(i, id)| *id == e.id(i)),
        }
    }

    /// Installs a finished build, if one came in.
    fn poll_build(&mut self) {
        if self.building.is_none() {
            return;
        }
        let Some(worker) = &self.worker else {
            return;
        };
        let table = match worker.done.try_recv() {
            Ok(t) => t,
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.worker = None;
                self.building = None;
                self.stale = true;
                return;
            }
        };
        let mut table = table;
        for (id, index) in self.building.take().unwrap_or_default() {
            table.set(id, index);
        }
        self.table = Some(table);
        self.start_build();
    }

    /// Starts a build from the current ids if the set changed since the last snapshot
    /// and none is running.
    fn start_build(&mut self) {
        if !self.stale || self.building.is_some() {
            return;
        }
        if self.worker.is_none() && !self.worker_failed {
            self.worker = Worker::spawn();
            self.worker_failed = self.worker.is_none();
        }
        match &self.worker {
            Some(w) if w.jobs.send(self.ids.clone()).is_ok() => {
                self.building = Some(Vec::new());
                self.stale = false;
            }
            _ => {
                // No thread to build on: build here.
                self.worker = None;
                self.worker_failed = true;
                self.table = Some(Table::build(&self.ids));
                self.stale = false;
            }
        }
    }

    /// Records that `id` is at `index` (`GONE`: left) in the table in use and for the
    /// build in flight.
    fn set(&mut self, id: EndpointId, index: u32) {
        if let Some(t) = &mut self.table {
            t.set(id, index);
        }
        if let Some(log) = &mut self.building {
            log.push((id, index));
        }
    }

    /// Follows one change of the view: O(log N) now, a new table on the worker.
    pub(super) fn update(&mut self, e: &dyn Endpoints, change: SetChange) {
        self.poll_build();
        if !self.valid {
            return;
        }
        let len = e.len();
        match change {
            SetChange::Added { index } => {
                if index != self.ids.len() || index + 1 != len {
                    self.valid = false;
                    return;
                }
                let id = e.id(index);
                self.ids.push(id);
                self.set(id, index as u32);
            }
            SetChange::Removed { index, id } => {
                if self.ids.len() != len + 1 || index > len || self.ids[index] != id {
                    self.valid = false;
                    return;
                }
                self.ids.swap_remove(index);
                self.set(id, GONE);
                if index < len {
                    self.set(self.ids[index], index as u32);
                }
            }
        }
        self.generation = e.generation();
        self.stale = true;
        self.start_build();
    }

    /// The view index for `key`: its slot's endpoint, or the first after it that is
    /// there and `fits`. `None` while no table is in (the caller routes otherwise).
    pub(super) fn pick(
        &mut self,
        e: &dyn Endpoints,
        key: u64,
        fits: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        self.poll_build();
        if !self.in_sync(e) {
            // Changed without a report (or lost track): rebuild here, as a fresh picker
            // would.
            self.resync(e, true);
        }
        let t = self.table.as_ref()?;
        let size = t.slots.len();
        let start = (mix(key) % size as u64) as usize;
        let mut first = None;
        for k in 0..size {
            let i = t.index[t.slots[(start + k) % size] as usize];
            if i == GONE || i as usize >= e.len() {
                continue;
            }
            let i = i as usize;
            if fits(i) {
                return Some(i);
            }
            first.get_or_insert(i);
        }
        first
    }
}
