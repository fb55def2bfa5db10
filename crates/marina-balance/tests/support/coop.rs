//! Tokio's cooperative budget in tests: an endpoint whose readiness takes a unit of the
//! budget, as a pool, a semaphore or a channel does, and a way to spend the budget
//! without yielding.

use std::task::{Context, Poll};

use tower::Service;

/// `S`, with a `poll_ready` that first takes a unit of the task's cooperative budget:
/// pending, and its task woken, when the task has spent it.
#[derive(Clone)]
pub(crate) struct Budgeted<S>(pub S);

impl<S: Service<R>, R> Service<R> for Budgeted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        coop.made_progress();
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.0.call(req)
    }
}

/// Spends the task's cooperative budget without yielding.
pub(crate) fn spend_budget(cx: &mut Context<'_>) {
    while let Poll::Ready(coop) = tokio::task::coop::poll_proceed(cx) {
        coop.made_progress();
    }
}
