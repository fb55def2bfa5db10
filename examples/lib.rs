//! marina's examples. The binaries live in `examples/*.rs`:
//!
//! - `cargo run --example echo`: the whole stack over three line echo servers;
//! - `cargo run --example pool`: the pool alone;
//! - `cargo run --example hyper_client`: marina under a hyper HTTP/1 client
//!   ([`hyper_demo`]);
//! - `cargo run --example tonic_client`: marina under a tonic gRPC client
//!   ([`tonic_demo`]).
//!
//! The hyper and tonic demos live in this library so that their example binaries and
//! the tests in `tests/apps.rs` (which run them in a short mode) share one copy.

#[path = "demos/hyper_demo.rs"]
pub mod hyper_demo;
#[path = "demos/tonic_demo.rs"]
pub mod tonic_demo;
