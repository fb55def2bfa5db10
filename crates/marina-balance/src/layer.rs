//! `BalanceLayer` and discovery from a channel.

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc;
use tower::discover::{Change, Discover};
use tower_layer::Layer;
use tower_service::Service;

use crate::balance::Balance;
use crate::pick::Pick;

/// A [`Layer`] that turns a [`Discover`] into a [`Balance`] with a fresh picker from
/// `make_picker`.
///
/// ```
/// use marina_balance::{BalanceLayer, RoundRobin};
/// use tower::Layer;
/// use tower::discover::ServiceList;
/// use tower::service_fn;
///
/// let layer = BalanceLayer::new(RoundRobin::new);
/// let lb = Layer::<_>::layer(&layer, ServiceList::new(vec![service_fn(|r: u8| async move { Ok::<_, std::io::Error>(r) })]));
/// # let _: marina_balance::Balance<_, u8> = lb;
/// ```
pub struct BalanceLayer<F, Req> {
    make_picker: F,
    _req: std::marker::PhantomData<fn(Req)>,
}

impl<F, Req> BalanceLayer<F, Req> {
    /// Builds each balancer's picker with `make_picker`.
    pub fn new(make_picker: F) -> Self {
        BalanceLayer {
            make_picker,
            _req: std::marker::PhantomData,
        }
    }
}

impl<F: Clone, Req> Clone for BalanceLayer<F, Req> {
    fn clone(&self) -> Self {
        BalanceLayer::new(self.make_picker.clone())
    }
}

impl<F, Req> fmt::Debug for BalanceLayer<F, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer").finish_non_exhaustive()
    }
}

impl<D, F, P, Req> Layer<D> for BalanceLayer<F, Req>
where
    D: Discover,
    F: Fn() -> P,
    P: Pick,
{
    type Service = Balance<D, Req>;

    fn layer(&self, discover: D) -> Self::Service {
        Balance::new(discover, (self.make_picker)())
    }
}

/// Discovery from a channel of [`Change`]s: send `Change::Insert(key, service)` and
/// `Change::Remove(key)` from anywhere; the balancer applies them when it is next
/// polled (the channel is unbounded: with no traffic, changes queue until then).
/// Dropping every sender ends discovery (the current endpoints stay).
///
/// ```
/// use marina_balance::{Balance, ChangeStream, RoundRobin};
/// use tower::discover::Change;
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let (tx, changes) = ChangeStream::channel();
/// let mut lb = Balance::new(changes, RoundRobin::new());
/// tx.send(Change::Insert("a", service_fn(|r: u8| async move { Ok::<_, std::io::Error>(r) })))?;
/// assert_eq!(lb.ready().await?.call(7).await?, 7);
/// # Ok(()) }
/// ```
pub struct ChangeStream<K, S> {
    rx: mpsc::UnboundedReceiver<Change<K, S>>,
    /// The waker the channel holds, when the last poll left one there (returned
    /// `Pending` with budget to spare); cleared when a poll returns a change.
    registered: Option<std::task::Waker>,
}

impl<K, S> ChangeStream<K, S> {
    /// A sender of changes and the stream to hand to a balancer.
    pub fn channel() -> (mpsc::UnboundedSender<Change<K, S>>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            ChangeStream {
                rx,
                registered: None,
            },
        )
    }
}

impl<K, S> fmt::Debug for ChangeStream<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeStream").finish_non_exhaustive()
    }
}

impl<K, S> Stream for ChangeStream<K, S> {
    type Item = Result<Change<K, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // A balancer polls its discovery on every request; almost always nothing came.
        // While the channel still holds this task's waker (no change and no close since
        // the last `Pending`), an empty open channel answers `Pending` without a receive:
        // a change sent now wakes that waker.
        if let Some(w) = &self.registered
            && w.will_wake(cx.waker())
            && self.rx.is_empty()
            && !self.rx.is_closed()
        {
            return Poll::Pending;
        }
        // With the budget spent, the receive may answer `Pending` without registering.
        let budget = tokio::task::coop::has_budget_remaining();
        let polled = self.rx.poll_recv(cx);
        self.registered = match polled {
            Poll::Pending if budget => Some(cx.waker().clone()),
            _ => None,
        };
        polled.map(|c| c.map(Ok))
    }
}

impl<S, Req> Balance<tower::discover::ServiceList<Vec<S>>, Req>
where
    S: Service<Req>,
{
    /// A balancer over a fixed list of endpoint services (keyed by position).
    ///
    /// ```
    /// use marina_balance::{Balance, RoundRobin};
    /// use tower::{Service, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), marina_core::BoxError> {
    /// let mut lb = Balance::from_services(
    ///     (0..2).map(|n| service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(n) })),
    ///     RoundRobin::new(),
    /// );
    /// assert_eq!(lb.ready().await?.call(()).await?, 0);
    /// assert_eq!(lb.ready().await?.call(()).await?, 1);
    /// # Ok(()) }
    /// ```
    pub fn from_services(services: impl IntoIterator<Item = S>, picker: impl Pick) -> Self {
        Balance::new(
            tower::discover::ServiceList::new(services.into_iter().collect::<Vec<_>>()),
            picker,
        )
    }
}

impl<K, S, Req> Balance<ChangeStream<K, S>, Req>
where
    K: std::hash::Hash + Eq + Clone + fmt::Debug,
{
    /// A balancer whose endpoints come from a channel of [`Change`]s (see
    /// [`ChangeStream`]), and the sender to feed it.
    pub fn from_channel(picker: impl Pick) -> (mpsc::UnboundedSender<Change<K, S>>, Self) {
        let (tx, changes) = ChangeStream::channel();
        (tx, Balance::new(changes, picker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::task::{Wake, Waker};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn poll(
        s: &mut ChangeStream<u32, ()>,
        w: &Waker,
    ) -> Poll<Option<Result<Change<u32, ()>, Infallible>>> {
        Pin::new(s).poll_next(&mut Context::from_waker(w))
    }

    #[tokio::test]
    async fn a_change_after_pending_wakes_and_is_received() {
        let (tx, mut s) = ChangeStream::<u32, ()>::channel();
        let count = Arc::new(Count::default());
        let w = Waker::from(count.clone());
        assert!(poll(&mut s, &w).is_pending());
        // The fast path: still pending, nothing lost.
        assert!(poll(&mut s, &w).is_pending());
        tx.send(Change::Insert(1, ())).unwrap();
        assert_eq!(count.0.load(SeqCst), 1, "the registered waker is woken");
        assert!(matches!(
            poll(&mut s, &w),
            Poll::Ready(Some(Ok(Change::Insert(1, ()))))
        ));
        assert!(poll(&mut s, &w).is_pending());
        // A change sent between polls, without a wake-up in between being needed.
        tx.send(Change::Remove(1)).unwrap();
        assert!(matches!(
            poll(&mut s, &w),
            Poll::Ready(Some(Ok(Change::Remove(1))))
        ));
        // Another task's waker: registered afresh, and woken.
        let other = Arc::new(Count::default());
        let w2 = Waker::from(other.clone());
        assert!(poll(&mut s, &w2).is_pending());
        tx.send(Change::Insert(2, ())).unwrap();
        assert_eq!(other.0.load(SeqCst), 1);
        assert!(poll(&mut s, &w2).is_ready());
        // Closed after a pending poll: the end is seen.
        assert!(poll(&mut s, &w2).is_pending());
        drop(tx);
        assert!(matches!(poll(&mut s, &w2), Poll::Ready(None)));
    }
}
