//! Runs the echo example as a user would: piped (plain progress lines, no control
//! characters), in a pseudo-terminal (the dashboard draws every backend, `q` quits
//! cleanly, the summary follows) and with `--metrics` (every metric the README lists is
//! scraped over loopback while it runs).
//!
//! The example binary is the one `cargo test` builds next to this test
//! (`target/<profile>/examples/echo`); when it is missing it is built with
//! `cargo build --example echo`.

// These tests drive another process on the wall clock, from plain threads with no tokio
// runtime to block or clock to pause: std's clock and sleep are the right tools here.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The echo example's binary, built once if missing.
fn echo_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/echo-<hash> → target/<profile>/examples/echo
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the test runs from target/<profile>/deps");
        let bin = profile_dir
            .join("examples")
            .join(format!("echo{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "examples", "--example", "echo"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build --example echo failed");
        }
        assert!(bin.exists(), "no echo example at {}", bin.display());
        bin
    })
    .clone()
}

/// Waits for `child` at most `limit`; kills it past that and fails.
fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("echo did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a child's pipe to the end on a thread; the text so far is shared.
fn collect(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, thread::JoinHandle<()>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    });
    (out, reader)
}

#[test]
fn piped_output_is_plain_text_with_a_summary() {
    let mut child = Command::new(echo_bin())
        .args(["--duration", "2", "--clients", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("echo starts");
    let (out, out_reader) = collect(child.stdout.take().unwrap());
    let (err, err_reader) = collect(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, Duration::from_secs(15));
    out_reader.join().unwrap();
    err_reader.join().unwrap();
    let out = out.lock().unwrap().clone();
    let text = String::from_utf8(out.clone()).expect("UTF-8 output");
    let err = String::from_utf8_lossy(&err.lock().unwrap()).into_owned();
    assert!(status.success(), "echo failed: {status}\n{text}\n{err}");
    assert!(
        !out.contains(&b'\r'),
        "a carriage return in piped output:\n{text}"
    );
    assert!(
        !out.contains(&0x1b),
        "an escape sequence in piped output:\n{text}"
    );
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character in piped output:\n{text}"
    );
    // One progress line a second, then the summary.
    let progress: Vec<&str> = text.lines().filter(|l| l.starts_with("t=")).collect();
    assert!(
        !progress.is_empty()
            && progress.iter().all(|l| {
                ["s ok=", " errors=", " per backend=[", "] in flight="]
                    .iter()
                    .all(|part| l.contains(part))
            }),
        "no progress lines, or garbled ones:\n{text}"
    );
    for part in [
        "requests: ",
        "echoed correctly",
        "hung clients: 0",
        "shutdown: ",
    ] {
        assert!(text.contains(part), "no {part:?} in the summary:\n{text}");
    }
}

#[test]
fn dashboard_in_a_terminal_draws_every_backend_and_quits_on_q() {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};
    const ROWS: u16 = 40;
    const COLS: u16 = 140;

    let pty = native_pty_system()
        .openpty(PtySize {
            rows: ROWS,
            cols: COLS,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("a pseudo-terminal");
    let mut cmd = CommandBuilder::new(echo_bin());
    cmd.args(["--duration", "15", "--clients", "8"]);
    cmd.env("TERM", "xterm-256color");
    cmd.cwd(env!("CARGO_MANIFEST_DIR"));
    let mut child = pty
        .slave
        .spawn_command(cmd)
        .expect("echo starts in the pty");
    drop(pty.slave);
    let mut keys = pty.master.take_writer().expect("pty writer");
    let (raw, reader) = collect(pty.master.try_clone_reader().expect("pty reader"));

    let screen_text = |raw: &[u8]| {
        let mut parser = vt100::Parser::new(
            NonZeroU16::new(ROWS).unwrap(),
            NonZeroU16::new(COLS).unwrap(),
            0,
        );
        parser.process(raw);
        (
            parser.screen().alternate_screen(),
            parser.screen().contents(),
        )
    };

    // The backends, from the line printed before the dashboard opens.
    let started = Instant::now();
    let (backends, screen) = loop {
        let bytes = raw.lock().unwrap().clone();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let backends: Vec<String> = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("backends: "))
            .map(|l| l.split(", ").map(|a| a.trim().to_string()).collect())
            .unwrap_or_default();
        let (alternate, screen) = screen_text(&bytes);
        if alternate
            && backends.len() == 3
            && screen.contains("health")
            && backends.iter().all(|b| screen.contains(b.as_str()))
            // a second or so of traffic drawn
            && drawn_at(&screen) >= 1.0
        {
            break (backends, screen);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no dashboard with every backend after 10 s; screen:\n{screen}\nraw:\n{text}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    // Shown with --nocapture, or when the test fails.
    println!("{screen}");
    // Every backend has its own row, and the health column its header.
    let lines: Vec<&str> = screen.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("backend") && l.contains("health") && l.contains("req/s")),
        "no header row:\n{screen}"
    );
    for b in &backends {
        assert_eq!(
            lines.iter().filter(|l| l.contains(b.as_str())).count(),
            1,
            "backend {b} not on exactly one row:\n{screen}"
        );
    }

    keys.write_all(b"q").expect("send q");
    keys.flush().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("echo did not exit within 10 s of q");
        }
        thread::sleep(Duration::from_millis(20));
    };
    drop(keys);
    drop(pty.master);
    let _ = reader.join();
    let bytes = raw.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(status.success(), "echo exited with {status:?}:\n{text}");
    // Off the alternate screen, then the summary on the normal one.
    let left = text
        .rfind("\x1b[?1049l")
        .unwrap_or_else(|| panic!("the alternate screen was not left:\n{text}"));
    let after = &text[left..];
    for part in [
        "stopped after",
        "echoed correctly",
        "hung clients: 0",
        "shutdown: ",
    ] {
        assert!(
            after.contains(part),
            "no {part:?} after the dashboard:\n{after}"
        );
    }
    let (alternate, _) = screen_text(&bytes);
    assert!(!alternate, "still on the alternate screen at exit");
}

