//! Failover: retrying a request that never reached its endpoint on another one, within
//! a retry budget.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marina_core::{BoxError, is_not_sent};
use tokio::time::Instant;

/// Which failed requests [`Balance`](crate::Balance) sends again to another endpoint,
/// how many times, and within which [`RetryBudget`].
///
/// By default only errors that show the request never reached the endpoint are
/// retried ([`never_sent`]: errors marked [`NotSent`](marina_core::NotSent), as
/// marina-pool marks connect and checkout failures; a refused TCP connect anywhere in
/// the error's chain; and, behind this crate's features, hyper-util's connect errors,
/// tonic's `ConnectError` and tower `Buffer`'s worker errors), at most 3 attempts in
/// all, within `RetryBudget::default()` (20% of requests + 10 per second).
/// [`not_sent_if`](Self::not_sent_if) teaches it another endpoint's never-sent errors;
/// for idempotent requests, [`retry_if`](Self::retry_if) widens it to any error you
/// deem safe to repeat (a connection reset mid-request, say).
///
/// Recipe for an endpoint marina does not know: mark its never-sent errors yourself,
/// either by wrapping them in `NotSent` in the endpoint service (best: then give the
/// request back with [`NotSent::with_request`](marina_core::NotSent::with_request) and
/// requests that are not `Clone` fail over too, see
/// [`Balance::failover_unsent`](crate::Balance::failover_unsent)), or by recognising
/// them with `not_sent_if`.
///
/// ```
/// use marina_balance::{Failover, RetryBudget};
/// use std::time::Duration;
///
/// let failover = Failover::new()
///     .max_attempts(2)
///     .budget(RetryBudget::new(Duration::from_secs(10), 5, 0.1));
/// # drop(failover);
/// ```
#[derive(Clone)]
pub struct Failover {
    pub(crate) max_attempts: u32,
    pub(crate) budget: RetryBudget,
    pub(crate) retry_if: Arc<dyn Fn(&BoxError) -> bool + Send + Sync>,
}

impl fmt::Debug for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("max_attempts", &self.max_attempts)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            max_attempts: 3,
            budget: RetryBudget::default(),
            retry_if: Arc::new(|e: &BoxError| never_sent(&**e)),
        }
    }
}

impl Failover {
    /// Retries "not sent" errors, 3 attempts at most, within the default budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attempts in all, the first included (at least 1: no retry).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The budget retries draw from (share it between balancers to bound them
    /// together).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Also counts the errors `classifier` accepts as never sent (an endpoint's own
    /// connect or "closed" errors), beside [`never_sent`]'s.
    ///
    /// ```
    /// use marina_balance::Failover;
    ///
    /// #[derive(Debug)]
    /// struct Unreachable; // a client library's "could not connect" error
    /// # impl std::fmt::Display for Unreachable { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("unreachable") } }
    /// # impl std::error::Error for Unreachable {}
    ///
    /// let failover = Failover::new().not_sent_if(|e| marina_core::find::<Unreachable>(&**e).is_some());
    /// # drop(failover);
    /// ```
    pub fn not_sent_if(
        mut self,
        classifier: impl Fn(&BoxError) -> bool + Send + Sync + 'static,
    ) -> Self {
        let before = self.retry_if.clone();
        self.retry_if = Arc::new(move |e: &BoxError| before(e) || classifier(e));
        self
    }

    /// Retries the errors `retryable` accepts instead (only for requests that are
    /// safe to send twice when the error may come after the request was sent).
    pub fn retry_if(
        mut self,
        retryable: impl Fn(&BoxError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_if = Arc::new(retryable);
        self
    }
}

/// Whether `error` shows that its request never reached the endpoint, so sending it
/// elsewhere is safe even when it is not idempotent. True for:
///
/// - an error marked [`NotSent`](marina_core::NotSent) anywhere in the chain (marina-pool
///   marks connect and checkout failures);
/// - a `std::io::Error` of kind `ConnectionRefused` anywhere in the chain (a refused
///   TCP connect: hyper-util's `HttpConnector`, tonic, plain TCP clients);
/// - with the `hyper-util` feature, a `hyper_util::client::legacy::Error` whose
///   `is_connect()` is true;
/// - with the `tonic` feature, a `tonic::ConnectError` (a tonic `Channel` that could
///   not connect);
/// - with the `buffer` feature, tower `Buffer`'s `Closed` and `ServiceError` (the
///   worker ended, or its service failed before taking the request).
///
/// ```
/// use marina_balance::never_sent;
/// use marina_core::{BoxError, NotSent};
/// use std::io;
///
/// let refused: BoxError = io::Error::from(io::ErrorKind::ConnectionRefused).into();
/// assert!(never_sent(&*refused));
/// let marked: BoxError = NotSent::new("pool checkout timed out").into();
/// assert!(never_sent(&*marked));
/// let reset: BoxError = io::Error::from(io::ErrorKind::ConnectionReset).into();
/// assert!(!never_sent(&*reset)); // maybe sent: only idempotent requests may be retried
/// ```
pub fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    if is_not_sent(error) {
        return true;
    }
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        #[cfg(feature = "hyper-util")]
        if e.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
        {
            return true;
        }
        #[cfg(feature = "tonic")]
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        #[cfg(feature = "buffer")]
        if e.is::<tower::buffer::error::Closed>() || e.is::<tower::buffer::error::ServiceError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Bounds retries to a share of the requests plus a small floor, over a sliding window
/// (Finagle's and tower's retry budget): over the last `ttl`, retries may not exceed
/// `min_per_sec × ttl + ratio × requests`. When a whole backend fleet is down, this
/// keeps failover from multiplying the load by the attempt count.
///
/// Each request costs one relaxed atomic add; the clock is read once per 16 requests
/// (and at each retry) to file them under the second it reads, so a request counts for
/// the window at most 15 requests late, never early. Each retry takes a lock. Clones
/// share one budget.
///
/// ```
/// use marina_balance::RetryBudget;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // No share of requests, one retry per second over one second: exactly one retry.
/// let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
/// budget.deposit();
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw());
/// # }
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Budget>,
}

