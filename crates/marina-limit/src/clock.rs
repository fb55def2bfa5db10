//! The clock the rate limiters run on: tokio's.

use governor::clock::Clock;
use governor::nanos::Nanos;
use tokio::time::Instant;

/// A [`governor`] clock over `tokio::time::Instant`, in nanoseconds since the limiter
/// was made.
///
/// tokio's `Instant` is the operating system's monotonic clock, which is consistent
/// across cores (governor's default quanta clock reads the TSC, which is not on some
/// machines: governor#299), and it follows tokio's paused time, so tests advance
/// simulated time and the limiter sees it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            origin: Instant::now(),
        }
    }
}

impl TokioClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tokio instant of a reading.
    pub fn instant_of(&self, reading: Nanos) -> Instant {
        self.origin + std::time::Duration::from_nanos(reading.as_u64())
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let d = Instant::now().saturating_duration_since(self.origin);
        Nanos::from(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}
