//! marina under a hyper HTTP/1 client, end to end on loopback: rate limit per user →
//! signed-token sessions → balancer → health checks → marina's `HttpClient` per backend
//! (a hyper client service over a pool of connections: no connector code to write).
//!
//! ```text
//! request ─► RateLimit (x-user) ─► Affinity (cookie "route") ─► Balance (shared, failover) ─┬─► Health ─► HttpClient (pool of hyper connections) ─► backend 0
//!                                                                                            ├─► …                                                   ─► backend 1
//!                                                                                            └─► …                                                   ─► backend 2
//! ```
//!
//! [`run`] starts three hyper HTTP/1 servers on `127.0.0.1` (each answers
//! `backend <index>`), builds the stack, and drives a few users concurrently. A user's
//! first response carries an [`IssuedToken`]; [`write_session_cookie`] turns it into a
//! `Set-Cookie` header (what a gateway in front of a browser would do), and the user
//! sends it back as `cookie: route=<token>` from then on, so its later requests stick to
//! one backend. One greedy user sends a burst above the per-user rate limit and gets
//! [`RateLimited`] refusals. Response bodies stream: each is read as it arrives, and its
//! connection goes back to its pool when it ends.
//!
//! ```text
//! cargo run --example hyper_client            # 8 users × 30 requests, paced (about 2 s)
//! cargo run --example hyper_client -- --short # 4 users × 5 requests (what its test runs)
//! ```

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use marina::affinity::{AffinityLayer, IssuedToken, TokenCodec, write_session_cookie};
use marina::balance::{Balance, Failover, RoundRobin};
use marina::core::{BoxError, CookieKey, HeaderKey, find};
use marina::health::{ActiveConfig, HealthConfig, HealthLayer, Http5xx, HttpProbe};
use marina::limit::{Rate, RateLimitLayer, RateLimited};
use marina::pool::Pool;
use marina::pool::http::{Body as ResponseBody, HttpClient};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// The request body the demo sends.
pub type Body = Full<Bytes>;

/// The whole client stack, as the users hold it: cheap to clone. Responses stream
/// their bodies ([`ResponseBody`]: hyper's `Incoming`, holding the connection until it
/// ends).
pub type Client = BoxCloneService<Request<Body>, Response<ResponseBody>, BoxError>;

/// The cookie carrying the session token.
const COOKIE_NAME: &str = "route";
/// The header naming the user, the rate limit's key.
const USER_HEADER: &str = "x-user";

/// How much traffic [`run_with`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Well-behaved users, each on its own task.
    pub users: usize,
    /// Requests each well-behaved user sends.
    pub requests_per_user: usize,
    /// Pause between a well-behaved user's requests.
    pub pause: Duration,
    /// Requests the greedy user sends back to back.
    pub greedy_requests: usize,
    /// The per-user rate limit, requests per second.
    pub rate_per_second: u32,
    /// The per-user burst.
    pub burst: u32,
}

impl Options {
    /// A few requests: 4 users × 5 requests, a greedy user with 40 (the test's mode).
    pub fn short() -> Self {
        Options {
            users: 4,
            requests_per_user: 5,
            pause: Duration::ZERO,
            greedy_requests: 40,
            rate_per_second: 20,
            burst: 10,
        }
    }

    /// More traffic: 8 users × 30 requests, paced under the limit, and a greedy user.
    pub fn full() -> Self {
        Options {
            users: 8,
            requests_per_user: 30,
            pause: Duration::from_millis(60),
            greedy_requests: 100,
            rate_per_second: 20,
            burst: 10,
        }
    }
}

/// What one user saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserReport {
    /// The user's name (its `x-user` header).
    pub name: String,
    /// The backend index of each response, in order.
    pub backends: Vec<usize>,
    /// Requests refused by the rate limit.
    pub rate_limited: u64,
    /// Requests that failed otherwise.
    pub failed: u64,
    /// Session tokens received (as `Set-Cookie`).
    pub tokens: u64,
}

