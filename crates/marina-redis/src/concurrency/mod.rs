//! `RedisConcurrency`: at most N requests in flight per key across a fleet, on a Redis
//! semaphore with expiring, renewed leases.
//!
//! [`layer`] builds the semaphore a layer's services share and reads its figures,
//! [`semaphore`] takes, renews and releases permits (and the fallback's), [`service`]
//! holds a permit for each call's duration.

mod layer;
mod semaphore;
mod service;

pub use layer::{RedisConcurrencyHandle, RedisConcurrencyLayer, RedisConcurrencyStats};
pub use service::{ConcurrencyFuture, RedisConcurrency};
