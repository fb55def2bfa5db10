//! marina-limit's overheads beside the peers.
//!
//! 1. Rate limiting, per request, on a current-thread runtime: `ready().await` +
//!    `call(req).await` through `RateLimitLayer` (global, and keyed over 10k keys) over
//!    an endpoint that answers at once, with a quota high enough never to refuse; beside
//!    bare governor `check()` / `check_key()` (on governor's default clock in our feature
//!    set, std's `Instant`, and on marina's `TokioClock`) and `tower::limit::RateLimit`.
//!    The direct call is the floor, subtracted from the service rows.
//! 2. Bandwidth: a 64 MiB transfer over loopback TCP, raw, through `BandwidthLimit`
//!    with no limit set (pass-through), and with a limit far above the link (every
//!    write charged to a bucket), best of `reps`.
//!
//! ```text
//! cargo bench -p marina-bench --bench limit -- [--iters N] [--reps R]
//! ```

// A benchmark measures real wall time, so it uses std's clock on purpose.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{Quota, RateLimiter};
use marina_limit::{BandwidthLimit, KeyTable, Rate, RateLimitLayer, TokioClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::util::ServiceFn;
use tower::{Layer, Service, ServiceExt, service_fn};

type Endpoint = ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

fn answer(req: u64) -> Ready<Result<u64, Infallible>> {
    ready(Ok(req))
}

fn endpoint() -> Endpoint {
    service_fn(answer as fn(u64) -> Ready<Result<u64, Infallible>>)
}

async fn drive<S>(svc: &mut S, count: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    for i in 0..count {
        let r = svc.ready().await.unwrap().call(i).await.unwrap();
        std::hint::black_box(r);
    }
}

/// Median ns per iteration of `f` over `reps` runs of `iters`.
fn median(reps: usize, mut run: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..reps).map(|_| run()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn service_ns<S>(rt: &tokio::runtime::Runtime, mut svc: S, iters: u64, reps: usize) -> f64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(drive(&mut svc, 1000));
    median(reps, || {
        let start = Instant::now();
        rt.block_on(drive(&mut svc, iters));
        start.elapsed().as_nanos() as f64 / iters as f64
    })
}

fn bare_ns(iters: u64, reps: usize, mut f: impl FnMut(u64)) -> f64 {
    median(reps, || {
        let start = Instant::now();
        for i in 0..iters {
            f(i);
        }
        start.elapsed().as_nanos() as f64 / iters as f64
    })
}

const KEYS: u64 = 10_000;
const HUGE: u32 = 1_000_000_000;

fn main() {
    let marina_bench::RunLength { iters, reps } = marina_bench::RunLength::from_args(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    println!("limit bench: {iters} requests × {reps} reps (median), current-thread runtime\n");

    let floor = service_ns(&rt, endpoint(), iters, reps);
    let quota = Quota::per_second(NonZeroU32::new(HUGE).unwrap());

    // Bare governor, direct.
    let std_direct = RateLimiter::direct(quota);
    let g_std = bare_ns(iters, reps, |_| {
        std::hint::black_box(std_direct.check().is_ok());
    });
    let tokio_direct = RateLimiter::direct_with_clock(quota, TokioClock::new());
    let g_tokio = bare_ns(iters, reps, |_| {
        std::hint::black_box(tokio_direct.check().is_ok());
    });
    // Bare governor, keyed (String keys made up front).
    let keys: Vec<String> = (0..KEYS).map(|k| format!("user-{k}")).collect();
    let keyed = RateLimiter::hashmap(quota);
    let g_keyed = bare_ns(iters, reps, |i| {
        std::hint::black_box(keyed.check_key(&keys[(i % KEYS) as usize]).is_ok());
    });

    // marina, global and keyed.
    let global = RateLimitLayer::global(Rate::per_second(HUGE)).layer(endpoint());
    let m_global = service_ns(&rt, global, iters, reps) - floor;
    let extract = |req: &u64| Some(format!("user-{}", req % KEYS));
    let keyed_layer = RateLimitLayer::keyed_with(
        extract,
        Rate::per_second(HUGE),
        KeyTable::with_capacity(2 * KEYS as usize),
    );
    let m_keyed = service_ns(&rt, keyed_layer.layer(endpoint()), iters, reps) - floor;
    // The key's own cost: the extractor formats a String per request.
    let key_cost = bare_ns(iters, reps, |i| {
        std::hint::black_box(extract(&i));
    });

    // tower's RateLimit (fixed window), never refusing.
    let tower_rl = tower::limit::RateLimit::new(
        endpoint(),
        tower::limit::rate::Rate::new(u64::MAX / 2, Duration::from_secs(1)),
    );
    let t_rl = service_ns(&rt, tower_rl, iters, reps) - floor;

    println!("direct call (floor): {floor:.1} ns/request\n");
    println!("| what | ns/request | ÷ bare governor (same clock) |");
    println!("|---|---:|---:|");
    println!("| bare governor `check()`, std `Instant` clock | {g_std:.1} | |");
    println!("| bare governor `check()`, `TokioClock` | {g_tokio:.1} | |");
    println!(
        "| marina `RateLimit` global (overhead over the call) | {m_global:.1} | {:.2} |",
        m_global / g_tokio
    );
    println!("| tower `RateLimit` (overhead over the call) | {t_rl:.1} | |");
    println!(
        "| bare governor `check_key()`, 10k `String` keys, `Mutex<HashMap>` | {g_keyed:.1} | |"
    );
    println!(
        "| marina `RateLimit` keyed, 10k keys (overhead, key extraction included) | {m_keyed:.1} | {:.2} |",
        m_keyed / g_keyed
    );
    println!("| of which: the extractor's `format!` of the key | {key_cost:.1} | |");

    // Bandwidth.
    let mib = 64;
    let total = mib * 1024 * 1024;
    println!("\nbandwidth: {mib} MiB over loopback TCP, best of {reps}\n");
    let raw = rt.block_on(transfer(total, reps, |s| Box::new(s)));
    let pass = rt.block_on(transfer(total, reps, |s| {
        Box::new(BandwidthLimit::new(()).wrap(s))
    }));
    let charged = rt.block_on(transfer(total, reps, |s| {
        Box::new(
            BandwidthLimit::new(())
                .per_connection_write(1e12, 1 << 30)
                .wrap(s),
        )
    }));
    println!("| path | MiB/s | ÷ raw |");
    println!("|---|---:|---:|");
    println!("| raw `TcpStream` | {raw:.0} | 1.00 |");
    println!(
        "| `BandwidthLimit`, no limit (pass-through) | {pass:.0} | {:.3} |",
        pass / raw
    );
    println!(
        "| `BandwidthLimit`, limit far above the link (every write charged) | {charged:.0} | {:.3} |",
        charged / raw
    );
}

trait Io: tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Best MiB/s of `reps` transfers of `total` bytes, the writer wrapped by `wrap`.
async fn transfer(total: usize, reps: usize, wrap: impl Fn(TcpStream) -> Box<dyn Io>) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..reps.max(1) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0usize;
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got += n;
            }
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut w = wrap(stream);
        let chunk = vec![7u8; 256 * 1024];
        let start = Instant::now();
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
        drop(w);
        let got = reader.await.unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(got, sent);
        best = best.max(sent as f64 / (1024.0 * 1024.0) / secs);
    }
    best
}