/// The time in the dashboard's title line, "… t=1.2s of 15s …" (0 if none yet).
fn drawn_at(screen: &str) -> f64 {
    screen
        .split_once("t=")
        .and_then(|(_, rest)| rest.split_once('s'))
        .and_then(|(t, _)| t.parse().ok())
        .unwrap_or(0.0)
}

/// The metric names the README's "## Metrics" table lists (rows
/// `| `name` | type | labels | meaning |`), with their type.
fn documented_metrics() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    metrics_table(&readme)
}

fn metrics_table(readme: &str) -> Vec<(String, String)> {
    let mut in_section = false;
    let mut names = Vec::new();
    for line in readme.lines() {
        if line.starts_with("## ") {
            in_section = line.trim() == "## Metrics";
            continue;
        }
        if !in_section {
            continue;
        }
        let cells: Vec<&str> = line.trim().split('|').map(str::trim).collect();
        // "| `name` | type | ..." splits into ["", "`name`", "type", ...].
        if cells.len() >= 4
            && let Some(name) = cells[1].strip_prefix('`').and_then(|c| c.strip_suffix('`'))
            && name.starts_with("marina_")
        {
            names.push((name.to_string(), cells[2].to_lowercase()));
        }
    }
    names
}

#[test]
fn the_readme_table_parses() {
    let readme = "# x\n## Metrics\n\n| name | type | labels | meaning |\n| --- | --- | --- | --- |\n\
                  | `marina_pool_connections` | gauge | `pool`, `state` | open connections |\n\
                  | `marina_requests_total` | Counter | `outcome` | requests |\n\
                  ## Next\n| `marina_not_this` | gauge | | |\n";
    assert_eq!(
        metrics_table(readme),
        [
            ("marina_pool_connections".to_string(), "gauge".to_string()),
            ("marina_requests_total".to_string(), "counter".to_string()),
        ]
    );
}

/// GET /metrics over loopback.
fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics server");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    body.to_string()
}