impl UserReport {
    /// True when every response came from one backend.
    pub fn stuck(&self) -> bool {
        self.backends.windows(2).all(|w| w[0] == w[1])
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The options it ran with.
    pub options: Options,
    /// Responses per backend (read from the response bodies).
    pub per_backend: Vec<u64>,
    /// Requests per backend, as the balancer counted them.
    pub balancer_requests: Vec<u64>,
    /// TCP connections each backend's pool opened.
    pub connections: Vec<u64>,
    /// Every user's report; the greedy one is last.
    pub users: Vec<UserReport>,
    /// Successful responses.
    pub ok: u64,
    /// Requests refused by the rate limit.
    pub rate_limited: u64,
    /// Requests that failed otherwise.
    pub failed: u64,
    /// Sessions the affinity layer created (one token issued per new session).
    pub sessions_created: u64,
    /// Sessions the affinity layer moved to another backend.
    pub sessions_repinned: u64,
    /// Requests the rate limiter admitted, and refused.
    pub limiter: (u64, u64),
}

impl Summary {
    /// Users whose responses all came from one backend.
    pub fn stuck_users(&self) -> usize {
        self.users.iter().filter(|u| u.stuck()).count()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "hyper_client: {} backends; {} users × {} requests, 1 greedy user × {}; limit {}/s per user (burst {})",
            self.per_backend.len(),
            o.users,
            o.requests_per_user,
            o.greedy_requests,
            o.rate_per_second,
            o.burst
        )?;
        for (i, n) in self.per_backend.iter().enumerate() {
            writeln!(
                f,
                "  backend {i}: {n:>4} responses  (balancer counted {}, pool opened {} connection(s))",
                self.balancer_requests.get(i).copied().unwrap_or(0),
                self.connections.get(i).copied().unwrap_or(0)
            )?;
        }
        writeln!(
            f,
            "  requests: {} ok, {} rate limited, {} failed (limiter: {} admitted, {} refused)",
            self.ok, self.rate_limited, self.failed, self.limiter.0, self.limiter.1
        )?;
        writeln!(
            f,
            "  sessions: {} created, {} re-pinned; {} of {} users stuck to one backend",
            self.sessions_created,
            self.sessions_repinned,
            self.stuck_users(),
            self.users.len()
        )?;
        for u in &self.users {
            let backend = u
                .backends
                .first()
                .map_or("-".to_string(), |b| b.to_string());
            writeln!(
                f,
                "    {:<8} backend {backend}: {:>3} ok, {:>3} rate limited, {} failed{}",
                u.name,
                u.backends.len(),
                u.rate_limited,
                u.failed,
                if u.stuck() { "" } else { "  (moved!)" }
            )?;
        }
        Ok(())
    }
}

/// Starts an HTTP/1 server on `127.0.0.1:0` that answers every request with
/// `backend <index>` (and so `/healthz` with 200).
pub async fn start_backend(index: usize) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "backend {index}"
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
        // Aborting this task drops `conns`, which ends every connection too.
    });
    Ok((addr, task))
}

/// The stack and the handles to its figures.
struct Stack {
    client: Client,
    balance: marina::balance::BalanceHandle,
    affinity: marina::affinity::AffinityHandle,
    limiter: marina::limit::RateLimitHandle,
    backends: Vec<HttpClient>,
}

