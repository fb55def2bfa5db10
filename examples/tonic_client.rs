//! marina under a tonic gRPC client, end to end on loopback: rate limit per user →
//! balancer → health checks with the standard gRPC health probe → one tonic `Channel`
//! per server, each connected through one shared marina `KeyedPool`
//! (`Endpoint::connect_with_connector`).
//!
//! ```text
//! HealthClient ─► RateLimit (x-user) ─► Balance (shared) ─┬─► Health (GrpcProbe) ─► Channel ─► server 0
//!                                                          ├─► Health (GrpcProbe) ─► Channel ─► server 1
//!                                                          └─► Health (GrpcProbe) ─► Channel ─► server 2
//!                                         every Channel's connector: one KeyedPool (bounded, timed-out, counted connects)
//! ```
//!
//! No protoc: the RPC is tonic-health's generated `grpc.health.v1.Health/Check`. Each
//! server runs `tonic_health::server::health_reporter()` over hyper's HTTP/2 server,
//! reports [`SERVICE`] as `SERVING`, and tags its replies with an `x-backend` header, so
//! the client counts who answered. [`run`] sends checks from a few users (a greedy one
//! goes over its rate limit), then turns server 2's [`SERVICE`] to `NOT_SERVING`: the
//! endpoint's [`GrpcProbe`] fails, the health layer ejects
//! it, and the balancer stops sending it requests. Prints the replies per server
//! before and after.
//!
//! ```text
//! cargo run --example tonic_client            # 6 users × 20 checks per phase, paced
//! cargo run --example tonic_client -- --short # 3 users × 4 checks (what its test runs)
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderValue;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use marina::balance::{Balance, RoundRobin};
use marina::core::{BoxError, EjectionGate, HeaderKey, find};
use marina::health::{
    ActiveConfig, GrpcProbe, Health, HealthConfig, HealthHandle, HealthLayer, Status,
};
use marina::limit::{Rate, RateLimitLayer, RateLimited};
use marina::pool::{KeyedPool, Pool};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceBuilder};

/// The gRPC service name the servers report and the client checks.
pub const SERVICE: &str = "marina.demo.Backend";

/// The header naming the user (gRPC metadata), the rate limit's key.
const USER_HEADER: &str = "x-user";
/// The header each server adds to its replies: its index.
const BACKEND_HEADER: &str = "x-backend";

/// The balanced channel the generated client runs over. Its errors are tonic
/// `Status`es made from marina's `BoxError`s, which stay reachable as their source
/// ([`marina::core::find`] reaches a [`RateLimited`] through it).
///
/// (A `BoxError` error type would do for tonic, but the generated client's futures
/// then trip a rustc limitation — "implementation of `From` is not general enough" —
/// when spawned on a task.)
pub type GrpcChannel = BoxCloneService<http::Request<Body>, http::Response<Body>, tonic::Status>;

/// How much traffic [`run_with`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Well-behaved users, each on its own task.
    pub users: usize,
    /// Checks each user sends in each phase (before and after the ejection).
    pub requests_per_phase: usize,
    /// Pause between a user's checks.
    pub pause: Duration,
    /// Checks the greedy user sends back to back (before the ejection).
    pub greedy_requests: usize,
    /// The per-user rate limit, requests per second.
    pub rate_per_second: u32,
    /// The per-user burst.
    pub burst: u32,
    /// Time between probe rounds.
    pub probe_interval: Duration,
}

impl Options {
    /// A few requests: 3 users × 4 checks per phase, a greedy user with 30.
    pub fn short() -> Self {
        Options {
            users: 3,
            requests_per_phase: 4,
            pause: Duration::ZERO,
            greedy_requests: 30,
            rate_per_second: 20,
            burst: 10,
            probe_interval: Duration::from_millis(100),
        }
    }

    /// More traffic: 6 users × 20 checks per phase, paced under the limit.
    pub fn full() -> Self {
        Options {
            users: 6,
            requests_per_phase: 20,
            pause: Duration::from_millis(60),
            greedy_requests: 100,
            rate_per_second: 20,
            burst: 10,
            probe_interval: Duration::from_millis(250),
        }
    }
}

/// What happened in one phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Phase {
    /// Replies per backend (from the `x-backend` header).
    pub per_backend: Vec<u64>,
    /// Replies saying `SERVING`.
    pub serving: u64,
    /// Replies saying anything else (`NOT_SERVING`).
    pub not_serving: u64,
    /// Checks refused by the rate limit.
    pub rate_limited: u64,
    /// Checks that failed otherwise.
    pub failed: u64,
}

