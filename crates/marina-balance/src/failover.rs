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
/// By default only errors marked [`NotSent`](marina_core::NotSent) are retried (the
/// request never reached the endpoint: connect refused, pool checkout timeout), at most
/// 3 attempts in all, within `RetryBudget::default()` (20% of requests + 10 per
/// second). For idempotent requests, [`retry_if`](Self::retry_if) widens that to any
/// error you deem safe to repeat (a connection reset mid-request, say).
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
            retry_if: Arc::new(|e: &BoxError| is_not_sent(&**e)),
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
