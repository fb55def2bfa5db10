//! The response future: classifies the outcome when it completes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use crate::classify::Classify;
use crate::shared::Shared;

pin_project! {
    /// The future of [`Health`](crate::Health)'s calls: the inner future, whose outcome
    /// is reported to the passive detectors when it completes.
    ///
    /// # Cancel safety
    ///
    /// Dropping it before it completes reports nothing (a cancelled request says nothing
    /// about the endpoint); if it carried the half-open trial, the trial goes to the next
    /// caller.
    pub struct ResponseFuture<F, K> {
        #[pin]
        inner: F,
        report: Option<Report<K>>,
    }
}

struct Report<K> {
    shared: Arc<Shared>,
    classify: Arc<K>,
    trial: Option<u64>,
}

impl<K> Drop for Report<K> {
    fn drop(&mut self) {
        if let Some(claim) = self.trial {
            self.shared.release_trial(claim);
        }
    }
}

impl<F, K> ResponseFuture<F, K> {
    pub(crate) fn new(inner: F, shared: Arc<Shared>, classify: Arc<K>, trial: Option<u64>) -> Self {
        ResponseFuture {
            inner,
            report: Some(Report {
                shared,
                classify,
                trial,
            }),
        }
    }
}

impl<F: fmt::Debug, K> fmt::Debug for ResponseFuture<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<F, K, T, E> Future for ResponseFuture<F, K>
where
    F: Future<Output = Result<T, E>>,
    K: Classify<T, E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some(mut r) = this.report.take() {
            let failed = r.classify.is_failure(out.as_ref());
            let trial = std::mem::take(&mut r.trial);
            r.shared.record(failed, trial);
        }
        Poll::Ready(out)
    }
}