impl Phase {
    fn new(backends: usize) -> Self {
        Phase {
            per_backend: vec![0; backends],
            ..Phase::default()
        }
    }

    fn add(&mut self, other: &Phase) {
        for (a, b) in self.per_backend.iter_mut().zip(&other.per_backend) {
            *a += b;
        }
        self.serving += other.serving;
        self.not_serving += other.not_serving;
        self.rate_limited += other.rate_limited;
        self.failed += other.failed;
    }

    /// Checks that got a reply.
    pub fn replies(&self) -> u64 {
        self.serving + self.not_serving
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The options it ran with.
    pub options: Options,
    /// Before server 2 stopped serving: the users and the greedy user.
    pub before: Phase,
    /// Of `before`, the greedy user's share.
    pub greedy: Phase,
    /// After the health layer ejected server 2.
    pub after: Phase,
    /// How long after server 2 went `NOT_SERVING` its endpoint was ejected (`None`: it
    /// was not, within 10 s).
    pub ejected_after: Option<Duration>,
    /// Each endpoint's health status at the end.
    pub statuses: Vec<Status>,
    /// Requests per endpoint, as the balancer counted them (both phases).
    pub balancer_requests: Vec<u64>,
    /// Requests the rate limiter admitted, and refused.
    pub limiter: (u64, u64),
    /// Connections the keyed pool opened (one per server: tonic keeps it).
    pub connections: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "tonic_client: 3 servers; {} users × {} checks per phase, 1 greedy user × {}; limit {}/s per user (burst {}); GrpcProbe every {:?}",
            o.users,
            o.requests_per_phase,
            o.greedy_requests,
            o.rate_per_second,
            o.burst,
            o.probe_interval
        )?;
        let phase = |f: &mut fmt::Formatter<'_>, name: &str, p: &Phase| {
            writeln!(
                f,
                "  {name}: {} SERVING, {} NOT_SERVING, {} rate limited, {} failed; per server {:?}",
                p.serving, p.not_serving, p.rate_limited, p.failed, p.per_backend
            )
        };
        writeln!(
            f,
            "  connections opened by the keyed pool: {}",
            self.connections
        )?;
        phase(f, "before", &self.before)?;
        phase(f, "  (greedy)", &self.greedy)?;
        match self.ejected_after {
            Some(d) => writeln!(
                f,
                "  server 2 set NOT_SERVING: probe ejected it after {:.0?}",
                d
            )?,
            None => writeln!(f, "  server 2 set NOT_SERVING: NOT ejected within 10 s")?,
        }
        phase(f, "after ", &self.after)?;
        if self.after.per_backend.get(2).is_some_and(|&n| n > 0) {
            writeln!(
                f,
                "    ({} check(s) still reached server 2 after its ejection: the balancer kept it in its ready set until it was called once more)",
                self.after.per_backend[2]
            )?;
        }
        writeln!(
            f,
            "  balancer: {:?} requests per server; limiter: {} admitted, {} refused",
            self.balancer_requests, self.limiter.0, self.limiter.1
        )?;
        for (i, s) in self.statuses.iter().enumerate() {
            writeln!(f, "  server {i}: {s:?}")?;
        }
        Ok(())
    }
}

/// Starts a gRPC server on `127.0.0.1:0` serving the standard health service, with
/// [`SERVICE`] set to `SERVING`, its replies tagged `x-backend: <index>`. Returns its
/// address, its reporter (to change the status) and its task (abort it to stop).
pub async fn start_server(
    index: usize,
) -> std::io::Result<(SocketAddr, HealthReporter, JoinHandle<()>)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, ServingStatus::Serving)
        .await;
    let tagged = ServiceBuilder::new()
        .map_response(move |mut resp: http::Response<Body>| {
            resp.headers_mut()
                .insert(BACKEND_HEADER, HeaderValue::from(index));
            resp
        })
        .service(health);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let svc = TowerToHyperService::new(tagged.clone());
            conns.spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Ok((addr, reporter, task))
}

