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
}

impl<K, S> ChangeStream<K, S> {
    /// A sender of changes and the stream to hand to a balancer.
    pub fn channel() -> (mpsc::UnboundedSender<Change<K, S>>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, ChangeStream { rx })
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
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
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
