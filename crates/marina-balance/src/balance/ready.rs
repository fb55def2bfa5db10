//! The ready set: discovery changes, endpoints moving between ready and pending,
//! ejections and panic mode.

use super::*;

impl<D, Req> Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + fmt::Debug,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    D::Error: Into<BoxError>,
{
    /// The slot of the endpoint with `key`, if any: found by its id (hashed from the
    /// key), or by a scan when two keys share an id.
    pub(crate) fn slot_of(&self, key: &D::Key, id: EndpointId) -> Option<usize> {
        let is = |slot: usize| self.slots[slot].as_ref().is_some_and(|e| e.key == *key);
        match self.by_id.get(id, |s| id_in(&self.slots, s)) {
            Some(slot) if is(slot as usize) => Some(slot as usize),
            _ if self.id_clashes > 0 => (0..self.slots.len()).find(|&slot| is(slot)),
            _ => None,
        }
    }

    pub(crate) fn insert(&mut self, key: D::Key, svc: D::Service) {
        let text = format!("{key:?}");
        let id = EndpointId::of(&text);
        if let Some(old) = self.slot_of(&key, id) {
            self.remove_slot(old);
        }
        let weight = match (&self.weigh, &self.weigh_service) {
            (Some(f), _) => f(&key).max(1),
            (None, Some(f)) => f(&svc).max(1),
            (None, None) => 1,
        };
        let stats = Arc::new(EndpointStats::with(
            id,
            text.into_boxed_str(),
            weight,
            &self.common,
        ));
        let slot = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.handle.set(slot, Some(stats.clone()));
        if let Some(f) = &self.failover {
            let peer = Peer {
                id,
                stats: stats.clone(),
                svc: (f.clone_svc)(&svc),
            };
            let mut peers = f.peers();
            if peers.len() <= slot {
                peers.resize_with(slot + 1, || None);
            }
            peers[slot] = Some(peer);
        }
        self.slots[slot] = Some(Endpoint {
            key,
            svc,
            stats,
            ready_pos: NOWHERE,
            pending_pos: self.pending.len() as u32,
            calls: 0,
        });
        self.pending.push(slot as u32);
        self.to_poll.push(slot as u32);
        if self.slow_start.is_some() {
            if self.slow.len() <= slot {
                self.slow.resize_with(slot + 1, SlowState::default);
            }
            self.slow[slot] = SlowState::new(self.started);
        }
        let slots = &self.slots;
        match self.by_id.get(id, |s| id_in(slots, s)) {
            Some(s) if s != slot as u32 => self.id_clashes += 1,
            _ => self.by_id.insert(id, slot as u32, |s| id_in(slots, s)),
        }
        self.count_endpoints();
        tracing::debug!(endpoint = ?self.slots[slot].as_ref().map(|e| &e.key), "endpoint added");
    }

    /// Moves the `marina_balance_endpoints` gauges to the sizes of the ready set and the
    /// pending list (every endpoint is in one of them). O(1).
    #[inline]
    fn count_endpoints(&mut self) {
        #[cfg(feature = "metrics")]
        self.gauges.endpoints(self.ready.len(), self.pending.len());
    }

    pub(crate) fn remove_slot(&mut self, slot: usize) {
        let Some(ep) = self.slots[slot].as_ref() else {
            return;
        };
        if ep.is_ready() {
            self.unready_at(ep.ready_pos as usize);
        }
        let id = self.slots[slot]
            .as_ref()
            .map_or(EndpointId(0), Endpoint::id);
        let holder = self.by_id.get(id, |s| id_in(&self.slots, s)) == Some(slot as u32);
        let Some(ep) = self.slots[slot].take() else {
            return;
        };
        if holder {
            let slots = &self.slots;
            self.by_id.remove(id, slot as u32, |s| id_in(slots, s));
            // Another endpoint with the same id (two keys, one id) takes its place.
            if self.id_clashes > 0
                && let Some(other) = slots
                    .iter()
                    .position(|e| e.as_ref().is_some_and(|e| e.id() == id))
            {
                self.by_id.insert(id, other as u32, |s| id_in(slots, s));
                self.id_clashes -= 1;
            }
        } else {
            self.id_clashes = self.id_clashes.saturating_sub(1);
        }
        self.handle.set(slot, None);
        if let Some(f) = &self.failover
            && let Some(p) = f.peers().get_mut(slot)
        {
            *p = None;
        }
        if ep.pending_pos != NOWHERE {
            self.leave_pending(ep.pending_pos as usize);
        }
        if self.candidate == Some(slot) {
            self.candidate = None;
        }
        if self.just_called == Some(slot) {
            self.just_called = None;
        }
        self.free.push(slot as u32);
        self.count_endpoints();
        tracing::debug!(endpoint = ?ep.key, "endpoint removed (its requests in flight complete)");
        // Dropping `ep.svc` here: requests in flight own their futures and finish.
    }

