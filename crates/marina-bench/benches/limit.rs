//! marina-limit's overheads beside the peers.
//!
//! 1. Rate limiting, per request, on a current-thread runtime: `ready().await` +
//!    `call(req).await` through `RateLimitLayer` (global, and keyed over 10k keys) over
//!    an endpoint that answers at once, with a quota high enough never to refuse; beside
//!    bare governor `check()` / `check_key()` (on governor's default clock in our feature
//!    set, std's `Instant`, and on marina's `TokioClock`) and `tower::limit::RateLimit`.
//!    The direct call is the floor, subtracted from the service rows. Keyed rows: the
//!    request carries its user (a `&'static str` from a table made up front) and the
//!    extractor lends it ([`KeyExtractor::with_key`]), or a closure extractor formats
//!    an owned `String` per request, as the bench did before extractors could lend.
//!    Heap allocations per request are counted (`allocation-counter`) for each row.
//! 2. Key extraction alone: `ClientIp` on a `marina_core::Request` whose extensions
//!    hold the peer address, `extract` (a `String`) against `with_key` (the address
//!    formatted on the stack).
//! 3. Bandwidth: a 64 MiB transfer over loopback TCP, raw, through `BandwidthLimit`
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
use marina_core::{ClientIp, HasExtensions, KeyExtractor, PeerAddr};
use marina_limit::{BandwidthLimit, KeyTable, Rate, RateLimitLayer, TokioClock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::util::ServiceFn;
use tower::{Layer, Service, ServiceExt, service_fn};

type Endpoint<R> = ServiceFn<fn(R) -> Ready<Result<R, Infallible>>>;

fn answer<R>(req: R) -> Ready<Result<R, Infallible>> {
    ready(Ok(req))
}

fn endpoint<R>() -> Endpoint<R> {
    service_fn(answer::<R> as fn(R) -> Ready<Result<R, Infallible>>)
}

/// A request of the keyed rows: the user it is for.
#[derive(Debug, Clone, Copy)]
struct UserReq(&'static str);

/// Reads a [`UserReq`]'s user, lending it: no allocation.
struct ByUser;

impl KeyExtractor<UserReq> for ByUser {
    fn extract(&self, req: &UserReq) -> Option<String> {
        Some(req.0.to_owned())
    }

    fn with_key<R, F: FnOnce(&str) -> R>(&self, req: &UserReq, f: F) -> Option<R> {
        Some(f(req.0))
    }
}

async fn drive<S, R>(svc: &mut S, from: u64, count: u64, make: &impl Fn(u64) -> R)
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    for i in from..from + count {
        let r = svc.ready().await.unwrap().call(make(i)).await.unwrap();
        std::hint::black_box(r);
    }
}

/// Median ns per iteration of `f` over `reps` runs of `iters`.
fn median(reps: usize, mut run: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..reps).map(|_| run()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A service row: median ns per request, and heap allocations per request once warm
/// (the difference of two run lengths, so set-up cancels out).
fn service_row<S, R>(
    rt: &tokio::runtime::Runtime,
    mut svc: S,
    make: impl Fn(u64) -> R,
    iters: u64,
    reps: usize,
) -> (f64, f64)
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    // Warm: every key of the keyed rows known (its table entry made).
    rt.block_on(drive(&mut svc, 0, 2 * KEYS, &make));
    let short = allocation_counter::measure(|| rt.block_on(drive(&mut svc, 0, 1000, &make)));
    let long = allocation_counter::measure(|| rt.block_on(drive(&mut svc, 0, 11_000, &make)));
    let allocs = long.count_total.saturating_sub(short.count_total) as f64 / 10_000.0;
    let ns = median(reps, || {
        let start = Instant::now();
        rt.block_on(drive(&mut svc, 0, iters, &make));
        start.elapsed().as_nanos() as f64 / iters as f64
    });
    (ns, allocs)
}

/// A loop row: median ns per call of `f`, and heap allocations per call.
fn bare_row(iters: u64, reps: usize, mut f: impl FnMut(u64)) -> (f64, f64) {
    let counted = allocation_counter::measure(|| (0..10_000).for_each(&mut f));
    let ns = median(reps, || {
        let start = Instant::now();
        for i in 0..iters {
            f(i);
        }
        start.elapsed().as_nanos() as f64 / iters as f64
    });
    (ns, counted.count_total as f64 / 10_000.0)
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

    let id = |i: u64| i;
    let (floor, _) = service_row(&rt, endpoint::<u64>(), id, iters, reps);
    let quota = Quota::per_second(NonZeroU32::new(HUGE).unwrap());

    // Bare governor, direct.
    let std_direct = RateLimiter::direct(quota);
    let (g_std, _) = bare_row(iters, reps, |_| {
        std::hint::black_box(std_direct.check().is_ok());
    });
    let tokio_direct = RateLimiter::direct_with_clock(quota, TokioClock::new());
    let (g_tokio, _) = bare_row(iters, reps, |_| {
        std::hint::black_box(tokio_direct.check().is_ok());
    });
    // Bare governor, keyed (String keys made up front).
    let keys: Vec<String> = (0..KEYS).map(|k| format!("user-{k}")).collect();
    let keyed = RateLimiter::hashmap(quota);
    let (g_keyed, g_keyed_allocs) = bare_row(iters, reps, |i| {
        std::hint::black_box(keyed.check_key(&keys[(i % KEYS) as usize]).is_ok());
    });

    // marina, global.
    let global = RateLimitLayer::global(Rate::per_second(HUGE)).layer(endpoint::<u64>());
    let (m_global, global_allocs) = service_row(&rt, global, id, iters, reps);
    let m_global = m_global - floor;

    // marina, keyed: the request carries its user, the extractor lends it.
    let users: &'static [&'static str] = keys
        .iter()
        .map(|k| &*k.clone().leak())
        .collect::<Vec<_>>()
        .leak();
    let user = |i: u64| UserReq(users[(i % KEYS) as usize]);
    let (user_floor, _) = service_row(&rt, endpoint::<UserReq>(), user, iters, reps);
    let table = || KeyTable::with_capacity(2 * KEYS as usize);
    let lent = RateLimitLayer::keyed_with(ByUser, Rate::per_second(HUGE), table());
    let (m_lent, lent_allocs) = service_row(&rt, lent.layer(endpoint()), user, iters, reps);
    let m_lent = m_lent - user_floor;

    // marina, keyed: a closure extractor formats an owned key per request.
    let extract = |req: &u64| Some(format!("user-{}", req % KEYS));
    let owned = RateLimitLayer::keyed_with(extract, Rate::per_second(HUGE), table());
    let (m_owned, owned_allocs) = service_row(&rt, owned.layer(endpoint()), id, iters, reps);
    let m_owned = m_owned - floor;
    // The key's own cost: the extractor formats a String per request.
    let (key_cost, _) = bare_row(iters, reps, |i| {
        std::hint::black_box(extract(&i));
    });

    // tower's RateLimit (fixed window), never refusing.
    let tower_rl = tower::limit::RateLimit::new(
        endpoint::<u64>(),
        tower::limit::rate::Rate::new(u64::MAX / 2, Duration::from_secs(1)),
    );
    let (t_rl, t_rl_allocs) = service_row(&rt, tower_rl, id, iters, reps);
    let t_rl = t_rl - floor;

    println!(
        "direct call (floor): {floor:.1} ns/request ({user_floor:.1} for the user requests)\n"
    );
    println!("| what | ns/request | ÷ bare governor (same clock) | allocations/request |");
    println!("|---|---:|---:|---:|");
    println!("| bare governor `check()`, std `Instant` clock | {g_std:.1} | | |");
    println!("| bare governor `check()`, `TokioClock` | {g_tokio:.1} | | |");
    println!(
        "| marina `RateLimit` global (overhead over the call) | {m_global:.1} | {:.2} | {global_allocs:.2} |",
        m_global / g_tokio
    );
    println!("| tower `RateLimit` (overhead over the call) | {t_rl:.1} | | {t_rl_allocs:.2} |");
    println!(
        "| bare governor `check_key()`, 10k `String` keys, `Mutex<HashMap>` | {g_keyed:.1} | | {g_keyed_allocs:.2} |"
    );
    println!(
        "| marina `RateLimit` keyed, 10k keys, key lent by the extractor (overhead, key extraction included) | {m_lent:.1} | {:.2} | {lent_allocs:.2} |",
        m_lent / g_keyed
    );
    println!(
        "| marina `RateLimit` keyed, 10k keys, closure extractor `format!`s the key (overhead, key extraction included) | {m_owned:.1} | {:.2} | {owned_allocs:.2} |",
        m_owned / g_keyed
    );
    println!("| of which: the closure's `format!` of the key | {key_cost:.1} | | |");

    // Key extraction alone.
    let ip = ClientIp::new();
    let mut req = marina_core::Request::new(0u64);
    req.extensions_mut()
        .insert(PeerAddr("[2001:db8::42]:443".parse().unwrap()));
    let (ip_owned, ip_owned_allocs) = bare_row(iters, reps, |_| {
        std::hint::black_box(ip.extract(&req));
    });
    let (ip_lent, ip_lent_allocs) = bare_row(iters, reps, |_| {
        std::hint::black_box(ip.with_key(&req, |k| k.len()));
    });
    println!("\nkey extraction alone: `ClientIp`, peer 2001:db8::42 in the request's extensions\n");
    println!("| call | ns | allocations |");
    println!("|---|---:|---:|");
    println!("| `extract` (an owned `String`) | {ip_owned:.1} | {ip_owned_allocs:.2} |");
    println!("| `with_key` (lent from the stack) | {ip_lent:.1} | {ip_lent_allocs:.2} |");

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