/// One endpoint: a channel to `addr` behind a health layer whose active check is the
/// gRPC health probe of [`SERVICE`], over that same channel.
async fn endpoint(
    index: usize,
    addr: SocketAddr,
    probe_interval: Duration,
    gate: &EjectionGate,
    pools: &KeyedPool<HttpConnector, Uri>,
) -> Result<Health<Channel>, BoxError> {
    // The channel gets its connection from the shared keyed pool (tonic then keeps it
    // and multiplexes its calls on it).
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(pools.clone())
        .await?;
    // The gate tells the balancer about the probe's ejections at once.
    let layer = HealthLayer::new(HealthConfig::default())
        .name(format!("server-{index}"))
        .ejection_gate(gate.clone())
        .probe(
            ActiveConfig {
                interval: probe_interval,
                jitter: 0.1,
                timeout: Duration::from_secs(1),
                healthy_threshold: 2,
                unhealthy_threshold: 2,
            },
            GrpcProbe::new(SERVICE),
            channel.clone(),
        );
    Ok(layer.layer(channel))
}

/// Sends `n` checks as user `name`, returning what came back.
async fn user(
    mut client: HealthClient<GrpcChannel>,
    name: String,
    n: usize,
    pause: Duration,
    backends: usize,
) -> Phase {
    let mut phase = Phase::new(backends);
    for i in 0..n {
        if i > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: SERVICE.to_string(),
        });
        match name.parse() {
            Ok(v) => {
                req.metadata_mut().insert(USER_HEADER, v);
            }
            Err(_) => {
                phase.failed += 1;
                continue;
            }
        }
        match client.check(req).await {
            Ok(resp) => {
                let backend = resp
                    .metadata()
                    .get(BACKEND_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                if let Some(slot) = backend.and_then(|b| phase.per_backend.get_mut(b)) {
                    *slot += 1;
                }
                if resp.get_ref().status == WireStatus::Serving as i32 {
                    phase.serving += 1;
                } else {
                    phase.not_serving += 1;
                }
            }
            // The rate limiter's error reaches us inside the `Status` tonic made of it.
            Err(status) if find::<RateLimited>(&status).is_some() => phase.rate_limited += 1,
            Err(status) => {
                eprintln!("{name}: check {i} failed: {status}");
                phase.failed += 1;
            }
        }
    }
    phase
}

/// Runs the users of one phase concurrently (and the greedy user, if `greedy > 0`);
/// returns the phase's total and the greedy user's share.
async fn phase(
    client: &HealthClient<GrpcChannel>,
    options: &Options,
    greedy: usize,
    backends: usize,
) -> Result<(Phase, Phase), BoxError> {
    let mut users = JoinSet::new();
    for u in 0..options.users {
        users.spawn(user(
            client.clone(),
            format!("user-{u}"),
            options.requests_per_phase,
            options.pause,
            backends,
        ));
    }
    let greedy = tokio::spawn(user(
        client.clone(),
        "greedy".to_string(),
        greedy,
        Duration::ZERO,
        backends,
    ));
    let mut total = Phase::new(backends);
    while let Some(p) = users.join_next().await {
        total.add(&p?);
    }
    let greedy = greedy.await?;
    total.add(&greedy);
    Ok((total, greedy))
}