    /// Takes the entry at `pos` out of the pending list (swap-remove).
    pub(crate) fn leave_pending(&mut self, pos: usize) -> usize {
        let slot = self.pending.swap_remove(pos) as usize;
        if let Some(&moved) = self.pending.get(pos)
            && let Some(ep) = self.slots[moved as usize].as_mut()
        {
            ep.pending_pos = pos as u32;
        }
        if let Some(ep) = self.slots[slot].as_mut() {
            ep.pending_pos = NOWHERE;
        }
        slot
    }

    /// Takes the endpoint at `pos` out of the ready set (swap-remove; the set changes
    /// and the picker follows) and into the pending list.
    pub(crate) fn unready_at(&mut self, pos: usize) {
        let slot = self.ready.swap_remove(pos) as usize;
        if let Some(&moved) = self.ready.get(pos)
            && let Some(ep) = self.slots[moved as usize].as_mut()
        {
            ep.ready_pos = pos as u32;
        }
        let Some(ep) = self.slots[slot].as_mut() else {
            return;
        };
        ep.ready_pos = NOWHERE;
        ep.stats.ready.store(false, Relaxed);
        ep.pending_pos = self.pending.len() as u32;
        let id = ep.id();
        self.pending.push(slot as u32);
        self.to_poll.push(slot as u32);
        self.count_endpoints();
        self.generation += 1;
        if self.slow_start.is_some() {
            self.slow[slot].left();
        }
        let view = ReadyView {
            slots: &self.slots,
            ready: &self.ready,
            generation: self.generation,
            total: self.common.counts_total.then_some(&self.common.in_flight),
        };
        self.picker
            .update(&view, SetChange::Removed { index: pos, id });
    }

    /// Moves the pending endpoint at `pending_pos` into the ready set (the picker
    /// follows).
    pub(crate) fn make_ready(&mut self, pending_pos: usize) {
        let slot = self.leave_pending(pending_pos);
        let Some(ep) = self.slots[slot].as_mut() else {
            return;
        };
        ep.ready_pos = self.ready.len() as u32;
        ep.stats.ready.store(true, Relaxed);
        self.ready.push(slot as u32);
        self.count_endpoints();
        self.generation += 1;
        if let Some(config) = &self.slow_start {
            self.slow[slot].joined(config);
        }
        let view = ReadyView {
            slots: &self.slots,
            ready: &self.ready,
            generation: self.generation,
            total: self.common.counts_total.then_some(&self.common.in_flight),
        };
        self.picker.update(
            &view,
            SetChange::Added {
                index: self.ready.len() - 1,
            },
        );
    }

    /// Enters or leaves panic mode as the share of ejected endpoints crosses the
    /// threshold. O(1): an endpoint ejected while in the ready set leaves it when it is
    /// next polled — the one each request is sent to, or the one polled in turn after
    /// it — so it gets no request (re-polling every ready endpoint whenever the gate
    /// moved would cost O(N) per ejection and readmission).
    /// Returns whether panic mode started (the ejected endpoints may be ready now,
    /// though none of them woke).
    pub(crate) fn check_panic(&mut self) -> bool {
        let Some(gate) = &self.gate else {
            return false;
        };
        // The share moves only when a member's ejection changes (or a member leaves),
        // which moves the count: nothing to compute on most polls.
        let changes = gate.changes();
        if changes == self.gate_changes {
            return false;
        }
        self.gate_changes = changes;
        // An ejection or readmission somewhere: the endpoint checked for the next
        // request is checked again before it is used (it may be the one ejected).
        self.candidate = None;
        let share = gate.healthy_share();
        let panic = share < self.panic_threshold;
        if panic != self.panicking {
            self.panicking = panic;
            gate.set_open(panic);
            self.handle.totals.panicking.store(panic, Relaxed);
            #[cfg(feature = "metrics")]
            self.gauges.panic(panic);
            if panic {
                tracing::warn!(
                    healthy_share = share,
                    threshold = self.panic_threshold,
                    "panic threshold crossed: routing over every endpoint, ejected or not"
                );
                // The pending endpoints are polled next, and the gate lets ejected ones
                // through.
                return true;
            }
            tracing::info!(healthy_share = share, "panic mode over");
        }
        false
    }

