//! The examples live in `examples/*.rs`; run `cargo run --example echo`.
