//! Choosing the endpoint for one request: the picker, slow start and the readiness re-
//! check.

use super::*;

/// How many times `call` lets the picker choose again when the endpoint it chose is no
/// longer ready.
pub(crate) const PICK_TRIES: usize = 4;

impl<D, Req> Balance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + fmt::Debug,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    D::Error: Into<BoxError>,
{
    /// The slot of the ready endpoint the picker chooses; the ready set is not empty.
    pub(crate) fn pick_slot(&mut self, hint: Option<&RouteHint>) -> usize {
        let view = ReadyView {
            slots: &self.slots,
            ready: &self.ready,
            generation: self.generation,
            total: self.common.counts_total.then_some(&self.common.in_flight),
        };
        let i = self.picker.pick(&view, hint).min(self.ready.len() - 1);
        self.ready[i] as usize
    }

    /// With slow start on: the picker's choice, where the ramps of the endpoints it
    /// chooses let it stand (up to `PICK_TRIES` choices); otherwise the least loaded
    /// ready endpoint not ramping, or (every ready one ramps) the first choice.
    /// `None` when no choice was usable (the caller's fallbacks follow).
    pub(crate) fn pick_slow_start(&mut self, hint: Option<&RouteHint>) -> Option<usize> {
        let config = self.slow_start?;
        let mut now = None;
        let mut turned_down = [usize::MAX; PICK_TRIES];
        for i in 0..PICK_TRIES {
            if self.ready.is_empty() {
                return None;
            }
            let slot = self.pick_slot(hint);
            // Once turned down, an endpoint stays down for this request (asking its ramp
            // again would let it through more often than its share).
            if turned_down.contains(&slot)
                || (self.ready.len() > 1 && !self.slow[slot].admit(&config, &mut now))
            {
                turned_down[i] = slot;
                continue;
            }
            if self.usable_now(slot) {
                return Some(slot);
            }
        }
        if turned_down.iter().all(|&slot| slot == usize::MAX) {
            return None;
        }
        // Every choice was turned down: the least loaded endpoint that does not ramp.
        while !self.ready.is_empty() {
            let steady = self
                .ready
                .iter()
                .map(|&slot| slot as usize)
                .filter(|&slot| !self.slow[slot].ramping())
                .min_by_key(|&slot| self.slots[slot].as_ref().map_or(0, |e| e.stats.in_flight()));
            match steady {
                Some(slot) if self.usable_now(slot) => return Some(slot),
                Some(_) => continue, // it left the ready set; look again
                None => break,
            }
        }
        turned_down
            .into_iter()
            .find(|&slot| slot != usize::MAX && self.is_ready_slot(slot) && self.usable_now(slot))
    }

    pub(crate) fn is_ready_slot(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(Endpoint::is_ready)
    }

    /// Polls a ready endpoint again; one that is not ready any more leaves the ready set
    /// (pending: to the pending ones, polled with the next `poll_ready`'s context;
    /// failed: removed). `true` if it is ready.
    pub(crate) fn recheck(&mut self, slot: usize, cx: &mut Context<'_>) -> bool {
        if self.poll_endpoint(slot, cx) {
            return true;
        }
        self.demote(slot);
        false
    }

    /// A ready endpoint found not ready (pending, or failed and removed) leaves the
    /// ready set.
    fn demote(&mut self, slot: usize) {
        if let Some(ep) = self.slots[slot].as_ref()
            && ep.is_ready()
        {
            self.unready_at(ep.ready_pos as usize);
        }
        if self.candidate == Some(slot) {
            self.candidate = None;
        }
    }

    /// In `call` (no task context): whether a ready endpoint can take the request now.
    /// The endpoint `poll_ready` checked with the task's context counts as ready; any
    /// other is polled once with a no-op waker (one found pending is polled with a real
    /// context by the next `poll_ready`).
    ///
    /// A pending answer while the task has spent tokio's cooperative budget may be the
    /// budget speaking (pools, semaphores and channels answer pending then, whatever
    /// they hold): the endpoint is asked once more outside the budget, so a hashed key
    /// or a pinned session does not move to another endpoint because its task did much
    /// work in one poll.
    pub(crate) fn usable_now(&mut self, slot: usize) -> bool {
        if self.candidate == Some(slot) {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.poll_endpoint(slot, &mut cx) {
            return true;
        }
        if self.slots[slot].is_some() && !tokio::task::coop::has_budget_remaining() {
            let mut again = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
                Poll::Ready(self.poll_endpoint(slot, cx))
            }));
            if let Poll::Ready(true) = Pin::new(&mut again).poll(&mut cx) {
                return true;
            }
        }
        self.demote(slot);
        false
    }
}
