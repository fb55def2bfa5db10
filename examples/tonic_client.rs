//! marina under a tonic gRPC client, end to end on loopback.
//!
//! Starts three gRPC servers on 127.0.0.1 (random ports) serving the standard
//! `grpc.health.v1` service (tonic-health: no protoc needed), then builds the client —
//! tonic-health's generated `HealthClient` over a rate limit per user (`x-user`
//! metadata) → a round-robin balancer → a health check per server whose active probe
//! is marina's `GrpcProbe` → a tonic `Channel` per server — and sends `Check` RPCs
//! from a few users (a greedy one goes over its limit). Midway one server turns
//! `NOT_SERVING`: the probe fails, the health layer ejects that server, and the
//! balancer stops sending it requests. Prints the replies per server before and after.
//!
//! ```text
//! cargo run --example tonic_client            # 6 users × 20 checks per phase, paced
//! cargo run --example tonic_client -- --short # 3 users × 4 checks (what the tests run)
//! ```
//!
//! The code is in `examples/demos/tonic_demo.rs` (`examples::tonic_demo`).

use marina::core::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let short = std::env::args().skip(1).any(|a| a == "--short");
    let summary = examples::tonic_demo::run(short).await?;
    print!("{summary}");
    Ok(())
}
