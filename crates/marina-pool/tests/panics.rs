//! A panic in user code the pool runs — the checkout check, the connector's `call` and
//! its future, a manager's hooks, a background probe, a tracing subscriber, a
//! connection's `Drop`, the `min_idle` refill — leaves the pool whole: the connection
//! involved is dropped, its slot freed, waiters woken, and the maintenance task goes on.
//! The panic itself may reach the caller of `get()`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};
use std::time::Duration;

use marina_core::{BoxError, probe_fn};
use marina_pool::{Manage, Managed, Pool, PoolStats};
use tower::{Service, service_fn};

/// True once: the armed flag is taken.
fn fire(flag: &AtomicBool) -> bool {
    flag.swap(false, SeqCst)
}

fn builder() -> marina_pool::Builder {
    Pool::builder()
        .max_size(1)
        .acquire_timeout(Duration::from_secs(1))
        .health_check_interval(None)
        .no_expiry()
}

fn counting_connector(
    calls: Arc<AtomicUsize>,
) -> impl Service<(), Response = u64, Error = Infallible, Future = impl Send> + Clone + Send {
    service_fn(move |_: ()| {
        let n = calls.fetch_add(1, SeqCst) as u64;
        async move { Ok::<_, Infallible>(n) }
    })
}

#[track_caller]
fn assert_empty(s: &PoolStats) {
    assert_eq!(
        (s.total, s.active, s.idle, s.connecting, s.waiting),
        (0, 0, 0, 0, 0),
        "{s:#?}"
    );
    assert_eq!(s.acquired, s.released, "{s:#?}");
    assert_eq!(s.created, s.destroyed, "{s:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_check_that_panics_once_leaves_the_pool_usable() {
    let armed = Arc::new(AtomicBool::new(false));
    let pool = builder()
        .check({
            let armed = armed.clone();
            move |_: &mut u64| {
                if fire(&armed) {
                    panic!("check panics");
                }
                true
            }
        })
        .build(counting_connector(Arc::default()), ())
        .unwrap();
    drop(pool.get().await.unwrap()); // one idle connection
    armed.store(true, SeqCst);
    let r = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get().await.map(drop) }
    })
    .await;
    assert!(r.unwrap_err().is_panic(), "the panic reaches the caller");
    // Before the fix: total 1, active 1, no connection, and every get() timed out.
    assert_empty(&pool.stats());
    let conn = pool.get().await.expect("the pool is usable");
    assert_eq!(*conn, 1, "a new connection");
}

#[tokio::test(start_paused = true)]
async fn a_check_that_panics_in_a_woken_waiter_passes_the_slot_on() {
    let armed = Arc::new(AtomicBool::new(false));
    let pool = builder()
        .acquire_timeout(Duration::from_secs(60))
        .check({
            let armed = armed.clone();
            move |_: &mut u64| {
                if fire(&armed) {
                    panic!("check panics");
                }
                true
            }
        })
        .build(counting_connector(Arc::default()), ())
        .unwrap();
    let held = pool.get().await.unwrap();
    let spawn_get = || {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get().await.map(|c| *c) })
    };
    let first = spawn_get();
    tokio::task::yield_now().await;
    let second = spawn_get();
    tokio::task::yield_now().await;
    assert_eq!(pool.stats().waiting, 2);
    armed.store(true, SeqCst);
    drop(held); // handed to `first`, whose check panics
    assert!(first.await.unwrap_err().is_panic());
    let got = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the next waiter was woken")
        .unwrap()
        .expect("and connected in the freed slot");
    assert_eq!(got, 1);
    let s = pool.stats();
    assert_eq!((s.total, s.idle, s.waiting), (1, 1, 0), "{s:#?}");
}

/// A connector whose `call` (or its future) panics when armed.
#[derive(Clone)]
struct Panicky {
    in_call: Arc<AtomicBool>,
    in_future: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Panicky {
    fn new() -> Self {
        Panicky {
            in_call: Arc::default(),
            in_future: Arc::default(),
            calls: Arc::default(),
        }
    }
}

impl Service<()> for Panicky {
    type Response = u64;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<u64, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        if fire(&self.in_call) {
            panic!("connector call panics");
        }
        let n = self.calls.fetch_add(1, SeqCst) as u64;
        let in_future = self.in_future.clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            if fire(&in_future) {
                panic!("connect future panics");
            }
            Ok(n)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_connector_that_panics_in_call_or_future_leaves_the_pool_usable() {
    let connector = Panicky::new();
    let pool = builder().build(connector.clone(), ()).unwrap();
    for flag in [&connector.in_call, &connector.in_future] {
        flag.store(true, SeqCst);
        let r = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get().await.map(drop) }
        })
        .await;
        assert!(r.unwrap_err().is_panic());
        assert_empty(&pool.stats());
        // Usable; closed again, so the next round connects.
        pool.get().await.expect("the pool is usable").poison();
    }
}

/// A manager whose hooks panic when armed.
#[derive(Default)]
struct Hooked {
    broken: Arc<AtomicBool>,
    recycle: Arc<AtomicBool>,
    transient: Arc<AtomicBool>,
    fail_next: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for Refused {}

impl Manage<()> for Hooked {
    type Conn = u64;
    type Error = Refused;

    async fn connect(&self, _: &()) -> Result<u64, Refused> {
        if fire(&self.fail_next) {
            Err(Refused)
        } else {
            Ok(0)
        }
    }

    fn is_broken(&self, _: &mut u64) -> bool {
        if fire(&self.broken) {
            panic!("is_broken panics");
        }
        false
    }

