//! Benchmarks of marina side by side with its peers; see `benches/` and `docs/BENCHMARKS.md`.
//!
//! The library holds what several bench binaries share.

/// How long a loop-style bench runs: `--iters N` and `--reps R` from the command line,
/// or a short smoke run when `--bench` is absent (as under `cargo test --benches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLength {
    /// Operations per rep.
    pub iters: u64,
    /// Reps (the median is reported).
    pub reps: usize,
}

impl RunLength {
    /// Reads the process arguments; `default_iters` and 5 reps unless given.
    pub fn from_args(default_iters: u64) -> Self {
        Self::parse(std::env::args().collect(), default_iters)
    }

    fn parse(args: Vec<String>, default_iters: u64) -> Self {
        if !args.iter().any(|a| a == "--bench") {
            return RunLength {
                iters: 1000,
                reps: 1,
            };
        }
        let value = |flag: &str, default: u64| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        RunLength {
            iters: value("--iters", default_iters),
            reps: value("--reps", 5) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RunLength;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn smoke_without_bench_flag_and_flags_with_it() {
        assert_eq!(
            RunLength::parse(args(&["x"]), 7),
            RunLength {
                iters: 1000,
                reps: 1
            }
        );
        assert_eq!(
            RunLength::parse(args(&["x", "--bench"]), 7),
            RunLength { iters: 7, reps: 5 }
        );
        assert_eq!(
            RunLength::parse(args(&["x", "--bench", "--iters", "9", "--reps", "2"]), 7),
            RunLength { iters: 9, reps: 2 }
        );
    }
}
