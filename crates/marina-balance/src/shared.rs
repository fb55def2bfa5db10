//! `Shared`: one service (a [`Balance`](crate::Balance)) used by many clones, without a
//! task hop per request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use marina_core::{BoxError, WaitThenCall};
use pin_project_lite::pin_project;
use tower_service::Service;

/// A `Clone` handle to one service shared by every clone: the way to share a
/// [`Balance`](crate::Balance) between tasks (`Balance::shared`), or any service whose
/// error is [`BoxError`].
///
/// Each clone locks the service only to check readiness and send: no task hop per
/// request (tower's `Buffer` runs the service on a worker task and sends each request
/// through a channel to it). Readiness is checked again in `call` under the lock: a
/// clone whose `poll_ready` saw readiness that another clone then used still sends to a
/// ready service; if the service is not ready any more, the call waits for readiness
/// in its future.
///
/// Most services keep one waker per thing they wait on, and each poll replaces it
/// (tower#454); so the shared service is always polled with one fan-out waker that
/// wakes every clone waiting on it. A waiter that gave up costs a spurious wake-up,
/// never another waiter's.
///
/// When to use `Buffer` instead: when the service's futures must be driven on another
/// task, or when callers must not contend for a lock (the lock is held for one
/// `poll_ready` and one `call`, typically well under a microsecond).
///
/// # Sharing
///
/// `Clone`, and that is its purpose: every clone is a handle to the same service (for a
/// `Balance`: one ready set, one picker state, one set of statistics), and cloning
/// copies two `Arc`s. It is `Send + Sync` when the service is `Send`: clone it into
/// each task.
///
/// # Examples
///
/// ```
/// use marina_balance::{Balance, RoundRobin};
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), marina_core::BoxError> {
/// let endpoints = (0..2).map(|n| service_fn(move |r: u32| async move { Ok::<_, std::io::Error>(r + n) }));
/// let lb = Balance::from_services(endpoints, RoundRobin::new()).shared();
/// let mut tasks = Vec::new();
/// for i in 0..4 {
///     let lb = lb.clone(); // one balancer, four users
///     tasks.push(tokio::spawn(async move { lb.oneshot(i * 10).await }));
/// }
/// for t in tasks {
///     t.await??;
/// }
/// # Ok(()) }
/// ```
pub struct Shared<S> {
    inner: Arc<Mutex<S>>,
    fan_out: Arc<FanOut>,
}

/// Wakes every recorded waiter (its own lock: a service may wake synchronously while
/// the `Shared` lock is held).
#[derive(Default)]
struct FanOut {
    waiters: Mutex<Vec<Waker>>,
}

impl FanOut {
    fn lock(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, waker: &Waker) {
        let mut w = self.lock();
        if !w.iter().any(|old| old.will_wake(waker)) {
            // Waiters that gave up stay until the next wake-up: past a bound, wake
            // everyone now (live waiters poll again and re-register).
            if w.len() >= 1024 {
                for old in w.drain(..) {
                    old.wake();
                }
            }
            w.push(waker.clone());
        }
    }
}

impl Wake for FanOut {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waiters = std::mem::take(&mut *self.lock());
        for w in waiters {
            w.wake();
        }
    }
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared {
            inner: self.inner.clone(),
            fan_out: self.fan_out.clone(),
        }
    }
}

impl<S> fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl<S> Shared<S> {
    /// Shares `svc` between this handle and its clones.
    pub fn new(svc: S) -> Self {
        Shared {
            inner: Arc::new(Mutex::new(svc)),
            fan_out: Arc::default(),
        }
    }

    /// Runs `f` with the shared service locked (for example to read a balancer's
    /// handle). Keep it short: every clone waits for the lock meanwhile.
    pub fn with<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut lock(&self.inner))
    }
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `svc` for readiness on behalf of `waiter` (if any) through the fan-out waker.
fn poll_shared<S, Req>(
    svc: &mut S,
    fan_out: &Arc<FanOut>,
    waiter: Option<&Waker>,
) -> Poll<Result<(), BoxError>>
where
    S: Service<Req, Error = BoxError>,
{
    let waker = Waker::from(fan_out.clone());
    let mut cx = Context::from_waker(&waker);
    let out = svc.poll_ready(&mut cx);
    let Some(w) = waiter else {
        return out;
    };
    if out.is_ready() {
        return out; // the fast path: no waiter bookkeeping
    }
    // Pending: record the waiter, then look again (readiness may have come, and the
    // fan-out fired, between the first poll and the registration).
    fan_out.register(w);
    let again = svc.poll_ready(&mut cx);
    if again.is_ready() {
        fan_out.lock().retain(|old| !old.will_wake(w));
    }
    again
}

