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
/// Requests that may have been sent are retried only when they are marked idempotent
/// ([`Balance::idempotent_if`](crate::Balance::idempotent_if),
/// [`Balance::idempotent_from_extensions`](crate::Balance::idempotent_from_extensions)):
/// see [`retry_idempotent_if`](Self::retry_idempotent_if). Such requests can also be
/// [hedged](Self::hedge). A [`deadline`](Self::deadline) bounds the whole request,
/// every attempt included.
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
    pub(crate) retry_if: Classifier,
    /// [`never_sent`] and the classifiers `not_sent_if` added (not replaced by
    /// `retry_if`): tells a failure that proves the request never left.
    pub(crate) not_sent: Classifier,
    /// For idempotent requests: the errors after sending that are retried (none set:
    /// every error).
    pub(crate) retry_sent_if: Option<Classifier>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) hedge: Option<Duration>,
    /// `retry_if` replaced the never-sent rule: every request may be retried after it
    /// was sent, so every request needs a copy.
    pub(crate) widened: bool,
}

/// Decides something about an attempt's error.
pub(crate) type Classifier = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;

impl fmt::Debug for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("max_attempts", &self.max_attempts)
            .field("budget", &self.budget)
            .field("deadline", &self.deadline)
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

impl Default for Failover {
    fn default() -> Self {
        let not_sent: Classifier = Arc::new(|e: &BoxError| never_sent(&**e));
        Failover {
            max_attempts: 3,
            budget: RetryBudget::default(),
            retry_if: not_sent.clone(),
            not_sent,
            retry_sent_if: None,
            deadline: None,
            hedge: None,
            widened: false,
        }
    }
}