/// Builds the client stack over `addrs`.
fn build_stack(addrs: &[SocketAddr], options: &Options) -> Result<Stack, BoxError> {
    let mut endpoints = Vec::new();
    let mut backends = Vec::new();
    for (i, &addr) in addrs.iter().enumerate() {
        // Each backend: marina's hyper client service over a pool of HTTP/1
        // connections (`.http2()` for shared HTTP/2 connections).
        let client = HttpClient::builder()
            .pool(
                Pool::builder()
                    .name(format!("backend-{i}"))
                    .max_size(8)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_timeout(Duration::from_secs(2)),
            )
            .build(addr)?;
        backends.push(client.clone());
        // Health: 5xx responses and errors count as failures; a GET /healthz probe
        // every second takes the backend out when it stops answering.
        let health = HealthLayer::new(HealthConfig::default())
            .name(format!("backend-{i}"))
            .classify(Http5xx)
            .probe(
                ActiveConfig {
                    interval: Duration::from_secs(1),
                    ..ActiveConfig::default()
                },
                HttpProbe::new("/healthz"),
                addr,
            );
        endpoints.push(health.layer(client));
    }
    // Failover without copying requests (an `http::Request` is not `Clone`): a request
    // that never reached its backend (connect refused, no connection in time) comes back
    // from the `HttpClient` with its error and goes to another backend.
    let balance: Balance<_, Request<Body>> = Balance::from_services(endpoints, RoundRobin::new())
        .route_hints_from_extensions()
        .failover_unsent(Failover::new());
    let balance_handle = balance.handle();
    // `Balance` is not `Clone`: `shared()` gives every task a handle to the one balancer
    // (no task hop per request, unlike tower's `Buffer`).
    let balance = balance.shared();

    let codec = TokenCodec::new(
        b"marina hyper demo: 32-byte key!!",
        Duration::from_secs(3600),
    )?;
    let affinity = AffinityLayer::token(CookieKey::new(COOKIE_NAME), codec).new_sessions(true);
    let affinity_handle = affinity.handle();
    let limit = RateLimitLayer::keyed(
        HeaderKey::new(USER_HEADER),
        Rate::per_second(options.rate_per_second).burst(options.burst),
    );
    let limiter = limit.handle();
    let client = ServiceBuilder::new()
        .layer(limit)
        .layer(affinity)
        .service(balance);
    Ok(Stack {
        client: BoxCloneService::new(client),
        balance: balance_handle,
        affinity: affinity_handle,
        limiter,
        backends,
    })
}