struct Budget {
    ratio: f64,
    min_per_sec: u32,
    /// One bucket per second of the window.
    deposits: Box<[AtomicU64]>,
    withdrawals: Box<[AtomicU64]>,
    /// Seconds since `origin` of the newest bucket.
    current: AtomicU64,
    /// Requests counted since the last clock read.
    unplaced: AtomicU64,
    origin: Instant,
    rotate: Mutex<()>,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl_secs", &self.inner.deposits.len())
            .field("min_per_sec", &self.inner.min_per_sec)
            .field("ratio", &self.inner.ratio)
            .finish()
    }
}

impl Default for RetryBudget {
    /// 20% of requests plus 10 retries per second, over 10 seconds.
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2)
    }
}

/// Read the clock once per this many deposits.
const TICK_EVERY: u64 = 16;

impl RetryBudget {
    /// Over a window of `ttl` (whole seconds, 1 to 60), allows `min_per_sec` retries
    /// per second plus `ratio` (0 to 1000) retries per request.
    ///
    /// Needs a tokio runtime's clock only in that it reads `tokio::time::Instant`
    /// (paused time works).
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        let secs = ttl.as_secs().clamp(1, 60) as usize;
        let ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        RetryBudget {
            inner: Arc::new(Budget {
                ratio,
                min_per_sec,
                deposits: (0..secs).map(|_| AtomicU64::new(0)).collect(),
                withdrawals: (0..secs).map(|_| AtomicU64::new(0)).collect(),
                current: AtomicU64::new(0),
                unplaced: AtomicU64::new(0),
                origin: Instant::now(),
                rotate: Mutex::new(()),
            }),
        }
    }

    /// Counts one request.
    pub fn deposit(&self) {
        let b = &*self.inner;
        // Counted as unplaced until the next clock read (at most `TICK_EVERY` requests
        // later, or the next withdrawal) files them under the second it reads.
        if b.unplaced.fetch_add(1, Relaxed) + 1 >= TICK_EVERY {
            b.advance();
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let b = &*self.inner;
        b.advance();
        let _g = b.lock();
        let deposits: u64 = b.deposits.iter().map(|d| d.load(Relaxed)).sum();
        let withdrawals: u64 = b.withdrawals.iter().map(|w| w.load(Relaxed)).sum();
        let allowed =
            f64::from(b.min_per_sec) * b.deposits.len() as f64 + b.ratio * deposits as f64;
        if (withdrawals + 1) as f64 > allowed {
            return false;
        }
        let cur = b.current.load(Relaxed) as usize % b.withdrawals.len();
        b.withdrawals[cur].fetch_add(1, Relaxed);
        true
    }
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.rotate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the window to now, clearing the buckets of the seconds that passed, and
    /// files the unplaced requests under the current second.
    fn advance(&self) {
        let now = Instant::now()
            .saturating_duration_since(self.origin)
            .as_secs();
        let n = self.deposits.len() as u64;
        if now > self.current.load(Relaxed) {
            let _g = self.lock();
            let cur = self.current.load(Relaxed);
            if now > cur {
                for s in (cur + 1)..=now.min(cur + n) {
                    let i = (s % n) as usize;
                    self.deposits[i].store(0, Relaxed);
                    self.withdrawals[i].store(0, Relaxed);
                }
                self.current.store(now, Relaxed);
            }
        }
        let unplaced = self.unplaced.swap(0, Relaxed);
        if unplaced > 0 {
            let i = (self.current.load(Relaxed) % n) as usize;
            self.deposits[i].fetch_add(unplaced, Relaxed);
        }
    }
}