#[test]
fn metrics_endpoint_serves_every_documented_metric() {
    let mut child = Command::new(echo_bin())
        .args([
            "--duration",
            "6",
            "--clients",
            "8",
            "--no-tui",
            "--metrics",
            "127.0.0.1:0",
            // A rate limiter that refuses nothing, so that its metrics exist too.
            "--rate",
            "1000000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("echo starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut seen = String::new();
    // The address comes first; a progress line means traffic has flowed for a second.
    for line in lines.by_ref() {
        let line = line.expect("stdout");
        seen.push_str(&line);
        seen.push('\n');
        if let Some(url) = line.strip_prefix("metrics: http://") {
            addr = Some(url.strip_suffix("/metrics").expect("…/metrics").to_string());
        }
        if line.starts_with("t=") {
            break;
        }
    }
    let Some(addr) = addr else {
        let _ = child.kill();
        panic!("no metrics address printed:\n{seen}");
    };
    let body = scrape(&addr);
    // Drain the rest so the child never blocks on a full pipe.
    let drain = thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let status = wait_bounded(&mut child, Duration::from_secs(15));
    let rest = drain.join().unwrap();
    assert!(status.success(), "echo failed: {status}\n{seen}{rest}");

    // name → (type, samples)
    let mut types = std::collections::HashMap::new();
    let mut samples: Vec<(String, String, f64)> = Vec::new(); // (name, labels, value)
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(n), Some(ty)) = (it.next(), it.next()) {
                types.insert(n.to_string(), ty.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n.to_string(), l.to_string()),
            None => (series.to_string(), String::new()),
        };
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.push((name, labels, value));
    }

    // Redis-backed limits and sessions are not part of this stack.
    let mut documented: Vec<_> = documented_metrics()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("marina_redis_"))
        .collect();
    let from_readme = !documented.is_empty();
    if !from_readme {
        // Until the README's table exists: the pool's gauges and the stack's requests.
        documented = vec![
            ("marina_pool_".to_string(), String::new()),
            ("marina_requests_total".to_string(), "counter".to_string()),
        ];
    }
    let mut missing = Vec::new();
    for (name, ty) in &documented {
        let matches = |s: &str| {
            if from_readme {
                s == name
                    || [&"_bucket", &"_sum", &"_count"]
                        .iter()
                        .any(|suf| s.strip_suffix(**suf) == Some(name.as_str()))
            } else {
                s.starts_with(name.as_str())
            }
        };
        let found: Vec<&(String, String, f64)> = samples.iter().filter(|s| matches(&s.0)).collect();
        if found.is_empty() {
            missing.push(name.clone());
            continue;
        }
        for (n, labels, v) in &found {
            let quantile = labels.contains("quantile=");
            assert!(
                (quantile && v.is_nan()) || (v.is_finite() && *v >= 0.0),
                "implausible {n}{{{labels} = {v}"
            );
        }
        if from_readme && !ty.is_empty() {
            let shown = types.get(name.as_str()).map(String::as_str).unwrap_or("");
            let ok = match ty.as_str() {
                "histogram" => matches!(shown, "histogram" | "summary"),
                t => shown == t,
            };
            assert!(ok, "{name}: the README says {ty}, /metrics says {shown:?}");
        }
    }
    assert!(missing.is_empty(), "not on /metrics: {missing:?}\n{body}");
    // A second of traffic has been counted: requests through the stack, attempts at the
    // endpoints, connections opened (those of these the README lists).
    for name in [
        "marina_requests_total",
        "marina_balance_requests_total",
        "marina_pool_connections_created_total",
    ] {
        if documented.iter().any(|(n, _)| n == name) {
            let sum: f64 = samples.iter().filter(|s| s.0 == name).map(|s| s.2).sum();
            assert!(sum > 0.0, "{name} is 0 after a second of traffic:\n{body}");
        }
    }
    let counted: f64 = samples
        .iter()
        .filter(|(n, _, _)| n.starts_with("marina_") && n.ends_with("_total"))
        .map(|s| s.2)
        .sum();
    assert!(counted > 0.0, "no marina counter moved:\n{body}");
}
