//! marina under a hyper HTTP/1 client, end to end on loopback.
//!
//! Starts three hyper HTTP/1 servers on 127.0.0.1 (random ports; each answers with its
//! index), then builds the client stack — a rate limit per user (`x-user` header) →
//! signed-token sessions (cookie `route`) → a round-robin balancer → a health check
//! per backend (5xx and errors count; `GET /healthz` probe) → a marina pool of hyper
//! HTTP/1 connections per backend — and drives a few users concurrently. Each user's
//! first response carries a session token, sent back as a cookie from then on, so its
//! requests stick to one backend; a greedy user goes over its rate limit. Prints the
//! responses per backend, the sessions, and the refusals.
//!
//! ```text
//! cargo run --example hyper_client            # 8 users × 30 requests, paced (about 2 s)
//! cargo run --example hyper_client -- --short # 4 users × 5 requests (what the tests run)
//! ```
//!
//! The code is in `examples/demos/hyper_demo.rs` (`examples::hyper_demo`).

use marina::core::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let short = std::env::args().skip(1).any(|a| a == "--short");
    let summary = examples::hyper_demo::run(short).await?;
    print!("{summary}");
    Ok(())
}
