//! `RateLimit`: GCRA request-rate limits (governor), global or keyed.
//!
//! One idea per file, as tower lays out a middleware: [`layer`] builds the limiter a
//! layer's services share ([`limiter`]), [`service`] takes cells (in `poll_ready` for a
//! global limiter, in `call` for a keyed one), [`future`] is what a call returns,
//! [`handle`] reads the figures ([`admissions`] counts); [`config`] holds the settings
//! and [`error`] the refusals.

mod admissions;
mod config;
mod error;
mod future;
mod handle;
mod layer;
mod limiter;
mod service;

pub use config::{KeyTable, OnLimit, Rate};
pub use error::{RateLimited, TooManyKeys};
pub use future::{KeyedFuture, ResponseFuture};
pub use handle::{RateLimitHandle, RateStats};
pub use layer::{Global, Keyed, RateLimitLayer};
pub use service::RateLimit;