/// Waits until `handle` reports the endpoint ejected, up to `limit`.
async fn ejected(handle: &HealthHandle, limit: Duration) -> bool {
    let mut changes = handle.subscribe();
    tokio::time::timeout(
        limit,
        changes.wait_for(|s| matches!(s, Status::Ejected { .. })),
    )
    .await
    .is_ok_and(|r| r.is_ok())
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

/// Runs the demo with `options`: starts three servers, sends checks, turns server 2 to
/// `NOT_SERVING`, waits for its ejection, sends more checks, and returns what happened.
/// The servers are stopped before it returns.
pub async fn run_with(options: Options) -> Result<Summary, BoxError> {
    const BACKENDS: usize = 3;
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    let mut handles = Vec::new();
    let gate = EjectionGate::new();
    // One keyed pool connects every channel: at most 2 connections per server, each
    // connect bounded by 2 s.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let pools = KeyedPool::new(
        Pool::builder()
            .max_size(2)
            .connect_timeout(Duration::from_secs(2)),
        connector,
    )?;
    for i in 0..BACKENDS {
        let (addr, reporter, task) = start_server(i).await?;
        let ep = endpoint(i, addr, options.probe_interval, &gate, &pools).await?;
        handles.push(ep.handle());
        endpoints.push(ep);
        servers.push((reporter, task));
    }
    let balance: Balance<_, http::Request<Body>> =
        Balance::from_services(endpoints, RoundRobin::new()).ejection_gate(gate);
    let balance_handle = balance.handle();
    let limit = RateLimitLayer::keyed(
        HeaderKey::new(USER_HEADER),
        Rate::per_second(options.rate_per_second).burst(options.burst),
    );
    let limiter = limit.handle();
    // The generated client needs a `Clone` service: `shared()` shares the balancer.
    // (No failover here: a tonic request is not `Clone` and a `Channel` does not give an
    // unsent request back; a refused connect is still never sent twice, and the
    // health checks take the backend out.)
    let channel: GrpcChannel = BoxCloneService::new(
        ServiceBuilder::new()
            .map_err(tonic::Status::from_error)
            .layer(limit)
            .service(balance.shared()),
    );
    let client = HealthClient::new(channel);

    let (before, greedy) = phase(&client, &options, options.greedy_requests, BACKENDS).await?;

    // Server 2 stops serving: its probe fails, and the health layer ejects it.
    servers[2]
        .0
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
    let started = Instant::now();
    let ejected_after = ejected(&handles[2], Duration::from_secs(10))
        .await
        .then(|| started.elapsed());

    let (after, _) = phase(&client, &options, 0, BACKENDS).await?;

    let mut balancer_requests = vec![0; BACKENDS];
    for s in balance_handle.stats() {
        if let Ok(i) = s.key.parse::<usize>() {
            balancer_requests[i] = s.requests;
        }
    }
    let stats = limiter.stats();
    let summary = Summary {
        options,
        before,
        greedy,
        after,
        ejected_after,
        statuses: handles.iter().map(HealthHandle::status).collect(),
        balancer_requests,
        limiter: (stats.admitted, stats.rejected),
        connections: pools.stats().iter().map(|(_, s)| s.created).sum(),
    };
    drop(client);
    for (_, task) in servers {
        task.abort();
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
/// tonic_client`; part of `cargo test --workspace`).
#[cfg(test)]
mod tests {
    use super::*;

    /// Generous: a short run takes well under a second.
    const LIMIT: Duration = Duration::from_secs(60);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tonic_client_balances_and_the_probe_ejects_a_not_serving_server() {
        let s = tokio::time::timeout(LIMIT, run(true))
            .await
            .expect("the demo finishes")
            .expect("the demo runs");
        println!("{s}");
        let o = s.options;

        // Before: every server answers SERVING, round robin spreads the checks.
        assert_eq!(s.before.failed, 0);
        assert_eq!(s.before.not_serving, 0);
        assert!(
            s.before.per_backend.iter().all(|&n| n > 0),
            "{:?}",
            s.before
        );
        assert_eq!(s.before.per_backend.iter().sum::<u64>(), s.before.replies());
        // Only the greedy user went over its limit: its burst, then refusals.
        assert!(s.greedy.serving >= u64::from(o.burst), "{:?}", s.greedy);
        assert!(s.greedy.rate_limited > 0, "{:?}", s.greedy);
        assert_eq!(s.before.rate_limited, s.greedy.rate_limited);
        assert_eq!(
            s.before.replies() - s.greedy.replies(),
            (o.users * o.requests_per_phase) as u64
        );

        // Server 2 went NOT_SERVING: the gRPC probe ejected it.
        assert!(s.ejected_after.is_some(), "server 2 was not ejected");
        assert!(
            matches!(s.statuses[2], Status::Ejected { .. }),
            "{:?}",
            s.statuses
        );
        assert!(
            s.statuses[0].is_ready() && s.statuses[1].is_ready(),
            "{:?}",
            s.statuses
        );

        // After: every check answered, by servers 0 and 1; none reaches server 2 (its
        // health check shares the balancer's gate, so the probe's ejection takes it out of
        // the ready set at once).
        assert_eq!(s.after.failed, 0);
        assert_eq!(s.after.rate_limited, 0);
        assert_eq!(s.after.replies(), (o.users * o.requests_per_phase) as u64);
        assert_eq!(s.after.per_backend[2], 0, "{:?}", s.after);
        assert_eq!(s.after.not_serving, s.after.per_backend[2]);
        assert!(
            s.after.per_backend[0] > 0 && s.after.per_backend[1] > 0,
            "{:?}",
            s.after
        );

        // The limiter and the balancer saw the same traffic.
        let replies = s.before.replies() + s.after.replies();
        assert_eq!(s.limiter, (replies, s.before.rate_limited));
        assert_eq!(s.balancer_requests.iter().sum::<u64>(), replies);
        // One connection per server, from the keyed pool.
        assert_eq!(s.connections, 3);
    }
}
