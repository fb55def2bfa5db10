//! Shared sticky sessions: [`store`] keeps the pins in Redis behind a short-lived
//! local cache (marina-affinity's [`SessionStore`](marina_affinity::SessionStore));
//! [`layer`] routes requests by them.

mod layer;
mod store;

pub use layer::{SessionFuture, SharedSession, SharedSessionLayer, SharedSessionStats};
pub use store::{RedisSessionStore, SessionConfig, SessionStoreStats};