    fn recycle(&self, _: &mut u64) -> Option<impl Future<Output = Result<(), Refused>> + Send> {
        let armed = self.recycle.clone();
        Some(async move {
            tokio::task::yield_now().await;
            if fire(&armed) {
                panic!("recycle panics");
            }
            Ok(())
        })
    }

    fn is_transient(&self, _: &Refused) -> bool {
        if fire(&self.transient) {
            panic!("is_transient panics");
        }
        true
    }
}

#[tokio::test(start_paused = true)]
async fn a_manager_whose_hooks_panic_leaves_the_pool_usable() {
    let hooked = Hooked::default();
    let (broken, recycle, transient, fail_next) = (
        hooked.broken.clone(),
        hooked.recycle.clone(),
        hooked.transient.clone(),
        hooked.fail_next.clone(),
    );
    let pool = builder()
        .connect_retry(marina_pool::ConnectRetry::Always)
        .build(Managed::new(hooked), ())
        .unwrap();
    for (what, flags) in [
        ("is_broken", vec![&broken]),
        ("recycle", vec![&recycle]),
        ("is_transient", vec![&transient, &fail_next]),
    ] {
        drop(pool.get().await.unwrap()); // an idle connection to check or recycle
        if what == "is_transient" {
            // A failed connect is judged: empty the pool first.
            pool.get().await.unwrap().poison();
        }
        for f in flags {
            f.store(true, SeqCst);
        }
        let r = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get().await.map(drop) }
        })
        .await;
        assert!(r.unwrap_err().is_panic(), "{what}");
        assert_empty(&pool.stats());
        drop(
            pool.get()
                .await
                .unwrap_or_else(|e| panic!("usable after {what}: {e:?}")),
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_panics_does_not_stop_the_maintenance_task() {
    let probes = Arc::new(AtomicUsize::new(0));
    let connects = Arc::new(AtomicUsize::new(0));
    let pool = builder()
        .min_idle(1)
        .health_check_interval(Duration::from_secs(1))
        .health_check_timeout(Duration::from_secs(1))
        .probe(probe_fn({
            let probes = probes.clone();
            move |_: &mut u64| {
                let n = probes.fetch_add(1, SeqCst);
                Box::pin(async move {
                    if n == 0 {
                        panic!("probe panics");
                    }
                    Ok::<_, BoxError>(())
                })
            }
        }))
        .build(counting_connector(connects.clone()), ())
        .unwrap();
    pool.ready_min().await.unwrap();
    // Nobody calls get(): only the maintenance task can go on probing and refilling.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        probes.load(SeqCst) >= 3,
        "probes ran after the panic: {}",
        probes.load(SeqCst)
    );
    let s = pool.stats();
    assert!(s.destroyed >= 1, "the probed connection was closed: {s:#?}");
    assert_eq!((s.idle, s.total), (1, 1), "refilled to min_idle: {s:#?}");
    assert_eq!(s.created, 2, "{s:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_refill_whose_connector_panics_recovers() {
    let connector = Panicky::new();
    connector.in_future.store(true, SeqCst);
    let pool = builder()
        .max_size(2)
        .min_idle(2)
        .build(connector.clone(), ())
        .unwrap();
    // Refill runs on the maintenance tick (every 30 s here) and backs off after the panic.
    tokio::time::sleep(Duration::from_secs(95)).await;
    let s = pool.stats();
    assert_eq!((s.idle, s.total, s.connecting), (2, 2, 0), "{s:#?}");
    assert!(s.cancelled >= 1, "{s:#?}");
}

/// A connection whose `Drop` panics when armed.
struct LoudDrop(Arc<AtomicBool>);

impl Drop for LoudDrop {
    fn drop(&mut self) {
        if fire(&self.0) {
            panic!("connection drop panics");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_drop_panics_frees_its_slot() {
    let armed = Arc::new(AtomicBool::new(false));
    let pool = builder()
        .build(
            service_fn({
                let armed = armed.clone();
                move |_: ()| {
                    let armed = armed.clone();
                    async move { Ok::<_, Infallible>(LoudDrop(armed)) }
                }
            }),
            (),
        )
        .unwrap();
    let conn = pool.get().await.unwrap();
    armed.store(true, SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.poison()));
    assert!(r.is_err());
    assert_empty(&pool.stats());
    drop(pool.get().await.expect("the pool is usable"));
}

/// A tracing subscriber that panics on the first event with a given message.
struct PanicOn {
    message: &'static str,
    armed: AtomicBool,
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for PanicOn {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        if m.0 == self.message && fire(&self.armed) {
            panic!("subscriber panics on {:?}", self.message);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_tracing_subscriber_that_panics_leaves_the_pool_usable() {
    let pool = builder()
        .build(counting_connector(Arc::default()), ())
        .unwrap();
    for message in ["connection opened", "connection closed"] {
        // The default subscriber is per thread: the pool's code runs on this one.
        let _sub = tracing::subscriber::set_default(PanicOn {
            message,
            armed: AtomicBool::new(true),
        });
        let r = tokio::spawn({
            let pool = pool.clone();
            async move {
                let conn = pool.get().await.unwrap();
                conn.poison();
            }
        })
        .await;
        assert!(r.unwrap_err().is_panic(), "{message}");
        assert_empty(&pool.stats());
        drop(
            pool.get()
                .await
                .unwrap_or_else(|e| panic!("usable after {message}: {e:?}")),
        );
        pool.get().await.unwrap().poison();
    }
}
