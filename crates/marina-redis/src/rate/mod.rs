//! `RedisRateLimit`: a GCRA rate limit shared by a fleet, on Redis, with leasing.
//!
//! Laid out as marina-limit's `rate`: [`layer`] builds the limiter a layer's services
//! share ([`limiter`]: local lease and refusal state, Redis's GCRA script, the
//! fallback), [`service`] takes cells, [`future`] is what a call returns, [`handle`]
//! reads the figures, [`config`] holds the lease settings.

mod config;
mod future;
mod handle;
mod layer;
mod limiter;
mod service;

pub use config::{LEASE_MAX_AGE, Lease};
pub use future::{KeyedFuture, ResponseFuture};
pub use handle::{RedisRateHandle, RedisRateStats};
pub use layer::RedisRateLimitLayer;
pub use service::RedisRateLimit;
