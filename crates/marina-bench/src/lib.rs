//! Benchmarks of marina side by side with its peers; see `benches/` and `docs/BENCHMARKS.md`.
