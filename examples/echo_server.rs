//! A standalone line echo server, to try the echo client against separate processes.
//! (Being written.)
fn main() {}