impl Failover {
    /// Retries "not sent" errors, 3 attempts at most, within the default budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attempts in all, the first included (at least 1: no retry). Failover attempts,
    /// retries of idempotent requests and hedges all count.
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
    /// connect or "closed" errors), beside [`never_sent`]'s: they are retried for any
    /// request, and a [`DeadlineExceeded`] after only such failures says the request
    /// was never sent.
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
        let classifier: Classifier = Arc::new(classifier);
        let before = self.retry_if.clone();
        let also = classifier.clone();
        self.retry_if = Arc::new(move |e: &BoxError| before(e) || also(e));
        let before = self.not_sent.clone();
        self.not_sent = Arc::new(move |e: &BoxError| before(e) || classifier(e));
        self
    }

    /// Retries the errors `retryable` accepts instead, for every request (only for
    /// request types that are all safe to send twice when the error may come after
    /// the request was sent; to retry some requests only, mark those idempotent and see
    /// [`retry_idempotent_if`](Self::retry_idempotent_if)).
    pub fn retry_if(
        mut self,
        retryable: impl Fn(&BoxError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_if = Arc::new(retryable);
        self.widened = true;
        self
    }

    /// Whether [`retry_if`](Self::retry_if) set which errors are retried for every
    /// request (not only never-sent ones): a balancer must then keep a copy of every
    /// request ([`Balance::failover`](crate::Balance::failover)), since any of them may
    /// be sent again after it was sent.
    pub fn retries_sent_requests(&self) -> bool {
        self.widened
    }

    /// Which errors of **idempotent** requests are retried on another endpoint even
    /// though the request may have been sent (default: every error: a connection reset
    /// mid-reply, a per-attempt timeout, a protocol error).
    ///
    /// A request is idempotent when the balancer's
    /// [`idempotent_if`](crate::Balance::idempotent_if) predicate says so, or it
    /// carries the [`Idempotent`](marina_core::Idempotent) marker and the balancer reads
    /// it ([`idempotent_from_extensions`](crate::Balance::idempotent_from_extensions)).
    /// No request is idempotent by default. Such retries need a copy of the request:
    /// only with [`Balance::failover`](crate::Balance::failover) or
    /// [`failover_copy_idempotent`](crate::Balance::failover_copy_idempotent), not
    /// [`failover_unsent`](crate::Balance::failover_unsent). They count toward
    /// `max_attempts`, draw on the same [`RetryBudget`], stop at the
    /// [`deadline`](Self::deadline), and are counted in
    /// [`BalanceTotals::retries`](crate::BalanceTotals::retries) and
    /// [`sent_retries`](crate::BalanceTotals::sent_retries).
    ///
    /// Only errors are retried: a reply is a reply (an HTTP 503 included); to retry
    /// such replies, turn them into errors in the endpoint's stack.
    ///
    /// ```
    /// use marina_balance::Failover;
    /// use std::io;
    ///
    /// // Idempotent requests: retry resets and timeouts, not other errors.
    /// let failover = Failover::new().retry_idempotent_if(|e| {
    ///     marina_core::find::<io::Error>(&**e)
    ///         .is_some_and(|e| matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::TimedOut))
    /// });
    /// # drop(failover);
    /// ```
    pub fn retry_idempotent_if(
        mut self,
        retryable: impl Fn(&BoxError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retry_sent_if = Some(Arc::new(retryable));
        self
    }

    /// An overall deadline for each request, from `call` to its reply, across every
    /// attempt (Envoy's route `timeout`, beside the per-attempt `per_try_timeout`
    /// that belongs inside each endpoint). When it passes, the attempts in flight are
    /// dropped (cancelled at their endpoints) and the request fails with
    /// [`DeadlineExceeded`], which says whether it may have reached a backend; no
    /// failover attempt, retry or hedge starts after it. Default: none.
    ///
    /// It starts at `Balance::call`: the wait for a ready balancer before it is not
    /// covered (that is `failfast_timeout`'s). With `max_attempts(1)` it is a plain
    /// timeout on the call. It costs one clock read per request, and one timer (one
    /// allocation) for a request still unanswered when first polled.
    ///
    /// ```
    /// use marina_balance::Failover;
    /// use std::time::Duration;
    ///
    /// // At most 3 attempts, none past 2 s after the call.
    /// let failover = Failover::new().deadline(Duration::from_secs(2));
    /// # drop(failover);
    /// ```
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Hedges idempotent requests: when a request's attempt has been alone in flight
    /// for `delay` without a reply, a copy goes to another ready endpoint (the least
    /// loaded one not tried yet for the request; for a request whose route hint has a
    /// [failover key](marina_core::RouteHint::with_failover_key), where it would fail
    /// over) and the first *reply* wins; the other
    /// attempt's future is dropped, which cancels it at its endpoint (a pooled
    /// connection whose reply was not read to the end is not reused: that is the
    /// endpoint's cancel safety). An attempt that fails while the other is still in
    /// flight does not end the request: the other may still answer; when the last one
    /// fails, the usual failover rules apply. Default: off.
    ///
    /// Bounds: only requests marked idempotent (see
    /// [`retry_idempotent_if`](Self::retry_idempotent_if)) and only with
    /// [`Balance::failover`](crate::Balance::failover) or
    /// [`failover_copy_idempotent`](crate::Balance::failover_copy_idempotent) (a copy
    /// is needed); at most two attempts in flight at once; a hedge counts toward
    /// `max_attempts`, draws on the
    /// [`RetryBudget`] (a refusal counts in
    /// [`retries_refused`](crate::BalanceTotals::retries_refused)), goes only to an
    /// endpoint ready at that moment, and never starts after the
    /// [`deadline`](Self::deadline). Counted in
    /// [`BalanceTotals::hedges`](crate::BalanceTotals::hedges) and
    /// [`hedges_won`](crate::BalanceTotals::hedges_won).
    ///
    /// The delay is fixed: set it near the backends' p95–p99 latency, so that about
    /// 1–5% of requests are hedged (the budget caps the rest). An adaptive delay from
    /// a latency percentile (Finagle's backup requests, tower's `Hedge`) needs a
    /// latency histogram per request path, which the balancer does not keep.
    ///
    /// ```
    /// use marina_balance::Failover;
    /// use std::time::Duration;
    ///
    /// let failover = Failover::new()
    ///     .hedge(Duration::from_millis(50))
    ///     .deadline(Duration::from_secs(1));
    /// # drop(failover);
    /// ```
    pub fn hedge(mut self, delay: Duration) -> Self {
        self.hedge = Some(delay);
        self
    }
}

/// A request's [deadline](Failover::deadline) passed before any attempt answered.
///
/// `maybe_sent` says whether the request may have reached a backend: true when an
/// attempt was in flight when the deadline passed, or an earlier attempt failed with
/// an error that does not prove it was never sent; false when every attempt so far
/// failed before sending (a refused connect, say) and the next one was still waiting
/// for its endpoint. Only a request with `maybe_sent == false` is safe to send again
/// when it is not idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded {
    /// The deadline.
    pub after: Duration,
    /// Attempts sent (hedges included).
    pub attempts: u32,
    /// Whether the request may have reached a backend.
    pub maybe_sent: bool,
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request deadline of {:?} exceeded after {} attempt{} ({})",
            self.after,
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            if self.maybe_sent {
                "the request may have been sent"
            } else {
                "the request was never sent"
            }
        )
    }
}

impl std::error::Error for DeadlineExceeded {}

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