impl<S, Req> Service<Req> for Shared<S>
where
    S: Service<Req, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = SharedFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        poll_shared::<S, Req>(&mut lock(&self.inner), &self.fan_out, Some(cx.waker()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let mut svc = lock(&self.inner);
        match poll_shared::<S, Req>(&mut svc, &self.fan_out, None) {
            Poll::Ready(Ok(())) => SharedFuture {
                inner: WaitThenCall::calling(svc.call(req), ()),
            },
            Poll::Ready(Err(e)) => SharedFuture {
                inner: WaitThenCall::failed(e),
            },
            Poll::Pending => SharedFuture {
                inner: WaitThenCall::waiting(ReadyWait {
                    inner: self.inner.clone(),
                    fan_out: self.fan_out.clone(),
                    req: Some(req),
                }),
            },
        }
    }
}

pin_project! {
    /// The future of a [`Shared`] call: the service's response future, or (when the
    /// service was not ready any more at `call`) a wait for readiness first.
    ///
    /// # Cancel safety
    ///
    /// Dropping it drops the request: while it waits for readiness nothing was sent;
    /// once sent, dropping it drops the service's future.
    pub struct SharedFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: WaitThenCall<ReadyWait<S, Req>, S::Future, ()>,
    }
}

/// A call that found the shared service not ready: waits for readiness, then calls
/// under the lock.
pub(crate) struct ReadyWait<S, Req> {
    inner: Arc<Mutex<S>>,
    fan_out: Arc<FanOut>,
    req: Option<Req>,
}

// Nothing in it is pinned (the request is moved out, never pinned).
impl<S, Req> Unpin for ReadyWait<S, Req> {}

impl<S: Service<Req>, Req> fmt::Debug for SharedFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for ReadyWait<S, Req>
where
    S: Service<Req, Error = BoxError>,
{
    type Output = Result<(S::Future, ()), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut svc = lock(&this.inner);
        std::task::ready!(poll_shared::<S, Req>(
            &mut svc,
            &this.fan_out,
            Some(cx.waker())
        ))?;
        let req = this.req.take().expect("called once");
        Poll::Ready(Ok((svc.call(req), ())))
    }
}

impl<S, Req> Future for SharedFuture<S, Req>
where
    S: Service<Req, Error = BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::Acquire};
    use std::time::Duration;

    /// Pending until opened; remembers only the last waker, as most services do.
    #[derive(Clone, Default)]
    struct Door {
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<std::task::Waker>>>,
    }

    impl Service<u32> for Door {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.open.load(Acquire) {
                return Poll::Ready(Ok(()));
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, req: u32) -> Self::Future {
            std::future::ready(Ok(req))
        }
    }

    /// Opens the door and wakes the one waker the service kept.
    fn open(door: &Door) {
        door.open.store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = door.waker.lock().unwrap().take() {
            w.wake();
        }
    }

    #[tokio::test]
    async fn a_waiter_is_woken_though_a_later_waiter_gave_up() {
        use tower::ServiceExt;
        let door = Door::default();
        let shared = Shared::new(door.clone());
        let a = tokio::spawn(shared.clone().oneshot(1));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // B waits after A (the service now keeps B's waker), then gives up.
        let mut b = shared.clone();
        let gave_up = tokio::time::timeout(Duration::from_millis(10), b.ready()).await;
        assert!(gave_up.is_err());
        open(&door);
        let got = tokio::time::timeout(Duration::from_secs(5), a)
            .await
            .expect("A is woken")
            .unwrap()
            .unwrap();
        assert_eq!(got, 1);
    }

    #[tokio::test]
    async fn a_waiter_is_woken_though_a_dropped_call_polled_last() {
        use tower::ServiceExt;
        let door = Door::default();
        let shared = Shared::new(door.clone());
        let a = tokio::spawn(shared.clone().oneshot(1));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // A call made without readiness re-checks it, finds it pending, and is dropped.
        let mut b = shared.clone();
        drop(b.call(2));
        open(&door);
        let got = tokio::time::timeout(Duration::from_secs(5), a)
            .await
            .expect("A is woken")
            .unwrap()
            .unwrap();
        assert_eq!(got, 1);
    }

    #[tokio::test]
    async fn every_waiting_clone_proceeds_when_the_shared_service_is_ready() {
        use tower::ServiceExt;
        let door = Door::default();
        let shared = Shared::new(door.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..8u32 {
            let svc = shared.clone();
            tasks.spawn(async move { svc.oneshot(i).await.unwrap() });
        }
        // Let every task wait.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        open(&door); // wakes only the last waiter's task, as the service would
        let mut got = Vec::new();
        let all = async {
            while let Some(r) = tasks.join_next().await {
                got.push(r.unwrap());
            }
        };
        tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .expect("every waiter proceeds");
        got.sort_unstable();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
    }
}
