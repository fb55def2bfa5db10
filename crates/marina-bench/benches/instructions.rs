//! Instructions per request, counted by `valgrind --tool=callgrind` (the count does not
//! move with machine noise, unlike wall time on a shared 2-core VM).
//!
//! Each row is one of the stack bench's (`benches/common/rows.rs`): `deadpool` (deadpool
//! and a hand-written round robin), `pool` (marina's pool alone, same round robin),
//! `marina` (the stack with its defaults: health checks, failover, the request
//! timeout), `marina-bare` (balance and pool), `marina-sticky-rate` (`marina` with
//! sticky sessions and a global rate limit). A row runs in a child process of this
//! binary, under
//! callgrind, on a current-thread runtime (clients and the three echo servers on one
//! thread): `--clients` tasks (default 16) send `n` requests in all, after the pools
//! are filled. It is run twice, with `n = --short` and `n = --long` requests (defaults
//! 2,000 and 6,000); the difference of the two totals divided by the difference of
//! `n` is the cost of one request, set-up and tear-down cancelled out. Counted: every
//! instruction in user space, clients and servers together (the kernel's TCP work is
//! not counted).
//!
//! ```text
//! cargo bench -p marina-bench --bench instructions -- [--rows deadpool,pool,marina,...]
//!     [--clients N] [--short N] [--long N]
//! ```
//!
//! `-- --bench --allocs` counts heap allocations per request instead (the same two
//! run lengths, in process, with `allocation-counter`), no valgrind needed.
//!
//! Needs valgrind (`apt-get install -y valgrind`). Without `--bench` in its arguments (as
//! under `cargo test --benches`) it runs each row briefly in process, without valgrind,
//! and fails on an error or a wrong echo.

#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::process::{Command, ExitCode};

use marina::core::BoxError;

#[path = "common/rows.rs"]
mod rows;
use rows::{build, echo_server};

const ROWS: [&str; 5] = [
    "deadpool",
    "pool",
    "marina",
    "marina-bare",
    "marina-sticky-rate",
];

/// Runs `requests` echoes through `row` with `clients` tasks on a current-thread
/// runtime.
fn run_row(row: &str, clients: usize, requests: usize) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(echo_server().await?);
        }
        let built = build(row, &addrs, 16).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let mut client = built.client.clone();
            if let rows::Client::Stack {
                session: Some(s), ..
            } = &mut client
            {
                s.0 = format!("client-{c}");
            }
            let share = requests / clients + usize::from(c < requests % clients);
            tasks.spawn(async move {
                for i in 0..share {
                    let line = format!("client {c} line {i} ........");
                    let reply = client.exchange(line.clone()).await?;
                    if reply != line {
                        return Err::<(), BoxError>(format!("wrong echo {reply:?}").into());
                    }
                }
                Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        if let Some(h) = built.stack {
            h.shutdown(std::time::Duration::from_secs(1)).await;
        }
        Ok(())
    })
}

/// The instructions callgrind counted for one child run.
fn count(row: &str, clients: usize, requests: usize) -> Result<u64, BoxError> {
    let out = std::env::temp_dir().join(format!(
        "marina-callgrind-{}-{row}-{requests}.out",
        std::process::id()
    ));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--quiet")
        .arg(std::env::current_exe()?)
        .args(["--child", row, &clients.to_string(), &requests.to_string()])
        .status()?;
    if !status.success() {
        return Err(format!("{row}: the child run failed ({status})").into());
    }
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{row}: no totals in callgrind's output").into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let (row, clients, requests) = (&args[2], &args[3], &args[4]);
        let r = run_row(row, clients.parse().unwrap(), requests.parse().unwrap());
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{row}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut rows: Vec<String> = ROWS.iter().map(|r| r.to_string()).collect();
    let (mut clients, mut short, mut long) = (16usize, 2_000usize, 6_000usize);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--rows" => rows = value().split(',').map(str::to_string).collect(),
            "--clients" => clients = value().parse().unwrap_or(clients),
            "--short" => short = value().parse().unwrap_or(short),
            "--long" => long = value().parse().unwrap_or(long),
            _ => {}
        }
    }
    if args.iter().any(|a| a == "--allocs") {
        // Heap allocations per request, by the same difference of two run lengths.
        println!("| row | allocations / request |\n|---|---:|");
        for row in &rows {
            let a = allocation_counter::measure(|| run_row(row, clients, short).unwrap());
            let b = allocation_counter::measure(|| run_row(row, clients, long).unwrap());
            let per = b.count_total.saturating_sub(a.count_total) as f64 / (long - short) as f64;
            println!("| {row} | {per:.2} |");
        }
        return ExitCode::SUCCESS;
    }
    if !args.iter().any(|a| a == "--bench") {
        // A smoke run: every row works, no valgrind.
        for row in &rows {
            if let Err(e) = run_row(row, 4, 64) {
                eprintln!("{row}: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "instructions per request (callgrind, user space, clients + 3 echo servers on one thread), {clients} clients, ({long} - {short}) requests\n"
    );
    println!("| row | instructions / request | ÷ deadpool |");
    println!("|---|---:|---:|");
    let mut base = None;
    for row in &rows {
        let per = count(row, clients, short).and_then(|a| {
            let b = count(row, clients, long)?;
            Ok(b.saturating_sub(a) as f64 / (long - short) as f64)
        });
        match per {
            Ok(per) => {
                if row == "deadpool" {
                    base = Some(per);
                }
                let ratio = base.map_or("-".to_string(), |b| format!("{:.2}", per / b));
                println!("| {row} | {per:.0} | {ratio} |");
            }
            Err(e) => {
                eprintln!("{row}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