    pub(crate) fn poll_discover(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        if self.discover_done {
            return Ok(());
        }
        // Every change already sent is applied before the next pick: discovery is
        // drained outside tokio's cooperative budget (a channel would otherwise hand
        // over at most 128 changes per task poll, and a fresh balancer over 512
        // backends would route over the first 128). Bounded per poll: past the bound,
        // the task is woken to come back for the rest.
        let mut taken = 0;
        loop {
            if taken == DISCOVER_PER_POLL {
                cx.waker().wake_by_ref();
                return Ok(());
            }
            taken += 1;
            let discover = &mut self.discover;
            let polled = {
                let mut next = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
                    Pin::new(&mut *discover).poll_discover(cx)
                }));
                Pin::new(&mut next).poll(cx)
            };
            match polled {
                Poll::Ready(Some(Ok(Change::Insert(key, svc)))) => self.insert(key, svc),
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    let id = EndpointId::of(&format!("{key:?}"));
                    if let Some(slot) = self.slot_of(&key, id) {
                        self.remove_slot(slot);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Err(e.into()),
                Poll::Ready(None) => {
                    // Discovery ended: keep the endpoints, never poll it again (a stream
                    // may panic when polled after its end).
                    self.discover_done = true;
                    return Ok(());
                }
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// Polls the pending endpoints that woke (or are new to the pending list), each
    /// with a waker of its own; the ready ones join the ready set. The others are not
    /// polled: their wakers bring them back, and wake the task.
    pub(crate) fn poll_pending(&mut self, cx: &Context<'_>) {
        if self.pending.is_empty() {
            self.to_poll.clear();
            return;
        }
        // The task to wake when a pending endpoint wakes: handed over (a clone and a
        // lock) only when it is not the one given last time, before any endpoint is
        // polled (so no wake-up is lost). Recognised by the raw parts of the waker
        // given, not by `will_wake` on the clone kept: a clone may carry a copy of the
        // same vtable at another address, and `will_wake` would then say no on every
        // request. (The clone keeps the waker's data alive, so those parts cannot come
        // back for another waker.)
        let given = (
            cx.waker().data() as usize,
            std::ptr::from_ref(cx.waker().vtable()) as usize,
        );
        if self.task.as_ref().is_none_or(|(_, last)| *last != given) {
            let task = cx.waker().clone();
            *lock(&self.wakes.task) = Some(task.clone());
            self.task = Some((task, given));
        }
        // (A plain load first: no read-modify-write per request while nothing woke.)
        if self.wakes.any.load(Acquire) && self.wakes.any.swap(false, Acquire) {
            let mut woken = lock(&self.wakes.woken);
            self.to_poll.append(&mut woken);
        }
        // In the order they came (endpoints discovered together join the ready set in
        // discovery order).
        let mut i = 0;
        while let Some(&slot) = self.to_poll.get(i) {
            i += 1;
            let Some(pos) = self.slots[slot as usize]
                .as_ref()
                .map(|e| e.pending_pos)
                .filter(|&p| p != NOWHERE)
            else {
                continue; // gone, or ready already
            };
            let waker = Waker::from(Arc::new(SlotWaker {
                slot,
                queued: AtomicBool::new(false),
                wakes: self.wakes.clone(),
            }));
            if self.poll_endpoint(slot as usize, &mut Context::from_waker(&waker)) {
                self.make_ready(pos as usize);
            }
        }
        self.to_poll.clear();
    }

    /// Polls one endpoint; `true` if it is ready. An endpoint whose `poll_ready` fails is
    /// removed (it cannot serve).
    pub(crate) fn poll_endpoint(&mut self, slot: usize, cx: &mut Context<'_>) -> bool {
        let Some(ep) = self.slots[slot].as_mut() else {
            return false;
        };
        match ep.svc.poll_ready(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Pending => false,
            Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                tracing::warn!(endpoint = ?ep.key, error = %e, "endpoint failed; removed");
                self.remove_slot(slot);
                false
            }
        }
    }
}