/// Reads the value of cookie `name` from a response's `Set-Cookie` headers, as a
/// browser would store it.
fn set_cookie_value<B>(resp: &Response<B>, name: &str) -> Option<String> {
    resp.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let first = v.to_str().ok()?.split(';').next()?;
        let (k, v) = first.split_once('=')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

/// One user: `requests` requests, carrying the session cookie once it has one.
async fn user(
    mut client: Client,
    name: String,
    requests: usize,
    pause: Duration,
) -> Result<UserReport, BoxError> {
    let mut report = UserReport {
        name: name.clone(),
        backends: Vec::new(),
        rate_limited: 0,
        failed: 0,
        tokens: 0,
    };
    let mut cookie: Option<String> = None;
    for n in 0..requests {
        if n > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let mut req = Request::get(format!("/hello/{n}")).header(USER_HEADER, name.as_str());
        if let Some(token) = &cookie {
            req = req.header(COOKIE, format!("{COOKIE_NAME}={token}"));
        }
        let req = req.body(Body::new(Bytes::new()))?;
        match client.ready().await?.call(req).await {
            Ok(mut resp) => {
                // A gateway would write the session cookie for its client; here the
                // user reads it back like a browser.
                let issued = resp.extensions().get::<IssuedToken>().map(|t| t.0.clone());
                if write_session_cookie(&mut resp, COOKIE_NAME, "Path=/; HttpOnly") {
                    cookie = set_cookie_value(&resp, COOKIE_NAME);
                    debug_assert_eq!(cookie, issued);
                    report.tokens += 1;
                }
                // The body streams; read it to its end (which gives the connection
                // back to its pool).
                let body = resp.into_body().collect().await?.to_bytes();
                let text = String::from_utf8_lossy(&body);
                match text.strip_prefix("backend ").and_then(|i| i.parse().ok()) {
                    Some(i) => report.backends.push(i),
                    None => report.failed += 1,
                }
            }
            Err(e) if find::<RateLimited>(&*e).is_some() => report.rate_limited += 1,
            Err(e) => {
                eprintln!("{name}: request {n} failed: {e}");
                report.failed += 1;
            }
        }
    }
    Ok(report)
}

/// Runs the demo: [`Options::short`] when `short`, else [`Options::full`].
pub async fn run(short: bool) -> Result<Summary, BoxError> {
    run_with(if short {
        Options::short()
    } else {
        Options::full()
    })
    .await
}

/// Runs the demo with `options`: starts three backends, drives the users, returns what
/// happened. The backends are stopped before it returns.
pub async fn run_with(options: Options) -> Result<Summary, BoxError> {
    let mut addrs = Vec::new();
    let mut servers = Vec::new();
    for i in 0..3 {
        let (addr, task) = start_backend(i).await?;
        addrs.push(addr);
        servers.push(task);
    }
    let stack = build_stack(&addrs, &options)?;

    let mut users = JoinSet::new();
    for u in 0..options.users {
        users.spawn(user(
            stack.client.clone(),
            format!("user-{u}"),
            options.requests_per_user,
            options.pause,
        ));
    }
    let greedy = tokio::spawn(user(
        stack.client.clone(),
        "greedy".to_string(),
        options.greedy_requests,
        Duration::ZERO,
    ));
    let mut reports = Vec::new();
    while let Some(r) = users.join_next().await {
        reports.push(r??);
    }
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    reports.push(greedy.await??);

    let mut per_backend = vec![0; addrs.len()];
    for r in &reports {
        for &b in &r.backends {
            per_backend[b] += 1;
        }
    }
    let mut balancer_requests = vec![0; addrs.len()];
    for s in stack.balance.stats() {
        if let Ok(i) = s.key.parse::<usize>() {
            balancer_requests[i] = s.requests;
        }
    }
    let affinity = stack.affinity.stats();
    let limiter = stack.limiter.stats();
    let summary = Summary {
        options,
        per_backend: per_backend.clone(),
        balancer_requests,
        connections: stack
            .backends
            .iter()
            .map(|c| c.pool().stats().created)
            .collect(),
        ok: per_backend.iter().sum(),
        rate_limited: reports.iter().map(|r| r.rate_limited).sum(),
        failed: reports.iter().map(|r| r.failed).sum(),
        users: reports,
        sessions_created: affinity.created,
        sessions_repinned: affinity.repinned,
        limiter: (limiter.admitted, limiter.rejected),
    };
    drop(stack);
    for s in servers {
        s.abort();
    }
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let short = std::env::args().skip(1).any(|a| a == "--short");
    let summary = run(short).await?;
    print!("{summary}");
    Ok(())
}

/// The example in its short mode, with its summary checked (`cargo test --example
/// hyper_client`; part of `cargo test --workspace`).
#[cfg(test)]
mod tests {
    use super::*;

    /// Generous: a short run takes well under a second.
    const LIMIT: Duration = Duration::from_secs(60);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hyper_client_sessions_stick_and_the_greedy_user_is_limited() {
        let s = tokio::time::timeout(LIMIT, run(true))
            .await
            .expect("the demo finishes")
            .expect("the demo runs");
        println!("{s}");
        let o = s.options;
        let (normal, greedy) = s.users.split_at(o.users);
        let greedy = &greedy[0];
        assert_eq!(greedy.name, "greedy");

        // Nothing failed; every request was answered or refused by the rate limit.
        assert_eq!(s.failed, 0);
        assert_eq!(
            s.ok + s.rate_limited,
            (o.users * o.requests_per_user + o.greedy_requests) as u64
        );
        assert_eq!(s.limiter, (s.ok, s.rate_limited));
        // The balancer's counts agree with who answered.
        assert_eq!(s.balancer_requests, s.per_backend);

        // Well-behaved users stay under their limit: every request answered.
        for u in normal {
            assert_eq!(u.rate_limited, 0, "{u:?}");
            assert_eq!(u.backends.len(), o.requests_per_user, "{u:?}");
        }
        // The greedy user gets its burst, then refusals (40 requests back to back would
        // have to take 1.5 s to stay under 20/s with a burst of 10).
        assert!(greedy.backends.len() >= o.burst as usize, "{greedy:?}");
        assert!(greedy.rate_limited > 0, "{greedy:?}");
        assert_eq!(s.rate_limited, greedy.rate_limited);

        // One token per user, on its first response; then every request sticks.
        for u in &s.users {
            assert_eq!(u.tokens, 1, "{u:?}");
            assert!(u.stuck(), "{u:?} moved between backends");
        }
        assert_eq!(s.stuck_users(), s.users.len());
        assert_eq!(s.sessions_created, s.users.len() as u64);
        assert_eq!(s.sessions_repinned, 0);

        // New sessions are spread by round robin: the users do not all share one backend.
        let mut first: Vec<usize> = s.users.iter().map(|u| u.backends[0]).collect();
        first.sort_unstable();
        first.dedup();
        assert!(first.len() >= 2, "every session landed on {first:?}");

        // Pooled connections were reused: far fewer connects than requests.
        let connects: u64 = s.connections.iter().sum();
        assert!(
            connects >= 1 && connects < s.ok,
            "{connects} connects for {} requests",
            s.ok
        );
    }
}
